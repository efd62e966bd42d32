"""Images to uint8 crops on the CPU (paper 4.1's preprocessing): read, check, decode, resize,
center-crop, with PIL and numpy only; and the jobs' ``--decode`` choice of where images are
decoded (CPU tasks or the model actors).

Preprocessing is done on the CPU in two halves so that only uint8 pixels travel between
processes: :func:`load_image` decodes, validates, resizes and center-crops to a uint8
``crop x crop x 3`` array; the model's actor normalises on its device
(:class:`csmn.core.image_features.FeatureExtractor`), or decodes the JPEGs there itself
(:func:`csmn.core.image_features.decode_images_on_device`).

No torch at import: Ray Data's CPU decode tasks unpickle functions of the jobs that import
this module, and a worker process that imported torch and torchvision for them would start
about 3 seconds later, once per worker, every stage (measured on 2 cores).
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# ResNet-101's total stride: a crop of c pixels gives a (c / 32) x (c / 32) res5c grid.
NETWORK_STRIDE = 32

TORCHVISION_WEIGHTS = {
    "imagenet": "IMAGENET1K_V1",
    "imagenet-v1": "IMAGENET1K_V1",
    "imagenet-v2": "IMAGENET1K_V2",
}


class ImageRejected(Exception):
    """An image that cannot be turned into features; ``code`` names the reason for rejects/."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _imagenet_transform(spec: str = "imagenet") -> Any:
    import torchvision  # the weights' own transform, read once on the driver

    # Spelled as load_state_dict reads it: " Imagenet-V2" loads V2's weights, so it gets
    # V2's transform too.
    name = TORCHVISION_WEIGHTS.get(spec.strip().lower(), "IMAGENET1K_V1")
    return getattr(torchvision.models.ResNet101_Weights, name).transforms()


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a uint8 crop. Defaults are the ImageNet-V1 evaluation transform."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Decompression-bomb guard: images with more pixels than this are rejected from their
    # header, before any pixel is decoded. 64 MP covers 48 MP phone cameras.
    max_pixels: int = 64_000_000
    max_bytes: int = 64 * 1024 * 1024
    # Phone photos store their rotation in EXIF; the features should see the upright image.
    exif_transpose: bool = True
    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the resize target): several
    # times faster on large photos, at a small deviation from a full decode + resize.
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        if self.crop_size < NETWORK_STRIDE:
            raise ValueError(f"crop_size must be at least {NETWORK_STRIDE}, got {self.crop_size}")
        if self.resize_size < self.crop_size:
            raise ValueError(
                f"resize_size ({self.resize_size}) must be >= crop_size ({self.crop_size})"
            )

    @property
    def grid(self) -> int:
        """Side of the res5c grid (7 at 224)."""
        return math.ceil(self.crop_size / NETWORK_STRIDE)

    @classmethod
    def for_weights(
        cls, weights: str = "imagenet", resize_size: int = 0, crop_size: int = 0, **kwargs: Any
    ) -> PreprocessConfig:
        """The transform the weights expect (from torchvision's meta), sizes overridable
        (0 keeps the weights' own). State dicts and random weights get ImageNet-V1's."""
        transform = _imagenet_transform(weights)
        return cls(
            resize_size=resize_size or int(transform.resize_size[0]),
            crop_size=crop_size or int(transform.crop_size[0]),
            mean=tuple(float(v) for v in transform.mean),
            std=tuple(float(v) for v in transform.std),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interpolation"] = "bilinear (PIL, antialiased)"
        out["grid"] = self.grid
        return out


# The formats photos come in. Every other PIL plugin is refused before its parser runs: EPS
# and PS would go to Ghostscript, and rarely used parsers are where decoder bugs live.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Signatures of formats PIL (or a helper it calls) could open but that are not accepted, so
# that the reject can say "unsupported" rather than "not an image".
_OTHER_FORMATS = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
    (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"), (b"icns", "ICNS"), (b"gimp xcf", "XCF"), (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
)


def _other_format(data: bytes) -> str | None:
    head = data[:32]
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 2 and head[2:3].isspace():
        return "PNM"
    stripped = head.lstrip()
    if stripped.startswith((b"<?xml", b"<svg")):
        return "SVG/XML"
    return None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey as 8-bit grey. PIL's convert("RGB") clips those values at 255,
    so a 16-bit PNG (0..65535) came out all white; they are scaled instead."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    if image.mode == "F":
        raise ImageRejected("unsupported_format", "32-bit float pixels have no agreed range")
    return image


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    # torchvision's rule for an int size: the short side becomes `short_side`, the long side
    # int(short_side * long / short) (truncated, not rounded).
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def decode_image(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Decode, validate, resize and center-crop; returns uint8 ``[crop, crop, 3]`` RGB.

    Raises :class:`ImageRejected` for empty, non-image, truncated, corrupt or oversized data.
    """
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    if len(data) > config.max_bytes:
        raise ImageRejected("file_too_large", f"{len(data)} bytes > {config.max_bytes}")
    with warnings.catch_warnings():
        # PIL warns (and past 2x its limit raises) on huge images; the explicit check below
        # rejects them first, from the header.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as err:
            raise ImageRejected("image_too_large", str(err)) from err
        except UnidentifiedImageError as err:
            other = _other_format(data)
            if other:
                raise ImageRejected(
                    "unsupported_format",
                    f"{other}; accepted: {', '.join(ALLOWED_FORMATS)}") from err
            raise ImageRejected(
                "not_an_image", f"not one of {', '.join(ALLOWED_FORMATS)}") from err
        except (OSError, SyntaxError, ValueError) as err:
            code = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
            raise ImageRejected(code, f"{type(err).__name__}: {err}") from err
        with image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageRejected("corrupt_image", f"size {width}x{height}")
            if width * height > config.max_pixels:
                raise ImageRejected(
                    "image_too_large", f"{width}x{height} pixels > {config.max_pixels}"
                )
            new_w, new_h = resized_size(width, height, config.resize_size)
            if new_w * new_h > config.max_pixels:
                # A 1-pixel-high strip would resize to billions of pixels.
                raise ImageRejected(
                    "image_too_large",
                    f"aspect ratio of {width}x{height} resizes to {new_w}x{new_h}",
                )
            try:
                return _resize_and_crop(image, config)
            except Image.DecompressionBombError as err:
                raise ImageRejected("image_too_large", str(err)) from err
            except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
                message = f"{type(err).__name__}: {err}"
                code = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
                raise ImageRejected(code, message) from err


def _resize_and_crop(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    if config.jpeg_draft and image.format == "JPEG":
        width, height = image.size
        image.draft("RGB", resized_size(width, height, config.resize_size))
    if config.exif_transpose:
        image = ImageOps.exif_transpose(image)
    rgb = _to_8bit(image).convert("RGB")
    new_size = resized_size(rgb.width, rgb.height, config.resize_size)
    if new_size != rgb.size:
        rgb = rgb.resize(new_size, Image.Resampling.BILINEAR)
    crop = config.crop_size
    # torchvision's center_crop offsets: int(round((size - crop) / 2)).
    left = int(round((rgb.width - crop) / 2.0))
    top = int(round((rgb.height - crop) / 2.0))
    rgb = rgb.crop((left, top, left + crop, top + crop))
    pixels = np.array(rgb, dtype=np.uint8)  # a writable copy (torch refuses read-only ones)
    if pixels.shape != (crop, crop, 3):
        raise ImageRejected("corrupt_image", f"decoded to shape {pixels.shape}")
    return pixels


def _read_local(path: str, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever (and a
    # device could block on open); fstat of the open descriptor then says what it is, with
    # no window between the check and the read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(f"{path} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not_a_file", "not a regular file (a FIFO, socket or device)")
        if info.st_size > max_bytes:
            raise ImageRejected("file_too_large", f"{info.st_size} bytes > {max_bytes}")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as stream:
            fd = -1
            # One byte past the cap: a file that grew since fstat is still refused.
            data = stream.read(max_bytes + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise ImageRejected("file_too_large", f"more than {max_bytes} bytes")
    return data


def _store_was_busy(err: OSError) -> bool:
    try:
        from csmn.data import storage
    except ImportError:  # a box with torch alone reads local files only
        return False
    return storage.is_transient(err)


def read_image_bytes(uri: str, max_bytes: int) -> bytes:
    """Bytes of a local or ``s3://`` image, never more than ``max_bytes`` (checked first).
    Only regular files are read: a FIFO or a device is ``not_a_file``, without blocking.
    A local file is read without the storage layer (pyarrow): the feature benchmark reads
    local JPEGs on a GPU box that has torch alone."""
    try:
        if "://" not in uri or uri.startswith("file://"):
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            return _read_local(os.path.abspath(os.path.expanduser(path)), max_bytes)
        from csmn.data import storage

        fs, path = storage.resolve(uri)
        # One metadata request gives the size, so an oversized file is never downloaded.
        with fs.open_input_file(path) as stream:
            size = stream.size()
            if size > max_bytes:
                raise ImageRejected("file_too_large", f"{size} bytes > {max_bytes}")
            return stream.read()
    except ImageRejected:
        raise
    except (FileNotFoundError, IsADirectoryError) as err:
        raise ImageRejected("missing_image", f"{type(err).__name__}: {err}") from err
    except OSError as err:
        if _store_was_busy(err):  # the store, not the image: a later run may read it
            from csmn.data.rejects import TRANSIENT_IO

            raise ImageRejected(TRANSIENT_IO, f"{type(err).__name__}: {err}") from err
        raise ImageRejected("read_error", f"{type(err).__name__}: {err}") from err
    except ValueError as err:
        raise ImageRejected("read_error", f"{type(err).__name__}: {err}") from err


def load_image(uri: str, config: PreprocessConfig) -> np.ndarray:
    """Read and preprocess one image (local path or URI); raises :class:`ImageRejected`."""
    return decode_image(read_image_bytes(uri, config.max_bytes), config)


def decode_image_or_reason(data: bytes, config: PreprocessConfig
                           ) -> tuple[np.ndarray | None, str]:
    """(pixels, "") of :func:`decode_image`, or (None, the reject reason): one image never
    stops a job, so anything it raises is a reject too."""
    try:
        return decode_image(data, config), ""
    except ImageRejected as err:
        return None, err.reason
    except Exception as err:
        return None, f"decode_error: {type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------
# Where a job decodes
# ---------------------------------------------------------------------------------------------

DECODE_MODES = ("auto", "tasks", "actor")
DECODE_HELP = ("where images are decoded: auto (JPEGs in the model actors with nvJPEG when "
               "they have GPUs, else in CPU tasks) | tasks (CPU tasks) | actor (in the model "
               "actors, on their device, even a CPU)")


# The spellings of --precision (csmn.core.image_features.resolve_precision maps them to dtypes).
PRECISIONS = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "half")


def check_precision(precision: str) -> None:
    """Checked where the config is made, before a run deletes or starts anything."""
    if precision.lower() not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def check_decode(decode: str) -> None:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")


def decodes_in_actor(decode: str, use_gpu: bool) -> bool:
    """Whether the model actors decode (on their device) rather than CPU tasks: a GPU decodes
    JPEGs faster than the CPUs feeding it (nvJPEG); a CPU actor only when asked."""
    return decode == "actor" or (decode == "auto" and use_gpu)
