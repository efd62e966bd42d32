"""Reference hashtag predictors computed from an archive's truth tables.

They say what the archive lets a model learn, to print beside the results of Table 3:

- ``category_mode``: the most frequent tags of the post's category among the training users'
  posts. All an image-only model (CSMN-NoUC, 1NN-Im) can know: images tell the category only.
- ``niche_category_mode``: the most frequent tags, among the training users' posts, of the
  post's category and of the user's niche(s) inside it (or, when none sits there, of the
  category's posts outside any niche). The learnable ceiling for a new user, split by users
  (section 5.1): the user's context can tell the niche, but signature tags unique to the user
  are never in the training vocabulary and a member's own preferences over the niche's pool
  are unknown. Split by users, both modes leave out the training users' signature tags,
  which a new user never writes.
- ``another_post``: the tags of another post of the same user in the same category. The best
  1NN-UsrIm (section 5.2) can do: it copies one post of the nearest user, and no user is nearer
  than the user themselves.

All are scored with the project's hashtag F1 on the test posts of the split by users (or by
posts, where ``user_category_mode``, the user's own most frequent tags in the category, is
the ceiling). :func:`reference_scores` makes the splits itself from the clean posts of regular
users (section 3.1), the archive alone; :func:`reference_scores_on_root` takes the training and
test posts of a preprocessed data root and scores against their normalized hashtags, the very
posts and truths the evaluation scores a model on (the filters keep some noisy posts, and a
user's split by posts depends on all the posts kept, so the two differ).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from csmn.data import layout, storage
from csmn.data.layout import HASHTAG, SPLIT_FAMILIES, TEST, TEST_BY_POSTS, TRAIN, TRAIN_BY_POSTS
from csmn.eval.metrics import hashtag_set, score_hashtags
from csmn.text.splits import by_posts_fractions, split_user_posts, split_users, unit_hash


@dataclass
class _Post:
    user_id: str
    post_id: str
    category: str
    niche: str | None
    tags: frozenset[str]


def _clean_posts(archive_uri: str) -> list[_Post]:
    """The posts every filter keeps: of regular users, no planted noise, readable image."""
    users = storage.read_parquet(storage.join(archive_uri, "truth", "users"),
                                 columns=["user_id", "kind"]).to_pylist()
    regular = {u["user_id"] for u in users if u["kind"] == "regular"}
    truth = storage.read_parquet(
        storage.join(archive_uri, "truth", "posts"),
        columns=["user_id", "post_id", "shard", "line", "category", "niche", "noise",
                 "broken_record", "broken_image"],
    ).to_pylist()
    wanted: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in truth:
        if (row["user_id"] in regular and not row["noise"] and not row["broken_record"]
                and not row["broken_image"]):
            wanted[row["shard"]].append(row)
    posts = []
    for shard, rows in sorted(wanted.items()):
        lines = storage.read_text(storage.join(archive_uri, "posts", shard)).splitlines()
        moved: dict[tuple[str, str], dict[str, Any]] | None = None
        for row in rows:
            # Clean posts are whole JSON records; the broken ones are never read.
            key = (row["user_id"], row["post_id"])
            record = _record(lines[row["line"] - 1]) if row["line"] <= len(lines) else None
            if record is None or (record.get("user_id"), record.get("post_id")) != key:
                # The file was rewritten since (hold_back_newest moves the newest posts out
                # of it): the post is looked up by its ids, and one no longer there skipped.
                moved = _records_by_key(lines) if moved is None else moved
                record = moved.get(key)
                if record is None:
                    continue
            posts.append(_Post(row["user_id"], row["post_id"], row["category"], row["niche"],
                               frozenset(hashtag_set(record["hashtags"]))))
    return posts


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _records_by_key(lines: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(user, post): record} of the JSON lines that are records (the first of a repeat)."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for record in filter(None, map(_record, lines)):
        key = (record.get("user_id"), record.get("post_id"))
        if all(isinstance(part, str) for part in key):  # broken records hold other types
            records.setdefault(key, record)
    return records


def _count(posts: Iterable[_Post]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for post in posts:
        counts.update(post.tags)
    return counts


def _top(counts: Counter[str], k: int) -> list[str]:
    # Ties broken by the tag itself, so the predictor is deterministic.
    return [tag for tag, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]]


def _user_niches(archive_uri: str) -> dict[str, dict[str, list[str]]]:
    """{user: {category: the user's niches inside it}} from truth/users."""
    rows = storage.read_parquet(storage.join(archive_uri, "truth", "users"),
                                columns=["user_id", "niches", "niche_categories"]).to_pylist()
    out: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        by_category: dict[str, list[str]] = defaultdict(list)
        for niche, category in zip(row["niches"], row["niche_categories"], strict=True):
            by_category[category].append(niche)
        out[row["user_id"]] = dict(by_category)
    return out


def _without(counts: Counter[str], tags: frozenset[str]) -> Counter[str]:
    return Counter({tag: n for tag, n in counts.items() if tag not in tags})


def _signature_tags(archive_uri: str) -> frozenset[str]:
    """Every user's signature hashtags (truth/users), as the data root spells hashtags."""
    rows = storage.read_parquet(storage.join(archive_uri, "truth", "users"),
                                columns=["signature_hashtags"]).to_pylist()
    return frozenset(hashtag_set([t for row in rows for t in row["signature_hashtags"] or []]))


def _another_post(own: Sequence[_Post], same: Sequence[_Post], me: _Post, seed: int
                  ) -> frozenset[str]:
    """The tags of one other post of the same user (``own``), of the same category (``same``)
    when there is one, picked by a seeded hash: images within a category are alike."""
    same = [p for p in same if p.post_id != me.post_id] or [
        p for p in own if p.post_id != me.post_id]
    if not same:
        return frozenset()
    pick = min(same, key=lambda p: (unit_hash(seed, "another", me.post_id, p.post_id), p.post_id))
    return pick.tags


def _scores(truths: Iterable[frozenset[str]], predictions: Iterable[Iterable[str]]):
    scores = score_hashtags([sorted(t) for t in truths], [sorted(p) for p in predictions])
    return {"precision": round(scores.precision, 4), "recall": round(scores.recall, 4),
            "f1": round(scores.f1, 4)}


def _split(
    posts: Sequence[_Post], split: str, seed: int, train_fraction: float, test_posts: int,
    max_test_share: float,
) -> tuple[list[_Post], list[_Post]]:
    """(training posts, test posts) as the preprocessing splits them (section 5.1)."""
    counts = Counter(p.user_id for p in posts)
    if split == "by_users":
        users = split_users(counts, seed, train_fraction, test_posts, max_test_share)
        return ([p for p in posts if users[p.user_id] == TRAIN],
                [p for p in posts if users[p.user_id] == TEST])
    if split != "by_posts":
        raise ValueError(f"split must be by_users or by_posts, got {split!r}")
    test_fraction, val_fraction = by_posts_fractions(
        len(posts), train_fraction, test_posts, max_test_share)
    ids_of: dict[str, list[str]] = defaultdict(list)
    for post in posts:
        ids_of[post.user_id].append(post.post_id)
    where = {}
    for user_id, ids in ids_of.items():
        where.update(split_user_posts(user_id, ids, seed, test_fraction, val_fraction))
    return ([p for p in posts if where[p.post_id] == TRAIN_BY_POSTS],
            [p for p in posts if where[p.post_id] == TEST_BY_POSTS])


def _group(posts: Iterable[_Post], key) -> dict[Any, list[_Post]]:
    groups: dict[Any, list[_Post]] = defaultdict(list)
    for post in posts:
        groups[key(post)].append(post)
    return groups


def reference_scores(
    archive_uri: str,
    split: str = "by_users",
    seed: int = 0,
    train_fraction: float = 0.9,
    test_posts: int = 5000,
    max_test_share: float = 0.5,
) -> dict[str, Any]:
    """Hashtag precision, recall and F1 of the reference predictors on the test posts of
    ``split`` (``by_users`` or ``by_posts``; the split arguments are the preprocessing's, to
    pick the same users and posts).

    Returns ``{"split", "test_posts", "test_users", "tag_list_size", "category_mode",
    "niche_category_mode", "another_post"}`` and, split by posts, ``"user_category_mode"``
    (the user's own most frequent tags in the category: what a model that knows the user can
    learn); each predictor a dict of precision/recall/f1. Split by users, ``another_post``
    copies another held-out post of the same user; split by posts, one of the user's
    training posts, as 1NN-UsrIm does."""
    posts = _clean_posts(archive_uri)
    train, test = _split(posts, split, seed, train_fraction, test_posts, max_test_share)
    return _reference(archive_uri, train, test, split, seed)


def _truth_of_posts(archive_uri: str) -> dict[str, tuple[str, str | None]]:
    rows = storage.read_parquet(storage.join(archive_uri, "truth", "posts"),
                                columns=["post_id", "category", "niche"]).to_pylist()
    return {r["post_id"]: (r["category"], r["niche"]) for r in rows}


def _root_posts(data_root: str, split: str, truth: dict[str, tuple[str, str | None]]
                ) -> list[_Post]:
    table = storage.read_parquet(layout.examples_dir(data_root, HASHTAG, split),
                                 columns=["user_id", "post_id", "text"])
    posts = []
    for row in table.to_pylist():
        if row["post_id"] not in truth:
            raise ValueError(f"{data_root}: post {row['post_id']!r} of {split} is not in the "
                             "archive's truth tables: not the archive this root came from")
        category, niche = truth[row["post_id"]]
        posts.append(_Post(row["user_id"], row["post_id"], category, niche,
                           frozenset(hashtag_set(row["text"]))))
    return posts


def reference_scores_on_root(archive_uri: str, data_root: str, split: str = "by_users",
                             seed: int = 0) -> dict[str, Any]:
    """The reference predictors of :func:`reference_scores`, learned from the training posts
    of a data root preprocessed from ``archive_uri`` and scored on its test posts (split
    family ``by_users`` or ``by_posts``) against their hashtags as the data root wrote them:
    the posts and truths the evaluation scores a model on. Categories and niches come from
    the truth tables, by post id."""
    if split not in SPLIT_FAMILIES:
        raise ValueError(f"split must be by_users or by_posts, got {split!r}")
    train_split, _, test_split = SPLIT_FAMILIES[split]
    truth = _truth_of_posts(archive_uri)
    train, test = (_root_posts(data_root, name, truth) for name in (train_split, test_split))
    return _reference(archive_uri, train, test, split, seed)


def _reference(archive_uri: str, train: list[_Post], test: list[_Post], split: str,
               seed: int) -> dict[str, Any]:
    if not train or not test:
        raise ValueError(f"{archive_uri}: too few clean posts for a split {split}")
    sizes = sorted(len(p.tags) for p in train)
    k = sizes[len(sizes) // 2]  # a typical tag list: the median length

    niches_of = _user_niches(archive_uri)
    by_category = {c: _count(ps) for c, ps in _group(train, lambda p: p.category).items()}
    by_niche = {key: _count(ps) for key, ps in
                _group(train, lambda p: (p.category, p.niche)).items()}
    other_user = split == "by_users"
    if other_user:
        # A new user never writes a training user's signature tags (only that user does):
        # counted in the modes, they would fill slots that always miss, and the ceiling
        # would sit below what a model of the niches can reach.
        signatures = _signature_tags(archive_uri)
        by_category = {key: _without(counts, signatures) for key, counts in by_category.items()}
        by_niche = {key: _without(counts, signatures) for key, counts in by_niche.items()}
    copy_from = _group(test if other_user else train, lambda p: p.user_id)
    copy_same = _group(test if other_user else train, lambda p: (p.user_id, p.category))
    own_mode = {key: _count(ps) for key, ps in
                _group(train, lambda p: (p.user_id, p.category)).items()}

    predictions: dict[str, list[list[str] | frozenset[str]]] = defaultdict(list)
    truths = []
    for post in sorted(test, key=lambda p: p.post_id):
        truths.append(post.tags)
        category = by_category.get(post.category, Counter())
        predictions["category_mode"].append(_top(category, k))
        pool: Counter[str] = Counter()
        for niche in niches_of[post.user_id].get(post.category, [None]):
            pool.update(by_niche.get((post.category, niche), Counter()))
        predictions["niche_category_mode"].append(_top(pool or category, k))
        predictions["another_post"].append(_another_post(
            copy_from.get(post.user_id, []), copy_same.get((post.user_id, post.category), []),
            post, seed))
        if not other_user:
            own = own_mode.get((post.user_id, post.category)) or category
            predictions["user_category_mode"].append(_top(own, k))
    return {
        "split": split,
        "test_posts": len(truths),
        "test_users": len({p.user_id for p in test}),
        "tag_list_size": k,
        **{name: _scores(truths, predicted) for name, predicted in predictions.items()},
    }
