"""Training data: examples joined with image features through Ray Data, collated into tensors.

The examples of a task/split (``<root>/examples/<task>/<split>/``) are small (ids and a few
dozen token ids per post); the features (``<root>/features/<layer>/``, 8 KiB per image for
pool5, 392 KiB for res5c) are what is big. So the join streams the feature files through Ray
Data and looks each feature batch up in the examples table, which is broadcast once through
the object store. ``Dataset.join`` would hash-shuffle both sides and needs polars, which the
project does not install.

An example whose image has no feature row is *skipped*: it is counted and reported (the
feature extractor wrote the failed image to its own rejects), never silently lost:
``examples = joined + skipped_no_features``.

:func:`collate_batch` is plain numpy/torch; :class:`Collate` binds it for Ray's iterators.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from csmn.core.tokens import GO_ID, PAD_ID
from csmn.data import layout, storage

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# The columns training needs; user ids, dates and texts stay behind in the examples table.
TRAINING_COLUMNS = ("image", "context_ids", "token_ids")
# Validation scores against the text, as the evaluation does (out-of-vocabulary words too).
VALIDATION_COLUMNS = (*TRAINING_COLUMNS, "text")


@dataclass
class JoinStats:
    """What the join did with the examples of one split."""

    split: str
    examples: int
    joined: int
    skipped_no_features: int

    def as_dict(self) -> dict[str, int | str]:
        return {"split": self.split, "examples": self.examples, "joined": self.joined,
                "skipped_no_features": self.skipped_no_features}


def sample_rows(post_ids: list[str], size: int, seed: int = 0) -> np.ndarray:
    """Row numbers of a seeded sample of ``size`` posts: those whose hash of (seed, post id)
    is smallest, in file order.

    Files are grouped by user, so the first rows would be a handful of users; a hash sample
    is uniform over posts, hence spread over users in proportion to their posts, as the
    evaluation's per-post average (paper 5.1) weighs them. It is stable: the same posts for
    the same seed, whatever the file layout.
    """
    if len(post_ids) <= size:
        return np.arange(len(post_ids))
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=8).digest(), "big")
         for p in post_ids), dtype=np.uint64, count=len(post_ids))
    return np.sort(np.argsort(keys, kind="stable")[:size])


def read_examples(root: str, task: str, split: str, limit: int | None = None,
                  columns: tuple[str, ...] = TRAINING_COLUMNS, seed: int = 0) -> pa.Table:
    """``columns`` of one split; with ``limit``, a seeded sample of that many posts
    (:func:`sample_rows`), for validation."""
    uri = layout.examples_dir(root, task, split)
    if not storage.list_files(uri, suffix=".parquet"):
        raise FileNotFoundError(f"no examples at {uri}: run preprocessing first")
    read = list(columns) if limit is None else list(dict.fromkeys([*columns, "post_id"]))
    table = storage.read_parquet(uri, columns=read)
    if limit is not None:
        table = table.take(sample_rows(table.column("post_id").to_pylist(), limit, seed))
    return table.select(list(columns)).combine_chunks()


def _lookup_examples(features: pa.Table, examples: pa.Table) -> pa.Table:
    """Ray Data batch function: the examples whose image is in this feature batch, each
    with its feature (an inner join keyed on ``image``; an image shared by several examples
    yields several rows)."""
    # For every example, the row of its image in this feature batch (null: not here).
    position = pc.index_in(examples.column("image"), value_set=features.column("image"))
    present = pc.is_valid(position)
    matched = examples.filter(present)
    feature = features.column("feature").take(pc.filter(position, present))
    return matched.append_column("feature", feature)


@dataclass(frozen=True)
class JoinSpec:
    """Which examples to join, and how the joined rows are cut into blocks.

    ``block_rows`` small blocks are what a block-order shuffle moves around: rows of one
    block stay together (they are one user's posts, as the files are written), so the smaller
    the blocks, the more users a shuffle buffer of a given size holds.
    """

    task: str
    split: str
    layer: str
    limit: int | None = None
    columns: tuple[str, ...] = TRAINING_COLUMNS
    block_rows: int | None = None
    seed: int = 0


def joined_dataset(
    root: str, task: str, split: str, layer: str, limit: int | None = None,
    columns: tuple[str, ...] = TRAINING_COLUMNS, block_rows: int | None = None, seed: int = 0,
) -> tuple[ray.data.Dataset, JoinStats]:
    """Examples of ``task``/``split`` joined with ``layer`` features, materialized.

    Materialized once here, before the trainer's workers take their CPUs: every epoch then
    reads the object store instead of re-running the join (and Ray Data never waits for a
    CPU that the workers hold). A driver that trains several times (a notebook, the tests)
    joins unchanged files only once per Ray session.
    """
    import ray

    spec = JoinSpec(task, split, layer, limit, tuple(columns), block_rows, seed)
    example_files = storage.list_files(layout.examples_dir(root, task, split), suffix=".parquet")
    feature_files = storage.list_files(layout.features_dir(root, layer), suffix=".parquet")
    key = (ray.get_runtime_context().get_job_id(), spec,
           _fingerprint(example_files), _fingerprint(feature_files))
    if key not in _JOIN_CACHE:
        while len(_JOIN_CACHE) >= _JOIN_CACHE_SIZE:  # oldest out: a few joins, not every one
            _JOIN_CACHE.pop(next(iter(_JOIN_CACHE)))
        _JOIN_CACHE[key] = _join(root, spec, feature_files)
    return _JOIN_CACHE[key]


def _join(root: str, spec: JoinSpec, feature_files: list[str]) -> tuple[Any, JoinStats]:
    import ray

    examples = read_examples(root, spec.task, spec.split, spec.limit, spec.columns, spec.seed)
    feature_dir = layout.features_dir(root, spec.layer)
    if not feature_files:
        raise FileNotFoundError(f"no {spec.layer} features at {feature_dir}: "
                                "run extract-features")
    fs, paths = _paths(feature_files)
    features = ray.data.read_parquet(paths, filesystem=fs, columns=["image", "feature"])
    # The joined blocks in file order, not in the order their tasks finish: the block-order
    # shuffle of every epoch starts from this order, so without it one seed trains on a
    # different sequence each run (and on a loaded machine, a different model). This
    # dataset's own context: other datasets of the session keep streaming out of order.
    features.context.execution_options.preserve_order = True
    # Ray Data stores the examples table in the object store once for all the tasks.
    joined = features.map_batches(
        _lookup_examples, fn_kwargs={"examples": examples}, batch_format="pyarrow",
        batch_size=1024,
    )
    if spec.block_rows:
        # Streaming: splits and merges neighbouring blocks, moves no row across the cluster.
        joined = joined.repartition(target_num_rows_per_block=spec.block_rows)
    joined = joined.materialize()
    joined_count = joined.count()
    # Unique keys on the examples side would be wrong (two posts may share an image); unique
    # keys on the feature side are the extractor's contract, and this checks it.
    if joined_count > examples.num_rows:
        raise ValueError(f"{feature_dir}: {joined_count} joined rows for {examples.num_rows} "
                         "examples: the feature table has duplicate images")
    stats = JoinStats(spec.split, examples.num_rows, joined_count,
                      examples.num_rows - joined_count)
    if stats.skipped_no_features:
        log.warning("%s/%s: %d of %d examples skipped: no %s features for their image",
                    spec.task, spec.split, stats.skipped_no_features, stats.examples,
                    spec.layer)
    return joined, stats


def shuffled_each_epoch(dataset: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """The blocks in a new order at every pass (epoch), reproducible from ``seed``.

    A block-order shuffle moves references, not rows: its cost stays flat however big the
    archive, where a full ``random_shuffle`` would send every feature across the object store
    each epoch. With small blocks (:class:`JoinSpec`) and each worker's local shuffle buffer
    (:func:`batch_options`) a batch draws from many blocks, hence many users.
    """
    from ray.data import RandomSeedConfig

    return dataset.randomize_block_order(
        seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def ingest_config() -> Any:
    """Ray Train's dataset config: the shards in the dataset's own order. Ray Train replaces
    a dataset's execution options with the session's defaults, where blocks stream out in
    the order their tasks finish; then one seed trains on another sequence every run (and a
    tiny test model lands on another F1). The dataset is materialized, so keeping its order
    costs nothing."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    # DataConfig.default_ingest_options() with order kept; built here because Ray's own copy
    # passes the deprecated exclude_resources, which warns on every training run.
    session = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=session.resource_limits, preserve_order=True,
                               verbose_progress=session.verbose_progress)
    return ray.train.DataConfig(execution_options=options)


def batch_options(shuffle_buffer: int, seed: int, epoch: int, rank: int) -> dict[str, Any]:
    """The local-shuffle arguments of a worker's ``iter_*batches`` for one epoch: a different
    seed for every (epoch, rank), so two epochs (and two workers) never mix alike."""
    if not shuffle_buffer:
        return {}
    return {"local_shuffle_buffer_size": shuffle_buffer,
            # hash() of a tuple of ints is the same in every process (no hash salt).
            "local_shuffle_seed": hash((seed, epoch, rank)) % 2**32}


_JOIN_CACHE: dict[tuple, tuple[Any, JoinStats]] = {}
_JOIN_CACHE_SIZE = 4


def _fingerprint(uris: list[str]) -> tuple:
    """Paths, sizes and modification times: a changed file means a new join."""
    if not uris:
        return ()
    fs, paths = _paths(uris)
    return tuple((i.path, i.size, i.mtime_ns) for i in fs.get_file_info(paths))


def _paths(uris: list[str]) -> tuple[Any, list[str]]:
    resolved = [storage.resolve(u) for u in uris]
    return resolved[0][0], [path for _, path in resolved]


def _rows(column: Any) -> list[np.ndarray]:
    """A batch column of lists (object array of arrays, or a 2-D array) as a list of rows."""
    if isinstance(column, np.ndarray) and column.dtype != object:
        if column.ndim < 2:
            raise ValueError(f"expected a column of lists, got an array of shape {column.shape}")
        return list(column)
    return [np.asarray(row) for row in column]


def pad_rows(rows: list[np.ndarray], length: int) -> np.ndarray:
    """Rows of ids, 0-padded (or cut, for contexts longer than D) to ``length``."""
    out = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        row = np.asarray(row, dtype=np.int64)[:length]
        out[i, : len(row)] = row
    return out


def collate_batch(
    batch: dict[str, Any], context_size: int, max_length: int = 16, image_layer: str = "pool5",
) -> dict[str, torch.Tensor]:
    """A numpy batch of joined rows -> model tensors.

    ``image_features`` [B, 2048] (pool5) or [B, 49, 2048] (res5c, slot-major);
    ``context_ids`` [B, D] 0-padded; ``input_ids`` = ``_GO`` + token_ids[:-1] and
    ``targets`` = token_ids, both 0-padded to ``max_length`` (token_ids end with ``_EOS``).
    """
    tokens = _rows(batch["token_ids"])
    too_long = [len(t) for t in tokens if len(t) > max_length]
    if too_long:
        raise ValueError(f"token_ids longer than max_length {max_length}: {too_long[:5]}")
    if any(len(t) == 0 for t in tokens):
        raise ValueError("an example has no token_ids (at least _EOS is expected)")
    targets = pad_rows(tokens, max_length)
    inputs = np.full_like(targets, PAD_ID)
    inputs[:, 0] = GO_ID
    for i, row in enumerate(tokens):
        inputs[i, 1 : len(row)] = np.asarray(row[:-1], dtype=np.int64)
    features = np.stack([np.asarray(f, dtype=np.float32) for f in _rows(batch["feature"])])
    if image_layer == "res5c":
        features = features.reshape(len(features), 49, -1)
    return {
        "image_features": torch.from_numpy(features),
        "context_ids": torch.from_numpy(pad_rows(_rows(batch["context_ids"]), context_size)),
        "input_ids": torch.from_numpy(inputs),
        "targets": torch.from_numpy(targets),
    }


class Collate(NumpyBatchCollateFn):
    """:func:`collate_batch` with its settings bound, for ``iter_torch_batches``."""

    def __init__(self, context_size: int, max_length: int = 16, image_layer: str = "pool5"):
        super().__init__()
        self.context_size = context_size
        self.max_length = max_length
        self.image_layer = image_layer

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return collate_batch(batch, self.context_size, self.max_length, self.image_layer)
