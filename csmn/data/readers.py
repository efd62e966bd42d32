"""Raw archives in, raw posts (``schemas/raw_post.json``) and reject rows out.

Four layouts, told apart by :func:`detect_layout`:

``jsonl``    ``<archive>/posts/*.jsonl``: one raw post per line (what ``csmn synth`` writes).
``parquet``  ``<archive>/posts/*.parquet``: one raw post per row.
``instapic`` the authors' InstaPIC-1.1M release: JSON files (``<archive>/*.json`` or
             ``<archive>/json/*.json``) holding ``{user_id: {post_id: {"caption": ...,
             "tags": ...}}}``; a list value is joined by spaces; images named
             ``{user_id}_@_{post_id}`` without extension in an ``images`` folder next to the
             JSON (or next to its folder).
``yfcc``     the authors' YFCC100M release: ``{user_id: [{"title", "description",
             "user tags", "page url"}]}``; caption = title + description, hashtags = user
             tags, post id = the photo id at the end of the page url, images named
             ``{user_id}_{post_id}``.

A record that does not fit becomes a reject row (stage ``read``, reason ``code: detail``,
record id where it has one, ``source`` = file:line, the payload) and the read goes on: for
every source, records in = posts + rejects. Codes: ``bad_json``, ``bad_encoding``,
``not_an_object``, ``missing_field``, ``wrong_type``, ``bad_timestamp``, ``bad_url``,
``missing_image`` (InstaPIC/YFCC, where the image folder is listed anyway), ``bad_file``
(a whole file that cannot be opened or parsed counts as one record).

Sources are single files so that a pipeline can parse them in parallel (one Ray task each,
:func:`list_sources` + :func:`parse_source`); :func:`read_archive` runs them in sequence.
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import pyarrow.parquet as pq

from csmn.data import storage
from csmn.data.rejects import reject_row
from csmn.data.schemas import record_problem

STAGE = "read"
LAYOUTS = ("jsonl", "parquet", "instapic", "yfcc")
Batch = tuple[list[dict[str, Any]], list[dict[str, Any]]]

_POST_ID_IN_TEXT = re.compile(r'"post_id"\s*:\s*"([^"\\]{1,200})"')
_FIRST_VALUE = re.compile(r'^\s*\{\s*(?:"(?:[^"\\]|\\.)*"\s*:\s*([\[{])|(\}))', re.S)
_HTML_TAG = re.compile(r"<[^>]{0,500}>")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_PEEK_BYTES = 1 << 16


class ReadError(ValueError):
    """The archive itself cannot be read (no known layout): not one bad record."""


# --------------------------------------------------------------------------------------------
# Layout and sources


def _json_files(archive_uri: str) -> list[str]:
    files = storage.list_files(archive_uri, suffix=".json", recursive=False)
    json_dir = storage.join(archive_uri, "json")
    if storage.is_dir(json_dir):
        files += storage.list_files(json_dir, suffix=".json", recursive=False)
    return sorted(files)


def _posts_files(archive_uri: str) -> list[str]:
    posts_dir = storage.join(archive_uri, "posts")
    if not storage.is_dir(posts_dir):
        return []
    return [
        uri for uri in storage.list_files(posts_dir)
        if uri.endswith((".jsonl", ".parquet"))
    ]


def _peek_json_layout(uri: str) -> str:
    with storage.open_input(uri) as stream:
        head = stream.read(_PEEK_BYTES).decode("utf-8", errors="replace")
    match = _FIRST_VALUE.match(head)
    if not match:
        raise ReadError(
            f"{uri}: not an InstaPIC ({{user: {{post: ...}}}}) or YFCC ({{user: [...]}}) JSON"
        )
    if match.group(2):  # an empty object: no posts, either layout reads it the same
        return "instapic"
    return "instapic" if match.group(1) == "{" else "yfcc"


def detect_layout(archive_uri: str) -> str:
    """``jsonl``, ``parquet``, ``instapic`` or ``yfcc``; :class:`ReadError` if none fits.

    ``archive_uri`` is the archive root, or a single posts file.
    """
    if not storage.is_dir(archive_uri):
        if not storage.exists(archive_uri):
            raise ReadError(f"no archive at {archive_uri}")
        if archive_uri.endswith(".jsonl"):
            return "jsonl"
        if archive_uri.endswith(".parquet"):
            return "parquet"
        if archive_uri.endswith(".json"):
            return _peek_json_layout(archive_uri)
        raise ReadError(f"{archive_uri}: not a .jsonl, .parquet or .json file")
    posts = _posts_files(archive_uri)
    if any(uri.endswith(".jsonl") for uri in posts):
        return "jsonl"
    if posts:
        return "parquet"
    problems = []
    for uri in _json_files(archive_uri):
        try:
            return _peek_json_layout(uri)
        except ReadError as err:  # one broken file: the others may still tell
            problems.append(str(err))
    if problems:
        raise ReadError("; ".join(problems))
    raise ReadError(
        f"{archive_uri}: no posts/*.jsonl, posts/*.parquet, *.json or json/*.json to read"
    )


def list_sources(archive_uri: str) -> list[str]:
    """The files to parse, sorted (one task each). JSONL and Parquet may be mixed in posts/."""
    layout = detect_layout(archive_uri)
    if not storage.is_dir(archive_uri):
        return [archive_uri]
    if layout in ("jsonl", "parquet"):
        return _posts_files(archive_uri)
    return _json_files(archive_uri)


# --------------------------------------------------------------------------------------------
# Field checks shared by every layout


class _Reject(Exception):
    """One record does not fit: ``code: detail``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


def parse_timestamp(value: Any) -> datetime | None:
    """ISO-8601 text (``Z`` or an offset; naive means UTC) or epoch seconds/milliseconds."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _Reject("wrong_type", "created_at must be a timestamp string or number")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)):
        seconds = float(value)
        # Epoch milliseconds (what JavaScript and many exports write) are > 1e11.
        if abs(seconds) > 1e11:
            seconds /= 1000.0
        try:
            return datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError) as err:
            raise _Reject("bad_timestamp", f"created_at {value!r} out of range") from err
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return parse_timestamp(float(text))
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as err:
            raise _Reject("bad_timestamp", f"created_at {value!r} is not ISO-8601") from err
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise _Reject("wrong_type", "created_at must be a timestamp string or number")


def _identifier(record: dict[str, Any], name: str) -> str:
    if name not in record or record[name] is None:
        raise _Reject("missing_field", name)
    value = record[name]
    # Numeric ids are common in exports (JSON numbers); they name the same thing.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"{name} must be a string")
    value = value.strip()
    if not value:
        raise _Reject("missing_field", f"{name} is empty")
    return value


def resolve_image(image: str, base_uri: str) -> str:
    """An absolute URI (s3://...) or absolute local path for an image named in a record."""
    if _SCHEME.match(image):
        if image.startswith("file://"):
            return os.path.normpath(image[len("file://"):])
        return image
    if storage.is_s3(base_uri):
        bucket_and_key = base_uri.split("://", 1)[1].rstrip("/")
        joined = posixpath.normpath(posixpath.join(bucket_and_key, image.lstrip("/")))
        return f"{base_uri.split('://', 1)[0]}://{joined}"
    if os.path.isabs(image):
        return os.path.normpath(image)
    _, base_path = storage.resolve(base_uri)
    return os.path.normpath(os.path.join(base_path, image))


def _archive_root(archive_uri: str) -> str:
    """Relative image paths are relative to the archive root, also when given one file."""
    if storage.is_dir(archive_uri):
        return archive_uri
    parent = posixpath.dirname(archive_uri.rstrip("/")) if storage.is_s3(archive_uri) \
        else os.path.dirname(os.path.abspath(archive_uri))
    if posixpath.basename(parent.rstrip("/")) == "posts":
        parent = posixpath.dirname(parent.rstrip("/")) if storage.is_s3(parent) \
            else os.path.dirname(parent)
    return parent


def normalize_record(record: Any, archive_uri: str) -> dict[str, Any]:
    """A raw-schema post from one JSONL/Parquet record; raises :class:`_Reject` if it can't."""
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise _Reject("not_an_object", f"a record must be a JSON object, got {kind}")
    user_id = _identifier(record, "user_id")
    post_id = _identifier(record, "post_id")
    created_at = parse_timestamp(record.get("created_at"))
    if "image" not in record or record["image"] is None:
        raise _Reject("missing_field", "image")
    image = record["image"]
    if not isinstance(image, str):
        raise _Reject("wrong_type", "image must be a string (a URI or a path)")
    if not image.strip():
        raise _Reject("missing_field", "image is empty")
    if "caption" not in record or record["caption"] is None:
        raise _Reject("missing_field", "caption")
    caption = record["caption"]
    if not isinstance(caption, str):
        raise _Reject("wrong_type", "caption must be a string")
    if "hashtags" not in record or record["hashtags"] is None:
        raise _Reject("missing_field", "hashtags")
    hashtags = record["hashtags"]
    if not isinstance(hashtags, (list, tuple)):
        raise _Reject("wrong_type", "hashtags must be a list of strings")
    if not all(isinstance(tag, str) for tag in hashtags):
        raise _Reject("wrong_type", "hashtags must be a list of strings")
    post = {
        "user_id": user_id,
        "post_id": post_id,
        "created_at": created_at,
        "image": resolve_image(image.strip(), archive_uri),
        "caption": caption,
        "hashtags": [tag.strip() for tag in hashtags if tag.strip()],
    }
    problem = record_problem(post, "raw_post")
    if problem:  # a guard: the checks above should have caught it
        raise _Reject("wrong_type", problem)
    return post


class _Batcher:
    """Collects posts and rejects and hands them out ``batch_size`` records at a time."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = max(1, batch_size)
        self.posts: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []

    def post(self, post: dict[str, Any]) -> None:
        self.posts.append(post)

    def reject(
        self, reason: str, record_id: str | None, source: str, payload: Any
    ) -> None:
        self.rejects.append(reject_row(STAGE, reason, record_id, source, payload))

    def full(self) -> bool:
        return len(self.posts) + len(self.rejects) >= self.batch_size

    def take(self) -> Batch:
        batch = (self.posts, self.rejects)
        self.posts, self.rejects = [], []
        return batch

    def drain(self) -> Iterator[Batch]:
        if self.posts or self.rejects:
            yield self.take()


# --------------------------------------------------------------------------------------------
# JSONL and Parquet


def _iter_lines(uri: str, chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline), streaming."""
    number = 0
    rest = b""
    with storage.open_input(uri) as stream:
        while True:
            chunk = stream.read(chunk_size)
            if not chunk:
                break
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number += 1
                yield number, line
    if rest:
        yield number + 1, rest


def _parse_jsonl(source_uri: str, root: str, batch_size: int) -> Iterator[Batch]:
    batcher = _Batcher(batch_size)
    for number, raw in _iter_lines(source_uri):
        where = f"{source_uri}:{number}"
        if not raw.strip():
            continue  # a blank line holds no record
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            readable = raw.decode("utf-8", errors="replace")
            found = _POST_ID_IN_TEXT.search(readable)
            batcher.reject(f"bad_encoding: {err.reason} at byte {err.start}",
                           found.group(1) if found else None, where, readable)
        else:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                found = _POST_ID_IN_TEXT.search(text)
                batcher.reject(f"bad_json: {err.msg} at column {err.colno}",
                               found.group(1) if found else None, where, text)
            else:
                _normalize_into(batcher, record, root, where)
        if batcher.full():
            yield batcher.take()
    yield from batcher.drain()


def _record_id(record: Any) -> str | None:
    if isinstance(record, dict):
        value = record.get("post_id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


def _normalize_into(batcher: _Batcher, record: Any, root: str, where: str) -> None:
    try:
        batcher.post(normalize_record(record, root))
    except _Reject as rejected:
        batcher.reject(rejected.reason, _record_id(record), where, record)


def _parse_parquet(source_uri: str, root: str, batch_size: int) -> Iterator[Batch]:
    batcher = _Batcher(batch_size)
    fs, path = storage.resolve(source_uri)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
        batches: Iterable = parquet.iter_batches(batch_size=max(1, batch_size))
        row = 0
        for record_batch in batches:
            for record in record_batch.to_pylist():
                row += 1
                _normalize_into(batcher, record, root, f"{source_uri}:{row}")
                if batcher.full():
                    yield batcher.take()
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError), OSError
        batcher.reject(f"bad_file: {err}", None, source_uri, None)
    yield from batcher.drain()


# --------------------------------------------------------------------------------------------
# The authors' released layouts


def _load_json_file(source_uri: str, batcher: _Batcher) -> Any:
    try:
        return json.loads(storage.read_bytes(source_uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        batcher.reject(f"bad_json: {err}", None, source_uri, None)
    return None


def _image_index(source_uri: str, archive_uri: str) -> tuple[str | None, dict[str, str]]:
    """The images folder for a JSON source and {file name and name-without-extension: URI}."""
    if storage.is_s3(source_uri):
        json_dir = posixpath.dirname(source_uri)
        candidates = [posixpath.join(json_dir, "images"),
                      posixpath.join(posixpath.dirname(json_dir), "images")]
    else:
        json_dir = os.path.dirname(os.path.abspath(source_uri))
        candidates = [os.path.join(json_dir, "images"),
                      os.path.join(os.path.dirname(json_dir), "images")]
    candidates.append(storage.join(archive_uri, "images"))
    for folder in candidates:
        if storage.is_dir(folder):
            index: dict[str, str] = {}
            for uri in storage.list_files(folder, recursive=False):
                name = uri.rstrip("/").rsplit("/", 1)[-1] if storage.is_s3(uri) \
                    else os.path.basename(uri)
                index.setdefault(name, uri)
                stem, ext = os.path.splitext(name)
                # "{user}_@_{post}" has no extension, but ids may hold dots ("1.5"): only a
                # short alphabetic suffix is treated as one.
                if ext and ext[1:].isalpha() and len(ext) <= 5:
                    index.setdefault(stem, uri)
            return folder, index
    return None, {}


def _find_image(index: dict[str, str], names: list[str]) -> str | None:
    for name in names:
        if name in index:
            return index[name]
    return None


def _text(value: Any, name: str) -> str:
    """A text field of the authors' JSON: a string, or a list of strings joined by spaces."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    raise _Reject("wrong_type", f"{name} must be a string or a list of strings")


def _tags(value: Any, name: str, separator: str | None = None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        parts = value.split(separator) if separator else value.split()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        raise _Reject("wrong_type", f"{name} must be a string or a list of strings")
    return [p.strip() for p in parts if p.strip()]


def _missing_image(folder: str | None, names: list[str]) -> _Reject:
    where = folder or "an images/ folder next to the JSON"
    return _Reject("missing_image", f"no file named {names[0]} in {where}")


def _instapic_post(
    user_id: str, post_id: str, post: Any, index: dict[str, str], folder: str | None
) -> dict[str, Any]:
    if not isinstance(post, dict):
        raise _Reject("wrong_type", "a post must be an object with caption and/or tags")
    if "caption" not in post and "tags" not in post:
        raise _Reject("missing_field", "caption and tags (one of them is needed)")
    caption = _text(post.get("caption"), "caption")
    hashtags = _tags(post.get("tags"), "tags")
    names = [f"{user_id}_@_{post_id}", f"{user_id}_{post_id}", post_id]
    image = _find_image(index, names)
    if image is None:
        raise _missing_image(folder, names)
    return {
        "user_id": user_id,
        "post_id": post_id,
        "created_at": parse_timestamp(post.get("created_at")),
        "image": image,
        "caption": caption,
        "hashtags": hashtags,
    }


def _parse_instapic(source_uri: str, archive_uri: str, batch_size: int) -> Iterator[Batch]:
    batcher = _Batcher(batch_size)
    data = _load_json_file(source_uri, batcher)
    if data is not None and not isinstance(data, dict):
        batcher.reject("wrong_type: the file must hold {user_id: {post_id: post}}", None,
                       source_uri, None)
        data = None
    if data:
        folder, index = _image_index(source_uri, archive_uri)
        for user_id, posts in data.items():
            if not isinstance(posts, dict):
                batcher.reject(f"wrong_type: posts of user {user_id} must be an object",
                               None, f"{source_uri}:{user_id}", posts)
                continue
            for post_id, post in posts.items():
                where = f"{source_uri}:{user_id}/{post_id}"
                try:
                    batcher.post(_instapic_post(str(user_id), str(post_id), post, index, folder))
                except _Reject as rejected:
                    batcher.reject(rejected.reason, str(post_id), where, post)
                if batcher.full():
                    yield batcher.take()
    yield from batcher.drain()


def _flickr_text(value: Any, name: str) -> str:
    """YFCC100M text is URL-encoded ('+' for spaces) and may carry HTML."""
    text = _text(value, name)
    if "+" in text or "%" in text:
        text = unquote_plus(text)
    text = _HTML_TAG.sub(" ", text)
    return " ".join(html.unescape(text).split())


def _yfcc_post_id(page_url: Any) -> str:
    if page_url is None:
        raise _Reject("missing_field", "page url")
    if not isinstance(page_url, str):
        raise _Reject("wrong_type", "page url must be a string")
    segments = [s for s in page_url.split("?")[0].split("/") if s]
    if len(segments) < 2 or "." in segments[-1] and not segments[-1].isdigit():
        raise _Reject("bad_url", f"no photo id at the end of {page_url!r}")
    return segments[-1]


def _yfcc_post(
    user_id: str, post: Any, index: dict[str, str], folder: str | None
) -> dict[str, Any]:
    if not isinstance(post, dict):
        raise _Reject("wrong_type", "a post must be an object")
    if "page url" not in post:
        raise _Reject("missing_field", "page url")
    post_id = _yfcc_post_id(post["page url"])
    if not any(key in post for key in ("title", "description", "user tags")):
        raise _Reject("missing_field", "title, description and user tags (one is needed)")
    title = _flickr_text(post.get("title"), "title")
    description = _flickr_text(post.get("description"), "description")
    caption = " ".join(part for part in (title, description) if part)
    # Flickr tags are comma-separated and may hold spaces ("new york"): a hashtag cannot.
    hashtags = [
        "".join(unquote_plus(tag).split())
        for tag in _tags(post.get("user tags"), "user tags", separator=",")
    ]
    names = [f"{user_id}_{post_id}", f"{user_id}_@_{post_id}", post_id]
    image = _find_image(index, names)
    if image is None:
        raise _missing_image(folder, names)
    created = post.get("created_at", post.get("date taken", post.get("date uploaded")))
    return {
        "user_id": user_id,
        "post_id": post_id,
        "created_at": parse_timestamp(created),
        "image": image,
        "caption": caption,
        "hashtags": [tag for tag in hashtags if tag],
    }


def _parse_yfcc(source_uri: str, archive_uri: str, batch_size: int) -> Iterator[Batch]:
    batcher = _Batcher(batch_size)
    data = _load_json_file(source_uri, batcher)
    if data is not None and not isinstance(data, dict):
        batcher.reject("wrong_type: the file must hold {user_id: [post, ...]}", None,
                       source_uri, None)
        data = None
    if data:
        folder, index = _image_index(source_uri, archive_uri)
        for user_id, posts in data.items():
            if not isinstance(posts, list):
                batcher.reject(f"wrong_type: posts of user {user_id} must be a list",
                               None, f"{source_uri}:{user_id}", posts)
                continue
            for position, post in enumerate(posts):
                where = f"{source_uri}:{user_id}[{position}]"
                try:
                    batcher.post(_yfcc_post(str(user_id), post, index, folder))
                except _Reject as rejected:
                    record_id = None
                    if isinstance(post, dict):
                        try:
                            record_id = _yfcc_post_id(post.get("page url"))
                        except _Reject:
                            record_id = None
                    batcher.reject(rejected.reason, record_id, where, post)
                if batcher.full():
                    yield batcher.take()
    yield from batcher.drain()


# --------------------------------------------------------------------------------------------
# Entry points


def parse_source(
    source_uri: str, archive_uri: str, batch_size: int = 1000
) -> Iterator[Batch]:
    """Yield (raw posts, reject rows) of one source, ``batch_size`` records at a time.

    Posts carry ``image`` as an absolute URI/path; rejects have stage ``read``.
    """
    if source_uri.endswith(".jsonl"):
        root = _archive_root(archive_uri)
        yield from _guard(source_uri, _parse_jsonl(source_uri, root, batch_size))
    elif source_uri.endswith(".parquet"):
        root = _archive_root(archive_uri)
        yield from _guard(source_uri, _parse_parquet(source_uri, root, batch_size))
    elif source_uri.endswith(".json"):
        root = archive_uri if storage.is_dir(archive_uri) else _archive_root(archive_uri)
        try:
            layout = _peek_json_layout(source_uri)
        except ReadError as err:
            yield [], [reject_row(STAGE, f"bad_file: {err}", None, source_uri, None)]
            return
        if layout == "yfcc":
            yield from _guard(source_uri, _parse_yfcc(source_uri, root, batch_size))
        else:
            yield from _guard(source_uri, _parse_instapic(source_uri, root, batch_size))
    else:
        raise ReadError(f"{source_uri}: not a .jsonl, .parquet or .json source")


def _guard(source_uri: str, batches: Iterator[Batch]) -> Iterator[Batch]:
    """A source that cannot even be opened is one reject, not a dead job."""
    try:
        yield from batches
    except (FileNotFoundError, PermissionError) as err:
        yield [], [reject_row(STAGE, f"bad_file: {err}", None, source_uri, None)]


def read_archive(archive_uri: str, batch_size: int = 1000) -> Iterator[Batch]:
    """Every source of the archive in sequence (for plain loops and tests)."""
    for source_uri in list_sources(archive_uri):
        yield from parse_source(source_uri, archive_uri, batch_size)


def read_all(archive_uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All posts and all rejects of a (small) archive as two lists."""
    posts: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for batch_posts, batch_rejects in read_archive(archive_uri):
        posts.extend(batch_posts)
        rejects.extend(batch_rejects)
    return posts, rejects
