"""MLflow runs: where the store is, params, metrics, and runs that always end.

The store is ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in a local data root
(``sqlite:///<root>/mlflow.db``, MLflow's own default backend). Experiments this project
creates in a local SQLite store keep their artifacts beside the database, in
``<root>/mlartifacts/`` (:func:`get_or_create_experiment`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from csmn.config import is_secret_key, redact, redact_text
from csmn.data import storage

log = logging.getLogger(__name__)


def resolve_tracking_uri(data_root: str | None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<data root>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return quiet_run_urls(uri)
    if data_root is None or storage.is_s3(data_root):
        raise ValueError(
            "set MLFLOW_TRACKING_URI (an MLflow server or database): the default SQLite store "
            f"needs a local data root, got {data_root!r}")
    _, path = storage.resolve(data_root)
    os.makedirs(path, exist_ok=True)
    return f"sqlite:///{os.path.join(path, 'mlflow.db')}"


def local_artifact_location(tracking_uri: str) -> str | None:
    """``file://<folder of the database>/mlartifacts`` for a SQLite store; None (the
    server's or the store's own choice) for any other."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = os.path.abspath(tracking_uri[len(prefix):])
    return Path(os.path.dirname(database), "mlartifacts").as_uri()


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created when missing. MLflow puts a new experiment's
    artifacts in ``./mlruns`` of the creating process's working directory: for a Ray job,
    the job's copy of the code, which goes with the job, and in any case a folder outside
    the roots a job was given. So in a SQLite store they go beside the database."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=local_artifact_location(tracking_uri))
    except MlflowException:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def quiet_run_urls(uri: str) -> str:
    """``uri``; MLflow prints each run's URL on stdout when the run ends, and with the
    credentials of a tracking URI (``https://user:pw@host``) that line would carry them into
    every job log: such a URI turns the printing off."""
    if redact_text(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return uri


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts -> flat MLflow params (``model.embed_dim``). Secret-named keys are
    left out; every other value is redacted (a URI may embed ``user:password@`` or a signed
    query string, credentials live in the environment: :func:`csmn.config.redact_text`)."""
    params: dict[str, str] = {}
    for key, value in values.items():
        if is_secret_key(key):
            continue
        name = redact_text(f"{prefix}{key}")
        if isinstance(value, Mapping):
            params.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            params[name] = redact_text(text)[:6000]  # MLflow's param value limit
    return params


def redact_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow stores them (strings), redacted like params."""
    return {str(k): str(v) for k, v in redact(dict(tags or {})).items()}


def start_or_resume_run(
    tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """The id of the unfinished run called ``run_name`` in ``experiment`` (a training run
    started again under the same name continues its MLflow run too), or of a new one.
    ``params``: the config the run will log; an unfinished run logged with another one is
    refused before it is touched (it keeps its status, FAILED or KILLED)."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = get_or_create_experiment(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    quoted = run_name.replace("'", "\\'")
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.runName = '{quoted}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if existing and existing[0].info.status != "FINISHED":
        run_id = existing[0].info.run_id
        if params is not None:
            _changed_params(client, run_id, params)
        log.info("continuing MLflow run %s (%s)", run_name, run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    if existing:
        raise ValueError(f"MLflow run {run_name!r} in experiment {experiment!r} is already "
                         "FINISHED: choose another --run-name")
    run = client.create_run(experiment_id, run_name=run_name, tags=redact_tags(tags))
    return run.info.run_id


# Settings that may change when a run is resumed: how hard to retry, how long to train,
# whether to register, whether the train split is held in the object store or streamed (a
# resumed run may land on a cluster of another size). A change is recorded as a tag; any
# other change is refused.
RESUMABLE_PARAMS = frozenset({"train.max_failures", "train.epochs", "train.register",
                              "train.materialize", "data.materialize"})


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, str]) -> None:
    """Log params once: a resumed run already has them (MLflow refuses changed values).
    Values are redacted here too, whoever built them."""
    client = MlflowClient(tracking_uri)
    params, logged, changed = _changed_params(client, run_id, params)
    for key, (old, new) in changed.items():
        client.set_tag(run_id, f"csmn.resumed_with.{key}", f"{old} -> {new}")
    new_params = {k: v for k, v in params.items() if k not in logged}
    items = list(new_params.items())
    for start in range(0, len(items), 100):  # log_batch takes at most 100 params
        batch = [mlflow.entities.Param(k, v) for k, v in items[start:start + 100]]
        client.log_batch(run_id, params=batch)


def _changed_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]
                    ) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[str, str]]]:
    """(the params as logged: redacted strings, those the run has, the changed ones); a
    change outside :data:`RESUMABLE_PARAMS` is refused."""
    params = {redact_text(str(k)): redact_text(str(v)) for k, v in params.items()
              if not is_secret_key(k)}
    logged = client.get_run(run_id).data.params
    changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    refused = {k: change for k, change in changed.items() if k not in RESUMABLE_PARAMS}
    if refused:
        raise ValueError(f"resuming run {run_id} with a different config: {refused}")
    return params, logged, changed


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int, *,
                model_id: str | None = None, dataset: tuple[str, str] | None = None) -> None:
    """Finite values only, in batches (one request per 1,000 metrics, MLflow's limit).
    ``model_id``: the metrics are the LoggedModel's too (MLflow 3); ``dataset``: (name,
    digest) of the data they were measured on."""
    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    now = int(time.time() * 1000)
    name, digest = dataset or (None, None)
    entries = [mlflow.entities.Metric(k, v, now, step, model_id=model_id, dataset_name=name,
                                      dataset_digest=digest) for k, v in finite.items()]
    client = MlflowClient(tracking_uri)
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start:start + 1000])


@contextlib.contextmanager
def finished_or_failed(tracking_uri: str, run_id: str) -> Iterator[MlflowClient]:
    """The run ends FINISHED when the block does, FAILED on any exception (Ctrl-C too), so
    no run is left RUNNING by a job that died."""
    client = MlflowClient(tracking_uri)
    try:
        yield client
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def metric_histories(tracking_uri: str, run_id: str,
                     keys: Sequence[str]) -> dict[str, Any]:
    """A run's experiment id, name and, per metric key, its ``[[step, value], ...]`` in step
    order (the last value of a step logged twice): what a report draws curves from."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    histories = {}
    for key in keys:
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key),
                                                   key=lambda m: (m.step, m.timestamp))}
        if by_step:
            histories[key] = [[step, by_step[step]] for step in sorted(by_step)]
    return {"experiment_id": run.info.experiment_id, "run_name": run.info.run_name,
            "status": run.info.status, "metrics": histories}
