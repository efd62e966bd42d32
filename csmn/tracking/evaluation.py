"""Evaluations and ablations in MLflow: where a model URI's checkpoint and training run are,
the evaluation run of a model on a split and a data root, and how a promotion gate finds it.

An evaluation is a run of its own (not the training run: one model is evaluated on several
splits and data roots), in the experiment of the model's training run, named
``evaluate-<task>-<split>``. It carries:

- tags ``csmn.kind=evaluation``, ``csmn.model_uri``, ``csmn.model_run_id``,
  ``csmn.model_name`` and ``csmn.model_version`` (for a registered model), ``csmn.task``,
  ``csmn.split``, ``csmn.data``, ``csmn.data_digest``, ``csmn.report``;
- metrics ``<method>/<metric>`` and ``count/<name>``, logged with the LoggedModel's
  ``model_id`` (MLflow 3) and the data root's dataset, so that the Models view ranks
  versions by them;
- the data root as a dataset input (its digest: the manifest's), the LoggedModel as a model
  input, and the report files under ``report/``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from csmn.data import layout, storage
from csmn.tracking.runs import (
    finished_or_failed,
    flatten_params,
    get_or_create_experiment,
    log_metrics,
    redact_tags,
)

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# URIs whose evaluation is logged: they name a run or a model of the tracking store.
LOGGED_SCHEMES = ("models:/", "runs:/")
REPORT_FILES = ("report.md", "report.html", "report.json", "predictions.parquet")
EVALUATION_KIND = "evaluation"
DATASET_CONTEXT = "evaluation"


def is_mlflow_uri(model_uri: str) -> bool:
    return model_uri.startswith(MLFLOW_SCHEMES)


def resolve_checkpoint(model_uri: str, tracking_uri: str | None, work_dir: str) -> str:
    """The checkpoint folder behind a model URI: MLflow models are downloaded to work_dir,
    anything else is a checkpoint folder already."""
    if not is_mlflow_uri(model_uri):
        return model_uri
    from csmn.core.checkpoint import METADATA_FILE

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=work_dir)
    for directory, _, files in os.walk(local):
        if METADATA_FILE in files:
            return directory
    raise FileNotFoundError(f"{model_uri}: no CSMN checkpoint ({METADATA_FILE}) in the model")


@dataclass(frozen=True)
class ModelSource:
    """What a ``runs:/`` or ``models:/`` URI points at: the training run, the registered
    model and version (None for a bare run or LoggedModel) and the LoggedModel's id."""

    run_id: str | None
    name: str | None = None
    version: str | None = None
    model_id: str | None = None


def model_source(model_uri: str, tracking_uri: str) -> ModelSource:
    """``runs:/<run>/<name>``, ``models:/name@alias``, ``models:/name/version`` or a
    LoggedModel ``models:/m-<id>``."""
    client = MlflowClient(tracking_uri)
    if model_uri.startswith("runs:/"):
        run_id, _, name = model_uri.removeprefix("runs:/").partition("/")
        return ModelSource(run_id, model_id=_run_model_id(client, run_id, name.strip("/")))
    path = model_uri.removeprefix("models:/").strip("/")
    if "@" in path or "/" in path:
        if "@" in path:
            name, alias = path.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = path.split("/", 1)
            version = client.get_model_version(name, number)
        return ModelSource(version.run_id, name, str(version.version), _version_model_id(version))
    logged = client.get_logged_model(path)
    return ModelSource(logged.source_run_id, model_id=logged.model_id)


def pinned_model_uri(model_uri: str, tracking_uri: str) -> str:
    """``models:/name@alias`` and ``models:/name/latest`` as ``models:/name/<version>`` they
    name now; other URIs as they are. An evaluation reads its model several times (each
    decoding actor, then the run's tags): a promotion moving the alias in between must not
    make it decode one version and record another."""
    if not model_uri.startswith("models:/"):
        return model_uri
    path = model_uri.removeprefix("models:/").strip("/")
    client = MlflowClient(tracking_uri)
    if "@" in path:
        name, alias = path.split("@", 1)
        return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
    name, _, number = path.partition("/")
    if number.lower() == "latest":
        versions = client.search_model_versions(f"name = '{_quoted(name)}'")
        if not versions:
            raise ValueError(f"{model_uri}: {name} has no versions")
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    return model_uri


def _version_model_id(version: Any) -> str | None:
    """The LoggedModel behind a registered version. The SQL registry leaves
    ``ModelVersion.model_id`` empty and keeps the LoggedModel's URI as the source."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    if source.startswith("models:/m-"):
        return source.removeprefix("models:/").split("/", 1)[0]
    return None


def _run_model_id(client: MlflowClient, run_id: str, name: str) -> str | None:
    """The LoggedModel a run logged under ``name`` (MLflow 3 keeps it as a run output)."""
    outputs = client.get_run(run_id).outputs
    for output in (outputs.model_outputs if outputs else []):
        if client.get_logged_model(output.model_id).name == name:
            return output.model_id
    return None


def data_digest(data_root: str) -> str | None:
    """The data root's digest (csmn.data.layout), None for a root without a manifest."""
    try:
        return layout.data_digest(data_root)
    except FileNotFoundError:
        return None


def evaluation_metrics(built: Mapping[str, Any]) -> dict[str, float]:
    """``<method>/<metric>`` for every numeric result, and the post counts."""
    values = {f"count/{k}": float(v) for k, v in built["counts"].items()}
    for method, results in built["results"].items():
        for key, value in results.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{method}/{key}"] = float(value)
    return values


@dataclass(frozen=True)
class EvaluationRun:
    """An open evaluation run: where it is and what it evaluates."""

    tracking_uri: str
    run_id: str
    source: ModelSource
    data_root: str
    data_digest: str | None


@contextlib.contextmanager
def evaluation_run(tracking_uri: str, *, model_uri: str, task: str, split: str,
                   data_root: str, out: str, decoding: str,
                   features_layer: str | None = None) -> Iterator[EvaluationRun]:
    """Create the evaluation run (see the module docstring) with its tags and inputs; it
    ends FINISHED with the block, FAILED on any exception. ``features_layer``: the image
    features the model read, whose identity is tagged (:func:`find_evaluation` checks it)."""
    client = MlflowClient(tracking_uri)
    source = model_source(model_uri, tracking_uri)
    if source.run_id:
        experiment_id = client.get_run(source.run_id).info.experiment_id
    else:
        experiment_id = get_or_create_experiment(tracking_uri, f"csmn-{task}")
    digest = data_digest(data_root)
    tags = {"csmn.kind": EVALUATION_KIND, "csmn.model_uri": model_uri, "csmn.task": task,
            "csmn.split": split, "csmn.data": data_root, "csmn.report": out,
            "csmn.decoding": decoding}
    optional = {"csmn.model_run_id": source.run_id, "csmn.model_name": source.name,
                "csmn.model_version": source.version, "csmn.model_id": source.model_id,
                "csmn.data_digest": digest, "csmn.features_layer": features_layer,
                "csmn.features_digest": (layout.features_digest(data_root, features_layer)
                                         if features_layer else None)}
    tags.update({k: v for k, v in optional.items() if v})
    run_id = client.create_run(experiment_id, run_name=f"evaluate-{task}-{split}",
                               tags=redact_tags(tags)).info.run_id
    with finished_or_failed(tracking_uri, run_id):
        datasets = [_dataset_input(data_root, digest)] if digest else None
        models = [LoggedModelInput(source.model_id)] if source.model_id else None
        if datasets or models:
            client.log_inputs(run_id, datasets=datasets, models=models)
        yield EvaluationRun(tracking_uri, run_id, source, data_root, digest)


def _dataset(data_root: str, digest: str) -> MetaDataset:
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path matches both.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(data_root)
    return MetaDataset(source, name=_dataset_name(data_root), digest=digest)


def _dataset_name(data_root: str) -> str:
    return os.path.basename(data_root.rstrip("/")) or data_root


def _dataset_input(data_root: str, digest: str) -> DatasetInput:
    return DatasetInput(dataset=_dataset(data_root, digest)._to_mlflow_entity(),
                        tags=[InputTag(MLFLOW_DATASET_CONTEXT, DATASET_CONTEXT)])


def log_evaluation(run: EvaluationRun, built: Mapping[str, Any]) -> None:
    """The report's metrics (linked to the LoggedModel and the dataset) and its files."""
    dataset = (_dataset_name(run.data_root), run.data_digest) if run.data_digest else None
    log_metrics(run.tracking_uri, run.run_id, evaluation_metrics(built), step=0,
                model_id=run.source.model_id, dataset=dataset)
    with tempfile.TemporaryDirectory(prefix="csmn-eval-report-") as directory:
        for name in REPORT_FILES:
            uri = storage.join(built["out"], name)
            if storage.exists(uri):
                with open(os.path.join(directory, name), "wb") as handle:
                    handle.write(storage.read_bytes(uri))
        MlflowClient(run.tracking_uri).log_artifacts(run.run_id, directory,
                                                     artifact_path="report")


@dataclass(frozen=True)
class EvaluationRecord:
    """A finished evaluation run found by :func:`find_evaluation`."""

    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]


def find_evaluation(tracking_uri: str, name: str, version: str | int, split: str,
                    data_digest: str, decoding: str,
                    data_root: str | None = None) -> EvaluationRecord | None:
    """The latest FINISHED evaluation of registered model ``name`` version ``version`` on
    ``split`` of the data root whose digest is ``data_digest``, decoded by the rules
    ``decoding`` (EvaluateConfig.decoding), or None. Searched in the experiment of the
    version's training run first, then in every experiment. With ``data_root``, only one
    whose image features are still those of the root (features extracted again, with other
    weights, leave the manifest's digest as it was) and that says which they were."""
    client = MlflowClient(tracking_uri)
    conditions = {"csmn.kind": EVALUATION_KIND, "csmn.model_name": name,
                  "csmn.model_version": str(version), "csmn.split": split,
                  "csmn.data_digest": data_digest, "csmn.decoding": decoding}
    filter_string = " and ".join(
        [f"tags.`{key}` = '{_quoted(value)}'" for key, value in conditions.items()]
        + ["attributes.status = 'FINISHED'"])
    trained_in = client.get_run(client.get_model_version(name, str(version)).run_id)
    for experiment_ids in ([trained_in.info.experiment_id],
                           [e.experiment_id for e in client.search_experiments()]):
        found = client.search_runs(experiment_ids, filter_string=filter_string,
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run = found[0]
            tags = dict(run.data.tags)
            layer = tags.get("csmn.features_layer")
            if data_root is not None and (not layer or tags.get("csmn.features_digest")
                                          != layout.features_digest(data_root, layer)):
                return None
            return EvaluationRecord(run.info.run_id, dict(run.data.metrics), tags)
    return None


def _quoted(value: str) -> str:
    return str(value).replace("'", "\\'")


def log_ablation(tracking_uri: str, experiment: str, *, task: str, data_root: str,
                 params: Mapping[str, Any], method_runs: Mapping[str, str],
                 metrics: Mapping[str, float], files: Mapping[str, str]) -> str:
    """One run ``ablation-<task>`` in ``experiment``: the table as ``metrics``, ``files``
    (name -> text) as artifacts, each variant's training run id as a tag
    ``csmn.run.<method>.<split family>`` (``method_runs``). Returns its run id."""
    experiment_id = get_or_create_experiment(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    tags = {"csmn.kind": "ablation", "csmn.task": task, "csmn.data": data_root,
            **{f"csmn.run.{key}": run_id for key, run_id in method_runs.items()}}
    run_id = client.create_run(experiment_id, run_name=f"ablation-{task}",
                               tags=redact_tags(tags)).info.run_id
    with finished_or_failed(tracking_uri, run_id):
        flat = list(flatten_params(params).items())
        for start in range(0, len(flat), 100):  # log_batch takes at most 100 params
            client.log_batch(run_id, params=[Param(k, v) for k, v in flat[start:start + 100]])
        log_metrics(tracking_uri, run_id, metrics, step=0)
        with tempfile.TemporaryDirectory(prefix="csmn-ablation-") as directory:
            for name, text in files.items():
                with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
                    handle.write(text)
            client.log_artifacts(run_id, directory)
    return run_id
