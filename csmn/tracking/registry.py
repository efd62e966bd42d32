"""The MLflow Model Registry: the registered model of each task, and version tags."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow.tracking import MlflowClient

from csmn.data.layout import REGISTERED_MODEL_NAMES, canonical_task


def registered_model_name(task: str) -> str:
    return REGISTERED_MODEL_NAMES[canonical_task(task)]


def tag_model_version(tracking_uri: str, name: str, version: str,
                      tags: Mapping[str, Any]) -> None:
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
