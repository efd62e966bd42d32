"""Preprocessing job: raw archive -> examples, vocabularies, user contexts, splits, manifest.

``python jobs/preprocess.py --archive URI --out URI [--config FILE] [--field value ...]``
(= ``csmn preprocess``). Ray Data throughout, in-process by default, a cluster when
``RAY_ADDRESS`` is set. Each stage is a pure function over Arrow tables that Ray Data maps
(and that :class:`LocalEngine` runs in a plain loop, for comparison and debugging):

1. read + per-post features (``map_batches`` over the archive's sources, one task each):
   :mod:`csmn.readers` parses; each post is checked, normalized (:mod:`csmn.text`) and tested
   for English and links (:mod:`csmn.filters`). Reader rejects (stage ``read``) and records
   preprocessing cannot use (stage ``preprocess``) are written to ``rejects/`` by the task.
2. per-user filtering (``groupby("user_id").map_groups``, streaming from 1): duplicate posts
   rejected, the rules of 3.1 applied per task; one row per user with its kept posts and
   its counts per rule. Materialized: the later stages read it.
3. splits, on the driver, from the per-user counts (:mod:`csmn.splits`).
4. token counts and user frequencies of the training splits (``map_batches``, partial sums
   added up on the driver) -> vocabularies (:mod:`csmn.vocab`) and IDF
   (:mod:`csmn.user_context`).
5. examples (``map_batches`` over users: leak-free contexts, token ids; each task writes its
   own part files per task and split) and per-user contexts from all kept posts.

Outputs under ``--out`` (the data root): ``examples/<task>/<split>/part-*.parquet``,
``vocab/<name>.json``, ``contexts/<task>.parquet``, ``rejects/{read,preprocess}/``,
``manifest.json`` (written last: a root without it is incomplete). A rerun first deletes
these outputs (and only these: features and other stages' files stay). Part files are named
by a digest of their content's keys, so a retried Ray task replaces its own files.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import logging
import math
import statistics
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import yaml

from csmn.config import add_config_arguments, config_from_args, config_to_dict
from csmn.core.tokens import SPECIAL_TOKENS
from csmn.data import layout, storage
from csmn.data.layout import (
    BY_POSTS_SPLITS,
    BY_USERS_SPLITS,
    POST,
    TASKS,
    TRAIN,
    TRAIN_BY_POSTS,
    vocab_name,
)
from csmn.data.rejects import count_rejects, parts_digest, reject_row, write_reject_part
from csmn.data.schemas import conform, record_problem
from csmn.text.filters import (
    COMMON_RULES,
    KEPT,
    TASK_RULES,
    FilterThresholds,
    filter_user_posts,
    is_advertisement,
    is_non_english,
)
from csmn.text.normalize import normalize_caption, normalize_hashtags
from csmn.text.splits import (
    by_posts_fractions,
    split_user_posts,
    split_users,
)
from csmn.text.user_context import ContextSpec, UserContext, count_tokens
from csmn.text.vocab import Vocabulary

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
READ_STAGE = "read"
PREPROCESS_STAGE = "preprocess"
BY_POSTS_TASK = "hashtag"  # the task that also gets a split by posts (paper 5.1)
SHUFFLE_STRATEGIES = ("sort_shuffle_pull_based", "sort_shuffle_push_based", "shuffle_v2",
                      "hash_shuffle")


@dataclass
class PreprocessConfig:
    """Paper defaults (3.1, 3.2, 4.1, 5.1); every field is also a ``--field-name`` flag."""

    max_non_english_fraction: float = field(default=0.2, metadata={
        "help": "a post is non-English when more than this share of its words is not en_US"})
    max_flagged_posts_min: int = field(default=15, metadata={
        "help": "a user loses all posts with more than max(this, fraction x #posts) "
                "non-English or ad posts"})
    max_flagged_posts_fraction: float = field(default=0.15, metadata={
        "help": "see max_flagged_posts_min"})
    min_tokens: int = field(default=3, metadata={"help": "fewest tokens of a caption/hashtag list"})
    max_tokens: int = field(default=15, metadata={
        "help": "most tokens of a caption/hashtag list (token_ids add _EOS: at most 16)"})
    max_posts_per_user: int = field(default=1000, metadata={
        "help": "posts kept per user (the most recent)"})
    min_posts_per_user: int = field(default=50, metadata={
        "help": "users with fewer kept posts are dropped"})
    post_vocab_size: int = field(default=40000, metadata={
        "help": "post vocabulary size, special tokens included"})
    hashtag_vocab_size: int = field(default=60000, metadata={
        "help": "hashtag vocabulary size, special tokens included"})
    context_size: int = field(default=60, metadata={
        "help": "D, user context words (paper variants: 20, 80, 100)"})
    seed: int = field(default=0, metadata={"help": "seed of the hash-based splits"})
    train_user_fraction: float = field(default=0.9, metadata={
        "help": "share of users (and, by posts, of each user's posts) in training"})
    test_posts: int = field(default=5000, metadata={
        "help": "posts the test split aims for (paper: 5K)"})
    max_test_share: float = field(default=0.5, metadata={
        "help": "on small data, the test split takes at most this share of held-out posts"})
    by_posts_split: bool = field(default=True, metadata={
        "help": "also split the hashtag task by posts (every user in train and test)"})
    read_batch_size: int = field(default=1000, metadata={"help": "raw posts per parsed batch"})
    image_roots: tuple[str, ...] = field(default=(), metadata={
        "help": "folders or s3:// prefixes besides the archive that records may name images "
                "under (comma-separated); any other image path is a bad_path reject"})
    users_per_batch: int = field(default=64, metadata={
        "help": "users per batch in the per-user stages"})
    user_partitions: int = field(default=0, metadata={
        "help": "partitions of the groupby on users, and tasks of the parsing before it "
                "(0: the number of sources, at most 2 per cluster CPU)"})
    shuffle_strategy: str = field(default="sort_shuffle_pull_based", metadata={
        "help": "Ray Data shuffle of the groupby on users: sort_shuffle_pull_based (plain "
                "tasks, starts fast) | sort_shuffle_push_based | shuffle_v2 or hash_shuffle "
                "(hash shuffle actors, for very large data)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.train_user_fraction < 1.0:
            raise ValueError("train_user_fraction must be between 0 and 1")
        if not 0.0 <= self.max_non_english_fraction <= 1.0:
            raise ValueError("max_non_english_fraction must be between 0 and 1")
        if self.min_tokens < 1 or self.max_tokens < self.min_tokens:
            raise ValueError("need 1 <= min_tokens <= max_tokens")
        if self.min_posts_per_user > self.max_posts_per_user:
            raise ValueError("min_posts_per_user is larger than max_posts_per_user")
        if min(self.post_vocab_size, self.hashtag_vocab_size) < 5:
            raise ValueError("a vocabulary needs room for the 4 special tokens and words")
        if self.context_size < 1:
            raise ValueError("context_size must be positive")
        if self.shuffle_strategy not in SHUFFLE_STRATEGIES:
            raise ValueError(f"shuffle_strategy must be one of {', '.join(SHUFFLE_STRATEGIES)}")
        for name in ("max_flagged_posts_fraction", "max_test_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("test_posts", "read_batch_size", "users_per_batch", "min_posts_per_user"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("user_partitions", "max_flagged_posts_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def thresholds(self) -> FilterThresholds:
        names = {f.name for f in dataclasses.fields(FilterThresholds)}
        return FilterThresholds(**{n: getattr(self, n) for n in names})

    def vocab_size(self, task: str) -> int:
        return self.post_vocab_size if task == POST else self.hashtag_vocab_size


# --------------------------------------------------------------------------- schemas
_TS = pa.timestamp("us", tz="UTC")
_STRINGS = pa.list_(pa.string())

# Stage 1 output: one row per usable post.
FEATURE_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("post_id", pa.string()),
    ("created_at", _TS),
    ("image", pa.string()),
    ("post_tokens", _STRINGS),
    ("hashtag_tokens", _STRINGS),
    ("non_english", pa.bool_()),
    ("advertisement", pa.bool_()),
    ("source", pa.string()),
])

_KEPT_POST = pa.struct([
    ("post_id", pa.string()),
    ("created_at", _TS),
    ("image", pa.string()),
    ("tokens", _STRINGS),
])


def _count_columns() -> list[str]:
    columns = ["posts", "duplicates", *COMMON_RULES, "either_kept"]
    for task in TASKS:
        columns += [f"{task}_{rule}" for rule in TASK_RULES] + [f"{task}_kept"]
    return columns


COUNT_COLUMNS = _count_columns()
SUMMARY_COLUMNS = ["user_id", *COUNT_COLUMNS, *(f"{t}_lengths" for t in TASKS)]

# Stage 2 output: one row per user, its kept posts per task and its counts per rule.
USER_SCHEMA = pa.schema(
    [("user_id", pa.string())]
    + [(name, pa.int64()) for name in COUNT_COLUMNS]
    + [(f"{task}_lengths", pa.list_(pa.int64())) for task in TASKS]
    + [(f"{task}_posts", pa.list_(_KEPT_POST)) for task in TASKS]
)

TOKEN_STATS_SCHEMA = pa.schema([
    ("vocab", pa.string()), ("token", pa.string()), ("count", pa.int64()), ("df", pa.int64()),
])
# Stage 5 output: per (task, user, split) the posts written; the by-users row of a user also
# carries the user's context from all kept posts (for contexts/<task>.parquet).
USER_SPLIT_SCHEMA = pa.schema([
    ("task", pa.string()), ("user_id", pa.string()), ("split", pa.string()),
    ("posts", pa.int64()), ("context_words", _STRINGS),
])


# --------------------------------------------------------------------------- rejects
def write_reject_rows(rows: Sequence[dict[str, Any]], root: str, key: str) -> None:
    """One Parquet part per stage under ``rejects/<stage>/``, named by a digest of ``key``
    (where the rows come from: a source's batch, a user) and of the rows, so that a retried
    task overwrites its own part instead of adding a second one."""
    by_stage: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_stage[row["stage"]].append(row)
    for stage, stage_rows in sorted(by_stage.items()):
        write_reject_part(stage_rows, layout.rejects_dir(root, stage), key)


# --------------------------------------------------------------------------- stage 1
def post_problem(post: dict[str, Any]) -> str | None:
    """Why a parsed post cannot be used (``code: detail``), or None.

    The reader checks the raw schema; this also catches what the schema allows but
    preprocessing cannot use (blank ids or image) in case a reader lets it through.
    """
    problem = record_problem(post, "raw_post")
    if problem:
        return f"bad_record: {problem}"
    for name in ("user_id", "post_id", "image"):
        if not post[name].strip():
            return f"empty_field: {name} is blank"
    return None


def post_features(post: dict[str, Any], max_non_english_fraction: float) -> dict[str, Any]:
    caption = post.get("caption") or ""
    return {
        "user_id": post["user_id"],
        "post_id": post["post_id"],
        "created_at": post.get("created_at"),
        "image": post["image"],
        "post_tokens": normalize_caption(caption),
        "hashtag_tokens": normalize_hashtags(post.get("hashtags") or []),
        "non_english": is_non_english(caption, max_non_english_fraction),
        "advertisement": is_advertisement(caption),
    }


def features_table(
    posts: Sequence[dict[str, Any]], source: str, max_non_english_fraction: float
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Stage 1 for one parsed batch: (features of the usable posts, preprocess rejects)."""
    rows, rejects = [], []
    for post in posts:
        problem = post_problem(post)
        if problem is not None:
            record_id = post.get("post_id")
            rejects.append(reject_row(
                PREPROCESS_STAGE, problem,
                record_id=None if record_id is None else str(record_id),
                source=source, payload=post,
            ))
            continue
        row = post_features(post, max_non_english_fraction)
        row["source"] = source
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=FEATURE_SCHEMA), rejects


def source_features(
    source: str, archive: str, root: str, read_batch_size: int, max_non_english_fraction: float,
    image_roots: Sequence[str] = (),
) -> Iterator[pa.Table]:
    """Stage 1 for one source file of the archive; its rejects go to ``rejects/`` here."""
    from csmn.data import readers

    batches = readers.parse_source(source, archive, batch_size=read_batch_size,
                                   image_roots=tuple(image_roots))
    for i, (posts, read_rejects) in enumerate(batches):
        table, rejects = features_table(posts, source, max_non_english_fraction)
        write_reject_rows([*read_rejects, *rejects], root, key=f"{source}#{i}")
        yield table


def features_of_sources(
    batch: pa.Table, archive: str, root: str, read_batch_size: int,
    max_non_english_fraction: float, image_roots: Sequence[str] = (),
) -> Iterator[pa.Table]:
    """Ray Data batch function: a batch of source URIs -> stage 1 tables."""
    for source in batch.column("source").to_pylist():
        yield from source_features(source, archive, root, read_batch_size,
                                   max_non_english_fraction, image_roots)


# --------------------------------------------------------------------------- stage 2
def _content_key(row: dict[str, Any]) -> tuple:
    created = row["created_at"]
    return (
        row["post_id"],
        "" if created is None else created.isoformat(),
        row["image"],
        row["source"] or "",
        " ".join(row["post_tokens"]),
        " ".join(row["hashtag_tokens"]),
        # Two records may agree on all of the above and differ here (a link or an accent is
        # gone from the tokens): every column is in the key, so which one is kept as the
        # post, and which goes to rejects as its duplicate, never depends on the row order.
        row["non_english"],
        row["advertisement"],
    )


def summarize_user(group: pa.Table, thresholds: FilterThresholds, root: str) -> pa.Table:
    """Stage 2: all the posts of one user -> one USER_SCHEMA row. Duplicate posts go to
    ``rejects/preprocess``. The result does not depend on the order of the rows."""
    rows = sorted(group.to_pylist(), key=_content_key)
    user_id = rows[0]["user_id"]
    posts: list[dict[str, Any]] = []
    duplicates = []
    seen: set[str] = set()
    for row in rows:
        if row["post_id"] in seen:
            duplicates.append(reject_row(
                PREPROCESS_STAGE,
                f"duplicate_post: post {row['post_id']!r} of user {user_id!r} seen before; "
                "the first by (time, image, source) is kept",
                record_id=row["post_id"], source=row["source"],
                payload={k: row[k] for k in ("user_id", "post_id", "created_at", "image")},
            ))
            continue
        seen.add(row["post_id"])
        posts.append(row)
    write_reject_rows(duplicates, root, key=f"user:{user_id}")

    statuses = filter_user_posts(posts, thresholds)
    out: dict[str, Any] = {name: 0 for name in COUNT_COLUMNS}
    out.update(user_id=user_id, posts=len(posts), duplicates=len(duplicates))
    for status in statuses:
        common = status[POST]  # the common rules give both tasks the same status
        if common in COMMON_RULES:
            out[common] += 1
        if KEPT in status.values():
            out["either_kept"] += 1
    for task in TASKS:
        lengths = [0] * (thresholds.max_tokens + 1)
        kept = []
        for post, status in zip(posts, statuses, strict=True):
            if status[task] == KEPT:
                tokens = post[f"{task}_tokens"]
                lengths[len(tokens)] += 1
                kept.append({"post_id": post["post_id"], "created_at": post["created_at"],
                             "image": post["image"], "tokens": tokens})
            elif status[task] in TASK_RULES:
                out[f"{task}_{status[task]}"] += 1
        kept.sort(key=lambda p: p["post_id"])
        out[f"{task}_kept"] = len(kept)
        out[f"{task}_lengths"] = lengths
        out[f"{task}_posts"] = kept
    return pa.Table.from_pylist([out], schema=USER_SCHEMA)


# --------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What the driver decided between the per-user stages: splits, then vocabularies."""

    seed: int
    context_size: int
    user_splits: dict[str, dict[str, str]]
    by_posts: bool
    by_posts_test_fraction: float = 0.0
    by_posts_val_fraction: float = 0.0
    vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    idf: dict[str, dict[str, float]] = field(default_factory=dict)
    idf_docs: dict[str, int] = field(default_factory=dict)

    def post_splits(self, user_id: str, post_ids: Sequence[str]) -> dict[str, str]:
        return split_user_posts(user_id, post_ids, self.seed, self.by_posts_test_fraction,
                                self.by_posts_val_fraction)

    def context(self, name: str, token_lists: Iterable[Sequence[str]]) -> UserContext:
        return UserContext(count_tokens(token_lists), self.idf[name], self.vocabs[name],
                           self.context_size, self.idf_docs[name])


_PLAN_CACHE: dict[str, Plan] = {}


def _resolve_plan(plan: Any) -> Plan:
    """A Plan, or an object ref to one, fetched once per worker process."""
    if isinstance(plan, Plan):
        return plan
    import ray

    key = plan.hex()
    if key not in _PLAN_CACHE:
        _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = ray.get(plan)
    return _PLAN_CACHE[key]


def _task_posts(users: pa.Table, task: str) -> tuple[list[list[dict[str, Any]]], pa.StructArray]:
    """Per user of the batch, its kept posts of ``task`` as ``{"post_id", "tokens", "at"}``
    (``at``: the post's row in the returned array of all the batch's posts), and that array.

    Only ids and tokens become Python objects: times and images go from Arrow to Arrow by
    ``at`` (converting every timestamp to a datetime and back was a tenth of the job).
    """
    lists = users.column(f"{task}_posts").combine_chunks()
    flat = lists.flatten()
    fields = dict(zip((f.name for f in flat.type), flat.flatten(), strict=True))
    post_ids, tokens = fields["post_id"].to_pylist(), fields["tokens"].to_pylist()
    posts, at = [], 0
    for n in lists.value_lengths().to_pylist():
        posts.append([{"post_id": post_ids[i], "tokens": tokens[i], "at": i}
                      for i in range(at, at + n)])
        at += n
    return posts, flat


def _user_rows(users: pa.Table) -> tuple[list[dict[str, Any]], dict[str, pa.StructArray]]:
    """The batch's users as ``{"user_id", "<task>_posts"}`` (see :func:`_task_posts`), and
    per task the array of all their posts."""
    rows = [{"user_id": u} for u in users.column("user_id").to_pylist()]
    flats = {}
    for task in TASKS:
        posts, flats[task] = _task_posts(users, task)
        for row, user_posts in zip(rows, posts, strict=True):
            row[f"{task}_posts"] = user_posts
    return rows, flats


# --------------------------------------------------------------------------- stage 4
def token_statistics(users: pa.Table, plan: Any) -> pa.Table:
    """Token counts and document (user) frequencies of the training splits, per vocabulary,
    for a batch of users (partial sums: the driver adds them up)."""
    plan = _resolve_plan(plan)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    doc_freq: dict[str, Counter[str]] = defaultdict(Counter)
    for row in _user_rows(users)[0]:
        user_id = row["user_id"]
        for task in TASKS:
            posts = row[f"{task}_posts"]
            if not posts:
                continue
            if plan.user_splits[task].get(user_id) == TRAIN:
                doc = count_tokens(p["tokens"] for p in posts)
                counts[task].update(doc)
                doc_freq[task].update(doc.keys())
            if task == BY_POSTS_TASK and plan.by_posts:
                splits = plan.post_splits(user_id, [p["post_id"] for p in posts])
                doc = count_tokens(
                    p["tokens"] for p in posts if splits[p["post_id"]] == TRAIN_BY_POSTS
                )
                name = vocab_name(task, TRAIN_BY_POSTS)
                counts[name].update(doc)
                doc_freq[name].update(doc.keys())
    rows = [
        {"vocab": name, "token": token, "count": c, "df": doc_freq[name][token]}
        for name, counter in counts.items()
        for token, c in counter.items()
    ]
    return pa.Table.from_pylist(rows, schema=TOKEN_STATS_SCHEMA)


def vocab_candidates(stats: pa.Table, sizes: dict[str, int]) -> pa.Table:
    """Of token statistics summed over all users (one row per vocabulary and token), the
    rows that can enter a vocabulary: per vocabulary the ``size`` - 4 best by count, ties by
    token, as :meth:`Vocabulary.from_counts` ranks them.

    A batch of such rows can be cut on its own: each token's total is in one row, so a token
    among the best of all is among the best of its batch. The driver then receives at most
    (batches x vocabulary size) rows, whatever the number of distinct tokens; and the IDF
    needs document frequencies of vocabulary words only, which those rows carry.
    """
    data = stats.to_pydict()
    by_vocab: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for name, token, count, df in zip(data["vocab"], data["token"], data["count"], data["df"],
                                      strict=True):
        if count > 0 and token not in SPECIAL_TOKENS:
            by_vocab[name].append((-count, token, df))
    rows = [
        {"vocab": name, "token": token, "count": -negative, "df": df}
        for name, entries in sorted(by_vocab.items())
        for negative, token, df in heapq.nsmallest(
            max(0, sizes[name] - len(SPECIAL_TOKENS)), entries)
    ]
    return pa.Table.from_pylist(rows, schema=TOKEN_STATS_SCHEMA)


def sum_token_stats(stats: pa.Table) -> pa.Table:
    """Partial token statistics -> one row per vocabulary and token (vectorized)."""
    summed = stats.group_by(["vocab", "token"]).aggregate([("count", "sum"), ("df", "sum")])
    return summed.select(["vocab", "token", "count_sum", "df_sum"]).rename_columns(
        TOKEN_STATS_SCHEMA.names).cast(TOKEN_STATS_SCHEMA)


def with_stats_partition(stats: pa.Table, partitions: int) -> pa.Table:
    """A ``partition`` column: a hash of the token, the same in every process (Python's
    ``hash`` of a str is not), so that all partial rows of a token meet in one group."""
    keys = [zlib.crc32(token.encode("utf-8", "surrogatepass")) % partitions
            for token in stats.column("token").to_pylist()]
    return stats.append_column("partition", pa.array(keys, pa.int64()))


def partition_candidates(stats: pa.Table, sizes: dict[str, int]) -> pa.Table:
    """Ray Data group function: the partial rows of one partition of the tokens -> the
    vocabulary candidates among them."""
    return vocab_candidates(sum_token_stats(stats.drop_columns(["partition"])), sizes)


# --------------------------------------------------------------------------- stage 5
class _Part:
    """The examples of one part file, column by column; times and images are taken from the
    batch's posts by row (``at``) when the part is written."""

    def __init__(self, posts: pa.StructArray):
        self.posts = posts
        self.columns: dict[str, list] = {name: [] for name in (
            "user_id", "post_id", "text", "token_ids", "context_ids", "context_words")}
        self.at: list[int] = []

    def add(self, user_id: str, post: dict[str, Any], vocab: Vocabulary, words: list[str]) -> None:
        c = self.columns
        c["user_id"].append(user_id)
        c["post_id"].append(post["post_id"])
        c["text"].append(" ".join(post["tokens"]))
        c["token_ids"].append(vocab.encode(post["tokens"]))
        c["context_ids"].append(vocab.ids(words))
        c["context_words"].append(words)
        self.at.append(post["at"])

    def __len__(self) -> int:
        return len(self.at)

    def table(self) -> pa.Table:
        rows = pa.array(self.at, pa.int64())
        taken = self.posts.take(rows)
        fields = dict(zip((f.name for f in taken.type), taken.flatten(), strict=True))
        return conform({**self.columns, "created_at": fields["created_at"],
                        "image": fields["image"]}, "example")


def user_examples(
    row: dict[str, Any], task: str, plan: Plan
) -> tuple[dict[str, list[str]], Iterator[tuple[str, dict, Vocabulary, list[str]]]]:
    """(the user's contexts by vocabulary name: from all kept posts under ``task``, and split
    by posts from its training posts only; (split, post, vocabulary, context words) for each
    example of a kept post)."""
    posts = row[f"{task}_posts"]
    user_id = row["user_id"]
    context = plan.context(task, (p["tokens"] for p in posts))
    contexts = {task: context.full()}
    by_posts = task == BY_POSTS_TASK and plan.by_posts
    if by_posts:
        name = vocab_name(task, TRAIN_BY_POSTS)
        splits = plan.post_splits(user_id, [p["post_id"] for p in posts])
        # Split by posts, the user's known history is its training posts: they give the
        # context (minus the post itself when it is one of them), and the user's context
        # the 1NN baselines compare is theirs alone, never a test post's.
        history = plan.context(
            name, (p["tokens"] for p in posts if splits[p["post_id"]] == TRAIN_BY_POSTS))
        contexts[name] = history.full()

    def examples() -> Iterator[tuple[str, dict, Vocabulary, list[str]]]:
        split = plan.user_splits[task][user_id]
        vocab = plan.vocabs[task]
        for post in posts:
            yield split, post, vocab, context.without(post["tokens"])
        if by_posts:
            for post in posts:
                post_split = splits[post["post_id"]]
                words = (history.without(post["tokens"]) if post_split == TRAIN_BY_POSTS
                         else history.full())
                yield post_split, post, plan.vocabs[name], words

    return contexts, examples()


def write_examples(users: pa.Table, plan: Any, root: str) -> pa.Table:
    """Stage 5 for a batch of users: build and write their examples; return, per task, user
    and split, the posts written (and the user's full context, on its by-users row).

    File names are a digest of the batch's users, so a retried task overwrites its own
    files instead of adding duplicates.
    """
    plan = _resolve_plan(plan)
    rows, flats = _user_rows(users)
    batch_id = parts_digest(r["user_id"] for r in rows)
    by_part: dict[tuple[str, str], _Part] = {}
    out = []
    for row in rows:
        for task in TASKS:
            if not row[f"{task}_posts"]:
                continue
            contexts, examples = user_examples(row, task, plan)
            per_split: Counter[str] = Counter()
            for split, post, vocab, words in examples:
                part = by_part.get((task, split))
                if part is None:
                    part = by_part[(task, split)] = _Part(flats[task])
                part.add(row["user_id"], post, vocab, words)
                per_split[split] += 1
            user_split = plan.user_splits[task][row["user_id"]]
            for split, n in sorted(per_split.items()):
                # The user's row of its by-users split carries its context, and its
                # train_by_posts row the context from its training posts.
                name = (task if split == user_split else
                        vocab_name(task, split) if split == TRAIN_BY_POSTS else None)
                out.append({"task": task, "user_id": row["user_id"], "split": split,
                            "posts": n, "context_words": contexts.get(name)})
    for (task, split), part in sorted(by_part.items()):
        uri = storage.join(layout.examples_dir(root, task, split), f"part-{batch_id}.parquet")
        storage.write_parquet(uri, part.table())
    return pa.Table.from_pylist(out, schema=USER_SPLIT_SCHEMA)


# --------------------------------------------------------------------------- engines
class RayEngine:
    """The stages on Ray Data (in-process Ray, or the cluster at RAY_ADDRESS)."""

    name = "ray"

    def __init__(self, config: PreprocessConfig):
        import ray

        from csmn.pipeline.runtime import init_ray

        init_ray()
        self.ray = ray
        self.config = config
        self.users: Any = None

    def summarize_users(self, sources: list[str], archive: str, root: str) -> list[dict]:
        """Stages 1-2 in one streaming execution; returns each user's counts."""
        from ray.data.context import ShuffleStrategy

        from csmn.data.readers import count_records

        # Records in are counted from the files by tasks of their own, beside the pipeline:
        # a count taken from the parser's output could not see what the parser lost.
        from csmn.pipeline.runtime import TASK_RETRIES

        count = self.ray.remote(**TASK_RETRIES)(count_records)
        self._counts = [count.remote(source, archive) for source in sources]

        ds = self.ray.data.from_items([{"source": s} for s in sources],
                                      override_num_blocks=max(1, len(sources)))
        # The dataset's own context (shared by the datasets derived from it): the process-wide
        # default stays as it is for other jobs in this process.
        ds.context.shuffle_strategy = ShuffleStrategy(self.config.shuffle_strategy)
        # As many stage-1 tasks as groupby partitions, not one per source: the sort-based
        # groupby cuts each of its N input blocks into N pieces (it ignores num_partitions),
        # N^2 objects owned by the driver, the small ones held in its own memory and copied
        # into the reducers' task specs. At 3.4M posts in 345 files that was 1.6 GB of driver
        # RSS; batched, 0.7 GB and stages 1-2 twice as fast (docs/method.md).
        partitions = self._partitions(sources)
        posts = ds.map_batches(
            features_of_sources, batch_size=math.ceil(len(sources) / partitions),
            batch_format="pyarrow",
            fn_kwargs={"archive": archive, "root": root,
                       "read_batch_size": self.config.read_batch_size,
                       "max_non_english_fraction": self.config.max_non_english_fraction,
                       "image_roots": self.config.image_roots},
        )
        self.users = posts.groupby("user_id", num_partitions=partitions).map_groups(
            summarize_user, batch_format="pyarrow",
            fn_kwargs={"thresholds": self.config.thresholds(), "root": root},
        ).materialize()
        return self.users.select_columns(SUMMARY_COLUMNS).take_all()

    def records_in(self) -> int:
        """Records the sources hold (after :meth:`summarize_users`)."""
        return sum(self.ray.get(self._counts))

    def _partitions(self, sources: list[str]) -> int:
        # Ray's default (up to 128 hash-shuffle aggregators) costs seconds of start-up on a
        # small node; the sources bound the useful parallelism of this stage anyway.
        if self.config.user_partitions > 0:
            return self.config.user_partitions
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        return max(1, min(len(sources), 2 * cpus))

    def token_statistics(self, plan: Plan) -> Iterator[dict]:
        """The vocabularies' candidate rows; the partial sums of the batches of users are
        added up by a groupby on the cluster, not on the driver (their rows grow with users
        x distinct tokens, the candidates with the vocabulary sizes)."""
        partial = self.users.map_batches(
            token_statistics, batch_size=self.config.users_per_batch, batch_format="pyarrow",
            fn_kwargs={"plan": self.ray.put(plan)},
        )
        # Grouped by a hash of the token into a few partitions, not by token: the shuffle
        # then sorts small integers and each group is summed by Arrow, where a groupby on
        # (vocabulary, token) aggregates group after group in Python (4x slower end to end
        # on 100K posts).
        partitions = self._stats_partitions()
        candidates = partial.map_batches(
            with_stats_partition, batch_format="pyarrow", fn_kwargs={"partitions": partitions},
        ).groupby("partition", num_partitions=partitions).map_groups(
            partition_candidates, batch_format="pyarrow",
            fn_kwargs={"sizes": vocab_sizes(self.config)})
        for batch in candidates.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from batch.to_pylist()

    def _stats_partitions(self) -> int:
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        return max(1, min(self.users.num_blocks(), 2 * cpus))

    def write_examples(self, plan: Plan, root: str) -> list[dict]:
        return self.users.map_batches(
            write_examples, batch_size=self.config.users_per_batch, batch_format="pyarrow",
            fn_kwargs={"plan": self.ray.put(plan), "root": root},
        ).take_all()


class LocalEngine:
    """The same stage functions in a plain single-process loop (no Ray): for measuring the
    cost of distribution, and for debugging."""

    name = "local"

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.users: list[pa.Table] = []

    def _user_batches(self) -> Iterator[pa.Table]:
        size = self.config.users_per_batch
        for i in range(0, len(self.users), size):
            yield pa.concat_tables(self.users[i : i + size])

    def summarize_users(self, sources: list[str], archive: str, root: str) -> list[dict]:
        from csmn.data.readers import count_records

        self._records_in = sum(count_records(source, archive) for source in sources)
        tables = [t for s in sources for t in source_features(
            s, archive, root, self.config.read_batch_size, self.config.max_non_english_fraction,
            self.config.image_roots)]
        posts = pa.concat_tables(tables) if tables else FEATURE_SCHEMA.empty_table()
        posts = posts.sort_by("user_id")
        thresholds = self.config.thresholds()
        user_ids = posts.column("user_id").to_pylist()
        self.users = []
        start = 0
        for i in range(1, len(user_ids) + 1):
            if i == len(user_ids) or user_ids[i] != user_ids[start]:
                group = posts.slice(start, i - start)
                self.users.append(summarize_user(group, thresholds, root))
                start = i
        return [t.select(SUMMARY_COLUMNS).to_pylist()[0] for t in self.users]

    def records_in(self) -> int:
        return self._records_in

    def token_statistics(self, plan: Plan) -> Iterator[dict]:
        partial = [token_statistics(batch, plan) for batch in self._user_batches()]
        totals = sum_token_stats(pa.concat_tables([TOKEN_STATS_SCHEMA.empty_table(), *partial]))
        yield from vocab_candidates(totals, vocab_sizes(self.config)).to_pylist()

    def write_examples(self, plan: Plan, root: str) -> list[dict]:
        return [r for b in self._user_batches() for r in write_examples(b, plan, root).to_pylist()]


ENGINES = {"ray": RayEngine, "local": LocalEngine}


# --------------------------------------------------------------------------- driver
OWNED_OUTPUTS = ("examples", "vocab", "contexts", "rejects/read", "rejects/preprocess")


def clear_outputs(root: str) -> None:
    """Delete what a previous run wrote here (manifest first: no manifest = incomplete)."""
    manifest = layout.manifest_uri(root)
    if storage.exists(manifest):
        storage.delete(manifest)
    for name in OWNED_OUTPUTS:
        uri = storage.join(root, *name.split("/"))
        if storage.exists(uri):
            storage.delete(uri)


def _mean_median(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": round(statistics.fmean(values), 3),
            "median": float(statistics.median(values))}


def _histogram_mean_median(histogram: list[int]) -> dict[str, float]:
    total = sum(histogram)
    if not total:
        return {"mean": 0.0, "median": 0.0}
    mean = sum(i * n for i, n in enumerate(histogram)) / total

    def value_at(rank: int) -> int:  # 0-based rank in sorted order
        seen = 0
        for i, n in enumerate(histogram):
            seen += n
            if seen > rank:
                return i
        return len(histogram) - 1

    median = (value_at((total - 1) // 2) + value_at(total // 2)) / 2
    return {"mean": round(mean, 3), "median": float(median)}


def build_plan(users: list[dict], config: PreprocessConfig) -> Plan:
    user_splits = {}
    for task in TASKS:
        counts = {u["user_id"]: u[f"{task}_kept"] for u in users if u[f"{task}_kept"] > 0}
        user_splits[task] = split_users(counts, config.seed, config.train_user_fraction,
                                        config.test_posts, config.max_test_share)
    total = sum(u[f"{BY_POSTS_TASK}_kept"] for u in users)
    test_fraction, val_fraction = by_posts_fractions(
        total, config.train_user_fraction, config.test_posts, config.max_test_share)
    return Plan(seed=config.seed, context_size=config.context_size, user_splits=user_splits,
                by_posts=config.by_posts_split, by_posts_test_fraction=test_fraction,
                by_posts_val_fraction=val_fraction)


def vocab_names(config: PreprocessConfig) -> list[str]:
    names = list(TASKS)
    if config.by_posts_split:
        names.append(vocab_name(BY_POSTS_TASK, TRAIN_BY_POSTS))
    return names


def vocab_sizes(config: PreprocessConfig) -> dict[str, int]:
    return {name: config.vocab_size(name.split("_", 1)[0]) for name in vocab_names(config)}


def add_vocabularies(plan: Plan, token_stats: Iterable[dict], config: PreprocessConfig) -> None:
    """Vocabularies and IDF from token statistics: partial sums, or (from the engines) the
    candidates of :func:`vocab_candidates`, which give the same vocabularies and IDF."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    doc_freq: dict[str, Counter[str]] = defaultdict(Counter)
    for row in token_stats:
        counts[row["vocab"]][row["token"]] += row["count"]
        doc_freq[row["vocab"]][row["token"]] += row["df"]
    for name in vocab_names(config):
        task = name.split("_", 1)[0]
        vocab = Vocabulary.from_counts(counts[name], config.vocab_size(task))
        if name == task:
            n_docs = sum(1 for s in plan.user_splits[task].values() if s == TRAIN)
        else:  # by posts every user has training posts
            n_docs = len(plan.user_splits[task])
        spec = ContextSpec(config.context_size, n_docs,
                           {t: d for t, d in doc_freq[name].items() if vocab.is_word(t)})
        vocab.context = spec.to_json(vocab)
        plan.vocabs[name] = vocab
        plan.idf[name] = spec.idf()
        plan.idf_docs[name] = n_docs


def task_splits(task: str, config: PreprocessConfig) -> tuple[str, ...]:
    if task == BY_POSTS_TASK and config.by_posts_split:
        return BY_USERS_SPLITS + BY_POSTS_SPLITS
    return BY_USERS_SPLITS


def write_empty_splits(root: str, summary: list[dict], config: PreprocessConfig) -> None:
    """A split without posts still gets a (valid, empty) part file so that it reads back."""
    written = {(r["task"], r["split"]) for r in summary if r["posts"]}
    for task in TASKS:
        for split in task_splits(task, config):
            if (task, split) not in written:
                uri = storage.join(layout.examples_dir(root, task, split), "part-empty.parquet")
                storage.write_parquet(uri, conform([], "example"))


def write_contexts(root: str, summary: list[dict], config: PreprocessConfig) -> dict[str, int]:
    """``contexts/<task>.parquet``: each user's context from all of its kept posts;
    ``contexts/hashtag_by_posts.parquet``: from its training posts split by posts (the 1NN
    baselines' training users, split by posts: the other file holds the test posts too)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in summary:
        if r["context_words"] is not None:
            name = vocab_name(r["task"], None if r["split"] in BY_USERS_SPLITS else r["split"])
            by_name.setdefault(name, []).append(
                {"user_id": r["user_id"], "context_words": r["context_words"]})
    names = list(TASKS)
    if config.by_posts_split:
        names.append(vocab_name(BY_POSTS_TASK, TRAIN_BY_POSTS))
    written = {}
    for name in names:
        rows = sorted(by_name.get(name, []), key=lambda r: r["user_id"])
        storage.write_parquet(layout.contexts_uri_by_name(root, name),
                              conform(rows, "user_context"))
        written[name] = len(rows)
    return written


def written_rejects(root: str) -> dict[str, dict[str, int]]:
    """Reject counts by stage and reason code, from the files themselves."""
    return {stage: dict(sorted(count_rejects(root, stage).items()))
            for stage in (READ_STAGE, PREPROCESS_STAGE)}


def _task_accounting(task: str, totals: dict[str, int], rejected: dict[str, int],
                     records_in: int) -> tuple[dict[str, int], list[dict[str, Any]], dict]:
    """(posts filtered by rule, posts left after each step, the balance) of one task."""
    filtered = {rule: totals[rule] for rule in COMMON_RULES}
    filtered.update({rule: totals[f"{task}_{rule}"] for rule in TASK_RULES})
    remaining = records_in
    steps = [{"step": "records in", "posts": remaining}]
    for label, dropped in (
        ("after read rejects", rejected[READ_STAGE]),
        ("after preprocess rejects", rejected[PREPROCESS_STAGE] - totals["duplicates"]),
        ("after duplicates", totals["duplicates"]),
        *((f"after {rule}", filtered[rule]) for rule in COMMON_RULES),
        *((f"after {rule}", filtered[rule]) for rule in TASK_RULES),
    ):
        remaining -= dropped
        steps.append({"step": label, "posts": remaining})
    kept = totals[f"{task}_kept"]
    n_filtered, n_rejected = sum(filtered.values()), sum(rejected.values())
    lost = records_in - (kept + n_filtered + n_rejected)
    balance = {"records_in": records_in, "kept": kept, "filtered": n_filtered,
               "rejected": n_rejected, "lost": lost, "balanced": lost == 0}
    return filtered, steps, balance


def _task_stats(task: str, users: list[dict]) -> dict[str, Any]:
    per_user = [u[f"{task}_kept"] for u in users if u[f"{task}_kept"]]
    histogram = [sum(h) for h in zip(*(u[f"{task}_lengths"] for u in users), strict=True)
                 ] if users else []
    return {"posts": sum(per_user), "users": len(per_user),
            "posts_per_user": _mean_median(per_user),
            "words_per_post": _histogram_mean_median(histogram)}


def _split_counts(summary: list[dict], config: PreprocessConfig) -> dict[str, dict]:
    splits: dict[str, dict[str, dict[str, int]]] = {}
    for task in TASKS:
        splits[task] = {}
        for split in task_splits(task, config):
            rows = [r for r in summary if r["task"] == task and r["split"] == split]
            splits[task][split] = {"posts": sum(r["posts"] for r in rows), "users": len(rows)}
    return splits


def _vocab_entries(plan: Plan, config: PreprocessConfig) -> dict[str, dict[str, Any]]:
    vocabularies = {}
    for name, vocab in plan.vocabs.items():
        task = name.split("_", 1)[0]
        vocabularies[name] = {
            "size": len(vocab), "max_size": config.vocab_size(task),
            "path": f"vocab/{name}.json",
            "fit_on": f"{task}/{TRAIN_BY_POSTS if name != task else TRAIN}",
            "idf_documents": plan.idf_docs[name],
        }
    return vocabularies


def build_manifest(
    *,
    archive: str,
    root: str,
    config: PreprocessConfig,
    engine: str,
    n_sources: int,
    rejects: dict[str, dict[str, int]],
    users: list[dict],
    plan: Plan,
    summary: list[dict],
    contexts_written: dict[str, int],
    seconds: float,
    records_in: int | None = None,
) -> dict[str, Any]:
    """``records_in``: what the sources hold, counted from them
    (:func:`csmn.data.readers.count_records`), so that the balance can show a loss."""
    totals = {name: sum(u[name] for u in users) for name in COUNT_COLUMNS}
    rejected = {stage: sum(codes.values()) for stage, codes in rejects.items()}
    if records_in is None:  # no count of the sources: what the stages saw, balanced as such
        records_in = sum(rejected.values()) + totals["posts"]
    accounting = {task: _task_accounting(task, totals, rejected, records_in) for task in TASKS}
    vocab_by_split = {task: {split: f"vocab/{vocab_name(task, split)}.json"
                             for split in task_splits(task, config)} for task in TASKS}
    return {
        "version": MANIFEST_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "archive": archive,
        "root": root,
        "engine": engine,
        "seconds": round(seconds, 3),
        "sources": n_sources,
        "records": {"in": records_in, "rejected": rejected, "posts": totals["posts"],
                    "duplicates": totals["duplicates"], "users": len(users)},
        "rejects": rejects,
        "filtered": {task: a[0] for task, a in accounting.items()},
        "steps": {task: a[1] for task, a in accounting.items()},
        "balance": {task: a[2] for task, a in accounting.items()},
        "stats": {**{task: _task_stats(task, users) for task in TASKS},
                  "unique": {"posts": totals["either_kept"],
                             "users": sum(1 for u in users if u["either_kept"])}},
        "splits": _split_counts(summary, config),
        "by_posts_fractions": {"test": plan.by_posts_test_fraction,
                               "val": plan.by_posts_val_fraction} if plan.by_posts else None,
        "vocab": _vocab_entries(plan, config),
        "vocab_sizes": {name: len(v) for name, v in plan.vocabs.items()},
        "vocab_by_split": vocab_by_split,
        "context_size": config.context_size,
        "contexts": {name: {"path": f"contexts/{name}.parquet", "users": n}
                     for name, n in contexts_written.items()},
        "config": config_to_dict(config),
    }


def preprocess(
    archive: str, out: str, config: PreprocessConfig | None = None, engine: str = "ray"
) -> dict[str, Any]:
    """Run the whole job; returns the manifest (also written to ``<out>/manifest.json``)."""
    from csmn.data import readers

    config = config or PreprocessConfig()
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    started = time.perf_counter()
    sources = readers.list_sources(archive)
    if not sources:
        raise FileNotFoundError(f"no sources to read in the archive {archive}")
    clear_outputs(out)
    runner = ENGINES[engine](config)
    if engine == "ray":
        from csmn.pipeline.runtime import warn_if_local_output_on_a_cluster

        warn_if_local_output_on_a_cluster(out, storage.is_s3(out))
    log.info("preprocessing %d source(s) of %s into %s (%s)", len(sources), archive, out,
             engine)

    users = runner.summarize_users(sources, archive, out)
    rejects = written_rejects(out)
    log.info("%d users, %d posts; rejects %s", len(users), sum(u["posts"] for u in users),
             rejects)

    plan = build_plan(users, config)
    add_vocabularies(plan, runner.token_statistics(plan), config)
    for name, vocab in plan.vocabs.items():
        vocab.save(layout.vocab_uri_by_name(out, name))
    summary = runner.write_examples(plan, out)
    write_empty_splits(out, summary, config)
    contexts_written = write_contexts(out, summary, config)

    manifest = build_manifest(
        archive=archive, root=out, config=config, engine=engine, n_sources=len(sources),
        rejects=rejects, users=users, plan=plan, summary=summary,
        contexts_written=contexts_written, seconds=time.perf_counter() - started,
        records_in=runner.records_in(),
    )
    for task in TASKS:
        if not manifest["balance"][task]["balanced"]:
            raise RuntimeError(f"{task}: records in != kept + filtered + rejected: "
                               f"{manifest['balance'][task]}")
        if not manifest["stats"][task]["posts"]:
            log.warning("%s: no post survived the filters (see manifest 'steps')", task)
    layout.write_manifest(out, manifest)
    log.info("wrote %s/manifest.json in %.1fs", out, manifest["seconds"])
    return manifest


def load_manifest(root: str) -> dict[str, Any]:
    return storage.read_json(layout.manifest_uri(root))


# --------------------------------------------------------------------------- CLI
def _load_config(args: argparse.Namespace) -> PreprocessConfig:
    return config_from_args(PreprocessConfig, args, args.config, auto_section="preprocess")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csmn preprocess",
        description="Filter, normalize, build vocabularies, user contexts and splits "
                    "(Ray Data; in-process Ray unless RAY_ADDRESS is set).",
    )
    parser.add_argument("--archive", required=True, help="raw archive (local path or s3://)")
    parser.add_argument("--out", required=True, help="data root to write (local or s3://)")
    parser.add_argument("--config", help="YAML file: PreprocessConfig fields, top-level or "
                                         "under a 'preprocess' section")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="ray",
                        help="ray (default) or local: the same functions in one process")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="(default: INFO)")
    add_config_arguments(parser, PreprocessConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    from csmn.pipeline.runtime import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = _load_config(args)
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"csmn preprocess: bad configuration: {err}", file=sys.stderr)
        return 2
    try:
        manifest = preprocess(args.archive, args.out, config, engine=args.engine)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"csmn preprocess: {err}", file=sys.stderr)
        return 1
    for task in TASKS:
        s = manifest["stats"][task]
        split_posts = ", ".join(
            f"{split}: {n['posts']}" for split, n in manifest["splits"][task].items())
        print(f"{task}: {s['posts']} posts, {s['users']} users ({split_posts})")
    print(f"manifest: {layout.manifest_uri(args.out)}")
    return 0
