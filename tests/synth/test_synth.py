"""The synthetic archive: deterministic, shaped like InstaPIC, noisy as asked, streaming."""

from __future__ import annotations

import gc
import io
import itertools
import json
import math
import os
import re
import tracemalloc
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import enchant
import numpy as np
import pytest
from PIL import Image

from csmn.data import readers, storage
from csmn.data.rejects import reason_code
from csmn.data.schemas import validate
from csmn.synth import (
    CATEGORIES,
    FOREIGN_WORDS,
    NICHES,
    SynthConfig,
    english_vocabulary,
    length_cum_weights,
    main,
    write_archive,
)
from csmn.synth.truth import reference_scores

EN_US = enchant.Dict("en_US")
EMOJI = re.compile("[\u2600-\u27bf\U0001f000-\U0001faff\u200d\ufe0f]")
LINK = re.compile(r"(https?://|www\.)")
NO_NOISE = {
    name: 0.0 for name in (
        "too_few_users_rate", "too_many_users_rate", "spammer_users_rate", "non_english_rate",
        "link_rate", "short_caption_rate", "long_caption_rate", "short_hashtags_rate",
        "long_hashtags_rate", "mention_rate", "zwj_emoji_rate", "bare_hashtags_rate",
        "broken_record_rate", "broken_image_rate",
    )
}


def small_config(out: Path | str, **overrides) -> SynthConfig:
    """A few users of ~20-40 posts with tiny images: seconds, not minutes."""
    values = dict(
        out=str(out), users=3, seed=7, posts_median=30, posts_sigma=0.3, posts_min=20,
        posts_max=40, posts_per_shard=40, image_size=16, image_threads=2,
        too_many_users_rate=0.0,  # 1,300+ posts each: only the test of user kinds wants them
    )
    values.update(overrides)
    return SynthConfig(**values)


def truth_posts(root: Path | str) -> list[dict]:
    return validate(storage.read_parquet(storage.join(str(root), "truth", "posts")),
                    "truth_post").to_pylist()


def truth_users(root: Path | str) -> list[dict]:
    return validate(storage.read_parquet(storage.join(str(root), "truth", "users")),
                    "truth_user").to_pylist()


def raw_lines(root: Path) -> dict[tuple[str, int], str]:
    """(shard name, 1-based line) -> the line as written."""
    lines = {}
    for shard in sorted((root / "posts").glob("*.jsonl")):
        for number, line in enumerate(shard.read_text(encoding="utf-8").splitlines(), 1):
            lines[(shard.name, number)] = line
    return lines


def non_dictionary_share(caption: str) -> float:
    """The paper's language test as the preprocessing applies it: hashtags, @names, emoji and
    numbers are not words; a post is non-English above 20%."""
    tokens = [t for t in caption.split() if not t.startswith(("#", "@")) and not EMOJI.search(t)]
    words = [w for w in re.sub(r"[!.,?:;]", " ", " ".join(tokens)).split() if not w.isdigit()]
    if not words:
        return 0.0
    return sum(not EN_US.check(w.lower()) for w in words) / len(words)


def test_vocabularies_pass_and_fail_the_en_us_dictionary():
    english = english_vocabulary()
    assert len(CATEGORIES) == 27 and len(english) > 500
    assert sorted(w for w in english if not EN_US.check(w)) == []
    assert sorted(w for w in FOREIGN_WORDS
                  if EN_US.check(w) or EN_US.check(w.capitalize())) == []
    for category in CATEGORIES:
        assert len(category.hashtags) == 10 and len(set(category.hashtags)) == 10


def test_length_distribution_has_the_asked_mean():
    for mean in (4.0, 7.5, 8.5, 12.0):
        values, cumulative = length_cum_weights(mean)
        weights = [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative, strict=True)]
        assert values[0] == 3 and values[-1] == 15
        assert sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights) \
            == pytest.approx(mean, abs=1e-3)


def _files(root: Path, folder: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / folder).rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first = write_archive(small_config(tmp_path / "a", broken_image_rate=0.1))
    write_archive(small_config(tmp_path / "b", broken_image_rate=0.1))
    write_archive(small_config(tmp_path / "c", seed=8, broken_image_rate=0.1))
    a_posts, b_posts = _files(tmp_path / "a", "posts"), _files(tmp_path / "b", "posts")
    a_images, b_images = _files(tmp_path / "a", "images"), _files(tmp_path / "b", "images")
    assert len(a_posts) >= 2 and a_posts == b_posts
    assert len(a_images) == first["images_written"] > 50 and a_images == b_images
    assert truth_posts(tmp_path / "a") == truth_posts(tmp_path / "b")
    assert truth_users(tmp_path / "a") == truth_users(tmp_path / "b")
    c_posts, c_images = _files(tmp_path / "c", "posts"), _files(tmp_path / "c", "images")
    assert c_posts != a_posts
    shared = set(a_images) & set(c_images)
    assert shared and all(a_images[k] != c_images[k] for k in list(shared)[:20])


def test_lengths_and_noise_match_the_knobs_and_the_files(tmp_path):
    rates = dict(
        non_english_rate=0.1, link_rate=0.08, short_caption_rate=0.06, long_caption_rate=0.06,
        short_hashtags_rate=0.07, long_hashtags_rate=0.05, mention_rate=0.1,
        zwj_emoji_rate=0.1, bare_hashtags_rate=0.1, broken_record_rate=0.05,
    )
    config = small_config(
        tmp_path, users=50, posts_median=60, posts_min=50, posts_max=80, posts_per_shard=1000,
        write_images=False, too_few_users_rate=0, too_many_users_rate=0, spammer_users_rate=0,
        **rates,
    )
    summary = write_archive(config)
    truth = truth_posts(tmp_path)
    assert summary["posts"] == len(truth) > 2500
    assert summary["images_written"] == 0 and not (tmp_path / "images").exists()

    # Every planted noise at the rate asked (binomial sd < 0.006 here).
    counts = Counter(code for row in truth for code in row["noise"])
    for code in ("non_english", "link", "short_caption", "long_caption", "short_hashtags",
                 "long_hashtags", "mention", "zwj_emoji", "bare_hashtags"):
        assert counts[code] / len(truth) == pytest.approx(rates[f"{code}_rate"], abs=0.025), code
    broken = Counter(row["broken_record"] for row in truth if row["broken_record"])
    assert sum(broken.values()) / len(truth) == pytest.approx(0.05, abs=0.015)
    assert set(broken) == {"invalid_json", "missing_field", "wrong_type"}

    # Paper Table 1: 8.55 words per caption and 7.45 hashtags per list, within 3..15.
    unbroken = [r for r in truth if not r["broken_record"]]
    plain_captions = [r["caption_words"] for r in unbroken
                      if not {"short_caption", "long_caption"} & set(r["noise"])]
    plain_tags = [r["hashtag_count"] for r in unbroken
                  if not {"short_hashtags", "long_hashtags"} & set(r["noise"])]
    assert sum(plain_captions) / len(plain_captions) == pytest.approx(8.5, abs=0.3)
    assert sum(plain_tags) / len(plain_tags) == pytest.approx(7.5, abs=0.3)
    assert min(plain_captions) >= 3 and max(plain_captions) <= 15
    assert min(plain_tags) >= 3 and max(plain_tags) <= 15

    # The files hold what the truth says.
    lines = raw_lines(tmp_path)
    assert len(lines) == len(truth)
    for row in unbroken:
        post = json.loads(lines[(row["shard"], row["line"])])
        assert (post["user_id"], post["post_id"]) == (row["user_id"], row["post_id"])
        caption, tags, noise = post["caption"], post["hashtags"], set(row["noise"])
        assert len(caption.split()) == row["caption_words"] and len(tags) == row["hashtag_count"]
        assert len(set(tags)) == len(tags)
        if "non_english" in noise:
            assert non_dictionary_share(caption) > 0.2, caption
        elif "link" not in noise:
            assert non_dictionary_share(caption) == 0.0, caption
        assert bool(LINK.search(caption)) == ("link" in noise), caption
        assert ("@" in caption) == ("mention" in noise), caption
        assert ("\u200d" in caption) == ("zwj_emoji" in noise), caption
        if "short_caption" in noise:
            assert row["caption_words"] < 3
        if "long_caption" in noise:
            assert row["caption_words"] > 15
        if "short_hashtags" in noise:
            assert row["hashtag_count"] < 3
        if "long_hashtags" in noise:
            assert row["hashtag_count"] > 15
        # bare_hashtags is only recorded where a tag lost its '#' (never on an empty list)
        assert bool(tags and not any(t.startswith("#") for t in tags)) == (
            "bare_hashtags" in noise), (tags, noise)
        assert post["created_at"].endswith("Z")
    for row in truth:
        if row["broken_record"] == "invalid_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(lines[(row["shard"], row["line"])])


def test_signature_hashtags_are_personal_and_frequent(tmp_path):
    # At 0.6 a signature tag is in most posts; the default is lower so that niche tags, which
    # new users share, weigh more than tags only one user writes.
    write_archive(small_config(tmp_path, users=12, write_images=False, signature_tag_rate=0.6,
                               **NO_NOISE))
    users = {row["user_id"]: row for row in truth_users(tmp_path)}
    tags_by_user: dict[str, set[str]] = defaultdict(set)
    posts_with_signature: Counter[str] = Counter()
    posts_per_user: Counter[str] = Counter()
    for line in raw_lines(tmp_path).values():
        post = json.loads(line)
        tags_by_user[post["user_id"]].update(post["hashtags"])
        posts_per_user[post["user_id"]] += 1
        signature = set(users[post["user_id"]]["signature_hashtags"])
        posts_with_signature[post["user_id"]] += bool(signature & set(post["hashtags"]))
    for user_id, row in users.items():
        assert 2 <= len(row["signature_hashtags"]) <= 4
        others = set().union(*(tags for uid, tags in tags_by_user.items() if uid != user_id))
        # Nobody else writes them; the user writes them in most posts.
        assert not set(row["signature_hashtags"]) & others
        assert posts_with_signature[user_id] / posts_per_user[user_id] > 0.6
        assert 1 <= len(row["favourite_categories"]) <= 3


def test_user_kinds_have_their_post_counts(tmp_path):
    config = small_config(
        tmp_path, users=30, seed=3, write_images=False, posts_median=100, posts_sigma=0.8,
        posts_min=75, posts_max=1000, posts_per_shard=5000, too_few_users_rate=0.2,
        too_many_users_rate=0.1, spammer_users_rate=0.2,
    )
    summary = write_archive(config)
    users = truth_users(tmp_path)
    kinds = Counter(u["kind"] for u in users)
    assert set(kinds) == {"regular", "too_few", "too_many", "spammer"}
    assert summary["users_by_kind"] == dict(sorted(kinds.items()))
    per_user = Counter(row["user_id"] for row in truth_posts(tmp_path))
    bad = Counter(
        row["user_id"] for row in truth_posts(tmp_path)
        if {"non_english", "link"} & set(row["noise"])
    )
    for user in users:
        n = per_user[user["user_id"]]
        assert n == user["n_posts"]
        if user["kind"] == "too_few":
            assert n < 50
        elif user["kind"] == "too_many":
            assert n > 1000
        else:
            assert 75 <= n <= 1000
        if user["kind"] == "spammer":
            # Enough non-English/advertising posts to trip max(15, 0.15 x posts).
            assert bad[user["user_id"]] > max(15, 0.15 * n)
        else:
            assert bad[user["user_id"]] <= max(15, 0.15 * n)


def test_images_are_jpegs_and_broken_ones_broken_as_planted(tmp_path):
    write_archive(small_config(tmp_path, broken_image_rate=0.25, image_size=24))
    truth = truth_posts(tmp_path)
    planted = Counter(row["broken_image"] for row in truth)
    assert {"zero_byte", "truncated", "not_jpeg", "missing"} <= set(planted)
    for row in truth:
        path = tmp_path / row["image"]
        kind = row["broken_image"]
        if kind == "missing":
            assert not path.exists()
            continue
        data = path.read_bytes()
        if kind is None:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                assert image.format == "JPEG" and image.size == (24, 24)
        elif kind == "zero_byte":
            assert data == b""
        else:
            with pytest.raises(OSError):
                with Image.open(io.BytesIO(data)) as image:
                    image.load()


def _peak_traced_bytes(config: SynthConfig) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        write_archive(config)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_as_the_archive_grows(tmp_path):
    base = small_config(tmp_path / "warm", users=2, posts_per_shard=50, image_threads=2)
    write_archive(base)  # fill the texture caches and import everything first
    small = _peak_traced_bytes(replace(base, out=str(tmp_path / "small"), users=3))
    large = _peak_traced_bytes(replace(base, out=str(tmp_path / "large"), users=15, seed=1))
    # Five times the posts, about the same peak: one shard and a bounded image queue at a time.
    assert large < 1.5 * small + 512 * 1024, (small, large)


def test_writes_an_archive_to_s3(s3_bucket):
    out = f"{s3_bucket}/archive"
    summary = write_archive(small_config(out, users=2, broken_record_rate=0.05,
                                         broken_image_rate=0.05))
    shards = storage.list_files(storage.join(out, "posts"), suffix=".jsonl")
    assert len(shards) == summary["shards"] >= 1
    images = storage.list_files(storage.join(out, "images"), suffix=".jpg")
    assert len(images) == summary["images_written"]
    assert summary["images_written"] == summary["posts"] - summary["broken_images"].get(
        "missing", 0)
    assert storage.read_json(storage.join(out, "truth", "summary.json"))["posts"] == \
        summary["posts"]
    posts, rejects = readers.read_all(out)
    assert len(posts) + len(rejects) == summary["posts"]
    assert len(rejects) == sum(summary["broken_records"].values())
    assert all(p["image"].startswith(f"{s3_bucket}/archive/images/") for p in posts)


def test_cli_refuses_to_mix_archives_and_bad_knobs(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--out", out, "--users", "2", "--posts-median", "25", "--posts-min", "20",
            "--posts-max", "30", "--image-size", "16", "--write-images", "false"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["users"] == 2 and printed["posts"] > 0 and printed["posts_per_second"] > 0
    assert main(args) == 2  # an archive is there already
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "true", "--seed", "5"]) == 0
    assert main(["--out", out, "--non-english-rate", "1.5", "--overwrite", "true"]) == 2
    assert "non_english_rate" in capsys.readouterr().err
    # refused before the archive there is deleted (it was deleted, then log(0) failed)
    assert main(["--out", out, "--posts-median", "0", "--overwrite", "true"]) == 2
    assert "posts_median > 0" in capsys.readouterr().err
    assert (tmp_path / "cli" / "truth").exists()
    assert main(["--users", "2"]) == 2  # no --out
    # --overwrite replaces an archive it wrote, never a folder of photos called images/.
    photos = tmp_path / "photos"
    (photos / "images" / "holiday").mkdir(parents=True)
    (photos / "images" / "holiday" / "me.jpg").write_bytes(b"\xff\xd8 mine")
    assert main(["--out", str(photos), "--users", "2", "--overwrite", "true"]) == 2
    assert "not an archive csmn synth wrote" in capsys.readouterr().err
    assert (photos / "images" / "holiday" / "me.jpg").exists()
    config_file = tmp_path / "synth.yaml"
    config_file.write_text(f"synth:\n  out: {out}\n  users: 1\n  posts_median: 25\n"
                           "  posts_min: 20\n  posts_max: 30\n  write_images: false\n"
                           "  overwrite: true\n")
    assert main(["--config", str(config_file)]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == 1


def test_read_back_records_in_equal_posts_plus_rejects(tmp_path):
    summary = write_archive(small_config(tmp_path, users=4, broken_record_rate=0.1,
                                         write_images=False))
    truth = {row["post_id"]: row for row in truth_posts(tmp_path)}
    posts, rejects = readers.read_all(str(tmp_path))
    assert len(posts) + len(rejects) == summary["posts"]
    assert {p["post_id"] for p in posts} == {
        pid for pid, row in truth.items() if not row["broken_record"]
    }
    expected = {"invalid_json": {"bad_json"}, "missing_field": {"missing_field"},
                "wrong_type": {"wrong_type"}}
    for reject in rejects:
        shard, line = reject["source"].rsplit(":", 1)
        row = next(r for r in truth.values()
                   if r["shard"] == os.path.basename(shard) and r["line"] == int(line))
        assert reason_code(reject["reason"]) in expected[row["broken_record"]], reject
    assert math.isclose(len(rejects), sum(summary["broken_records"].values()))


def _niche_config(out: Path, **overrides) -> SynthConfig:
    """Three categories (nine niches) and no noise: every niche has several members."""
    values = dict(users=36, categories=3, write_images=False, posts_per_shard=2000,
                  **NO_NOISE)
    values.update(overrides)
    return small_config(out, **values)


def _cosine(a: Counter, b: Counter) -> float:
    dot = sum(a[t] * b[t] for t in a.keys() & b.keys())
    norm = math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


def test_niche_members_share_its_pool_and_the_truth_says_which(tmp_path):
    write_archive(_niche_config(tmp_path))
    users = {row["user_id"]: row for row in truth_users(tmp_path)}
    pools = {n.name: set(n.hashtags) for n in NICHES}
    niche_of_tag = {tag: name for name, pool in pools.items() for tag in pool}
    truth = {row["post_id"]: row for row in truth_posts(tmp_path)}
    tags_by_user: dict[str, Counter[str]] = defaultdict(Counter)
    for line in raw_lines(tmp_path).values():
        post = json.loads(line)
        row, user = truth[post["post_id"]], users[post["user_id"]]
        # A post's niche tags all come from the niche its truth names, one of the user's own.
        from_niches = {niche_of_tag[t] for t in post["hashtags"] if t in niche_of_tag}
        assert from_niches <= ({row["niche"]} if row["niche"] else set()), (from_niches, row)
        if row["niche"]:
            assert row["niche"] in user["niches"]
        signature = set(user["signature_hashtags"])
        tags_by_user[post["user_id"]].update(t for t in post["hashtags"] if t not in signature)
    for row in users.values():
        assert 1 <= len(row["niches"]) <= 2
        assert set(row["niche_categories"]) <= set(row["favourite_categories"])
    same, across = [], []
    for a, b in itertools.combinations(sorted(users), 2):
        if users[a]["favourite_categories"][0] != users[b]["favourite_categories"][0]:
            continue
        shared = set(users[a]["niches"]) & set(users[b]["niches"])
        (same if shared else across).append(_cosine(tags_by_user[a], tags_by_user[b]))
    assert len(same) >= 10 and len(across) >= 10
    # Same category either way: what is shared beyond it is the niche's pool.
    assert sum(same) / len(same) > sum(across) / len(across) + 0.15, (same, across)


def test_images_tell_the_category_but_not_the_user_or_the_niche(tmp_path):
    write_archive(_niche_config(tmp_path, users=8, write_images=True, image_size=16,
                                image_threads=1))
    rows = truth_posts(tmp_path)
    pixels = np.stack([
        np.asarray(Image.open(tmp_path / row["image"]).convert("RGB"), dtype=np.float32).ravel()
        for row in rows
    ])
    distances = ((pixels[:, None, :] - pixels[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.argmin(1)
    same_category = same_user = same_niche = 0
    chance_user = chance_niche = 0.0
    for i, j in enumerate(nearest):
        me, other = rows[i], rows[j]
        if me["category"] != other["category"]:
            continue
        same_category += 1
        same_user += me["user_id"] == other["user_id"]
        same_niche += me["niche"] is not None and me["niche"] == other["niche"]
        # Chance: the share of the other posts of my category that are mine (of my niche).
        pool = [r for k, r in enumerate(rows) if k != i and r["category"] == me["category"]]
        chance_user += sum(r["user_id"] == me["user_id"] for r in pool) / len(pool)
        chance_niche += sum(me["niche"] is not None and r["niche"] == me["niche"]
                            for r in pool) / len(pool)
    assert same_category / len(rows) > 0.9
    assert same_user / same_category < chance_user / same_category + 0.1
    assert same_niche / same_category < chance_niche / same_category + 0.1


def test_niche_ceiling_tops_another_post_and_the_category_mode(tmp_path):
    write_archive(_niche_config(tmp_path, users=80))
    scores = reference_scores(str(tmp_path), train_fraction=0.7, test_posts=10**6,
                              max_test_share=1.0)
    assert scores["test_users"] >= 4 and scores["test_posts"] > 100
    assert 6 <= scores["tag_list_size"] <= 9
    ceiling = scores["niche_category_mode"]["f1"]
    assert ceiling > scores["another_post"]["f1"] + 0.02, scores
    assert ceiling > scores["category_mode"]["f1"] + 0.05, scores
    assert all(0.0 < scores[k]["f1"] < 1.0 for k in ("category_mode", "another_post"))
    assert "user_category_mode" not in scores  # a new user's own tags are never in training
    # Split by posts the user's own most frequent tags are learnable, and beat copying one post.
    by_posts = reference_scores(str(tmp_path), split="by_posts")
    assert by_posts["split"] == "by_posts" and by_posts["test_posts"] > 50
    assert by_posts["user_category_mode"]["f1"] > by_posts["another_post"]["f1"] + 0.02, by_posts
    with pytest.raises(ValueError, match="by_users or by_posts"):
        reference_scores(str(tmp_path), split="by_images")


def test_the_ceiling_spends_no_slot_on_another_users_signature_tags(tmp_path, monkeypatch):
    """Only its user writes a signature tag: for a new user it always misses. Counted in the
    niche's mode (a training user writes theirs often), it made the ceiling no ceiling."""
    from csmn.synth import truth

    # Many categories: few members per niche, so a member's own tags rank in its mode.
    write_archive(_niche_config(tmp_path, users=60, categories=27))
    options = dict(train_fraction=0.7, test_posts=10**6, max_test_share=1.0)
    ceiling = reference_scores(str(tmp_path), **options)["niche_category_mode"]["f1"]
    monkeypatch.setattr(truth, "_signature_tags", lambda archive: frozenset())
    counted = reference_scores(str(tmp_path), **options)["niche_category_mode"]["f1"]
    assert ceiling > counted + 0.01, (ceiling, counted)


def test_the_truth_still_reads_an_archive_whose_newest_posts_were_held_back(tmp_path):
    """The demo moves the newest posts out of the posts files (hold_back_newest) and leaves
    the truth tables as written: the truth's line numbers then point past moved lines, so
    its posts are found by their ids, and the held-back ones are no longer the archive's."""
    from csmn.synth import hold_back_newest
    from csmn.synth.truth import _clean_posts

    archive = tmp_path / "archive"
    write_archive(small_config(archive, users=6, write_images=False, broken_record_rate=0.1,
                               posts_per_shard=25))
    before = {(p.user_id, p.post_id): p for p in _clean_posts(str(archive))}
    later = str(tmp_path / "later.jsonl")
    assert hold_back_newest(str(archive), later, 0.3)
    held = {(r["user_id"], r["post_id"]) for r in map(json.loads, open(later))
            if isinstance(r.get("user_id"), str) and isinstance(r.get("post_id"), str)}
    after = {(p.user_id, p.post_id): p for p in _clean_posts(str(archive))}
    assert held & set(before) and set(after) == set(before) - held
    assert all(after[key] == before[key] for key in after)  # each with its own tags
