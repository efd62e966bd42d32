"""The served model: an MLflow pyfunc that wraps a CSMN checkpoint folder (network,
vocabulary, config). ``mlflow.pyfunc.load_model(uri).predict(df)`` takes ``image_feature``
(list of floats: 2048 for pool5, 49 x 2048 slot-major for res5c) and ``context_words`` (list
of strings) and answers ``prediction``: hashtags as a list of strings, or a post text as one
string.

Loading the model needs torch, mlflow and this package, never Ray.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, Schema

from csmn.tracking.registry import registered_model_name

MODEL_NAME = "model"  # the LoggedModel's name inside the run
CHECKPOINT_ARTIFACT = "checkpoint"


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
