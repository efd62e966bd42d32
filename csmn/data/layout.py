"""The data root: every task, split and path that stages share, in one place.

::

    <root>/manifest.json                    written last by preprocessing: the root is complete
    <root>/examples/<task>/<split>/part-*.parquet
    <root>/vocab/<task>[_by_posts].json     a split by posts has a vocabulary of its own
    <root>/contexts/<task>.parquet          every user's context words (for the nightly job)
    <root>/features/<layer>/part-*.parquet, _meta.json
    <root>/rejects/<stage>/part-*.parquet
    <root>/cache/joined/<task>/<split>/<layer>/<key>/   a streamed training join (rebuildable)
    <root>/evaluations/<task>-<split>-<time>/
    <root>/mlflow.db                        the default MLflow store for a local root

Tasks are ``post`` (the post text, "caption" in the paper's code) and ``hashtag``; splits
are by users (``train``, ``val``, ``test``, both tasks) and by posts (``*_by_posts``, the
hashtag task only; paper 5.1).
"""

from __future__ import annotations

from csmn.data import storage
from csmn.data.names import (  # noqa: F401 (re-exported: one place, two doors)
    BY_POSTS_SPLITS,
    BY_POSTS_SUFFIX,
    BY_POSTS_TASK,
    BY_USERS_SPLITS,
    FEATURE_DIM,
    HASHTAG,
    IMAGE_SLOTS,
    LAYERS,
    POST,
    REGISTERED_MODEL_NAMES,
    SPLIT_FAMILIES,
    SPLITS,
    TASK_ALIASES,
    TASKS,
    TEST,
    TEST_BY_POSTS,
    TRAIN,
    TRAIN_BY_POSTS,
    VAL,
    VAL_BY_POSTS,
    canonical_task,
)

MANIFEST_FILE = "manifest.json"
FEATURES_META_FILE = "_meta.json"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def is_by_posts(split: str) -> bool:
    return split.endswith(BY_POSTS_SUFFIX)


def family_of(split: str) -> str:
    return "by_posts" if is_by_posts(split) else "by_users"


def train_split_of(split: str) -> str:
    """The training split of the family ``split`` belongs to."""
    return TRAIN_BY_POSTS if is_by_posts(split) else TRAIN


def task_splits(task: str, by_posts: bool = True) -> tuple[str, ...]:
    """The splits preprocessing writes for a task."""
    return SPLITS if task == BY_POSTS_TASK and by_posts else BY_USERS_SPLITS


def check_layer(layer: str) -> str:
    if layer not in IMAGE_SLOTS:
        raise ValueError(f"image layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    return layer


def manifest_uri(root: str) -> str:
    return storage.join(root, MANIFEST_FILE)


def manifest_context_size(root: str) -> int | None:
    """D the data root's contexts were preprocessed with (None: no manifest, or none said)."""
    uri = manifest_uri(root)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    value = manifest.get("context_size") or (manifest.get("config") or {}).get("context_size")
    return int(value) if value else None


def examples_root(root: str) -> str:
    return storage.join(root, "examples")


def examples_dir(root: str, task: str, split: str) -> str:
    return storage.join(examples_root(root), canonical_task(task), check_split(split))


def vocab_name(task: str, split: str | None = None) -> str:
    """``hashtag`` + a ``*_by_posts`` split -> ``hashtag_by_posts``; otherwise the task."""
    task = canonical_task(task)
    if split is not None and is_by_posts(split):
        return task + BY_POSTS_SUFFIX
    return task


def vocab_dir(root: str) -> str:
    return storage.join(root, "vocab")


def vocab_uri(root: str, task: str, split: str | None = None) -> str:
    return storage.join(vocab_dir(root), f"{vocab_name(task, split)}.json")


def vocab_uri_by_name(root: str, name: str) -> str:
    return storage.join(vocab_dir(root), f"{name}.json")


def contexts_dir(root: str) -> str:
    return storage.join(root, "contexts")


def contexts_uri(root: str, task: str, split: str | None = None) -> str:
    """Each user's context: ``<task>.parquet`` from all of its kept posts (split by users),
    ``hashtag_by_posts.parquet`` from its training posts (split by posts)."""
    return contexts_uri_by_name(root, vocab_name(task, split))


def contexts_uri_by_name(root: str, name: str) -> str:
    return storage.join(contexts_dir(root), f"{name}.parquet")


def features_dir(root: str, layer: str) -> str:
    return storage.join(root, "features", check_layer(layer))


def features_meta_uri(root: str, layer: str) -> str:
    return storage.join(features_dir(root, layer), FEATURES_META_FILE)


def joined_cache_dir(root: str, task: str, split: str, layer: str, key: str) -> str:
    """Where training writes the join of a split with its features once, to stream it every
    epoch (``csmn.pipeline.train_data``). ``key`` digests what the join was made from, so
    changed inputs get a folder of their own; anything under ``cache/`` may be deleted."""
    return storage.join(root, "cache", "joined", canonical_task(task), check_split(split),
                        check_layer(layer), key)


def rejects_dir(root: str, stage: str) -> str:
    return storage.join(root, "rejects", stage)


def evaluations_dir(root: str) -> str:
    return storage.join(root, "evaluations")


# The nightly job's output root (``csmn generate --out``). Names that start with "_" are
# skipped by pyarrow and Ray Data when they read ``predictions/`` as a dataset: only the
# committed parts of the ``run_date=`` partitions are data.
GENERATE_STAGE = "generate"


def predictions_dir(out: str) -> str:
    return storage.join(out, "predictions")


def predictions_partition(out: str, run_date: str) -> str:
    return storage.join(predictions_dir(out), f"run_date={run_date}")


def predictions_staging_dir(out: str, attempt: str | None = None) -> str:
    staging = storage.join(predictions_dir(out), "_staging")
    return staging if attempt is None else storage.join(staging, attempt)


def predictions_lease_uri(out: str) -> str:
    return storage.join(predictions_dir(out), "_commit.lease")


def generation_summary_uri(out: str, run_date: str, attempt: str | None = None) -> str:
    """The last run's summary of a date, or (with ``attempt``) that run's own."""
    partition = predictions_partition(out, run_date)
    if attempt is None:
        return storage.join(partition, "_summary.json")
    return storage.join(partition, "_runs", f"{attempt}.json")


def generation_rejects_dir(out: str, run_date: str) -> str:
    return storage.join(rejects_dir(out, GENERATE_STAGE), f"run_date={run_date}")


# Manifest fields that differ between two runs over the same data: not part of its identity.
VOLATILE_MANIFEST_FIELDS = ("created_at", "seconds", "digest")


def content_digest(manifest: dict) -> str:
    """A digest of what the manifest says about the data (counts, splits, vocabularies,
    config), the same for two preprocessing runs of the same archive with the same config."""
    return _digest({k: v for k, v in manifest.items() if k not in VOLATILE_MANIFEST_FIELDS})


def _digest(value: object) -> str:
    import hashlib
    import json

    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def features_identity(root: str, layer: str) -> dict:
    """What makes the features of ``layer`` what they are: the weights and preprocessing
    recorded by the extractor and the part files. The manifest's digest does not cover them
    (features are extracted after preprocessing, and again with other weights)."""
    meta_uri = features_meta_uri(root, layer)
    meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
    parts = storage.list_files(features_dir(root, layer), ".parquet")
    return {**{k: meta.get(k) for k in ("weights", "preprocess", "precision", "status")},
            "parts": sorted(p.rsplit("/", 1)[-1] for p in parts)}


def features_digest(root: str, layer: str) -> str:
    """A short digest of :func:`features_identity`."""
    return _digest(features_identity(root, layer))


def write_manifest(root: str, manifest: dict) -> None:
    """Stamp ``manifest`` with its content digest and write it: the last write of a finished
    preprocessing, which every later stage checks for (csmn.data.completeness)."""
    manifest["digest"] = content_digest(manifest)
    storage.write_json(manifest_uri(root), manifest)


def data_digest(root: str) -> str:
    """The data root's identity: its manifest's content digest (the whole manifest's, for a
    manifest written before digests). Evaluations and promotions compare models on the same
    digest only."""
    import hashlib

    uri = manifest_uri(root)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{root} has no {MANIFEST_FILE}: the data root is incomplete; "
                                "rerun preprocess")
    raw = storage.read_bytes(uri)
    manifest = storage.read_json(uri)
    digest = manifest.get("digest") if isinstance(manifest, dict) else None
    return str(digest) if digest else hashlib.sha256(raw).hexdigest()[:16]
