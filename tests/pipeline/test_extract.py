"""The Ray Data extraction job end to end on a real local Ray and a real S3 (moto server).

Random-weight (seeded) ResNet-101 and 64/56 crops (res5c 2 x 2) keep each run to seconds.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import helpers
import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision
from PIL import Image

from csmn.core.image_features import (
    FEATURE_DIM,
    FeatureExtractor,
    build_resnet101_trunk,
    load_image,
)
from csmn.data import layout, storage
from csmn.data.rejects import read_rejects
from csmn.data.schemas import validate
from csmn.pipeline.extract import ExtractConfig, main, read_features, run_extract

TINY = {"resize_size": 64, "crop_size": 56, "batch_size": 4, "decode_batch_size": 4}


def _jpeg(seed: int, width: int = 90, height: int = 70) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(
        buffer, format="JPEG"
    )
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's header: a PNG claiming width x height pixels, a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _write_archive(root: str, good: int, bad: bool = True) -> tuple[list[str], dict[str, str]]:
    """Images and a minimal examples/ (user_id, post_id, image) under ``root``; each image is
    referenced by two tasks/splits so the job must deduplicate. Returns the good image URIs
    and the bad ones by the reject code they must get."""
    good_uris = []
    for i in range(good):
        uri = storage.join(root, "images", f"good-{i}.jpg")
        storage.write_bytes(uri, _jpeg(i, width=80 + 9 * i))
        good_uris.append(uri)
    bad_uris: dict[str, str] = {}
    if bad:
        jpeg = _jpeg(99)
        contents = {
            "empty_file": b"",
            "not_an_image": b"just some text",
            "truncated_image": jpeg[: len(jpeg) // 2],
            "image_too_large": _png_header_only(30_000, 30_000),
        }
        for code, data in contents.items():
            uri = storage.join(root, "images", f"{code}.jpg")
            storage.write_bytes(uri, data)
            bad_uris[uri] = code
        bad_uris[storage.join(root, "images", "never-uploaded.jpg")] = "missing_image"
    images = good_uris + list(bad_uris)
    for task, split in (("post", "train"), ("hashtag", "test_by_posts")):
        table = pa.table(
            {
                "user_id": [f"u{i % 3}" for i in range(len(images))],
                "post_id": [f"{task}-{i}" for i in range(len(images))],
                "image": images,
            }
        )
        storage.write_parquet(storage.join(root, "examples", task, split, "part-0.parquet"), table)
    helpers.finish_root(root, layers=())
    return good_uris, bad_uris


def _config(root: str, **overrides) -> ExtractConfig:
    values = {"data": root, "weights": "random", "seed": 5, **TINY, **overrides}
    return ExtractConfig(**values)


def test_job_writes_features_rejects_and_resumes(ray_session, tmp_path, capsys) -> None:
    root = str(tmp_path / "data")
    good, bad = _write_archive(root, good=5)

    summary = run_extract(_config(root, layer="both", rows_per_part=2))
    assert summary["example_rows"] == 2 * (len(good) + len(bad))
    assert summary["images"] == len(good) + len(bad)
    assert summary["written"] == len(good) and summary["rejected"] == len(bad)
    assert summary["rejects_by_code"] == {code: 1 for code in bad.values()}
    assert summary["balanced"] and summary["random_weights"]

    # keys and shapes, per the contract
    images, pool5 = read_features(root, "pool5")
    res_images, res5c = read_features(root, "res5c")
    assert sorted(images) == sorted(good) == sorted(res_images)
    assert pool5.shape == (len(good), FEATURE_DIM) and res5c.shape == (len(good), 4, FEATURE_DIM)
    table = validate(storage.read_parquet(layout.features_dir(root, "pool5")), "features_pool5")
    assert table.schema.field("feature").type == pa.list_(pa.float32(), 2048)
    by_image = dict(zip(res_images, res5c, strict=True))
    for image, vector in zip(images, pool5, strict=True):
        np.testing.assert_allclose(vector, by_image[image].mean(axis=0), rtol=1e-5, atol=1e-5)

    # the same model outside Ray gives the same features
    extractor = FeatureExtractor(build_resnet101_trunk(None, seed=5), ("pool5",), device="cpu")
    config = _config(root).preprocess()
    direct = extractor(np.stack([load_image(uri, config) for uri in images]))["pool5"]
    scale = np.abs(direct).max()
    np.testing.assert_allclose(pool5 / scale, direct / scale, atol=1e-4)

    # every bad image is one reject row with its reason code and image key
    rejects = read_rejects(root, "extract_features")
    assert {row["record_id"]: row["reason"].split(":")[0] for row in rejects} == bad
    assert all(row["stage"] == "extract_features" for row in rejects)

    # random weights are flagged loudly
    for layer, slots in (("pool5", 1), ("res5c", 4)):
        meta = storage.read_json(layout.features_meta_uri(root, layer))
        assert meta["random_weights"] is True and "RANDOM WEIGHTS" in meta["WARNING"]
        assert meta["weights"]["fingerprint"] == "random:seed=5"
        assert meta["slots"] == slots and meta["status"] == "complete"
        assert meta["preprocess"]["crop_size"] == 56

    # a kill: one part lost, a layer's part missing, a half-written temporary left behind
    pool5_parts = storage.list_files(layout.features_dir(root, "pool5"), suffix=".parquet")
    res5c_parts = storage.list_files(layout.features_dir(root, "res5c"), suffix=".parquet")
    assert len(pool5_parts) == len(res5c_parts) >= 3
    lost = set(storage.read_parquet(pool5_parts[0]).column("image").to_pylist())
    storage.delete(pool5_parts[0])
    half_done = set(storage.read_parquet(res5c_parts[-1]).column("image").to_pylist())
    storage.delete(res5c_parts[-1])
    temp = os.path.join(layout.features_dir(root, "pool5"), ".part-x.parquet.1234.tmp")
    with open(temp, "wb") as stray:
        stray.write(b"PAR1 half a file")

    rerun = run_extract(_config(root, layer="both", rows_per_part=2))
    assert rerun["to_compute"] == rerun["written"] == len(lost | half_done)
    assert rerun["already_done"] == len(good) - len(lost | half_done)
    assert rerun["previously_rejected"] == len(bad) and rerun["rejected"] == 0
    assert rerun["balanced"]
    images_after, pool5_after = read_features(root, "pool5")
    res_after, res5c_after = read_features(root, "res5c")
    assert sorted(images_after) == sorted(good) == sorted(res_after)  # no duplicates either
    before = dict(zip(images, pool5, strict=True))
    for image, vector in zip(images_after, pool5_after, strict=True):
        np.testing.assert_allclose(vector, before[image], rtol=1e-5, atol=1e-4)
    assert len(read_rejects(root, "extract_features")) == len(bad)

    # nothing missing: nothing computed; the command prints the summary, random loudly
    capsys.readouterr()
    argv = ["--data", root, "--weights", "random", "--seed", "5"]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert f"{len(good) + len(bad)} = {len(good)} + {len(bad)} + 0 + 0" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["to_compute"] == 0 and last["images"] == len(good) + len(bad)

    # other weights never mix into the same folder, nor another precision
    with pytest.raises(ValueError, match="overwrite"):
        run_extract(_config(root, layer="pool5", seed=6))
    with pytest.raises(ValueError, match="computed in fp32, this run computes bf16"):
        run_extract(_config(root, layer="pool5", precision="bf16"))
    # --overwrite deletes nothing when the run cannot go on (GPU actors, no GPU here)
    from csmn.pipeline.extract import GpuUnavailable

    before = sorted(os.listdir(layout.features_dir(root, "pool5")))
    with pytest.raises(GpuUnavailable):
        run_extract(_config(root, layer="pool5", overwrite=True, device="cuda", gpu_wait_s=0))
    assert sorted(os.listdir(layout.features_dir(root, "pool5"))) == before

    # --overwrite recomputes everything, the images rejected before too (once each)
    again = run_extract(_config(root, layer="both", rows_per_part=2, overwrite=True))
    assert again["previously_rejected"] == 0 and again["already_done"] == 0
    assert again["written"] == len(good) and again["rejected"] == len(bad)
    assert len(read_rejects(root, "extract_features")) == len(bad)


def test_job_reads_images_from_s3_with_a_saved_state_dict(
    ray_session, s3_bucket, tmp_path
) -> None:
    root = f"{s3_bucket}/csmn"
    good, bad = _write_archive(root, good=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        resnet = torchvision.models.resnet101(weights=None)
    weights_path = tmp_path / "resnet101-test.pth"
    torch.save(resnet.state_dict(), weights_path)

    code = main(
        [
            "--data", root, "--layer", "res5c", "--weights", str(weights_path),
            "--resize-size", "64", "--crop-size", "56", "--batch-size", "2", "--actors", "1",
        ]
    )
    assert code == 0
    images, res5c = read_features(root, "res5c")
    assert sorted(images) == sorted(good) and res5c.shape == (3, 4, FEATURE_DIM)
    assert all(uri.startswith("s3://") for uri in images)
    rejects = read_rejects(root, "extract_features")
    assert {row["record_id"]: row["reason"].split(":")[0] for row in rejects} == bad
    meta = storage.read_json(layout.features_meta_uri(root, "res5c"))
    assert meta["random_weights"] is False and "WARNING" not in meta
    assert meta["weights"]["source"] == "state_dict"
    assert meta["weights"]["name"] == str(weights_path) and len(meta["weights"]["sha256"]) == 64
    assert meta["last_run"]["written"] == 3 and meta["last_run"]["rejected"] == len(bad)


def test_clear_errors_before_any_work(tmp_path, capsys) -> None:
    root = str(tmp_path / "data")
    _write_archive(root, good=1, bad=False)
    assert main(["--data", root, "--weights", str(tmp_path / "nowhere.pth")]) == 2
    err = capsys.readouterr().err
    assert "weights file not found" in err and "--weights random" in err
    assert main(["--data", root, "--layer", "fc7", "--weights", "random"]) == 2
    assert "layer must be" in capsys.readouterr().err
    assert not storage.exists(storage.join(root, "features"))


def test_device_cuda_waits_for_gpus_then_says_so(ray_session, tmp_path, capsys, caplog) -> None:
    """The test cluster has no GPU and never will: --device cuda waits --gpu-wait-s for one
    to join (an autoscaling cluster's GPU group starts from zero), then fails clearly,
    before any image is read, and gives back what it asked for."""
    import logging
    import time

    root = str(tmp_path / "data")
    _write_archive(root, good=1, bad=False)
    argv = ["--data", root, "--weights", "random", "--device", "cuda", "--gpu-wait-s", "1.5"]
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="csmn.pipeline.extract"):
        assert main(argv) == 2
    assert 1.5 <= time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "--device cuda" in err and "0 GPU(s) after 1.5 s" in err and "--gpu-wait-s" in err
    assert "waiting for 1 GPU(s)" in caplog.text
    assert not storage.exists(storage.join(root, "features"))
    # the placement group that asked for the GPU is gone, not left pending
    from ray.util import placement_group_table

    assert all(group["state"] == "REMOVED" for group in placement_group_table().values())
    with pytest.raises(ValueError, match="gpu_wait_s"):
        _config(root, gpu_wait_s=-1)


def test_device_auto_on_cpus_says_which_it_chose(ray_session, tmp_path, caplog) -> None:
    import logging

    from csmn.pipeline.extract import _cluster_plan

    with caplog.at_level(logging.INFO, logger="csmn.pipeline.extract"):
        use_gpu, actors, _, _ = _cluster_plan(_config(str(tmp_path)))
    assert (use_gpu, actors) == (False, 1)
    assert "--device auto: no GPU in the cluster now: model actors on CPUs" in caplog.text


def test_storage_settings_go_to_the_job_once_not_to_each_task() -> None:
    """What init_ray gives ray.init for the whole job: the store's location, never its
    credentials, and nothing that `ray job submit`'s own runtime env already sets (Ray
    refuses a ray.init env that repeats one of the job's variables)."""
    from csmn.pipeline.runtime import job_runtime_env

    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
               "AWS_SECRET_ACCESS_KEY": "secret", "AWS_ACCESS_KEY_ID": "key", "HOME": "/x"}
    assert job_runtime_env(environ) == {
        "env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}}
    submitted = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000"},
                                 "working_dir": "gcs://x.zip"}}
    environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(submitted)
    assert job_runtime_env(environ) == {"env_vars": {"AWS_DEFAULT_REGION": "eu-west-1"}}
    assert job_runtime_env({"HOME": "/x"}) is None
    # and no stage of the job carries a runtime env of its own any more
    source = open(os.path.join(os.path.dirname(__file__), "..", "..", "csmn", "pipeline",
                               "extract.py")).read()
    assert "runtime_env" not in source


def test_actors_decode_jpegs_on_their_device_and_the_rest_on_their_cpu(
    ray_session, tmp_path
) -> None:
    """--decode actor: the read tasks ship bytes, the model actor decodes the JPEGs with
    torchvision on its device (here a CPU: the same code that runs nvJPEG on a GPU) and the
    PNG with PIL; the bad images are the same rejects as with CPU decode tasks, and the
    features are those of the CPU decode within what one grey level of resize rounding
    moves them (tests/core/test_features.py)."""
    roots = {mode: str(tmp_path / mode) for mode in ("actor", "tasks")}
    summaries, features = {}, {}
    for mode, root in roots.items():
        good, bad = _write_archive(root, good=4)
        png = storage.join(root, "images", "good-png.png")
        buffer = io.BytesIO()
        Image.fromarray(np.full((60, 75, 3), (20, 140, 220), np.uint8)).save(buffer, "PNG")
        storage.write_bytes(png, buffer.getvalue())
        table = pa.table({"user_id": ["u9"], "post_id": ["png-0"], "image": [png]})
        storage.write_parquet(storage.join(root, "examples", "post", "train", "part-1.parquet"),
                              table)
        summaries[mode] = run_extract(_config(root, decode=mode, rows_per_part=3))
        features[mode] = dict(zip(*read_features(root, "pool5"), strict=True))
        assert summaries[mode]["written"] == len(good) + 1 and summaries[mode]["balanced"]
        assert summaries[mode]["rejects_by_code"] == {code: 1 for code in bad.values()}
        rejects = read_rejects(root, "extract_features")
        assert {row["record_id"]: row["reason"].split(":")[0] for row in rejects} == bad
    assert summaries["actor"]["decoded_on"] == {"pil": 1, "torchvision-cpu": 4}
    assert summaries["actor"]["decode"].startswith("actor (cpu")
    assert summaries["tasks"]["decoded_on"] == {"pil": 5}
    assert summaries["tasks"]["decode"] == "tasks (cpu)"
    relative = lambda path: path.split("/images/", 1)[1]  # noqa: E731
    actor = {relative(k): v for k, v in features["actor"].items()}
    tasks = {relative(k): v for k, v in features["tasks"].items()}
    assert sorted(actor) == sorted(tasks)
    for name, vector in tasks.items():
        scale = np.abs(vector).max()
        # measured: 0.5% of the largest value apart (seeded random weights, 56 crop)
        np.testing.assert_allclose(actor[name] / scale, vector / scale, atol=0.02)
        if name.endswith(".png"):  # the same decoder: the same features
            np.testing.assert_allclose(actor[name], vector, rtol=1e-5, atol=1e-5)


def test_two_extractions_of_one_archive_write_the_same_parts(ray_session, tmp_path) -> None:
    """The same images in the same parts, read back in input order, whatever order the
    decode tasks finish in and wherever the data root lies: training's epoch order starts
    from the parts' order, so a seed gives one model however often and wherever the features
    are extracted. (Parts named by a digest of their absolute image paths sorted differently
    per root: the demo's hashtag F1 split by users was 0.146 and 0.178 in two folders, one
    commit. Without ``preserve_order`` the slow images below move their neighbours into other
    parts.)"""
    runs = []
    for name in ("first", "second"):
        root = str(tmp_path / name)
        good, _ = _write_archive(root, good=24, bad=False)
        # small decode tasks, several at once, two images slow to decode: tasks finish out
        # of order
        for slow in (good[1], good[6], good[13]):
            storage.write_bytes(slow, _jpeg(0, width=2400, height=2400))
        run_extract(_config(root, layer="pool5", decode_batch_size=1, decode_cpus=0.25,
                            batch_size=3, rows_per_part=5))
        parts = sorted(storage.list_files(layout.features_dir(root, "pool5"), ".parquet"))
        relative = [[uri.split("/images/", 1)[1]
                     for uri in storage.read_parquet(part).column("image").to_pylist()]
                    for part in parts]
        read_back = [uri.split("/images/", 1)[1] for uri in read_features(root, "pool5")[0]]
        assert read_back == [image for part in relative for image in part]
        runs.append(relative)
    assert runs[0] == runs[1]
    images = [image for part in runs[0] for image in part]
    assert len(runs[0]) >= 3 and sorted(images) == images and len(images) == 24
