"""An extraction actor killed by ``ray.kill`` in the middle of a run: Ray Data restarts it and
runs its batch again, and every image ends with exactly one feature row (none lost, none
twice). (Generation's decoding actors and Ray Train's workers are killed in
tests/pipeline/test_generate.py and test_train.py.)"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter

import helpers
import numpy as np
import pyarrow as pa
import reliability_tally
from PIL import Image

from csmn.data import layout, storage
from csmn.data.rejects import read_rejects
from csmn.pipeline.extract import ExtractConfig, run_extract

IMAGES = 24


def _root(root: str) -> tuple[list[str], list[str]]:
    good, bad = [], []
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
        uri = storage.join(root, "images", f"{i}.jpg")
        storage.write_bytes(uri, buffer.getvalue())
        good.append(uri)
    for name, data in (("empty", b""), ("text", b"not an image")):
        uri = storage.join(root, "images", f"{name}.jpg")
        storage.write_bytes(uri, data)
        bad.append(uri)
    images = good + bad
    table = pa.table({"user_id": [f"u{i % 4}" for i in range(len(images))],
                      "post_id": [f"p{i}" for i in range(len(images))], "image": images})
    storage.write_parquet(storage.join(layout.examples_dir(root, "hashtag", "train"),
                                       "part-0.parquet"), table)
    helpers.finish_root(root, layers=())
    return good, bad


def _live_actors(udf: str) -> list:
    """Live Ray Data pool actors running ``udf`` (unnamed: found in the GCS actor table)."""
    import ray

    worker = ray._private.worker.global_worker.core_worker
    return [worker.get_actor_handle(ray.ActorID.from_hex(actor_id))
            for actor_id, info in ray._private.state.actors().items()
            if udf in info.get("ActorClassName", "") and info["State"] == "ALIVE"]


def test_a_killed_extraction_actor_loses_and_duplicates_nothing(ray_session, tmp_path):
    import ray

    root = str(tmp_path / "root")
    good, bad = _root(root)
    parts = layout.features_dir(root, "pool5")
    killed: list[float] = []

    def kill_once_the_first_part_is_written() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            actors = _live_actors("FeatureActor")
            if actors and storage.list_files(parts, suffix=".parquet"):
                ray.kill(actors[0], no_restart=False)  # as a lost node would: restartable
                killed.append(time.time())
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_once_the_first_part_is_written, daemon=True)
    killer.start()
    summary = run_extract(ExtractConfig(
        data=root, weights="random", seed=1, resize_size=64, crop_size=56, batch_size=2,
        decode_batch_size=2, rows_per_part=2, actors=1))
    killer.join()
    assert killed, "no extraction actor was alive to kill"
    written = storage.list_files(parts, suffix=".parquet")
    after_kill = [p for p in written if _mtime(p) > killed[0]]
    assert after_kill, "the run had finished before the kill"

    images = Counter(storage.read_parquet(parts).column("image").to_pylist())
    assert set(images) == set(good) and max(images.values()) == 1  # once each
    rejected = Counter(r["record_id"] for r in read_rejects(root, "extract_features"))
    assert set(rejected) == set(bad) and max(rejected.values()) == 1
    assert summary["balanced"] and summary["written"] == len(good)
    assert summary["rejected"] == len(bad)
    reliability_tally.fault("extraction_actor_killed")
    lost = reliability_tally.balance(len(good) + len(bad), len(images), len(rejected))
    assert lost == 0


def _mtime(uri: str) -> float:
    import os

    return os.path.getmtime(storage.resolve(uri)[1])
