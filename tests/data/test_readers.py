"""Raw-archive readers: four layouts in, raw posts and reject rows out, nothing lost."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from csmn.data import readers, storage
from csmn.data.rejects import reason_code
from csmn.data.schemas import conform, load_schema

STAMP = datetime(2015, 6, 1, 12, 30, tzinfo=UTC)


def collect(archive: str, batch_size: int = 1000,
            image_roots: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    posts, rejects = [], []
    for source in readers.list_sources(archive):
        in_source = 0
        for batch_posts, batch_rejects in readers.parse_source(source, archive, batch_size,
                                                               image_roots):
            in_source += len(batch_posts) + len(batch_rejects)
            assert len(batch_posts) + len(batch_rejects) <= batch_size
            posts += batch_posts
            rejects += batch_rejects
        # Counted from the file itself, not from what the parser made of it.
        assert in_source == readers.count_records(source), source
    # Whatever comes out fits the contracts of the next stage.
    conform(posts, "raw_post")
    conform(rejects, "reject")
    assert all(r["stage"] == "read" for r in rejects)
    return posts, rejects


def codes(rejects: list[dict]) -> Counter[str]:
    return Counter(reason_code(r["reason"]) for r in rejects)


GOOD_LINES = [
    {"user_id": "u1", "post_id": "p1", "created_at": "2015-06-01T12:30:00Z",
     "image": "images/u1/p1.jpg", "caption": "Sunny day at the beach ☀️",
     "hashtags": ["#beach", "summer"]},
    {"user_id": "u1", "post_id": "p2", "created_at": "2015-06-01T14:30:00+02:00",
     "image": "images/u1/p2.jpg", "caption": "", "hashtags": []},
    {"user_id": 42, "post_id": 7, "created_at": 1433161800, "image": "/abs/img.jpg",
     "caption": "epoch seconds", "hashtags": ["#a"]},
    {"user_id": "u2", "post_id": "p4", "created_at": 1433161800000.0,
     "image": "s3://bucket/img.jpg", "caption": "epoch millis", "hashtags": []},
    {"user_id": "u2", "post_id": "p5", "created_at": "2015-06-01 12:30:00",
     "image": "images/u2/p5.jpg", "caption": "naive time is UTC", "hashtags": [" #x ", ""]},
    {"user_id": "u2", "post_id": "p6", "created_at": None, "image": "images/u2/p6.jpg",
     "caption": "no time", "hashtags": []},
    {"user_id": "u2", "post_id": "p7", "image": "images/u2/p7.jpg", "caption": "time absent",
     "hashtags": ["#b"], "likes": 12},
]
BAD_LINES = [
    ('{"user_id": "u3", "post_id": "b1", "caption": "cut off', "bad_json", "b1"),
    ("{'user_id': 'u3', 'post_id': 'b2'}", "bad_json", None),
    ('["a", "list"]', "not_an_object", None),
    (json.dumps({"user_id": "u3", "post_id": "b4", "image": "x.jpg", "caption": "no tags"}),
     "missing_field", "b4"),
    (json.dumps({"user_id": "u3", "post_id": "b5", "image": "x.jpg", "caption": 3,
                 "hashtags": []}), "wrong_type", "b5"),
    (json.dumps({"user_id": "u3", "post_id": "b6", "image": "x.jpg", "caption": "",
                 "hashtags": "#a #b"}), "wrong_type", "b6"),
    (json.dumps({"user_id": "u3", "post_id": "b7", "image": "x.jpg", "caption": "",
                 "hashtags": [1, 2]}), "wrong_type", "b7"),
    (json.dumps({"user_id": "u3", "post_id": "b8", "image": "x.jpg", "caption": "",
                 "hashtags": [], "created_at": "last tuesday"}), "bad_timestamp", "b8"),
    (json.dumps({"user_id": "u3", "post_id": "b9", "image": "x.jpg", "caption": "",
                 "hashtags": [], "created_at": True}), "wrong_type", "b9"),
    (json.dumps({"user_id": "", "post_id": "b10", "image": "x.jpg", "caption": "",
                 "hashtags": []}), "missing_field", "b10"),
    (json.dumps({"user_id": ["u3"], "post_id": "b11", "image": "x.jpg", "caption": "",
                 "hashtags": []}), "wrong_type", "b11"),
    (json.dumps({"user_id": "u3", "post_id": "b12", "image": None, "caption": "",
                 "hashtags": []}), "missing_field", "b12"),
]


def write_jsonl(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in GOOD_LINES[:3]]
    lines.append(b"")  # a blank line holds no record
    lines += [line.encode() for line, _, _ in BAD_LINES]
    lines.append(b'{"user_id": "u3", "post_id": "b13", "caption": "\xff\xfe"}')  # not UTF-8
    lines += [json.dumps(r, ensure_ascii=False).encode() for r in GOOD_LINES[3:]]
    path.write_bytes(b"\n".join(lines))  # no newline after the last line


def test_jsonl_posts_and_rejects_with_reasons(tmp_path):
    write_jsonl(tmp_path / "posts" / "part-00000.jsonl")
    archive = str(tmp_path)
    assert readers.detect_layout(archive) == "jsonl"
    # Absolute paths are read only under the roots the operator allows.
    posts, rejects = collect(archive, batch_size=4, image_roots=("/abs", "s3://bucket"))
    # Records in = posts + rejects (the blank line is no record).
    assert len(posts) == len(GOOD_LINES) and len(rejects) == len(BAD_LINES) + 1
    by_id = {p["post_id"]: p for p in posts}
    assert by_id["p1"]["created_at"] == STAMP
    assert by_id["p1"]["image"] == str(tmp_path / "images" / "u1" / "p1.jpg")
    assert by_id["p1"]["hashtags"] == ["#beach", "summer"]
    assert by_id["p1"]["caption"] == "Sunny day at the beach ☀️"
    assert by_id["p2"]["created_at"] == STAMP and by_id["p2"]["caption"] == ""
    assert by_id["7"]["user_id"] == "42" and by_id["7"]["created_at"] == STAMP
    assert by_id["7"]["image"] == "/abs/img.jpg"
    assert by_id["p4"]["created_at"] == STAMP and by_id["p4"]["image"] == "s3://bucket/img.jpg"
    assert by_id["p5"]["created_at"] == STAMP and by_id["p5"]["hashtags"] == ["#x"]
    assert by_id["p6"]["created_at"] is None and by_id["p7"]["created_at"] is None
    assert "likes" not in by_id["p7"]

    source = str(tmp_path / "posts" / "part-00000.jsonl")
    expected = [(code, record_id) for _, code, record_id in BAD_LINES] + [("bad_encoding", "b13")]
    assert [(reason_code(r["reason"]), r["record_id"]) for r in rejects] == expected
    # Each reject says where it came from (file:line) and what it held.
    assert rejects[0]["source"] == f"{source}:5"
    assert rejects[0]["payload"].startswith('{"user_id": "u3"')
    assert rejects[-1]["source"] == f"{source}:17"
    assert all(": " in r["reason"] for r in rejects)
    missing = next(r for r in rejects if r["record_id"] == "b4")
    assert missing["reason"] == "missing_field: hashtags"


def test_parquet_round_trip_and_bad_rows(tmp_path):
    good = [
        {"user_id": f"u{i % 3}", "post_id": f"p{i}", "created_at": STAMP,
         "image": f"images/p{i}.jpg", "caption": f"caption {i}", "hashtags": ["#t", f"#n{i}"]}
        for i in range(25)
    ]
    storage.write_parquet(str(tmp_path / "posts" / "part-00000.parquet"),
                          conform(good, "raw_post"))
    # A file from another exporter: epoch times, a null caption, an id column of ints.
    other = pa.table({
        "user_id": ["v1", "v1", None], "post_id": ["q1", "q2", "q3"],
        "created_at": [1433161800, None, 1433161800], "image": ["a.jpg", "b.jpg", "c.jpg"],
        "caption": ["fine", None, "no user"], "hashtags": [["#a"], [], []],
    })
    storage.write_parquet(str(tmp_path / "posts" / "part-00001.parquet"), other)
    (tmp_path / "posts" / "part-00002.parquet").write_bytes(b"PAR1 not really parquet")
    archive = str(tmp_path)
    assert readers.detect_layout(archive) == "parquet"
    posts, rejects = collect(archive, batch_size=10)
    assert len(posts) == 26 and len(rejects) == 3
    first = [p for p in posts if p["post_id"].startswith("p")]
    assert [p["post_id"] for p in first] == [g["post_id"] for g in good]
    for read, written in zip(first, good, strict=True):
        assert {**read, "image": None} == {**written, "image": None}
        assert read["image"] == str(tmp_path / written["image"])
    assert next(p for p in posts if p["post_id"] == "q1")["created_at"] == STAMP
    assert codes(rejects) == Counter({"missing_field": 2, "bad_file": 1})
    assert {r["record_id"] for r in rejects} == {"q2", "q3", None}
    assert any(r["source"].endswith("part-00001.parquet:2") for r in rejects)


def _short_row_group_file(path: Path) -> int:
    """A Parquet file of two row groups of 5 posts whose first group's pages end short without
    an error (one byte of its first page header changed): the footer still promises 5 rows.
    Returns how many rows the first group delivers. The byte is searched for, not hard-coded,
    so that the file stays valid for pyarrow whatever its writer's page layout."""
    import io

    import pyarrow.parquet as pq

    rows = [{"user_id": f"u{i % 3}", "post_id": f"p{i}", "created_at": STAMP,
             "image": f"images/p{i}.jpg", "caption": f"caption {i}", "hashtags": ["#t"]}
            for i in range(10)]
    buffer = io.BytesIO()
    pq.write_table(conform(rows, "raw_post"), buffer, row_group_size=5, compression="none",
                   use_dictionary=False, write_statistics=False)
    base = buffer.getvalue()
    header = pq.ParquetFile(io.BytesIO(base)).metadata.row_group(0).column(0).data_page_offset
    for position in range(header, header + 16):
        for value in (0, 1, 2, 0x7F):
            data = bytearray(base)
            data[position] = value
            try:
                corrupt = pq.ParquetFile(io.BytesIO(bytes(data)))
                promised = corrupt.metadata.row_group(0).num_rows
                delivered = sum(b.num_rows for b in corrupt.iter_batches(row_groups=[0]))
            except (OSError, ValueError):
                continue
            if promised == 5 and delivered < 5:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(bytes(data))
                return delivered
    raise AssertionError("no one-byte change of the first page header ends its group short")


def test_a_row_group_that_ends_short_without_an_error_rejects_its_missing_rows(tmp_path):
    delivered = _short_row_group_file(tmp_path / "posts" / "part-00000.parquet")
    posts, rejects = collect(str(tmp_path), batch_size=3)  # asserts in = out + rejected
    assert len(posts) == 5 + delivered and len(rejects) == 5 - delivered
    assert codes(rejects) == Counter({"bad_file": 5 - delivered})
    assert all("row group 0 ended after" in r["reason"] for r in rejects)
    assert [p["post_id"] for p in posts][-5:] == ["p5", "p6", "p7", "p8", "p9"]


def test_layout_detection_and_unreadable_archives(tmp_path):
    with pytest.raises(readers.ReadError):
        readers.detect_layout(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(readers.ReadError, match="no .*posts"):
        readers.detect_layout(str(tmp_path / "empty"))
    single = tmp_path / "one" / "posts" / "only.jsonl"
    single.parent.mkdir(parents=True)
    single.write_text(json.dumps(GOOD_LINES[0]) + "\n")
    assert readers.detect_layout(str(single)) == "jsonl"
    assert readers.list_sources(str(single)) == [str(single)]
    posts, rejects = readers.read_all(str(single))
    # A single posts file still resolves images against its archive root.
    assert posts[0]["image"] == str(tmp_path / "one" / "images" / "u1" / "p1.jpg")
    assert rejects == []


def make_instapic(root: Path) -> int:
    """The authors' layout; returns how many records it holds."""
    (root / "json").mkdir(parents=True)
    (root / "images").mkdir()
    data = {
        "111": {
            "901": {"caption": "my morning coffee with @anna #coffee", "tags": ["#coffee"]},
            "902": {"caption": ["a", "list", "caption"]},
            "903": {"tags": "#beach #sun"},
            "904": {"caption": "no image for this one"},
            "905": "not an object",
            "906": {"likes": 3},
            "907": {"caption": 12},
        },
        "222": {"911": {"caption": "from the second user", "tags": []}},
        "333": ["users hold objects, not lists"],
    }
    (root / "json" / "insta-caption-train.json").write_text(json.dumps(data))
    for name in ("111_@_901", "111_@_902", "111_@_903", "111_@_905", "222_@_911"):
        (root / "images" / name).write_bytes(b"\xff\xd8 jpeg bytes")
    (root / "json" / "insta-hashtag-test1.json").write_text('{"444": {"1": {"tags": ')
    return 7 + 1 + 1 + 1  # posts + user 333 + the broken file


def test_instapic_layout(tmp_path):
    records = make_instapic(tmp_path)
    archive = str(tmp_path)
    assert readers.detect_layout(archive) == "instapic"
    assert [Path(s).name for s in readers.list_sources(archive)] == [
        "insta-caption-train.json", "insta-hashtag-test1.json"]
    posts, rejects = collect(archive)
    assert len(posts) + len(rejects) == records
    by_id = {p["post_id"]: p for p in posts}
    assert set(by_id) == {"901", "902", "903", "911"}
    assert by_id["901"]["user_id"] == "111"
    assert by_id["901"]["caption"] == "my morning coffee with @anna #coffee"
    assert by_id["901"]["hashtags"] == ["#coffee"]
    assert by_id["901"]["image"] == str(tmp_path / "images" / "111_@_901")
    assert by_id["902"]["caption"] == "a list caption" and by_id["902"]["hashtags"] == []
    assert by_id["903"]["caption"] == "" and by_id["903"]["hashtags"] == ["#beach", "#sun"]
    assert all(p["created_at"] is None for p in posts)
    assert codes(rejects) == Counter(
        {"missing_image": 1, "wrong_type": 3, "missing_field": 1, "bad_json": 1})
    by_record = {r["record_id"]: r for r in rejects}
    assert "111_@_904" in by_record["904"]["reason"]
    assert by_record["906"]["reason"].startswith("missing_field: caption and tags")
    assert by_record["905"]["source"].endswith("insta-caption-train.json:111/905")


def test_instapic_images_are_never_read_from_beside_the_archive(tmp_path):
    """The authors' JSON may sit in json/ (images in ../images, the archive's own) or at the
    archive's top (images in ./images). Above a top-level JSON, ../images is outside the
    archive: a folder there is never read, even when the archive has none of its own."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "111_@_901").write_bytes(b"\xff\xd8 not the archive's")
    (archive / "insta-caption-train.json").write_text(
        json.dumps({"111": {"901": {"caption": "a post", "tags": ["#a"]}}}))
    posts, rejects = collect(str(archive))
    assert posts == [] and codes(rejects) == Counter({"missing_image": 1})
    # Its own images/ folder is read.
    (archive / "images").mkdir()
    (archive / "images" / "111_@_901").write_bytes(b"\xff\xd8")
    posts, rejects = collect(str(archive))
    assert [p["image"] for p in posts] == [str(archive / "images" / "111_@_901")]
    assert rejects == []


def test_an_images_folder_that_links_out_of_the_archive_is_not_its_own(tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "111_@_901").write_bytes(b"\xff\xd8 outside")
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "images").symlink_to(tmp_path / "secret")
    (archive / "insta-caption-train.json").write_text(
        json.dumps({"111": {"901": {"caption": "a post", "tags": ["#a"]}}}))
    posts, rejects = collect(str(archive))
    assert posts == [] and codes(rejects) == Counter({"missing_image": 1})


def test_a_source_that_links_out_of_the_archive_is_one_reject_and_never_read(tmp_path):
    secret = tmp_path / "credentials"
    secret.write_text("[default]\naws_secret_access_key = not-to-be-copied\n")
    archive = tmp_path / "archive"
    (archive / "posts").mkdir(parents=True)
    (archive / "posts" / "part-0.jsonl").write_text(json.dumps(GOOD_LINES[0]) + "\n")
    (archive / "posts" / "part-1.jsonl").symlink_to(secret)
    (archive / "linked").symlink_to(tmp_path, target_is_directory=True)
    posts, rejects = [], []
    for source in readers.list_sources(str(archive)):
        seen = 0
        for batch_posts, batch_rejects in readers.parse_source(source, str(archive)):
            posts += batch_posts
            rejects += batch_rejects
            seen += len(batch_posts) + len(batch_rejects)
        assert seen == readers.count_records(source, str(archive)), source
    assert [p["post_id"] for p in posts] == ["p1"]
    assert [r["reason"] for r in rejects] == [
        "bad_path: posts/part-1.jsonl links outside the archive"]
    assert rejects[0]["payload"] is None and "not-to-be-copied" not in repr(rejects)


def test_names_that_start_with_an_underscore_are_read_and_hidden_files_are_not(tmp_path):
    archive = tmp_path / "archive"
    (archive / "images").mkdir(parents=True)
    (archive / "images" / "_jane_@_101").write_bytes(b"\xff\xd8")
    (archive / "images" / ".DS_Store").write_bytes(b"junk")
    (archive / "images" / os.fsdecode(b"stray-\xe9.jpg")).write_bytes(b"\xff\xd8")
    (archive / "insta-caption-train.json").write_text(
        json.dumps({"_jane": {"101": {"caption": "a post", "tags": ["#a"]}}}))
    posts, rejects = collect(str(archive))
    assert [p["image"] for p in posts] == [str(archive / "images" / "_jane_@_101")]
    assert rejects == []
    jsonl = tmp_path / "jsonl"
    (jsonl / "posts").mkdir(parents=True)
    (jsonl / "posts" / "_2019.jsonl").write_text(json.dumps(GOOD_LINES[0]) + "\n")
    (jsonl / "posts" / ".part-1.jsonl.0a1b.tmp").write_text("unfinished")
    assert readers.list_sources(str(jsonl)) == [str(jsonl / "posts" / "_2019.jsonl")]


def test_sources_that_link_out_are_found_under_a_home_relative_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "secret.jsonl").write_text('{"user_id": "u", "post_id": "x"}\n')
    (tmp_path / "arch" / "posts").mkdir(parents=True)
    (tmp_path / "arch" / "posts" / "a.jsonl").symlink_to(tmp_path / "secret.jsonl")
    (tmp_path / "arch" / "posts" / "b.jsonl").write_text(json.dumps(GOOD_LINES[0]) + "\n")
    rejects = [r for source in readers.list_sources("~/arch")
               for _, batch in readers.parse_source(source, "~/arch") for r in batch]
    assert [r["reason"] for r in rejects] == ["bad_path: posts/a.jsonl links outside the archive"]


def test_a_whole_json_file_that_does_not_parse_says_where(tmp_path):
    (tmp_path / "insta.json").write_text('{\n  "u1": {\n    "p1": {"caption": "a",,}\n  }\n}\n')
    _, rejects = collect(str(tmp_path))
    assert len(rejects) == 1 and "at line 3 column" in rejects[0]["reason"]


def test_a_posts_file_whose_name_is_not_utf8_is_a_clear_error(tmp_path):
    (tmp_path / "posts").mkdir()
    (tmp_path / "posts" / "ok.jsonl").write_text(json.dumps(GOOD_LINES[0]) + "\n")
    (tmp_path / "posts" / os.fsdecode(b"caf\xe9.jsonl")).write_text("{}\n")
    with pytest.raises(readers.ReadError, match=r"not UTF-8.*caf\\xe9\.jsonl"):
        readers.list_sources(str(tmp_path))
    # A hidden one is left out, as hidden files are.
    os.rename(tmp_path / "posts" / os.fsdecode(b"caf\xe9.jsonl"),
              tmp_path / "posts" / os.fsdecode(b".caf\xe9.jsonl"))
    assert readers.list_sources(str(tmp_path)) == [str(tmp_path / "posts" / "ok.jsonl")]


def test_a_byte_order_mark_and_huge_integers(tmp_path):
    lines = [json.dumps(GOOD_LINES[0]).encode(),
             json.dumps(GOOD_LINES[1]).replace('"caption"', '"likes": 9, "caption"').encode()
             .replace(b'"likes": 9', b'"likes": ' + b"9" * 5000)]
    (tmp_path / "posts.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    posts, rejects = collect(str(tmp_path))
    assert [p["post_id"] for p in posts] == ["p1"]
    assert [reason_code(r["reason"]) for r in rejects] == ["bad_json"]
    assert "4300" in rejects[0]["reason"] and rejects[0]["record_id"] == "p2"


@pytest.mark.parametrize("first", [None, "a string", [], 5])
def test_a_json_file_is_read_by_its_entries_not_by_its_first_value(tmp_path, first):
    """The first user's entry may be broken or empty: it is one reject (an empty YFCC list
    none), and the users after it are read in the layout their entries have."""
    instapic = {"000": first, "111": {"901": {"caption": "one", "tags": ["#a"]},
                                      "902": {"caption": "two", "tags": []}}}
    url = "http://www.flickr.com/photos/12345678@N00/5001/"
    yfcc = {"000": first, "12345678@N00": [{"title": "three", "page url": url}]}
    # One file of each, alone in its archive (the layout is told from it alone), with a
    # byte-order mark on the second: json.loads reads one, so the layout check must too.
    for name, data, bom in (("insta", instapic, ""), ("yfcc", yfcc, "\ufeff")):
        archive = tmp_path / name
        (archive / "json").mkdir(parents=True)
        (archive / "images").mkdir()
        for image in ("111_@_901", "111_@_902", "12345678@N00_5001"):
            (archive / "images" / image).write_bytes(b"\xff\xd8")
        (archive / "json" / f"{name}.json").write_text(bom + json.dumps(data), encoding="utf-8")
        assert readers.detect_layout(str(archive)) == ("yfcc" if name == "yfcc" else "instapic")
        posts, rejects = collect(str(archive))  # asserts in = out + rejected
        expected = {"insta": ["901", "902"], "yfcc": ["5001"]}[name]
        assert sorted(p["post_id"] for p in posts) == expected
        empty_yfcc_list = name == "yfcc" and first == []
        assert codes(rejects) == (Counter() if empty_yfcc_list else Counter({"wrong_type": 1}))


def test_yfcc_layout(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "images").mkdir()
    url = "http://www.flickr.com/photos/12345678@N00/{}/"
    data = {
        "12345678@N00": [
            {"title": "Sunset+at+the+beach", "description": "A+%3Cb%3Ewarm%3C%2Fb%3E+evening",
             "user tags": "beach,new+york,sunset", "page url": url.format("5001"),
             "date taken": "2010-05-29 11:42:18.0"},
            {"title": "Plain title", "description": "", "user tags": ["a", "b c"],
             "page url": url.format("5002")},
            {"title": "no image", "description": "", "user tags": "",
             "page url": url.format("5003")},
            {"title": "no url", "description": "", "user tags": ""},
            {"title": "odd url", "description": "", "user tags": "", "page url": "flickr"},
            {"title": ["a", "list", "title"], "description": None, "user tags": None,
             "page url": url.format("5006")},
            {"title": 5, "page url": url.format("5007")},
        ],
        "999@N01": {"not": "a list"},
    }
    (tmp_path / "json" / "yfcc-caption-train.json").write_text(json.dumps(data))
    for name in ("12345678@N00_5001", "12345678@N00_5002.jpg", "12345678@N00_5006",
                 "12345678@N00_5007"):
        (tmp_path / "images" / name).write_bytes(b"\xff\xd8")
    archive = str(tmp_path)
    assert readers.detect_layout(archive) == "yfcc"
    posts, rejects = collect(archive)
    assert len(posts) + len(rejects) == 7 + 1
    by_id = {p["post_id"]: p for p in posts}
    assert set(by_id) == {"5001", "5002", "5006"}
    first = by_id["5001"]
    assert first["user_id"] == "12345678@N00"
    assert first["caption"] == "Sunset at the beach A warm evening"
    assert first["hashtags"] == ["beach", "newyork", "sunset"]
    assert first["created_at"] == datetime(2010, 5, 29, 11, 42, 18, tzinfo=UTC)
    assert first["image"] == str(tmp_path / "images" / "12345678@N00_5001")
    assert by_id["5002"]["hashtags"] == ["a", "bc"]
    assert by_id["5002"]["image"].endswith("12345678@N00_5002.jpg")
    assert by_id["5006"]["caption"] == "a list title" and by_id["5006"]["hashtags"] == []
    assert codes(rejects) == Counter(
        {"missing_image": 1, "missing_field": 1, "bad_url": 1, "wrong_type": 2})
    assert {r["record_id"] for r in rejects} == {"5003", None, "5007"}


def test_reads_jsonl_and_instapic_from_s3(tmp_path, s3_bucket):
    local = tmp_path / "local"
    write_jsonl(local / "posts" / "part-00000.jsonl")
    archive = f"{s3_bucket}/raw"
    storage.write_bytes(f"{archive}/posts/part-00000.jsonl",
                        (local / "posts" / "part-00000.jsonl").read_bytes())
    posts, rejects = collect(archive, image_roots=("/abs", "s3://bucket"))
    assert len(posts) == len(GOOD_LINES) and len(rejects) == len(BAD_LINES) + 1
    by_id = {p["post_id"]: p for p in posts}
    assert by_id["p1"]["image"] == f"{archive}/images/u1/p1.jpg"
    assert rejects[0]["source"] == f"{archive}/posts/part-00000.jsonl:5"

    insta = tmp_path / "insta"
    records = make_instapic(insta)
    for path in insta.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{s3_bucket}/insta/{path.relative_to(insta)}", path.read_bytes())
    posts, rejects = collect(f"{s3_bucket}/insta")
    assert len(posts) + len(rejects) == records
    assert {p["image"] for p in posts} == {
        f"{s3_bucket}/insta/images/{n}"
        for n in ("111_@_901", "111_@_902", "111_@_903", "222_@_911")
    }


def test_timestamps_and_image_resolution():
    parse = readers.parse_timestamp
    assert parse("2015-06-01T12:30:00Z") == STAMP
    assert parse("2015-06-01T12:30:00") == STAMP
    assert parse("1433161800") == STAMP
    assert parse(1433161800000) == STAMP
    assert parse(None) is None and parse("") is None
    assert readers.resolve_image("images/a.jpg", "s3://b/arch") == "s3://b/arch/images/a.jpg"
    assert readers.resolve_image("file:///x/y.jpg", "/z", ("/x",)) == "/x/y.jpg"
    assert load_schema("raw_post").names == [
        "user_id", "post_id", "created_at", "image", "caption", "hashtags"]


# ---- hostile input, focused (tests/reliability holds the whole generator) --------------------


def _jsonl(tmp_path: Path, records: list, name: str = "posts/p.jsonl") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return str(tmp_path)


def test_top_level_posts_file_is_an_archive(tmp_path):
    archive = _jsonl(tmp_path, GOOD_LINES[:2], name="posts.jsonl")
    assert readers.detect_layout(archive) == "jsonl"
    assert readers.list_sources(archive) == [str(tmp_path / "posts.jsonl")]
    posts, rejects = collect(archive)
    assert [p["image"] for p in posts] == [str(tmp_path / "images/u1/p1.jpg"),
                                           str(tmp_path / "images/u1/p2.jpg")]
    assert rejects == []


def test_text_sanitizer_and_timestamps_reject_one_record_each(tmp_path):
    base = {"user_id": "u", "image": "i.jpg", "caption": "ok", "hashtags": ["#a"]}
    cases = [
        ({"caption": "u\ud800"}, "bad_text"), ({"user_id": "\udc00"}, "bad_text"),
        ({"hashtags": ["#\ud83d"]}, "bad_text"), ({"caption": "a\x00"}, "bad_text"),
        ({"caption": "x" * (readers.MAX_CAPTION_CHARS + 1)}, "too_long"),
        ({"hashtags": ["#" + "x" * readers.MAX_HASHTAG_CHARS]}, "too_long"),
        ({"hashtags": ["#a"] * (readers.MAX_HASHTAGS + 1)}, "too_long"),
        ({"user_id": "u" * (readers.MAX_ID_CHARS + 1)}, "too_long"),
        ({"image": "i/" * readers.MAX_IMAGE_CHARS}, "too_long"),
        ({"created_at": "0001-01-01T00:00:00+05:00"}, "bad_timestamp"),
        ({"created_at": "9999-12-31T23:59:59-01:00"}, "bad_timestamp"),
        ({"created_at": 10**400}, "bad_timestamp"),
    ]
    records = [{**base, "post_id": f"p{i}", **change} for i, (change, _) in enumerate(cases)]
    records.append({**base, "post_id": "fine", "created_at": "0001-01-01T00:00:00-05:00"})
    # json.dumps escapes lone surrogates ("\ud800"), as a real JSON exporter does.
    posts, rejects = collect(_jsonl(tmp_path, records))
    assert [p["post_id"] for p in posts] == ["fine"]
    assert posts[0]["created_at"] == datetime(1, 1, 1, 5, tzinfo=UTC)
    assert [(r["record_id"], reason_code(r["reason"])) for r in rejects] == [
        (f"p{i}", code) for i, (_, code) in enumerate(cases)]
    # Reject rows stay writable: the surrogate is escaped, the payload capped.
    assert "\\udc00" in rejects[1]["payload"] and len(rejects[4]["payload"]) <= 2001


def test_one_bad_utf8_cell_rejects_its_row_only(tmp_path):
    ids = pa.array([b"p0", b"p1", b"p\xff2", b"p3", b"p4"], pa.binary())
    table = pa.table({
        "user_id": ["u"] * 5,
        "post_id": pa.Array.from_buffers(pa.string(), 5, ids.buffers()),
        "image": [f"{i}.jpg" for i in range(5)], "caption": ["c"] * 5,
        "hashtags": [["#a"]] * 5,
    })
    (tmp_path / "posts").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "posts" / "p.parquet", row_group_size=2)
    posts, rejects = collect(str(tmp_path))
    assert [p["post_id"] for p in posts] == ["p0", "p1", "p3", "p4"]
    assert [reason_code(r["reason"]) for r in rejects] == ["bad_encoding"]
    assert rejects[0]["source"].endswith("p.parquet:3") and "post_id" in rejects[0]["reason"]


def test_duplicate_json_keys_are_rejected_in_every_layout(tmp_path):
    line = '{"user_id": "u", "post_id": "p", "image": "i.jpg", "caption": "a", ' \
           '"caption": "b", "hashtags": []}'
    posts, rejects = collect(_jsonl(tmp_path / "jsonl", [line]))
    assert posts == [] and [reason_code(r["reason"]) for r in rejects] == ["duplicate_key"]

    insta = tmp_path / "insta"
    (insta / "images").mkdir(parents=True)
    for name in ("u_@_1", "u_@_2", "v_@_1", "w_@_1"):
        (insta / "images" / name).write_bytes(b"x")
    ok = '{"caption": "fine", "tags": "#a"}'
    (insta / "a.json").write_text(
        f'{{"u": {{"1": {ok}, "2": {ok}, "2": {ok}}}, "v": {{"1": {ok}}}, "v": {{"1": {ok}}},'
        f' "w": {{"1": {{"caption": "x", "tags": "#a", "tags": "#b"}}}}}}')
    posts, rejects = collect(str(insta))
    assert [(p["user_id"], p["post_id"]) for p in posts] == [("u", "1")]
    assert [(r["record_id"], reason_code(r["reason"])) for r in rejects] == [
        ("2", "duplicate_key"), ("2", "duplicate_key"), ("1", "duplicate_key"),
        ("1", "duplicate_key"), ("1", "duplicate_key")]

    yfcc = tmp_path / "yfcc"
    (yfcc / "images").mkdir(parents=True)
    (yfcc / "images" / "u_5").write_bytes(b"x")
    url = '"http://www.flickr.com/photos/u/5/"'
    (yfcc / "y.json").write_text(f'{{"u": [{{"title": "a", "page url": {url}}}], '
                                 f'"u": [{{"title": "b", "page url": {url}}}]}}')
    posts, rejects = collect(str(yfcc))
    assert posts == [] and [reason_code(r["reason"]) for r in rejects] == ["duplicate_key"] * 2
