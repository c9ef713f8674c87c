"""The mode an atomic local write gives its new file, where something was planted at its name."""

import os

import pytest

from raylm import storage


@pytest.fixture
def private_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_a_link_at_the_name_does_not_lend_its_target_mode(tmp_path, private_umask):
    """The write kept "the mode of the file it replaces" by following a link found at its name:
    a link planted in a shared run directory, to a file of mode 0666 anywhere, made the new
    content (a summary, a commit marker) readable and writable by all, whatever the umask."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("theirs")
    os.chmod(elsewhere, 0o666)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere, run / "summary.json")
    storage.write_text(str(run / "summary.json"), "mine")
    assert not os.path.islink(run / "summary.json")
    assert os.stat(run / "summary.json").st_mode & 0o777 == 0o600
    assert elsewhere.read_text() == "theirs" and os.stat(elsewhere).st_mode & 0o777 == 0o666


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user's needs root")
def test_another_users_file_at_the_name_does_not_lend_its_mode(tmp_path, private_umask):
    """Another user's file of mode 0666 put in place of one of this user's made the new content
    readable and writable by all, as the link above did."""
    path = tmp_path / "summary.json"
    path.write_text("theirs")
    os.chown(path, 54321, 54321)
    os.chmod(path, 0o666)
    storage.write_text(str(path), "mine")
    assert path.read_text() == "mine"
    assert os.stat(path).st_uid == 0 and os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user's needs root")
def test_another_users_private_file_stays_private_when_replaced(tmp_path):
    """The other side of the above: another user's 0600 file, replaced (by root), must not
    come back readable to all with the umask's 0644."""
    path = tmp_path / "summary.json"
    path.write_text("theirs")
    os.chown(path, 54321, 54321)
    os.chmod(path, 0o600)
    old = os.umask(0o022)
    try:
        storage.write_text(str(path), "mine")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
