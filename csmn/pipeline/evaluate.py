"""``csmn evaluate``: decode a whole split with a trained model, score it, run the baselines.

Decoding is Ray Data batch inference: the split's feature files are streamed, joined with
the split's examples, and decoded by the model in an actor pool (``ActorPoolStrategy``; one
GPU per actor when asked). The metrics (csmn.eval.metrics: pycocoevalcap for posts, set F1 for
hashtags) and the nearest-neighbour baselines (csmn.eval.baselines) run on the driver: they are
cheap next to decoding, and CIDEr and the baselines need the whole split at once.

Every method is scored on the same posts: those with features for the model's layer and, when
baselines run, pool5. Posts without them are counted in the report, never dropped silently:
``examples = scored + skipped_no_features``.

Model URIs: ``models:/name@alias``, ``models:/name/version``, ``runs:/<run id>/model`` (MLflow:
the pyfunc logged by training, which carries the checkpoint) or a checkpoint folder (local or
``s3://``). With no ``--model`` only the baselines run.

MLflow: when the model came from MLflow (``runs:/`` or ``models:/``), the evaluation is a new
run in the experiment of the model's training run, named ``evaluate-<task>-<split>`` and
tagged with the model URI, its training run, the split and the data root; its metrics are
``<method>/<metric>`` (``csmn/f1``, ``1nn-usrim/f1``, ``csmn/bleu_4``...) and its artifacts
the report files under ``report/``. A separate run, not the training run: a model is evaluated
on several splits and data roots, and each evaluation keeps its own metrics and report (the
promotion gate finds them by the ``csmn.model_uri`` and ``csmn.split`` tags). A checkpoint
folder has no MLflow run to attach to: its evaluation is not logged.

``csmn evaluate --ablation ...`` runs the paper's Tables 2/3 instead (csmn.experiments.ablation).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from csmn.config import config_from_args, config_parser
from csmn.data import layout, storage
from csmn.data.layout import (
    BY_POSTS_TASK,
    TEST,
    TEST_BY_POSTS,
    VAL,
    VAL_BY_POSTS,
    canonical_task,
    is_by_posts,
    train_split_of,
)

log = logging.getLogger(__name__)

# The training split each evaluation split's baselines search.
# The splits a model is evaluated on; the baselines search the training split of the family.
EVALUATION_SPLITS = (TEST, VAL, TEST_BY_POSTS, VAL_BY_POSTS)
EXAMPLE_COLUMNS = ["user_id", "post_id", "image", "text", "context_words"]
MODEL_METHOD = "csmn"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass
class EvaluateConfig:
    data: str = field(default="", metadata={"help": "data root written by preprocessing"})
    model: str = field(
        default="",
        metadata={"help": "models:/name@alias | models:/name/version | runs:/... | checkpoint"},
    )
    split: str = field(default="test", metadata={"help": "test | val | test_by_posts | ..."})
    task: str = field(default="hashtag", metadata={"help": "hashtag | post (caption: post)"})
    baselines: str = field(
        default="1nn-im,1nn-usr,1nn-usrim", metadata={"help": "comma list, or 'none'"}
    )
    out: str = field(default="", metadata={"help": "report folder (default under the data)"})
    batch_size: int = field(default=256, metadata={"help": "images per decoding batch"})
    actors: int = field(default=1, metadata={"help": "decoding actors (one model each)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per decoding actor"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per decoding actor"})
    beam_width: int = field(default=1, metadata={"help": "1 = greedy, the paper's decoding"})
    seed: int = field(default=0, metadata={"help": "seed of 1NN-Usr's random post"})
    report_examples: int = field(default=8, metadata={"help": "example predictions shown"})
    report_users: int = field(default=10, metadata={"help": "users shown in the markdown"})
    log_to_mlflow: bool = field(default=True, metadata={
        "help": "log metrics and report to a new MLflow run when the model is runs:/ or models:/"
    })

    def __post_init__(self) -> None:
        self.task = canonical_task(self.task)
        if self.split not in EVALUATION_SPLITS:
            raise ValueError(f"split must be one of {', '.join(EVALUATION_SPLITS)}, "
                             f"got {self.split!r}")
        if is_by_posts(self.split) and self.task != BY_POSTS_TASK:
            raise ValueError("the split by posts exists for the hashtag task only")

    @property
    def baseline_names(self) -> list[str]:
        from csmn.eval.baselines import BASELINES

        text = self.baselines.strip().lower()
        if text in ("", "none"):
            return []
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; known: {', '.join(BASELINES)}")
        return names


# ------------------------------------------------------------------------ model resolution


def resolve_checkpoint(model_uri: str, tracking_uri: str | None, work_dir: str) -> str:
    """The checkpoint folder behind a model URI (MLflow models are downloaded to work_dir)."""
    if not model_uri.startswith(MLFLOW_SCHEMES):
        return model_uri
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=work_dir)
    from csmn.core.checkpoint import METADATA_FILE

    for directory, _, files in os.walk(local):
        if METADATA_FILE in files:
            return directory
    raise FileNotFoundError(f"{model_uri}: no CSMN checkpoint ({METADATA_FILE}) in the model")


class Decoder:
    """One model per actor: a batch of feature rows in, the predicted words of the split's
    examples with those images out.

    The join is done here, in the decoding actor (no second actor pool holding CPUs): the
    split's examples table (small: ids and context words) comes through the object store once
    per actor. An image shared by several posts yields one prediction per post.
    """

    def __init__(
        self,
        examples_ref: Any,
        model_uri: str,
        tracking_uri: str | None,
        beam_width: int,
        gpu: bool,
    ):
        import ray
        import torch

        from csmn.core.checkpoint import load_checkpoint

        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        # the downloaded model is only read here: once in memory, its files can go
        with tempfile.TemporaryDirectory(prefix="csmn-eval-model-") as work_dir:
            loaded = load_checkpoint(resolve_checkpoint(model_uri, tracking_uri, work_dir), device)
        self.model, self.config, self.vocab = loaded.model, loaded.model_config, loaded.vocab
        self.task, self.device, self.beam_width = loaded.task, device, beam_width
        self.word_ids = {word: i for i, word in enumerate(self.vocab)}
        self.examples: pa.Table = ray.get(examples_ref)

    def _join(self, features: pa.Table) -> pa.Table:
        position = pc.index_in(self.examples.column("image"), value_set=features.column("image"))
        present = pc.is_valid(position)
        matched = self.examples.filter(present)
        return matched.append_column(
            "feature", features.column("feature").take(pc.filter(position, present))
        )

    def __call__(self, features: pa.Table) -> pa.Table:
        import torch

        from csmn.core.decoding import decode
        from csmn.core.tokens import SPECIAL_TOKENS

        batch = self._join(features)
        if batch.num_rows == 0:
            return pa.table(
                {
                    "post_id": pa.array([], pa.string()),
                    "prediction": pa.array([], pa.list_(pa.string())),
                }
            )
        first_word = len(SPECIAL_TOKENS)
        features = batch.column("feature").combine_chunks()
        matrix = features.values.to_numpy(zero_copy_only=False).reshape(len(batch), -1)
        # Arrow's buffers are read-only and torch.from_numpy wants a writable array.
        matrix = np.require(matrix, dtype=np.float32, requirements="W")
        if self.config.image_slots > 1:
            matrix = matrix.reshape(len(batch), self.config.image_slots, -1)
        context = np.zeros((len(batch), self.config.context_size), dtype=np.int64)
        for row, words in enumerate(batch.column("context_words").to_pylist()):
            # the checkpoint's vocabulary decides the ids; unknown words carry nothing learned
            ids = [self.word_ids[w] for w in words or [] if self.word_ids.get(w, 0) >= first_word]
            ids = ids[: self.config.context_size]
            context[row, : len(ids)] = ids
        result = decode(
            self.model,
            torch.from_numpy(matrix).to(self.device),
            torch.from_numpy(context).to(self.device),
            beam_width=self.beam_width,
            dedupe_tokens=self.task == "hashtag",
        )
        words = [[self.vocab[i] for i in ids if i >= first_word] for ids in result.token_ids]
        return pa.table(
            {
                "post_id": batch.column("post_id"),
                "prediction": pa.array(words, pa.list_(pa.string())),
            }
        )


def decode_split(
    config: EvaluateConfig, examples: pa.Table, layer: str, tracking_uri: str | None
) -> dict[str, list[str]]:
    """post_id -> predicted words, for every example with a ``layer`` feature (Ray Data)."""
    import ray

    from csmn.pipeline.runtime import init_ray

    init_ray()
    feature_files = storage.list_files(layout.features_dir(config.data, layer), ".parquet")
    if not feature_files:
        raise FileNotFoundError(f"no {layer} features under {config.data}: run extract-features")
    filesystem, _ = storage.resolve(feature_files[0])
    paths = [storage.resolve(uri)[1] for uri in feature_files]
    keys = examples.select(["post_id", "image", "context_words"])
    dataset = ray.data.read_parquet(
        paths, filesystem=filesystem, columns=["image", "feature"]
    ).map_batches(
        Decoder,
        fn_constructor_args=(
            ray.put(keys),
            config.model,
            tracking_uri,
            config.beam_width,
            config.use_gpu,
        ),
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if config.use_gpu else 0,
    )
    predictions: dict[str, list[str]] = {}
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for post_id, words in zip(
            batch.column("post_id").to_pylist(), batch.column("prediction").to_pylist(), strict=True
        ):
            if post_id in predictions:
                raise ValueError(f"post {post_id} decoded twice: duplicate images in {layer}")
            predictions[post_id] = words
    return predictions


# ------------------------------------------------------------------------------ evaluation


def _score(task: str, truths: list[str], predictions: list[list[str]], contexts, scorer):
    from csmn.eval import metrics

    share = metrics.context_share(predictions, contexts)
    if task == "hashtag":
        hashtags = metrics.score_hashtags(truths, predictions)
        return {**hashtags.summary(), "context_share": share}, hashtags, None
    posts = metrics.score_posts(truths, [" ".join(p) for p in predictions], scorer=scorer)
    return {**posts.summary(), "context_share": share}, None, posts


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation; write ``report.json``, ``report.md`` and ``predictions.parquet``
    under ``config.out`` and return the report."""
    from csmn.eval import metrics, report
    from csmn.eval.baselines import Queries, features_by_image, load_training_set, read_features
    from csmn.eval.baselines import run_baselines as run_nn
    from csmn.tracking import resolve_tracking_uri

    if not config.data:
        raise ValueError("--data is required: the data root written by preprocessing")
    baseline_names = config.baseline_names
    if not config.model and not baseline_names:
        raise ValueError("nothing to evaluate: give --model and/or --baselines")
    out = config.out or storage.join(
        layout.evaluations_dir(config.data),
        f"{config.task}-{config.split}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}",
    )
    examples_dir = layout.examples_dir(config.data, config.task, config.split)
    if not storage.list_files(examples_dir, ".parquet"):
        raise FileNotFoundError(f"no examples at {examples_dir}: run preprocessing first")
    examples = storage.read_parquet(examples_dir, columns=EXAMPLE_COLUMNS).combine_chunks()
    missing_columns = set(EXAMPLE_COLUMNS) - set(examples.column_names)
    if missing_columns:
        raise ValueError(f"{examples_dir}: missing columns {sorted(missing_columns)}")

    model_info: dict[str, Any] = {}
    decoded: dict[str, list[str]] = {}
    usable = np.ones(examples.num_rows, dtype=bool)
    images = examples.column("image").to_pylist()
    if config.model:
        from csmn.core.checkpoint import read_metadata

        tracking_uri = None
        if config.model.startswith(MLFLOW_SCHEMES):
            tracking_uri = resolve_tracking_uri(config.data)
        with tempfile.TemporaryDirectory() as work_dir:
            metadata = read_metadata(resolve_checkpoint(config.model, tracking_uri, work_dir))
        if metadata["task"] != config.task:
            raise ValueError(f"{config.model} is a {metadata['task']} model, not {config.task}")
        layer = metadata["model_config"]["image_layer"]
        model_info = {
            "uri": config.model,
            "epoch": metadata.get("epoch"),
            "image_layer": layer,
            "checkpoint_metrics": metadata.get("metrics", {}),
            "variant": (metadata.get("train_config") or {}).get("variant"),
        }
        decoded = decode_split(config, examples, layer, tracking_uri)
        usable &= np.array([p in decoded for p in examples.column("post_id").to_pylist()])
    if baseline_names:
        known = features_by_image(config.data)
        usable &= np.array([image in known for image in images])
    scored = examples.filter(pa.array(usable))
    counts = {
        "examples": examples.num_rows,
        "scored": scored.num_rows,
        "skipped_no_features": int((~usable).sum()),
    }
    if scored.num_rows == 0:
        raise ValueError(f"none of the {examples.num_rows} examples of {config.split} has features")

    post_ids = scored.column("post_id").to_pylist()
    user_ids = scored.column("user_id").to_pylist()
    truths = scored.column("text").to_pylist()
    contexts = [c or [] for c in scored.column("context_words").to_pylist()]
    predictions: dict[str, list[list[str]]] = {}
    if config.model:
        predictions[MODEL_METHOD] = [decoded[p] for p in post_ids]
    if baseline_names:
        training = load_training_set(config.data, config.task, train_split_of(config.split))
        queries = Queries(
            post_ids=post_ids,
            features=read_features(config.data, scored.column("image").to_pylist()),
            context_words=contexts,
        )
        for name, result in run_nn(training, queries, baseline_names, seed=config.seed).items():
            predictions[name] = [text.split() for text in result.texts]

    results: dict[str, dict[str, Any]] = {}
    per_user: dict[str, list[dict[str, Any]]] = {}
    with metrics.CocoScorer() as scorer:
        for method, predicted in predictions.items():
            summary, hashtags, posts = _score(config.task, truths, predicted, contexts, scorer)
            results[method] = summary
            users = metrics.per_user_metrics(user_ids, predicted, contexts, hashtags, posts)
            per_user[method] = [asdict(u) for u in users]
    built = report.build_report(
        config=asdict(config),
        out=out,
        model=model_info,
        counts=counts,
        results=results,
        per_user=per_user,
        examples=report.example_rows(
            post_ids,
            user_ids,
            truths,
            contexts,
            predictions,
            config.report_examples,
            config.seed,
            images=scored.column("image").to_pylist(),
        ),
    )
    mlflow_run = None
    if config.model.startswith(("runs:/", "models:/")) and config.log_to_mlflow:
        mlflow_run = start_evaluation_run(config, resolve_tracking_uri(config.data), out)
        built["mlflow"] = {"run_id": mlflow_run[1], "tracking_uri": mlflow_run[0]}
    try:
        report.write_report(out, built, post_ids, user_ids, predictions, config.report_users)
        if mlflow_run is not None:
            finish_evaluation_run(*mlflow_run, built)
    except BaseException:
        if mlflow_run is not None:
            from mlflow.tracking import MlflowClient

            MlflowClient(mlflow_run[0]).set_terminated(mlflow_run[1], status="FAILED")
        raise
    return built


# ------------------------------------------------------------------------------ MLflow

REPORT_FILES = ("report.md", "report.html", "report.json", "predictions.parquet")


def model_source_run(model_uri: str, tracking_uri: str) -> tuple[str | None, str | None]:
    """(training run id, registered version or None) behind ``runs:/`` or ``models:/``:
    ``models:/name@alias``, ``models:/name/version`` or a LoggedModel ``models:/m-<id>``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/", 1)[0], None
    path = model_uri.removeprefix("models:/").strip("/")
    if "@" in path:
        name, alias = path.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
        return version.run_id, str(version.version)
    if "/" in path:
        name, number = path.split("/", 1)
        version = client.get_model_version(name, number)
        return version.run_id, str(version.version)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.get_logged_model(path).source_run_id, None


def start_evaluation_run(config: EvaluateConfig, tracking_uri: str, out: str) -> tuple[str, str]:
    """Create the evaluation run (see the module docstring); returns (tracking URI, run id)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    source_run, version = model_source_run(config.model, tracking_uri)
    if source_run:
        experiment_id = client.get_run(source_run).info.experiment_id
    else:
        mlflow.set_tracking_uri(tracking_uri)
        experiment_id = mlflow.set_experiment(f"csmn-{config.task}").experiment_id
    tags = {
        "csmn.kind": "evaluation",
        "csmn.model_uri": config.model,
        "csmn.task": config.task,
        "csmn.split": config.split,
        "csmn.data": config.data,
        "csmn.report": out,
    }
    if source_run:
        tags["csmn.model_run_id"] = source_run
    if version:
        tags["csmn.model_version"] = version
    run = client.create_run(
        experiment_id, run_name=f"evaluate-{config.task}-{config.split}", tags=tags
    )
    return tracking_uri, run.info.run_id


def evaluation_metrics(built: dict[str, Any]) -> dict[str, float]:
    """``<method>/<metric>`` for every numeric result, and the post counts."""
    values = {f"count/{k}": float(v) for k, v in built["counts"].items()}
    for method, results in built["results"].items():
        for key, value in results.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{method}/{key}"] = float(value)
    return values


def finish_evaluation_run(tracking_uri: str, run_id: str, built: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    from csmn.tracking import log_metrics

    client = MlflowClient(tracking_uri)
    log_metrics(tracking_uri, run_id, evaluation_metrics(built), step=0)
    with tempfile.TemporaryDirectory(prefix="csmn-eval-report-") as directory:
        for name in REPORT_FILES:
            uri = storage.join(built["out"], name)
            if storage.exists(uri):
                with open(os.path.join(directory, name), "wb") as handle:
                    handle.write(storage.read_bytes(uri))
        client.log_artifacts(run_id, directory, artifact_path="report")
    client.set_terminated(run_id, status="FINISHED")


def build_parser() -> argparse.ArgumentParser:
    return config_parser(EvaluateConfig, "csmn evaluate", __doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    from csmn.pipeline.runtime import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ablation" in argv:
        from csmn.experiments.ablation import main as ablation_main

        argv.remove("--ablation")
        return ablation_main(argv)
    setup_logging()
    args = build_parser().parse_args(argv)
    config = config_from_args(EvaluateConfig, args, args.config_file)
    built = evaluate(config)
    print(
        json.dumps(
            {"out": built["out"], "counts": built["counts"], "results": built["results"]}, indent=2
        )
    )
    return 0
