"""The paper's Tables 2 and 3 on our data: train and evaluate the CSMN variants and the 1NN
baselines at a small, configurable size, and write the tables with the paper's figures beside
ours.

Every variant is trained by :func:`csmn.pipeline.train.train` (Ray Train, an MLflow run per
variant, split family and seed in the experiment ``csmn-<task>-ablation``) and evaluated by
:func:`csmn.pipeline.evaluate.evaluate` (Ray Data decoding, pycocoevalcap / hashtag-set F1).
The baselines are evaluated once per test split and seed. Hashtags are scored on both of the
paper's splits (Table 3: by users left, by posts right), each with its own training split and
vocabulary; posts on the split by users (Table 2).

``--seeds N`` runs every variant and baseline with the seeds ``seed .. seed+N-1`` (the
training seed: initial weights and data order; the evaluation seed: 1NN-Usr's draw); the table
shows the mean, the sample standard deviation and min..max of each method.

Outputs under ``out`` (default ``<data>/ablations/<task>``): ``results/<split>/<method>/
seed<N>-<key>.json``, one per (split, method, seed), written atomically as soon as that run
is evaluated; ``ablation.json`` (every number, the configs, the notes), ``ablation.md`` (the
table), one evaluation report folder per (method, split, seed), and an MLflow run
``ablation-<task>`` holding the table as metrics (``<method>/<metric>[/by_posts]``, the mean;
``<method>/<metric>_std[...]``) and the two files as artifacts. ``<key>`` is a digest of
everything that changes a result (the training config but paths and resources, the test split,
the data root's manifest digest, the features' weights and parts), so a rerun reuses exactly
the results of the same config and data and runs the rest; a changed config runs again.

Beside the paper's figures and ours, the truth ceiling: where the data root was preprocessed
from a ``csmn synth`` archive, the reference predictors of its truth tables
(csmn.synth.truth), scored on the same test split; "n/a" otherwise (and for posts).

The paper's figures are Tables 2 and 3 of the paper, copied whole:
they are Instagram's, given for the shape of the results, not as a target for synthetic data.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from csmn.config import config_from_args, config_parser
from csmn.core.tokens import BLOCK, LIKELY, REPEATS_HELP, STOP_HELP, task_rules
from csmn.data import layout, storage
from csmn.data.completeness import exit_code_2, require_data_root
from csmn.data.layout import (
    BY_POSTS_TASK,
    LAYERS,
    POST,
    SPLIT_FAMILIES,
    canonical_task,
    features_identity,
)

log = logging.getLogger(__name__)

# Paper Table 2 (post generation, split by users): B-1, B-2, B-3, B-4, METEOR, CIDEr, ROUGE-L.
_TABLE2_COLUMNS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "cider", "rouge_l")
_TABLE2_ROWS = {
    "seq2seq": (0.050, 0.012, 0.003, 0.000, 0.024, 0.034, 0.065),
    "ShowTell": (0.055, 0.019, 0.007, 0.003, 0.038, 0.004, 0.081),
    "AttendTell": (0.106, 0.015, 0.000, 0.000, 0.026, 0.049, 0.140),
    "1NN-Im": (0.071, 0.020, 0.007, 0.004, 0.032, 0.059, 0.069),
    "1NN-Usr": (0.063, 0.014, 0.002, 0.000, 0.028, 0.025, 0.059),
    "1NN-UsrIm": (0.106, 0.032, 0.011, 0.005, 0.046, 0.084, 0.104),
    "CSMN-NoCNN-P5": (0.086, 0.037, 0.015, 0.000, 0.037, 0.103, 0.122),
    "CSMN-NoUC-P5": (0.079, 0.032, 0.015, 0.008, 0.037, 0.133, 0.120),
    "CSMN-NoWO-P5": (0.090, 0.040, 0.016, 0.006, 0.037, 0.119, 0.116),
    "CSMN-R5C": (0.097, 0.034, 0.013, 0.006, 0.040, 0.107, 0.110),
    "CSMN-P5": (0.171, 0.068, 0.029, 0.013, 0.064, 0.214, 0.177),
    "CSMN-W20-P5": (0.116, 0.041, 0.018, 0.007, 0.044, 0.119, 0.123),
    "CSMN-W100-P5": (0.109, 0.037, 0.015, 0.007, 0.042, 0.109, 0.112),
}
# Paper Table 3 (hashtag F1): split by users, split by posts.
_TABLE3_ROWS = {
    "seq2seq": (0.132, 0.085),
    "ShowTell": (0.028, 0.011),
    "AttendTell": (0.020, 0.014),
    "1NN-Im": (0.049, 0.110),
    "1NN-Usr": (0.054, 0.173),
    "1NN-UsrIm": (0.109, 0.380),
    "CSMN-NoCNN-P5": (0.135, 0.310),
    "CSMN-NoUC-P5": (0.111, 0.076),
    "CSMN-NoWO-P5": (0.117, 0.244),
    "CSMN-R5C": (0.192, 0.340),
    "CSMN-P5": (0.230, 0.390),
    "CSMN-W20-P5": (0.147, 0.349),
    "CSMN-W80-P5": (0.135, 0.341),
}
PAPER_TABLES: dict[str, dict[str, dict[str, float]]] = {
    "post": {m: dict(zip(_TABLE2_COLUMNS, v, strict=True)) for m, v in _TABLE2_ROWS.items()},
    "hashtag": {m: {"f1": v[0], "f1_by_posts": v[1]} for m, v in _TABLE3_ROWS.items()},
}
# Methods of the paper we do not implement (the paper's other language/captioning baselines).
NOT_IMPLEMENTED = ("seq2seq", "ShowTell", "AttendTell")
BASELINE_NAMES = {"1nn-im": "1NN-Im", "1nn-usr": "1NN-Usr", "1nn-usrim": "1NN-UsrIm"}
# (test split, train split, validation split) per column of the table.
DEFAULT_VARIANTS = "P5,NoUC-P5,NoCNN-P5,NoWO-P5,R5C,W20-P5,W80-P5"


@dataclass
class AblationConfig:
    """What to train and evaluate; sizes are small on purpose (the paper's are ModelConfig's)."""

    data: str = field(default="", metadata={"help": "data root written by preprocessing"})
    task: str = field(default="hashtag", metadata={
        "help": "hashtag (Table 3) | post (Table 2; caption is accepted for post)"})
    variants: str = field(default=DEFAULT_VARIANTS, metadata={
        "help": "comma list of CSMN variants (csmn.core.model.ModelConfig.for_variant names)"})
    splits: str = field(default="", metadata={
        "help": "by_users,by_posts (default: both for hashtags, by_users for posts)"})
    baselines: str = field(default="1nn-im,1nn-usr,1nn-usrim", metadata={
        "help": "comma list of 1NN baselines, or 'none'"})
    epochs: int = field(default=6, metadata={"help": "training epochs per variant (paper: 20)"})
    batch_size: int = field(default=64, metadata={"help": "examples per step (paper: 200)"})
    learning_rate: float = 0.001
    small: bool = field(default=True, metadata={
        "help": "small network (embed/memory/cnn sizes below); false: the paper's sizes"})
    embed_dim: int = field(default=64, metadata={"help": "with --small (the default) only"})
    memory_dim: int = field(default=128, metadata={"help": "with --small (the default) only"})
    cnn_depth: int = field(default=32, metadata={"help": "with --small (the default) only"})
    model: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "more ModelConfig overrides, e.g. '{max_length: 16}'"})
    val_sample_size: int = field(default=1000, metadata={
        "help": "validation examples scored per epoch (all of them when the split has fewer): "
                "they pick the checkpoint, and a small sample picks by noise"})
    context_dropout: float = field(default=0.0, metadata={
        "help": "share of the user-context words hidden at each training step (not in the "
                "paper: 0)"})
    seed: int = field(default=0, metadata={"help": "the first seed"})
    seeds: int = field(default=1, metadata={
        "help": "seeds per method (seed, seed+1, ...): the table gives mean, std, min..max"})
    res5c: str = field(default="extract", metadata={
        "help": "R5C needs res5c features: extract (when missing, with pool5's weights) | skip"})
    res5c_crop_size: int = field(default=224, metadata={
        "help": "crop for res5c extraction: 193..224 gives the 7x7 grid the model takes"})
    res5c_resize_size: int = field(default=256, metadata={"help": "short side before the crop"})
    workers: int = field(default=1, metadata={"help": "training workers per variant"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per training worker"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per decoding actor"})
    use_gpu: bool = False
    repeats: str = field(default=BLOCK, metadata={"help": REPEATS_HELP})
    stop: str = field(default=LIKELY, metadata={"help": STOP_HELP})
    beam_width: int = field(default=1, metadata={
        "help": "the evaluation's decoding: 1 = greedy, the paper's (4.2); more = beam search. "
                "Training validates greedily either way, so a rerun with another width "
                "evaluates the trained models again without training them"})
    experiment: str = field(default="", metadata={
        "help": "MLflow experiment (default csmn-<task>-ablation)"})
    out: str = field(default="", metadata={
        "help": "output folder (default <data>/ablations/<task>); a rerun with the same one "
                "reuses every (split, method, seed) result of the same config and data"})

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            import yaml

            self.model = yaml.safe_load(self.model) or {}
        self.task = canonical_task(self.task)
        if self.res5c not in ("extract", "skip"):
            raise ValueError(f"res5c must be extract or skip, got {self.res5c!r}")
        for family in self.split_families:
            if family not in SPLIT_FAMILIES:
                raise ValueError(f"unknown split {family!r}; known: {', '.join(SPLIT_FAMILIES)}")
        if self.task == POST and "by_posts" in self.split_families:
            raise ValueError("the split by posts exists for the hashtag task only")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        if self.beam_width < 1:
            raise ValueError("beam_width must be >= 1")
        task_rules(self.task, self.repeats, self.stop)  # refuses an unknown rule now
        # Each training's config is checked now, not after Ray started, res5c was extracted
        # and the baselines ran.
        for variant in self.variant_names:
            for family in self.split_families:
                train_config(self, variant, family, self.seed)

    @property
    def split_families(self) -> list[str]:
        if self.splits.strip():
            return [s.strip() for s in self.splits.split(",") if s.strip()]
        return list(SPLIT_FAMILIES) if self.task == BY_POSTS_TASK else ["by_users"]

    @property
    def variant_names(self) -> list[str]:
        return [paper_name(v) for v in self.variants.split(",") if v.strip()]

    def model_overrides(self) -> dict[str, Any]:
        sizes = ({"embed_dim": self.embed_dim, "memory_dim": self.memory_dim,
                  "cnn_depth": self.cnn_depth} if self.small else {})
        return {**sizes, **self.model}


def paper_name(variant: str) -> str:
    """``NoUC-P5`` -> ``CSMN-NoUC-P5`` (:func:`csmn.eval.report.csmn_variant_name`), the
    variant checked first."""
    from csmn.core.model import ModelConfig
    from csmn.eval.report import csmn_variant_name

    parts = [p for p in variant.strip().replace("_", "-").split("-") if p]
    parts = [p for p in parts if p.lower() != "csmn"]
    ModelConfig.for_variant("-".join(parts), vocab_size=10)  # refuses unknown parts early
    return csmn_variant_name(variant)


# ------------------------------------------------------------------------------ features


def ensure_res5c(config: AblationConfig) -> str | None:
    """None when res5c features are there (extracting them if asked), else why R5C is
    skipped. Extraction uses the weights and seed recorded for pool5, so both layers come
    from the same network."""
    from csmn.data.completeness import features_problem
    from csmn.pipeline.extract import ExtractConfig, run_extract

    problem = features_problem(config.data, "res5c")
    if problem is None:
        return None
    if config.res5c == "skip":
        return f"R5C skipped: {problem} under the data root, and --res5c skip"
    # An extraction that was stopped resumes: its finished parts are kept.
    pool5_meta_uri = layout.features_meta_uri(config.data, "pool5")
    pool5 = storage.read_json(pool5_meta_uri) if storage.exists(pool5_meta_uri) else {}
    extract_config = (pool5.get("config") or {})
    weights = extract_config.get("weights", "imagenet")
    log.info("ablation: extracting res5c features (weights %s, crop %d)", weights,
             config.res5c_crop_size)
    run_extract(ExtractConfig(
        data=config.data, layer="res5c", weights=weights,
        seed=int(extract_config.get("seed", 0)),
        crop_size=config.res5c_crop_size, resize_size=config.res5c_resize_size,
        device="cuda" if config.use_gpu else "auto"))
    return None


# ------------------------------------------------------------------------------ result keys

# TrainConfig fields that do not change what a run learns: where it goes, its name, the CPUs
# it holds, how failures are retried. Everything else is in a result's key.
_TRAIN_FIELDS_NOT_IN_KEY = frozenset({
    "data", "experiment", "storage", "run_name", "register", "cpus_per_worker",
    "checkpoints_to_keep", "max_failures", "fail_once_at_epoch",
    "repeats", "stop"})  # keyed once, beside beam_width: they are the evaluation's too

# TrainConfig fields added after results were first stored: at these values (what every
# run before them did) they stay out of the key, so those results are still found.
_TRAIN_FIELDS_KEYED_WHEN_NOT = {"context_dropout": 0.0}


def _phrase_rule(config: AblationConfig) -> dict[str, int]:
    """The post texts' phrase rule, keyed where it applies: it came after results were first
    stored, and those (decoded and validated without it) must not be found again."""
    phrases = task_rules(config.task, config.repeats, config.stop)["no_repeat_ngram"]
    return {"no_repeat_ngram": phrases} if phrases else {}


def _digest(fields: Any) -> str:
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def seeds_of(config: AblationConfig) -> list[int]:
    return [config.seed + i for i in range(config.seeds)]


def train_config(config: AblationConfig, variant: str, family: str, seed: int,
                 run_name: str = "", storage_uri: str = "") -> Any:
    from csmn.pipeline.train import TrainConfig

    train_split, val_split, _ = SPLIT_FAMILIES[family]
    return TrainConfig(
        data=config.data, task=config.task, variant=variant.removeprefix("CSMN-"),
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        train_split=train_split, val_split=val_split, val_sample_size=config.val_sample_size,
        seed=seed, repeats=config.repeats, stop=config.stop, model=config.model_overrides(),
        context_dropout=config.context_dropout, workers=config.workers,
        cpus_per_worker=config.cpus_per_worker, use_gpu=config.use_gpu,
        experiment=config.experiment, run_name=run_name, storage=storage_uri)


def variant_key(config: AblationConfig, variant: str, family: str, seed: int,
                data_digest: str, features: dict[str, dict[str, Any]] | None = None
                ) -> tuple[str, dict[str, Any]]:
    """(digest, the fields it is of) for one variant's result: its whole training config but
    paths and resources, the test split and decoding, the data root's manifest digest and
    its features' identity (``features``: by layer, as :func:`csmn.data.layout.features_identity`
    gives)."""
    from csmn.core.model import ModelConfig

    trained = dataclasses.asdict(train_config(config, variant, family, seed))
    layer = ModelConfig.for_variant(variant.removeprefix("CSMN-"), vocab_size=10).image_layer
    fields = {"kind": "variant", "method": variant, "family": family,
              "test_split": SPLIT_FAMILIES[family][2], "beam_width": config.beam_width,
              "repeats": config.repeats, "stop": config.stop,
              **_phrase_rule(config),
              "train": {k: v for k, v in trained.items() if k not in _TRAIN_FIELDS_NOT_IN_KEY
                        and not (k in _TRAIN_FIELDS_KEYED_WHEN_NOT
                                 and v == _TRAIN_FIELDS_KEYED_WHEN_NOT[k])},
              "data_digest": data_digest,
              "features": (features or {}).get(layer) or features_identity(config.data, layer)}
    return _digest(fields), fields


def baseline_key(config: AblationConfig, method: str, family: str, seed: int,
                 data_digest: str, features: dict[str, dict[str, Any]] | None = None
                 ) -> tuple[str, dict[str, Any]]:
    fields = {"kind": "baseline", "method": method, "task": config.task, "family": family,
              "test_split": SPLIT_FAMILIES[family][2], "seed": seed,
              "data_digest": data_digest,
              "features": (features or {}).get("pool5") or features_identity(config.data, "pool5")}
    return _digest(fields), fields


class ResultStore:
    """One JSON file per (split, method, seed) result under ``<out>/results/``, named by its
    key and written atomically once the result is complete; a rerun reads it instead of
    running again. A variant's training leaves its own file first, so a failed evaluation
    does not train again."""

    def __init__(self, out: str):
        self.root = storage.join(out, "results")

    def uri(self, family: str, method: str, seed: int, key: str, stage: str = "") -> str:
        suffix = f".{stage}" if stage else ""
        return storage.join(self.root, family, method, f"seed{seed}-{key}{suffix}.json")

    def read(self, uri: str) -> dict[str, Any] | None:
        return storage.read_json(uri) if storage.exists(uri) else None

    def write(self, uri: str, record: dict[str, Any]) -> None:
        storage.write_json(uri, record)


# ------------------------------------------------------------------------------ the runs


def _run_variant(config: AblationConfig, variant: str, family: str, seed: int, key: str,
                 fields: dict[str, Any], store: ResultStore, out: str) -> dict[str, Any]:
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate
    from csmn.pipeline.train import train

    name = f"{variant}-{family}-seed{seed}"
    # The training is the same for every beam width (validation decodes greedily): keyed as
    # the greedy result's, so that its record and run are found again.
    train_key = _digest({**fields, "beam_width": 1})
    trained_uri = store.uri(family, variant, seed, train_key, stage="train")
    trained = store.read(trained_uri)
    if trained is None:
        started = time.perf_counter()
        # Named by the key and the output: a run killed mid-training resumes from its latest
        # checkpoint (Ray Train finds its snapshot under the same name and storage, MLflow
        # the run of that name), and another --out never continues this one's MLflow run.
        summary = train(train_config(config, variant, family, seed,
                                     run_name=f"ablation-{name}-{train_key}-{_digest(out)[:6]}",
                                     storage_uri=storage.join(out, "runs")))
        if summary.model_uri is None:
            raise RuntimeError(f"{name}: training left no checkpoint")
        trained = {"mlflow_run_id": summary.mlflow_run_id, "model_uri": summary.model_uri,
                   "best_epoch": summary.best_metrics.get("epoch"),
                   "train_seconds": round(time.perf_counter() - started, 1)}
        store.write(trained_uri, trained)
    started = time.perf_counter()
    report = evaluate(EvaluateConfig(
        data=config.data, model=trained["model_uri"], task=config.task,
        split=SPLIT_FAMILIES[family][2], baselines="none",
        repeats=config.repeats, stop=config.stop, beam_width=config.beam_width,
        # Named by the result's key too: a record reused later points at its own report,
        # never at one a run of another config wrote over it.
        out=storage.join(out, "reports", f"{name}-{key[:10]}" + (
            f"-beam{config.beam_width}" if config.beam_width > 1 else "")),
        cpus_per_actor=config.cpus_per_actor,
        use_gpu=config.use_gpu, seed=seed, report_examples=4))
    return {**trained, "results": report["results"]["csmn"], "counts": report["counts"],
            "evaluate_seconds": round(time.perf_counter() - started, 1),
            "report": report["out"], "key": key, "key_fields": fields,
            "finished_at": datetime.now(UTC).isoformat()}


def _run_baselines(config: AblationConfig, names: list[str], family: str, seed: int,
                   keys: dict[str, tuple[str, dict[str, Any]]], out: str
                   ) -> dict[str, dict[str, Any]]:
    """The baselines ``names`` (their option names) in one evaluation; a record for each."""
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate

    started = time.perf_counter()
    report = evaluate(EvaluateConfig(
        data=config.data, task=config.task, split=SPLIT_FAMILIES[family][2],
        baselines=",".join(names), seed=seed, report_examples=4,
        out=storage.join(out, "reports", f"baselines-{family}-seed{seed}-"
                         f"{_digest(sorted(keys[n][0] for n in names))[:10]}")))
    seconds = round(time.perf_counter() - started, 1)
    return {BASELINE_NAMES.get(n, n): {
        "results": report["results"][n], "counts": report["counts"], "report": report["out"],
        "evaluate_seconds": seconds, "key": keys[n][0], "key_fields": keys[n][1],
        "finished_at": datetime.now(UTC).isoformat()} for n in names}



def _baseline_options(config: AblationConfig) -> list[str]:
    text = config.baselines.strip().lower()
    return [] if text in ("", "none") else [b.strip() for b in text.split(",") if b.strip()]


def run_all(config: AblationConfig, variants: list[str], out: str
            ) -> tuple[dict[str, dict[str, dict[int, dict[str, Any]]]], dict[str, int]]:
    """{method: {family: {seed: record}}} for every seed, split and method, each read from
    the store when a finished result with its key is there; and how many were run / read."""
    store = ResultStore(out)
    data_digest = layout.data_digest(config.data)
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    counts = {"computed": 0, "reused": 0}
    # Read once: every key of the run names the same features (a listing of every part).
    features = {layer: features_identity(config.data, layer) for layer in LAYERS
                if storage.exists(layout.features_meta_uri(config.data, layer))}
    options = _baseline_options(config)

    def keep(method: str, family: str, seed: int, record: dict[str, Any], reused: bool):
        counts["reused" if reused else "computed"] += 1
        runs.setdefault(method, {}).setdefault(family, {})[seed] = {**record, "reused": reused}

    # Seed by seed: a run cut short leaves whole seeds of every method behind.
    for seed in seeds_of(config):
        for family in config.split_families:
            keys = {n: baseline_key(config, BASELINE_NAMES.get(n, n), family, seed,
                                    data_digest, features) for n in options}
            missing = []
            for name in options:
                method = BASELINE_NAMES.get(name, name)
                uri = store.uri(family, method, seed, keys[name][0])
                done = store.read(uri)
                if done is None:
                    missing.append(name)
                else:
                    keep(method, family, seed, done, reused=True)
            if missing:
                log.info("ablation: baselines %s on %s, seed %d", missing, family, seed)
                for method, record in _run_baselines(config, missing, family, seed, keys,
                                                     out).items():
                    store.write(store.uri(family, method, seed, record["key"]), record)
                    keep(method, family, seed, record, reused=False)
            for variant in variants:
                key, fields = variant_key(config, variant, family, seed, data_digest, features)
                uri = store.uri(family, variant, seed, key)
                done = store.read(uri)
                if done is not None:
                    keep(variant, family, seed, done, reused=True)
                    continue
                log.info("ablation: %s on %s, seed %d", variant, family, seed)
                record = _run_variant(config, variant, family, seed, key, fields, store, out)
                store.write(uri, record)
                keep(variant, family, seed, record, reused=False)
    return runs, counts


# ------------------------------------------------------------------------------ seeds


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one seed), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def aggregate(by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One method on one split over its seeds: ``results`` the means (what the table shows),
    ``spread`` per metric, ``seeds`` every run."""
    records = [by_seed[s] for s in sorted(by_seed)]
    metrics = [k for k, v in records[0]["results"].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    spreads = {k: spread([float(r["results"][k]) for r in records]) for k in metrics}
    return {"results": {k: s["mean"] for k, s in spreads.items()}, "spread": spreads,
            "counts": records[0]["counts"], "report": records[0]["report"],
            "seeds": {str(s): by_seed[s] for s in sorted(by_seed)}}


# ------------------------------------------------------------------------------ truth ceiling

# The reference predictors of csmn.synth.truth, in the order the table lists them.
TRUTH_PREDICTORS = {
    "category_mode": "truth: category mode (all an image tells)",
    "another_post": "truth: another post of the user (the best 1NN-UsrIm)",
    "niche_category_mode": "truth: niche x category mode (ceiling for new users)",
    "user_category_mode": "truth: user x category mode (ceiling, by posts)",
}
TRUTH_CEILING = {"by_users": "niche_category_mode", "by_posts": "user_category_mode"}
CEILING_ROW = "truth ceiling"


def truth_references(data: str, task: str, families: list[str]
                     ) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """({family: csmn.synth.truth.reference_scores_on_root}, where from) when the data root
    was preprocessed from a ``csmn synth`` archive that is still there; else (None, why not).
    They are scored on the data root's own test posts, the ones the methods are scored on."""
    from csmn.synth.truth import reference_scores_on_root

    if task != BY_POSTS_TASK:
        return None, "n/a: the truth tables give reference predictors for hashtags only"
    manifest_uri = layout.manifest_uri(data)
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {}
    archive = manifest.get("archive")
    if not archive or not storage.exists(storage.join(archive, "truth", "summary.json")):
        return None, ("n/a: the data root's archive has no truth tables (it was not written "
                      "by csmn synth, or is gone)")
    scores = {family: reference_scores_on_root(archive, data, family) for family in families}
    return scores, f"the truth tables of {archive}"


# ------------------------------------------------------------------------------ run_ablation


def run_ablation(config: AblationConfig) -> dict[str, Any]:
    """Train and evaluate every variant, and the baselines, on every split family for every
    seed (reusing finished results under ``out``); write and return the table."""
    from csmn.core.model import ModelConfig
    from csmn.pipeline.runtime import init_ray

    if not config.data:
        raise ValueError("--data is required: the data root written by preprocessing")
    require_data_root(config.data, "ablation", ("pool5",))
    init_ray()
    config = dataclasses.replace(config, experiment=config.experiment
                                 or f"csmn-{config.task}-ablation")
    out = config.out or storage.join(config.data, "ablations", config.task)
    notes: list[str] = []
    variants = config.variant_names
    if any("R5C" in v for v in variants):
        skipped = ensure_res5c(config)
        if skipped:
            notes.append(skipped)
            variants = [v for v in variants if "R5C" not in v]
    data_context = layout.manifest_context_size(config.data)
    for variant in variants:
        wanted = ModelConfig.for_variant(variant, vocab_size=10).context_size
        if data_context is not None and wanted > data_context:
            notes.append(f"{variant}: the data root's contexts hold at most {data_context} "
                         f"words, so {wanted - data_context} of its {wanted} slots stay empty "
                         "(preprocess with --context-size to fill them)")

    started = time.perf_counter()
    runs, counts = run_all(config, variants, out)
    methods = {method: {family: aggregate(by_seed) for family, by_seed in families.items()}
               for method, families in runs.items()}
    truth, truth_source = truth_references(config.data, config.task, config.split_families)
    table = build_table(config.task, methods, config.split_families, truth)
    seeds = seeds_of(config)
    result = {
        "task": config.task,
        "out": out,
        "config": dataclasses.asdict(config),
        "seeds": seeds,
        "model_sizes": config.model_overrides() or "paper (ModelConfig defaults)",
        "data_context_size": data_context,
        "data_digest": layout.data_digest(config.data),
        "methods": methods,
        "truth": truth,
        "truth_source": truth_source,
        "table": table,
        "runs": counts,
        "paper_source": "Tables 2 and 3 of Park, Kim, Kim, CVPR 2017 (Instagram; every figure "
                        "of both tables copied)",
        "notes": notes + [
            f"{', '.join(NOT_IMPLEMENTED)}: the paper's figures only; not implemented here.",
            "Our numbers come from a synthetic archive at a small model size and few epochs: "
            "compare orderings, not values.",
        ],
        "seconds": round(time.perf_counter() - started, 1),
    }
    storage.makedirs(out)
    storage.write_text(storage.join(out, "ablation.md"), render_markdown(result))
    storage.write_json(storage.join(out, "ablation.json"), result)
    log_to_mlflow(config, result)
    return result


# ------------------------------------------------------------------------------ the table


def _columns(task: str, families: list[str]) -> list[tuple[str, str, str]]:
    """(column name, split family, metric) of the table, ours; the paper's sits beside."""
    if task == "hashtag":
        return [(f"F1 {family.replace('_', ' ')}", family, "f1") for family in families]
    return [(metric, "by_users", metric) for metric in _TABLE2_COLUMNS]


def _paper_key(task: str, family: str, metric: str) -> str:
    return "f1_by_posts" if task == "hashtag" and family == "by_posts" else metric


def build_table(task: str, methods: dict[str, dict[str, Any]], families: list[str],
                truth: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per method, the paper's order first, then anything else we ran: for every
    column ``ours`` (the mean over seeds) and ``paper`` (None where a side has no figure),
    and the spread over seeds. Then the truth ceiling (``ours`` None: n/a) and, from the
    truth tables, each reference predictor."""
    paper = PAPER_TABLES[task]
    order = list(paper) + [m for m in methods if m not in paper]
    columns = _columns(task, families)
    rows = []
    for method in order:
        cells = {}
        for name, family, metric in columns:
            run = methods.get(method, {}).get(family, {})
            cells[name] = {"ours": run.get("results", {}).get(metric),
                           "paper": paper.get(method, {}).get(_paper_key(task, family, metric)),
                           "spread": run.get("spread", {}).get(metric)}
        rows.append({"method": method, "kind": "method", "ran": method in methods,
                     "cells": cells})

    def truth_cell(family: str, predictor: str) -> dict[str, Any]:
        scores = (truth or {}).get(family, {}).get(predictor)
        return {"ours": scores["f1"] if scores else None, "paper": None, "spread": None}

    rows.append({"method": CEILING_ROW, "kind": "truth", "ran": truth is not None,
                 "cells": {name: truth_cell(family, TRUTH_CEILING[family]) if truth
                           else {"ours": None, "paper": None, "spread": None}
                           for name, family, _ in columns}})
    if truth:
        for predictor, label in TRUTH_PREDICTORS.items():
            rows.append({"method": label, "kind": "truth", "ran": True,
                         "cells": {name: truth_cell(family, predictor)
                                   for name, family, _ in columns}})
    return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_ours(cell: dict[str, Any], kind: str) -> str:
    if cell["ours"] is None:
        return "n/a" if kind == "truth" else "-"
    spread_ = cell.get("spread")
    if not spread_ or spread_["n"] < 2:
        return _fmt(cell["ours"])
    return (f"{spread_['mean']:.3f} ± {spread_['std']:.3f} "
            f"({spread_['min']:.3f}..{spread_['max']:.3f})")


def _decoding_text(config: dict[str, Any]) -> str:
    width = int(config.get("beam_width") or 1)
    return "greedy decoding" if width == 1 else f"beam search of width {width}"


def render_markdown(result: dict[str, Any]) -> str:
    task = result["task"]
    title = ("Table 3 analogue: hashtag prediction (F1)" if task == "hashtag"
             else "Table 2 analogue: post generation")
    families = result["config"]["splits"] or ("by_users,by_posts" if task == "hashtag"
                                               else "by_users")
    columns = _columns(task, [f.strip() for f in families.split(",") if f.strip()])
    header = ["method"] + [f"{name} {side}" for name, _, _ in columns for side in ("ours",
                                                                                   "paper")]
    seeds = result["seeds"]
    seed_text = (f"seed {seeds[0]}" if len(seeds) == 1 else
                 f"seeds {seeds[0]}..{seeds[-1]}: ours is the mean ± sample std (min..max) "
                 f"over {len(seeds)} runs")
    lines = [f"# {title}", "",
             f"Data: `{result['config']['data']}` (digest {result['data_digest']}); "
             f"{result['config']['epochs']} epochs; model sizes {result['model_sizes']}; "
             f"{_decoding_text(result['config'])}; "
             f"{seed_text}; {result['runs']['computed']} results run, "
             f"{result['runs']['reused']} reused; {result['seconds']} s.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["table"]:
        cells = [_fmt_ours(row["cells"][name], row["kind"]) if side == "ours"
                 else _fmt(row["cells"][name]["paper"])
                 for name, _, _ in columns for side in ("ours", "paper")]
        lines.append("| " + " | ".join([row["method"], *cells]) + " |")
    lines += ["", f"Paper figures: {result['paper_source']}.", ""]
    if result["truth"]:
        lines.append(f"Truth ceiling and reference predictors: {result['truth_source']} "
                     "(csmn.synth.truth; by users the niche x category mode, by posts the "
                     "user x category mode), on the data root's test posts (noisy ones the "
                     "filters kept included):")
        lines += [f"{family.replace('_', ' ')} {s['test_posts']} posts of {s['test_users']} "
                  f"users, {s['tag_list_size']} tags per prediction"
                  for family, s in result["truth"].items()]
    else:
        lines.append(f"Truth ceiling: {result['truth_source']}.")
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in result["notes"]]
    lines += ["", "## Runs", "", "| method | split | seed | MLflow run | train s | evaluate s "
              "| reused |", "|---|---|---|---|---|---|---|"]
    for method, by_family in result["methods"].items():
        for family, agg in by_family.items():
            for seed, run in agg["seeds"].items():
                lines.append(f"| {method} | {family} | {seed} | "
                             f"{run.get('mlflow_run_id', '-')} | "
                             f"{run.get('train_seconds', '-')} | {run['evaluate_seconds']} | "
                             f"{'yes' if run['reused'] else 'no'} |")
    return "\n".join(lines) + "\n"


def table_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``<method>/<metric>`` (``/by_posts`` appended for that split), the mean over seeds, and
    ``<method>/<metric>_std`` beside it for several seeds: MLflow metric names."""
    metrics: dict[str, float] = {}
    for method, by_family in result["methods"].items():
        for family, agg in by_family.items():
            suffix = "" if family == "by_users" else f"/{family}"
            for key, value in agg["results"].items():
                metrics[f"{method}/{key}{suffix}"] = float(value)
                std = agg["spread"][key]["std"]
                if std is not None:
                    metrics[f"{method}/{key}_std{suffix}"] = float(std)
    for family, scores in (result.get("truth") or {}).items():
        suffix = "" if family == "by_users" else f"/{family}"
        for predictor in TRUTH_PREDICTORS:
            if predictor in scores:
                metrics[f"truth/{predictor}/f1{suffix}"] = float(scores[predictor]["f1"])
    return metrics


def log_to_mlflow(config: AblationConfig, result: dict[str, Any]) -> str:
    """One run ``ablation-<task>`` in the ablation experiment (csmn.tracking.log_ablation):
    the table as metrics, the markdown and JSON as artifacts, the variant runs' ids as tags.
    Returns its run id."""
    from csmn import tracking

    method_runs = {f"{method}.{family}.seed{seed}": run["mlflow_run_id"]
                   for method, by_family in result["methods"].items()
                   for family, agg in by_family.items()
                   for seed, run in agg["seeds"].items() if "mlflow_run_id" in run}
    run_id = tracking.log_ablation(
        tracking.resolve_tracking_uri(config.data), config.experiment, task=config.task,
        data_root=config.data,
        params={k: v for k, v in dataclasses.asdict(config).items() if k != "model"},
        method_runs=method_runs, metrics=table_metrics(result),
        files={name: storage.read_text(storage.join(result["out"], name))
               for name in ("ablation.md", "ablation.json")})
    result["mlflow_run_id"] = run_id
    return run_id


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    return config_parser(AblationConfig, "csmn ablation", __doc__.split("\n")[0])


@exit_code_2("csmn ablation")
def main(argv: list[str] | None = None) -> int:
    from csmn.pipeline.runtime import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    config = config_from_args(AblationConfig, args, args.config_file)
    result = run_ablation(config)
    print(render_markdown(result))
    print(json.dumps({"out": result["out"], "mlflow_run_id": result.get("mlflow_run_id")}))
    return 0
