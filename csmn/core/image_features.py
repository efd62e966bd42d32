"""ResNet-101 image features (paper 4.1): the pool5 / res5c trunk, its weights, and decoding on
the model's device.

No Ray here: a GPU box without Ray imports this module to run the same model and the same
preprocessing as the Ray Data job (``csmn.pipeline.extract``), and tests call it directly.

Layers. ``res5c`` is the output of torchvision's ``layer4`` (the last bottleneck block of
stage 5, after its ReLU): 2048 x 7 x 7 at 224 pixels. ``pool5`` is its spatial mean, exactly
what torchvision's ``avgpool`` computes before ``fc``. res5c is stored slot-major: slot
``j = y * grid + x`` holds the 2048 channels of grid cell (y, x), so a stored row reshapes
to ``(grid * grid, 2048)``.

Weights. ``imagenet`` means torchvision's ``ResNet101_Weights.IMAGENET1K_V1``: the original
ResNet-101 (He et al.) ImageNet weights, the closest to the Caffe model the paper used, and
the ones whose evaluation transform is the paper's (resize short side 256, center crop 224).
``imagenet-v2`` (IMAGENET1K_V2, better top-1 but trained with a newer recipe, evaluated at
resize 232) is there on request. Otherwise a local path or URI of a ``state_dict`` saved from
a torchvision ``resnet101`` (loaded with ``weights_only=True``), or ``random`` for tests: a
seeded random initialisation that every caller reports loudly.

Preprocessing: :mod:`csmn.core.image_decode` turns the bytes into uint8 crops on the CPU
(PIL, no torch); :class:`FeatureExtractor` normalises them on the model's device. Where the
model has a GPU, :func:`decode_images_on_device` instead decodes JPEGs on it (nvJPEG),
resizes and crops there, and leaves other formats to :func:`decode_image`; only the encoded
bytes then travel.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

# The CPU half, also importable from here as before the two were split.
from csmn.core.image_decode import (  # noqa: F401
    ALLOWED_FORMATS,
    NETWORK_STRIDE,
    TORCHVISION_WEIGHTS,
    ImageRejected,
    PreprocessConfig,
    check_precision,
    decode_image,
    decode_image_or_reason,
    load_image,
    read_image_bytes,
    resized_size,
)
from csmn.data.names import FEATURE_DIM, LAYERS

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: these features come from a randomly initialised ResNet-101, not from "
    "ImageNet training. They carry no visual meaning; use them for tests only."
)


class WeightsUnavailable(RuntimeError):
    """No usable weights: the message says what to do instead."""


# ---------------------------------------------------------------------------------------------
# Decoding on the model's device (nvJPEG on a GPU)
# ---------------------------------------------------------------------------------------------

# Decoded pixels held at once by one batched device decode: 128 MP is 384 MB of uint8, so a
# batch of 48 MP phone photos never takes a GPU's memory in one go.
DEVICE_DECODE_PIXELS = 128_000_000
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
# PIL's names for a JPEG file: MPO is what phones write (a JPEG with extra frames after it,
# the first of which both decoders return).
_JPEG_FORMATS = ("JPEG", "MPO")


@dataclass
class DeviceDecoded:
    """What :func:`decode_images_on_device` gives: ``pixels`` uint8 ``[N, crop, crop, 3]`` on
    the device (zeros where rejected), a view of planar ``[N, 3, crop, crop]`` memory, the
    layout the model's input is made from (no interleaving copy); ``errors`` (``"code:
    detail"``, empty when the image is good) and ``on_device`` (True where the device
    decoder did the work; False for the CPU fallback and for rejects)."""

    pixels: torch.Tensor
    errors: list[str]
    on_device: list[bool]


def _device_jpeg(data: bytes, config: PreprocessConfig) -> tuple[int, int, int] | None:
    """``(width, height, EXIF orientation)`` of a JPEG the device decoder may take, from its
    header alone; None sends the image to :func:`decode_image`, which decodes what it can
    and rejects the rest with the same reasons as the CPU path. A JPEG without its end
    marker is sent there too: nvJPEG may return a truncated file's missing rows as grey
    instead of failing, where the CPU path rejects it as ``truncated_image``."""
    if not data.startswith(_JPEG_SOI) or len(data) > config.max_bytes:
        return None
    if not data.rstrip(b"\x00").endswith(_JPEG_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_JPEG_FORMATS) as image:
                # CMYK and YCCK: the decoders convert them differently; PIL's way is kept.
                if image.mode not in ("RGB", "L"):
                    return None
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1) if config.exif_transpose else 1
    except Exception:  # anything PIL refuses here, decode_image names
        return None
    if width <= 0 or height <= 0 or width * height > config.max_pixels:
        return None
    new_w, new_h = resized_size(width, height, config.resize_size)
    if new_w * new_h > config.max_pixels:
        return None
    if config.jpeg_draft and width >= 2 * new_w and height >= 2 * new_h:
        return None  # libjpeg decodes it at a reduced scale there; the device cannot
    return width, height, orientation if orientation in range(1, 9) else 1


def exif_orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[C, H, W]`` as ``PIL.ImageOps.exif_transpose`` turns an image of that EXIF
    orientation (1-8) upright."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def resize_and_crop_tensor(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, crop, crop]`` on the image's device, as
    :func:`decode_image` does it: short side to ``resize_size`` (torchvision's truncation),
    bilinear with antialiasing, then torchvision's center-crop offsets. PIL resamples in
    fixed point, torch in its own fixed point on a CPU and in float32 on a GPU: a few
    values differ by one level."""
    height, width = image.shape[-2:]
    new_w, new_h = resized_size(width, height, config.resize_size)
    if (new_w, new_h) != (width, height):
        if image.device.type == "cpu":
            # torch's uint8 kernel (channels_last, the one torchvision's resize uses): about
            # 25x faster on a CPU than the float one, which CUDA has instead.
            image = torch.nn.functional.interpolate(
                image[None].contiguous(memory_format=torch.channels_last), size=(new_h, new_w),
                mode="bilinear", antialias=True, align_corners=False,
            )[0]
        else:
            resized = torch.nn.functional.interpolate(
                image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                align_corners=False,
            )[0]
            image = resized.round_().clamp_(0, 255).to(torch.uint8)
    crop = config.crop_size
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    return image[:, top:top + crop, left:left + crop]


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """torchvision's batched decode; a batch it refuses is decoded image by image, and an
    image it refuses on its own is None (for the CPU path to decode or reject)."""
    if device.type == "cuda":
        # The nvJPEG decoder works on a stream of its own, not ordered with this process's:
        # a block freed here while queued kernels still read it could be handed to it, and
        # its output read before it is written. A device sync before and after each batch
        # orders both ways (two syncs per batch).
        torch.cuda.synchronize(device)
        try:
            return _decode_jpegs_unordered(encoded, device)
        finally:
            torch.cuda.synchronize(device)
    return _decode_jpegs_unordered(encoded, device)


def _decode_jpegs_unordered(
    encoded: list[torch.Tensor], device: torch.device
) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of TorchCodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except Exception:
            pass
        out: list[torch.Tensor | None] = []
        for one in encoded:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except Exception:
                out.append(None)
        return out


def decode_images_on_device(
    contents: Sequence[bytes], config: PreprocessConfig, device: str | torch.device,
    max_pixels_at_once: int = DEVICE_DECODE_PIXELS,
) -> DeviceDecoded:
    """JPEGs decoded on ``device`` (nvJPEG on a GPU, libjpeg-turbo on the CPU), resized and
    center-cropped there, as :func:`decode_image` does it on the CPU; every other image
    (PNG, WebP, CMYK JPEGs, anything the device decoder refuses or whose header fails a
    check) goes through :func:`decode_image`, and a bad one gets its reject reason. One bad
    image never fails the batch."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # nvJPEG's decoder is set up per device: name the one this process uses.
        device = torch.device("cuda", torch.cuda.current_device())
    crop = config.crop_size
    count = len(contents)
    planes = torch.zeros((count, 3, crop, crop), dtype=torch.uint8, device=device)
    errors = [""] * count
    on_device = [False] * count
    fallback: list[int] = []
    headers: dict[int, tuple[int, int, int]] = {}
    for i, data in enumerate(contents):
        header = _device_jpeg(data, config)
        if header is None:
            fallback.append(i)
        else:
            headers[i] = header
    chunks: list[list[int]] = []
    held = 0
    for i, (width, height, _) in headers.items():
        if not chunks or held + width * height > max_pixels_at_once:
            chunks.append([])
            held = 0
        chunks[-1].append(i)
        held += width * height
    for chunk in chunks:
        # A writable copy: torch warns on (and must not alias) the immutable bytes.
        encoded = [torch.frombuffer(bytearray(contents[i]), dtype=torch.uint8) for i in chunk]
        for i, image in zip(chunk, _decode_jpegs(encoded, device), strict=True):
            width, height, orientation = headers[i]
            if image is None or tuple(image.shape) != (3, height, width):
                fallback.append(i)
                continue
            planes[i] = resize_and_crop_tensor(exif_orient(image, orientation), config)
            on_device[i] = True
    for i in sorted(fallback):
        pixels, errors[i] = decode_image_or_reason(contents[i], config)
        if pixels is not None:
            planes[i] = torch.from_numpy(pixels).permute(2, 0, 1)
    return DeviceDecoded(planes.permute(0, 2, 3, 1), errors, on_device)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; recorded in ``_meta.json`` and checked on a rerun."""

    spec: str
    source: str  # "torchvision" | "state_dict" | "random"
    name: str
    sha256: str | None = None
    seed: int | None = None
    url: str | None = None
    random: bool = False
    warning: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Equal fingerprints mean identical weights (features can be mixed across runs)."""
        if self.random:
            return f"random:seed={self.seed}"
        return f"{self.source}:{self.sha256 or self.name}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fingerprint"] = self.fingerprint
        return out


def _is_random(spec: str) -> bool:
    return spec.strip().lower() == "random"


def _no_weights_message(spec: str, err: BaseException) -> str:
    name = TORCHVISION_WEIGHTS.get(spec, "IMAGENET1K_V1")
    url = getattr(torchvision.models.ResNet101_Weights, name).url
    return (
        f"could not get torchvision's ResNet-101 ImageNet weights ({name}): "
        f"{type(err).__name__}: {err}. Without internet access: download {url} on a machine "
        f"that has it, put the file in local or S3 storage and pass --weights <path or s3:// "
        f"URI> (or place it in the torch hub cache, {torch.hub.get_dir()}/checkpoints/). "
        f"Pass --weights random only for tests: the features are then meaningless."
    )


def _verified_hub_file(url: str) -> str:
    """The SHA-256 of torch.hub's cached copy of ``url``, checked against the prefix the file
    name carries (``resnet101-63fe2227.pth``): a copy placed in the cache by hand is only
    used if it is the published file."""
    name = os.path.basename(url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    sha256 = digest.hexdigest()
    expected = re.search(r"-([a-f0-9]{8,})\.", name)
    if expected and not sha256.startswith(expected.group(1)):
        raise WeightsUnavailable(
            f"{path} is not the published {name}: its SHA-256 starts {sha256[:8]}, not "
            f"{expected.group(1)}. Delete it and download the file again, or pass --weights "
            f"<path or s3:// URI>.")
    return sha256


def load_state_dict(spec: str) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The state_dict for ``spec`` (``imagenet[-v1|-v2]``, a path or a URI), with its info.

    Raises :class:`WeightsUnavailable` with instructions when there is none.
    """
    spec = spec.strip()
    if _is_random(spec):
        raise ValueError("random weights have no state_dict; use build_resnet101_trunk")
    if spec.lower() in TORCHVISION_WEIGHTS:
        name = TORCHVISION_WEIGHTS[spec.lower()]
        weights = getattr(torchvision.models.ResNet101_Weights, name)
        try:
            # weights_only: torch.hub's own default unpickles whatever sits in its cache, and
            # it checks the hash only of a file it downloads, not of one already there.
            state_dict = weights.get_state_dict(progress=False, check_hash=True,
                                                weights_only=True)
        except Exception as err:  # urllib, ssl, socket and hash errors all mean "none here"
            raise WeightsUnavailable(_no_weights_message(spec.lower(), err)) from err
        sha256 = _verified_hub_file(weights.url)
        info = WeightsInfo(
            spec=spec,
            source="torchvision",
            name=f"ResNet101_Weights.{name}",
            url=weights.url,
            # Not in ``sha256``: the fingerprint of torchvision's weights stays their name.
            extra={"acc@1": weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                   "file_sha256": sha256},
        )
        return state_dict, info
    from csmn.data import storage

    try:
        data = storage.read_bytes(spec)
    except FileNotFoundError as err:
        raise WeightsUnavailable(
            f"weights file not found: {spec}. Pass --weights imagenet (needs internet or the "
            f"torch hub cache), a path or URI of a resnet101 state_dict, or --weights random "
            f"(tests only)."
        ) from err
    except OSError as err:
        raise WeightsUnavailable(f"cannot read weights {spec}: {err}") from err
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors: a file that is not a state_dict
        raise WeightsUnavailable(
            f"{spec} is not a torch state_dict loadable with weights_only=True: {err}"
        ) from err
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise WeightsUnavailable(f"{spec} holds a {type(state_dict).__name__}, not a state_dict")
    info = WeightsInfo(
        spec=spec,
        source="state_dict",
        name=spec,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return state_dict, info


def random_weights_info(seed: int) -> WeightsInfo:
    return WeightsInfo(
        spec="random",
        source="random",
        name=f"random(seed={seed})",
        seed=seed,
        random=True,
        warning=RANDOM_WEIGHTS_WARNING,
    )


def build_resnet101_trunk(state_dict: dict[str, torch.Tensor] | None, seed: int = 0) -> nn.Module:
    """torchvision's ResNet-101 up to ``layer4`` (res5c), weights loaded, in eval mode.

    ``state_dict=None`` gives a random initialisation from ``seed`` (reproducible on CPU).
    ``fc.*`` keys are ignored; any other missing or unexpected key is an error.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Random weights only: with every residual branch starting at zero (torchvision's
        # option for a stable start), eval-mode activations stay near unit scale. The plain
        # init compounds 33 blocks into pool5 values in the thousands, which no downstream
        # model trains on. Loaded weights overwrite these values either way.
        resnet = torchvision.models.resnet101(weights=None, zero_init_residual=True)
    if state_dict is not None:
        cleaned = {k.removeprefix("module."): v for k, v in state_dict.items()}
        try:
            result = resnet.load_state_dict(cleaned, strict=False)
        except RuntimeError as err:  # tensors of the wrong shape
            raise WeightsUnavailable(
                f"state_dict does not fit torchvision's resnet101: {err}"
            ) from err
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise WeightsUnavailable(
                "state_dict does not fit torchvision's resnet101: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    trunk = nn.Sequential(
        resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
        resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
    )
    return trunk.eval().requires_grad_(False)


def load_trunk(spec: str, seed: int = 0) -> tuple[nn.Module, WeightsInfo]:
    """Trunk and weights info for a weights spec (``imagenet``, path/URI or ``random``).
    Random weights are announced by the job's driver, once (``WeightsInfo.warning``), not
    here: every actor builds its own trunk."""
    if _is_random(spec):
        return build_resnet101_trunk(None, seed), random_weights_info(seed)
    state_dict, info = load_state_dict(spec)
    return build_resnet101_trunk(state_dict), info


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. ``auto``: bf16 on GPUs that have it (else
    fp16), fp32 on the CPU (bf16 matmuls are slow on CPUs without AMX)."""
    precision = precision.lower()
    if precision in ("fp32", "float32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "float16", "half"):
        return torch.float16
    if precision != "auto":
        check_precision(precision)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


class FeatureExtractor:
    """uint8 crops in, pool5 and/or res5c float32 features out; Ray-free.

    ``__call__(pixels)`` takes ``[B, crop, crop, 3]`` uint8 (what :func:`load_image` gives)
    and returns ``{"pool5": [B, 2048], "res5c": [B, grid*grid*2048]}`` (the layers asked for)
    as float32 numpy arrays, res5c slot-major.
    """

    def __init__(
        self,
        trunk: nn.Module,
        layers: Sequence[str] = ("pool5",),
        device: str | torch.device = "auto",
        precision: str = "auto",
        mean: Sequence[float] = PreprocessConfig.mean,
        std: Sequence[float] = PreprocessConfig.std,
        weights_info: WeightsInfo | None = None,
    ) -> None:
        unknown = [layer for layer in layers if layer not in LAYERS]
        if unknown or not layers:
            raise ValueError(f"layers must be a non-empty subset of {LAYERS}, got {layers}")
        self.layers = tuple(layers)
        self.weights_info = weights_info
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.trunk = trunk.to(self.device, memory_format=torch.channels_last).eval()
        # Normalise in the uint8 domain: (x / 255 - mean) / std == (x - 255 mean) / (255 std).
        shape = (1, 3, 1, 1)
        self._offset = torch.tensor([255.0 * m for m in mean], device=self.device).view(shape)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=self.device).view(
            shape
        )

    @classmethod
    def from_weights(
        cls,
        weights: str = "imagenet",
        layers: Sequence[str] = ("pool5",),
        device: str = "auto",
        precision: str = "auto",
        seed: int = 0,
        preprocess: PreprocessConfig | None = None,
    ) -> FeatureExtractor:
        trunk, info = load_trunk(weights, seed)
        preprocess = preprocess or PreprocessConfig.for_weights(weights)
        return cls(trunk, layers, device, precision, preprocess.mean, preprocess.std, info)

    @property
    def precision_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def to_input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float32 NCHW on the device, channels_last (a permuted
        NHWC tensor already has channels_last strides, so this copies nothing extra)."""
        batch = torch.as_tensor(pixels)
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B, H, W, 3], got {batch.dtype} {tuple(batch.shape)}")
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:  # on the device already (decoded there), or a CPU model
            batch = batch.to(self.device)
        x = batch.permute(0, 3, 1, 2).float()
        x = (x - self._offset) * self._scale
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def res5c_maps(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[B, 2048, grid, grid]`` float32 on the device."""
        x = self.to_input(pixels)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                maps = self.trunk(x)
        else:
            maps = self.trunk(x)
        return maps.float()

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        if len(pixels) == 0:
            return {layer: np.zeros((0, FEATURE_DIM), np.float32) for layer in self.layers}
        maps = self.res5c_maps(pixels)
        out: dict[str, np.ndarray] = {}
        if "pool5" in self.layers:
            out["pool5"] = maps.mean(dim=(2, 3)).cpu().numpy()
        if "res5c" in self.layers:
            batch = maps.shape[0]
            out["res5c"] = maps.permute(0, 2, 3, 1).reshape(batch, -1).cpu().numpy()
        return out


def res5c_slots(flat: np.ndarray) -> np.ndarray:
    """A stored res5c row (or rows) as ``[..., slots, 2048]``."""
    return np.asarray(flat).reshape(*np.shape(flat)[:-1], -1, FEATURE_DIM)
