"""The whole pipeline on a synthetic archive, submitted the way users run it: ``make demo``.

``csmn demo`` starts a local Ray head (token authentication on, the dashboard on 127.0.0.1;
csmn.pipeline.launch), submits ``python jobs/demo.py`` to it with ``ray job submit
--working-dir .`` as one job, streams the job's logs, prints the results beside the paper's,
and stops the head it started (also on Ctrl-C or failure). ``--in-process`` runs the same job
in this process instead (Ray in-process, or ``RAY_ADDRESS``).

The job (``jobs/demo.py``, :func:`job_main`) runs :data:`STEPS` in order; every step is the
library function behind the same job (``csmn synth``, ``preprocess``, ``extract-features``,
``train``, ``evaluate``, ``promote``), so the demo shows exactly what the jobs do. It writes
``<out>/demo-summary.json`` and ``<out>/report.html`` (csmn.eval.report.render_demo_html).
MLflow is a SQLite file under the data root, storage a local folder.

The demo's image features come from a ResNet-101 with *random* weights unless
``--weights imagenet|PATH`` is given: the synthetic archive has no photographs for ImageNet
features to be better on, and the weights cannot always be downloaded. It says so loudly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from csmn.config import (
    add_config_arguments,
    config_from_args,
    config_parser,
    configs_from_args,
    redact,
    redact_text,
)
from csmn.data import layout, storage
from csmn.data.completeness import exit_code_2
from csmn.data.layout import (
    BY_POSTS_TASK,
    HASHTAG,
    POST,
    REGISTERED_MODEL_NAMES,
    SPLIT_FAMILIES,
    canonical_task,
    vocab_name,
)

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SUMMARY_FILE = "demo-summary.json"
REPORT_FILE = "report.html"


@dataclass
class DemoConfig:
    out: str = field(default="demo-data", metadata={"help": "folder (or s3://) for everything"})
    # The size knob: users scale every stage (about 170 posts and images each).
    users: int = field(default=30, metadata={"help": "users in the synthetic archive"})
    posts_per_user: int = field(default=0, metadata={
        "help": "median posts of a regular user (0: the synthetic archive's default, 100)"})
    # Split by users a new user's context can only tell their niche, and a niche helps them
    # only if other members are in training: with all 27 categories (81 niches) that takes
    # hundreds of users, with 3 (9 niches) the demo's 30 do (README, split by users).
    categories: int = field(default=3, metadata={
        "help": "categories of the synthetic archive (27: all; fewer shares niches among "
                "fewer users)"})
    seed: int = 0
    train_user_fraction: float = field(default=0.7, metadata={
        "help": "users in the training split (the rest are the test and validation users)"})
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
    # 10, not fewer: at 5 the 30-user archive's split by users only ties 1NN-UsrIm (README,
    # "What the demo shows"); 10 epochs keep the whole demo at 12 minutes on 2 idle cores.
    epochs: int = field(default=10, metadata={"help": "training epochs per task (paper: 20)"})
    batch_size: int = field(default=64, metadata={"help": "examples per step (paper: 200)"})
    # The paper's 0.001 suits 721K posts and 20 epochs; a few thousand posts in a few epochs
    # learn at 0.005 what they would not at 0.001 (README, the ablation's setting).
    learning_rate: float = field(default=0.005, metadata={"help": "Adam's initial rate "
                                                                  "(paper: 0.001)"})
    # A small network so that the demo trains in a minute on two cores; the paper's sizes are
    # ModelConfig's defaults and what `csmn train` uses.
    embed_dim: int = 128
    memory_dim: int = 256
    cnn_depth: int = 64
    report_examples: int = field(default=6, metadata={"help": "gallery posts per task"})
    nightly_share: float = field(default=0.03, metadata={
        "help": "share of the archive's posts, the newest, held back until after training "
                "and then generated by the nightly job (0: no nightly step)"})

    def __post_init__(self) -> None:
        self.tasks = tuple(canonical_task(t) for t in self.tasks)


@dataclass
class LaunchConfig:
    in_process: bool = field(default=False, metadata={
        "help": "run the job in this process (no head, no ray job submit)"})
    head_cpus: int = field(default=0, metadata={"help": "CPUs of the local head (0: all)"})
    head_object_store_mb: int = field(default=1024, metadata={
        "help": "object store of the local head, MiB"})


@dataclass
class DemoState:
    """What the steps hand on to each other."""

    config: DemoConfig
    archive: str
    root: str
    result: dict[str, Any]
    started: float


Step = Callable[[DemoState], None]


def _say(text: str) -> None:
    print(text, flush=True)


def _banner(step: str) -> None:
    _say(f"\n==== {step} " + "=" * max(0, 76 - len(step)))


def step_synth(state: DemoState) -> None:
    from csmn.synth import SynthConfig, hold_back_newest, write_archive

    config = state.config
    options: dict[str, Any] = {}
    if config.posts_per_user:
        # The floor keeps a regular user above preprocessing's 50 posts after the noise.
        options = {"posts_median": float(config.posts_per_user),
                   "posts_min": max(56, min(75, config.posts_per_user))}
    synth = write_archive(SynthConfig(out=state.archive, users=config.users, seed=config.seed,
                                      categories=config.categories, overwrite=True, **options))
    _say(f"archive: {synth.get('users')} users, {synth.get('posts'):,} posts -> "
         f"{state.archive}")
    if config.nightly_share > 0:
        later = storage.join(config.out, "nightly-posts.jsonl")
        since = hold_back_newest(state.archive, later, config.nightly_share)
        if since is not None:
            state.result["nightly"] = {"posts": later, "since": since}
            _say(f"held back the newest {config.nightly_share:.0%} of the posts (from "
                 f"{since}) for the nightly job")


def step_preprocess(state: DemoState) -> None:
    from csmn.pipeline.preprocess import PreprocessConfig, preprocess
    from csmn.pipeline.runtime import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    manifest = preprocess(state.archive, state.root, PreprocessConfig(
        seed=state.config.seed, train_user_fraction=state.config.train_user_fraction))
    records = manifest["records"]
    rejected = sum(records.get("rejected", {}).values())
    _say(f"preprocess: {records['in']:,} records -> {records['posts']:,} posts of "
         f"{records['users']} users ({rejected} rejected, {records.get('duplicates', 0)} "
         f"duplicates)")
    for task, splits in manifest["splits"].items():
        shown = ", ".join(f"{name} {s['posts']}/{s['users']}" for name, s in splits.items())
        _say(f"  {task} splits (posts/users): {shown}")


def step_extract(state: DemoState) -> None:
    from csmn.pipeline.extract import ExtractConfig, run_extract

    config = state.config
    summary = run_extract(ExtractConfig(
        data=state.root, layer="pool5", weights=config.weights, seed=config.seed,
        crop_size=config.crop_size, resize_size=config.resize_size,
        # The demo rewrites its archive on every run, so earlier features are stale.
        overwrite=True))
    codes = ", ".join(f"{k} {v}" for k, v in summary["rejects_by_code"].items()) or "none"
    _say(f"features: {summary['images']:,} images -> {summary['written']:,} pool5 vectors, "
         f"{summary['rejected']} rejected ({codes}); {summary['images_per_s']} images/s, "
         f"{summary['seconds']} s, weights {summary['weights']}")


def step_models(state: DemoState) -> None:
    config = state.config
    runs = [(task, "by_users") for task in config.tasks]
    if BY_POSTS_TASK in config.tasks and config.hashtags_by_posts:
        runs.append((BY_POSTS_TASK, "by_posts"))
    for index, (task, family) in enumerate(runs, 1):
        _train_evaluate_promote(state, task, family, f"{index}/{len(runs)}")


def step_generate(state: DemoState) -> None:
    """The nightly job over the posts that arrived after training, with the champions."""
    from csmn.pipeline.generate import GenerateConfig, format_summary, run_generate

    nightly = state.result.get("nightly")
    if not nightly:
        _say("no posts held back (--nightly-share 0): nothing to generate")
        return
    storage.write_text(storage.join(state.archive, "posts", "part-nightly.jsonl"),
                       storage.read_text(nightly["posts"]))
    models = {f"{task}_model": f"models:/{REGISTERED_MODEL_NAMES[task]}@champion"
              if task in state.config.tasks else "none" for task in (HASHTAG, POST)}
    summary = run_generate(GenerateConfig(
        archive=state.archive, out=storage.join(state.config.out, "nightly"),
        since=nightly["since"], tracking_uri=state.result.get("tracking_uri", ""),
        weights=state.config.weights if state.config.weights != "random" else "",
        **models))
    nightly["summary"] = {k: summary[k] for k in ("run_date", "counts", "rejects",
                                                  "posts_per_second", "models")}
    nightly["out"] = storage.join(state.config.out, "nightly", "predictions")
    _say(format_summary(summary))
    _say(f"predictions: {nightly['out']}")


def step_report(state: DemoState) -> None:
    from csmn.eval.report import render_demo_html

    path = storage.join(state.config.out, REPORT_FILE)
    # What is written and shown has no credentials (a tracking URI may hold a password);
    # the run itself keeps the real URI.
    storage.write_text(path, render_demo_html(redact(state.result)))
    state.result["report"] = path
    _say(f"report: {path}")


# The job's steps in order; a step reads and extends ``DemoState.result``.
STEPS: list[tuple[str, Step]] = [
    ("synthetic archive", step_synth),
    ("preprocess (Ray Data)", step_preprocess),
    ("image features: ResNet-101 pool5 (Ray Data)", step_extract),
    ("train, evaluate, promote (Ray Train, Ray Data, MLflow)", step_models),
    ("nightly generation for the newest posts (Ray Data)", step_generate),
    ("report", step_report),
]


def run_demo(config: DemoConfig, steps: list[tuple[str, Step]] | None = None) -> dict[str, Any]:
    steps = STEPS if steps is None else steps
    archive, root = storage.join(config.out, "archive"), storage.join(config.out, "data")
    state = DemoState(config, archive, root, {
        "archive": archive, "data": root, "weights": config.weights, "sections": [],
        "tasks": {}}, time.perf_counter())
    for number, (name, step) in enumerate(steps, 1):
        _banner(f"{number}/{len(steps)} {name}")
        step(state)
    state.result["seconds"] = round(time.perf_counter() - state.started, 1)
    return state.result


def _train_evaluate_promote(state: DemoState, task: str, family: str, count: str) -> None:
    """Train, evaluate, promote one task and family of splits; the registry holds only the
    models the nightly job may use, those split by users."""
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate
    from csmn.pipeline.train import TrainConfig, train

    config, root = state.config, state.root
    by_posts = family == "by_posts"
    train_split, val_split, test_split = SPLIT_FAMILIES[family]
    title = f"{task}, split {family.replace('_', ' ')}"
    _say(f"-- {count} {title}: train CSMN-P5 ({config.epochs} epochs)")
    trained = train(TrainConfig(
        data=root, task=task, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, seed=config.seed, train_split=train_split,
        val_split=val_split, register=not by_posts,
        model={"embed_dim": config.embed_dim, "memory_dim": config.memory_dim,
               "cnn_depth": config.cnn_depth}))
    model_uri = (trained.model_uri if by_posts
                 else f"models:/{REGISTERED_MODEL_NAMES[task]}/{trained.registered_version}")
    best = trained.best_metrics
    _say(f"model {model_uri}: best epoch {int(best.get('epoch', 0))} of "
         f"{trained.epochs_completed} (MLflow run {trained.mlflow_run_id})")

    _say(f"-- {count} {title}: evaluate on {test_split} with the 1NN baselines")
    os.environ.setdefault("MLFLOW_TRACKING_URI", trained.tracking_uri)
    report = evaluate(EvaluateConfig(data=root, model=model_uri, task=task, split=test_split,
                                     report_examples=config.report_examples))
    scores = report["results"].get("csmn", {})
    shown = "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float))
    _say(f"evaluation: {report['counts']['scored']} posts scored; CSMN-P5 {shown}")
    promotion = None
    if not by_posts:
        _say(f"-- {count} {title}: promote (paired bootstrap against @champion)")
        promotion = _promote(config, REGISTERED_MODEL_NAMES[task], trained.registered_version,
                             root)
        state.result.setdefault("promotions", {})[task] = promotion
    key = vocab_name(task, test_split)
    state.result["tasks"][key] = {
        "model": model_uri, "mlflow_run_id": trained.mlflow_run_id,
        "tracking_uri": trained.tracking_uri, "report": report["out"],
        "results": report["results"]}
    state.result["tracking_uri"] = trained.tracking_uri
    state.result["sections"].append({
        "key": key, "task": task, "split": test_split, "by_posts": by_posts,
        "title": f"{task}, {test_split} (split {family.replace('_', ' ')})",
        "results": report["results"], "counts": report["counts"],
        "per_user": report["per_user"], "promotion": promotion,
        "examples": _with_attention(report["examples"], model_uri, trained.tracking_uri,
                                    root, task, test_split),
        "training": _training_history(trained, task),
        "evaluation": _evaluation_run(report, trained.tracking_uri),
    })


def _training_history(trained: Any, task: str) -> dict[str, Any]:
    from csmn import tracking
    from csmn.pipeline.train import TrainConfig

    metric = TrainConfig(task=task).metric_name
    history = tracking.metric_histories(trained.tracking_uri, trained.mlflow_run_id,
                                        ["train_loss", "val_loss", metric])
    return {**history, "run_id": trained.mlflow_run_id, "metric_name": metric}


def _evaluation_run(report: dict[str, Any], tracking_uri: str) -> dict[str, Any] | None:
    from csmn import tracking

    run = report.get("mlflow")
    if not run:
        return None
    return {"run_id": run["run_id"],
            "experiment_id": tracking.metric_histories(tracking_uri, run["run_id"],
                                                       [])["experiment_id"]}


def _with_attention(examples: list[dict[str, Any]], model_uri: str, tracking_uri: str,
                    root: str, task: str, split: str) -> list[dict[str, Any]]:
    """The report's example posts decoded again with the attention kept (paper eq. 5), per
    step its split between the image, context and output memories."""
    import pyarrow.compute as pc

    from csmn import tracking
    from csmn.core.predictor import Predictor
    from csmn.eval.baselines import read_features
    from csmn.eval.report import attention_split

    if not examples:
        return examples
    with tempfile.TemporaryDirectory(prefix="csmn-demo-model-") as work_dir:
        predictor = Predictor.from_checkpoint(
            tracking.resolve_checkpoint(model_uri, tracking_uri, work_dir))
    post_ids = [e["post_id"] for e in examples]
    table = storage.read_parquet(layout.examples_dir(root, task, split),
                                 columns=["post_id", "context_words"])
    table = table.filter(pc.is_in(table.column("post_id"), value_set=pc.cast(
        post_ids, table.schema.field("post_id").type)))
    context_of = dict(zip(table.column("post_id").to_pylist(),
                          table.column("context_words").to_pylist(), strict=True))
    features = read_features(root, [e["image"] for e in examples],
                             predictor.config.image_layer)
    decoded = predictor.predict(features, [context_of.get(p) or [] for p in post_ids],
                                with_attention=True)
    return [{**example, "attention": attention_split(attention)}
            for example, attention in zip(examples, decoded.attention or [], strict=True)]


def _promote(config: DemoConfig, name: str, version: str, root: str) -> str:
    """The gate against the current champion (a demo run before this one, on the same data,
    left one); the demo's features come from random weights unless --weights says otherwise,
    and that is written on the version."""
    from csmn.pipeline.promote import PromoteConfig, Refused, promote, summary_line

    try:
        decision = promote(PromoteConfig(name=name, candidate=version, data=root,
                                         allow_random_features=config.weights == "random"))
    except Refused as err:
        line = f"{name} v{version}: refused: {err}"
    else:
        line = summary_line(decision)
    _say(f"promotion: {line}")
    return line


# ------------------------------------------------------------------------------ the outcome


def outcome_lines(result: dict[str, Any], dashboard: str | None = None) -> list[str]:
    """What a person needs at the end: the tables beside the paper's, where things are."""
    from csmn.eval.report import comparison_table, text_table

    lines = [f"archive:  {result['archive']}", f"data:     {result['data']}", ""]
    for section in result.get("sections", []):
        header, rows = comparison_table(section["task"], section["by_posts"],
                                        section["results"])
        lines += [f"{section['title']}: {section['counts']['scored']} posts scored",
                  text_table(header, rows), ""]
    lines += [f"promotion: {line}" for line in result.get("promotions", {}).values()]
    nightly = (result.get("nightly") or {}).get("summary")
    if nightly:
        counts = nightly["counts"]
        lines.append(f"nightly:   {counts['predicted']} new posts predicted "
                     f"({counts['before_since']} older as history), "
                     f"{result['nightly']['out']}")
    if result.get("report"):
        lines.append(f"report:    {result['report']}")
    if dashboard:
        lines.append(f"dashboard: {dashboard} (while the head ran)")
    if result.get("tracking_uri"):
        lines.append("MLflow:    mlflow ui --backend-store-uri "
                     f"{redact_text(result['tracking_uri'])}")
    if result.get("weights") == "random":
        lines.append("NOTE: image features came from RANDOM ResNet-101 weights "
                     "(--weights random).")
    lines.append(f"pipeline took {result['seconds']} s")
    return lines


def _run_job(config: DemoConfig) -> dict[str, Any]:
    result = run_demo(config)
    storage.write_json(storage.join(config.out, SUMMARY_FILE), redact(result))
    return result


@exit_code_2("jobs/demo.py")
def job_main(argv: list[str] | None = None) -> int:
    """The job's entry point (``jobs/demo.py``): the pipeline, on the cluster it runs in."""
    from csmn.pipeline.runtime import setup_logging

    args = config_parser(DemoConfig, "jobs/demo.py", __doc__.split("\n")[0]).parse_args(argv)
    setup_logging("WARNING")
    _run_job(config_from_args(DemoConfig, args, args.config_file))
    return 0


def job_arguments(config: DemoConfig) -> list[str]:
    """DemoConfig as the job's flags (every field, so the job needs no file)."""
    arguments = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        text = (",".join(map(str, value)) if isinstance(value, (list, tuple))
                else str(value).lower() if isinstance(value, bool) else str(value))
        arguments += ["--" + f.name.replace("_", "-"), text]
    return arguments


def _absolute(config: DemoConfig) -> DemoConfig:
    """The job runs in Ray's copy of the working dir: a relative --out would land there."""
    if storage.is_s3(config.out):
        return config
    return dataclasses.replace(config, out=os.path.abspath(config.out))


def submit_demo(config: DemoConfig, launch: LaunchConfig,
                working_dir: str | None = None) -> tuple[int, dict[str, Any] | None, str]:
    """(job exit status, the job's summary, the dashboard URL): a local head started, the job
    submitted and its logs streamed, the head stopped whatever happens."""
    from csmn.pipeline import launch as launcher

    working_dir = working_dir or str(REPO)
    submission_id = f"csmn-demo-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    options = launcher.HeadOptions(num_cpus=launch.head_cpus or None,
                                   object_store_bytes=launch.head_object_store_mb * 1024**2)
    with launcher.sigterm_as_interrupt():
        _say("starting a local Ray head (token authentication on)")
        with launcher.local_head(options) as head:
            _say(f"Ray dashboard: {head.dashboard_url}  (token: {head.token_path})")
            _say(f"submitting job {submission_id}: ray job submit --working-dir "
                 f"{working_dir} -- python jobs/demo.py ...")
            status = launcher.submit_job(
                head, ["python", "jobs/demo.py", *job_arguments(config)], working_dir,
                submission_id, runtime_env={"env_vars": head.job_env_vars()},
                out=sys.stdout, line_filter=_job_line_wanted)
            dashboard = head.dashboard_url
        _say("stopped the local Ray head")
    summary_uri = storage.join(config.out, SUMMARY_FILE)
    summary = storage.read_json(summary_uri) if status == 0 and storage.exists(summary_uri) \
        else None
    return status, summary, dashboard


# ``ray job submit``'s own chatter: which .gitignore files it honoured, the upload, the hints
# on how to query the job; its submitted/succeeded/failed lines and the job's logs stay.
_SUBMIT_CHATTER = re.compile(r"\sINFO (packaging|dashboard_sdk|sdk|cli)\.py:")


def _job_line_wanted(line: str) -> bool:
    stripped = line.strip()
    if stripped.endswith("-" * 20):
        return False
    return not _SUBMIT_CHATTER.search(line) or "Status message" in line


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(DemoConfig, "csmn demo", __doc__.split("\n")[0])
    add_config_arguments(parser, LaunchConfig)
    return parser


@exit_code_2("csmn demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # One --config file may hold the launch's fields (in_process, head_cpus) beside the demo's.
    config, launch = configs_from_args((DemoConfig, LaunchConfig), args, args.config_file)
    config = _absolute(config)
    if launch.in_process:
        from csmn.pipeline.runtime import setup_logging

        setup_logging("WARNING")
        status, summary, dashboard = 0, _run_job(config), None
    else:
        try:
            status, summary, dashboard = submit_demo(config, launch)
        except KeyboardInterrupt:
            _say("interrupted: the job and the local Ray head were stopped")
            return 130
    if status != 0 or summary is None:
        _say(f"the demo job failed (exit status {status}); its log is above")
        return status or 1
    _banner("done")
    for line in outcome_lines(summary, dashboard):
        _say(line)
    return 0
