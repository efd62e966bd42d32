"""The nightly job: suggested hashtags and a post text for every new post of an archive.

``python jobs/generate.py --archive URI --out URI [--hashtag-model models:/csmn-hashtag@champion]
[--post-model models:/csmn-post@champion] [--since auto|TIMESTAMP] [--run-date YYYY-MM-DD]``
(= ``csmn generate``). Ray Data throughout, in-process by default, a cluster under
``ray job submit``::

    archive sources --map_batches(readers + per-post features)--+
    committed predictions (user_id, post_id) -------------------+--union--> groupby(user_id)
      --map_groups(new posts, each with its user context from its history)--> materialized
      --map_batches(decode + resize + crop)--> map_batches(ResNet-101 actors)
      --map_batches(both champions' Predictors, actors)--> map_batches(write staged parts)
      --> the driver commits staged parts into predictions/run_date=YYYY-MM-DD/

**What is new.** A post is done when its row is committed in any ``run_date=`` partition of
``<out>/predictions/``: the state lives in the output, never only in memory. Every other post
of the archive is new (``--since TIMESTAMP`` leaves older ones as history only).

**Context and features as at training time.** Each champion's checkpoint carries how its
training data was made (``inputs``: vocabulary, D, document frequencies, per-post thresholds,
ResNet weights and image preprocessing). The context of a new post is built from the user's
posts created before it with exactly those (:mod:`csmn.text.history`); the features come
from the same weights and preprocessing, and a run whose weights differ is refused.

**Exactly once.** Decoding actors write *staged* parts (``predictions/_staging/<attempt>/``),
named by a digest of their posts, so a task Ray retries rewrites its own part. The driver
commits staged parts every ``commit_every`` parts and at the end, under a lease in the output
(:mod:`csmn.data.lease`): it drops the rows of posts committed meanwhile (by an overlapping
run), writes the rest as a part of the partition (atomic, content-named), then deletes the
staged part. A run killed at any point leaves committed rows of whole posts, and staged
parts that the next run commits first (when they came from the same model versions) before it
looks for new posts; so every post ends with exactly one row. Ray Data's own checkpointing is
not used: it resumes a pipeline, but the commit has to be atomic against other runs too.

Accounting, counted from the sources: records in = predicted + already done + history only
(before ``--since``) + rejected. Rejects (read, unusable record, duplicate post, image) go to
``<out>/rejects/generate/run_date=.../attempt=.../``. The archive is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from csmn.config import config_from_args, config_parser, config_to_dict
from csmn.core.image_decode import (
    DECODE_HELP,
    check_decode,
    check_precision,
    decodes_in_actor,
)
from csmn.data import layout, lease, storage
from csmn.data.completeness import exit_code_2
from csmn.data.layout import HASHTAG, POST, REGISTERED_MODEL_NAMES, TASKS
from csmn.data.rejects import parts_digest, reason_code, reject_row, write_reject_part
from csmn.data.schemas import conform
from csmn.pipeline.runtime import TASK_RETRIES
from csmn.text.filters import FilterThresholds
from csmn.text.history import TaskContext, history_contexts
from csmn.text.user_context import ContextSpec
from csmn.text.vocab import Vocabulary

log = logging.getLogger(__name__)

# torch (the checkpoints, the models, ResNet-101) is imported inside the functions that use
# it: Ray Data's light stages (reading, planning, tallies) unpickle this module's functions,
# and each of their worker processes would otherwise spend about 3 s importing torch.

STAGE = layout.GENERATE_STAGE
NONE = "none"
_TS = pa.timestamp("us", tz="UTC")
_STRINGS = pa.list_(pa.string())

# Stage 1 rows: a post of the archive (committed=False) or the key of a committed prediction.
POST_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("post_id", pa.string()), ("created_at", _TS),
    ("image", pa.string()), ("source", pa.string()),
    ("post_tokens", _STRINGS), ("hashtag_tokens", _STRINGS),
    ("non_english", pa.bool_()), ("advertisement", pa.bool_()),
    ("committed", pa.bool_()),
])
# Stage 2 rows: a new post with its contexts (kind "new"), or one user's tally (kind "tally").
TALLIES = ("posts", "already_done", "before_since", "duplicates")
PLAN_SCHEMA = pa.schema([
    ("kind", pa.string()), ("user_id", pa.string()), ("post_id", pa.string()),
    ("created_at", _TS), ("image", pa.string()), ("history_posts", pa.int64()),
    # Context words joined by one space (tokens hold none): a plain string column crosses
    # the numpy batches of the image stages as it is, where a list column would be pickled.
    *((f"{task}_context", pa.string()) for task in TASKS),
    *((name, pa.int64()) for name in TALLIES),
])


@dataclass
class GenerateConfig:
    """The nightly job's settings; every field is also a ``--field-name`` flag."""

    archive: str = field(default="", metadata={"help": "archive root (local or s3://), any "
                                                       "layout the readers accept"})
    out: str = field(default="", metadata={"help": "output root: predictions/ and rejects/"})
    # str | None: an empty YAML value (post_model: ~) turns the model off, as "none" does,
    # rather than leaving the default champion on.
    hashtag_model: str | None = field(
        default=f"models:/{REGISTERED_MODEL_NAMES[HASHTAG]}@champion",
        metadata={"help": "models:/ or runs:/ URI, a checkpoint folder, or none"})
    post_model: str | None = field(
        default=f"models:/{REGISTERED_MODEL_NAMES[POST]}@champion",
        metadata={"help": "models:/ or runs:/ URI, a checkpoint folder, or none"})
    tracking_uri: str = field(default="", metadata={
        "help": "MLflow tracking URI of the registry; empty: MLFLOW_TRACKING_URI"})
    since: str = field(default="auto", metadata={
        "help": "auto (every post without a committed prediction) | ISO timestamp (older "
                "posts are history only)"})
    run_date: str = field(default="", metadata={"help": "YYYY-MM-DD partition; empty: today "
                                                        "(UTC)"})
    weights: str = field(default="", metadata={
        "help": "ResNet-101 weights (imagenet | PATH | URI); empty: what the champions' "
                "features used. Must be the same weights either way"})
    use_gpu: bool = field(default=False, metadata={"help": "feature and decoding actors on "
                                                           "GPUs"})
    feature_actors: int = field(default=1, metadata={"help": "ResNet-101 actors"})
    decode_actors: int = field(default=1, metadata={"help": "decoding actors (both models)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per actor"})
    torch_threads: int = field(default=0, metadata={
        "help": "intra-op threads of a CPU actor; 0 = Ray's default"})
    batch_size: int = field(default=256, metadata={"help": "posts per decoding batch"})
    feature_batch_size: int = field(default=64, metadata={"help": "images per ResNet batch"})
    decode: str = field(default="auto", metadata={"help": DECODE_HELP})
    io_threads: int = field(default=8, metadata={"help": "concurrent image reads per task"})
    precision: str = field(default="auto", metadata={"help": "ResNet precision: auto | fp32 | "
                                                             "bf16 | fp16"})
    read_batch_size: int = field(default=1000, metadata={"help": "raw posts per parsed batch"})
    image_roots: tuple[str, ...] = field(default=(), metadata={
        "help": "prefixes outside the archive where its images may live (else bad_path)"})
    user_partitions: int = field(default=0, metadata={
        "help": "partitions of the groupby on users (0: the sources, at most 2 per CPU)"})
    commit_every: int = field(default=16, metadata={"help": "staged parts per commit"})
    lease_ttl_s: float = field(default=600.0, metadata={
        "help": "the commit lease expires after this long (a killed run's is then broken)"})
    lease_wait_s: float = field(default=1800.0, metadata={
        "help": "how long to wait for another run's commit lease"})

    def __post_init__(self) -> None:
        if self.since != "auto":
            self.since_time()
        if self.run_date:
            # The partition's name: one spelling per day (fromisoformat also takes 20240102).
            try:
                self.run_date = date.fromisoformat(self.run_date).isoformat()
            except ValueError as err:
                raise ValueError(f"--run-date must be a date, YYYY-MM-DD, got "
                                 f"{self.run_date!r}") from err
        for name in ("feature_actors", "decode_actors", "batch_size", "feature_batch_size",
                     "commit_every", "read_batch_size", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        check_decode(self.decode)
        check_precision(self.precision)

    def since_time(self) -> datetime | None:
        if self.since == "auto":
            return None
        try:
            parsed = datetime.fromisoformat(self.since)
        except ValueError as err:
            raise ValueError(f"--since must be auto or an ISO timestamp, got {self.since!r}"
                             ) from err
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    def model_uris(self) -> dict[str, str]:
        """Task -> model URI of the tasks this run generates for."""
        uris = {HASHTAG: self.hashtag_model, POST: self.post_model}
        return {task: uri for task, uri in uris.items() if uri and uri.lower() != NONE}


# --------------------------------------------------------------------------- the models
@dataclass
class Champion:
    """One model of the run: where it came from, its checkpoint files (shipped to the
    actors through the object store) and how its training data was made."""

    task: str
    uri: str
    name: str
    version: str
    files: dict[str, bytes]
    vocab: list[str]
    inputs: dict[str, Any]

    @property
    def layer(self) -> str:
        return self.inputs["features"]["layer"]

    def task_context(self) -> TaskContext:
        vocab = Vocabulary(self.vocab)
        spec = ContextSpec.from_json(self.inputs["context"], self.vocab)
        known = {f.name for f in dataclasses.fields(FilterThresholds)}
        thresholds = FilterThresholds(**{k: v for k, v in self.inputs["text"].items()
                                         if k in known})
        return TaskContext(self.task, vocab, spec, thresholds)


def _weights_digest(model_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(model_bytes).hexdigest()[:16]


def _read_folder(directory: str) -> dict[str, bytes]:
    return {os.path.basename(uri): storage.read_bytes(uri)
            for uri in storage.list_files(directory, recursive=False)}


def load_champion(task: str, uri: str, tracking_uri: str | None) -> Champion:
    """The model behind ``uri``, pinned: an alias is resolved to its version once, so a
    promotion during the run cannot mix two models in one night."""
    from csmn.core.checkpoint import METADATA_FILE, MODEL_FILE, read_metadata

    name, version = uri, ""
    with tempfile.TemporaryDirectory() as work_dir:
        if uri.startswith(("models:/", "runs:/")):
            from csmn import tracking

            if not tracking_uri:
                raise ValueError(f"{uri}: set MLFLOW_TRACKING_URI to read models from the "
                                 "registry")
            # An alias or /latest, pinned to the version it names now.
            uri = tracking.pinned_model_uri(uri, tracking_uri)
            source = tracking.model_source(uri, tracking_uri)
            if source.name and source.version:
                name, version = source.name, source.version
                uri = f"models:/{name}/{version}"
            directory = tracking.resolve_checkpoint(uri, tracking_uri, work_dir)
        else:
            directory = uri
        metadata = read_metadata(directory)
        files = _read_folder(directory)
    if metadata["task"] != task:
        raise ValueError(f"{uri} is a {metadata['task']} model, given as the {task} model")
    inputs = metadata.get("inputs") or {}
    missing = [k for k in ("context", "features", "text") if k not in inputs]
    if missing:
        raise ValueError(
            f"{uri}: the checkpoint does not say how its training data was made (no "
            f"{', '.join(missing)} in its inputs): it was trained on a data root from before "
            "document frequencies were kept. Preprocess and train again.")
    files = {k: v for k, v in files.items() if k in (METADATA_FILE, MODEL_FILE)}
    return Champion(task, uri, name, version or _weights_digest(files[MODEL_FILE]), files,
                    list(metadata["vocab"]), inputs)


@dataclass(frozen=True)
class FeatureSpec:
    """The features every champion of the run learned from: one ResNet, one preprocessing."""

    weights: str
    seed: int
    fingerprint: str
    preprocess: dict[str, Any]
    layers: tuple[str, ...]


def feature_spec(champions: Sequence[Champion], weights_override: str = "") -> FeatureSpec:
    specs = {c.task: c.inputs["features"] for c in champions}
    fingerprints = {t: s["weights"].get("fingerprint") for t, s in specs.items()}
    keys = ("resize_size", "crop_size", "mean", "std", "exif_transpose", "jpeg_draft")
    preprocess = {t: {k: s["preprocess"].get(k) for k in keys} for t, s in specs.items()}
    if len(set(fingerprints.values())) > 1 or len({json.dumps(p) for p in
                                                   preprocess.values()}) > 1:
        raise ValueError(f"the champions learned from different image features (weights "
                         f"{fingerprints}, preprocessing {preprocess}): run them one at a "
                         "time (--post-model none, then --hashtag-model none)")
    first = next(iter(specs.values()))
    weights = first["weights"]
    return FeatureSpec(
        weights=weights_override or str(weights.get("spec") or ""),
        seed=int(weights.get("seed") or 0),
        fingerprint=str(weights.get("fingerprint")),
        preprocess=next(iter(preprocess.values())),
        layers=tuple(sorted({s["layer"] for s in specs.values()})),
    )


def check_weights(spec: FeatureSpec) -> None:
    """Refuse weights other than the champions' (a model on features of other weights
    decodes noise, and says nothing)."""
    from csmn.core.image_features import load_state_dict, random_weights_info

    # The weights' identity only: the actors build the network.
    info = (random_weights_info(spec.seed) if spec.weights.strip().lower() == "random"
            else load_state_dict(spec.weights)[1])
    if info.fingerprint != spec.fingerprint:
        raise ValueError(f"--weights {spec.weights!r} are {info.fingerprint}, but the champions "
                         f"learned from features of {spec.fingerprint}: pass those weights")
    if info.random:
        log.warning("*** %s", info.warning)


# --------------------------------------------------------------------------- stage 1
def read_posts(batch: pa.Table, archive: str, rejects_dir: str, read_batch_size: int,
               max_non_english_fraction: float, image_roots: tuple[str, ...] = ()
               ) -> Iterator[pa.Table]:
    """Ray Data batch function: source URIs -> their posts (POST_SCHEMA); reader rejects and
    unusable records are written to ``rejects_dir``."""
    from csmn.data import readers
    from csmn.pipeline.preprocess import features_table

    for source in batch.column("source").to_pylist():
        for i, (posts, read_rejects) in enumerate(
                readers.parse_source(source, archive, batch_size=read_batch_size,
                                     image_roots=image_roots)):
            table, rejects = features_table(posts, source, max_non_english_fraction)
            write_reject_part([*read_rejects, *rejects], rejects_dir, f"{source}#{i}")
            table = table.append_column("committed", pa.array([False] * table.num_rows))
            yield table.select(POST_SCHEMA.names).cast(POST_SCHEMA)


def committed_keys_table(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: committed (user_id, post_id) -> POST_SCHEMA rows."""
    n = batch.num_rows
    columns = {name: pa.nulls(n, type=POST_SCHEMA.field(name).type) for name in POST_SCHEMA.names}
    columns.update(user_id=batch.column("user_id"), post_id=batch.column("post_id"),
                   committed=pa.array([True] * n))
    return pa.table(columns, schema=POST_SCHEMA)


# --------------------------------------------------------------------------- stage 2
def _first_of_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(one row per post id, the others): the first by (time, image, source) is kept, as
    preprocessing keeps it, so a rerun decides alike."""
    def key(row: dict[str, Any]) -> tuple:
        created = row["created_at"]
        return (row["post_id"], "" if created is None else created.isoformat(), row["image"],
                row["source"] or "")

    kept, duplicates, seen = [], [], set()
    for row in sorted(rows, key=key):
        (duplicates if row["post_id"] in seen else kept).append(row)
        seen.add(row["post_id"])
    return kept, duplicates


def _history_sizes(posts: Sequence[dict[str, Any]], new: Sequence[int]) -> dict[int, int]:
    times = sorted(p["created_at"].timestamp() for p in posts if p["created_at"] is not None)
    import bisect

    out = {}
    for i in new:
        created = posts[i]["created_at"]
        out[i] = (len(posts) - 1 if created is None
                  else bisect.bisect_left(times, created.timestamp()))
    return out


def plan_user(group: pa.Table, contexts: list[TaskContext], since: datetime | None,
              rejects_dir: str) -> pa.Table:
    """Stage 2 for one user: every post without a committed prediction (and not before
    ``since``), with its context for each model from the posts created before it; and one
    tally row. Duplicate post ids are rejected. Does not depend on the order of the rows."""
    rows = group.to_pylist()
    user_id = rows[0]["user_id"]
    done = {r["post_id"] for r in rows if r["committed"]}
    posts, duplicates = _first_of_duplicates([r for r in rows if not r["committed"]])
    write_reject_part([reject_row(
        STAGE, f"duplicate_post: post {r['post_id']!r} of user {user_id!r} seen before; the "
               "first by (time, image, source) is kept",
        record_id=r["post_id"], source=r["source"],
        payload={k: r[k] for k in ("user_id", "post_id", "created_at", "image")})
        for r in duplicates], rejects_dir, f"user:{user_id}")
    before = {i for i, p in enumerate(posts) if p["post_id"] not in done and since is not None
              and p["created_at"] is not None and p["created_at"] < since}
    new = [i for i, p in enumerate(posts) if p["post_id"] not in done and i not in before]
    per_task = {c.task: history_contexts(posts, new, c) for c in contexts}
    history = _history_sizes(posts, new)
    out = [{"kind": "new", "user_id": user_id, "post_id": posts[i]["post_id"],
            "created_at": posts[i]["created_at"], "image": posts[i]["image"],
            "history_posts": history[i],
            **{f"{task}_context": " ".join(per_task[task][i]) if task in per_task else None
               for task in TASKS}}
           for i in new]
    out.append({"kind": "tally", "user_id": user_id, "posts": len(posts) + len(duplicates),
                "already_done": sum(1 for p in posts if p["post_id"] in done),
                "before_since": len(before), "duplicates": len(duplicates)})
    return pa.Table.from_pylist(out, schema=PLAN_SCHEMA)


def rows_of_kind(batch: pa.Table, kind: str) -> pa.Table:
    return batch.filter(pc.equal(batch.column("kind"), kind))


# --------------------------------------------------------------------------- stage 3-4
class GenerateActor:
    """Both champions' Predictors, loaded once per actor, applied to batches of new posts."""

    def __init__(self, champions: dict[str, Any], use_gpu: bool, batch_size: int,
                 torch_threads: int) -> None:
        import ray
        import torch

        from csmn.core.predictor import Predictor

        if not use_gpu and torch_threads > 0:
            torch.set_num_threads(torch_threads)
        if isinstance(champions, ray.ObjectRef):
            champions = ray.get(champions)
        self.champions: dict[str, Champion] = champions
        self.predictors = {}
        for task, champion in self.champions.items():
            with tempfile.TemporaryDirectory() as directory:
                for name, data in champion.files.items():
                    with open(os.path.join(directory, name), "wb") as f:
                        f.write(data)
                self.predictors[task] = Predictor.from_checkpoint(
                    directory, device="cuda" if use_gpu else "cpu", batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) for e in batch["error"]]
        ok = np.flatnonzero([not e for e in errors])
        n = len(errors)
        columns: dict[str, Any] = {
            "user_id": [str(v) for v in batch["user_id"]],
            "post_id": [str(v) for v in batch["post_id"]],
            "image": [str(v) for v in batch["image"]],
            "created_at": pa.array(batch["created_at"]).cast(_TS),
            "history_posts": [int(v) for v in batch["history_posts"]],
            "error": errors,
        }
        for task in TASKS:
            words: list[Any] = [None] * n
            used: list[Any] = [None] * n
            champion = self.champions.get(task)
            if champion is not None and len(ok):
                contexts = [str(batch[f"{task}_context"][i]).split() for i in ok]
                prediction = self.predictors[task].predict(batch[champion.layer][ok], contexts)
                for row, i in enumerate(ok):
                    words[i] = prediction.words[row]
                    used[i] = prediction.used_context[row]
            if task == HASHTAG:
                columns["hashtags"] = words
            else:
                columns["post_text"] = [None if w is None else " ".join(w) for w in words]
            columns[f"{task}_used_context"] = used
            columns[f"{task}_model"] = [champion.name if champion else None] * n
            columns[f"{task}_model_version"] = [champion.version if champion else None] * n
        staged = pa.table({name: columns[name] for name in STAGED_SCHEMA.names},
                          schema=STAGED_SCHEMA)
        # Where each image was decoded, for the summary only (not a staged column).
        decoded_on = batch.get("decoded_on")
        return staged.append_column("decoded_on", pa.array(
            [str(v) for v in decoded_on] if decoded_on is not None else [""] * n, pa.string()))


def write_staged(batch: pa.Table, out: str, attempt: str, rejects_dir: str) -> pa.Table:
    """Stage 5: the batch's predictions as one staged part, named by its posts; its image
    rejects as one rejects part. One outcome row per post goes back to the driver."""
    errors = batch.column("error").to_pylist()
    good = pc.equal(batch.column("error"), "")
    staged = batch.filter(good).drop_columns(["error", "decoded_on"])
    part = ""
    if staged.num_rows:
        n = staged.num_rows
        staged = staged.append_column("generated_at", pa.array([datetime.now(UTC)] * n, _TS))
        staged = staged.append_column("attempt", pa.array([attempt] * n))
        keys = sorted(f"{u}\x1f{p}" for u, p in zip(staged.column("user_id").to_pylist(),
                                                     staged.column("post_id").to_pylist(),
                                                     strict=True))
        part = storage.join(layout.predictions_staging_dir(out, attempt),
                            f"part-{parts_digest(keys)}.parquet")
        storage.write_parquet(part, conform(staged, "generated_post"))
    bad = batch.filter(pc.invert(good)).select(["user_id", "post_id", "image", "error"]).to_pylist()
    # Named by the posts (user and post id), as the staged part is: a reject row holds the
    # post id only, and two users' posts of one id and one broken image must not share a name.
    write_reject_part([reject_row(STAGE, r["error"], record_id=r["post_id"], source=r["image"],
                                  payload={"user_id": r["user_id"], "post_id": r["post_id"]})
                       for r in bad], rejects_dir,
                      "images\x1f" + parts_digest(sorted(f"{r['user_id']}\x1f{r['post_id']}"
                                                         for r in bad)))
    return pa.table({"part": [part] * batch.num_rows,
                     "outcome": ["staged" if not e else reason_code(e) for e in errors],
                     "decoded_on": batch.column("decoded_on")})


def _staged_schema() -> pa.Schema:
    from csmn.data.schemas import load_schema

    schema = load_schema("generated_post")
    fields = [schema.field(n) for n in schema.names if n not in ("generated_at", "attempt")]
    return pa.schema([*fields, pa.field("error", pa.string())])


STAGED_SCHEMA = _staged_schema()


# --------------------------------------------------------------------------- the commit
def _part_files(out: str) -> list[str]:
    """Committed parts of every partition (staging, summaries and leases start with '_')."""
    root = layout.predictions_dir(out)
    if not storage.exists(root):
        return []
    return [uri for uri in storage.list_files(root, suffix=".parquet")
            if not any(seg.startswith("_") for seg in uri[len(root):].split("/"))]


def _keys(uris: Iterable[str]) -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    for uri in uris:
        try:
            table = storage.read_parquet(uri, columns=["user_id", "post_id"])
        except FileNotFoundError:
            continue
        keys.update(zip(table.column("user_id").to_pylist(),
                        table.column("post_id").to_pylist(), strict=True))
    return keys


class Committer:
    """Moves staged parts into the run's partition, each post once across all runs."""

    def __init__(self, config: GenerateConfig, run_date: str, versions: dict[str, str],
                 names: dict[str, str] | None = None):
        """``versions`` (and ``names``): task -> the model version (and registered name) of
        this run; a staged row of another model is dropped, not committed. Version numbers
        alone repeat across registered models (and a model deleted and made again)."""
        self.config, self.run_date, self.versions = config, run_date, versions
        self.names = names or {}
        self.keys_read: set[str] = set()  # committed parts whose keys are in committed
        self.partition = layout.predictions_partition(config.out, run_date)
        self.seen = set(_part_files(config.out))
        self.committed: set[tuple[str, str]] = set()  # by others since we listed, or by us
        self.reset_counts()

    def reset_counts(self) -> None:
        self.rows = 0
        self.dropped_as_done = 0
        self.dropped_other_models = 0
        self.taken_by_another_run = 0

    def commit(self, staged: Sequence[str], known_all: bool = False,
               staged_rows: Mapping[str, int] | None = None) -> int:
        """Commit ``staged`` parts; with ``known_all``, every committed key is read first
        (recovery of another run's parts, which may predate this run's listing).
        ``staged_rows``: posts per part, for the parts an overlapping run took first."""
        if not staged:
            return 0
        written = 0
        if known_all:
            # Committed parts never change: their keys are read before the lease, which
            # then covers only what was committed since (reading every part of a large
            # output under it outlasted its expiry).
            self._read_keys(_part_files(self.config.out))
        with lease.held(layout.predictions_lease_uri(self.config.out),
                        self.config.lease_ttl_s, self.config.lease_wait_s) as held:
            current = _part_files(self.config.out)
            self._read_keys(current if known_all else
                            [u for u in current if u not in self.seen])
            self.seen.update(current)
            for uri in staged:
                held = lease.renewed(held, self.config.lease_ttl_s)
                written += self._commit_part(uri, (staged_rows or {}).get(uri, 0))
        return written

    def _read_keys(self, parts: Sequence[str]) -> None:
        new = [u for u in parts if u not in self.keys_read]
        self.committed |= _keys(new)
        self.keys_read.update(new)

    def _commit_part(self, uri: str, staged_rows: int = 0) -> int:
        try:
            table = storage.read_parquet(uri)
        except FileNotFoundError:
            # A run that started while this one worked recovered the part first (committed
            # it, or dropped it for a promotion in between): its posts are that run's now.
            self.taken_by_another_run += staged_rows
            return 0
        keep, seen_here = [], set()
        users, posts = table.column("user_id").to_pylist(), table.column("post_id").to_pylist()
        same_models = np.ones(table.num_rows, dtype=bool)
        for task, version in self.versions.items():
            column = table.column(f"{task}_model_version").to_pylist()
            same_models &= np.array([v == version for v in column], dtype=bool)
        for task, name in self.names.items():
            column = table.column(f"{task}_model").to_pylist()
            same_models &= np.array([v == name for v in column], dtype=bool)
        for i, key in enumerate(zip(users, posts, strict=True)):
            if not same_models[i]:
                self.dropped_other_models += 1
            elif key in self.committed or key in seen_here:
                self.dropped_as_done += 1
            else:
                keep.append(i)
                seen_here.add(key)
        if keep:
            kept = table.take(keep)
            name = parts_digest(sorted(f"{u}\x1f{p}" for u, p in seen_here))
            target = storage.join(self.partition, f"part-{name}.parquet")
            storage.write_parquet(target, kept)
            self.seen.add(target)
            self.keys_read.add(target)
            self.committed |= seen_here
        storage.delete(uri)
        self.rows += len(keep)
        return len(keep)


def recover_staged(committer: Committer, out: str) -> int:
    """Commit what earlier (killed) runs staged with the same models; drop the rest."""
    staging = layout.predictions_staging_dir(out)
    if not storage.exists(staging):
        return 0
    parts = storage.list_files(staging, suffix=".parquet")
    if not parts:
        return 0
    log.info("committing %d part(s) staged by earlier runs", len(parts))
    return committer.commit(parts, known_all=True)


# --------------------------------------------------------------------------- the job
def _partitions(config: GenerateConfig, sources: list[str]) -> int:
    import ray

    if config.user_partitions > 0:
        return config.user_partitions
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(len(sources), 2 * cpus))


def _planned_posts(config: GenerateConfig, champions: dict[str, Champion], sources: list[str],
                   committed: list[str], rejects_dir: str) -> Any:
    """Stages 1-2, materialized: new posts with their contexts, and per-user tallies."""
    import ray

    thresholds = next(iter(champions.values())).task_context().thresholds
    posts = ray.data.from_items([{"source": s} for s in sources],
                                override_num_blocks=max(1, len(sources))).map_batches(
        read_posts, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"archive": config.archive, "rejects_dir": rejects_dir,
                   "read_batch_size": config.read_batch_size,
                   "max_non_english_fraction": thresholds.max_non_english_fraction,
                   "image_roots": tuple(config.image_roots)})
    if committed:
        fs, paths = _paths(committed)
        done = ray.data.read_parquet(paths, filesystem=fs, columns=["user_id", "post_id"])
        posts = posts.union(done.map_batches(committed_keys_table, batch_format="pyarrow"))
    contexts = [c.task_context() for c in champions.values()]
    return posts.groupby("user_id", num_partitions=_partitions(config, sources)).map_groups(
        plan_user, batch_format="pyarrow",
        fn_kwargs={"contexts": contexts, "since": config.since_time(),
                   "rejects_dir": rejects_dir}).materialize()


def _paths(uris: list[str]) -> tuple[Any, list[str]]:
    fs, _ = storage.resolve(uris[0])
    return fs, [storage.resolve(u)[1] for u in uris]


def _tallies(planned: Any) -> Counter[str]:
    totals: Counter[str] = Counter()
    for batch in planned.map_batches(rows_of_kind, batch_format="pyarrow",
                                     fn_kwargs={"kind": "tally"}).iter_batches(
            batch_format="pyarrow", batch_size=None):
        for name in TALLIES:
            totals[name] += int(pc.sum(batch.column(name)).as_py() or 0)
    return totals


def _predictions(config: GenerateConfig, champions_ref: Any, champions: dict[str, Champion],
                 spec: FeatureSpec, work: Any, attempt: str, rejects_dir: str) -> Any:
    """Stages 3-5 over the new posts: pixels, features, both models, staged parts."""
    from ray.data import ActorPoolStrategy

    from csmn.core.image_features import PreprocessConfig
    from csmn.pipeline.extract import FeatureActor, cpu_stage

    preprocess = PreprocessConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                     for k, v in spec.preprocess.items()})
    gpu = 1 if config.use_gpu else 0
    in_actor = decodes_in_actor(config.decode, config.use_gpu)
    stage, options = cpu_stage(in_actor, preprocess)
    log.info("images decoded in %s", "the feature actors" if in_actor else "CPU tasks")
    pixels = work.map_batches(
        stage, batch_size=config.feature_batch_size,
        fn_kwargs={**options, "io_threads": config.io_threads})
    features = pixels.map_batches(
        FeatureActor, batch_size=config.feature_batch_size,
        compute=ActorPoolStrategy(size=config.feature_actors),
        num_cpus=config.cpus_per_actor, num_gpus=gpu,
        fn_constructor_kwargs={
            "weights": spec.weights, "seed": spec.seed, "fingerprint": spec.fingerprint,
            "layers": spec.layers, "use_gpu": config.use_gpu, "precision": config.precision,
            "mean": preprocess.mean, "std": preprocess.std,
            "torch_threads": config.torch_threads, "preprocess": preprocess,
            "decode_on_device": in_actor})
    decoded = features.map_batches(
        GenerateActor, batch_size=config.batch_size,
        compute=ActorPoolStrategy(size=config.decode_actors),
        num_cpus=config.cpus_per_actor, num_gpus=gpu,
        fn_constructor_kwargs={"champions": champions_ref, "use_gpu": config.use_gpu,
                               "batch_size": config.batch_size,
                               "torch_threads": config.torch_threads})
    return decoded.map_batches(write_staged, batch_size=None, batch_format="pyarrow",
                               fn_kwargs={"out": config.out, "attempt": attempt,
                                          "rejects_dir": rejects_dir})


def _count_rejects(rejects_dir: str) -> dict[str, Counter[str]]:
    """This run's rejects by stage (``read``/``preprocess``: records that never became a
    post; ``generate``: posts) and reason code, from the files themselves."""
    counts: dict[str, Counter[str]] = {}
    if storage.exists(rejects_dir) and storage.list_files(rejects_dir, suffix=".parquet"):
        table = storage.read_parquet(rejects_dir, columns=["stage", "reason"])
        for stage, reason in zip(table.column("stage").to_pylist(),
                                 table.column("reason").to_pylist(), strict=True):
            counts.setdefault(stage, Counter())[reason_code(reason)] += 1
    return counts


def run_generate(config: GenerateConfig) -> dict[str, Any]:
    """One nightly run; returns (and writes beside the partition) its summary."""
    import ray

    from csmn.data import readers
    from csmn.pipeline.runtime import init_ray

    if not config.archive or not config.out:
        raise ValueError("--archive and --out are required")
    started = time.perf_counter()
    run_date = config.run_date or datetime.now(UTC).date().isoformat()
    attempt = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    rejects_dir = storage.join(layout.generation_rejects_dir(config.out, run_date),
                               f"attempt={attempt}")
    tracking_uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uris = config.model_uris()
    if not uris:
        raise ValueError("both models are none: nothing to generate")
    champions = {task: load_champion(task, uri, tracking_uri) for task, uri in uris.items()}
    for c in champions.values():
        log.info("%s model: %s version %s (%s)", c.task, c.name, c.version, c.layer)
    spec = feature_spec(list(champions.values()), config.weights)
    check_weights(spec)
    sources = readers.list_sources(config.archive)

    init_ray()
    versions = {task: c.version for task, c in champions.items()}
    committer = Committer(config, run_date, versions,
                          names={task: c.name for task, c in champions.items()})
    recovered = recover_staged(committer, config.out)
    committer.reset_counts()
    committed_files = sorted(committer.seen)
    log.info("%d source(s); %d committed part(s) from earlier runs", len(sources),
             len(committed_files))

    # Records in are counted from the files by tasks of their own: a count taken from the
    # parser's output could not see what the parser lost.
    counting = [ray.remote(**TASK_RETRIES)(readers.count_records).remote(source, config.archive)
                for source in sources]
    planned = _planned_posts(config, champions, sources, committed_files, rejects_dir)
    tallies = _tallies(planned)
    tallies["records_in"] = sum(ray.get(counting))
    work = planned.map_batches(rows_of_kind, batch_format="pyarrow", fn_kwargs={"kind": "new"})
    new_posts = work.count()
    log.info("%d new post(s) of %d; %d already done, %d before --since, %d duplicates",
             new_posts, tallies["posts"], tallies["already_done"], tallies["before_since"],
             tallies["duplicates"])

    outcomes: Counter[str] = Counter()
    decoded_on: Counter[str] = Counter()
    pending: list[str] = []
    part_rows: Counter[str] = Counter()
    decode_started = time.perf_counter()
    if new_posts:
        staged = _predictions(config, ray.put(champions), champions, spec, work, attempt,
                              rejects_dir)
        for batch in staged.iter_batches(batch_format="pyarrow", batch_size=None):
            outcomes.update(batch.column("outcome").to_pylist())
            decoded_on.update(v for v in batch.column("decoded_on").to_pylist() if v)
            parts = [p for p in batch.column("part").to_pylist() if p]
            part_rows.update(parts)
            pending.extend(sorted(set(parts)))
            if len(pending) >= config.commit_every:
                committer.commit(pending, staged_rows=part_rows)
                pending = []
                done = sum(outcomes.values())
                rate = done / max(time.perf_counter() - decode_started, 1e-9)
                log.info("committed %d of %d new posts (%.1f posts/s)", committer.rows,
                         new_posts, rate)
        committer.commit(pending, staged_rows=part_rows)
    decode_seconds = time.perf_counter() - decode_started
    # Parts a retried task wrote before it died hold only posts committed from its retry.
    storage.delete(layout.predictions_staging_dir(config.out, attempt))

    rejects = _count_rejects(rejects_dir)
    summary = _summary(config, run_date, attempt, champions, tallies, new_posts, outcomes,
                       committer, recovered, rejects, time.perf_counter() - started,
                       decode_seconds, decoded_on)
    storage.write_json(layout.generation_summary_uri(config.out, run_date, attempt), summary)
    storage.write_json(layout.generation_summary_uri(config.out, run_date), summary)
    if not summary["balance"]["balanced"]:
        raise RuntimeError(f"records in != predicted + already done + before --since + "
                           f"rejected: {summary['balance']}")
    return summary


def _summary(config: GenerateConfig, run_date: str, attempt: str,
             champions: dict[str, Champion], tallies: Counter[str], new_posts: int,
             outcomes: Counter[str], committer: Committer, recovered: int,
             rejects: dict[str, Counter[str]], seconds: float,
             decode_seconds: float, decoded_on: Counter[str]) -> dict[str, Any]:
    by_code: Counter[str] = Counter()
    for codes in rejects.values():
        by_code.update(codes)
    rejected = sum(by_code.values())
    # Records that never became a post (unreadable, unusable) are not in the posts tally.
    unread = sum(sum(codes.values()) for stage, codes in rejects.items() if stage != STAGE)
    records_in = tallies["records_in"]
    predicted = committer.rows
    accounted = (predicted + tallies["already_done"] + committer.dropped_as_done
                 + committer.taken_by_another_run + tallies["before_since"] + rejected)
    return {
        "run_date": run_date, "attempt": attempt, "archive": config.archive, "out": config.out,
        "models": {t: {"uri": c.uri, "name": c.name, "version": c.version, "layer": c.layer}
                   for t, c in champions.items()},
        "counts": {"records_in": records_in, "new": new_posts, "predicted": predicted,
                   "already_done": tallies["already_done"],
                   "done_by_another_run": committer.dropped_as_done,
                   "taken_by_another_run": committer.taken_by_another_run,
                   "before_since": tallies["before_since"], "rejected": rejected,
                   "staged": outcomes.get("staged", 0),
                   "recovered_from_earlier_runs": recovered},
        "rejects": dict(sorted(by_code.items())),
        # Images by decoder: pil (CPU tasks, or an actor's fallback), torchvision-<device>.
        "decoded_on": dict(sorted(decoded_on.items())),
        "balance": {"records_in": records_in, "accounted": accounted,
                    "lost": records_in - (tallies["posts"] + unread),
                    "balanced": records_in == accounted},
        "seconds": round(seconds, 2),
        "posts_per_second": round(new_posts / decode_seconds, 2)
        if decode_seconds > 0 and new_posts else 0.0,
        "config": config_to_dict(config),
    }


def format_summary(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    models = ", ".join(f"{t} {m['name']} v{m['version']}" for t, m in summary["models"].items())
    return (f"generate {summary['run_date']}: {c['predicted']} predicted, {c['already_done']} "
            f"already done, {c['before_since']} before --since, {c['rejected']} rejected "
            f"{summary['rejects']} of {c['records_in']} records; {summary['posts_per_second']} "
            f"posts/s; {models}")


def build_parser() -> argparse.ArgumentParser:
    return config_parser(GenerateConfig, "csmn generate", __doc__.split("\n")[0])


@exit_code_2("csmn generate")
def main(argv: list[str] | None = None) -> int:
    from csmn.pipeline.runtime import quiet_ray_data, setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    config = config_from_args(GenerateConfig, args, args.config_file)
    quiet_ray_data()
    summary = run_generate(config)
    print(format_summary(summary))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
