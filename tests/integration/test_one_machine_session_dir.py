"""The session directory of the local cluster raylm starts (its logs, sockets and spilled
objects) lies under a directory no other user of the machine can enter. Under Ray's default,
/tmp/ray (mode 0777, as Ray makes each session's logs/ and sockets/), any local user could
read every worker's output and delete or replace the raylet's and object store's sockets."""

from __future__ import annotations

import os
import stat

import pytest

pytestmark = pytest.mark.integration


def test_the_session_directory_is_closed_to_other_users(ray_local):
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    closed = []
    path = os.path.dirname(session)
    while True:
        st = os.stat(path)
        if st.st_uid == os.getuid() and not stat.S_IMODE(st.st_mode) & 0o077:
            closed.append(path)
        if os.path.dirname(path) == path:
            break
        path = os.path.dirname(path)
    assert closed, f"{session}: every directory above it lets other users in"

    @ray.remote
    def where() -> str:
        return ray._private.worker._global_node.get_session_dir_path()

    assert ray.get(where.remote()) == session  # the workers use it too
