"""The preprocessing job end to end on a crafted JSONL archive, on a real local Ray.

The archive is small but holds one case of every rule: good users, a user with too many
non-English posts, a user over the (lowered) cap, a user with too few posts, ads, too short
and too long captions and hashtag lists, a duplicate post and broken records. Thresholds are
lowered so that a few posts per user are enough (min 4, max 8 posts, flagged limit 2).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import T0, TAGS, WORDS

from csmn.core.tokens import SPECIAL_TOKENS
from csmn.data import storage
from csmn.data.layout import BY_POSTS_SPLITS, BY_USERS_SPLITS
from csmn.data.rejects import count_rejects
from csmn.data.schemas import validate
from csmn.pipeline.preprocess import (
    LocalEngine,
    PreprocessConfig,
    RayEngine,
    load_manifest,
    main,
    preprocess,
)
from csmn.text.vocab import load_vocab

NON_ENGLISH = "das ist ein sehr schönes wetter heute morgen"
OVERRIDES = {
    "min_posts_per_user": 4, "max_posts_per_user": 8, "max_flagged_posts_min": 2,
    "context_size": 20, "post_vocab_size": 1000, "hashtag_vocab_size": 1000, "seed": 0,
}
N_GOOD = 19  # + the capped user = 20 users per task: 18 train, 1 val, 1 test


def _record(user: str, i: int, caption: str, hashtags: list[str]) -> dict:
    return {
        "user_id": user, "post_id": f"{user}-{i:02d}",
        "created_at": (T0 + timedelta(days=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image": f"images/{user}/{i:02d}.jpg", "caption": caption, "hashtags": hashtags,
    }


def _caption(u: int, i: int, n: int = 6) -> str:
    return " ".join(WORDS[(u * 7 + i * 3 + k) % len(WORDS)] for k in range(n)) + "!"


def _hashtags(u: int, i: int, user: str) -> list[str]:
    tags = [TAGS[(u + i + k) % len(TAGS)] for k in range(3)] + [f"#sig{user}"]
    if i == 0:
        tags.append(f"once{user}")  # this tag occurs in one post of the user only
    return tags


def write_archive(root: Path) -> dict:
    """Two JSONL sources; returns what the job must find."""
    lines: list[str] = []
    expected: Counter[str] = Counter()
    kept = Counter()

    def add(rec: dict) -> None:
        lines.append(json.dumps(rec, ensure_ascii=False))

    for u in range(N_GOOD):
        user = f"g{u:02d}"
        for i in range(6):
            add(_record(user, i, _caption(u, i), _hashtags(u, i, user)))
        kept["post"] += 6
        kept["hashtag"] += 6
    add(_record("g00", 10, "shop the look at https://example.com/sale now", TAGS[:4]))
    expected["advertisement"] += 1
    add(_record("g01", 10, NON_ENGLISH, TAGS[:4]))
    expected["non_english"] += 1
    add(_record("g02", 10, "so happy", TAGS[:4] + ["#sigg02"]))  # caption too short
    expected["post_too_short"] += 1
    kept["hashtag"] += 1
    add(_record("g03", 10, _caption(3, 10), [f"#t{k}" for k in range(16)]))
    expected["hashtag_too_long"] += 1
    kept["post"] += 1
    add(_record("g04", 10, _caption(4, 10, n=17), TAGS[:2]))
    expected["post_too_long"] += 1
    expected["hashtag_too_short"] += 1
    lines.append(lines[6 * 5 + 1])  # g05's second post again: a duplicate
    expected["duplicate_post"] += 1

    for i in range(6):  # 3 of 6 flagged > max(2, 0.15 x 6): the user loses everything
        caption = NON_ENGLISH if i < 3 else _caption(40, i)
        add(_record("bad", i, caption, TAGS[:4]))
    expected["non_english"] += 3
    expected["bad_user"] += 3
    for i in range(11):
        add(_record("cap", i, _caption(50, i), _hashtags(50, i, "cap")))
    kept["post"] += 8
    kept["hashtag"] += 8
    expected["post_over_user_cap"] += 3
    expected["hashtag_over_user_cap"] += 3
    for i in range(3):
        add(_record("few", i, _caption(60, i), TAGS[:4]))
    expected["post_too_few_user_posts"] += 3
    expected["hashtag_too_few_user_posts"] += 3

    lines.append('{"user_id": "g00", "post_id": broken json')
    lines.append(json.dumps({"user_id": "g00", "post_id": "noimage", "caption": "a b c",
                             "hashtags": [], "created_at": None}))
    lines.append(json.dumps(_record("   ", 1, _caption(1, 1), TAGS[:4])))
    expected["rejected"] += 4  # broken json, missing image, blank user id, duplicate

    posts = root / "posts"
    posts.mkdir(parents=True)
    half = len(lines) // 2
    (posts / "part-00000.jsonl").write_text("\n".join(lines[:half]) + "\n")
    (posts / "part-00001.jsonl").write_text("\n".join(lines[half:]) + "\n")
    return {"records": len(lines), "rules": expected, "kept": kept}


def read_examples(root: str, task: str, split: str) -> pa.Table:
    table = validate(storage.read_parquet(storage.join(root, "examples", task, split)),
                     "example")
    return table.sort_by([("user_id", "ascending"), ("post_id", "ascending")])


def snapshot(root: str) -> dict[str, list[dict]]:
    out = {}
    for task, splits in (("post", BY_USERS_SPLITS),
                         ("hashtag", BY_USERS_SPLITS + BY_POSTS_SPLITS)):
        for split in splits:
            out[f"{task}/{split}"] = read_examples(root, task, split).to_pylist()
    return out


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory):
    """One Ray run through the CLI entry point; its outputs read back once."""
    base = tmp_path_factory.mktemp("preprocess")
    archive = base / "archive"
    expected = write_archive(archive)
    root = str(base / "root")
    argv = ["--archive", str(archive), "--out", root]
    for name, value in OVERRIDES.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    return {"archive": str(archive), "root": root, "expected": expected,
            "manifest": load_manifest(root), "examples": snapshot(root), "base": base}


def test_records_in_equal_kept_plus_filtered_plus_rejected(job):
    manifest, expected = job["manifest"], job["expected"]
    assert manifest["records"]["in"] == expected["records"]
    rejected = sum(manifest["records"]["rejected"].values())
    assert rejected == expected["rules"]["rejected"]
    for task in ("post", "hashtag"):
        kept = sum(len(job["examples"][f"{task}/{s}"]) for s in BY_USERS_SPLITS)
        filtered = sum(manifest["filtered"][task].values())
        assert kept == manifest["stats"][task]["posts"] == expected["kept"][task]
        assert expected["records"] == kept + filtered + rejected
        assert manifest["balance"][task]["balanced"]
        assert manifest["steps"][task][-1]["posts"] == kept


def test_each_rule_counted(job):
    filtered, rules = job["manifest"]["filtered"], job["expected"]["rules"]
    for task in ("post", "hashtag"):
        for rule in ("non_english", "advertisement", "bad_user"):
            assert filtered[task][rule] == rules[rule], (task, rule)
        for rule in ("too_short", "too_long", "over_user_cap", "too_few_user_posts"):
            assert filtered[task][rule] == rules[f"{task}_{rule}"], (task, rule)
    kept_users = {r["user_id"] for r in job["examples"]["post/train"]}
    assert "bad" not in kept_users and "few" not in kept_users


def test_rejects_have_reasons(job):
    root = job["root"]
    read = count_rejects(root, "read")
    pre = count_rejects(root, "preprocess")
    assert pre["duplicate_post"] == 1
    assert sum(read.values()) + sum(pre.values()) == job["expected"]["rules"]["rejected"]
    assert {"read": dict(read), "preprocess": dict(pre)} == job["manifest"]["rejects"]
    for stage in ("read", "preprocess"):
        table = validate(storage.read_parquet(storage.join(root, "rejects", stage)), "reject")
        assert all(":" in reason for reason in table.column("reason").to_pylist())


def test_outputs_validate_and_follow_the_contract(job):
    root, manifest = job["root"], job["manifest"]
    for name, rows in job["examples"].items():
        task, split = name.split("/")
        vocab = load_vocab(root, task, split)
        name = "hashtag_by_posts" if split.endswith("_by_posts") else task
        assert manifest["vocab_by_split"][task][split] == f"vocab/{name}.json"
        for row in rows:
            assert 2 <= len(row["token_ids"]) <= 16 and row["token_ids"][-1] == 2
            assert vocab.decode(row["token_ids"]) == [
                t if t in vocab else "_UNK" for t in row["text"].split()]
            assert row["context_ids"] == [vocab.id_of(w) for w in row["context_words"]]
            assert len(row["context_words"]) <= manifest["context_size"] == 20
            assert row["image"].startswith("/") and row["image"].endswith(".jpg")
    for task in ("post", "hashtag"):
        contexts = validate(storage.read_parquet(
            storage.join(root, "contexts", f"{task}.parquet")), "user_context")
        assert contexts.num_rows == manifest["stats"][task]["users"] == 20
    hashtag_row = job["examples"]["hashtag/train"][0]
    assert all(t.startswith("#") for t in hashtag_row["text"].split())
    stats = manifest["stats"]["post"]
    assert stats["words_per_post"] == {"mean": 6.0, "median": 6.0}  # see _caption
    assert set(stats["posts_per_user"]) == {"mean", "median"}


def test_splits_by_users_are_disjoint(job):
    for task in ("post", "hashtag"):
        users = {s: {r["user_id"] for r in job["examples"][f"{task}/{s}"]}
                 for s in BY_USERS_SPLITS}
        assert not users["train"] & users["test"]
        assert not users["train"] & users["val"] and not users["val"] & users["test"]
        assert (len(users["train"]), len(users["val"]), len(users["test"])) == (18, 1, 1)
        assert job["manifest"]["splits"][task]["train"]["users"] == 18


def test_split_by_posts_puts_every_user_in_train_and_test(job):
    ex = job["examples"]
    train = {r["user_id"] for r in ex["hashtag/train_by_posts"]}
    test = {r["user_id"] for r in ex["hashtag/test_by_posts"]}
    all_users = {r["user_id"] for s in BY_USERS_SPLITS for r in ex[f"hashtag/{s}"]}
    assert train == test == all_users
    by_posts = [r["post_id"] for s in BY_POSTS_SPLITS for r in ex[f"hashtag/{s}"]]
    by_users = [r["post_id"] for s in BY_USERS_SPLITS for r in ex[f"hashtag/{s}"]]
    assert sorted(by_posts) == sorted(by_users) and len(set(by_posts)) == len(by_posts)


def test_vocabulary_from_training_split_only(job):
    root, ex = job["root"], job["examples"]
    for task in ("post", "hashtag"):
        vocab = load_vocab(root, task)
        assert vocab.tokens[:4] == list(SPECIAL_TOKENS)
        counts = Counter(t for r in ex[f"{task}/train"] for t in r["text"].split())
        assert vocab.tokens[4:] == sorted(counts, key=lambda t: (-counts[t], t))
    heldout = {r["user_id"] for s in ("val", "test") for r in ex[f"hashtag/{s}"]}
    vocab = load_vocab(root, "hashtag")
    by_posts_vocab = load_vocab(root, "hashtag", "train_by_posts")
    for user in heldout:  # their signature tags are never seen in training (by users)
        assert f"#sig{user}" not in vocab and f"#sig{user}" in by_posts_vocab


def test_user_contexts_split_by_posts_come_from_training_posts_only(job):
    """The 1NN baselines match a test post's context against the training users' contexts;
    split by posts those users are the test users, so their contexts must not hold the
    test posts' words (contexts/hashtag.parquet, from all kept posts, does)."""
    root, ex, manifest = job["root"], job["examples"], job["manifest"]
    assert manifest["contexts"]["hashtag_by_posts"] == {
        "path": "contexts/hashtag_by_posts.parquet", "users": 20}
    contexts = validate(storage.read_parquet(
        storage.join(root, "contexts", "hashtag_by_posts.parquet")), "user_context")
    trained: dict[str, set[str]] = {}
    for row in ex["hashtag/train_by_posts"]:
        trained.setdefault(row["user_id"], set()).update(row["text"].split())
    held_out = Counter(t for s in ("val_by_posts", "test_by_posts")
                       for r in ex[f"hashtag/{s}"] for t in r["text"].split())
    only_held_out = 0
    for user, words in zip(contexts.column("user_id").to_pylist(),
                           contexts.column("context_words").to_pylist(), strict=True):
        assert words and set(words) <= trained[user], user
        only_held_out += sum(1 for t in held_out if t not in trained[user] and t.endswith(user))
    assert only_held_out  # there were test-only words to leak (#onceg07 and the like)


def test_context_is_leak_free(job):
    for split in ("train", "train_by_posts"):
        rows = [r for r in job["examples"][f"hashtag/{split}"] if r["user_id"] == "g07"]
        once = "#onceg07"
        with_once = [r for r in rows if once in r["text"].split()]
        others = [r for r in rows if once not in r["text"].split()]
        if split == "train_by_posts" and not with_once:
            continue  # that post went to the held-out posts of the user
        assert len(with_once) == 1 and others
        assert once not in with_once[0]["context_words"]
        assert all(once in r["context_words"] for r in others), split
        assert all("#sigg07" in r["context_words"] for r in rows)


def test_local_engine_gives_the_same_outputs(job):
    """The same functions in a plain loop: identical examples (nothing depends on how Ray
    partitions the data)."""
    root = str(job["base"] / "local")
    config = PreprocessConfig(**OVERRIDES)
    manifest = preprocess(job["archive"], root, config, engine="local")
    assert snapshot(root) == job["examples"]
    for key in ("records", "filtered", "splits", "vocab_sizes", "rejects", "stats"):
        assert manifest[key] == job["manifest"][key], key


def test_rerun_replaces_outputs(job):
    root = str(job["base"] / "rerun")
    config = PreprocessConfig(**OVERRIDES)
    preprocess(job["archive"], root, config, engine="local")
    stale = Path(root) / "examples" / "post" / "train" / "part-stale.parquet"
    storage.write_parquet(str(stale), pa.table({"x": [1]}))
    keep = Path(root) / "features" / "pool5" / "_meta.json"
    storage.write_json(str(keep), {"weights": "other stage"})
    manifest = preprocess(job["archive"], root, config, engine="local")
    assert not stale.exists() and keep.exists()
    assert snapshot(root) == job["examples"]
    assert len(storage.list_files(storage.join(root, "rejects", "preprocess"))) == len(
        storage.list_files(storage.join(job["root"], "rejects", "preprocess")))
    assert manifest["records"] == job["manifest"]["records"]


def test_bad_arguments_fail_clearly(job, tmp_path, capsys):
    assert main(["--archive", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--engine", "local"]) == 1
    assert "csmn preprocess: " in capsys.readouterr().err
    assert main(["--archive", job["archive"], "--out", str(tmp_path / "o"),
                 "--train-user-fraction", "1.5"]) == 2


def test_writes_to_s3(job, s3_bucket):
    """The data root may be an S3 prefix (moto server on 127.0.0.1); reruns replace it."""
    root = f"{s3_bucket}/data"
    config = PreprocessConfig(**OVERRIDES)
    for _ in range(2):
        manifest = preprocess(job["archive"], root, config, engine="local")
    assert snapshot(root) == job["examples"]
    assert load_manifest(root)["records"] == manifest["records"] == job["manifest"]["records"]
    assert count_rejects(root, "preprocess")["duplicate_post"] == 1


def test_synthetic_archive_end_to_end(ray_session, tmp_path):
    """csmn.synth.archive plants each kind of noise and says where: every planted non-English or
    link post is filtered, every broken record rejected, the rest balances."""
    from csmn.synth import SynthConfig
    from csmn.synth import write_archive as write_synth

    archive = str(tmp_path / "synth")
    summary = write_synth(SynthConfig(out=archive, users=12, seed=5, write_images=False,
                                      posts_per_shard=500))
    root = str(tmp_path / "root")
    manifest = preprocess(archive, root, PreprocessConfig(context_size=60))
    assert manifest["records"]["in"] == summary["posts"]
    assert manifest["records"]["rejected"]["read"] == sum(summary["broken_records"].values())
    truth = storage.read_parquet(storage.join(archive, "truth", "posts")).to_pylist()
    noise = {t["post_id"]: set(t["noise"]) for t in truth}
    for task in ("post", "hashtag"):
        assert manifest["balance"][task]["balanced"]
        rows = [r for s in BY_USERS_SPLITS for r in read_examples(root, task, s).to_pylist()]
        assert len(rows) == manifest["stats"][task]["posts"] > 0
        assert not [r for r in rows if noise[r["post_id"]] & {"non_english", "link"}]
        assert all(3 <= len(r["text"].split()) <= 15 for r in rows)
    planted = sum(1 for n in noise.values() if "non_english" in n)
    assert manifest["filtered"]["post"]["non_english"] <= planted
    words = manifest["stats"]["post"]["words_per_post"]["mean"]
    tags = manifest["stats"]["hashtag"]["words_per_post"]["mean"]
    assert 7.0 < words < 10.0 and 6.0 < tags < 9.0  # paper Table 1: 8.55 and 7.45


def test_parsing_runs_in_as_many_tasks_as_the_groupby_has_partitions(ray_session, tmp_path):
    """Ray Data's sort-based groupby ignores num_partitions and cuts each of its N input
    blocks into N pieces: with one parsing task (one block) per source, a 345-file archive
    made 119K objects for the driver to own (1.6 GB of driver RSS at 3.4M posts). Parsed in
    one task per partition, the groupby gets a few blocks whatever the number of files, and
    every user is still summarized once."""
    from csmn.data import readers
    from csmn.synth import SynthConfig
    from csmn.synth import write_archive as write_synth

    archive = str(tmp_path / "synth")
    summary = write_synth(SynthConfig(out=archive, users=12, seed=5, write_images=False,
                                      posts_per_shard=100))
    sources = readers.list_sources(archive)
    engine = RayEngine(PreprocessConfig(context_size=60))
    partitions = engine._partitions(sources)
    assert len(sources) > 2 * partitions, (len(sources), partitions)  # many files per task
    users = engine.summarize_users(sources, archive, str(tmp_path / "root"))
    assert engine.users.num_blocks() <= partitions
    assert engine.records_in() == summary["posts"]
    local = LocalEngine(engine.config).summarize_users(sources, archive, str(tmp_path / "local"))
    by_user = {u["user_id"]: u for u in local}
    assert len(users) == len(by_user) == summary["users"]
    assert all(u == by_user[u["user_id"]] for u in users)  # the same counts, user by user


def test_yaml_config_section_and_flags(job, tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("preprocess:\n" + "".join(
        f"  {k}: {v}\n" for k, v in {**OVERRIDES, "context_size": 5}.items()))
    root = str(tmp_path / "root")
    argv = ["--archive", job["archive"], "--out", root, "--config", str(config_file),
            "--engine", "local", "--seed", "7"]
    assert main(argv) == 0
    manifest = load_manifest(root)
    assert manifest["config"]["context_size"] == manifest["context_size"] == 5
    assert manifest["config"]["seed"] == 7 and manifest["config"]["min_posts_per_user"] == 4
    rows = read_examples(root, "hashtag", "train").to_pylist()
    assert max(len(r["context_ids"]) for r in rows) == 5


def test_records_a_reader_lets_through_are_rejected_with_a_reason():
    from csmn.pipeline.preprocess import features_table

    good = {"user_id": "u", "post_id": "p1", "created_at": T0, "image": "/a/1.jpg",
            "caption": "a lovely day at the beach", "hashtags": ["Beach", "#sun"]}
    posts = [good, {**good, "post_id": "p2", "image": "   "},
             {**good, "post_id": "p3", "hashtags": "not a list"},
             {**good, "post_id": 4}]
    table, rejects = features_table(posts, "src.jsonl", 0.2)
    assert table.column("post_id").to_pylist() == ["p1"]
    assert table.column("hashtag_tokens").to_pylist() == [["#beach", "#sun"]]
    assert [(r["stage"], r["record_id"], r["reason"].split(":")[0]) for r in rejects] == [
        ("preprocess", "p2", "empty_field"), ("preprocess", "p3", "bad_record"),
        ("preprocess", "4", "bad_record")]
    assert all(r["source"] == "src.jsonl" and r["payload"] for r in rejects)


@pytest.mark.parametrize("seed", range(3))
def test_vocabulary_candidates_cut_in_any_batches_give_the_same_vocabularies(seed):
    """The engines sum the partial statistics of the batches of users (Ray: per partition of
    a hash of the token) and cut each batch of sums to each vocabulary's best rows: the
    vocabularies and the document frequencies of their words are those of all rows."""
    import random

    from csmn.pipeline.preprocess import (
        TOKEN_STATS_SCHEMA,
        partition_candidates,
        sum_token_stats,
        vocab_candidates,
        with_stats_partition,
    )
    from csmn.text.vocab import Vocabulary

    rng = random.Random(seed)
    partial = [{"vocab": name, "token": f"t{rng.randrange(400)}",
                "count": rng.choice((0, 1, 1, 2, 5)), "df": rng.randint(0, 2)}
               for name in ("post", "hashtag") for _ in range(900)]
    partial += [{"vocab": "post", "token": "_UNK", "count": 99, "df": 9}]
    rng.shuffle(partial)
    totals = sum_token_stats(pa.Table.from_pylist(partial, schema=TOKEN_STATS_SCHEMA))
    rows = totals.to_pylist()
    assert len({(r["vocab"], r["token"]) for r in rows}) == len(rows)
    sizes = {"post": 40, "hashtag": 130}
    cut_at = sorted(rng.sample(range(1, len(rows)), 4))
    batches = [rows[a:b] for a, b in zip([0, *cut_at], [*cut_at, len(rows)], strict=True)]
    by_batches = [r for b in batches
                  for r in vocab_candidates(pa.Table.from_pylist(b, schema=TOKEN_STATS_SCHEMA),
                                            sizes).to_pylist()]
    keyed = with_stats_partition(pa.Table.from_pylist(partial, schema=TOKEN_STATS_SCHEMA), 3)
    by_partitions = [
        r for k in range(3) for r in partition_candidates(
            keyed.filter(pc.equal(keyed.column("partition"), k)), sizes).to_pylist()]
    for name, size in sizes.items():
        everything = Counter(), Counter()
        for r in partial:
            if r["vocab"] == name:
                everything[0][r["token"]] += r["count"]
                everything[1][r["token"]] += r["df"]
        expected = Vocabulary.from_counts(everything[0], size)
        for kept in (by_batches, by_partitions):
            candidates = {r["token"]: r for r in kept if r["vocab"] == name}
            got = Vocabulary.from_counts({t: r["count"] for t, r in candidates.items()}, size)
            assert got.tokens == expected.tokens and len(got) == size
            assert all(candidates[t]["df"] == everything[1][t] for t in got.tokens[4:])
    assert vocab_candidates(TOKEN_STATS_SCHEMA.empty_table(), sizes).num_rows == 0


def test_which_duplicate_is_kept_does_not_depend_on_the_row_order(tmp_path):
    """Two records of one post that differ only where the tokens cannot show it (a link is
    removed before tokenizing): the same one is kept, whichever comes first."""
    from datetime import UTC, datetime

    from csmn.data.rejects import read_rejects
    from csmn.pipeline.preprocess import FEATURE_SCHEMA, summarize_user
    from csmn.text.filters import FilterThresholds

    base = {"user_id": "u", "created_at": datetime(2015, 6, 1, tzinfo=UTC), "image": "i.jpg",
            "post_tokens": ["great", "day", "at", "the", "beach"], "hashtag_tokens": ["#sun"],
            "non_english": False, "advertisement": False, "source": "s.jsonl"}
    others = [{**base, "post_id": f"p{i}", "image": f"{i}.jpg"} for i in range(3)]
    plain = {**base, "post_id": "dup"}
    with_link = {**plain, "advertisement": True}
    thresholds = FilterThresholds(min_posts_per_user=1)
    results = []
    for order, first in (("plain first", [plain, with_link]), ("link first", [with_link, plain])):
        root = str(tmp_path / order.replace(" ", "-"))
        table = pa.Table.from_pylist([*others, *first], schema=FEATURE_SCHEMA)
        summary = summarize_user(table, thresholds, root).to_pylist()[0]
        rejects = read_rejects(root, "preprocess")
        assert len(rejects) == 1 and summary["duplicates"] == 1
        results.append((summary, json.loads(rejects[0]["payload"]), rejects[0]["reason"]))
    assert results[0] == results[1]
