"""Hostile image files: each is a reject with its code, none blocks or reaches a parser
outside the allowlist, and the odd-but-valid ones decode to what they show."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import reliability_tally
from PIL import Image

from csmn.core.image_features import ImageRejected, PreprocessConfig, load_image

CONFIG = PreprocessConfig(resize_size=32, crop_size=32, max_bytes=200_000)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb never decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = b""
    for name, body in ((b"IHDR", ihdr), (b"IDAT", zlib.compress(b"")), (b"IEND", b"")):
        chunks += struct.pack(">I", len(body)) + name + body + struct.pack(
            ">I", zlib.crc32(name + body))
    return b"\x89PNG\r\n\x1a\n" + chunks


RGB = Image.fromarray(np.full((40, 40, 3), (200, 30, 60), np.uint8))
JPEG = _encoded(RGB, "JPEG")
BAD_IMAGES = {
    "zero_bytes": (b"", "empty_file"),
    "html": (b"<html>no</html>", "not_an_image"),
    "random_bytes": (bytes(range(256)) * 4, "not_an_image"),
    "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
            "unsupported_format"),
    "dos_eps": (b"\xc5\xd0\xd3\xc6" + bytes(60), "unsupported_format"),
    "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "unsupported_format"),
    "svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported_format"),
    "ppm": (_encoded(RGB, "PPM"), "unsupported_format"),
    "ico": (_encoded(RGB, "ICO"), "unsupported_format"),
    "float_tiff": (_encoded(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"),
                   "unsupported_format"),
    "truncated_jpeg": (JPEG[: len(JPEG) // 2], "truncated_image"),
    "bomb_header": (_png_header(100_000, 100_000), "image_too_large"),
    "one_pixel_strip": (_encoded(Image.new("RGB", (100_000, 1)), "PNG"), "image_too_large"),
    "over_max_bytes": (b"\xff\xd8" + bytes(CONFIG.max_bytes), "file_too_large"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_each_bad_image_is_rejected_with_its_code(tmp_path, kind):
    data, code = BAD_IMAGES[kind]
    path = tmp_path / kind
    path.write_bytes(data)
    with pytest.raises(ImageRejected) as caught:
        load_image(str(path), CONFIG)
    assert caught.value.code == code, caught.value.reason
    reliability_tally.bad_input(f"image:{kind}")
    reliability_tally.balance(1, 0, 1)


def test_a_fifo_a_directory_and_a_missing_file_never_block(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # nobody writes to it: an open() without O_NONBLOCK waits
    (tmp_path / "folder").mkdir()
    codes = {}
    for name in ("fifo", "folder", "missing"):
        with pytest.raises(ImageRejected) as caught:
            load_image(str(tmp_path / name), CONFIG)
        codes[name] = caught.value.code
    assert codes == {"fifo": "not_a_file", "folder": "missing_image", "missing": "missing_image"}
    reliability_tally.bad_kinds([f"image:{name}" for name in codes])
    reliability_tally.balance(len(codes), 0, len(codes))


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white():
    ramp = np.tile(np.linspace(0, 65535, 40), (40, 1)).astype(np.uint16)
    data = _encoded(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    pixels = load_bytes(data)
    grey = pixels[..., 0].astype(float)
    assert (pixels[..., 0] == pixels[..., 2]).all()
    assert grey[:, 0].mean() < 40 and grey[:, -1].mean() > 215  # dark left, bright right
    assert 100 < grey.mean() < 155


def load_bytes(data: bytes) -> np.ndarray:
    from csmn.core.image_features import decode_image

    return decode_image(data, CONFIG)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_decode(fmt):
    pixels = load_bytes(_encoded(RGB.convert("P") if fmt == "GIF" else RGB, fmt))
    assert pixels.shape == (32, 32, 3) and abs(int(pixels[..., 0].mean()) - 200) < 20


def test_the_device_decoder_rejects_each_with_the_same_code():
    """The GPU actors' decode path (here on the CPU: the same torchvision code) gives every
    hostile file decode_image's reject code, all of them in one batch with a good JPEG that
    stays good."""
    from csmn.core.image_features import decode_images_on_device

    kinds = sorted(BAD_IMAGES)
    out = decode_images_on_device([JPEG] + [BAD_IMAGES[k][0] for k in kinds], CONFIG, "cpu")
    assert out.errors[0] == "" and out.on_device[0]
    assert abs(int(out.pixels[0, ..., 0].float().mean()) - 200) < 20
    got = {kind: error.split(":")[0] for kind, error in zip(kinds, out.errors[1:], strict=True)}
    assert got == {kind: BAD_IMAGES[kind][1] for kind in kinds}
    assert not any(out.on_device[1:]) and not out.pixels[1:].any()
    reliability_tally.balance(len(kinds) + 1, 1, len(kinds))
