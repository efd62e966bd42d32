"""Hostile archives in every reader layout through the readers and through preprocessing:
each bad record is a reject with its code, every good user comes out intact, and the
balance, counted from the sources themselves, loses nothing."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import hostile
import pytest
import reliability_tally

from csmn.data import readers, storage
from csmn.data.layout import BY_POSTS_SPLITS, BY_USERS_SPLITS
from csmn.data.rejects import read_rejects, reason_code
from csmn.data.schemas import conform
from csmn.pipeline.preprocess import PreprocessConfig, preprocess
from csmn.text.normalize import normalize_caption, normalize_hashtags

# Copies of each bad kind: the readers alone take > 10,000 bad records (posts layout) in
# about a second; preprocessing, Ray included, a smaller archive.
READ_COPIES = 220
COPIES = 40


def read_everything(root: Path) -> tuple[list[dict], list[dict], int]:
    """Posts, rejects and records in (from :func:`readers.count_records`) of an archive,
    source by source: each source balances on its own."""
    posts, rejects, records_in = [], [], 0
    for source in readers.list_sources(str(root)):
        counted = readers.count_records(source, str(root))
        seen = 0
        for batch_posts, batch_rejects in readers.parse_source(source, str(root), 200):
            posts += batch_posts
            rejects += batch_rejects
            seen += len(batch_posts) + len(batch_rejects)
        assert seen == counted, source
        records_in += counted
    # What comes out is writable by the next stage (no surrogate, no wrong type).
    conform(posts, "raw_post")
    conform(rejects, "reject")
    return posts, rejects, records_in


def _write(layout: str, root: Path, copies: int) -> hostile.Archive:
    write = hostile.write_posts_archive if layout == "posts" else \
        hostile.write_authors_archive
    return write(root, copies)


@pytest.fixture(scope="module", params=["posts", "authors"])
def archive(request, tmp_path_factory) -> hostile.Archive:
    return _write(request.param, tmp_path_factory.mktemp(request.param) / "archive", COPIES)


@pytest.mark.parametrize("layout", ["posts", "authors"])
def test_every_bad_record_is_a_reject_with_its_code_and_good_ones_are_intact(layout, tmp_path):
    archive = _write(layout, tmp_path / "archive", READ_COPIES)
    if layout == "posts":
        assert sum(archive.codes.values()) >= 10_000
    posts, rejects, records_in = read_everything(archive.root)
    assert records_in == archive.records_in == len(posts) + len(rejects)
    reliability_tally.bad_kinds({f"{layout}:{k}": n for k, n in archive.kinds.items()})
    assert reliability_tally.balance(records_in, len(posts), len(rejects)) == 0
    expected = Counter(archive.codes)
    assert Counter(reason_code(r["reason"]) for r in rejects) == expected
    by_key = {(p["user_id"], p["post_id"]): p for p in posts}
    for key, good in archive.good.items():
        read = by_key[key]
        assert read["caption"] == good["caption"] and read["hashtags"] == good["hashtags"], key
        assert read["image"].startswith(str(archive.root)), key
    # No image outside the archive, whatever the record said.
    assert all(p["image"].startswith(str(archive.root) + os.sep) for p in posts)
    assert all(len(r["payload"] or "") <= 2001 and len(r["reason"]) < 1000 for r in rejects)


def test_a_reject_does_not_say_whether_an_outside_file_exists(tmp_path):
    (tmp_path / "posts").mkdir()
    record = {"user_id": "u", "post_id": "p", "caption": "c", "hashtags": []}
    lines = [json.dumps({**record, "image": image}) for image in
             ("/etc/passwd", "/etc/no-such-file-here", "../../etc/passwd", "../../etc/nope")]
    (tmp_path / "posts" / "p.jsonl").write_text("\n".join(lines))
    _, rejects = readers.read_all(str(tmp_path))
    reasons = [r["reason"] for r in rejects]
    assert [reason_code(r) for r in reasons] == ["bad_path"] * 4
    assert reasons[0].replace("passwd", "X") == reasons[1].replace("no-such-file-here", "X")
    assert reasons[2].replace("passwd", "X") == reasons[3].replace("nope", "X")


def test_preprocessing_a_hostile_archive_balances_and_keeps_every_good_post(
        archive, ray_session, tmp_path):
    out = tmp_path / "root"
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    # The posts archive on the Ray engine (with its count tasks), the other in-process.
    engine = "ray" if (archive.root / "posts").exists() else "local"
    manifest = preprocess(str(archive.root), str(out),
                          PreprocessConfig(**hostile.OVERRIDES), engine=engine)
    for task in ("post", "hashtag"):
        balance = manifest["balance"][task]
        assert balance["lost"] == 0 and balance["balanced"], balance
        assert balance["records_in"] == archive.records_in
    assert manifest["records"]["in"] == archive.records_in
    post = manifest["balance"]["post"]
    assert reliability_tally.balance(post["records_in"], post["kept"] + post["filtered"],
                                     post["rejected"]) == 0
    rejects = read_rejects(str(out), "read") + read_rejects(str(out), "preprocess")
    assert Counter(reason_code(r["reason"]) for r in rejects) == archive.codes

    for task, normalize, field in (("post", normalize_caption, "caption"),
                                   ("hashtag", normalize_hashtags, "hashtags")):
        kept = {}
        for split in BY_USERS_SPLITS:
            directory = storage.join(str(out), "examples", task, split)
            if storage.list_files(directory, ".parquet"):
                for row in storage.read_parquet(directory).to_pylist():
                    kept[(row["user_id"], row["post_id"])] = row["text"]
        for key, good in archive.good.items():
            assert kept.get(key) == " ".join(normalize(good[field])), (task, key)
        if task == "hashtag":
            assert any(storage.list_files(storage.join(str(out), "examples", task, s),
                                          ".parquet") for s in BY_POSTS_SPLITS)
    # Hostile user ids ("../../../escape") wrote nothing outside the output root.
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    print(json.dumps({"archive": archive.root.parent.name, "bad_kinds": len(archive.kinds),
                      "bad_records": sum(archive.codes.values()),
                      "records_in": manifest["records"]["in"],
                      "kept": {t: manifest["balance"][t]["kept"] for t in ("post", "hashtag")},
                      "rejected": sum(manifest["records"]["rejected"].values()),
                      "lost": manifest["balance"]["post"]["lost"]}))


def test_at_least_forty_kinds_of_bad_record():
    assert len(hostile.JSONL_KINDS) >= 40
    assert len({kind for kind, _, _ in hostile.JSONL_KINDS}) == len(hostile.JSONL_KINDS)
