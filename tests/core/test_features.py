"""csmn.core.image_features without Ray: preprocessing, rejects, weights, layer wiring, determinism.

The real torchvision ResNet-101 architecture with a seeded random initialisation (built once
for the module) and tiny crops keep this fast on two shared cores.
"""

from __future__ import annotations

import argparse
import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from csmn.core.image_features import (
    FEATURE_DIM,
    FeatureExtractor,
    ImageRejected,
    PreprocessConfig,
    WeightsUnavailable,
    build_resnet101_trunk,
    decode_image,
    decode_images_on_device,
    exif_orient,
    load_image,
    load_state_dict,
    load_trunk,
    res5c_slots,
)

TINY = PreprocessConfig(resize_size=64, crop_size=56)
SEED = 7


@pytest.fixture(scope="module")
def trunk() -> torch.nn.Module:
    torch.set_num_threads(2)
    return build_resnet101_trunk(None, seed=SEED)


@pytest.fixture(scope="module")
def reference_resnet() -> torch.nn.Module:
    """The whole torchvision classifier with the trunk's weights (same seed), fc removed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        resnet = torchvision.models.resnet101(weights=None, zero_init_residual=True)
    resnet.fc = torch.nn.Identity()
    return resnet.eval()


@pytest.fixture(scope="module")
def extractor(trunk: torch.nn.Module) -> FeatureExtractor:
    return FeatureExtractor(trunk, layers=("pool5", "res5c"), device="cpu")


def _image_bytes(width: int, height: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data: a decompression
    bomb's header, a few dozen bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


# --- preprocessing -------------------------------------------------------------------------


def test_default_preprocessing_is_the_weights_transform() -> None:
    config = PreprocessConfig.for_weights("imagenet")
    transform = torchvision.models.ResNet101_Weights.IMAGENET1K_V1.transforms()
    assert (config.resize_size, config.crop_size) == (256, 224) == (
        transform.resize_size[0], transform.crop_size[0]
    )
    assert config.mean == tuple(transform.mean) and config.std == tuple(transform.std)
    assert config.grid == 7
    assert PreprocessConfig.for_weights("random", resize_size=64, crop_size=56).grid == 2
    # V2's own transform (resize 232), however the name is spelled (as the weights load it)
    for spelling in ("imagenet-v2", "Imagenet-V2", " IMAGENET-v2 "):
        assert PreprocessConfig.for_weights(spelling).resize_size == 232 == (
            torchvision.models.ResNet101_Weights.IMAGENET1K_V2.transforms().resize_size[0])
    with pytest.raises(ValueError, match="resize_size"):
        PreprocessConfig(resize_size=50, crop_size=56)


@pytest.mark.parametrize("size", [(300, 200), (123, 457), (257, 256)])
def test_resize_and_crop_match_torchvision(size: tuple[int, int]) -> None:
    data = _image_bytes(*size, fmt="PNG", seed=size[0])
    ours = decode_image(data, PreprocessConfig())
    reference = torchvision.transforms.Compose(
        [torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224)]
    )(Image.open(io.BytesIO(data)).convert("RGB"))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.asarray(reference))


def test_grayscale_and_rgba_become_rgb() -> None:
    for mode in ("L", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (70, 90)).save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), TINY).shape == (56, 56, 3)


def test_each_kind_of_bad_image_is_rejected_with_its_code(tmp_path) -> None:
    jpeg = _image_bytes(120, 100)
    cases = {
        "empty_file": (b"", TINY),
        "not_an_image": (b"<html>not an image</html>", TINY),
        "truncated_image": (jpeg[: len(jpeg) // 2], TINY),
        "image_too_large": (_png_header_only(30_000, 30_000), TINY),
        "file_too_large": (jpeg, PreprocessConfig(64, 56, max_bytes=100)),
    }
    for code, (data, config) in cases.items():
        with pytest.raises(ImageRejected) as caught:
            decode_image(data, config)
        assert caught.value.code == code, (code, caught.value)
        assert caught.value.reason.startswith(f"{code}: ")
    # a strip that would resize to billions of pixels
    with pytest.raises(ImageRejected, match="image_too_large: aspect ratio"):
        decode_image(_image_bytes(4000, 1, fmt="PNG"), PreprocessConfig(64, 56, max_pixels=10**5))
    # a file that is not there
    with pytest.raises(ImageRejected) as caught:
        load_image(str(tmp_path / "nowhere.jpg"), TINY)
    assert caught.value.code == "missing_image"
    path = tmp_path / "ok.jpg"
    path.write_bytes(jpeg)
    assert load_image(str(path), TINY).shape == (56, 56, 3)


# --- decoding on the model's device (run here with device="cpu") ----------------------------


def _photo(width: int, height: int, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """A smooth image with edges (gradients and a bright square), closer to a photo than
    noise, as JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                       ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top:top + height // 3, left:left + width // 3] = (250, 240, 10)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def test_device_decode_matches_the_cpu_decode() -> None:
    """The same crops as decode_image, to a grey level or two. Why that tolerance: on the CPU
    torchvision's decode_jpeg and PIL both run libjpeg-turbo with the same settings, so the
    decoded pixels are equal (the images below that need no resize come out identical);
    what differs is the resize: PIL's antialiased bilinear and torch's uint8 kernel
    (interpolate, antialias=True, the one torchvision's resize uses) apply the same
    triangle filter in fixed point with their own weights' precision and rounding, in two
    passes (rows, columns), so a value can land one level off (measured: 0.3-3% of values
    at 640x480 -> 256, 120x80 -> 64), rarely two where both passes round apart (one value
    in 10^4 at 120x80). On a GPU torch resizes in float32 and nvJPEG has
    its own IDCT and chroma upsampling: a few levels more, measured by
    ``bench/features.py --decode-compare --device cuda``."""
    config = PreprocessConfig()
    sizes = [(640, 480), (480, 640), (1000, 750), (300, 300), (257, 256), (256, 400),
             (2000, 1500), (256, 256)]
    contents = [_photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    contents.append(_photo(400, 300, seed=9, mode="L"))  # grey JPEGs come out as RGB
    contents.append(_image_bytes(400, 300, seed=3))  # noise: the resize's worst case
    out = decode_images_on_device(contents, config, "cpu")
    assert out.errors == [""] * len(contents) and all(out.on_device)
    assert out.pixels.shape == (len(contents), 224, 224, 3) and out.pixels.dtype == torch.uint8
    for i, data in enumerate(contents):
        reference = decode_image(data, config).astype(np.int16)
        diff = np.abs(out.pixels[i].numpy().astype(np.int16) - reference)
        assert diff.max() <= 2 and diff.mean() < 0.05, (i, diff.max(), diff.mean())
        assert (diff > 1).mean() < 1e-3
    for index in (4, 7):  # short side already 256, long side unchanged: no resize at all
        np.testing.assert_array_equal(out.pixels[index].numpy(),
                                      decode_image(contents[index], config))
    # chunks of a few images give the same pixels
    chunked = decode_images_on_device(contents, config, "cpu", max_pixels_at_once=600_000)
    assert torch.equal(chunked.pixels, out.pixels)


def test_device_decode_leaves_draft_decoding_to_libjpeg() -> None:
    """With --jpeg-draft a JPEG at least twice the resize target is decoded by PIL at a
    reduced scale, as the CPU tasks decode it (the device decoder has no draft mode); a
    smaller one is decoded on the device (draft changes nothing there)."""
    config = PreprocessConfig(jpeg_draft=True)
    large, small = _photo(2000, 1500, seed=1), _photo(400, 300, seed=2)
    out = decode_images_on_device([large, small], config, "cpu")
    assert out.errors == ["", ""] and out.on_device == [False, True]
    np.testing.assert_array_equal(out.pixels[0].numpy(), decode_image(large, config))
    full = decode_images_on_device([large], PreprocessConfig(), "cpu")
    assert full.on_device == [True] and not torch.equal(full.pixels[0], out.pixels[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decode_turns_exif_orientations_upright(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _photo(120, 80, seed=orientation, exif=exif.tobytes())
    out = decode_images_on_device([data], TINY, "cpu")
    assert out.errors == [""] and out.on_device == [True]
    diff = np.abs(out.pixels[0].numpy().astype(int) - decode_image(data, TINY).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05 and (diff > 1).mean() < 1e-3
    # each of the eight as PIL's transpose of the same array (exact, no resize involved)
    pixels = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3) * 5
    expected = np.asarray(ImageOps.exif_transpose(_with_orientation(pixels, orientation)))
    got = exif_orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0)
    np.testing.assert_array_equal(got.numpy(), expected)


def _with_orientation(pixels: np.ndarray, orientation: int) -> Image.Image:
    image = Image.fromarray(pixels)
    image.getexif()[0x0112] = orientation
    return image


def test_device_decode_falls_back_to_the_cpu_and_rejects_like_it() -> None:
    """PNGs, CMYK JPEGs and JPEGs with bytes after their end go through decode_image (and
    come out exactly as it makes them); each bad image gets decode_image's reject code; the
    good images of the same batch are unharmed."""
    jpeg = _photo(120, 100)
    buffer = io.BytesIO()
    Image.new("CMYK", (90, 70), (10, 200, 30, 5)).save(buffer, format="JPEG")
    good_fallback = [_image_bytes(90, 70, fmt="PNG"), buffer.getvalue(), jpeg + b"trailing"]
    bad = {
        "empty_file": b"",
        "not_an_image": b"<html>not an image</html>",
        "truncated_image": jpeg[: len(jpeg) // 2],
        "image_too_large": _png_header_only(30_000, 30_000),
    }
    # a JPEG header claiming more pixels than allowed is refused before any decode
    huge = PreprocessConfig(64, 56, max_pixels=100 * 100)
    too_many = decode_images_on_device([_photo(120, 100)], huge, "cpu")
    assert too_many.errors[0].startswith("image_too_large: ") and not too_many.on_device[0]
    # a JPEG whose scan is garbage between an intact header and its end marker
    scrambled = jpeg[:600] + bytes(range(256)) * 8 + jpeg[-2:]
    contents = [jpeg, *good_fallback, *bad.values(), scrambled, jpeg]
    out = decode_images_on_device(contents, TINY, "cpu")
    assert out.on_device[0] and out.on_device[-1] and out.errors[0] == out.errors[-1] == ""
    for i in range(1, 1 + len(good_fallback)):
        assert out.errors[i] == "" and not out.on_device[i]
        np.testing.assert_array_equal(out.pixels[i].numpy(), decode_image(contents[i], TINY))
    for offset, code in enumerate(bad):
        i = 1 + len(good_fallback) + offset
        assert out.errors[i].startswith(f"{code}: ") and not out.on_device[i], out.errors[i]
        assert not out.pixels[i].any()
    # torchvision refuses the scrambled one too, and decode_image names why
    with pytest.raises(ImageRejected) as caught:
        decode_image(scrambled, TINY)
    assert out.errors[-2].startswith(f"{caught.value.code}: ") and not out.on_device[-2]
    assert decode_images_on_device([], TINY, "cpu").pixels.shape == (0, 56, 56, 3)


# --- model -----------------------------------------------------------------------------------


def _crops(count: int, config: PreprocessConfig = TINY) -> np.ndarray:
    return np.stack(
        [decode_image(_image_bytes(90 + 11 * i, 80, seed=i), config) for i in range(count)]
    )


def test_shapes_and_keys(extractor: FeatureExtractor, trunk: torch.nn.Module) -> None:
    out = extractor(_crops(3))
    assert set(out) == {"pool5", "res5c"}
    assert out["pool5"].shape == (3, FEATURE_DIM) and out["pool5"].dtype == np.float32
    assert out["res5c"].shape == (3, 4 * FEATURE_DIM) and out["res5c"].dtype == np.float32
    assert res5c_slots(out["res5c"]).shape == (3, 4, FEATURE_DIM)
    # the paper's size: a 224 crop gives 7 x 7 = 49 res5c slots
    full = FeatureExtractor(trunk, ("res5c",), device="cpu")(_crops(1, PreprocessConfig()))
    assert set(full) == {"res5c"} and full["res5c"].shape == (1, 49 * FEATURE_DIM)
    empty = np.zeros((0, 56, 56, 3), np.uint8)
    assert FeatureExtractor(trunk, ("pool5",), device="cpu")(empty)["pool5"].shape == (0, 2048)
    with pytest.raises(ValueError):
        FeatureExtractor(trunk, ("fc7",))


def test_pool5_is_torchvisions_avgpool_and_the_mean_of_res5c(
    extractor: FeatureExtractor, reference_resnet: torch.nn.Module
) -> None:
    crops = _crops(2)
    out = extractor(crops)
    slots = res5c_slots(out["res5c"])
    np.testing.assert_allclose(out["pool5"], slots.mean(axis=1), rtol=1e-5, atol=1e-5)
    # slot-major layout: slot j = y * grid + x of the feature map
    maps = extractor.res5c_maps(crops).numpy()  # [B, 2048, 2, 2]
    np.testing.assert_array_equal(slots[:, 1], maps[:, :, 0, 1])
    np.testing.assert_array_equal(slots[:, 2], maps[:, :, 1, 0])
    # the whole torchvision classifier fed torchvision's own ToTensor + Normalize: its
    # avgpool output is our pool5
    normalize = torchvision.transforms.Normalize(PreprocessConfig.mean, PreprocessConfig.std)
    x = torch.stack([normalize(torchvision.transforms.functional.to_tensor(c)) for c in crops])
    with torch.inference_mode():
        reference = reference_resnet(x).numpy()
    scale = np.abs(reference).max()
    np.testing.assert_allclose(out["pool5"] / scale, reference / scale, atol=1e-4)


def test_features_are_deterministic(extractor: FeatureExtractor) -> None:
    crops = _crops(3)
    first, second = extractor(crops), extractor(crops)
    for layer in ("pool5", "res5c"):
        np.testing.assert_array_equal(first[layer], second[layer])
    alone = extractor(crops[1:2])["pool5"][0]
    scale = np.abs(first["pool5"][1]).max()
    np.testing.assert_allclose(alone / scale, first["pool5"][1] / scale, atol=1e-4)
    # same seed, same random weights: what lets a rerun with --weights random resume
    other = FeatureExtractor(build_resnet101_trunk(None, seed=SEED), ("pool5",), device="cpu")
    np.testing.assert_array_equal(other(crops)["pool5"], first["pool5"])


# --- weights ---------------------------------------------------------------------------------


def test_weights_from_a_saved_state_dict_load_with_weights_only(
    tmp_path, extractor: FeatureExtractor, reference_resnet: torch.nn.Module
) -> None:
    path = tmp_path / "resnet101.pth"
    torch.save(reference_resnet.state_dict(), path)  # no fc.* keys: those are optional
    trunk, info = load_trunk(str(path))
    assert info.source == "state_dict" and not info.random and len(info.sha256) == 64
    assert info.fingerprint == f"state_dict:{info.sha256}"
    crops = _crops(2)
    loaded = FeatureExtractor(trunk, ("pool5",), device="cpu")(crops)["pool5"]
    np.testing.assert_array_equal(loaded, extractor(crops)["pool5"])


def test_bad_weights_files_give_clear_errors(tmp_path) -> None:
    with pytest.raises(WeightsUnavailable, match="not found"):
        load_state_dict(str(tmp_path / "missing.pth"))
    pickled = tmp_path / "pickled.pth"
    torch.save(argparse.Namespace(weights=1), pickled)  # arbitrary pickle: refused
    with pytest.raises(WeightsUnavailable, match="weights_only=True"):
        load_state_dict(str(pickled))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        load_trunk(str(wrong))


def test_imagenet_weights_unreachable_says_what_to_do(tmp_path, monkeypatch) -> None:
    # An empty hub cache and a proxy on a closed port: the download fails as it does
    # on a machine without internet, at once.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailable) as caught:
        load_state_dict("imagenet")
    message = str(caught.value)
    assert "IMAGENET1K_V1" in message and "--weights" in message and "random" in message
    assert "resnet101-63fe2227.pth" in message


def test_random_weights_are_flagged() -> None:
    _, info = load_trunk("random", seed=3)
    assert info.random and info.fingerprint == "random:seed=3"
    assert "RANDOM WEIGHTS" in info.warning
    assert info.to_dict()["random"] is True
