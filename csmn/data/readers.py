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

``jsonl`` and ``parquet`` files are also read from the archive's top level
(``<archive>/posts.jsonl``), beside or instead of ``posts/``.

A record that does not fit becomes a reject row (stage ``read``, reason ``code: detail``,
record id where it has one, ``source`` = file:line, the payload) and the read goes on: for
every source, records in (:func:`count_records`, counted from the file itself: lines,
Parquet row counts, JSON entries) = posts + rejects. Codes: ``bad_json``, ``bad_encoding``,
``not_an_object``, ``missing_field``, ``wrong_type``, ``bad_timestamp``, ``bad_url``,
``bad_text`` (a lone UTF-16 surrogate or a NUL character), ``too_long`` (see the ``MAX_*``
caps), ``duplicate_key`` (a JSON object naming one key twice: which value is meant cannot
be told, so neither is kept), ``bad_path`` (an image outside the archive and the allowed
image roots, :mod:`csmn.data.paths`), ``missing_image`` (InstaPIC/YFCC, where the image
folder is listed anyway), ``bad_file`` (a whole file that cannot be opened or parsed counts
as one record; a Parquet row group that cannot be read, one per row).

Sources are single files so that a pipeline can parse them in parallel (one Ray task each,
:func:`list_sources` + :func:`parse_source`); :func:`read_archive` runs them in sequence.
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.parquet as pq

from csmn.data import storage
from csmn.data.paths import PathRejected, resolve_image_path
from csmn.data.rejects import reject_row
from csmn.data.schemas import record_problem

STAGE = "read"
LAYOUTS = ("jsonl", "parquet", "instapic", "yfcc")
Batch = tuple[list[dict[str, Any]], list[dict[str, Any]]]

_POST_ID_IN_TEXT = re.compile(r'"post_id"\s*:\s*"([^"\\]{1,200})"')
# The first user's posts, when they tell the layout: an object, or a list that is not empty.
_FIRST_VALUE = re.compile(
    r'^\ufeff?\s*\{\s*(?:"(?:[^"\\]|\\.)*"\s*:\s*(\{|\[(?!\s*\]))|(\}))', re.S)
_HTML_TAG = re.compile(r"<[^>]{0,500}>")
_EPOCH_TEXT = re.compile(r"-?\d+(\.\d+)?")
_PEEK_BYTES = 1 << 16

# Caps on what one record may hold. Generous for real exports (an Instagram caption is at most
# 2,200 characters, 30 hashtags; Flickr allows 75 tags, descriptions of a few KB), they bound
# the work a single hostile record can cause downstream (tokenizing, vocabularies, reports).
MAX_ID_CHARS = 256
MAX_IMAGE_CHARS = 4096
MAX_CAPTION_CHARS = 65_536
MAX_HASHTAG_CHARS = 256
MAX_HASHTAGS = 1000
# A reason quotes at most this much of the value it refuses.
_DETAIL_CHARS = 300


class ReadError(ValueError):
    """The archive itself cannot be read (no known layout): not one bad record."""


# --------------------------------------------------------------------------------------------
# Layout and sources


_POSTS_SUFFIXES = (".jsonl", ".parquet")
_UTF8_BOM = b"\xef\xbb\xbf"


def _archive_files(uri: str, suffix: str | tuple[str, ...] | None = None,
                   recursive: bool = True) -> list[str]:
    """An archive's files: hidden ones (``.``) left out, ``_`` kept (a user name may start
    with it); a name that is not UTF-8 is a :class:`ReadError` that names it."""
    try:
        return storage.list_files(uri, suffix=suffix, recursive=recursive,
                                  skip_prefixes=(".",))
    except storage.UndecodableName as err:
        raise ReadError(str(err)) from err


def _json_files(archive_uri: str) -> list[str]:
    files = _archive_files(archive_uri, suffix=".json", recursive=False)
    json_dir = storage.join(archive_uri, "json")
    if storage.is_dir(json_dir):
        files += _archive_files(json_dir, suffix=".json", recursive=False)
    return sorted(files)


def _posts_files(archive_uri: str) -> list[str]:
    """posts/**.jsonl|parquet, and the same at the archive's top level (an export that holds
    one ``posts.jsonl`` beside its images is an archive too)."""
    files = _archive_files(archive_uri, suffix=_POSTS_SUFFIXES, recursive=False)
    posts_dir = storage.join(archive_uri, "posts")
    if storage.is_dir(posts_dir):
        files += _archive_files(posts_dir, suffix=_POSTS_SUFFIXES)
    return sorted(files)


def _json_layout_of(data: dict[str, Any]) -> str:
    """``instapic`` or ``yfcc``, told by the first user entry that holds posts: an object of
    posts is InstaPIC's, a list that is not empty YFCC's. Entries before it (null, a string,
    an empty list) are bad entries of either layout; a file with none that tells is read as
    InstaPIC, where each entry is one reject. Parsing and counting both decide by this."""
    for _, posts in _pairs(data):
        if isinstance(posts, dict):
            return "instapic"
        if isinstance(posts, list) and posts:
            return "yfcc"
    return "instapic"


def _peek_json_layout(uri: str) -> str:
    """The layout of a JSON source from its first bytes, or from the whole file where they
    do not tell (the first user's entry is not an object or a list of posts)."""
    with storage.open_input(uri) as stream:
        head = stream.read(_PEEK_BYTES).decode("utf-8", errors="replace")
    match = _FIRST_VALUE.match(head)
    if match:
        return "yfcc" if match.group(1) == "[" else "instapic"
    try:
        data = _loads(storage.read_bytes(uri))
    except _JSON_ERRORS as err:
        raise ReadError(f"{uri}: not JSON ({_json_error(err)})") from err
    if not isinstance(data, dict):
        raise ReadError(
            f"{uri}: not an InstaPIC ({{user: {{post: ...}}}}) or YFCC ({{user: [...]}}) JSON")
    return _json_layout_of(data)


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
        if _links_out(uri, archive_uri):
            continue
        try:
            return _peek_json_layout(uri)
        except ReadError as err:  # one broken file: the others may still tell
            problems.append(str(err))
    if problems:
        raise ReadError("; ".join(problems))
    raise ReadError(
        f"{archive_uri}: no *.jsonl, *.parquet, posts/*.jsonl, posts/*.parquet, *.json or "
        "json/*.json to read"
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
        if len(detail) > _DETAIL_CHARS:
            detail = detail[:_DETAIL_CHARS] + "…"
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


def _printable(text: str) -> str:
    """``text`` as UTF-8 can store it: a lone surrogate becomes its ``\\udxxx`` escape (Arrow
    refuses to write one, and a reject row must always be writable)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_text(value: str, name: str, limit: int) -> str:
    """The one text check of every string a record carries: at most ``limit`` characters
    (``too_long``), no NUL and no lone UTF-16 surrogate (``bad_text``; JSON can spell one,
    ``"\\ud800"``, but no UTF-8 store can hold it)."""
    if len(value) > limit:
        raise _Reject("too_long", f"{name} has {len(value)} characters, at most {limit}")
    if "\x00" in value:
        raise _Reject("bad_text", f"{name} holds a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _Reject("bad_text", f"{name} holds a lone surrogate at character "
                                      f"{err.start}") from err
    return value


def clean_hashtags(tags: list[str], name: str = "hashtags") -> list[str]:
    if len(tags) > MAX_HASHTAGS:
        raise _Reject("too_long", f"{name} has {len(tags)} tags, at most {MAX_HASHTAGS}")
    # Most lists pass every check of clean_text at once (short ASCII without NUL, so no
    # surrogate either); any other goes tag by tag, which words the first problem.
    joined = "".join(tags)
    if (joined.isascii() and "\x00" not in joined
            and (not tags or max(map(len, tags)) <= MAX_HASHTAG_CHARS)):
        return list(tags)
    return [clean_text(tag, f"a tag of {name}", MAX_HASHTAG_CHARS) for tag in tags]


def parse_timestamp(value: Any) -> datetime | None:
    """ISO-8601 text (``Z`` or an offset; naive means UTC) or epoch seconds/milliseconds."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _Reject("wrong_type", "created_at must be a timestamp string or number")
    if isinstance(value, datetime):
        return _in_utc(value if value.tzinfo else value.replace(tzinfo=UTC), value)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
            # Epoch milliseconds (what JavaScript and many exports write) are > 1e11.
            if abs(seconds) > 1e11:
                seconds /= 1000.0
            return datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError) as err:
            raise _Reject("bad_timestamp", f"created_at {value!r} out of range") from err
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 64:  # ISO-8601 with microseconds and an offset is 32 characters
            raise _Reject("bad_timestamp", f"created_at has {len(text)} characters")
        if _EPOCH_TEXT.fullmatch(text):
            return parse_timestamp(float(text))
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as err:
            raise _Reject("bad_timestamp", f"created_at {value!r} is not ISO-8601") from err
        return _in_utc(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC), value)
    raise _Reject("wrong_type", "created_at must be a timestamp string or number")


def _in_utc(stamp: datetime, value: Any) -> datetime:
    # "0001-01-01T00:00:00+05:00" parses, but its UTC instant is before year 1: datetime
    # cannot hold it, and Arrow's conversion to UTC would raise far from this record.
    try:
        return stamp.astimezone(UTC)
    except (OverflowError, ValueError) as err:
        raise _Reject("bad_timestamp", f"created_at {value!r} leaves the datetime range in "
                                       "UTC") from err


def _identifier(record: dict[str, Any], name: str) -> str:
    if name not in record or record[name] is None:
        raise _Reject("missing_field", name)
    value = record[name]
    # Numeric ids are common in exports (JSON numbers); they name the same thing.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"{name} must be a string")
    value = clean_text(value.strip(), name, MAX_ID_CHARS)
    if not value:
        raise _Reject("missing_field", f"{name} is empty")
    return value


def resolve_image(image: str, root: str, image_roots: tuple[str, ...] = ()) -> str:
    """The path or URI to read for an image a record names (:mod:`csmn.data.paths`)."""
    clean_text(image, "image", MAX_IMAGE_CHARS)
    try:
        return resolve_image_path(root, image, image_roots)
    except PathRejected as err:
        raise _Reject(err.code, err.detail) from err


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


def normalize_record(
    record: Any, archive_uri: str, image_roots: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A raw-schema post from one JSONL/Parquet record; raises :class:`_Reject` if it can't."""
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise _Reject("not_an_object", f"a record must be a JSON object, got {kind}")
    duplicate = _duplicate_key(record)
    if duplicate:
        raise _Reject("duplicate_key", duplicate)
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
    hashtags = clean_hashtags([tag.strip() for tag in hashtags])
    post = {
        "user_id": user_id,
        "post_id": post_id,
        "created_at": created_at,
        "image": resolve_image(image.strip(), archive_uri, image_roots),
        "caption": clean_text(caption, "caption", MAX_CAPTION_CHARS),
        "hashtags": [tag for tag in hashtags if tag],
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
        if payload is not None and not isinstance(payload, str):
            payload = json.dumps(payload, default=str, ensure_ascii=False)
        self.rejects.append(reject_row(
            STAGE, _printable(reason),
            None if record_id is None else _printable(str(record_id)[:MAX_ID_CHARS]),
            _printable(source), None if payload is None else _printable(payload)))

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
    """(1-based line number, line bytes without the newline), streaming; a UTF-8 byte-order
    mark at the start of the file (as Windows tools write one) is not part of line 1."""
    number = 0
    rest = b""
    with storage.open_input(uri) as stream:
        first = True
        while True:
            chunk = stream.read(chunk_size)
            if not chunk:
                break
            if first:
                chunk, first = chunk.removeprefix(_UTF8_BOM), False
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number += 1
                yield number, line
    if rest:
        yield number + 1, rest


class _Duplicated(dict):
    """A JSON object that named a key more than once: the last value (as ``json`` keeps it)
    plus every (key, value) pair and the keys seen twice."""

    def __init__(self, pairs: list[tuple[str, Any]], duplicates: list[str]) -> None:
        super().__init__(pairs)
        self.pairs = pairs
        self.duplicates = duplicates


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    twice = []
    for key, _ in pairs:
        if key in seen and key not in twice:
            twice.append(key)
        seen.add(key)
    return _Duplicated(pairs, twice)


def _loads(data: str | bytes) -> Any:
    """``json.loads`` that keeps what duplicate keys would silently overwrite."""
    return json.loads(data, object_pairs_hook=_object_pairs)


# What json.loads raises on bad input: JSONDecodeError for syntax, UnicodeDecodeError for
# bytes that are not UTF-8, RecursionError for deep nesting, and a plain ValueError for an
# integer of more digits than Python converts (4,300 by default).
_JSON_ERRORS = (ValueError, RecursionError)


def _json_error(err: BaseException) -> str:
    if isinstance(err, json.JSONDecodeError):
        where = f"line {err.lineno} column {err.colno}" if err.lineno > 1 else \
            f"column {err.colno}"
        return f"{err.msg} at {where}"
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err)


def _pairs(obj: dict[str, Any]) -> list[tuple[str, Any]]:
    return obj.pairs if isinstance(obj, _Duplicated) else list(obj.items())


def _duplicate_key(value: Any, path: str = "") -> str | None:
    """``key "x" appears twice in ...`` for the first duplicate key anywhere in ``value``."""
    if isinstance(value, dict):
        if isinstance(value, _Duplicated):
            key = _printable(value.duplicates[0][:_DETAIL_CHARS])
            return f"key {key!r} appears more than once in {path or 'the record'}"
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                found = _duplicate_key(item, f"{path}.{key}" if path else key)
                if found:
                    return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (dict, list)):
                found = _duplicate_key(item, f"{path}[{i}]")
                if found:
                    return found
    return None


def _parse_jsonl(
    source_uri: str, root: str, batch_size: int, image_roots: tuple[str, ...] = ()
) -> Iterator[Batch]:
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
                record = _loads(text)
            except _JSON_ERRORS as err:
                found = _POST_ID_IN_TEXT.search(text)
                batcher.reject(f"bad_json: {_json_error(err)}",
                               found.group(1) if found else None, where, text)
            else:
                _normalize_into(batcher, record, root, where, image_roots)
        if batcher.full():
            yield batcher.take()
    yield from batcher.drain()


def _record_id(record: Any) -> str | None:
    if isinstance(record, dict):
        value = record.get("post_id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


def _normalize_into(batcher: _Batcher, record: Any, root: str, where: str,
                    image_roots: tuple[str, ...] = ()) -> None:
    try:
        batcher.post(normalize_record(record, root, image_roots))
    except _Reject as rejected:
        batcher.reject(rejected.reason, _record_id(record), where, record)


class _BadRow:
    """A Parquet row with cells Python cannot hold (invalid UTF-8, a timestamp past year
    9999): what could be read, and why the rest could not."""

    def __init__(self, values: dict[str, Any], reason: str) -> None:
        self.values = values
        self.reason = reason


def _lossy(cell: pa.Scalar) -> Any:
    if isinstance(cell, (pa.StringScalar, pa.LargeStringScalar)) and cell.is_valid:
        return cell.as_buffer().to_pybytes().decode("utf-8", errors="replace")
    return f"<unreadable {cell.type}>"


def _rows(record_batch: pa.RecordBatch) -> Iterator[dict[str, Any] | _BadRow]:
    """The batch's rows as dicts; one bad cell spoils its row only. Arrow does not check
    UTF-8 when it reads Parquet, so a bad byte only shows when a cell becomes a ``str``:
    the fast whole-batch conversion is tried first, cell by cell only when it fails."""
    try:
        yield from record_batch.to_pylist()
        return
    except (UnicodeDecodeError, OverflowError, ValueError):
        pass
    names = record_batch.schema.names
    for i in range(record_batch.num_rows):
        values: dict[str, Any] = {}
        problems = []
        for name, column in zip(names, record_batch.columns, strict=True):
            try:
                values[name] = column[i].as_py()
            except UnicodeDecodeError as err:
                values[name] = _lossy(column[i])
                problems.append(f"bad_encoding: {name} is not UTF-8 ({err.reason} at byte "
                                f"{err.start})")
            except (OverflowError, ValueError) as err:
                values[name] = _lossy(column[i])
                code = "bad_timestamp" if name == "created_at" else "wrong_type"
                problems.append(f"{code}: {name} cannot be read ({err})")
        yield _BadRow(values, problems[0]) if problems else values


def _parse_parquet(
    source_uri: str, root: str, batch_size: int, image_roots: tuple[str, ...] = ()
) -> Iterator[Batch]:
    batcher = _Batcher(batch_size)
    fs, path = storage.resolve(source_uri)
    try:
        stream = fs.open_input_file(path)
        parquet = pq.ParquetFile(stream)
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError), OSError
        _raise_if_transient(source_uri, err)
        batcher.reject(f"bad_file: {err}", None, source_uri, None)
        yield from batcher.drain()
        return
    row = 0
    with stream:
        for group in range(parquet.num_row_groups):
            expected = parquet.metadata.row_group(group).num_rows
            done = 0
            unread = ""
            try:
                for record_batch in parquet.iter_batches(batch_size=max(1, batch_size),
                                                         row_groups=[group]):
                    for record in _rows(record_batch):
                        row += 1
                        done += 1
                        where = f"{source_uri}:{row}"
                        if isinstance(record, _BadRow):
                            batcher.reject(record.reason, _record_id(record.values), where,
                                           record.values)
                        else:
                            _normalize_into(batcher, record, root, where, image_roots)
                        if batcher.full():
                            yield batcher.take()
            except (OSError, ValueError) as err:
                _raise_if_transient(source_uri, err)
                unread = f"unreadable after {done} rows: {err}"
            # A corrupt page loses the rest of its row group, not the file: each row the
            # footer promised (and count_records counted) that the pages did not deliver is a
            # reject of its own, whether the reader raised or just ended short.
            for _ in range(expected - done):
                row += 1
                why = unread or f"ended after {done} of the {expected} rows its footer promises"
                batcher.reject(f"bad_file: row group {group} {why}", None, f"{source_uri}:{row}",
                               None)
                if batcher.full():
                    yield batcher.take()
    yield from batcher.drain()


# --------------------------------------------------------------------------------------------
# The authors' released layouts


_UNREADABLE = object()


def _load_json_file(source_uri: str, batcher: _Batcher) -> Any:
    """The file's JSON value, or ``_UNREADABLE`` (after its reject) when it has none."""
    try:
        return _loads(storage.read_bytes(source_uri))
    except _JSON_ERRORS as err:
        batcher.reject(f"bad_json: {_json_error(err)}", None, source_uri, None)
    return _UNREADABLE


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
        # The folder above the JSON's is the archive's own only when the JSON sits in a
        # subfolder; above an archive's top-level JSON it is outside what the job was given.
        if _inside(folder, archive_uri) and storage.is_dir(folder):
            index: dict[str, str] = {}
            # A stray file whose name is not UTF-8 cannot be what a record names: skipped.
            for uri in storage.list_files(folder, recursive=False, skip_prefixes=(".",),
                                          undecodable="skip"):
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


def _inside(folder: str, root: str) -> bool:
    """``folder`` lies below ``root`` (the source and the root are both local or both S3)."""
    if storage.is_s3(root):
        return folder.startswith(root.rstrip("/") + "/")
    # Real paths: an images/ folder that is a link to outside the archive is not its own.
    real_root = os.path.realpath(_local_path(root))
    return os.path.realpath(_local_path(folder)).startswith(real_root.rstrip(os.sep) + os.sep)


def _find_image(index: dict[str, str], names: list[str]) -> str | None:
    for name in names:
        if name in index:
            return index[name]
    return None


def _text(value: Any, name: str) -> str:
    """A text field of the authors' JSON: a string, or a list of strings joined by spaces."""
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) > MAX_CAPTION_CHARS:
            raise _Reject("too_long", f"{name} has {len(value)} parts")
        value = " ".join(value)
    if isinstance(value, str):
        return clean_text(value, name, MAX_CAPTION_CHARS)
    raise _Reject("wrong_type", f"{name} must be a string or a list of strings")


def _tags(value: Any, name: str, separator: str | None = None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        clean_text(value, name, MAX_HASHTAGS * MAX_HASHTAG_CHARS)
        parts = value.split(separator) if separator else value.split()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        raise _Reject("wrong_type", f"{name} must be a string or a list of strings")
    return clean_hashtags([p.strip() for p in parts if p.strip()], name)


def _missing_image(folder: str | None, names: list[str]) -> _Reject:
    where = folder or "an images/ folder next to the JSON"
    return _Reject("missing_image", f"no file named {names[0]} in {where}")


def _indexed_image(index: dict[str, str], names: list[str], folder: str | None) -> str:
    image = _find_image(index, names)
    if image is None or folder is None:
        raise _missing_image(folder, names)
    # The reader picked the file, not the record; the rule still applies, so that a link
    # planted in the images folder cannot reach out of it.
    return resolve_image(image, folder)


def _key_id(key: str, name: str) -> str:
    """A user or post id that is a JSON object key (never null, always a string)."""
    value = clean_text(key, name, MAX_ID_CHARS)
    if not value.strip():
        raise _Reject("missing_field", f"{name} is empty")
    return value


def _instapic_post(
    user_id: str, post_id: str, post: Any, index: dict[str, str], folder: str | None
) -> dict[str, Any]:
    if not isinstance(post, dict):
        raise _Reject("wrong_type", "a post must be an object with caption and/or tags")
    duplicate = _duplicate_key(post)
    if duplicate:
        raise _Reject("duplicate_key", duplicate)
    if "caption" not in post and "tags" not in post:
        raise _Reject("missing_field", "caption and tags (one of them is needed)")
    user_id = _key_id(user_id, "user_id")
    post_id = _key_id(post_id, "post_id")
    caption = _text(post.get("caption"), "caption")
    hashtags = _tags(post.get("tags"), "tags")
    names = [f"{user_id}_@_{post_id}", f"{user_id}_{post_id}", post_id]
    image = _indexed_image(index, names, folder)
    return {
        "user_id": user_id,
        "post_id": post_id,
        "created_at": parse_timestamp(post.get("created_at")),
        "image": image,
        "caption": caption,
        "hashtags": hashtags,
    }


def _user_entries(data: dict[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    """(user id, its posts, whether the file names this user more than once)."""
    twice = set(data.duplicates) if isinstance(data, _Duplicated) else set()
    for user_id, posts in _pairs(data):
        yield str(user_id), posts, user_id in twice


def _duplicate_user(user_id: str) -> _Reject:
    # Two objects for one user may disagree on any post: neither is taken over the other.
    return _Reject("duplicate_key", f"user {_printable(user_id[:_DETAIL_CHARS])!r} appears "
                                    "more than once in the file")


def _parse_json(source_uri: str, archive_uri: str, batch_size: int) -> Iterator[Batch]:
    """An InstaPIC or YFCC JSON source, parsed once; its layout told by its entries."""
    batcher = _Batcher(batch_size)
    data = _load_json_file(source_uri, batcher)
    if isinstance(data, dict) and _json_layout_of(data) == "yfcc":
        yield from _parse_yfcc(source_uri, archive_uri, data, batcher)
    else:
        yield from _parse_instapic(source_uri, archive_uri, data, batcher)


def _parse_instapic(source_uri: str, archive_uri: str, data: Any,
                    batcher: _Batcher) -> Iterator[Batch]:
    if data is not _UNREADABLE and not isinstance(data, dict):
        batcher.reject("wrong_type: the file must hold {user_id: {post_id: post}} (InstaPIC) "
                       "or {user_id: [post, ...]} (YFCC)", None, source_uri, None)
    if isinstance(data, dict) and data:
        folder, index = _image_index(source_uri, archive_uri)
        for user_id, posts, user_twice in _user_entries(data):
            if not isinstance(posts, dict):
                reason = _duplicate_user(user_id).reason if user_twice else \
                    f"wrong_type: posts of user {user_id} must be an object"
                batcher.reject(reason, None, f"{source_uri}:{user_id}", posts)
                continue
            posts_twice = set(posts.duplicates) if isinstance(posts, _Duplicated) else set()
            for post_id, post in _pairs(posts):
                where = f"{source_uri}:{user_id}/{post_id}"
                try:
                    if user_twice:
                        raise _duplicate_user(user_id)
                    if post_id in posts_twice:
                        raise _Reject("duplicate_key", f"post {post_id!r} appears more than "
                                                       f"once under user {user_id!r}")
                    batcher.post(_instapic_post(user_id, str(post_id), post, index, folder))
                except _Reject as rejected:
                    batcher.reject(rejected.reason, str(post_id), where, post)
                if batcher.full():
                    yield batcher.take()
    yield from batcher.drain()


def _flickr_text(value: Any, name: str) -> str:
    """YFCC100M text is URL-encoded ('+' for spaces) and may carry HTML."""
    text = _text(value, name)
    if "+" in text or "%" in text:
        text = clean_text(unquote_plus(text), name, MAX_CAPTION_CHARS)
    text = _HTML_TAG.sub(" ", text)
    return " ".join(html.unescape(text).split())


def _yfcc_post_id(page_url: Any) -> str:
    if page_url is None:
        raise _Reject("missing_field", "page url")
    if not isinstance(page_url, str):
        raise _Reject("wrong_type", "page url must be a string")
    clean_text(page_url, "page url", MAX_IMAGE_CHARS)
    segments = [s for s in page_url.split("?")[0].split("/") if s]
    if len(segments) < 2 or "." in segments[-1] and not segments[-1].isdigit():
        raise _Reject("bad_url", f"no photo id at the end of {page_url!r}")
    return _key_id(segments[-1], "post_id")


def _yfcc_post(
    user_id: str, post: Any, index: dict[str, str], folder: str | None
) -> dict[str, Any]:
    if not isinstance(post, dict):
        raise _Reject("wrong_type", "a post must be an object")
    duplicate = _duplicate_key(post)
    if duplicate:
        raise _Reject("duplicate_key", duplicate)
    if "page url" not in post:
        raise _Reject("missing_field", "page url")
    user_id = _key_id(user_id, "user_id")
    post_id = _yfcc_post_id(post["page url"])
    if not any(key in post for key in ("title", "description", "user tags")):
        raise _Reject("missing_field", "title, description and user tags (one is needed)")
    title = _flickr_text(post.get("title"), "title")
    description = _flickr_text(post.get("description"), "description")
    caption = clean_text(" ".join(part for part in (title, description) if part), "caption",
                         MAX_CAPTION_CHARS)
    # Flickr tags are comma-separated and may hold spaces ("new york"): a hashtag cannot.
    hashtags = clean_hashtags([
        "".join(unquote_plus(tag).split())
        for tag in _tags(post.get("user tags"), "user tags", separator=",")
    ], "user tags")
    names = [f"{user_id}_{post_id}", f"{user_id}_@_{post_id}", post_id]
    image = _indexed_image(index, names, folder)
    created = post.get("created_at", post.get("date taken", post.get("date uploaded")))
    return {
        "user_id": user_id,
        "post_id": post_id,
        "created_at": parse_timestamp(created),
        "image": image,
        "caption": caption,
        "hashtags": [tag for tag in hashtags if tag],
    }


def _parse_yfcc(source_uri: str, archive_uri: str, data: dict[str, Any],
                batcher: _Batcher) -> Iterator[Batch]:
    """A YFCC file: ``data`` is an object (a file that is not is read as InstaPIC's)."""
    if data:
        folder, index = _image_index(source_uri, archive_uri)
        for user_id, posts, user_twice in _user_entries(data):
            if not isinstance(posts, list):
                reason = _duplicate_user(user_id).reason if user_twice else \
                    f"wrong_type: posts of user {user_id} must be a list"
                batcher.reject(reason, None, f"{source_uri}:{user_id}", posts)
                continue
            for position, post in enumerate(posts):
                where = f"{source_uri}:{user_id}[{position}]"
                try:
                    if user_twice:
                        raise _duplicate_user(user_id)
                    batcher.post(_yfcc_post(user_id, post, index, folder))
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
    source_uri: str, archive_uri: str, batch_size: int = 1000,
    image_roots: tuple[str, ...] = (),
) -> Iterator[Batch]:
    """Yield (raw posts, reject rows) of one source, ``batch_size`` records at a time.

    Posts carry ``image`` as an absolute URI/path, inside the archive root or under one of
    ``image_roots`` (:func:`csmn.data.paths.resolve_image_path`); rejects have stage ``read``.
    """
    image_roots = tuple(image_roots)
    outside = _links_out(source_uri, archive_uri)
    if outside:
        yield [], [reject_row(STAGE, outside, None, source_uri, None)]
        return
    if source_uri.endswith(".jsonl"):
        root = _archive_root(archive_uri)
        yield from _guard(source_uri,
                          _parse_jsonl(source_uri, root, batch_size, image_roots))
    elif source_uri.endswith(".parquet"):
        root = _archive_root(archive_uri)
        yield from _guard(source_uri,
                          _parse_parquet(source_uri, root, batch_size, image_roots))
    elif source_uri.endswith(".json"):
        root = archive_uri if storage.is_dir(archive_uri) else _archive_root(archive_uri)
        yield from _guard(source_uri, _parse_json(source_uri, root, batch_size))
    else:
        raise ReadError(f"{source_uri}: not a .jsonl, .parquet or .json source")


def _guard(source_uri: str, batches: Iterator[Batch]) -> Iterator[Batch]:
    """A source that cannot even be opened is one reject, not a dead job; one the store
    could not serve for a while raises, for the task to be retried (never a reject: the
    file may be fine)."""
    try:
        yield from batches
    except (FileNotFoundError, PermissionError) as err:
        yield [], [reject_row(STAGE, f"bad_file: {err}", None, source_uri, None)]
    except OSError as err:
        _raise_if_transient(source_uri, err)
        raise


def _raise_if_transient(source_uri: str, err: BaseException) -> None:
    if storage.is_transient(err):
        raise storage.TransientStorageError(
            getattr(err, "errno", None), f"{source_uri}: {err}") from err


def _links_out(source_uri: str, archive_uri: str) -> str | None:
    """The reject reason of a local source in an archive folder that is, or lies in a folder
    that is, a link to outside the archive; None for any other. Such a file is not read (nor
    counted, nor peeked at for the layout): its lines would end up in reject rows."""
    if storage.is_s3(source_uri) or not storage.is_dir(archive_uri):
        return None
    root = os.path.realpath(_local_path(archive_uri))
    real = os.path.realpath(_local_path(source_uri))
    if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return f"bad_path: {os.path.relpath(_local_path(source_uri), _local_path(archive_uri))} " \
           "links outside the archive"


def _local_path(uri: str) -> str:
    return storage.resolve(uri)[1]


def count_records(source_uri: str, archive_uri: str | None = None) -> int:
    """How many records ``source_uri`` holds, counted from the file and not from what the
    parser made of it, so that posts + rejects = this number proves nothing was lost.

    JSONL: the non-blank lines. Parquet: the row count of its footer. InstaPIC / YFCC JSON:
    the posts of each user entry (every occurrence of a repeated key), a user entry that is
    not an object / a list of posts counting one. A file that cannot be opened or parsed at
    all counts one, as it is one ``bad_file`` / ``bad_json`` reject; so does a source that
    links outside ``archive_uri`` (one ``bad_path`` reject, the file not opened).
    """
    if archive_uri is not None and _links_out(source_uri, archive_uri):
        return 1
    try:
        if source_uri.endswith(".jsonl"):
            return sum(1 for _, line in _iter_lines(source_uri) if line.strip())
        if source_uri.endswith(".parquet"):
            with storage.open_input(source_uri) as stream:
                return pq.ParquetFile(stream).metadata.num_rows
        if source_uri.endswith(".json"):
            data = _loads(storage.read_bytes(source_uri))
            if not isinstance(data, dict):
                return 1
            container = dict if _json_layout_of(data) == "instapic" else list
            return sum(
                (len(_pairs(posts)) if container is dict else len(posts))
                if isinstance(posts, container) else 1
                for _, posts in _pairs(data))
    except (OSError, ValueError, ReadError, RecursionError) as err:
        _raise_if_transient(source_uri, err)  # a count that guessed 1 would unbalance
        return 1
    raise ReadError(f"{source_uri}: not a .jsonl, .parquet or .json source")


def read_archive(
    archive_uri: str, batch_size: int = 1000, image_roots: tuple[str, ...] = ()
) -> Iterator[Batch]:
    """Every source of the archive in sequence (for plain loops and tests)."""
    for source_uri in list_sources(archive_uri):
        yield from parse_source(source_uri, archive_uri, batch_size, image_roots)


def read_all(
    archive_uri: str, image_roots: tuple[str, ...] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All posts and all rejects of a (small) archive as two lists."""
    posts: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for batch_posts, batch_rejects in read_archive(archive_uri, image_roots=image_roots):
        posts.extend(batch_posts)
        rejects.extend(batch_rejects)
    return posts, rejects
