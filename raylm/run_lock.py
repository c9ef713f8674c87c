"""One process a run: `held(run_dir)` keeps a second raylm process from writing into a run
directory that another one is using (two runs of one name would write their checkpoints,
metrics and records over each other's).

- Local directories: the kernel's `flock` on `.raylm.lock`. A process that dies, however it
  dies, lets go, so a restarted driver resumes at once. A holder that found the file empty (made
  for it) removes it when it lets go, after a refused resume too, so a run directory keeps no
  lock file it did not have; a newcomer checks that the file it locked is still the one there.
- `s3://`: a lease, the object `.raylm.lock` created with a conditional PUT
  (`If-None-Match: *`) and renewed by its holder every quarter of its term with
  `If-Match` on its last ETag. A newcomer that finds a lease watches it: a renewal means the
  holder is alive (refused); a lease left unchanged for its whole term is taken over
  (`If-Match` again, so two newcomers cannot both take it). A holder recorded on this same
  machine whose process is gone is taken over at once, as with `flock`. A holder whose renewal
  finds the lease taken (it could not renew it for a whole term) is stopped there and then, as
  Ctrl-C stops it (where it holds the run on its main thread), and ends with one line saying
  so: writing on would mix its checkpoints with the new holder's. An endpoint that
  ignores conditional writes is detected when the lease is taken and said in one line; the
  run then goes on without a lock, as before.

Fencing: a holder's processes outlive its hold (Ray Train's workers run on for a second or two
after their driver is SIGKILLed, and an S3 holder's for up to a renewal interval after a
takeover). Each hold writes a fresh token into the lock file or lease; `fence_for(run_dir)`
gives it to the holder's workers, and `check_fence`, called before each checkpoint commit and
metrics write, stops a worker whose lock now carries another token (`RunTaken`), before it
writes. What remains is the moment between that check and the write it guards.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import json
import math
import os
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from typing import Iterator

from botocore.exceptions import BotoCoreError, ClientError

from raylm import storage
from raylm.config import S3Config
from raylm.errors import StorageError, UserError

RUN_LOCK = ".raylm.lock"
# The term of an S3 lease. A holder renews every quarter of it, so three renewals in a row
# can fail (a network blip, botocore's own retries) before a watcher may take over; a
# driver that died on another machine delays its restart by at most this long.
LEASE_S = float(os.environ.get("RAYLM_S3_LEASE_S", "60"))
_TAKEN = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
# The token of each run directory this process holds, by `_key`: what `fence_for` hands on.
_FENCES: dict[str, dict] = {}


class RunTaken(UserError):
    """Another process holds the run now: a worker of the holder that lost it stops without
    writing (its checkpoints and metrics would land beside or over the new holder's)."""


def _key(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else storage._local(uri)


def fence_for(uri: str) -> dict | None:
    """{"lock": the lock file's URI, "token": this hold's token} for the run directory `uri`
    this process holds (`held`); None where it holds none, or its lock locks nothing (a
    filesystem without `flock`, an S3 endpoint that ignores conditional writes)."""
    return _FENCES.get(_key(uri))


def _token_in(body: bytes) -> str | None:
    """The token a lock file (`token <hex>` on a line) or lease (JSON, "token") carries."""
    text = body.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            info = json.loads(text)
            return info.get("token") if isinstance(info, dict) else None
    for line in text.splitlines():
        if line.startswith("token "):
            return line[len("token "):].strip()
    return None


def check_fence(fence: dict | None, s3: S3Config | None = None) -> None:
    """Raise `RunTaken` unless the run's lock still carries `fence`'s token (`fence_for`):
    one small read, of the lock file or the lease. None: nothing to check."""
    if not fence:
        return
    try:
        token = _token_in(storage.read_bytes(fence["lock"], s3))
    except StorageError:
        if storage.exists(fence["lock"], s3):
            raise
        # Gone: its holder let go, or this node does not see the driver's run directory.
        raise RunTaken(f"{storage.redact_url(fence['lock'])}: gone (its holder let go, or this node does not see the "
                       "run directory the driver holds: local storage on a cluster of several nodes needs a "
                       "filesystem they all share, else use s3://); this process stops here without writing to "
                       "the run") from None
    if token != fence["token"]:
        raise RunTaken(f"{storage.redact_url(fence['lock'])}: another process holds this run now (its lock no longer "
                       "carries this one's token); this process stops here without writing to the run")


@contextlib.contextmanager
def _fenced(uri: str, lock_uri: str, token: str) -> Iterator[None]:
    key = _key(uri)
    _FENCES[key] = {"lock": lock_uri, "token": token}
    try:
        yield
    finally:
        if _FENCES.get(key, {}).get("token") == token:
            del _FENCES[key]


@contextlib.contextmanager
def held(uri: str, what: str = "run", s3: S3Config | None = None) -> Iterator["_S3Lease | None"]:
    """Hold the run directory `uri` for this process while the block runs; a second raylm
    process that asks for it is refused, naming the holder."""
    if storage.is_s3(uri):
        with _S3Lease(uri, what, s3) as lease:
            with _fenced(uri, lease.lock_uri, lease.token) if lease.thread else contextlib.nullcontext():
                yield lease
    else:
        with _flock(uri, what) as token:
            with _fenced(uri, storage.join(uri, RUN_LOCK), token) if token else contextlib.nullcontext():
                yield None


def _holder(what: str) -> str:
    return f"a raylm {what}, pid {os.getpid()} on {socket.gethostname()}"


def _refused(uri: str, holder: str, what: str) -> StorageError:
    return StorageError(uri, f"in use by {holder} (wait for it to end, or give this {what} another name=)")


def _same_file(fd: int, lock: str) -> bool:
    """Whether `fd` is still the file at `lock`: a holder may remove it when it lets go, and a
    newcomer that had opened it before then and locks it after holds a file no one else will
    open (and another newcomer makes a new one)."""
    try:
        at = os.stat(lock)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at.st_dev, at.st_ino)


@contextlib.contextmanager
def _flock(uri: str, what: str) -> Iterator[str | None]:
    """Yields this hold's token, written into the lock file under the holder's line (None
    where the filesystem has no locks). The lock file is removed by its holder when it lets go
    if it found it empty, as raylm makes it: a command refused after taking the lock (a resume
    under other settings) leaves the run directory as it found it. One that names a holder (an
    older raylm's, kept after its run, or a killed holder's) is left where it was."""
    import fcntl

    path = storage._local(uri)
    lock = os.path.join(path, RUN_LOCK)
    with storage._errors(uri, None):
        os.makedirs(path, exist_ok=True)
        while True:
            try:  # never through a link: one planted in a shared run directory got the file it names emptied
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise StorageError(lock, "a link where the run's lock file goes, which raylm never writes "
                                         "through (remove the link)") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a pipe or device: nothing to lock or write
                os.close(fd)
                raise StorageError(lock, "not a regular file where the run's lock file goes (remove it)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                said = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
                holder = said.splitlines()[0].strip() if said else "another raylm process"
                os.close(fd)
                raise _refused(uri, holder, what) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                locked = False  # a filesystem without locks (some network ones): no lock, as before
                break
            if _same_file(fd, lock):
                locked = True
                break
            os.close(fd)  # removed by its holder after this process opened it: try again
    made = os.fstat(fd).st_size == 0
    token = uuid.uuid4().hex if locked else None
    try:
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{_holder(what)}\ntoken {token}\n".encode(), 0)
        yield token
    finally:
        if made and locked:  # removed while still held: a newcomer that locks it then sees it gone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
        os.close(fd)  # and the lock with it


def _machine() -> str:
    """This machine and pid namespace: a pid means the same process only where both match."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):  # Linux only; elsewhere the host name alone
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def pid_gone(pid: int) -> bool:
    """Whether no process of this number runs on this machine (one of another user's runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, someone else's
    return False


def _term(lease_s) -> float:
    """The term a lease's holder gave it; this process's own where the lease names none that
    can be (not a number, not positive and finite: a lease written by something else)."""
    try:
        term = float(lease_s)
    except (TypeError, ValueError):
        return LEASE_S
    return term if 0 < term < math.inf else LEASE_S


class _S3Lease:
    def __init__(self, uri: str, what: str, s3: S3Config | None):
        self.uri, self.what, self.s3 = uri, what, s3
        self.lock_uri = storage.join(uri, RUN_LOCK)
        self.bucket, self.key = storage._split_s3(self.lock_uri)
        self.client = storage.boto3_client(s3)
        self.etag: str | None = None
        self.token = uuid.uuid4().hex  # this hold's, in every body it writes (fencing)
        self.lost: str | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        # A holder whose lease was taken is stopped at once (as Ctrl-C stops it) where the block
        # runs on the main thread: writing on would mix its checkpoints with the new holder's.
        self.main = False
        self.interrupted = False
        self.guard = threading.Lock()  # the interrupt and the block's end never cross

    def _body(self) -> bytes:
        # A fresh nonce each renewal: S3's ETag is the body's MD5, and a watcher sees a
        # renewal only as a new ETag.
        return json.dumps({"holder": _holder(self.what), "machine": _machine(), "pid": os.getpid(),
                           "lease_s": LEASE_S, "token": self.token, "renewal": uuid.uuid4().hex}).encode()

    def _put(self, **condition) -> str | None:
        """The lease written under `condition`; its ETag, or None where another writer won. On
        AWS, `If-Match` on a lease deleted meanwhile answers 404 NoSuchKey (SeaweedFS: 412):
        the lease seen is gone either way."""
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]
        except ClientError as e:
            if storage._code(e) in _TAKEN or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return None
            if "IfMatch" in condition and storage._code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def _read(self) -> tuple[str, dict] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if storage._code(e) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            info = json.loads(got["Body"].read())
        except ValueError:
            info = {}
        return got["ETag"], info if isinstance(info, dict) else {}

    def _acquire(self) -> None:
        seen, since, told = None, 0.0, False
        while True:
            etag = self._put(IfNoneMatch="*")
            if etag:
                self.etag = etag
                return
            current = self._read()
            if current is None:
                time.sleep(0.05)
                continue  # let go in between: try again
            etag, info = current
            lease = _term(info.get("lease_s"))
            holder = str(info.get("holder") or "another raylm process")
            pid = info.get("pid")
            here = info.get("machine") == _machine() and isinstance(pid, int)
            if here and pid == os.getpid():
                raise _refused(self.uri, holder, self.what)  # this very process: alive
            if here and pid_gone(pid):  # its process is gone: as with flock, resume at once
                if self._take(etag, f"its holder, {holder}, is gone"):
                    return
                seen = None  # another newcomer won: look again
                continue
            if seen is None or etag != seen:
                if seen is not None:  # renewed while watched: alive
                    raise _refused(self.uri, holder, self.what)
                seen, since = etag, time.monotonic()
            elif time.monotonic() - since > lease:
                if self._take(etag, f"its holder, {holder}, left it without renewing for its {lease:.0f} s term"):
                    return
                seen = None  # another newcomer won, or the holder renewed: look again
                continue
            if not told:
                print(f"raylm: {self.uri} is leased by {holder}; watching the lease for up to {lease:.0f} s "
                      "(refused if it is renewed, taken over if not)", file=sys.stderr, flush=True)
                told = True
            time.sleep(min(1.0, lease / 16))

    def _take(self, etag: str, why: str) -> bool:
        """Take over the lease last seen as `etag`; False where another writer got there first."""
        taken = self._put(IfMatch=etag)
        if taken:
            print(f"raylm: took over {self.lock_uri}: {why}", file=sys.stderr, flush=True)
            self.etag = taken
        return bool(taken)

    def _honoured(self) -> bool:
        """Whether the endpoint refuses a second create: some S3-compatible servers ignore
        `If-None-Match`, and a lease there would lock nothing."""
        again = self._put(IfNoneMatch="*")
        if again is None:
            return True
        self.etag = again
        return False

    def _renew(self) -> None:
        failures = 0
        while not self.stop.wait(LEASE_S / 4):
            try:
                etag = self._put(IfMatch=self.etag)
            except (ClientError, BotoCoreError, OSError) as e:
                failures += 1
                # botocore's messages quote the endpoint URL, credentials and all
                print(f"raylm: could not renew the lease {self.lock_uri} ({failures} in a row): "
                      f"{storage.redact_url(storage._problem(e, self.s3))}", file=sys.stderr, flush=True)
                continue
            if etag is None:
                try:
                    gone = self._read() is None
                except (ClientError, BotoCoreError, OSError):
                    gone = False
                self.lost = (f"the lease {self.lock_uri} was deleted by another process; another may hold this run "
                             "now" if gone else
                             f"the lease {self.lock_uri} was taken over by another process after this one "
                             f"could not renew it for {LEASE_S:.0f} s; two processes may have written this run")
                print(f"raylm: {self.lost}", file=sys.stderr, flush=True)
                with self.guard:
                    if self.main and not self.stop.is_set():
                        self.interrupted = True
                        _thread.interrupt_main(signal.SIGINT)  # Ray Train's handler stops its workers too
                return
            self.etag, failures = etag, 0

    def __enter__(self) -> "_S3Lease":
        with storage._errors(self.uri, self.s3):
            self._acquire()
            if not self._honoured():
                print(f"raylm: the S3 endpoint ignores conditional writes (If-None-Match), so {self.uri} has no "
                      "run lock: keep one process a run name", file=sys.stderr, flush=True)
                return self  # nothing to renew; the object is deleted at the end
        self.main = threading.current_thread() is threading.main_thread()
        self.thread = threading.Thread(target=self._renew, name="raylm-run-lease", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            with self.guard:
                self.stop.set()
            if self.thread:
                self.thread.join()
        except KeyboardInterrupt:
            if not self.interrupted:  # the user's own Ctrl-C
                raise
            if self.thread:
                self.thread.join()
        if self.etag and not self.lost:
            with contextlib.suppress(ClientError, BotoCoreError, OSError):
                current = self.client.head_object(Bucket=self.bucket, Key=self.key)
                if current["ETag"] == self.etag:
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)
        if self.lost and (exc[0] is None or (self.interrupted and issubclass(exc[0], KeyboardInterrupt))):
            raise StorageError(self.uri, self.lost) from None
