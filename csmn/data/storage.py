"""One way to read, write and list any URI: a local path or ``s3://bucket/prefix``.

Built on pyarrow filesystems so that Ray Data, pyarrow.parquet and the jobs all see the same
store. The S3 endpoint comes from ``AWS_ENDPOINT_URL`` (a MinIO, moto or other compatible
server), credentials from the standard AWS chain (environment, profile, instance role): never
from the repository.

Writes are atomic. On a local disk a file is written under a hidden temporary name in the
same folder, flushed to the disk (fsync), renamed into place, and the folder's entry flushed
too, so that after a crash a final name holds the whole file or nothing (a rename that
reaches the disk before the data would leave an empty or partial file under it); an S3
object only becomes visible once its upload completes, so a reader never sees a
half-written file under its final name.

Transient failures (throttling, timeouts, a connection reset or refused while a server
restarts) are retried where they happen: every S3 request by the AWS SDK's standard retry
strategy (exponential backoff with jitter, :data:`S3_MAX_ATTEMPTS` attempts, about 14 s of
outage), then each operation of this module as a whole (:data:`STORAGE_ATTEMPTS`), and the
plain Ray tasks that count records (``csmn.pipeline.runtime.TASK_RETRIES``). An error still
transient after that is raised as :class:`TransientStorageError` (an ``OSError``), so that
a stage can tell it from a broken record: never a ``bad_file`` reject, at most a reject whose
code says it may succeed later (``csmn.data.rejects.TRANSIENT_CODES``).
"""

from __future__ import annotations

import errno
import functools
import io
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Attempts per S3 request (the first included). The standard strategy's delays double up to
# 20 s: 6 attempts ride out about 14 s, 10 about 85 s; the Ray task retries come on top.
S3_MAX_ATTEMPTS = 6
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0
# Then the operation as a whole (a listing, a whole-object write), after the client gave up.
STORAGE_ATTEMPTS = 3
STORAGE_BACKOFF_S = 1.0


class TransientStorageError(OSError):
    """A storage error that may succeed if tried again later (it outlived the retries)."""


# How the AWS SDK (through pyarrow) and the OS spell an error that a later try may not meet.
_TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION", "SLOW_DOWN", "SlowDown", "THROTTLING", "Throttling",
    "RequestTimeout", "REQUEST_TIMEOUT", "REQUEST_TIME_TOO_SKEWED", "SERVICE_UNAVAILABLE",
    "ServiceUnavailable", "InternalError", "INTERNAL_FAILURE", "curlCode: 7,", "curlCode: 28,",
    "curlCode: 52,", "curlCode: 55,", "curlCode: 56,", "Connection reset", "Connection refused",
    "Broken pipe", "timed out",
)
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` says the store was briefly unavailable rather than the data bad."""
    if isinstance(err, (TransientStorageError, TimeoutError, ConnectionError)):
        return True
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(err, OSError):
        return err.errno in _TRANSIENT_ERRNOS or any(m in str(err) for m in _TRANSIENT_MARKERS)
    return False


_F = TypeVar("_F")


def _retried(fn: _F) -> _F:
    """Run ``fn`` again after a transient ``OSError`` (:data:`STORAGE_ATTEMPTS` times, the
    delay doubling from :data:`STORAGE_BACKOFF_S`, with jitter), then raise it as
    :class:`TransientStorageError`. Every wrapped operation is idempotent: a read, a listing,
    a delete, or a whole-object write that replaces its target."""

    @functools.wraps(fn)  # type: ignore[arg-type]
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, STORAGE_ATTEMPTS + 1):
            try:
                return fn(*args, **kwargs)  # type: ignore[operator]
            except TransientStorageError:
                raise  # an inner operation retried it already
            except OSError as err:
                if not is_transient(err):
                    raise
                if attempt == STORAGE_ATTEMPTS:
                    raise TransientStorageError(err.errno, str(err)) from err
                delay = STORAGE_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                log.warning("storage: %s failed (attempt %d of %d), again in %.1f s: %s",
                            fn.__name__, attempt, STORAGE_ATTEMPTS, delay, err)  # type: ignore[attr-defined]
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://") or uri.startswith("s3a://")


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    # pyarrow resolves credentials through the AWS SDK's default chain.
    return pafs.S3FileSystem(
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S, **kwargs)


# Where the store is, which this module reads from the environment. Workers of an already
# running cluster were started before a job's driver set them, so a job hands them on, once
# for the whole job (csmn.pipeline.runtime.init_ray). Credentials never are: a runtime env is
# shown by the dashboard and the job API, and workers find their own through the AWS chain
# (instance role, profile, their environment).
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


def s3_filesystem() -> pafs.S3FileSystem:
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return _s3_filesystem(os.environ.get("AWS_ENDPOINT_URL"), region)


def s3_bucket_key(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://`` URI. Split by hand, not by ``urlparse``: a key may hold
    ``#`` or ``?``, which a URL parser takes for a fragment or a query and cuts off."""
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and the path inside it for ``uri``."""
    if is_s3(uri):
        bucket, key = s3_bucket_key(uri)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join URI segments; works for local paths and s3:// URIs alike."""
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


@_retried
def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@_retried
def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@_retried
def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


class UndecodableName(ValueError):
    """A local file whose name is not UTF-8: no URI can name it."""


@_retried
def list_files(uri: str, suffix: str | tuple[str, ...] | None = None, recursive: bool = True,
               skip_prefixes: tuple[str, ...] = (".", "_"),
               undecodable: str = "raise") -> list[str]:
    """Files under ``uri`` (sorted URIs).

    ``skip_prefixes``: names left out. The default skips hidden temporaries of unfinished
    writes and the markers of the project's own outputs (``_meta.json``, ``_SUCCESS``);
    an archive's own files may start with ``_`` (an Instagram name may), so the readers
    skip only ``.``. ``undecodable``: what a local name that is not UTF-8 and ends with
    ``suffix`` does, ``raise`` (:class:`UndecodableName`, naming them escaped) or ``skip``;
    either way the names left out are logged."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [uri]
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    out = []
    undecoded = 0
    for item in fs.get_file_info(selector):
        if item.type != pafs.FileType.File:
            continue
        try:
            item_path = item.path
        except UnicodeDecodeError:
            undecoded += 1
            continue
        name = posixpath.basename(item_path)
        if skip_prefixes and name.startswith(skip_prefixes):
            continue
        if suffix and not name.endswith(suffix):
            continue
        out.append(_to_uri(uri, path, item_path))
    if undecoded:
        names = [name for name in _undecodable_names(path, recursive)
                 if (not suffix or name.endswith(suffix))
                 and not posixpath.basename(name).startswith(skip_prefixes or ())]
        if names and undecodable == "raise":
            raise UndecodableName(
                f"{uri}: {len(names)} file name(s) are not UTF-8 and cannot be read: "
                f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; rename them")
        log.warning("storage: left out %d file(s) under %s whose names are not UTF-8",
                    undecoded, uri)
    return sorted(out)


def _undecodable_names(path: str, recursive: bool) -> list[str]:
    """Local names under ``path`` that are not UTF-8, relative and escaped (``caf\\xe9``)."""
    found = []
    for folder, _, files in os.walk(os.fsencode(path)):
        for name in files:
            full = os.path.relpath(os.path.join(folder, name), os.fsencode(path))
            try:
                full.decode("utf-8")
            except UnicodeDecodeError:
                found.append(full.decode("utf-8", "backslashreplace"))
        if not recursive:
            break
    return sorted(found)


def _to_uri(base_uri: str, base_path: str, item_path: str) -> str:
    rel = posixpath.relpath(item_path, base_path) if is_s3(base_uri) else os.path.relpath(
        item_path, base_path
    )
    return join(base_uri, rel)


@_retried
def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@_retried
def open_input(uri: str) -> IO[bytes]:
    fs, path = resolve(uri)
    return fs.open_input_file(path)


@_retried
def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


@contextmanager
def atomic_output(uri: str) -> Iterator[IO[bytes]]:
    """A writable binary stream that appears under ``uri`` only once closed without error."""
    fs, path = resolve(uri)
    if not is_s3(uri):
        parent = os.path.dirname(path)
        fs.create_dir(parent, recursive=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        stream = open(tmp, "wb")  # noqa: SIM115 (closed below, before the rename)
        try:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
            os.replace(tmp, path)
            _fsync_dir(parent)
        except BaseException:
            if not stream.closed:
                stream.close()
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        # Buffer, then upload in one request on a clean exit: an error inside the block then
        # leaves nothing behind, where a streamed multipart upload would be completed by close.
        buffer = io.BytesIO()
        yield buffer
        with fs.open_output_stream(path) as stream:
            stream.write(buffer.getvalue())


def _fsync_dir(path: str) -> None:
    """Flush a folder's entries (the rename) to the disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and platforms) cannot fsync a folder
        pass
    finally:
        os.close(fd)


@_retried
def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as f:
        f.write(data)


def create_if_absent(uri: str, data: bytes) -> bool:
    """Write ``data`` under ``uri`` only if nothing is there; False if something is. Of
    writers racing for one name exactly one wins, and readers see all of its bytes or
    nothing: a conditional ``PutObject`` (``If-None-Match: *``) on S3; locally a hidden
    temporary file, flushed, then hard-linked to the name (``link`` fails where the name
    exists, where ``rename`` would replace it).

    Not retried as a whole: a retry after a lost reply to a write that did land would find
    the writer's own object and report that someone else won.
    """
    if is_s3(uri):
        import boto3
        from botocore.exceptions import ClientError

        bucket, key = s3_bucket_key(uri)
        try:
            # boto3 reads AWS_ENDPOINT_URL itself, like the pyarrow filesystem above.
            boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                            "ConditionalRequestConflict"):
                return False
            raise
        return True
    _, path = resolve(uri)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(parent)
        return True
    finally:
        os.remove(tmp)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes(uri, buffer.getvalue())


@_retried
def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file or every Parquet file under a folder as one table."""
    files = list_files(uri, suffix=".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet files at {uri}")
    tables = []
    for file_uri in files:
        fs, path = resolve(file_uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables)
