"""Where an image a record names may be read from: one containment rule for every stage.

A record's ``image`` is data from an exporter, not an instruction: read with the job's
credentials, ``../../etc/passwd``, ``/etc/shadow``, ``file:///...`` or
``s3://other-bucket/...`` would make any readable file part of the data set (and its
features, its report thumbnail). So a path is accepted only when it lies under the archive
root, or under one of the prefixes the operator allows (``image_roots``); anything else is
:class:`PathRejected` with code ``bad_path``.

The check is lexical first (``..`` is resolved on the text, never by asking the store), so a
reject says nothing about whether the named file exists or how large it is. A local path is
also checked with its symlinks resolved, so a link planted inside the archive cannot point
out of it; resolving a link reads only the link, never its target's content or size.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Sequence
from functools import lru_cache
from urllib.parse import unquote

BAD_PATH = "bad_path"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_S3_SCHEMES = ("s3", "s3a")


class PathRejected(ValueError):
    """An image path outside the archive root and the allowed prefixes (code ``bad_path``)."""

    code = BAD_PATH

    def __init__(self, detail: str) -> None:
        super().__init__(f"{BAD_PATH}: {detail}")
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{BAD_PATH}: {self.detail}"


def _shown(raw: str) -> str:
    # The reason names the path it refused, but never more than a line of it.
    text = raw if len(raw) <= 200 else raw[:200] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _scheme_of(uri: str) -> str:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def _s3_parts(uri: str) -> tuple[str, str]:
    """(bucket, normalized key) of an ``s3://`` or ``s3a://`` URI; the key may be empty."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    key = posixpath.normpath("/" + key).lstrip("/") if key else ""
    return bucket, "" if key == "." else key


def _s3_under(bucket: str, key: str, prefix: str) -> bool:
    p_bucket, p_key = _s3_parts(prefix)
    if bucket != p_bucket:
        return False
    return not p_key or key == p_key or key.startswith(p_key.rstrip("/") + "/")


@lru_cache(maxsize=256)
def _real_dir(path: str) -> str:
    # Roots and prefixes are resolved once per process: they are the operator's, not data.
    return os.path.realpath(path)


@lru_cache(maxsize=4096)
def _real_folder(path: str) -> str:
    # The folders images sit in repeat (one per user, or one for all): resolving each once
    # per process, not once per record, was a tenth of preprocessing. A folder replaced by a
    # link after its first record is not seen, as it would not be after the check anyway.
    return os.path.realpath(path)


def _real_path(path: str) -> str:
    """``os.path.realpath(path)`` for an absolute normalized path, its folder resolved once.

    realpath resolves the folder, then looks at the last name: a link is followed, anything
    else (a file, a missing name) is appended as it is. The same here, with the folder's
    resolution cached; a link is left to realpath itself.
    """
    folder, name = os.path.split(path)
    if not name or not folder:
        return os.path.realpath(path)
    real = os.path.join(_real_folder(folder), name)
    try:
        if stat.S_ISLNK(os.lstat(real).st_mode):
            return os.path.realpath(path)
    except OSError:
        pass  # missing: realpath keeps the name too
    return real


def _local_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _local_root(uri: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if uri.startswith("/"):  # absolute: neither the working folder nor HOME change it
        return _normalized(uri)
    return os.path.normpath(os.path.abspath(os.path.expanduser(uri)))


@lru_cache(maxsize=256)
def _normalized(path: str) -> str:
    # The roots are checked for every record of an archive and are the operator's, not data.
    return os.path.normpath(path)


def _check_local(path: str, roots: Sequence[str], raw: str) -> str:
    lexical = [r for r in roots if _local_under(path, r)]
    if not lexical:
        raise PathRejected(f"{_shown(raw)} is outside the archive and the allowed image roots")
    real = _real_path(path)
    if not any(_local_under(real, _real_dir(r)) for r in roots):
        raise PathRejected(f"{_shown(raw)} links outside the archive and the allowed image "
                           "roots")
    return path


@lru_cache(maxsize=64)
def _cached_roots(archive_root: str, allowed_prefixes: tuple[str, ...]
                  ) -> tuple[list[str], list[str]]:
    roots = (archive_root, *allowed_prefixes)
    s3_roots = [p for p in roots if _scheme_of(p) in _S3_SCHEMES]
    local_roots = [_local_root(p) for p in roots if _scheme_of(p) not in _S3_SCHEMES]
    return s3_roots, local_roots


def _roots(archive_root: str, allowed_prefixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(S3 roots, local roots normalized; the archive's first when it is local). The same for
    every record of an archive: working them out per record was a third of the path check.
    Relative roots depend on the working folder and HOME: those are worked out every time."""
    roots = (archive_root, *allowed_prefixes)
    if all(r.startswith(("/", "file:///")) or _scheme_of(r) in _S3_SCHEMES for r in roots):
        return _cached_roots(archive_root, allowed_prefixes)
    return _cached_roots.__wrapped__(archive_root, allowed_prefixes)


def resolve_image_path(
    archive_root: str, raw_path: str, allowed_prefixes: Sequence[str] = ()
) -> str:
    """The absolute path or ``s3://`` URI to read for the image ``raw_path`` of a record.

    ``raw_path`` is relative to ``archive_root`` (a local folder or an ``s3://`` prefix), or
    absolute (a path, ``file://``, ``s3://``) under ``archive_root`` or under one of
    ``allowed_prefixes``. Raises :class:`PathRejected` otherwise, and for other schemes
    (``http://``: the stores read local files and S3 only), NUL bytes and empty paths.
    """
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise PathRejected("the image path is empty")
    raw = raw_path.strip()
    if "\x00" in raw:
        raise PathRejected(f"{_shown(raw)} holds a NUL character")
    s3_roots, local_roots = _roots(archive_root, tuple(allowed_prefixes))
    scheme = _scheme_of(raw)
    if scheme:
        if scheme in _S3_SCHEMES:
            bucket, key = _s3_parts(raw)
            if not bucket or not key:
                raise PathRejected(f"{_shown(raw)} names no object")
            if not any(_s3_under(bucket, key, root) for root in s3_roots):
                raise PathRejected(f"{_shown(raw)} is outside the archive and the allowed "
                                   "image roots")
            return f"{scheme}://{bucket}/{key}"
        if scheme == "file":
            # A file URI is percent-encoded (RFC 8089; ``Path.as_uri()`` writes one so).
            rest = unquote(raw[len("file://"):])
            if "\x00" in rest:
                raise PathRejected(f"{_shown(raw)} holds a NUL character")
            host, slash, _ = rest.partition("/")
            if host not in ("", "localhost") or not slash:
                raise PathRejected(f"{_shown(raw)} names another host")
            path = os.path.normpath("/" + rest[len(host):].lstrip("/"))
            return _check_local(path, local_roots, raw)
        raise PathRejected(f"{_shown(raw)}: only relative paths, local paths and s3:// URIs "
                           "are read")
    if _scheme_of(archive_root) in _S3_SCHEMES:
        if raw.startswith("/"):
            # An absolute local path beside an S3 archive: allowed only under a local prefix.
            return _check_local(os.path.normpath(raw), local_roots, raw)
        root_scheme = archive_root.split("://", 1)[0]
        bucket, root_key = _s3_parts(archive_root)
        key = posixpath.normpath(posixpath.join("/", root_key, raw)).lstrip("/")
        if not any(_s3_under(bucket, key, r) for r in s3_roots):
            raise PathRejected(f"{_shown(raw)} is outside the archive and the allowed "
                               "image roots")
        return f"{root_scheme}://{bucket}/{key}"
    root = local_roots[0]  # the archive's own, as it is local here
    path = os.path.normpath(raw if os.path.isabs(raw) else os.path.join(root, raw))
    return _check_local(path, local_roots, raw)
