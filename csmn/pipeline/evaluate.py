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
run in the experiment of the model's training run (csmn.tracking.evaluation: its tags, the
metrics ``<method>/<metric>`` linked to the LoggedModel and the data root's dataset, the
report files under ``report/``); ``csmn.tracking.find_evaluation`` finds it again for a
promotion gate. A checkpoint folder has no MLflow run to attach to: its evaluation is not
logged.

Decoding goes through csmn.core.predictor, as the served model does. The paper's Tables 2/3
are ``csmn ablation`` (csmn.experiments.ablation), which calls this module.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from csmn.config import config_from_args, config_parser, config_to_dict, redact_text
from csmn.core.tokens import BLOCK, LIKELY, REPEATS_HELP, STOP_HELP, task_rules
from csmn.data import layout, storage
from csmn.data.completeness import exit_code_2, require_data_root
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
from csmn.data.schemas import validate
from csmn.eval.report import MODEL_METHOD  # the model's key among the methods

log = logging.getLogger(__name__)

# The training split each evaluation split's baselines search.
# The splits a model is evaluated on; the baselines search the training split of the family.
EVALUATION_SPLITS = (TEST, VAL, TEST_BY_POSTS, VAL_BY_POSTS)
EXAMPLE_COLUMNS = ["user_id", "post_id", "image", "text", "context_words"]


@dataclass
class EvaluateConfig:
    data: str = field(default="", metadata={"help": "data root written by preprocessing"})
    model: str = field(
        default="",
        metadata={"help": "models:/name@alias | models:/name/version | runs:/... | checkpoint"},
    )
    split: str = field(default="test", metadata={
        "help": f"{' | '.join(EVALUATION_SPLITS)} (by posts: the hashtag task only)"})
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
    repeats: str = field(default=BLOCK, metadata={"help": REPEATS_HELP})
    stop: str = field(default=LIKELY, metadata={"help": STOP_HELP})
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
        task_rules(self.task, self.repeats, self.stop)  # refuses an unknown rule now
        # Here, not in the decoding actors, where a bad value comes back as an actor's death.
        for name, least in (("batch_size", 1), ("actors", 1), ("beam_width", 1),
                            ("report_examples", 0), ("report_users", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not self.cpus_per_actor > 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")

    @property
    def decoding(self) -> str:
        """How the model's words were decoded: an evaluation's predictions are reused (the
        promotion gate) only under the same rules."""
        # The phrase rule came after the first evaluations of posts: named, so that those
        # decoded without it are not reused.
        phrases = task_rules(self.task, self.repeats, self.stop)["no_repeat_ngram"]
        return (f"beam_width={self.beam_width} repeats={self.repeats} stop={self.stop}"
                + (f" no_repeat_ngram={phrases}" if phrases else ""))

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


# ------------------------------------------------------------------------------ decoding


class Decoder:
    """One csmn.core.predictor.Predictor per actor: a batch of feature rows in, the predicted
    words of the split's examples with those images out.

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
        batch_size: int = 256,
        repeats: str = BLOCK,
        stop: str = LIKELY,
    ):
        import ray
        import torch

        from csmn.core.predictor import Predictor

        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        # the downloaded model is only read here: once in memory, its files can go
        with tempfile.TemporaryDirectory(prefix="csmn-eval-model-") as work_dir:
            self.predictor = Predictor.from_checkpoint(
                _checkpoint_dir(model_uri, tracking_uri, work_dir),
                device=device, batch_size=batch_size, beam_width=beam_width,
                repeats=repeats, stop=stop)
        self.examples: pa.Table = ray.get(examples_ref)

    def _join(self, features: pa.Table) -> pa.Table:
        position = pc.index_in(self.examples.column("image"), value_set=features.column("image"))
        present = pc.is_valid(position)
        matched = self.examples.filter(present)
        return matched.append_column(
            "feature", features.column("feature").take(pc.filter(position, present))
        )

    def __call__(self, features: pa.Table) -> pa.Table:
        batch = self._join(features)
        words: list[list[str]] = []
        if batch.num_rows:
            flat = pc.list_flatten(batch.column("feature")).to_numpy()
            matrix = flat.reshape(batch.num_rows, -1)
            contexts = batch.column("context_words").to_pylist()
            words = self.predictor.predict(matrix, contexts).words
        return pa.table(
            {
                "user_id": batch.column("user_id").cast(pa.string()),
                "post_id": batch.column("post_id").cast(pa.string()),
                "prediction": pa.array(words, pa.list_(pa.string())),
            }
        )


def _checkpoint_dir(model_uri: str, tracking_uri: str | None, work_dir: str) -> str:
    """A checkpoint folder as is; an MLflow model downloaded into work_dir."""
    if tracking_uri is None:
        return model_uri
    from csmn import tracking

    return tracking.resolve_checkpoint(model_uri, tracking_uri, work_dir)


# A post is named by its user and its id: post ids are unique per user only (two users may
# both have a post "1").
PostKey = tuple[str, str]


def post_keys(table: pa.Table) -> list[PostKey]:
    return list(zip(table.column("user_id").cast(pa.string()).to_pylist(),
                    table.column("post_id").cast(pa.string()).to_pylist(), strict=True))


def decode_split(
    config: EvaluateConfig, examples: pa.Table, layer: str, tracking_uri: str | None
) -> dict[PostKey, list[str]]:
    """(user_id, post_id) -> predicted words, for every example with a ``layer`` feature
    (Ray Data)."""
    import ray

    from csmn.pipeline.runtime import init_ray

    init_ray()
    feature_files = storage.list_files(layout.features_dir(config.data, layer), ".parquet")
    if not feature_files:
        raise FileNotFoundError(f"no {layer} features under {config.data}: run extract-features")
    filesystem, _ = storage.resolve(feature_files[0])
    paths = [storage.resolve(uri)[1] for uri in feature_files]
    keys = examples.select(["user_id", "post_id", "image", "context_words"])
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
            config.batch_size,
            config.repeats,
            config.stop,
        ),
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if config.use_gpu else 0,
    )
    predictions: dict[PostKey, list[str]] = {}
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for key, words in zip(post_keys(batch), batch.column("prediction").to_pylist(),
                              strict=True):
            if key in predictions:
                raise ValueError(f"post {key[1]} of user {key[0]} decoded twice: duplicate "
                                 f"images in {layer}")
            predictions[key] = words
    return predictions


# ------------------------------------------------------------------------------ evaluation


@dataclass
class ResolvedModel:
    """The evaluated model: its URI, the store it lives in (None for a checkpoint folder),
    its image layer and what the report says about it."""

    uri: str
    tracking_uri: str | None
    layer: str
    info: dict[str, Any]


@dataclass
class Scored:
    """The posts every method is scored on, with their predictions per method."""

    examples: pa.Table
    counts: dict[str, int]
    predictions: dict[str, list[list[str]]] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        return self.examples.column(name).to_pylist()

    @property
    def contexts(self) -> list[list[str]]:
        return [c or [] for c in self.column("context_words")]


def load_examples(config: EvaluateConfig) -> pa.Table:
    """The split's examples, with the columns evaluation reads."""
    examples_dir = layout.examples_dir(config.data, config.task, config.split)
    if not storage.list_files(examples_dir, ".parquet"):
        raise FileNotFoundError(f"no examples at {examples_dir}: run preprocessing first")
    examples = storage.read_parquet(examples_dir, columns=EXAMPLE_COLUMNS).combine_chunks()
    return validate(examples, "example", EXAMPLE_COLUMNS)


def _pinned(config: EvaluateConfig) -> EvaluateConfig:
    """The config with an alias (``@champion``) or ``latest`` model URI pinned to the version
    it names now, so that every read of the model during the evaluation gets that one."""
    from csmn import tracking

    if not tracking.is_mlflow_uri(config.model):
        return config
    pinned = tracking.pinned_model_uri(config.model, tracking.resolve_tracking_uri(config.data))
    if pinned == config.model:
        return config
    log.info("evaluating %s: %s now", pinned, config.model)
    return replace(config, model=pinned)


def resolve_model(config: EvaluateConfig) -> ResolvedModel:
    """The model's checkpoint metadata (downloaded from MLflow when needed), checked
    against the task."""
    from csmn import tracking
    from csmn.core.checkpoint import read_metadata

    tracking_uri = None
    if tracking.is_mlflow_uri(config.model):
        tracking_uri = tracking.resolve_tracking_uri(config.data)
    with tempfile.TemporaryDirectory() as work_dir:
        metadata = read_metadata(_checkpoint_dir(config.model, tracking_uri, work_dir))
    if metadata["task"] != config.task:
        raise ValueError(f"{config.model} is a {metadata['task']} model, not {config.task}")
    layer = metadata["model_config"]["image_layer"]
    info = {
        "uri": config.model,
        "epoch": metadata.get("epoch"),
        "image_layer": layer,
        "checkpoint_metrics": metadata.get("metrics", {}),
        "variant": (metadata.get("train_config") or {}).get("variant"),
    }
    return ResolvedModel(config.model, tracking_uri, layer, info)


def scored_examples(config: EvaluateConfig, examples: pa.Table,
                    decoded: dict[PostKey, list[str]] | None) -> Scored:
    """The posts with features for every method run (decoded by the model; pool5 for the
    baselines); the others are counted, never dropped silently."""
    from csmn.eval.baselines import features_by_image

    usable = np.ones(examples.num_rows, dtype=bool)
    if decoded is not None:
        usable &= np.array([key in decoded for key in post_keys(examples)], dtype=bool)
    if config.baseline_names:
        known = features_by_image(config.data)
        usable &= np.array([image in known for image in examples.column("image").to_pylist()])
    scored = examples.filter(pa.array(usable))
    if scored.num_rows == 0:
        raise ValueError(f"none of the {examples.num_rows} examples of {config.split} has features")
    counts = {
        "examples": examples.num_rows,
        "scored": scored.num_rows,
        "skipped_no_features": int((~usable).sum()),
    }
    result = Scored(scored, counts)
    if decoded is not None:
        result.predictions[MODEL_METHOD] = [decoded[key] for key in post_keys(scored)]
    return result


def run_baselines(config: EvaluateConfig, scored: Scored) -> None:
    """The nearest-neighbour baselines' predictions, added to ``scored``."""
    from csmn.eval.baselines import Queries, load_training_set, read_features
    from csmn.eval.baselines import run_baselines as run_nn

    training = load_training_set(config.data, config.task, train_split_of(config.split))
    queries = Queries(
        post_ids=scored.column("post_id"),
        features=read_features(config.data, scored.column("image")),
        context_words=scored.contexts,
    )
    for name, result in run_nn(training, queries, config.baseline_names,
                               seed=config.seed).items():
        scored.predictions[name] = [text.split() for text in result.texts]


def _score(task: str, truths: list[str], predictions: list[list[str]], contexts, scorer):
    from csmn.eval import metrics

    share = metrics.context_share(predictions, contexts)
    if task == "hashtag":
        hashtags = metrics.score_hashtags(truths, predictions)
        return {**hashtags.summary(), "context_share": share}, hashtags, None
    posts = metrics.score_posts(truths, [" ".join(p) for p in predictions], scorer=scorer)
    return ({**posts.summary(), "context_share": share,
             "triple_repeats": metrics.triple_repeat_share(predictions),
             "repeated_phrases": metrics.repeated_phrase_share(predictions)}, None, posts)


def score(task: str, scored: Scored) -> tuple[dict[str, dict[str, Any]], dict[str, list]]:
    """(metrics per method, per-user metrics per method)."""
    from csmn.eval import metrics

    truths, contexts, user_ids = scored.column("text"), scored.contexts, scored.column("user_id")
    results: dict[str, dict[str, Any]] = {}
    per_user: dict[str, list[dict[str, Any]]] = {}
    with metrics.CocoScorer() as scorer:
        for method, predicted in scored.predictions.items():
            summary, hashtags, posts = _score(task, truths, predicted, contexts, scorer)
            results[method] = summary
            users = metrics.per_user_metrics(user_ids, predicted, contexts, hashtags, posts)
            per_user[method] = [asdict(u) for u in users]
    return results, per_user


def build_report(config: EvaluateConfig, out: str, model: ResolvedModel | None,
                 scored: Scored) -> dict[str, Any]:
    from csmn.eval import report

    results, per_user = score(config.task, scored)
    return report.build_report(
        config=config_to_dict(config),
        out=out,
        model=model.info if model else {},
        counts=scored.counts,
        results=results,
        per_user=per_user,
        examples=report.example_rows(
            scored.column("post_id"),
            scored.column("user_id"),
            scored.column("text"),
            scored.contexts,
            scored.predictions,
            config.report_examples,
            config.seed,
            images=scored.column("image"),
        ),
    )


def write_and_log(config: EvaluateConfig, built: dict[str, Any], scored: Scored) -> None:
    """Write the report files; for a model of the tracking store, log them and the metrics
    to a new evaluation run (csmn.tracking.evaluation), which fails with the writing."""
    from csmn.eval import report

    def write() -> None:
        report.write_report(built["out"], built, scored.column("post_id"),
                            scored.column("user_id"), scored.predictions, config.report_users)

    if not (config.log_to_mlflow and config.model.startswith(("runs:/", "models:/"))):
        write()
        return
    from csmn import tracking

    with tracking.evaluation_run(
        tracking.resolve_tracking_uri(config.data), model_uri=config.model, task=config.task,
        split=config.split, data_root=config.data, out=built["out"], decoding=config.decoding,
        features_layer=(built.get("model") or {}).get("image_layer"),
    ) as run:
        # The report is an artifact: the store's address without its credentials.
        built["mlflow"] = {"run_id": run.run_id, "tracking_uri": redact_text(run.tracking_uri)}
        write()
        tracking.log_evaluation(run, built)


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation; write ``report.json``, ``report.md`` and ``predictions.parquet``
    under ``config.out`` and return the report."""
    if not config.data:
        raise ValueError("--data is required: the data root written by preprocessing")
    if not config.model and not config.baseline_names:
        raise ValueError("nothing to evaluate: give --model and/or --baselines")
    require_data_root(config.data, "evaluate", ("pool5",) if config.baseline_names else ())
    out = config.out or storage.join(
        layout.evaluations_dir(config.data),
        # A unique part: two evaluations started in one second (two promotions at once)
        # must not write each other's predictions.
        f"{config.task}-{config.split}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-"
        f"{uuid.uuid4().hex[:8]}",
    )
    requested = config.model
    if config.model:
        config = _pinned(config)
    examples = load_examples(config)
    model = resolve_model(config) if config.model else None
    if model and requested != config.model:
        model.info.update(uri=requested, evaluated_uri=config.model)
    if model:
        require_data_root(config.data, "evaluate", (model.layer,))
    decoded = (decode_split(config, examples, model.layer, model.tracking_uri)
               if model else None)
    scored = scored_examples(config, examples, decoded)
    if config.baseline_names:
        run_baselines(config, scored)
    built = build_report(config, out, model, scored)
    write_and_log(config, built, scored)
    return built


def build_parser() -> argparse.ArgumentParser:
    return config_parser(EvaluateConfig, "csmn evaluate", __doc__.split("\n")[0])


@exit_code_2("csmn evaluate")
def main(argv: list[str] | None = None) -> int:
    import json

    from csmn.pipeline.runtime import setup_logging

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
