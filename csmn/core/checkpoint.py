"""A CSMN checkpoint: one folder (local or ``s3://``) that rebuilds the model without Ray.

Layout (format version 1)::

    csmn.json        {"format": "csmn-checkpoint", "version": 1, "task", "epoch",
                      "model_config": {...}, "train_config": {...}, "metrics": {...},
                      "vocab": [tokens in id order], "inputs": {...}}
    model.pt         the network's state_dict (tensors only)
    train_state.pt   optional: optimizer state, for resuming training

Tensors go through ``torch.save`` and come back with ``torch.load(weights_only=True)``, which
refuses to run pickled code; everything else is JSON, readable without torch.

``inputs`` is how the training data was made, for whoever feeds the model new posts (the
nightly job): ``context`` (D and the IDF's document frequencies, a
:class:`csmn.text.user_context.ContextSpec`), ``features`` (the ResNet weights and image
preprocessing of the features it learned from) and ``text`` (the per-post filter
thresholds). Absent (``{}``) in checkpoints of older data roots.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from csmn.core.model import CSMN, ModelConfig
from csmn.data import storage
from csmn.data.layout import canonical_task

FORMAT = "csmn-checkpoint"
VERSION = 1
METADATA_FILE = "csmn.json"
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"


@dataclass
class LoadedCheckpoint:
    model: CSMN
    model_config: ModelConfig
    vocab: list[str]
    task: str
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(uri: str, device: str | torch.device) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location=device,
                      weights_only=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def save_checkpoint(
    directory: str,
    model: nn.Module,
    model_config: ModelConfig,
    vocab: list[str],
    task: str,
    *,
    epoch: int | None = None,
    metrics: dict[str, float] | None = None,
    train_config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint folder at ``directory`` (a local path or a URI)."""
    if len(vocab) != model_config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} tokens, the model {model_config.vocab_size}")
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    storage.write_bytes(storage.join(directory, MODEL_FILE), _torch_bytes(state))
    if optimizer is not None:
        storage.write_bytes(storage.join(directory, TRAIN_STATE_FILE),
                            _torch_bytes({"optimizer": optimizer.state_dict()}))
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "task": canonical_task(task),
        "epoch": epoch,
        "model_config": dataclasses.asdict(model_config),
        "train_config": train_config or {},
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "vocab": list(vocab),
        "inputs": inputs or {},
    }
    # Written last: a folder with csmn.json is complete.
    storage.write_text(storage.join(directory, METADATA_FILE),
                       json.dumps(metadata, indent=1, default=str) + "\n")


def read_metadata(directory: str) -> dict[str, Any]:
    uri = storage.join(directory, METADATA_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{directory} is not a CSMN checkpoint: no {METADATA_FILE}")
    metadata = storage.read_json(uri)
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(f"{uri}: unsupported checkpoint format {metadata.get('format')!r} "
                         f"version {metadata.get('version')!r} (expected {FORMAT} {VERSION})")
    return metadata


def load_checkpoint(
    directory: str, device: str | torch.device = "cpu", with_train_state: bool = False,
) -> LoadedCheckpoint:
    """Rebuild the model (in eval mode, on ``device``) and everything saved beside it."""
    metadata = read_metadata(directory)
    model_config = ModelConfig(**metadata["model_config"])
    model = CSMN(model_config)
    model.load_state_dict(_torch_load(storage.join(directory, MODEL_FILE), device))
    model.to(device).eval()
    train_state = None
    train_state_uri = storage.join(directory, TRAIN_STATE_FILE)
    if with_train_state and storage.exists(train_state_uri):
        train_state = _torch_load(train_state_uri, device)
    return LoadedCheckpoint(
        model=model,
        model_config=model_config,
        vocab=list(metadata["vocab"]),
        task=canonical_task(metadata["task"]),
        epoch=metadata.get("epoch"),
        metrics=dict(metadata.get("metrics") or {}),
        train_config=dict(metadata.get("train_config") or {}),
        train_state=train_state,
        inputs=dict(metadata.get("inputs") or {}),
    )
