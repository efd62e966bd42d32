"""Training data: examples joined with image features through Ray Data, collated into tensors.

The examples of a task/split (``<root>/examples/<task>/<split>/``) are small (ids and a few
dozen token ids per post); the features (``<root>/features/<layer>/``, 8 KiB per image for
pool5, 392 KiB for res5c) are what is big. So the join streams the feature files through Ray
Data and looks each feature batch up in the examples table, which is broadcast once through
the object store. ``Dataset.join`` would hash-shuffle both sides and needs polars, which the
project does not install.

The joined train split is then kept one of two ways (``--materialize``,
:func:`choose_materialize`): *materialized* in the object store (:func:`joined_dataset`),
every epoch reading it there in a new block order (:func:`shuffled_each_epoch`); or, when it
would not fit (res5c at paper size is about 280 GB), *streamed* (:func:`streamed_dataset`):
written once to Parquet under ``<root>/cache/joined/`` in files of a block each, every epoch
reading the files in a new order. Either way each worker's local shuffle buffer
(:func:`batch_options`) mixes what it reads. The validation sample is always materialized:
it is a few thousand rows.

An example whose image has no feature row is *skipped*: it is counted and reported (the
feature extractor wrote the failed image to its own rejects), never silently lost:
``examples = joined + skipped_no_features``, the same counts in both ways.

:func:`collate_batch` is plain numpy/torch; :class:`Collate` binds it for Ray's iterators.
torch is imported there, in the training worker, not at the top: the join and shuffle run as
Ray Data tasks that unpickle this module's functions, and each of their worker processes would
otherwise spend seconds importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.collate_fn import NumpyBatchCollateFn

from csmn.core.tokens import GO_ID, PAD_ID
from csmn.data import layout, storage
from csmn.data.schemas import validate

if TYPE_CHECKING:
    import ray.data
    import torch

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
    table = validate(storage.read_parquet(uri, columns=read), "example", read)
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


def _joined_rows(root: str, spec: JoinSpec, feature_files: list[str]) -> tuple[Any, int]:
    """(the join as a lazy dataset in file order, examples in the split)."""
    import ray

    examples = read_examples(root, spec.task, spec.split, spec.limit, spec.columns, spec.seed)
    if not feature_files:
        raise FileNotFoundError(f"no {spec.layer} features at "
                                f"{layout.features_dir(root, spec.layer)}: run extract-features")
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
    return joined, examples.num_rows


def _join_stats(root: str, spec: JoinSpec, examples: int, joined: int) -> JoinStats:
    # Unique keys on the examples side would be wrong (two posts may share an image); unique
    # keys on the feature side are the extractor's contract, and this checks it.
    if joined > examples:
        raise ValueError(f"{layout.features_dir(root, spec.layer)}: {joined} joined rows for "
                         f"{examples} examples: the feature table has duplicate images")
    return _warn_skipped(spec, JoinStats(spec.split, examples, joined, examples - joined))


def _warn_skipped(spec: JoinSpec, stats: JoinStats) -> JoinStats:
    if stats.skipped_no_features:
        log.warning("%s/%s: %d of %d examples skipped: no %s features for their image",
                    spec.task, spec.split, stats.skipped_no_features, stats.examples,
                    spec.layer)
    return stats


def _join(root: str, spec: JoinSpec, feature_files: list[str]) -> tuple[Any, JoinStats]:
    joined, examples = _joined_rows(root, spec, feature_files)
    joined = joined.materialize()
    return joined, _join_stats(root, spec, examples, joined.count())


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


# --------------------------------------------------------------------------------------------
# Materialized or streamed: what the object store can hold
# --------------------------------------------------------------------------------------------

MATERIALIZE_MODES = ("auto", "always", "never")
# ``auto`` streams a join bigger than this share of the cluster's object store: the rest is
# for the blocks in flight (the workers' batches, the validation sample) and what else runs.
MATERIALIZE_SHARE = 0.3
# Bumped when the cached files change form: an older cache is then never read.
JOIN_CACHE_VERSION = 1
JOIN_COMMIT_FILE = "_joined.json"
# When a training last started streaming a cache: a superseded cache read within the grace
# is left to a later commit, as a training that started on it may still be reading it.
LAST_READ_FILE = "_last_read.json"
SUPERSEDED_GRACE_S = 24 * 3600.0
# Bytes (in memory) one read task of a streamed split reads: a few res5c files, or
# a hundred pool5 ones, so that task overheads stay small against the reading.
STREAM_READ_TASK_BYTES = 64 * 2**20


def choose_materialize(setting: str, joined_bytes: float, object_store_bytes: float,
                       share: float = MATERIALIZE_SHARE) -> tuple[str, str]:
    """(``always`` | ``never``, why): ``auto`` keeps the joined split in the object store
    while it takes at most ``share`` of it, and streams it from Parquet above that."""
    if setting not in MATERIALIZE_MODES:
        raise ValueError(f"materialize must be one of {', '.join(MATERIALIZE_MODES)}, "
                         f"got {setting!r}")
    if setting != "auto":
        return setting, f"materialize={setting} was asked for"
    sizes = (f"the joined split, about {_size_text(joined_bytes)}, against {share:.0%} of the "
             f"{_size_text(object_store_bytes)} object store")
    if joined_bytes > share * object_store_bytes:
        return "never", f"auto: {sizes}: too big, streamed"
    return "always", f"auto: {sizes}: fits, materialized"


def _size_text(size: float) -> str:
    return f"{size / 2**30:.3g} GiB" if size >= 2**30 else f"{size / 2**20:.3g} MiB"


def estimated_joined_bytes(root: str, task: str, split: str, layer: str,
                           columns: tuple[str, ...] = TRAINING_COLUMNS) -> int:
    """Rows x bytes per row of the joined split, from the Parquet footers alone: every
    example (some may lack a feature: an upper bound) with its ``columns`` and one feature.
    One feature file tells a feature's bytes: the layer fixes its size."""
    example_files, feature_files = _input_files(root, task, split, layer)
    if not example_files or not feature_files:
        return 0  # the join says what is missing
    example_rows, example_bytes = 0, 0
    for uri in example_files:
        rows, size, _ = _parquet_size(uri, columns)
        example_rows, example_bytes = example_rows + rows, example_bytes + size
    return round(example_bytes + example_rows * _feature_bytes(feature_files[0]))


def _parquet_size(uri: str, columns: tuple[str, ...]) -> tuple[int, int, Any]:
    """(rows, uncompressed bytes of ``columns``, Arrow schema) of one Parquet file, from its
    footer."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as stream:
        meta = pq.ParquetFile(stream).metadata
    size = 0
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if chunk.path_in_schema.split(".")[0] in columns:
                size += chunk.total_uncompressed_size
    return meta.num_rows, size, meta.schema.to_arrow_schema()


def _feature_bytes(uri: str) -> float:
    """Bytes of one row's feature in memory: exact for the extractor's fixed-size lists of
    floats (Parquet's own sizes count dictionary pages); else Parquet's uncompressed bytes."""
    rows, size, schema = _parquet_size(uri, ("feature",))
    kind = schema.field("feature").type
    if pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type):
        return kind.list_size * kind.value_type.bit_width / 8
    return size / max(rows, 1)


def streamed_dataset(root: str, task: str, split: str, layer: str, block_rows: int,
                     seed: int) -> tuple[ray.data.Dataset, JoinStats]:
    """Examples of ``task``/``split`` joined with ``layer`` features, streamed from Parquet
    in a new file order at every pass (epoch), reproducible from ``seed``.

    The join is written once under ``<root>/cache/joined/`` (:func:`layout.joined_cache_dir`)
    in files of ``block_rows`` rows, one user's posts each as the files are grouped by user:
    shuffling the file order is the block-order shuffle of :func:`shuffled_each_epoch`, and
    each worker's local shuffle buffer mixes the files it reads. No epoch holds more of the
    split in the object store than the blocks in flight. Changed inputs (examples, features,
    :class:`JoinSpec`) have another key, hence another cache.
    """
    import ray
    from ray.data import DataContext, FileShuffleConfig

    spec = JoinSpec(task, split, layer, block_rows=block_rows)
    example_files, feature_files = _input_files(root, task, split, layer)
    spec_digest = _digest((JOIN_CACHE_VERSION, spec))
    key = _digest((spec_digest, _fingerprint(example_files), _fingerprint(feature_files)))
    cache = layout.joined_cache_dir(root, task, split, layer, key)
    commit_uri = storage.join(cache, JOIN_COMMIT_FILE)
    if storage.exists(commit_uri):
        commit = storage.read_json(commit_uri)
        log.info("%s/%s: streaming the join written to %s", task, split, cache)
        # What an earlier commit kept (read within the grace then) goes once it is older.
        _delete_superseded(cache, spec_digest)
    else:
        commit = _write_join(root, spec, feature_files, cache, spec_digest)
    storage.write_bytes(storage.join(cache, LAST_READ_FILE),
                        json.dumps({"time": time.time()}).encode())
    fs, paths = _paths([storage.join(cache, name) for name in commit["files"]])
    # Ray 2.60's Parquet reader V2 lists the files and reads their footers again at every
    # execution, in 32 new actors: 20 s an epoch for 157 files on a 2-core node, where V1
    # reads the footers once, here, and only reorders them at each execution (4 s; 1 s with
    # a few files per read task). A read task reads neighbours of the shuffled order, so
    # fewer tasks change the blocks' sizes, not the order.
    context = DataContext.get_current()
    use_v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        # reseed_after_execution: a seed of its own for every pass, drawn from ``seed``.
        dataset = ray.data.read_parquet(
            paths, filesystem=fs,
            shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True),
            override_num_blocks=max(1, math.ceil(commit["bytes"] / STREAM_READ_TASK_BYTES)))
    finally:
        context.use_datasource_v2 = use_v2
    # The files in the shuffled order, not in the order their reads finish (see _joined_rows).
    dataset.context.execution_options.preserve_order = True
    return dataset, _warn_skipped(spec, JoinStats(**commit["stats"]))


def _write_join(root: str, spec: JoinSpec, feature_files: list[str], cache: str,
                spec_digest: str) -> dict[str, Any]:
    """Write the join into a build folder of its own under ``cache``, then commit it: the
    commit record lists its files and counts and is created only if absent, so of builds
    racing for one cache (two jobs training on one data root) the first to commit wins and
    every other reads its files. The winner deletes the rest of ``cache``: what killed builds
    left, and any build still racing, which then finds the commit and reads that."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        # ``part-<task>-<write>-<i>.parquet``: Ray appends ``-<i>`` per file of a task.
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06}-{write_uuid}.parquet"

    commit_uri = storage.join(cache, JOIN_COMMIT_FILE)
    build = storage.join(cache, f"build-{uuid.uuid4().hex}")
    started = time.perf_counter()
    try:
        joined, examples = _joined_rows(root, spec, feature_files)
        fs, path = storage.resolve(build)
        joined.write_parquet(path, filesystem=fs, filename_provider=PartNames(),
                             min_rows_per_file=spec.block_rows,
                             max_rows_per_file=spec.block_rows)
        files = sorted(storage.list_files(build, suffix=".parquet"), key=_natural_order)
        sizes = [_parquet_size(uri, (*spec.columns, "feature")) for uri in files]
        stats = _join_stats(root, spec, examples, sum(rows for rows, _, _ in sizes))
    except Exception:
        storage.delete(build)
        if storage.exists(commit_uri):  # our folder went with a winner's clean-up
            return _committed_elsewhere(spec, cache, commit_uri)
        raise
    commit = {"spec_digest": spec_digest, "stats": stats.as_dict(),
              "bytes": sum(size for _, size, _ in sizes),
              "files": [uri[len(cache):].lstrip("/") for uri in files]}
    body = json.dumps(commit, indent=2, sort_keys=True).encode()
    if not storage.create_if_absent(commit_uri, body):
        storage.delete(build)
        return _committed_elsewhere(spec, cache, commit_uri)
    log.info("%s/%s: join written to %s in %.1fs: %d files, %d rows", spec.task, spec.split,
             cache, time.perf_counter() - started, len(files), stats.joined)
    _delete_all_but(cache, (JOIN_COMMIT_FILE, build.rstrip("/").rsplit("/", 1)[1]))
    _delete_superseded(cache, spec_digest)
    return commit


def _committed_elsewhere(spec: JoinSpec, cache: str, commit_uri: str) -> dict[str, Any]:
    log.info("%s/%s: another job committed the join to %s first; streaming that one",
             spec.task, spec.split, cache)
    return storage.read_json(commit_uri)


def _delete_all_but(folder: str, keep: tuple[str, ...]) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(folder)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.base_name not in keep:
            storage.delete(storage.join(folder, info.base_name))


def _delete_superseded(cache: str, spec_digest: str, now: float | None = None) -> None:
    """Delete the finished caches of the same join from older inputs (a paper-size res5c
    join is hundreds of GB); other joins, unfinished folders, and caches a training started
    streaming within :data:`SUPERSEDED_GRACE_S` (it may be reading them still) stay."""
    import pyarrow.fs as pafs

    parent = cache.rstrip("/").rsplit("/", 1)[0]
    fs, parent_path = storage.resolve(parent)
    for info in fs.get_file_info(pafs.FileSelector(parent_path, allow_not_found=True)):
        sibling = storage.join(parent, info.base_name)
        commit_uri = storage.join(sibling, JOIN_COMMIT_FILE)
        if (info.type != pafs.FileType.Directory or sibling.rstrip("/") == cache.rstrip("/")
                or not storage.exists(commit_uri)):
            continue
        if storage.read_json(commit_uri).get("spec_digest") != spec_digest:
            continue
        age = _since_last_read(sibling, time.time() if now is None else now)
        if age is not None and age < SUPERSEDED_GRACE_S:
            log.info("kept the superseded join %s: a training started streaming it %.1f h "
                     "ago; a later training of this join deletes it", sibling, age / 3600)
            continue
        storage.delete(commit_uri)  # first: a half-deleted cache is never read
        storage.delete(sibling)


def _since_last_read(cache: str, now: float) -> float | None:
    """Seconds since a training last started streaming ``cache``; None if none ever did."""
    uri = storage.join(cache, LAST_READ_FILE)
    if not storage.exists(uri):
        return None
    try:
        return max(0.0, now - float(storage.read_json(uri)["time"]))
    except (ValueError, KeyError, TypeError):
        return 0.0  # unreadable: as if just read, the safe side


_PART_NAME = re.compile(r"part-(\d+)-[0-9a-f]+-(\d+)\.parquet$")


def _natural_order(uri: str) -> tuple[int, int, str]:
    """(write task, file of the task): ``...-2.parquet`` before ``...-10.parquet``, the
    order the rows were written in."""
    match = _PART_NAME.search(uri)
    task, part = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
    return task, part, uri


def _digest(value: Any) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def _input_files(root: str, task: str, split: str, layer: str) -> tuple[list[str], list[str]]:
    return (storage.list_files(layout.examples_dir(root, task, split), suffix=".parquet"),
            storage.list_files(layout.features_dir(root, layer), suffix=".parquet"))


def ingest_config() -> Any:
    """Ray Train's dataset config: the shards in the dataset's own order. Ray Train replaces
    a dataset's execution options with the session's defaults, where blocks stream out in
    the order their tasks finish; then one seed trains on another sequence every run (and a
    tiny test model lands on another F1). Keeping a materialized split's order costs
    nothing; a streamed split's reads then hand their blocks over in file order."""
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
    import torch

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
