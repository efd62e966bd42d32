"""A generator of hostile raw archives: every kind of bad record a careless exporter or an
attacker can write, in every reader layout, mixed with good users who must come out intact.

A plain module (imported as ``import hostile`` by the tests beside it). Each bad kind is
written ``copies`` times and knows the reject code it must get; good users' posts are
English, 3-15 tokens, so every one of them passes the filters of paper 3.1 and must be kept.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import T0, TAGS, WORDS

from csmn.data import readers

# Preprocessing thresholds for these archives: a few posts make a user.
OVERRIDES = {"min_posts_per_user": 4, "max_posts_per_user": 50, "max_flagged_posts_min": 2,
             "context_size": 10, "post_vocab_size": 500, "hashtag_vocab_size": 500}
# Good users, hostile names among them: ids are data, never paths or markup.
GOOD_USERS = ["alice", "bob", "../../../escape", "<script>alert(1)</script>", "u\u00e9\U0001f600",
              "1", "_underscore"]


@dataclass
class Archive:
    root: Path
    records_in: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # bad kind -> records written
    codes: Counter[str] = field(default_factory=Counter)  # reject code -> records expected
    good: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def bad(self, kind: str, code: str, n: int = 1) -> None:
        self.kinds[kind] += n
        self.codes[code] += n
        self.records_in += n


def caption(u: int, i: int) -> str:
    return " ".join(WORDS[(u * 7 + i * 3 + k) % len(WORDS)] for k in range(6)) + "!"


def hashtags(u: int, i: int) -> list[str]:
    return [TAGS[(u + i + k) % len(TAGS)] for k in range(3)] + [f"#sig{u}"]


def good_posts(layout: str, prefix: str = "", n_posts: int = 6) -> list[dict[str, Any]]:
    """Every good user has posts "0", "1", ...: post ids are unique per user only."""
    posts = []
    for u, user in enumerate(GOOD_USERS):
        for i in range(n_posts):
            posts.append({
                "user_id": f"{prefix}{user}", "post_id": str(i),
                "created_at": (T0 + timedelta(days=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "image": f"images/{layout}-{u}-{i}.jpg", "caption": caption(u, i),
                "hashtags": hashtags(u, i)})
    return posts


def _line(record: Any) -> bytes:
    try:
        return json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON can only spell it as an escape
        return json.dumps(record).encode("ascii")


def _base(kind: str, i: int) -> dict[str, Any]:
    return {"user_id": f"bad-{kind}", "post_id": f"{kind}-{i}", "created_at": None,
            "image": f"images/{kind}-{i}.jpg", "caption": "a fine caption here",
            "hashtags": ["#a", "#b", "#c"]}


def _with(kind: str, i: int, **changes: Any) -> bytes:
    return _line({**_base(kind, i), **changes})


def _without(kind: str, i: int, name: str) -> bytes:
    record = _base(kind, i)
    del record[name]
    return _line(record)


LONG = readers.MAX_CAPTION_CHARS + 1
# (kind, reject code, line builder). JSON escapes spell surrogates ("\ud800"), which
# json.dumps writes from a lone surrogate in a str.
JSONL_KINDS: list[tuple[str, str, Any]] = [
    ("truncated_json", "bad_json", lambda k, i: b'{"user_id": "x", "post_id": "' + str(i).encode()),
    ("single_quotes", "bad_json", lambda k, i: b"{'user_id': 'x'}"),
    ("invalid_utf8", "bad_encoding",
     lambda k, i: b'{"user_id": "x", "post_id": "' + str(i).encode() + b'", "caption": "\xff"}'),
    ("deep_nesting", "bad_json", lambda k, i: b"[" * 100_000 + b"]" * 100_000),
    # More digits than Python converts to an int: a plain ValueError, not a JSONDecodeError.
    ("huge_integer", "bad_json",
     lambda k, i: _with(k, i, likes="X").replace(b'"X"', b"9" * 5000)),
    ("a_list", "not_an_object", lambda k, i: b'["user_id", "post_id"]'),
    ("null_record", "not_an_object", lambda k, i: b"null"),
    ("a_number", "not_an_object", lambda k, i: b"12345"),
    ("missing_user", "missing_field", lambda k, i: _without(k, i, "user_id")),
    ("missing_post", "missing_field", lambda k, i: _without(k, i, "post_id")),
    ("missing_image", "missing_field", lambda k, i: _without(k, i, "image")),
    ("missing_caption", "missing_field", lambda k, i: _without(k, i, "caption")),
    ("missing_hashtags", "missing_field", lambda k, i: _without(k, i, "hashtags")),
    ("blank_user", "missing_field", lambda k, i: _with(k, i, user_id="   ")),
    ("empty_image", "missing_field", lambda k, i: _with(k, i, image="")),
    ("list_user", "wrong_type", lambda k, i: _with(k, i, user_id=["u"])),
    ("bool_post", "wrong_type", lambda k, i: _with(k, i, post_id=True)),
    ("number_image", "wrong_type", lambda k, i: _with(k, i, image=404)),
    ("number_caption", "wrong_type", lambda k, i: _with(k, i, caption=3.5)),
    ("string_hashtags", "wrong_type", lambda k, i: _with(k, i, hashtags="#a #b")),
    ("number_hashtag", "wrong_type", lambda k, i: _with(k, i, hashtags=["#a", 7])),
    ("bool_time", "wrong_type", lambda k, i: _with(k, i, created_at=True)),
    ("words_time", "bad_timestamp", lambda k, i: _with(k, i, created_at="last tuesday")),
    ("before_year_1_in_utc", "bad_timestamp",
     lambda k, i: _with(k, i, created_at="0001-01-01T00:00:00+05:00")),
    ("after_year_9999_in_utc", "bad_timestamp",
     lambda k, i: _with(k, i, created_at="9999-12-31T23:59:59-05:00")),
    ("huge_epoch", "bad_timestamp", lambda k, i: _with(k, i, created_at=1e300)),
    ("huge_integer_epoch", "bad_timestamp", lambda k, i: _with(k, i, created_at=10**400)),
    ("nan_epoch", "bad_timestamp",
     lambda k, i: _with(k, i, created_at="X").replace(b'"X"', b"NaN")),
    ("long_timestamp", "bad_timestamp", lambda k, i: _with(k, i, created_at="1" * 10_000)),
    ("surrogate_caption", "bad_text", lambda k, i: _with(k, i, caption="u\ud800")),
    ("surrogate_user", "bad_text", lambda k, i: _with(k, i, user_id="u\udfff")),
    ("surrogate_hashtag", "bad_text", lambda k, i: _with(k, i, hashtags=["#ok", "#\ud83d"])),
    ("nul_caption", "bad_text", lambda k, i: _with(k, i, caption="a\x00b")),
    ("nul_post", "bad_text", lambda k, i: _with(k, i, post_id=f"p\x00{i}")),
    ("megabyte_caption", "too_long", lambda k, i: _with(k, i, caption="a." * 500_000)),
    ("long_caption", "too_long", lambda k, i: _with(k, i, caption="w " * (LONG // 2 + 1))),
    ("long_hashtag", "too_long", lambda k, i: _with(k, i, hashtags=["#" + "x" * 300])),
    ("many_hashtags", "too_long",
     lambda k, i: _with(k, i, hashtags=[f"#t{j}" for j in range(readers.MAX_HASHTAGS + 1)])),
    ("long_user", "too_long", lambda k, i: _with(k, i, user_id="u" * 300)),
    ("long_image", "too_long", lambda k, i: _with(k, i, image="images/" + "d/" * 3000)),
    ("dot_dot_image", "bad_path", lambda k, i: _with(k, i, image="../../etc/passwd")),
    ("escaping_image", "bad_path", lambda k, i: _with(k, i, image="images/../../x.jpg")),
    ("absolute_image", "bad_path", lambda k, i: _with(k, i, image="/etc/shadow")),
    ("file_uri_image", "bad_path", lambda k, i: _with(k, i, image="file:///etc/passwd")),
    ("other_bucket_image", "bad_path",
     lambda k, i: _with(k, i, image="s3://other-bucket/secret.jpg")),
    ("http_image", "bad_path", lambda k, i: _with(k, i, image="http://169.254.169.254/x")),
    ("nul_image", "bad_text", lambda k, i: _with(k, i, image="images/a\x00.jpg")),
    ("link_out_image", "bad_path", lambda k, i: _with(k, i, image="images/link-out.jpg")),
    ("duplicate_field", "duplicate_key",
     lambda k, i: _with(k, i).replace(b'"caption":', b'"caption": "first", "caption":', 1)),
    ("nested_duplicate", "duplicate_key",
     lambda k, i: _with(k, i, extra={"a": 1}).replace(b'{"a": 1}', b'{"a": 1, "a": 2}')),
]
# Kinds whose records are large: a couple of copies prove the point.
HEAVY = {"deep_nesting", "megabyte_caption", "long_caption", "long_timestamp", "many_hashtags",
         "long_image"}
# Inputs that are hostile but valid: they must be parsed (not rejected) and then filtered,
# quickly (the URL rule once took 18 s on the first).
FILTERED_KINDS: list[tuple[str, Any]] = [
    ("dotted_run_caption", lambda k, i: _with(k, i, caption="a." * 8000)),
    ("link_caption", lambda k, i: _with(k, i, caption="buy now at www.example.com today")),
]


def write_posts_archive(root: Path, copies: int) -> Archive:
    """JSONL + Parquet under posts/, one more JSONL at the top level, a planted symlink."""
    archive = Archive(root)
    (root / "posts").mkdir(parents=True)
    (root / "images").mkdir()
    os.symlink("/etc/passwd", root / "images" / "link-out.jpg")
    good = good_posts("posts")
    for post in good:
        archive.good[(post["user_id"], post["post_id"])] = post
    lines = [_line(p) for p in good[: len(good) // 2]]
    archive.records_in += len(lines)
    for kind, code, build in JSONL_KINDS:
        n = min(copies, 2) if kind in HEAVY else copies
        lines += [build(kind, i) for i in range(n)]
        archive.bad(kind, code, n)
    for kind, build in FILTERED_KINDS:
        lines += [build(kind, i) for i in range(copies)]
        archive.kinds[kind] += copies
        archive.records_in += copies
    lines.insert(len(lines) // 3, b"   ")  # blank lines hold no record
    (root / "posts" / "part-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    rest = good[len(good) // 2:]
    top = rest[: len(rest) // 3]
    # A byte-order mark before the first record, as Windows tools write one.
    (root / "posts.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(
        _line(p) for p in top[: len(top) // 2]))
    # "_" starts many real names: only hidden (".") files are left out.
    (root / "posts" / "_export.jsonl").write_bytes(
        b"\n".join(_line(p) for p in top[len(top) // 2:]))
    archive.records_in += len(top)
    # A posts file that is a link to a file outside the archive: not read, one reject.
    os.symlink("/etc/passwd", root / "posts" / "linked.jsonl")
    archive.bad("source_links_out", "bad_path")
    _write_parquet(archive, root / "posts" / "part-1.parquet", rest[len(rest) // 3:], copies)
    (root / "posts" / "not-parquet.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    archive.bad("not_parquet", "bad_file")
    return archive


def _as_string(binary: pa.Array) -> pa.Array:
    """Bytes relabelled as a string column, as a careless exporter writes them: Arrow checks
    no UTF-8 here, nor when Parquet reads it back."""
    return pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())


def _write_parquet(archive: Archive, path: Path, good: list[dict], copies: int) -> None:
    rows = [dict(p) for p in good]
    bad_utf8: list[tuple[str, str]] = []
    for i in range(copies):
        for kind, column in (("parquet_bad_utf8_user", "user_id"),
                             ("parquet_bad_utf8_caption", "caption"),
                             ("parquet_bad_utf8_image", "image")):
            rows.append({**_base(kind, i), "created_at": None})
            bad_utf8.append((column, f"{kind}-{i}"))
        rows.append({**_base("parquet_null_user", i), "user_id": None})
        rows.append({**_base("parquet_bad_path", i), "image": "/etc/passwd"})
    n_kinds = 5
    for kind, code in (("parquet_bad_utf8_user", "bad_encoding"),
                       ("parquet_bad_utf8_caption", "bad_encoding"),
                       ("parquet_bad_utf8_image", "bad_encoding"),
                       ("parquet_null_user", "missing_field"),
                       ("parquet_bad_path", "bad_path")):
        archive.bad(kind, code, copies)
    assert len(rows) == len(good) + n_kinds * copies
    columns: dict[str, list] = {name: [r[name] for r in rows] for name in rows[0]}
    columns["created_at"] = [None if v is None else datetime.fromisoformat(v.replace("Z", "+00:00"))
                             for v in columns["created_at"]]
    encoded = {name: [None if v is None else v.encode() for v in columns[name]]
               for name in ("user_id", "post_id", "image", "caption")}
    marks = {post_id: column for column, post_id in bad_utf8}
    for row, post_id in enumerate(columns["post_id"]):
        column = marks.get(post_id)
        if column:
            encoded[column][row] = b"bad \xff\xfe utf-8"
    table = pa.table({
        **{name: _as_string(pa.array(values, pa.binary())) for name, values in encoded.items()},
        "created_at": pa.array(columns["created_at"], pa.timestamp("us", tz="UTC")),
        "hashtags": pa.array(columns["hashtags"], pa.list_(pa.string())),
    })
    # Small row groups: a bad row must spoil neither its row group nor the file.
    pq.write_table(table, path, row_group_size=7)
    archive.records_in += len(good)
    for post in good:
        archive.good[(post["user_id"], post["post_id"])] = post


def _object(pairs: list[tuple[str, str]]) -> str:
    """A JSON object from (key, JSON text) pairs: the only way to write a key twice."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


def write_authors_archive(root: Path, copies: int) -> Archive:
    """InstaPIC and YFCC JSON files side by side in json/, images in images/."""
    archive = Archive(root)
    (root / "json").mkdir(parents=True)
    images = root / "images"
    images.mkdir()
    insta_users: list[tuple[str, str]] = []
    yfcc_users: list[tuple[str, str]] = []
    for layout, users in (("insta", insta_users), ("yfcc", yfcc_users)):
        posts_of: dict[str, list[dict]] = {}
        for post in good_posts(layout, prefix=f"{layout}-"):
            posts_of.setdefault(post["user_id"], []).append(post)
        for user, posts in posts_of.items():
            if layout == "insta":
                body = _object([(p["post_id"], json.dumps(
                    {"caption": p["caption"], "tags": " ".join(p["hashtags"]),
                     "created_at": p["created_at"]})) for p in posts])
                names = [f"{user}_@_{p['post_id']}" for p in posts]
            else:
                body = json.dumps([{"title": p["caption"], "user tags": ",".join(
                    t.lstrip("#") for t in p["hashtags"]), "page url":
                    f"http://www.flickr.com/photos/x/{p['post_id']}/",
                    "date taken": p["created_at"]} for p in posts])
                names = [f"{user}_{p['post_id']}" for p in posts]
            if "/" in user:
                continue  # a user id with "/" cannot name an image file: left out here
            users.append((user, body))
            for post, name in zip(posts, names, strict=True):
                (images / name).write_bytes(b"jpeg")
                hashtag_list = post["hashtags"] if layout == "insta" else \
                    [t.lstrip("#") for t in post["hashtags"]]
                archive.good[(user, post["post_id"])] = {**post, "hashtags": hashtag_list}
                archive.records_in += 1
    os.symlink("/etc/passwd", images / "bad-link_@_0")
    ok = json.dumps({"caption": "a fine caption", "tags": "#a #b #c"})
    for i in range(copies):
        insta_users += [
            (f"dup-user-{i}", _object([("0", ok), ("1", ok)])),
            (f"dup-user-{i}", _object([("0", ok)])),
            (f"bad-dup-post-{i}", _object([("0", ok), ("0", ok)])),
            (f"bad-fields-{i}", _object([("0", '{"caption": "a", "caption": "b"}')])),
            (f"bad-not-object-{i}", _object([("0", '"just text"')])),
            (f"bad-user-list-{i}", "[1, 2]"),
            (f"bad-empty-{i}", _object([("0", '{"likes": 3}')])),
            (f"bad-no-image-{i}", _object([("0", ok)])),
            (f"bad-caption-type-{i}", _object([("0", '{"caption": 12}')])),
            (f"bad-surrogate-{i}", _object([("0", '{"caption": "x\\ud800"}')])),
            (f"bad-nul-{i}", _object([("p\x00", ok)])),
            (f"bad-long-{i}", _object([("p" * 300, ok)])),
            (f"bad-tags-{i}", _object([("0", json.dumps(
                {"caption": "ok", "tags": " ".join(f"#t{j}" for j in range(1001))}))])),
        ]
        for kind, code, n in (("insta_duplicate_user", "duplicate_key", 3),
                              ("insta_duplicate_post", "duplicate_key", 2),
                              ("insta_duplicate_field", "duplicate_key", 1),
                              ("insta_post_not_object", "wrong_type", 1),
                              ("insta_user_not_object", "wrong_type", 1),
                              ("insta_no_caption_nor_tags", "missing_field", 1),
                              ("insta_missing_image", "missing_image", 1),
                              ("insta_caption_type", "wrong_type", 1),
                              ("insta_surrogate", "bad_text", 1),
                              ("insta_nul_post_id", "bad_text", 1),
                              ("insta_long_post_id", "too_long", 1),
                              ("insta_many_tags", "too_long", 1)):
            archive.bad(kind, code, n)
    insta_users.append(("bad-link", _object([("0", ok)])))
    archive.bad("insta_image_links_out", "bad_path")
    (root / "json" / "insta.json").write_text(_object(insta_users), encoding="utf-8")

    for i in range(copies):
        url = f'"http://www.flickr.com/photos/x/{9000 + i}/"'
        yfcc_users += [
            (f"ybad-no-url-{i}", '[{"title": "a"}]'),
            (f"ybad-url-{i}", '[{"title": "a", "page url": "http://x/photo.jpg"}]'),
            (f"ybad-not-list-{i}", '{"title": "a"}'),
            (f"ybad-tags-{i}", f'[{{"title": "a", "user tags": 5, "page url": {url}}}]'),
            (f"ybad-title-{i}", f'[{{"title": {json.dumps("t" * LONG)}, "page url": {url}}}]'),
            (f"ybad-dup-{i}", f'[{{"title": "a", "title": "b", "page url": {url}}}]'),
            (f"ybad-surrogate-{i}",
             f'[{{"description": "x\\udc00", "page url": {url}}}]'),
            (f"ybad-image-{i}", f'[{{"title": "a", "page url": {url}}}]'),
            (f"ybad-post-{i}", '["not a post"]'),
        ]
        for kind, code in (("yfcc_no_page_url", "missing_field"), ("yfcc_bad_url", "bad_url"),
                           ("yfcc_posts_not_list", "wrong_type"),
                           ("yfcc_tags_type", "wrong_type"), ("yfcc_long_title", "too_long"),
                           ("yfcc_duplicate_field", "duplicate_key"),
                           ("yfcc_surrogate", "bad_text"), ("yfcc_missing_image", "missing_image"),
                           ("yfcc_post_not_object", "wrong_type")):
            archive.bad(kind, code)
    (root / "json" / "yfcc.json").write_text(_object(yfcc_users), encoding="utf-8")
    (root / "json" / "broken.json").write_text('{"u": {"p": {"caption": "cut', encoding="utf-8")
    archive.bad("truncated_json_file", "bad_json")
    (root / "json" / "huge-number.json").write_text(
        '{"u": {"p": {"caption": "a", "likes": ' + "9" * 5000 + "}}}", encoding="utf-8")
    archive.bad("huge_integer_json_file", "bad_json")
    # A stray file whose name is not UTF-8 beside the images: no record can name it.
    (images / os.fsdecode(b"stray-\xe9.jpg")).write_bytes(b"jpeg")
    return archive
