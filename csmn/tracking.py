"""MLflow for training runs: where the store is, the run's params, and the served model.

The store is ``MLFLOW_TRACKING_URI`` when set, else a SQLite file in a local data root
(``sqlite:///<root>/mlflow.db``, MLflow's own default backend). The model is an MLflow pyfunc
that wraps a CSMN checkpoint folder (network, vocabulary, config):
``mlflow.pyfunc.load_model(uri).predict(df)`` takes ``image_feature`` (list of floats: 2048
for pool5, 49 x 2048 slot-major for res5c) and ``context_words`` (list of strings) and answers
``prediction``: hashtags as a list of strings, or a post text as one string.

Loading the model needs torch, mlflow and this package, never Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, Schema

from csmn.data import storage
from csmn.data.layout import REGISTERED_MODEL_NAMES, canonical_task

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the LoggedModel's name inside the run
CHECKPOINT_ARTIFACT = "checkpoint"
# Config keys that could carry a secret never become params (credentials live in the
# environment, but a URI may embed a user:password or a signed query string).
_SECRET_MARKERS = ("password", "secret", "token", "credential", "access_key")


def resolve_tracking_uri(data_root: str | None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<data root>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if data_root is None or storage.is_s3(data_root):
        raise ValueError(
            "set MLFLOW_TRACKING_URI (an MLflow server or database): the default SQLite store "
            f"needs a local data root, got {data_root!r}")
    _, path = storage.resolve(data_root)
    os.makedirs(path, exist_ok=True)
    return f"sqlite:///{os.path.join(path, 'mlflow.db')}"


def registered_model_name(task: str) -> str:
    return REGISTERED_MODEL_NAMES[canonical_task(task)]


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts -> flat MLflow params (``model.embed_dim``), secrets left out."""
    params: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            continue
        if isinstance(value, Mapping):
            params.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            params[name] = text[:6000]  # MLflow's param value limit
    return params


def start_or_resume_run(
    tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
) -> str:
    """The id of the unfinished run called ``run_name`` in ``experiment`` (a training run
    started again under the same name continues its MLflow run too), or of a new one."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    client = MlflowClient(tracking_uri)
    quoted = run_name.replace("'", "\\'")
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.runName = '{quoted}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if existing and existing[0].info.status != "FINISHED":
        run_id = existing[0].info.run_id
        log.info("continuing MLflow run %s (%s)", run_name, run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    if existing:
        raise ValueError(f"MLflow run {run_name!r} in experiment {experiment!r} is already "
                         "FINISHED: choose another --run-name")
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    return run.info.run_id


# Settings that may change when a run is resumed: how hard to retry, how long to train,
# whether to register. A change is recorded as a tag; any other change is refused.
RESUMABLE_PARAMS = frozenset({"train.max_failures", "train.epochs", "train.register"})


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, str]) -> None:
    """Log params once: a resumed run already has them (MLflow refuses changed values)."""
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run_id).data.params
    changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    refused = {k: change for k, change in changed.items() if k not in RESUMABLE_PARAMS}
    if refused:
        raise ValueError(f"resuming run {run_id} with a different config: {refused}")
    for key, (old, new) in changed.items():
        client.set_tag(run_id, f"csmn.resumed_with.{key}", f"{old} -> {new}")
    new_params = {k: v for k, v in params.items() if k not in logged}
    items = list(new_params.items())
    for start in range(0, len(items), 100):  # log_batch takes at most 100 params
        batch = [mlflow.entities.Param(k, v) for k, v in items[start:start + 100]]
        client.log_batch(run_id, params=batch)


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Finite values only, in batches (one request per 1,000 metrics, MLflow's limit)."""
    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    now = int(time.time() * 1000)
    entries = [mlflow.entities.Metric(k, v, now, step) for k, v in finite.items()]
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


def model_signature(task: str) -> ModelSignature:
    inputs = Schema([
        ColSpec(Array(DataType.double), "image_feature"),
        ColSpec(Array(DataType.string), "context_words"),
    ])
    prediction = (ColSpec(Array(DataType.string), "prediction") if task == "hashtag"
                  else ColSpec(DataType.string, "prediction"))
    return ModelSignature(inputs=inputs, outputs=Schema([prediction]))


class CSMNPyfunc(mlflow.pyfunc.PythonModel):
    """The network, its vocabulary and config, answering a DataFrame of posts."""

    batch_size = 256

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from csmn.core.checkpoint import load_checkpoint

        loaded = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model = loaded.model
        self.config = loaded.model_config
        self.vocab = loaded.vocab
        self.task = loaded.task
        self.word_ids = {word: i for i, word in enumerate(self.vocab)}

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        missing = {"image_feature", "context_words"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input DataFrame lacks column(s) {sorted(missing)}")
        predictions: list[Any] = []
        for start in range(0, len(model_input), self.batch_size):
            chunk = model_input.iloc[start:start + self.batch_size]
            predictions.extend(self._predict_chunk(chunk))
        return pd.DataFrame({"prediction": predictions}, index=model_input.index)

    def _predict_chunk(self, chunk: pd.DataFrame) -> list[Any]:
        import torch

        from csmn.core.decoding import greedy_decode
        from csmn.core.tokens import SPECIAL_TOKENS

        features = self._features(chunk["image_feature"])
        context = np.zeros((len(chunk), self.config.context_size), dtype=np.int64)
        for row, words in enumerate(chunk["context_words"]):
            # Out-of-vocabulary context words carry nothing the model learned: left out.
            ids = [self.word_ids[w] for w in _as_list(words) if w in self.word_ids]
            ids = [i for i in ids if i >= len(SPECIAL_TOKENS)][: self.config.context_size]
            context[row, : len(ids)] = ids
        result = greedy_decode(self.model, torch.from_numpy(features), torch.from_numpy(context),
                               dedupe_tokens=self.task == "hashtag")
        out: list[Any] = []
        for ids in result.token_ids:
            words = [self.vocab[i] for i in ids if i >= len(SPECIAL_TOKENS)]
            out.append(words if self.task == "hashtag" else " ".join(words))
        return out

    def _features(self, column: pd.Series) -> np.ndarray:
        expected = self.config.image_slots * self.config.image_feature_dim
        rows = [np.asarray(v, dtype=np.float32).reshape(-1) for v in column]
        bad = [i for i, r in enumerate(rows) if r.size != expected]
        if bad:
            raise ValueError(f"image_feature must hold {expected} floats for "
                             f"{self.config.image_layer}; rows {bad[:5]} do not")
        features = np.stack(rows)
        if self.config.image_slots > 1:
            features = features.reshape(len(rows), self.config.image_slots, -1)
        return features


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def log_pyfunc_model(
    tracking_uri: str,
    run_id: str,
    checkpoint_dir: str,
    task: str,
    register: bool = False,
    input_example: pd.DataFrame | None = None,
) -> Any:
    """Log the checkpoint as the run's pyfunc model (``name="model"``); with ``register``,
    as a new version of ``csmn-hashtag`` / ``csmn-post``. Returns MLflow's ModelInfo."""
    import csmn

    mlflow.set_tracking_uri(tracking_uri)
    package_dir = os.path.dirname(os.path.abspath(csmn.__file__))
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=CSMNPyfunc(),
            artifacts={CHECKPOINT_ARTIFACT: checkpoint_dir},
            # The package travels with the model, so loading needs no install of csmn.
            code_paths=[package_dir],
            signature=model_signature(task),
            input_example=input_example,
            registered_model_name=registered_model_name(task) if register else None,
            pip_requirements=_pip_requirements(),
        )


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "mlflow", "numpy", "pandas",
                                                     "pyarrow", "pyyaml")]


def tag_model_version(tracking_uri: str, name: str, version: str,
                      tags: Mapping[str, Any]) -> None:
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
