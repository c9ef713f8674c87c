"""One place that turns a local path or an `s3://bucket/prefix` URI into storage operations.

Everything that persists data (datasets, checkpoints, Ray Train results, small metadata
files) goes through here, so a run moves from a laptop directory to S3 by changing a
path, and every failure reads the same way: one line naming the URI, what is wrong and
what would fix it (`StorageError`).

Two clients, each for what it does best:
- pyarrow's `S3FileSystem` (`filesystem()`) for bulk data: Ray Data, Ray Train, parquet,
  downloads. It streams and parallelises multipart transfers.
- boto3 (`boto3_client()`) for small objects, listings and uploads: a single PUT is atomic,
  a failed multipart upload is aborted (pyarrow's completes it), a listing returns ETags, and
  errors carry machine-readable codes.

Credentials are never read here: both clients use the AWS default chain (environment,
profile, instance role). Endpoint and region come from `S3Config`, else the standard
AWS environment variables.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import stat
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import boto3
import botocore.config
import pyarrow.fs as pafs
import s3transfer.manager
import s3transfer.subscribers
from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError,
                                 ParamValidationError)

from raylm.config import S3Config
from raylm.progress import Progress

__all__ = [
    "StorageError",
    "FileInfo",
    "is_s3",
    "join",
    "relative",
    "filesystem",
    "boto3_client",
    "clear_cache",
    "exists",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "list_files",
    "delete",
    "makedirs",
    "upload_dir",
    "download_dir",
    "redact_url",
]

_DEFAULT_REGION = "us-east-1"
# Suffix of the temp files behind atomic local writes; listings skip them, so a reader
# never sees a half-written file even while a writer is busy.
_TMP_SUFFIX = ".raylm-tmp"
_CONNECT_TIMEOUT_S = 5
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per request
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
                 "ExpiredToken", "InvalidToken"}
_ACCESS_FIX = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile"
_BAD_BUCKET = ("not a valid bucket name (3-63 characters: lowercase letters, digits, '.' and '-'; "
               "fix the URI)")


from raylm.errors import StorageError  # noqa: E402  (defined with raylm's other error types)


@dataclass(frozen=True)
class FileInfo:
    uri: str  # s3://bucket/key, or an absolute local path
    size: int
    etag_or_mtime: str  # S3 ETag, or the local mtime in nanoseconds: changes when content does


# --------------------------------------------------------------------------- URIs


# The userinfo of a URL (http://, https://, s3://, any scheme): everything between the scheme
# and the last '@' before the path. An endpoint such as http://user:secret@host:9000 carries a
# password there. Quotes and angle brackets never occur in a URL, so a match never runs on
# into the next string of a JSON text or a repr.
_USERINFO = re.compile(r'\b([a-z][a-z0-9+.-]*://)[^/?#\s"<>]*@', re.IGNORECASE)


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***`:
    'cannot reach http://user:secret@host:9000' -> 'cannot reach http://***@host:9000'."""
    return _USERINFO.sub(r"\1***@", text)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Append path parts with '/'. Slashes around parts are dropped, so a part never
    restarts the path at the root the way it does in os.path.join."""
    clean = [p.strip("/") for p in parts if p.strip("/")]
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *clean])
    return os.path.join(uri, *clean)


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers and later commands run in other directories);
    an s3:// URI, or '', as it is."""
    return uri if not uri or is_s3(uri) else os.path.abspath(uri)


def parent(uri: str) -> str:
    """The directory holding `uri`, however it is written: `ckpt-00000200` (a bare name),
    `./x/ckpt-1`, `x/ckpt-1/` and `/abs/x/ckpt-1` give absolute local paths (the first the
    working directory, which splitting at the last '/' would miss); `s3://b/x/ckpt-1/` gives
    `s3://b/x`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return f"s3://{bucket}/{key.rsplit('/', 1)[0]}" if "/" in key else f"s3://{bucket}"
    return os.path.dirname(_local(uri))


def relative(uri: str, base: str) -> str:
    """`uri` relative to `base`; either may be written any way a user writes a path (`runs/x`,
    `./runs/x`, `/abs/runs/x`, `file://...`) or `s3://bucket/prefix/`, and `list_files`
    returns absolute ones. Raises ValueError if `uri` is not under `base`."""
    # `s3://b//x/` names the key `x` (as every request sends it) and lists as `s3://b/x/...`.
    root = _s3_spelling(base) if is_s3(base) else _local(base)
    uri = _s3_spelling(uri) if is_s3(uri) else _local(uri)
    if uri == root or not uri.startswith(root.rstrip("/") + "/"):
        raise ValueError(f"{uri} is not under {base}")
    return uri[len(root.rstrip("/")) + 1:]


def _s3_spelling(uri: str) -> str:
    """`uri` as the object it names is listed: `s3://b//x//y/` -> `s3://b/x/y`."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    key = _key(key)
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def _key(key: str) -> str:
    """A key without empty segments: `/runs//x/` -> `runs/x`. pyarrow refuses a path with an
    empty segment (ArrowInvalid, a traceback), and servers that keep keys as paths (SeaweedFS)
    store `runs//x/f` as `runs/x/f`: a run at `s3://b/runs//x` (`$PREFIX/$RUN` with PREFIX
    ending in '/') listed the prefix `runs//x` and found none of its own checkpoints there."""
    return "/".join(p for p in key.split("/") if p)


def _split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); empty segments dropped (`_key`)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(uri, "no bucket in URI (expected s3://bucket/key)")
    return bucket, _key(key)


def _local(uri: str) -> str:
    """Absolute local path; refuses URIs of schemes this module does not speak."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(uri, "unsupported scheme (use s3://bucket/key or a local path)")
    return os.path.abspath(os.path.expanduser(uri))


# --------------------------------------------------------------------------- clients


def _endpoint(s3: S3Config | None) -> str:
    # The S3-specific variable beats the generic one, as in the AWS SDKs and CLI.
    env = os.environ
    url = (s3.endpoint_url if s3 else "") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    url = (url or "").rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        # A malformed endpoint may still hold a password, with a scheme or without one.
        # Without "://" the userinfo may follow a "/" ("http:/u:pw@h"): all up to the last "@".
        shown = redact_url(url) if "://" in url else re.sub(r"^\S*@", "***@", url)
        raise StorageError(shown, "S3 endpoint must start with http:// or https:// "
                                "(fix s3.endpoint_url or AWS_ENDPOINT_URL)")
    return url


def _region(s3: S3Config | None) -> str:
    for where, region in (("s3.region", s3.region if s3 else ""), ("AWS_REGION", os.environ.get("AWS_REGION")),
                          ("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION"))):
        if region:
            # botocore's own check, here: it raised InvalidRegionError, a traceback, at the first request
            if not re.fullmatch(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?", region):
                raise StorageError(f"{where}={region}", "not a region name (like us-east-1); fix it or leave it unset")
            return region
    return _DEFAULT_REGION


def _attempts(s3: S3Config | None) -> int:
    return (s3 or S3Config()).max_attempts


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem, except that pickling keeps the retry policy.

    pyarrow pickles its constructor options but not `retry_strategy`, so a filesystem
    shipped to Ray workers would silently fall back to 3 attempts. This one pickles as
    a call to the cached factory below instead (on the worker: same endpoint, region,
    retries; credentials from the worker's own default chain)."""

    def __reduce__(self):
        return _s3_filesystem, self._raylm_args


@functools.lru_cache(maxsize=None)
def _s3_filesystem(endpoint: str, region: str, max_attempts: int) -> _S3FileSystem:
    # endpoint_override wants host[:port]; the scheme is a separate option.
    scheme, _, host = endpoint.partition("://") if endpoint else ("https", "", "")
    fs = _S3FileSystem(
        endpoint_override=host or None,
        scheme=scheme,
        region=region,
        # Throttling and 5xx happen on long runs; retry with backoff, but boundedly, so a
        # dead endpoint fails in seconds rather than hanging a training job.
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
    )
    fs._raylm_args = (endpoint, region, max_attempts)
    return fs


@functools.lru_cache(maxsize=None)
def _boto3_client(endpoint: str, region: str, max_attempts: int):
    config = botocore.config.Config(
        region_name=region,
        # total_max_attempts counts the first try, like pyarrow's max_attempts; botocore's
        # `max_attempts` key would mean that many retries on top.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        # botocore waits 60 s for a connection, and retries that too: an endpoint whose firewall
        # drops packets (a wrong host or port) took 8 minutes to fail with the default 8
        # attempts. A connection that takes more than seconds never comes (pyarrow gives up at 3 s).
        connect_timeout=_CONNECT_TIMEOUT_S,
        # Custom endpoints (MinIO, SeaweedFS, an IP) rarely resolve bucket subdomains.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # A private session: boto3's default session is not thread-safe to create clients from.
    client = boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)
    client.meta.events.register("before-send.s3", _without_expect_continue)
    return client


def _without_expect_continue(request, **_) -> None:
    """Send PUTs without `Expect: 100-continue`. After a zero-byte PUT (an empty file, a
    directory marker), botocore parses the next PUT's response on that pooled connection
    against a stale status line, waits out the 60 s read timeout, and silently sends the
    request again (boto/botocore#3755; SeaweedFS and MinIO show it every time). raylm's
    boto3 objects are small, so waiting for 100-continue saves nothing; the header is not
    signed, so dropping it keeps the signature valid."""
    request.headers.pop("Expect", None)


def filesystem(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for `uri`: `bucket/prefix` on S3, an absolute
    path locally. Pass both to Ray Data (`filesystem=`), Ray Train (`storage_filesystem=`)
    or pyarrow.parquet. S3 filesystems are cached per endpoint/region/retries."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        fs = _s3_filesystem(_endpoint(s3), _region(s3), _attempts(s3))
        return fs, f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), _local(uri)


def boto3_client(s3: S3Config | None = None):
    """A cached boto3 S3 client for the same endpoint/region as `filesystem()`."""
    return _boto3_client(_endpoint(s3), _region(s3), _attempts(s3))


def clear_cache() -> None:
    """Forget cached clients, e.g. after changing AWS_* variables in os.environ: boto3
    resolves credentials once per client."""
    _s3_filesystem.cache_clear()
    _boto3_client.cache_clear()


# --------------------------------------------------------------------------- errors


def _problem(e: BaseException, s3: S3Config | None) -> str:
    """What went wrong and how to fix it, from a boto3 or pyarrow/OS error. Never echoes
    request details: messages may reach logs, and signatures are derived from secrets."""
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchBucket":
            return "bucket does not exist (create it or fix the URI)"
        if code == "InvalidBucketName":
            return _BAD_BUCKET
        if code in _ACCESS_CODES:
            return f"access denied ({_ACCESS_FIX})"
        if code in ("NoSuchKey", "404", "NotFound"):
            return "no such file or directory"
        return f"{code}: {err.get('Message', '') or 'S3 request failed'}"
    if isinstance(e, NoCredentialsError):
        return ("no AWS credentials found "
                "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)")
    if isinstance(e, EndpointConnectionError):
        return _unreachable(s3)
    if isinstance(e, ParamValidationError) and "Invalid bucket name" in str(e):
        return _BAD_BUCKET  # botocore's own text quotes two long regexes
    if isinstance(e, BotoCoreError):
        return str(e)
    # pyarrow raises OSError with the AWS SDK's error name in the text.
    text = str(e)
    if "NO_SUCH_BUCKET" in text:
        return "bucket does not exist (create it or fix the URI)"
    if "InvalidBucketName" in text:
        return _BAD_BUCKET
    if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")):
        return f"access denied ({_ACCESS_FIX})"
    if "NETWORK_CONNECTION" in text:
        return _unreachable(s3)
    if isinstance(e, FileNotFoundError) or "NO_SUCH_KEY" in text or "Path does not exist" in text:
        return "no such file or directory"
    if isinstance(e, PermissionError):
        return "permission denied (check the file's and its directory's permissions)"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, NotADirectoryError):
        return "a parent of this path is a file, not a directory"
    if isinstance(e, FileExistsError) and e.filename:  # os.makedirs met a file where it needs a directory
        return f"{e.filename} is a file, not a directory"
    return getattr(e, "strerror", None) or text or type(e).__name__


def _unreachable(s3: S3Config | None) -> str:
    endpoint = redact_url(_endpoint(s3)) or "of AWS"
    return f"cannot reach the S3 endpoint {endpoint} (check s3.endpoint_url / AWS_ENDPOINT_URL)"


@contextlib.contextmanager
def _errors(uri: str, s3: S3Config | None = None) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, ClientError, BotoCoreError) as e:
        error = StorageError(uri, _problem(e, s3))
        # The client's own message repeats the endpoint verbatim: chain it (for a full
        # traceback's benefit) only when that endpoint carries no credentials.
        raise error from (None if redact_url(str(e)) != str(e) else e)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


# --------------------------------------------------------------------------- small files


def exists(uri: str, s3: S3Config | None = None) -> bool:
    """True if `uri` is a file, or a directory/prefix with something in it (S3) or at all
    (local). A missing S3 bucket is an error, not False: it means misconfiguration."""
    if not is_s3(uri):
        return os.path.exists(_local(uri))
    bucket, key = _split_s3(uri)
    client = boto3_client(s3)
    with _errors(uri, s3):
        if not key:
            try:
                client.head_bucket(Bucket=bucket)
                return True
            except ClientError as e:
                if _code(e) in ("404", "NoSuchBucket", "NotFound"):
                    return False
                raise
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _code(e) not in ("404", "NoSuchKey", "NotFound"):
                raise
        # Not an object: maybe a prefix. Listing also turns a missing bucket into NoSuchBucket
        # (HEAD answers a bare 404 for both).
        return client.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1).get("KeyCount", 0) > 0


def read_bytes(uri: str, s3: S3Config | None = None) -> bytes:
    """Whole content of a (small) file."""
    with _errors(uri, s3):
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            if not key:
                raise StorageError(uri, "is a bucket, not an object (add a key: s3://bucket/key)")
            return boto3_client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()
        with open(_local(uri), "rb") as f:
            return f.read()


def read_text(uri: str, s3: S3Config | None = None, encoding: str = "utf-8") -> str:
    return read_bytes(uri, s3).decode(encoding)


def write_bytes(uri: str, data: bytes, s3: S3Config | None = None) -> None:
    """Write a whole (small, < 5 GiB) file atomically: readers see the old content or the
    new, never a partial file. Local parent directories are created as needed."""
    with _errors(uri, s3):
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            if not key:
                raise StorageError(uri, "is a bucket, not an object (add a key: s3://bucket/key)")
            # One PUT is atomic on S3; pyarrow's output stream would start a multipart upload.
            boto3_client(s3).put_object(Bucket=bucket, Key=key, Body=bytes(data))
            return
        path = _local(uri)

        def write(f) -> None:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # content on disk before the rename makes it visible

        _write_local_file(path, write)
        _fsync_dir(os.path.dirname(path))  # and the rename itself, which lives in the directory


def _keep_mode(path: str, fd: int) -> None:
    """Give the new file `fd` the permission bits of the file it replaces, as writing in place
    would: a file its owner made private (0600) must not come back readable to all. Never the
    mode of a file that a link there names, nor more than a new file gets (the umask's) from
    another user's file: either could be planted (in a shared run directory) to hand the new
    content mode 0666, readable and writable by all."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        mode = st.st_mode & 0o777  # never set-id bits: the content is new
        if st.st_uid != os.geteuid():
            mode &= os.fstat(fd).st_mode  # `fd` is new: the umask's mode
        os.fchmod(fd, mode)


def write_text(uri: str, text: str, s3: S3Config | None = None, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding), s3)


def make_durable(uri: str, s3: S3Config | None = None, names: Iterable[str] | None = None) -> None:
    """Local files and directories under `uri` flushed to disk (fsync), for a marker written
    next that says they are complete: copies and renames alone may reach the disk after it, and
    a machine that crashes between would leave a complete-looking checkpoint with empty shards.
    `names`: only these paths relative to `uri`, then each directory holding one, `uri`
    included (a writer flushes its own files); None: everything under `uri`. On object
    storage there is nothing to do: a PUT is durable once it returns."""
    if is_s3(uri):
        return
    root = _local(uri)
    with _errors(uri, s3):
        if names is None:
            for here, _, found in os.walk(root):
                for name in found:
                    _fsync_file(os.path.join(here, name))
                _fsync_dir(here)
            return
        dirs = {root}
        for name in names:
            path = os.path.join(root, name)
            _fsync_file(path)
            while os.path.dirname(path) != root and path != root:
                path = os.path.dirname(path)
                dirs.add(path)
        for d in sorted(dirs, key=len, reverse=True):  # deepest first: a name before its parent's
            _fsync_dir(d)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """A directory's entries flushed, where its filesystem can (some network and FUSE ones
    refuse a directory's fsync: EINVAL)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- listing


def _glob_regex(pattern: str) -> re.Pattern:
    """Glob -> regex: `*` and `?` stay within one path segment, `**` crosses segments,
    and `**/` also matches zero directories (`a/**/b` matches `a/b`)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _glob_base(path: str) -> str | None:
    """The segments before the first one with a wildcard, or None if `path` has none."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if "*" in part or "?" in part:
            return "/".join(parts[:i])
    return None


def list_files(uri_or_glob: str, s3: S3Config | None = None, follow_links: bool = False,
               pattern: bool = True) -> list[FileInfo]:
    """Files at a path: the file itself, every file under a directory/prefix (recursive),
    or those matching a glob (`*`, `?` within a segment, `**` across). Sorted by URI;
    empty if nothing matches. `follow_links`: local directories linked from the tree are
    walked too (a corpus may gather its parts by links), each real directory once.
    `pattern=False`: the path is a name, `*` and `?` in it literal (an output or run path,
    whose listing must never reach files of another path that the pattern would match).
    A local directory that cannot be read, or a link to nothing, where files would be listed
    is an error naming it: a listing that quietly left them out would lose data."""
    with _errors(uri_or_glob, s3):
        if is_s3(uri_or_glob):
            return sorted(_list_s3(uri_or_glob, s3, pattern), key=lambda f: f.uri)
        return sorted(_list_local(uri_or_glob, follow_links, pattern), key=lambda f: f.uri)


def _s3_objects(client, bucket: str, prefix: str) -> Iterator[dict]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _list_s3(uri: str, s3: S3Config | None, pattern: bool = True) -> Iterator[FileInfo]:
    bucket, key = _split_s3(uri)
    client = boto3_client(s3)
    base = _glob_base(key) if pattern else None
    if base is not None:
        prefix, match = (base + "/" if base else ""), _glob_regex(key).match
    elif key:
        prefix, match = key, lambda k: k == key or k.startswith(key + "/")
    else:
        prefix, match = "", lambda k: True
    for obj in _s3_objects(client, bucket, prefix):
        k = obj["Key"]
        # Keys ending in '/' are directory markers (pyarrow creates them), not files.
        if not k.endswith("/") and match(k):
            # A path (no pattern) lists its files under it as it was written: `s3://b//runs/x`
            # (a key's leading '/' is never sent) gives `s3://b//runs/x/...`, not `s3://b/runs/x/...`,
            # which a caller cutting the path off each name would cut one character short.
            name = uri.rstrip("/") + k[len(key):] if base is None and key else f"s3://{bucket}/{k}"
            yield FileInfo(name, obj["Size"], obj.get("ETag", "").strip('"'))


def _list_local(uri: str, follow_links: bool = False, pattern: bool = True) -> Iterator[FileInfo]:
    path = _local(uri)
    base = _glob_base(path) if pattern else None
    # Without `**` a match lies a fixed number of segments down: deeper directories need no
    # walking (nor reading: one the user cannot read there is no loss).
    depth = None
    if base is None:
        if os.path.isfile(path):
            yield _local_info(path)
            return
        base, match = path, lambda p: True
    else:
        match = _glob_regex(path).match
        if "**" not in path:
            depth = path.count("/")
    seen = set()
    for root, dirs, names in os.walk(base or "/", onerror=_unlisted, followlinks=follow_links):
        if follow_links:  # each real directory once: a link up the tree would loop for ever
            if (real := os.path.realpath(root)) in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()  # which of two links to one directory lists it: always the same
        if depth is not None and root.rstrip("/").count("/") + 1 >= depth:
            dirs[:] = []
        for name in names:
            p = os.path.join(root, name)
            if name.endswith(_TMP_SUFFIX) or not match(p):
                continue
            if os.path.isfile(p):
                yield _local_info(p)
            elif os.path.islink(p) and not os.path.exists(p) and not _incidental(p):
                raise StorageError(p, "a link to a missing file (fix or remove the link)")


def _incidental(path: str) -> bool:
    """Hidden (an editor's `.#name` lock is a link to nothing; a corpus leaves hidden files
    out), or the filesystem's own `lost+found`, which only root may read: never data."""
    name = os.path.basename(path.rstrip("/"))
    return name.startswith(".") or name == "lost+found"


def _unlisted(e: OSError) -> None:
    """os.walk's onerror for a listing: as `_unreadable`, but a directory that is never data
    (`_incidental`) may stay unread, as `ls -R` of a volume's root would leave it."""
    if not _incidental(e.filename or ""):
        _unreadable(e)


def _unreadable(e: OSError) -> None:
    """os.walk's onerror: it would skip a directory it cannot read without a word. One gone
    (a missing root: nothing to list; or removed meanwhile) is no loss; any other is."""
    if not isinstance(e, (FileNotFoundError, NotADirectoryError)):
        raise StorageError(e.filename or "", _problem(e, None))


def _local_info(path: str) -> FileInfo:
    st = os.stat(path)
    return FileInfo(path, st.st_size, str(st.st_mtime_ns))


# --------------------------------------------------------------------------- trees


def delete(uri: str, s3: S3Config | None = None) -> None:
    """Delete a file, or a directory/prefix with everything under it. Missing is fine."""
    with _errors(uri, s3):
        if not is_s3(uri):
            path = _local(uri)
            if os.path.isdir(path) and not os.path.islink(path):
                _refuse_whole(uri, path)
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
            return
        bucket, key = _split_s3(uri)
        if not key:
            raise StorageError(uri, "refusing to empty a whole bucket (name a prefix: s3://bucket/prefix)")
        client = boto3_client(s3)
        client.delete_object(Bucket=bucket, Key=key)  # S3 answers success for a missing key
        batch: list[dict] = []
        for obj in _s3_objects(client, bucket, key + "/"):  # markers included: delete them too
            batch.append({"Key": obj["Key"]})
            if len(batch) == _DELETE_BATCH:
                _delete_batch(client, bucket, uri, batch)
                batch = []
        if batch:
            _delete_batch(client, bucket, uri, batch)


def _refuse_whole(uri: str, path: str) -> None:
    """As a whole bucket is never emptied: a directory that holds the filesystem's root, the
    home directory or the working directory (`''`, `/`, `~`, `.`, `..`) is never deleted, whatever
    path led a caller there; raylm deletes only directories it made (run stages, attempts)."""
    real = os.path.realpath(path)
    for keep in ("/", os.path.expanduser("~"), os.getcwd()):
        keep = os.path.realpath(keep)
        if keep == real or keep.startswith(real.rstrip("/") + "/"):
            raise StorageError(uri, f"refusing to delete {real}, which holds {keep} (name a directory inside it)")


def _delete_batch(client, bucket: str, uri: str, batch: list[dict]) -> None:
    reply = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    if errors := reply.get("Errors", []):
        e = errors[0]
        raise StorageError(uri, f"could not delete {len(errors)} objects, e.g. {e.get('Key')}: "
                                f"{e.get('Code')} {e.get('Message', '')}".rstrip())


def makedirs(uri: str) -> None:
    """Create a local directory (and parents). No-op on S3, where prefixes need no creating."""
    if not is_s3(uri):
        with _errors(uri):
            os.makedirs(_local(uri), exist_ok=True)


def unlink_link(uri: str) -> None:
    """Remove a link found at the local path `uri`, a name raylm owns inside a run (a
    checkpoint's directory), so what is written there next lands in the run: never in the
    directory a link planted in a shared run directory names. Nothing to do on S3, for a
    directory or where nothing is (another rank may have removed the link first)."""
    if is_s3(uri):
        return
    path = _local(uri)
    if os.path.islink(path):
        with _errors(uri), contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(path)


# A transfer smaller than this reports no progress: it is over in seconds.
PROGRESS_MIN_BYTES = 256 << 20


class _Meter:
    """Bytes copied so far of a transfer, reported through raylm.progress (a bar on a terminal,
    else a line to `log` every few seconds). Copies in parallel threads add to it under a lock."""

    def __init__(self, label: str, total: int, log, every_s: float | None):
        self.lock, self.done = threading.Lock(), 0
        self.progress = Progress(label, total, unit="MB", scale=1e6, log=log, stream=sys.stderr, every_s=every_s)

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            self.progress.update(self.done)

    def close(self) -> None:
        with self.lock:
            self.progress.close()


def _meter(what: str, uri: str, total: int, log, min_bytes: int, every_s: float | None) -> _Meter | None:
    """A meter for a transfer of `total` bytes to or from `uri`, or None: no `log`, or too
    small to be worth a line. Its label names `uri` without credentials."""
    if log is None or total < min_bytes:
        return None
    return _Meter(f"{what} {redact_url(uri)}", total, log, every_s)


def _copy(f, out, meter: _Meter | None) -> None:
    if meter is None:
        shutil.copyfileobj(f, out, 8 << 20)
        return
    while chunk := f.read(8 << 20):
        out.write(chunk)
        meter.add(len(chunk))


class _Uploaded(s3transfer.subscribers.BaseSubscriber):
    """Bytes sent of an S3 upload, from s3transfer's threads (negative when a part is retried)."""

    def __init__(self, meter: _Meter):
        self.meter = meter

    def on_progress(self, future, bytes_transferred: int, **kwargs) -> None:
        self.meter.add(bytes_transferred)


def upload_dir(local_dir: str, uri: str, s3: S3Config | None = None, *, log=None,
               min_bytes: int = PROGRESS_MIN_BYTES, every_s: float | None = None) -> None:
    """Copy a local directory tree to `uri` (S3 or local); existing files are overwritten.
    Linked files are copied as the files they name. With `log` (e.g. raylm.progress.to_stderr),
    a transfer of `min_bytes` or more reports its progress there (upload_tree)."""
    src = _local(local_dir)
    if not os.path.isdir(src):
        raise StorageError(local_dir, "no such directory")
    if not is_s3(uri):
        _refuse_inside(src, _local(uri), uri, local_dir)
    with _errors(uri, s3):
        upload_tree(src, uri, s3, log=log, min_bytes=min_bytes, every_s=every_s)


def upload_tree(src: str, uri: str, s3: S3Config | None = None, *, log=None,
                min_bytes: int = PROGRESS_MIN_BYTES, every_s: float | None = None) -> None:
    """Copy the local tree `src` to `uri`, file by file, each whole or not at all: a copy cut
    midway (a read error, an interrupt) leaves the file it would replace, or none, never part
    of the new one under its name. Locally a temp file renamed into place; on S3 boto3's
    transfer manager, which aborts a multipart upload that fails. Not pyarrow: its output
    stream completes the upload when closed, also after an error, so half a file became the
    object. What cannot be copied whole (a directory that cannot be read, a link to a
    directory or to nothing) is an error naming it before anything is written: a copy that
    left it out would look complete. With `log`, a tree of `min_bytes` or more reports the
    bytes copied of the whole there, a line every `every_s` seconds (raylm.progress's default
    when None) or a bar when stderr is a terminal."""
    files = []
    for root, dirs, names in os.walk(src, onerror=_unreadable):
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):
                raise StorageError(os.path.join(root, name), "a link to a directory, which is not copied "
                                                             "(put the directory itself there)")
        for name in sorted(names):
            path = os.path.join(root, name)
            if not os.path.exists(path):
                raise StorageError(path, "a link to a missing file (fix or remove the link)")
            if not os.path.isfile(path):  # reading a pipe would wait for a writer for ever
                raise StorageError(path, "not a regular file (a pipe, socket or device), which is not copied")
            files.append(path)
    total = sum(os.path.getsize(p) for p in files) if log is not None else 0
    meter = _meter("upload", uri, total, log, min_bytes, every_s)
    with contextlib.ExitStack() as stack:
        if meter is not None:
            stack.callback(meter.close)
        if is_s3(uri):  # its threads upload one file's parts at once; files go one at a time, in order
            transfers = stack.enter_context(s3transfer.manager.TransferManager(boto3_client(s3)))
        for path in files:
            target = join(uri, os.path.relpath(path, src).replace(os.sep, "/"))
            with _errors(path):  # a local file that cannot be read: named, not the destination
                f = open(path, "rb")
            with f:
                if is_s3(uri):
                    transfers.upload(f, *_split_s3(target),
                                     subscribers=[_Uploaded(meter)] if meter is not None else None).result()
                else:
                    _write_local_file(_local(target), lambda out: _copy(f, out, meter))


def _write_local_file(target: str, write) -> None:
    """`target` made a new file by `write(out)`: into a temp file beside it, renamed over it
    once whole, so a copy cut midway leaves the old file, or none, never part of the new one.
    A link found there (in a shared run directory, anyone who can write there could have put
    one) is replaced by the rename, never written through, which would overwrite the file it
    names, wherever that is."""
    parent = os.path.dirname(target)
    # Same directory, so os.replace is a rename within one filesystem (atomic on POSIX).
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
    try:
        with _errors(target):
            os.makedirs(parent, exist_ok=True)
            out = open(tmp, "xb")  # 'x': never through a link; the mode honours the umask
        with out:
            with _errors(target):
                _keep_mode(target, out.fileno())
            write(out)
        with _errors(target):
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def download_dir(uri: str, local_dir: str, s3: S3Config | None = None, *, log=None,
                 min_bytes: int = PROGRESS_MIN_BYTES, every_s: float | None = None) -> None:
    """Copy the tree under `uri` (S3 or local) into `local_dir`, creating it. Every file lands
    inside `local_dir`: a key that would not (one with '..', '.' or empty segments: object
    keys may hold them) is refused, naming it, before anything is written. With `log` (e.g.
    raylm.progress.to_stderr), a tree of `min_bytes` or more reports the bytes copied there,
    a line every `every_s` seconds (raylm.progress's default when None) or a bar when stderr
    is a terminal."""
    # pyarrow reports a missing bucket as a missing path; exists() tells them apart.
    if not exists(uri, s3):
        raise StorageError(uri, "no such file or directory")
    src_fs, src = filesystem(uri, s3)
    dst = _local(local_dir)
    if not is_s3(uri):
        _refuse_inside(src, dst, local_dir, uri)
    with _errors(uri, s3):
        if src_fs.get_file_info(src).type == pafs.FileType.File:
            raise StorageError(uri, "is a file, not a directory (name the directory holding it)")
        found = src_fs.get_file_info(pafs.FileSelector(src, recursive=True))
    # Not pyarrow.fs.copy_files: it joins each key to the destination as it is, so
    # `tok/../../x` is written two levels above it.
    root = src.rstrip("/") + "/"
    plan, total = [], 0
    for info in found:
        if info.type != pafs.FileType.File or info.base_name.endswith(_TMP_SUFFIX):
            continue  # directories (S3 markers) are made as their files need them
        rel = info.path[len(root):] if info.path.startswith(root) else info.path
        parts = rel.split("/")
        if not info.path.startswith(root) or any(p in ("", ".", "..") for p in parts):
            raise StorageError(uri.rstrip("/") + "/" + rel,
                               "not a name a local file can have inside the download directory "
                               "('.', '..' or empty segments); rename or remove it")
        plan.append((info.path, os.path.join(dst, *parts)))
        total += info.size or 0
    meter = _meter("download", uri, total, log, min_bytes, every_s)
    with _errors(local_dir):
        os.makedirs(dst, exist_ok=True)

    def fetch(item: tuple[str, str]) -> None:
        path, target = item
        name = f"s3://{path}" if is_s3(uri) else path
        with _errors(name, s3):
            f = src_fs.open_input_stream(path)
        with f, _errors(name, s3):
            _write_local_file(target, lambda out: _copy(f, out, meter))

    try:
        if is_s3(uri) and len(plan) > 1:  # one request at a time would leave the bandwidth idle
            with ThreadPoolExecutor(min(8, len(plan))) as pool:
                list(pool.map(fetch, plan))
        else:
            for item in plan:
                fetch(item)
    finally:
        if meter is not None:
            meter.close()


def _refuse_inside(src: str, dst: str, dst_as_given: str, src_as_given: str) -> None:
    """A local copy into the tree it copies would open each file for writing, and so empty
    it, before or while it is read."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src.rstrip("/") + "/"):
        raise StorageError(dst_as_given, f"is inside the directory being copied ({src_as_given}); "
                                         f"copy to a directory outside it")
