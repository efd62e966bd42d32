"""The whole pipeline on the embedded default: what ``make demo`` runs.

In-process Ray, MLflow on a SQLite file under the data root, storage in a local folder, and a
synthetic archive written first. Every step is the library function behind the same job
(``csmn synth``, ``preprocess``, ``extract-features``, ``train``, ``evaluate``), so the demo
shows exactly what the jobs do, at a size that finishes in minutes on a laptop.

The demo's image features come from a ResNet-101 with *random* weights unless
``--weights imagenet|PATH`` is given: the synthetic archive has no photographs for ImageNet
features to be better on, and the weights cannot always be downloaded. It says so loudly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from csmn.config import config_from_args, config_parser
from csmn.data import storage
from csmn.data.layout import (
    BY_POSTS_TASK,
    HASHTAG,
    POST,
    REGISTERED_MODEL_NAMES,
    SPLIT_FAMILIES,
    canonical_task,
    vocab_name,
)
from csmn.pipeline.runtime import init_ray, quiet_ray_data, setup_logging

log = logging.getLogger(__name__)



@dataclass
class DemoConfig:
    out: str = field(default="demo-data", metadata={"help": "folder (or s3://) for everything"})
    users: int = field(default=40, metadata={"help": "users in the synthetic archive"})
    seed: int = 0
    tasks: tuple[str, ...] = field(
        default=(HASHTAG, POST), metadata={"help": "hashtag,post"}
    )
    # Split by users, a test user's own hashtags are out of the vocabulary; split by posts they
    # are not, and that is where user context shows (the paper's Table 3, right column).
    hashtags_by_posts: bool = field(default=True, metadata={
        "help": "also train and evaluate hashtags on the split by posts"})
    weights: str = field(
        default="random", metadata={"help": "random | imagenet | PATH | URI of a state_dict"}
    )
    # The synthetic photos are 64x64: the demo feeds them at their own size, which makes
    # ResNet-101 about 12x cheaper than the paper's 224 crop. pool5 is 2048-d either way.
    crop_size: int = field(default=64, metadata={"help": "center crop (paper: 224)"})
    resize_size: int = field(default=64, metadata={"help": "short side (paper: 256)"})
    epochs: int = field(default=6, metadata={"help": "training epochs per task (paper: 20)"})
    batch_size: int = field(default=64, metadata={"help": "examples per step (paper: 200)"})
    # A small network so that the demo trains in a minute on two cores; the paper's sizes are
    # ModelConfig's defaults and what `csmn train` uses.
    embed_dim: int = 128
    memory_dim: int = 256
    cnn_depth: int = 64

    def __post_init__(self) -> None:
        self.tasks = tuple(canonical_task(t) for t in self.tasks)


def _banner(step: str) -> None:
    print(f"\n==== {step} " + "=" * max(0, 76 - len(step)), flush=True)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from csmn.pipeline.extract import ExtractConfig, format_summary, run_extract
    from csmn.pipeline.preprocess import PreprocessConfig, preprocess
    from csmn.synth import SynthConfig, write_archive

    archive = storage.join(config.out, "archive")
    root = storage.join(config.out, "data")
    started = time.perf_counter()
    result: dict[str, Any] = {"archive": archive, "data": root, "tasks": {}}

    _banner(f"1/6 synthetic archive: {config.users} users -> {archive}")
    synth = write_archive(
        SynthConfig(out=archive, users=config.users, seed=config.seed, overwrite=True)
    )
    print(json.dumps({k: synth[k] for k in ("users", "posts") if k in synth}))

    init_ray()
    quiet_ray_data()
    _banner(f"2/6 preprocess (Ray Data) -> {root}")
    manifest = preprocess(
        archive,
        root,
        PreprocessConfig(seed=config.seed),
    )
    print(json.dumps({"records": manifest["records"], "splits": manifest["splits"]}))

    _banner(f"3/6 image features: ResNet-101 pool5, weights={config.weights}")
    summary = run_extract(
        ExtractConfig(
            data=root,
            layer="pool5",
            weights=config.weights,
            seed=config.seed,
            crop_size=config.crop_size,
            resize_size=config.resize_size,
            # The demo rewrites its archive on every run, so earlier features are stale.
            overwrite=True,
        )
    )
    print(format_summary(summary))

    runs = [(task, "by_users") for task in config.tasks]
    if BY_POSTS_TASK in config.tasks and config.hashtags_by_posts:
        runs.append((BY_POSTS_TASK, "by_posts"))
    for task, family in runs:
        _train_evaluate_promote(config, root, task, family, result)

    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _train_evaluate_promote(config: DemoConfig, root: str, task: str, family: str,
                            result: dict[str, Any]) -> None:
    """Steps 4-6 for one task and family of splits; the registry holds only the models the
    nightly job may use, those split by users."""
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate
    from csmn.pipeline.train import TrainConfig, train

    by_posts = family == "by_posts"
    train_split, val_split, test_split = SPLIT_FAMILIES[family]
    _banner(f"4/6 train CSMN-P5 for {task}, split {family.replace('_', ' ')} "
            "(Ray Train, MLflow)")
    trained = train(TrainConfig(
        data=root, task=task, epochs=config.epochs, batch_size=config.batch_size,
        seed=config.seed, train_split=train_split, val_split=val_split, register=not by_posts,
        model={"embed_dim": config.embed_dim, "memory_dim": config.memory_dim,
               "cnn_depth": config.cnn_depth}))
    model_uri = (trained.model_uri if by_posts
                 else f"models:/{REGISTERED_MODEL_NAMES[task]}/{trained.registered_version}")
    print(f"model {model_uri} (MLflow run {trained.mlflow_run_id})")

    _banner(f"5/6 evaluate on {test_split}, with the 1NN baselines")
    os.environ.setdefault("MLFLOW_TRACKING_URI", trained.tracking_uri)
    report = evaluate(EvaluateConfig(data=root, model=model_uri, task=task, split=test_split))
    if not by_posts:
        result.setdefault("promotions", {})[task] = _promote(
            config, REGISTERED_MODEL_NAMES[task], trained.registered_version, root)
    result["tasks"][vocab_name(task, test_split)] = {
        "model": model_uri,
        "mlflow_run_id": trained.mlflow_run_id,
        "tracking_uri": trained.tracking_uri,
        "report": report["out"],
        "results": report["results"],
    }


def _promote(config: DemoConfig, name: str, version: str, root: str) -> str:
    """The gate against the current champion (a demo run before this one, on the same data,
    left one); the demo's features come from random weights unless --weights says otherwise,
    and that is written on the version."""
    from csmn.pipeline.promote import PromoteConfig, Refused, promote, summary_line

    _banner(f"6/6 promote {name} v{version} (paired bootstrap against @champion)")
    try:
        decision = promote(PromoteConfig(name=name, candidate=version, data=root,
                                         allow_random_features=config.weights == "random"))
    except Refused as err:
        line = f"{name} v{version}: refused: {err}"
    else:
        line = summary_line(decision)
    print(line)
    return line


def _print_outcome(result: dict[str, Any], config: DemoConfig) -> None:
    _banner("done")
    print(f"archive:  {result['archive']}\ndata:     {result['data']}")
    for task, info in result["tasks"].items():
        print(f"{task}: {info['model']}  report: {info['report']}")
        for method, scores in info["results"].items():
            shown = {k: round(v, 3) for k, v in scores.items() if isinstance(v, float)}
            print(f"    {method:<12} {shown}")
    for line in result.get("promotions", {}).values():
        print(f"promotion: {line}")
    tracking = next(iter(result["tasks"].values()), {}).get("tracking_uri")
    if tracking:
        print(f"MLflow:   mlflow ui --backend-store-uri {tracking}")
    if config.weights == "random":
        print("NOTE: image features came from RANDOM ResNet-101 weights (--weights random).")
    print(f"took {result['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    args = config_parser(DemoConfig, "csmn demo", __doc__.split("\n")[0]).parse_args(argv)
    setup_logging("WARNING")
    config = config_from_args(DemoConfig, args, args.config_file)
    result = run_demo(config)
    storage.write_json(storage.join(config.out, "demo-summary.json"), result)
    _print_outcome(result, config)
    return 0
