"""The served model: an MLflow pyfunc that wraps a CSMN checkpoint folder (network,
vocabulary, config). ``mlflow.pyfunc.load_model(uri).predict(df)`` takes ``image_feature``
(list of floats: 2048 for pool5, 49 x 2048 slot-major for res5c) and ``context_words`` (list
of strings) and answers ``prediction``: hashtags as a list of strings, or a post text as one
string.

Loading the model needs torch, mlflow and this package, never Ray. The model is logged as
code (MLflow 3's models-from-code: ``csmn/tracking/served_model.py`` calls
``mlflow.models.set_model``), not as a pickled object: loading it unpickles nothing, and
keeps working where MLflow refuses pickles (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``).
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, Schema

from csmn.tracking.registry import registered_model_name
from csmn.tracking.runs import quiet_run_urls

MODEL_NAME = "model"  # the LoggedModel's name inside the run
CHECKPOINT_ARTIFACT = "checkpoint"
# The file MLflow runs to build the model at load time.
MODEL_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "served_model.py")


def model_signature(task: str) -> ModelSignature:
    inputs = Schema([
        ColSpec(Array(DataType.double), "image_feature"),
        # Optional: a user with no history has no context (every slot masked), as the
        # Predictor and the nightly job take it.
        ColSpec(Array(DataType.string), "context_words", required=False),
    ])
    prediction = (ColSpec(Array(DataType.string), "prediction") if task == "hashtag"
                  else ColSpec(DataType.string, "prediction"))
    return ModelSignature(inputs=inputs, outputs=Schema([prediction]))


class CSMNPyfunc(mlflow.pyfunc.PythonModel):
    """The network, its vocabulary and config, answering a DataFrame of posts through
    csmn.core.predictor (the same words for the same inputs as the evaluation job)."""

    batch_size = 256

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from csmn.core.predictor import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT],
                                                   batch_size=self.batch_size)
        self.task = self.predictor.task

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        missing = {"image_feature", "context_words"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input DataFrame lacks column(s) {sorted(missing)}")
        words = self.predictor.predict(list(model_input["image_feature"]),
                                       [_as_words(v) for v in model_input["context_words"]]).words
        predictions = words if self.task == "hashtag" else [" ".join(w) for w in words]
        return pd.DataFrame({"prediction": predictions}, index=model_input.index)


def _as_words(value: Any) -> list[str] | str | None:
    """A DataFrame cell as the predictor takes it: None, a space-joined string, or words
    (pandas hands arrays of strings, or NaN for a missing cell)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value != value:
        return None
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

    mlflow.set_tracking_uri(quiet_run_urls(tracking_uri))
    package_dir = os.path.dirname(os.path.abspath(csmn.__file__))
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=MODEL_CODE,
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
