"""A rank stages its checkpoint on local disk before the upload, which removes it; a worker
stopped mid-save (Ctrl-C, SIGTERM, a failure, a kill) left the rank's whole state in the temp
directory, one copy a crash (197 of them, 281 MB, on one test machine). The staging directory
names its process (`staging_dir`), and a new saver removes those whose process is gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from raylm.train import remove_orphaned_staging, staging_dir

STAGE = ("import os, sys; from raylm.train import staging_dir; d = staging_dir('ckpt-00000006', 0); "
         "open(os.path.join(d, '__0_0.distcp'), 'wb').write(bytes(1024)); print(d)")


def test_staging_of_a_process_that_is_gone_is_removed_and_a_live_ones_kept():
    dead = subprocess.run([sys.executable, "-c", STAGE], capture_output=True, text=True, check=True).stdout.strip()
    alive = staging_dir("ckpt-00000006", 0)
    unrelated = tempfile.mkdtemp(prefix="raylm-ckpt-00000006-r0-")  # names no process: not touched
    try:
        assert os.path.isfile(os.path.join(dead, "__0_0.distcp"))  # what a worker stopped mid-save left
        remove_orphaned_staging()
        assert not os.path.exists(dead)
        assert os.path.isdir(alive) and os.path.isdir(unrelated)
    finally:
        for d in (dead, alive, unrelated):
            shutil.rmtree(d, ignore_errors=True)
