"""record.json's git_commit is raylm's own commit or '': not the HEAD of another project that
holds raylm in its ignored .venv, and not the word 'HEAD' of a repository with no commit."""

import shutil
import subprocess

import pytest

import raylm.record as R

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_raylm_inside_another_projects_repository_records_no_commit(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / ".venv" / "raylm").mkdir(parents=True)
    git(proj, "init", "-q")
    (proj / ".gitignore").write_text(".venv\n")
    (proj / "app.py").write_text("print(1)\n")
    git(proj, "add", ".gitignore", "app.py")
    git(proj, "commit", "-q", "-m", "user's project")
    (proj / "app.py").write_text("print(2)\n")  # the project is dirty too
    installed = proj / ".venv" / "raylm" / "record.py"
    installed.write_text("# installed copy\n")
    monkeypatch.setattr(R, "__file__", str(installed))
    assert R.git_commit() == ""


def test_repository_without_commits_records_no_commit(tmp_path, monkeypatch):
    (tmp_path / "raylm").mkdir()
    git(tmp_path, "init", "-q")
    monkeypatch.setattr(R, "__file__", str(tmp_path / "raylm" / "record.py"))
    assert R.git_commit() == ""


def test_raylms_own_checkout_records_its_commit(tmp_path, monkeypatch):
    (tmp_path / "raylm").mkdir()
    git(tmp_path, "init", "-q")
    (tmp_path / "raylm" / "record.py").write_text("# raylm\n")
    git(tmp_path, "add", "raylm/record.py")
    git(tmp_path, "commit", "-q", "-m", "raylm")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(R, "__file__", str(tmp_path / "raylm" / "record.py"))
    assert R.git_commit() == sha
    (tmp_path / "raylm" / "record.py").write_text("# changed\n")
    assert R.git_commit() == sha + "-dirty"


@pytest.mark.parametrize("text", ["5", '"config stage"', "null"])
def test_a_record_that_is_json_but_not_an_object_is_a_one_line_error(tmp_path, text):
    from raylm.errors import ConfigError

    path = tmp_path / "record.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not a raylm run record"):
        R.load_record(str(path))
