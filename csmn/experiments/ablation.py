"""The paper's Tables 2 and 3 on our data: train and evaluate the CSMN variants and the 1NN
baselines at a small, configurable size, and write the tables with the paper's figures beside
ours.

Every variant is trained by :func:`csmn.pipeline.train.train` (Ray Train, an MLflow run per variant
and split family in the experiment ``csmn-<task>-ablation``) and evaluated by
:func:`csmn.pipeline.evaluate.evaluate` (Ray Data decoding, pycocoevalcap / hashtag-set F1). The
baselines are evaluated once per test split. Hashtags are scored on both of the paper's splits
(Table 3: by users left, by posts right), each with its own training split and vocabulary;
posts on the split by users (Table 2).

Outputs under ``out`` (default ``<data>/ablations/<task>-<UTC stamp>``): ``ablation.json``
(every number, the configs, the notes), ``ablation.md`` (the table), one evaluation report
folder per (method, split), and an MLflow run ``ablation-<task>`` holding the table as metrics
(``<method>/<metric>[/by_posts]``) and the two files as artifacts.

The paper's figures are Tables 2 and 3 of the paper, copied whole:
they are Instagram's, given for the shape of the results, not as a target for synthetic data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from csmn.config import config_from_args, config_parser
from csmn.data import layout, storage
from csmn.data.completeness import exit_code_2, require_data_root
from csmn.data.layout import BY_POSTS_TASK, POST, SPLIT_FAMILIES, canonical_task

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
    task: str = field(default="hashtag", metadata={"help": "hashtag (Table 3) | caption (2)"})
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
    embed_dim: int = 64
    memory_dim: int = 128
    cnn_depth: int = 32
    model: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "more ModelConfig overrides, e.g. '{max_length: 16}'"})
    val_sample_size: int = field(default=500, metadata={
        "help": "validation examples scored per epoch"})
    seed: int = 0
    res5c: str = field(default="extract", metadata={
        "help": "R5C needs res5c features: extract (when missing, with pool5's weights) | skip"})
    res5c_crop_size: int = field(default=224, metadata={
        "help": "crop for res5c extraction: 193..224 gives the 7x7 grid the model takes"})
    res5c_resize_size: int = field(default=256, metadata={"help": "short side before the crop"})
    workers: int = field(default=1, metadata={"help": "training workers per variant"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per training worker"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per decoding actor"})
    use_gpu: bool = False
    experiment: str = field(default="", metadata={
        "help": "MLflow experiment (default csmn-<task>-ablation)"})
    out: str = field(default="", metadata={"help": "output folder (default under the data)"})

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
    """``NoUC-P5`` -> ``CSMN-NoUC-P5``; the paper writes W<D> before the layer and always
    names the layer (``W20`` -> ``CSMN-W20-P5``)."""
    from csmn.core.model import ModelConfig

    parts = [p for p in variant.strip().replace("_", "-").split("-") if p]
    parts = [p for p in parts if p.lower() != "csmn"]
    ModelConfig.for_variant("-".join(parts), vocab_size=10)  # refuses unknown parts early
    canonical = {"p5": "P5", "r5c": "R5C", "nocnn": "NoCNN", "nouc": "NoUC", "nowo": "NoWO"}
    named = [canonical.get(p.lower(), p.upper() if p.lower().startswith("w") else p)
             for p in parts]
    if not any(p in ("P5", "R5C") for p in named):
        named.append("P5")
    layers = [p for p in named if p in ("P5", "R5C")]
    others = [p for p in named if p not in ("P5", "R5C")]
    return "-".join(["CSMN", *others, *layers])


# ------------------------------------------------------------------------------ features


def ensure_res5c(config: AblationConfig) -> str | None:
    """None when res5c features are there (extracting them if asked), else why R5C is
    skipped. Extraction uses the weights and seed recorded for pool5, so both layers come
    from the same network."""
    from csmn.pipeline.extract import ExtractConfig, run_extract

    if storage.list_files(layout.features_dir(config.data, "res5c"), ".parquet"):
        return None
    if config.res5c == "skip":
        return "R5C skipped: no res5c features under the data root and --res5c skip"
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


# ------------------------------------------------------------------------------ the runs


def _train_and_evaluate(config: AblationConfig, variant: str, family: str, stamp: str,
                        out: str) -> dict[str, Any]:
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate
    from csmn.pipeline.train import TrainConfig, train

    train_split, val_split, test_split = SPLIT_FAMILIES[family]
    started = time.perf_counter()
    summary = train(TrainConfig(
        data=config.data, task=config.task, variant=variant.removeprefix("CSMN-"),
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        train_split=train_split, val_split=val_split, val_sample_size=config.val_sample_size,
        seed=config.seed, model=config.model_overrides(), workers=config.workers,
        cpus_per_worker=config.cpus_per_worker, use_gpu=config.use_gpu,
        experiment=config.experiment, run_name=f"ablation-{stamp}-{variant}-{family}"))
    train_seconds = time.perf_counter() - started
    if summary.model_uri is None:
        raise RuntimeError(f"{variant} ({family}): training left no checkpoint")
    report = evaluate(EvaluateConfig(
        data=config.data, model=summary.model_uri, task=config.task, split=test_split,
        baselines="none", out=storage.join(out, "reports", f"{variant}-{family}"),
        cpus_per_actor=config.cpus_per_actor, use_gpu=config.use_gpu, seed=config.seed,
        report_examples=4))
    return {
        "results": report["results"]["csmn"],
        "counts": report["counts"],
        "mlflow_run_id": summary.mlflow_run_id,
        "model_uri": summary.model_uri,
        "best_epoch": summary.best_metrics.get("epoch"),
        "train_seconds": round(train_seconds, 1),
        "evaluate_seconds": round(time.perf_counter() - started - train_seconds, 1),
        "report": report["out"],
    }


def _evaluate_baselines(config: AblationConfig, family: str, out: str) -> dict[str, Any]:
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate

    report = evaluate(EvaluateConfig(
        data=config.data, task=config.task, split=SPLIT_FAMILIES[family][2],
        baselines=config.baselines, out=storage.join(out, "reports", f"baselines-{family}"),
        seed=config.seed, report_examples=4))
    return {"results": report["results"], "counts": report["counts"], "report": report["out"]}


def _context_size(data: str) -> int | None:
    manifest_uri = layout.manifest_uri(data)
    if not storage.exists(manifest_uri):
        return None
    manifest = storage.read_json(manifest_uri)
    value = manifest.get("context_size") or (manifest.get("config") or {}).get("context_size")
    return int(value) if value else None


def run_ablation(config: AblationConfig) -> dict[str, Any]:
    """Train and evaluate every variant on every split family; write and return the table."""
    from csmn.core.model import ModelConfig
    from csmn.pipeline.runtime import init_ray

    if not config.data:
        raise ValueError("--data is required: the data root written by preprocessing")
    require_data_root(config.data, "ablation", ("pool5",))
    init_ray()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    config = dataclasses.replace(config, experiment=config.experiment
                                 or f"csmn-{config.task}-ablation")
    out = config.out or storage.join(config.data, "ablations", f"{config.task}-{stamp}")
    notes: list[str] = []
    variants = config.variant_names
    if any("R5C" in v for v in variants):
        skipped = ensure_res5c(config)
        if skipped:
            notes.append(skipped)
            variants = [v for v in variants if "R5C" not in v]
    data_context = _context_size(config.data)
    for variant in variants:
        wanted = ModelConfig.for_variant(variant, vocab_size=10).context_size
        if data_context is not None and wanted > data_context:
            notes.append(f"{variant}: the data root's contexts hold at most {data_context} "
                         f"words, so {wanted - data_context} of its {wanted} slots stay empty "
                         "(preprocess with --context-size to fill them)")

    methods: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for family in config.split_families:
        if config.baselines.strip().lower() not in ("", "none"):
            baselines = _evaluate_baselines(config, family, out)
            for key, results in baselines["results"].items():
                methods.setdefault(BASELINE_NAMES.get(key, key), {})[family] = {
                    "results": results, "counts": baselines["counts"],
                    "report": baselines["report"]}
        for variant in variants:
            log.info("ablation: %s on the split %s", variant, family)
            methods.setdefault(variant, {})[family] = _train_and_evaluate(
                config, variant, family, stamp, out)
    table = build_table(config.task, methods, config.split_families)
    result = {
        "task": config.task,
        "out": out,
        "config": dataclasses.asdict(config),
        "model_sizes": config.model_overrides() or "paper (ModelConfig defaults)",
        "data_context_size": data_context,
        "methods": methods,
        "table": table,
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


def build_table(task: str, methods: dict[str, dict[str, Any]],
                families: list[str]) -> list[dict[str, Any]]:
    """One row per method, the paper's order first, then anything else we ran: for every
    column ``ours`` and ``paper`` (None where a side has no figure)."""
    paper = PAPER_TABLES[task]
    order = list(paper) + [m for m in methods if m not in paper]
    rows = []
    for method in order:
        cells = {}
        for name, family, metric in _columns(task, families):
            ours = methods.get(method, {}).get(family, {}).get("results", {}).get(metric)
            cells[name] = {"ours": ours,
                           "paper": paper.get(method, {}).get(_paper_key(task, family, metric))}
        rows.append({"method": method, "ran": method in methods, "cells": cells})
    return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_markdown(result: dict[str, Any]) -> str:
    task = result["task"]
    title = ("Table 3 analogue: hashtag prediction (F1)" if task == "hashtag"
             else "Table 2 analogue: post generation")
    families = result["config"]["splits"] or ("by_users,by_posts" if task == "hashtag"
                                               else "by_users")
    columns = _columns(task, families.split(","))
    header = ["method"] + [f"{name} {side}" for name, _, _ in columns for side in ("ours",
                                                                                   "paper")]
    lines = [f"# {title}", "",
             f"Data: `{result['config']['data']}`; {result['config']['epochs']} epochs; model "
             f"sizes {result['model_sizes']}; {result['seconds']} s.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["table"]:
        cells = [_fmt(row["cells"][name][side]) for name, _, _ in columns
                 for side in ("ours", "paper")]
        lines.append("| " + " | ".join([row["method"], *cells]) + " |")
    lines += ["", f"Paper figures: {result['paper_source']}.", "", "## Notes", ""]
    lines += [f"- {note}" for note in result["notes"]]
    lines += ["", "## Runs", "", "| method | split | MLflow run | train s | evaluate s |",
              "|---|---|---|---|---|"]
    for method, by_family in result["methods"].items():
        for family, run in by_family.items():
            if "mlflow_run_id" in run:
                lines.append(f"| {method} | {family} | {run['mlflow_run_id']} | "
                             f"{run['train_seconds']} | {run['evaluate_seconds']} |")
    return "\n".join(lines) + "\n"


def table_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``<method>/<metric>`` (``/by_posts`` appended for that split): MLflow metric names."""
    metrics: dict[str, float] = {}
    for method, by_family in result["methods"].items():
        for family, run in by_family.items():
            suffix = "" if family == "by_users" else f"/{family}"
            for key, value in run["results"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"{method}/{key}{suffix}"] = float(value)
    return metrics


def log_to_mlflow(config: AblationConfig, result: dict[str, Any]) -> str:
    """One run ``ablation-<task>`` in the ablation experiment (csmn.tracking.log_ablation):
    the table as metrics, the markdown and JSON as artifacts, the variant runs' ids as tags.
    Returns its run id."""
    from csmn import tracking

    method_runs = {f"{method}.{family}": run["mlflow_run_id"]
                   for method, by_family in result["methods"].items()
                   for family, run in by_family.items() if "mlflow_run_id" in run}
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
