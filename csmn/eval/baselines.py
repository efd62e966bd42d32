"""The nearest-neighbour baselines of the paper (section 5.2), on numpy only.

- 1NN-Im: the training post whose pool5 feature is nearest (L2) to the query's; its text.
- 1NN-Usr: the training user whose first 60 context words overlap the most with the query user's;
  one of that user's posts, drawn at random (seeded, and the same draw for a query whatever
  the order or batching of the queries).
- 1NN-UsrIm: the nearest (L2, pool5) image among the nearest user's posts; its text.

The query user's context words are the query post's own ``context_words`` (leak-free: the
post's tokens never count), the training users' are their full contexts. With the split by
posts, a query user is also a training user and is usually their own nearest user: that is
the setting the paper calls "highly favorable for 1NN-UsrIm".

Ties: the lowest training row (L2) and the first training user in sorted id order (overlap).
For the hashtag task the predicted hashtag list is the neighbour's text split on spaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from csmn.data import layout
from csmn.data.schemas import validate

BASELINES = ("1nn-im", "1nn-usr", "1nn-usrim")
# The paper matches users by the overlap of their 60 context words, whatever D the data was
# preprocessed with (a root built for W80/W100 stores longer contexts, best first).
CONTEXT_WORDS = 60


@dataclass
class NeighbourTrainingSet:
    """The training side: one row per training post, and each training user's context."""

    user_ids: Sequence[str]
    texts: Sequence[str]
    features: np.ndarray  # [n_posts, 2048] pool5
    user_contexts: dict[str, Sequence[str]]

    def __post_init__(self) -> None:
        self.user_ids = [str(u) for u in self.user_ids]
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        n = len(self.user_ids)
        if len(self.texts) != n or self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(
                f"training set: {n} user ids, {len(self.texts)} texts, features "
                f"{self.features.shape}: one row per post expected"
            )
        if n == 0:
            raise ValueError("training set is empty")
        missing = sorted(set(self.user_ids) - set(self.user_contexts))
        if missing:
            raise ValueError(f"no context words for {len(missing)} training users: {missing[:5]}")
        # Only users with posts can be neighbours (1NN-Usr must return one of their posts).
        self.users = sorted(set(self.user_ids))
        user_index = {u: i for i, u in enumerate(self.users)}
        rows_of: list[list[int]] = [[] for _ in self.users]
        for row, user_id in enumerate(self.user_ids):
            rows_of[user_index[user_id]].append(row)
        self.rows_of_user = [np.asarray(rows, dtype=np.int64) for rows in rows_of]
        self.squared_norms = np.einsum("ij,ij->i", self.features, self.features)


@dataclass
class Queries:
    """The query side: one row per query post."""

    post_ids: Sequence[str]
    features: np.ndarray  # [n_queries, 2048] pool5
    context_words: Sequence[Sequence[str]]

    def __post_init__(self) -> None:
        self.post_ids = [str(p) for p in self.post_ids]
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        n = len(self.post_ids)
        if len(self.context_words) != n or self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(
                f"queries: {n} post ids, {len(self.context_words)} contexts, features "
                f"{self.features.shape}: one row per query expected"
            )


@dataclass
class BaselinePredictions:
    """Per query: the predicted text and the training row (and user) it came from."""

    name: str
    texts: list[str]
    neighbour_rows: np.ndarray
    neighbour_users: list[str]

    @property
    def hashtags(self) -> list[list[str]]:
        return [text.split() for text in self.texts]


def nearest_rows_l2(
    queries: np.ndarray,
    candidates: np.ndarray,
    candidate_squared_norms: np.ndarray | None = None,
    query_chunk: int = 1024,
    candidate_chunk: int = 8192,
) -> np.ndarray:
    """Index of the nearest candidate (L2) for every query, by chunked matrix products.

    ||q - c||^2 = ||q||^2 - 2 q.c + ||c||^2, and ||q||^2 does not change the argmin; one
    [query_chunk, candidate_chunk] float32 block is in memory at a time.
    """
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    if candidates.shape[0] == 0:
        raise ValueError("no candidates to search")
    if candidate_squared_norms is None:
        candidate_squared_norms = np.einsum("ij,ij->i", candidates, candidates)
    best = np.zeros(queries.shape[0], dtype=np.int64)
    for q0 in range(0, queries.shape[0], query_chunk):
        block = queries[q0 : q0 + query_chunk]
        best_distance = np.full(block.shape[0], np.inf, dtype=np.float32)
        best_row = np.zeros(block.shape[0], dtype=np.int64)
        for c0 in range(0, candidates.shape[0], candidate_chunk):
            part = candidates[c0 : c0 + candidate_chunk]
            distance = candidate_squared_norms[c0 : c0 + candidate_chunk][None, :] - 2.0 * (
                block @ part.T
            )
            row = distance.argmin(axis=1)
            value = distance[np.arange(block.shape[0]), row]
            # strict '<' keeps the earliest row on ties across chunks
            better = value < best_distance
            best_distance[better] = value[better]
            best_row[better] = row[better] + c0
        best[q0 : q0 + query_chunk] = best_row
    return best


def nearest_users(
    training: NeighbourTrainingSet, queries: Queries, query_chunk: int = 4096,
    context_words: int = CONTEXT_WORDS,
) -> np.ndarray:
    """Index (into ``training.users``) of the user whose first ``context_words`` context
    words overlap the most with the query's.

    Overlap = size of the intersection of the two context word sets, for all query/user pairs
    at once as a sparse [queries x words] @ [words x users] product, chunked over queries.
    """
    word_index: dict[str, int] = {}
    user_rows, user_cols = [], []
    for u, user_id in enumerate(training.users):
        for word in set(training.user_contexts[user_id][:context_words]):
            user_rows.append(word_index.setdefault(word, len(word_index)))
            user_cols.append(u)
    words_by_users = sp.csr_matrix(
        (np.ones(len(user_rows), dtype=np.int32), (user_rows, user_cols)),
        shape=(max(len(word_index), 1), len(training.users)),
    )
    best = np.zeros(len(queries.post_ids), dtype=np.int64)
    for q0 in range(0, len(queries.post_ids), query_chunk):
        contexts = queries.context_words[q0 : q0 + query_chunk]
        rows, cols = [], []
        for q, context in enumerate(contexts):
            for word in set(context[:context_words]):
                col = word_index.get(word)
                if col is not None:
                    rows.append(q)
                    cols.append(col)
        queries_by_words = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.int32), (rows, cols)),
            shape=(len(contexts), words_by_users.shape[0]),
        )
        overlap = (queries_by_words @ words_by_users).toarray()
        best[q0 : q0 + len(contexts)] = overlap.argmax(axis=1)  # first max = first user id
    return best


def seeded_choice(seed: int, key: str, n: int) -> int:
    """A draw in [0, n) fixed by (seed, key): the same for a query however queries are batched."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def _predictions(
    name: str, training: NeighbourTrainingSet, rows: np.ndarray
) -> BaselinePredictions:
    return BaselinePredictions(
        name=name,
        texts=[training.texts[r] for r in rows],
        neighbour_rows=rows,
        neighbour_users=[training.user_ids[r] for r in rows],
    )


def one_nn_image(training: NeighbourTrainingSet, queries: Queries) -> BaselinePredictions:
    """1NN-Im: the text of the training post with the nearest pool5 feature."""
    rows = nearest_rows_l2(queries.features, training.features, training.squared_norms)
    return _predictions("1nn-im", training, rows)


def one_nn_user(
    training: NeighbourTrainingSet, queries: Queries, seed: int = 0
) -> BaselinePredictions:
    """1NN-Usr: a random (seeded) post of the user with the most overlapping context."""
    users = nearest_users(training, queries)
    rows = np.empty(len(users), dtype=np.int64)
    for q, u in enumerate(users):
        candidates = training.rows_of_user[u]
        rows[q] = candidates[seeded_choice(seed, queries.post_ids[q], len(candidates))]
    return _predictions("1nn-usr", training, rows)


def one_nn_user_image(training: NeighbourTrainingSet, queries: Queries) -> BaselinePredictions:
    """1NN-UsrIm: the text of the nearest pool5 image among the nearest user's posts."""
    users = nearest_users(training, queries)
    rows = np.empty(len(users), dtype=np.int64)
    for u in np.unique(users):  # one matrix search per distinct neighbour user
        query_rows = np.flatnonzero(users == u)
        candidates = training.rows_of_user[u]
        nearest = nearest_rows_l2(
            queries.features[query_rows],
            training.features[candidates],
            training.squared_norms[candidates],
        )
        rows[query_rows] = candidates[nearest]
    return _predictions("1nn-usrim", training, rows)


def run_baselines(
    training: NeighbourTrainingSet,
    queries: Queries,
    names: Sequence[str] = BASELINES,
    seed: int = 0,
) -> dict[str, BaselinePredictions]:
    """The named baselines (any of ``BASELINES``) for every query."""
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {', '.join(BASELINES)}")
    out: dict[str, BaselinePredictions] = {}
    for name in names:
        if name == "1nn-im":
            out[name] = one_nn_image(training, queries)
        elif name == "1nn-usr":
            out[name] = one_nn_user(training, queries, seed=seed)
        else:
            out[name] = one_nn_user_image(training, queries)
    return out


# ------------------------------------------------------------------ loading from a data root


def read_features(root: str, image_uris: Sequence[str], layer: str = "pool5") -> np.ndarray:
    """Features of ``layer`` for the given images, in their order, as a float32 matrix.

    Raises ``KeyError`` naming the images with no feature (callers drop and count them).
    """
    from csmn.data import storage

    table = storage.read_parquet(
        layout.features_dir(root, layer), columns=["image", "feature"]
    )
    images = table.column("image").to_pylist()
    row_of = {image: i for i, image in enumerate(images)}
    missing = [u for u in image_uris if u not in row_of]
    if missing:
        raise KeyError(f"{len(missing)} images have no {layer} feature, e.g. {missing[:3]}")
    column = table.column("feature").combine_chunks()
    width = column.type.list_size
    matrix = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    return np.ascontiguousarray(matrix[[row_of[u] for u in image_uris]], dtype=np.float32)


def features_by_image(root: str, layer: str = "pool5") -> dict[str, int]:
    """image -> row of the features table (to find which examples have a feature)."""
    from csmn.data import storage

    table = storage.read_parquet(layout.features_dir(root, layer), columns=["image"])
    return {image: i for i, image in enumerate(table.column("image").to_pylist())}


def load_training_set(root: str, task: str, split: str = "train") -> NeighbourTrainingSet:
    """Training posts with pool5 features, and their users' contexts (``contexts/<task>``;
    split by posts, ``contexts/hashtag_by_posts``, from the training posts alone).

    Training posts whose image has no feature cannot be neighbours and are left out.
    """
    from csmn.data import storage

    columns = ["user_id", "text", "image"]
    examples = validate(storage.read_parquet(layout.examples_dir(root, task, split),
                                             columns=columns), "example", columns)
    known = features_by_image(root)
    images = examples.column("image").to_pylist()
    keep = [i for i, image in enumerate(images) if image in known]
    users = examples.column("user_id").to_pylist()
    texts = examples.column("text").to_pylist()
    uri = layout.contexts_uri(root, task, split)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} is missing: the data root was preprocessed before "
                                "the by-posts contexts existed; preprocess it again")
    contexts = validate(storage.read_parquet(uri), "user_context", ["user_id", "context_words"])
    user_contexts = dict(
        zip(
            contexts.column("user_id").to_pylist(),
            contexts.column("context_words").to_pylist(),
            strict=True,
        )
    )
    return NeighbourTrainingSet(
        user_ids=[users[i] for i in keep],
        texts=[texts[i] for i in keep],
        features=read_features(root, [images[i] for i in keep]),
        user_contexts=user_contexts,
    )
