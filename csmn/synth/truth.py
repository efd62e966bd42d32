"""Reference hashtag predictors computed from an archive's truth tables.

They say what the archive lets a model learn, to print beside the results of Table 3:

- ``category_mode``: the most frequent tags of the post's category among the training users'
  posts. All an image-only model (CSMN-NoUC, 1NN-Im) can know: images tell the category only.
- ``niche_category_mode``: the most frequent tags, among the training users' posts, of the
  post's category and of the user's niche(s) inside it (or, when none sits there, of the
  category's posts outside any niche). The learnable ceiling for a new user, split by users
  (section 5.1): the user's context can tell the niche, but signature tags unique to the user
  are never in the training vocabulary and a member's own preferences over the niche's pool
  are unknown.
- ``another_post``: the tags of another post of the same user in the same category. The best
  1NN-UsrIm (section 5.2) can do: it copies one post of the nearest user, and no user is nearer
  than the user themselves.

All three are scored with the project's hashtag F1 on the test users of the split by users,
made from the clean posts of regular users, the posts the preprocessing keeps (section 3.1).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from csmn.data import storage
from csmn.data.layout import TEST, TRAIN
from csmn.eval.metrics import hashtag_set, score_hashtags
from csmn.text.splits import split_users, unit_hash


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
        for row in rows:
            # Clean posts are whole JSON records; the broken ones are never read.
            record = json.loads(lines[row["line"] - 1])
            posts.append(_Post(row["user_id"], row["post_id"], row["category"], row["niche"],
                               frozenset(hashtag_set(record["hashtags"]))))
    return posts


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


def reference_scores(
    archive_uri: str,
    seed: int = 0,
    train_fraction: float = 0.9,
    test_posts: int = 5000,
    max_test_share: float = 0.5,
) -> dict[str, Any]:
    """Hashtag precision, recall and F1 of the three reference predictors on the test users of
    the split by users (the split arguments are the preprocessing's, to pick the same users).

    Returns ``{"test_posts", "test_users", "tag_list_size", "category_mode",
    "niche_category_mode", "another_post"}``, each predictor a dict of precision/recall/f1."""
    posts = _clean_posts(archive_uri)
    counts = Counter(p.user_id for p in posts)
    splits = split_users(counts, seed, train_fraction, test_posts, max_test_share)
    train = [p for p in posts if splits[p.user_id] == TRAIN]
    test = [p for p in posts if splits[p.user_id] == TEST]
    if not train or not test:
        raise ValueError(f"{archive_uri}: too few clean posts for a split by users")
    sizes = sorted(len(p.tags) for p in train)
    k = sizes[len(sizes) // 2]  # a typical tag list: the median length

    by_category: dict[str, Counter[str]] = defaultdict(Counter)
    by_niche: dict[tuple[str, str | None], Counter[str]] = defaultdict(Counter)
    for post in train:
        by_category[post.category].update(post.tags)
        by_niche[(post.category, post.niche)].update(post.tags)
    niches_of = _user_niches(archive_uri)
    posts_of: dict[str, list[_Post]] = defaultdict(list)
    for post in test:
        posts_of[post.user_id].append(post)

    truths, category_mode, niche_mode, another = [], [], [], []
    for user_id, own in sorted(posts_of.items()):
        own_by_category: dict[str, list[_Post]] = defaultdict(list)
        for post in own:
            own_by_category[post.category].append(post)
        for post in own:
            truths.append(post.tags)
            category_mode.append(_top(by_category[post.category], k))
            pool: Counter[str] = Counter()
            for niche in niches_of[user_id].get(post.category, [None]):
                pool.update(by_niche[(post.category, niche)])
            niche_mode.append(_top(pool or by_category[post.category], k))
            another.append(_another_post(own, own_by_category[post.category], post, seed))
    return {
        "test_posts": len(truths),
        "test_users": len(posts_of),
        "tag_list_size": k,
        "category_mode": _scores(truths, category_mode),
        "niche_category_mode": _scores(truths, niche_mode),
        "another_post": _scores(truths, another),
    }

