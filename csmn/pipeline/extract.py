"""The feature extraction job: every image of the examples -> ResNet-101 pool5 / res5c features.

A Ray Data pipeline (the preprocessing lives in ``csmn.core.image_decode``, the model in
``csmn.core.image_features``; neither has Ray in it)::

    examples/*/*/part-*.parquet (column image) --read_parquet--> unique image URIs on the driver
      minus images that already have features (finished parts) or were rejected before
      --from_arrow--> map_batches(decode + resize + crop, CPU tasks)          uint8 crops
      --> map_batches(ResNet-101 actor, ActorPoolStrategy, 1 GPU each if any)   float32 features
      --> map_batches(write one Parquet part per layer + a rejects part, CPU tasks)
      --> per-image outcomes back to the driver for the summary

On GPUs (``--decode auto``; ``--decode actor`` anywhere) the first two maps are instead::

      map_batches(read the bytes, check the size limits, CPU tasks)           encoded bytes
      --> map_batches(actor: JPEGs decoded, resized and cropped on its GPU (nvJPEG), other
                      formats and what nvJPEG refuses by PIL on its CPU; then ResNet-101)

Output, for each layer in {pool5, res5c}:
``<root>/features/<layer>/part-<run>-<first input position>-<hash>.parquet``
(schema ``features_<layer>``: image, feature) and ``<root>/features/<layer>/_meta.json``
(weights, preprocessing, slots, the last run's counts; ``random_weights: true`` and a warning
when the weights were random). Bad images go to ``<root>/rejects/extract_features/``.

Reruns: parts are written atomically (see ``csmn.data.storage``), so a killed run leaves only whole
parts; a rerun reads the image keys of the finished parts and computes only what is missing.
Images rejected by an earlier run are not retried; with ``--retry-rejects`` those the store
could not serve (``transient_io``, after every retry) are, and their reject rows dropped
(``--overwrite`` recomputes everything). Every image is accounted for: unique images =
already done + previously rejected + written now + rejected now.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from csmn.config import add_config_arguments, config_from_args, config_to_dict
from csmn.core.image_decode import (
    DECODE_HELP,
    ImageRejected,
    PreprocessConfig,
    check_decode,
    check_precision,
    decode_image_or_reason,
    decodes_in_actor,
    read_image_bytes,
)
from csmn.data import layout, storage
from csmn.data.completeness import require_data_root
from csmn.data.layout import FEATURE_DIM, LAYERS
from csmn.data.schemas import conform, load_schema, validate

if TYPE_CHECKING:
    from csmn.core.image_features import DeviceDecoded, WeightsInfo

# torch and the network (csmn.core.image_features) are imported where the model runs, never
# at the top: the CPU decode tasks unpickle this module's functions, and each of their worker
# processes would otherwise spend about 3 s importing torch and torchvision.

log = logging.getLogger(__name__)

STAGE = "extract_features"
OK = "ok"


@dataclass
class ExtractConfig:
    """Feature extraction settings; defaults follow the paper (ResNet-101, 256 -> 224 crop)."""

    data: str = field(default="", metadata={"help": "data root (local or s3://) with examples/"})
    layer: str = field(default="pool5", metadata={"help": "pool5 | res5c | both"})
    weights: str = field(
        default="imagenet",
        metadata={
            "help": "imagenet (torchvision IMAGENET1K_V1) | imagenet-v2 | PATH | URI of a "
            "resnet101 state_dict | random (tests only)"
        },
    )
    seed: int = field(default=0, metadata={"help": "init seed of random weights"})
    batch_size: int = field(default=64, metadata={"help": "images per model forward pass"})
    actors: int = field(
        default=0, metadata={"help": "model actors; 0 = one per GPU, or 1 without GPUs"}
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto (GPU actors when the cluster has GPUs now, else CPU) | cuda "
                          "(wait up to --gpu-wait-s for GPUs to join, then fail) | cpu"},
    )
    gpu_wait_s: float = field(
        default=300.0,
        metadata={"help": "with --device cuda: seconds to wait for the GPUs the actors need "
                          "(--actors, at least 1) to join an autoscaling cluster"},
    )
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16/fp16 autocast on GPU, fp32 on CPU) | "
                                          "fp32 | bf16 | fp16"}
    )
    torch_threads: int = field(
        default=0, metadata={"help": "intra-op threads of a CPU actor; 0 = the node's cores"}
    )
    actor_memory_gb: float = field(
        default=2.0, metadata={"help": "memory reserved per model actor (weights, activations)"}
    )
    decode_batch_size: int = field(default=32, metadata={"help": "images per decode batch"})
    decode: str = field(default="auto", metadata={"help": DECODE_HELP})
    decode_cpus: float = field(default=1.0, metadata={"help": "CPUs per decode (or read) task"})
    io_threads: int = field(default=8, metadata={"help": "concurrent image reads per task"})
    rows_per_part: int = field(default=256, metadata={"help": "images per output part"})
    resize_size: int = field(default=0, metadata={"help": "short side; 0 = the weights' (256)"})
    crop_size: int = field(default=0, metadata={"help": "center crop; 0 = the weights' (224)"})
    max_pixels: int = field(
        default=PreprocessConfig.max_pixels, metadata={"help": "reject larger images"}
    )
    max_bytes: int = field(
        default=PreprocessConfig.max_bytes, metadata={"help": "reject larger files"}
    )
    exif_transpose: bool = True
    jpeg_draft: bool = field(
        default=False, metadata={"help": "decode large JPEGs at reduced scale (faster)"}
    )
    retry_rejects: bool = field(
        default=False, metadata={"help": "retry the images an earlier run rejected for a "
                                         "transient storage error (transient_io)"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "delete existing features of the layer(s) and the "
                                         "earlier rejects first: recompute everything"}
    )

    def __post_init__(self) -> None:
        if self.layer not in (*LAYERS, "both"):
            raise ValueError(f"layer must be pool5, res5c or both, got {self.layer!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        check_decode(self.decode)
        # Before --overwrite deletes anything: a typo must not cost the features.
        check_precision(self.precision)
        if self.gpu_wait_s < 0:
            raise ValueError("gpu_wait_s must be >= 0")
        for name in ("batch_size", "decode_batch_size", "rows_per_part", "io_threads",
                     "max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("actors", "torch_threads", "resize_size", "crop_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("decode_cpus", "actor_memory_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def layers(self) -> tuple[str, ...]:
        return LAYERS if self.layer == "both" else (self.layer,)

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.for_weights(
            self.weights,
            resize_size=self.resize_size,
            crop_size=self.crop_size,
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
            exif_transpose=self.exif_transpose,
            jpeg_draft=self.jpeg_draft,
        )


# ---------------------------------------------------------------------------------------------
# Layout helpers (no Ray)
# ---------------------------------------------------------------------------------------------


def feature_schema(layer: str, slots: int = 49) -> pa.Schema:
    """The Parquet schema of a layer's parts. The contract's res5c is 49 slots (224 crop); a
    smaller crop (tests) stores ``slots x 2048`` floats under the same column names."""
    schema = load_schema(f"features_{layer}")
    if layer == "res5c" and slots != 49:
        index = schema.get_field_index("feature")
        feature = schema.field(index)
        schema = schema.set(
            index, feature.with_type(pa.list_(pa.float32(), slots * FEATURE_DIM))
        )
    return schema


def _features_table(layer: str, images: list[str], values: np.ndarray, slots: int) -> pa.Table:
    schema = feature_schema(layer, slots)
    width = schema.field("feature").type.list_size
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.shape != (len(images), width):
        raise ValueError(f"{layer}: features of shape {values.shape}, expected {width} per row")
    feature = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
    table = pa.Table.from_arrays([pa.array(images, pa.string()), feature], schema=schema)
    if slots == 49 or layer == "pool5":
        return conform(table, f"features_{layer}")
    return table


def read_features(root: str, layer: str) -> tuple[list[str], np.ndarray]:
    """All features of a layer: image keys and a float32 array ``[N, 2048]`` (pool5) or
    ``[N, slots, 2048]`` (res5c). For small data and tests; training streams the parts."""
    table = storage.read_parquet(layout.features_dir(root, layer))
    if layer == "pool5" or table.schema.field("feature").type.list_size == 49 * FEATURE_DIM:
        table = validate(table, f"features_{layer}")
    column = table.column("feature").combine_chunks()
    width = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False).reshape(len(table), width)
    if layer == "res5c":
        values = values.reshape(len(table), -1, FEATURE_DIM)
    return table.column("image").to_pylist(), values


def example_files(root: str) -> list[str]:
    """``<root>/examples/<task>/<split>/part-*.parquet``."""
    base = layout.examples_root(root)
    out = []
    for uri in storage.list_files(base, suffix=".parquet"):
        relative = uri[len(base):].strip("/").split("/")
        if len(relative) == 3 and relative[2].startswith("part-"):
            out.append(uri)
    return out


# ---------------------------------------------------------------------------------------------
# Ray Data stages. Plain functions and a class: Ray ships them to workers.
# ---------------------------------------------------------------------------------------------


def _read_all(
    images: list[str], max_bytes: int, io_threads: int
) -> list[bytes | ImageRejected]:
    """Every image's bytes, read by threads (they wait on storage), or why not."""

    def read(uri: str) -> bytes | ImageRejected:
        try:
            return read_image_bytes(uri, max_bytes)
        except ImageRejected as err:
            return err

    with ThreadPoolExecutor(max_workers=min(io_threads, max(1, len(images)))) as pool:
        return list(pool.map(read, images))


def decode_batch(
    batch: dict[str, np.ndarray], preprocess: PreprocessConfig, io_threads: int
) -> dict[str, np.ndarray]:
    """CPU stage: read (threads, since it waits on storage) then decode, resize, crop.

    A bad image gets an ``error`` (``code: detail``) and zero pixels; the batch goes on.
    """
    images = [str(uri) for uri in batch["image"]]
    crop = preprocess.crop_size
    pixels = np.zeros((len(images), crop, crop, 3), np.uint8)
    errors = [""] * len(images)
    for i, data in enumerate(_read_all(images, preprocess.max_bytes, io_threads)):
        if isinstance(data, ImageRejected):
            errors[i] = data.reason
            continue
        decoded, errors[i] = decode_image_or_reason(data, preprocess)
        if decoded is not None:
            pixels[i] = decoded
    out = {key: value for key, value in batch.items() if key != "image"}
    out.update(
        image=np.array(images, dtype=object),
        pixels=pixels,
        error=np.array(errors, dtype=object),
    )
    return out


def read_batch(
    batch: dict[str, np.ndarray], max_bytes: int, io_threads: int
) -> dict[str, np.ndarray]:
    """CPU stage when the actors decode: the encoded bytes only (size limits checked while
    reading), which are also several times smaller than the pixels of a large photo."""
    images = [str(uri) for uri in batch["image"]]
    contents = _read_all(images, max_bytes, io_threads)
    out = {key: value for key, value in batch.items() if key != "image"}
    out.update(
        image=np.array(images, dtype=object),
        data=np.array([b"" if isinstance(c, ImageRejected) else c for c in contents],
                      dtype=object),
        error=np.array([c.reason if isinstance(c, ImageRejected) else "" for c in contents],
                       dtype=object),
    )
    return out


def cpu_stage(decode_in_actor: bool, preprocess: PreprocessConfig
              ) -> tuple[Callable[..., dict[str, np.ndarray]], dict[str, Any]]:
    """(function, its arguments but ``io_threads``) of the CPU stage before the model actors:
    it reads the bytes, and decodes them too unless the actors do."""
    if decode_in_actor:
        return read_batch, {"max_bytes": preprocess.max_bytes}
    return decode_batch, {"preprocess": preprocess}


class FeatureActor:
    """Model stage: one ResNet-101 per actor (per GPU), loaded once, applied batch by batch.

    Batches come with ``pixels`` (decoded by :func:`decode_batch`) or, with
    ``decode_on_device``, with the encoded ``data`` of :func:`read_batch`, which the actor
    decodes on its device (``csmn.core.image_features.decode_images_on_device``, per
    ``preprocess``)."""

    def __init__(
        self,
        weights: str,
        seed: int,
        fingerprint: str,
        layers: tuple[str, ...],
        use_gpu: bool,
        precision: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        torch_threads: int,
        preprocess: PreprocessConfig | None = None,
        decode_on_device: bool = False,
    ) -> None:
        import torch

        from csmn.core.image_features import FeatureExtractor, load_trunk

        if decode_on_device and preprocess is None:
            raise ValueError("decoding on the device needs the preprocessing config")
        if not use_gpu and torch_threads > 0:
            # Ray sets OMP_NUM_THREADS to the actor's logical CPUs (1); on a CPU node the model
            # dominates the work, so it gets the cores while decode tasks interleave.
            torch.set_num_threads(torch_threads)
        trunk, info = load_trunk(weights, seed)
        if info.fingerprint != fingerprint:
            raise RuntimeError(
                f"weights changed since the job started: {info.fingerprint} != {fingerprint}"
            )
        self.extractor = FeatureExtractor(
            trunk, layers, "cuda" if use_gpu else "cpu", precision, mean, std, info
        )
        self.layers = layers
        self.preprocess = preprocess
        self.decode_on_device = decode_on_device

    def _decode(self, batch: dict[str, np.ndarray]) -> tuple[Any, list[str], list[str]]:
        """(planar pixels ``[N, 3, crop, crop]``, errors, where each image was decoded) of a
        batch of encoded images."""
        import torch

        from csmn.core.image_features import decode_images_on_device

        assert self.preprocess is not None
        errors = [str(e) for e in batch["error"]]
        readable = [i for i, e in enumerate(errors) if not e]
        decoded: DeviceDecoded = decode_images_on_device(
            [batch["data"][i] for i in readable], self.preprocess, self.extractor.device)
        decoder = [""] * len(errors)
        for j, i in enumerate(readable):
            errors[i] = decoded.errors[j]
            if not errors[i]:
                decoder[i] = (f"torchvision-{self.extractor.device.type}"
                              if decoded.on_device[j] else "pil")
        crop = self.preprocess.crop_size
        # planar, as decode_images_on_device makes them: the model's input is made from that
        planes = torch.zeros((len(errors), 3, crop, crop), dtype=torch.uint8,
                             device=self.extractor.device)
        if readable:
            planes[torch.as_tensor(readable, device=planes.device)] = \
                decoded.pixels.permute(0, 3, 1, 2)
        return planes, errors, decoder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode_on_device:
            planes, error_list, decoder = self._decode(batch)
            errors = np.array(error_list, dtype=object)
            slots = self.preprocess.grid**2 if self.preprocess else 1
        else:
            errors = batch["error"]
            decoder = ["" if e else "pil" for e in errors]
            slots = _slots(batch["pixels"])
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(errors)
        out = {key: value for key, value in batch.items() if key not in ("pixels", "data")}
        out["error"] = errors
        out["decoded_on"] = np.array(decoder, dtype=object)
        if not ok.any():
            computed = {}
        elif self.decode_on_device:
            # rows picked from the planar memory, then seen as NHWC: no interleaving copy
            import torch

            rows = torch.as_tensor(ok, device=planes.device)
            computed = self.extractor(planes[rows].permute(0, 2, 3, 1))
        else:
            computed = self.extractor(batch["pixels"][ok])
        for layer in self.layers:
            if layer in computed:
                values = np.zeros((n, computed[layer].shape[1]), np.float32)
                values[ok] = computed[layer]
            else:
                values = np.zeros((n, FEATURE_DIM * (1 if layer == "pool5" else slots)),
                                  np.float32)
            out[layer] = values
        return out


def _slots(pixels: np.ndarray) -> int:
    return math.ceil(pixels.shape[1] / 32) ** 2


def write_part(
    batch: dict[str, np.ndarray], root: str, layers: tuple[str, ...], run_id: str, slots: int
) -> dict[str, np.ndarray]:
    """Write stage: one features part per layer and one rejects part; per-image outcomes out.

    The part name hashes the batch's image keys, so a task Ray retries rewrites the same
    file instead of adding a duplicate, after the input position of its first image, so the
    parts of a run sort in input order wherever the data root lies. Rejects are written
    first: a kill between the two leaves the good images without features, and a rerun
    computes them.
    """
    from csmn.data.rejects import reject_row

    images = [str(uri) for uri in batch["image"]]
    errors = [str(e) for e in batch["error"]]
    for layer in layers:
        # fp16 overflow or a broken kernel: that image is rejected, the job goes on
        finite = np.isfinite(batch[layer]).all(axis=1)
        for i in np.flatnonzero(~finite):
            if not errors[i]:
                errors[i] = (f"non_finite_features: {layer} (rerun with --overwrite true "
                             "--precision fp32 or bf16)")
    digest = hashlib.sha1("\n".join(sorted(images)).encode("utf-8")).hexdigest()[:16]
    name = f"part-{run_id}-{int(np.min(batch['position'])):09d}-{digest}.parquet"
    bad = [i for i, e in enumerate(errors) if e]
    if bad:
        rows = [reject_row(STAGE, errors[i], record_id=images[i], source=images[i]) for i in bad]
        storage.write_parquet(storage.join(layout.rejects_dir(root, STAGE), name),
                              conform(rows, "reject"))
    for layer in layers:
        needed = np.array([not e for e in errors], dtype=bool) & batch[f"need_{layer}"].astype(bool)
        if not needed.any():
            continue
        keep = np.flatnonzero(needed)
        table = _features_table(layer, [images[i] for i in keep], batch[layer][keep], slots)
        storage.write_parquet(storage.join(layout.features_dir(root, layer), name), table)
    outcomes = [OK if not e else e.split(":", 1)[0].strip() for e in errors]
    decoded_on = batch.get("decoded_on", np.array([""] * len(images), dtype=object))
    return {"image": np.array(images, dtype=object), "outcome": np.array(outcomes, dtype=object),
            "decoded_on": np.array([d if o == OK else "" for d, o in
                                    zip(decoded_on, outcomes, strict=True)], dtype=object)}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _read_image_columns(groups: dict[str, list[str]]) -> dict[str, list[str | None]]:
    """The ``image`` column of every file of every group (examples, each layer's finished
    parts) in one Ray Data read, gathered on the driver by group."""
    import ray

    uris = [uri for files in groups.values() for uri in files]
    out: dict[str, list[str | None]] = {name: [] for name in groups}
    if not uris:
        return out
    filesystem, _ = storage.resolve(uris[0])
    group_of = {storage.resolve(uri)[1]: name for name, files in groups.items() for uri in files}
    dataset = ray.data.read_parquet(
        list(group_of), filesystem=filesystem, include_paths=True
    ).select_columns(["image", "path"])
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        paths = batch.column("path").to_pylist()
        for path, image in zip(paths, batch.column("image").to_pylist(), strict=True):
            out[group_of[path]].append(image)
    return out


def _check_meta(root: str, layer: str, info: WeightsInfo, preprocess: PreprocessConfig,
                precision: str) -> None:
    """Refuse to mix features of different weights, preprocessing or precision in one
    folder (a run resumed on CPUs in fp32 after GPUs in bf16 differs by about 1e-2)."""
    directory = layout.features_dir(root, layer)
    parts = storage.list_files(directory, suffix=".parquet")
    if not parts:
        return
    meta_path = layout.features_meta_uri(root, layer)
    if not storage.exists(meta_path):
        raise ValueError(
            f"{directory} holds {len(parts)} part(s) but no _meta.json: unknown weights. "
            f"Pass --overwrite true to recompute them."
        )
    meta = storage.read_json(meta_path)
    old_fingerprint = meta.get("weights", {}).get("fingerprint")
    if old_fingerprint != info.fingerprint:
        raise ValueError(
            f"{directory} holds features from weights {old_fingerprint}, this run uses "
            f"{info.fingerprint}. Pass --overwrite true to replace them, or the same --weights."
        )
    old = meta.get("preprocess", {})
    new = preprocess.to_dict()
    keys = ("resize_size", "crop_size", "mean", "std", "exif_transpose", "jpeg_draft")
    changed = [k for k in keys if json.dumps(old.get(k)) != json.dumps(new.get(k))]
    if changed:
        raise ValueError(
            f"{directory} holds features made with other preprocessing ({', '.join(changed)}). "
            f"Pass --overwrite true to replace them, or the same settings."
        )
    if meta.get("precision") not in (None, precision):
        raise ValueError(
            f"{directory} holds features computed in {meta['precision']}, this run computes "
            f"{precision}. Pass --precision {meta['precision']} (on the same kind of device) "
            f"or --overwrite true to replace them."
        )


def _write_meta(
    root: str,
    layer: str,
    config: ExtractConfig,
    info: WeightsInfo,
    preprocess: PreprocessConfig,
    precision: str,
    status: str,
    summary: dict[str, Any] | None = None,
) -> None:
    import torch
    import torchvision

    grid = preprocess.grid
    slots = 1 if layer == "pool5" else grid * grid
    meta: dict[str, Any] = {
        "layer": layer,
        "schema": f"features_{layer}",
        "feature_shape": [FEATURE_DIM] if layer == "pool5" else [slots, FEATURE_DIM],
        "slots": slots,
        "grid": grid,
        "layout": (
            "spatial mean of res5c"
            if layer == "pool5"
            else f"slot-major: reshape({slots}, {FEATURE_DIM}); slot j = y * {grid} + x"
        ),
        "model": "torchvision resnet101 conv1..layer4 (res5c = layer4 output after ReLU)",
        "weights": info.to_dict(),
        "random_weights": info.random,
        "preprocess": preprocess.to_dict(),
        "precision": precision,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "status": status,
        "updated_at": datetime.now(UTC).isoformat(),
        "config": config_to_dict(config),
    }
    if info.random:
        meta["WARNING"] = info.warning
    if summary is not None:
        meta["last_run"] = summary
    storage.write_json(layout.features_meta_uri(root, layer), meta)


def _precision_name(requested: str, use_gpu: bool) -> str:
    """The autocast the actors will use, resolved where they run (the driver may have no GPU)."""
    import ray
    import torch

    from csmn.core.image_features import resolve_precision

    def name(dtype: torch.dtype | None) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    if not use_gpu:
        return name(resolve_precision(requested, torch.device("cpu")))
    if requested != "auto" or torch.cuda.is_available():
        return name(resolve_precision(requested, torch.device("cuda")))

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> str:
        import torch

        return name(resolve_precision("auto", torch.device("cuda")))

    return ray.get(probe.remote())


class GpuUnavailable(RuntimeError):
    """``--device cuda`` and the GPUs the actors need did not join the cluster in time."""


# How often a wait for GPUs says where it stands.
_GPU_WAIT_LOG_S = 30.0


def _wait_for_gpus(needed: int, timeout_s: float) -> int:
    """Wait until the cluster has ``needed`` GPUs; returns how many it has then.

    A placement group of ``needed`` one-GPU bundles is what asks for them: a pending one is
    resource demand the autoscaler scales up for (as the actor pool's pending actors would
    be), it concerns this job only, and removing it frees the GPUs for the actors."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"GPU": 1}] * needed, strategy="PACK")
    ready_ref = group.ready()
    started = time.monotonic()
    try:
        while True:
            waited = time.monotonic() - started
            left = timeout_s - waited
            if left <= 0:
                break
            ready, _ = ray.wait([ready_ref], timeout=min(_GPU_WAIT_LOG_S, left))
            if ready:
                gpus = int(ray.cluster_resources().get("GPU", 0))
                log.info("--device cuda: %d GPU(s) in the cluster after %.0f s", gpus,
                         time.monotonic() - started)
                return gpus
            log.info("--device cuda: waiting for %d GPU(s) to join the cluster, %d there "
                     "now, %.0f s of --gpu-wait-s %.0f", needed,
                     int(ray.cluster_resources().get("GPU", 0)),
                     time.monotonic() - started, timeout_s)
    finally:
        remove_placement_group(group)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    raise GpuUnavailable(
        f"--device cuda: the Ray cluster has {gpus} GPU(s) after {timeout_s:g} s of waiting "
        f"for the {needed} the model actors need. Check that the cluster has a GPU worker "
        f"group the autoscaler can start (and its quota), raise --gpu-wait-s for a slow "
        f"start, or pass --device auto to run on CPUs."
    )


def _cluster_plan(config: ExtractConfig) -> tuple[bool, int, int, int]:
    """(use_gpu, actors, torch_threads, cpus) for the connected Ray cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.device == "cuda":
        needed = config.actors or 1
        if gpus < needed:
            gpus = _wait_for_gpus(needed, config.gpu_wait_s)
            resources = ray.cluster_resources()
    elif config.device == "auto":
        # An autoscaling cluster whose GPU group is still at zero runs on CPUs here, which
        # is the behaviour asked for only if the user knew: say so.
        if gpus:
            log.info("--device auto: %d GPU(s) in the cluster: model actors on GPUs", gpus)
        else:
            log.info("--device auto: no GPU in the cluster now: model actors on CPUs "
                     "(--device cuda waits up to --gpu-wait-s for GPUs to join)")
    cpus = max(1, int(resources.get("CPU", 1)))
    use_gpu = gpus > 0 and config.device != "cpu"
    actors = config.actors or (gpus if use_gpu else 1)
    if use_gpu and actors > gpus:
        raise ValueError(f"{actors} actors need {actors} GPUs; the cluster has {gpus}")
    nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    per_node = math.ceil(actors / nodes)
    threads = config.torch_threads or max(1, (cpus // nodes) // per_node)
    return use_gpu, actors, threads, cpus


def _input_blocks(plan: ImagePlan, layers: tuple[str, ...], cpus: int) -> list[pa.Table]:
    """The images to do, with their positions among all of the examples' images (sorted
    URIs): a resumed run numbers its images as one whole run would."""
    todo, need = plan.todo, plan.need
    rank = {uri: i for i, uri in enumerate(plan.unique)}
    # Blocks small enough that every decode slot gets work, at most 256 images each.
    rows = max(1, min(256, math.ceil(len(todo) / (4 * cpus))))
    blocks = []
    for start in range(0, len(todo), rows):
        chunk = todo[start:start + rows]
        columns = {"image": pa.array(chunk, pa.string()),
                   "position": pa.array([rank[uri] for uri in chunk], pa.int64())}
        for layer in layers:
            columns[f"need_{layer}"] = pa.array([uri in need[layer] for uri in chunk])
        blocks.append(pa.table(columns))
    return blocks


@dataclass
class ImagePlan:
    """Which images this run computes: every unique image of the examples is in exactly one
    of already done, rejected by an earlier run, or to do."""

    references: list[str]
    unique: list[str]
    without_image: int
    already_done: set[str]
    previously_rejected: set[str]
    todo: list[str]
    need: dict[str, set[str]]


def _load_weights(config: ExtractConfig) -> WeightsInfo:
    """The weights' identity; loaded here first so a missing download fails at once, not
    after the scan."""
    from csmn.core.image_features import load_trunk

    trunk, info = load_trunk(config.weights, config.seed)
    del trunk
    if info.random:
        banner = "*" * 100
        log.warning("\n%s\n*** %s\n%s", banner, info.warning, banner)
    return info


def _prepare_outputs(config: ExtractConfig, info: WeightsInfo,
                     preprocess: PreprocessConfig, precision: str) -> set[str]:
    """Delete what ``--overwrite`` / ``--retry-rejects`` ask to, refuse features made
    otherwise; returns the images rejected by earlier runs."""
    from csmn.data.rejects import forget_transient_rejects, read_rejects

    root = config.data
    if config.overwrite:
        for layer in config.layers:
            log.warning("--overwrite: deleting %s", layout.features_dir(root, layer))
            storage.delete(layout.features_dir(root, layer))
        # Everything is recomputed, the images earlier runs rejected too: their reasons may
        # be gone with the settings (non_finite_features under another --precision).
        log.warning("--overwrite: deleting %s", layout.rejects_dir(root, STAGE))
        storage.delete(layout.rejects_dir(root, STAGE))
    for layer in config.layers:
        _check_meta(root, layer, info, preprocess, precision)
    if config.retry_rejects:
        forget_transient_rejects(root, STAGE)
    return {row["record_id"] for row in read_rejects(root, STAGE)}


def _plan_images(root: str, layers: tuple[str, ...], files: list[str],
                 rejected_before: set[str]) -> ImagePlan:
    """Read the image columns of the examples and of the finished feature parts."""
    groups = {"examples": files}
    for layer in layers:
        groups[layer] = storage.list_files(layout.features_dir(root, layer), suffix=".parquet")
    columns = _read_image_columns(groups)
    references = columns["examples"]
    unique = sorted({uri for uri in references if uri})
    without_image = sum(1 for uri in references if not uri)
    if without_image:
        log.warning("%d example rows have no image reference; skipped", without_image)
    done = {layer: set(columns[layer]) for layer in layers}
    already_done = {uri for uri in unique if all(uri in done[layer] for layer in layers)}
    previously_rejected = (set(unique) - already_done) & rejected_before
    todo = [uri for uri in unique if uri not in already_done and uri not in previously_rejected]
    need = {layer: {uri for uri in todo if uri not in done[layer]} for layer in layers}
    return ImagePlan(references, unique, without_image, already_done, previously_rejected,
                     todo, need)


@dataclass
class Resources:
    """Where the model runs, resolved on the connected cluster."""

    use_gpu: bool
    actors: int
    threads: int
    cpus: int
    precision: str
    # JPEGs decoded in the model actors, on their device, rather than in CPU tasks.
    decode_in_actor: bool = False

    @property
    def decode(self) -> str:
        device = "cuda" if self.use_gpu else "cpu"
        return f"actor ({device}; other formats on its CPU)" if self.decode_in_actor \
            else "tasks (cpu)"


def _feature_dataset(config: ExtractConfig, plan: ImagePlan, info: WeightsInfo,
                     preprocess: PreprocessConfig, resources: Resources) -> Any:
    """decode (CPU tasks) -> ResNet-101 (actor pool) -> write parts (CPU tasks)."""
    import ray

    layers = config.layers
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:6]
    dataset = ray.data.from_arrow(_input_blocks(plan, layers, resources.cpus))
    # Batches cut from the blocks in input order, not in the order their tasks finish: the
    # same images in the same parts every run (with more decode tasks than one at a time,
    # a slow image otherwise moves its neighbours into other parts).
    dataset.context.execution_options.preserve_order = True
    stage, options = cpu_stage(resources.decode_in_actor, preprocess)
    dataset = dataset.map_batches(
        stage,
        batch_size=config.decode_batch_size,
        batch_format="numpy",
        fn_kwargs={**options, "io_threads": config.io_threads},
        num_cpus=config.decode_cpus,
    )
    dataset = dataset.map_batches(
        FeatureActor,
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        fn_constructor_kwargs={
            "weights": config.weights,
            "seed": config.seed,
            "fingerprint": info.fingerprint,
            "layers": layers,
            "use_gpu": resources.use_gpu,
            "precision": resources.precision,
            "mean": preprocess.mean,
            "std": preprocess.std,
            "torch_threads": resources.threads,
            "preprocess": preprocess,
            "decode_on_device": resources.decode_in_actor,
        },
        num_cpus=1,
        num_gpus=1 if resources.use_gpu else 0,
        # Also keeps Ray Data from fusing the decode tasks into the actor on CPU nodes
        # (it fuses maps whose resource requests are identical).
        memory=int(config.actor_memory_gb * 1024**3),
    )
    return dataset.map_batches(
        write_part,
        batch_size=config.rows_per_part,
        batch_format="numpy",
        fn_kwargs={"root": config.data, "layers": layers, "run_id": run_id,
                   "slots": preprocess.grid**2},
        num_cpus=0.25,
    )


def _run_dataset(
    dataset: Any, stats: list[str] | None
) -> tuple[Counter[str], set[str], Counter[str]]:
    """(outcome counts, images seen, written images by where they were decoded) of the
    pipeline's per-image outcomes."""
    outcomes: Counter[str] = Counter()
    seen: set[str] = set()
    decoded_on: Counter[str] = Counter()
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        outcomes.update(batch.column("outcome").to_pylist())
        seen.update(batch.column("image").to_pylist())
        decoded_on.update(d for d in batch.column("decoded_on").to_pylist() if d)
    operator_stats = dataset.stats()
    log.debug("Ray Data stats:\n%s", operator_stats)
    if stats is not None:
        stats.append(operator_stats)
    return outcomes, seen, decoded_on


def _summary(config: ExtractConfig, plan: ImagePlan, info: WeightsInfo, resources: Resources,
             outcomes: Counter[str], seen: set[str], seconds: float,
             decoded_on: Counter[str] | None = None) -> dict[str, Any]:
    written = outcomes.pop(OK, 0)
    rejected_now = sum(outcomes.values())
    summary: dict[str, Any] = {
        "data": config.data,
        "layers": list(config.layers),
        "example_rows": len(plan.references),
        "example_rows_without_image": plan.without_image,
        "images": len(plan.unique),
        "already_done": len(plan.already_done),
        "previously_rejected": len(plan.previously_rejected),
        "to_compute": len(plan.todo),
        "written": written,
        "rejected": rejected_now,
        "rejects_by_code": dict(sorted(outcomes.items())),
        "weights": info.name,
        "weights_fingerprint": info.fingerprint,
        "random_weights": info.random,
        "device": "cuda" if resources.use_gpu else "cpu",
        "precision": resources.precision,
        "decode": resources.decode,
        # Written images by the decoder that made their pixels: torchvision's on the actor's
        # device (torchvision-cuda: nvJPEG) or PIL's (the decode tasks, or the actor's
        # fallback for PNG & co.).
        "decoded_on": dict(sorted((decoded_on or Counter()).items())),
        "actors": resources.actors,
        "batch_size": config.batch_size,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(plan.todo) / seconds, 2) if seconds > 0 else None,
    }
    # Every image accounted for: in = done before + rejected before + written + rejected.
    summary["balanced"] = (
        len(plan.unique)
        == len(plan.already_done) + len(plan.previously_rejected) + written + rejected_now
        and seen == set(plan.todo)
    )
    return summary


def run_extract(config: ExtractConfig, stats: list[str] | None = None) -> dict[str, Any]:
    """Run the job on the connected (or an in-process) Ray; returns the summary.

    Ray Data's per-operator stats (where the time went) are logged at DEBUG level and
    appended to ``stats`` when a list is given."""
    from csmn.pipeline.runtime import init_ray

    if not config.data:
        raise ValueError("--data is required: the data root that holds examples/")
    require_data_root(config.data, "extract-features")
    started = time.time()
    root, layers = config.data, config.layers
    preprocess = config.preprocess()
    info = _load_weights(config)
    files = example_files(root)
    if not files:
        raise ValueError(f"no examples under {layout.examples_root(root)}/<task>/<split>/")
    init_ray()
    # Before anything is deleted or scanned: a missing GPU fails (or is waited for) first,
    # and --overwrite then costs nothing when the run cannot go on.
    use_gpu, actors, threads, cpus = _cluster_plan(config)
    precision = _precision_name(config.precision, use_gpu)
    rejected_before = _prepare_outputs(config, info, preprocess, precision)
    plan = _plan_images(root, layers, files, rejected_before)
    decode_in_actor = decodes_in_actor(config.decode, use_gpu)
    resources = Resources(use_gpu, actors, threads, cpus, precision, decode_in_actor)
    for layer in layers:
        _write_meta(root, layer, config, info, preprocess, resources.precision, "running")
    log.info(
        "%d example rows, %d unique images: %d already have features, %d rejected before, "
        "%d to compute on %d %s actor(s), batch %d, decoded in %s",
        len(plan.references), len(plan.unique), len(plan.already_done),
        len(plan.previously_rejected), len(plan.todo), actors,
        "GPU" if use_gpu else f"CPU ({threads} threads)", config.batch_size, resources.decode,
    )
    outcomes: Counter[str] = Counter()
    seen: set[str] = set()
    decoded_on: Counter[str] = Counter()
    if plan.todo:
        dataset = _feature_dataset(config, plan, info, preprocess, resources)
        outcomes, seen, decoded_on = _run_dataset(dataset, stats)
    summary = _summary(config, plan, info, resources, outcomes, seen, time.time() - started,
                       decoded_on)
    for layer in layers:
        _write_meta(root, layer, config, info, preprocess, resources.precision, "complete",
                    summary)
    if not summary["balanced"]:
        raise RuntimeError(f"images lost: records in != out + rejected: {summary}")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    from csmn.core.image_features import RANDOM_WEIGHTS_WARNING

    lines = []
    if summary["random_weights"]:
        lines.append("!" * 80)
        lines.append(f"!!! {RANDOM_WEIGHTS_WARNING}")
        lines.append("!" * 80)
    codes = ", ".join(f"{k}: {v}" for k, v in summary["rejects_by_code"].items()) or "none"
    lines += [
        f"extract-features ({'+'.join(summary['layers'])}, weights {summary['weights']}, "
        f"{summary['device']} {summary['precision']}, {summary['actors']} actor(s))",
        f"  {summary['example_rows']} example rows -> {summary['images']} unique images",
        f"  already had features: {summary['already_done']}, "
        f"rejected by an earlier run: {summary['previously_rejected']}",
        f"  computed now: {summary['written']}, rejected now: {summary['rejected']} ({codes})",
        f"  decoded in {summary['decode']}: "
        + (", ".join(f"{k} {v}" for k, v in summary["decoded_on"].items()) or "nothing"),
        f"  images in = done before + rejected before + written + rejected: "
        f"{summary['images']} = {summary['already_done']} + {summary['previously_rejected']} + "
        f"{summary['written']} + {summary['rejected']}",
        f"  {summary['seconds']} s, {summary['images_per_s']} images/s",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csmn extract-features",
        description="ResNet-101 pool5/res5c features of every image of the examples (Ray Data).",
    )
    parser.add_argument("--config", default=None, help="YAML file of ExtractConfig fields")
    parser.add_argument("--config-section", default=None, help="top-level section of --config")
    add_config_arguments(parser, ExtractConfig)
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    from csmn.core.image_features import WeightsUnavailable
    from csmn.pipeline.runtime import setup_logging

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging()
    try:
        config = config_from_args(ExtractConfig, args, args.config, section=args.config_section)
        summary = run_extract(config)
    except (WeightsUnavailable, GpuUnavailable, ValueError) as err:
        print(f"csmn extract-features: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(json.dumps(summary, sort_keys=True))
    return 0
