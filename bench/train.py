"""Ray Train throughput: training examples/s with 1 and 2 data-parallel CPU workers, and the
scaling ratio. Not a test: it prints figures (JSON on the last line).

The data root is generated here in the contract format (examples, pool5 features, vocab),
so nothing but this repository is needed. The model is small (embed 64, memory 128, CNN depth
32, V = 1,000, D = 60), so the figure shows the data-parallel machinery (Ray Data ingest,
DDP all-reduce, per-step token all-reduce) more than the model's FLOPs; bench/model.py
measures the model at paper size.

    python bench/train.py                     # about 3-4 minutes on 2 cores
    python bench/train.py --examples 1000 --epochs 2

Each worker reserves one CPU (torch then uses one thread per worker), so 2 workers use both
cores of a 2-core machine: the ratio is examples/s(2) / examples/s(1), ideally 2. The first
epoch (process-group and iterator warm-up) is left out of the average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import matmul_peak  # noqa: E402

MODEL = {"embed_dim": 64, "memory_dim": 128, "cnn_depth": 32}
VOCAB_SIZE = 1000
CONTEXT = 60


def write_data_root(root: Path, examples: int, seed: int = 0) -> None:
    """Examples, pool5 features and vocab where the stages put them (csmn.data.layout), the
    features marked complete and the manifest written last: training refuses a root without
    them (csmn.data.completeness)."""
    from csmn.core.tokens import SPECIAL_TOKENS
    from csmn.data import layout, schemas, storage

    rng = np.random.default_rng(seed)
    tokens = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS)))]
    eos, first_word = tokens.index("_EOS"), len(SPECIAL_TOKENS)
    storage.write_json(layout.vocab_uri(str(root), "post"), {"tokens": tokens})
    splits = {"train": examples, "val": max(64, examples // 10)}
    images, features = [], []
    for split, count in splits.items():
        rows = []
        for n in range(count):
            length = int(rng.integers(3, 16))
            image = f"file:///bench/{split}/{n}.jpg"
            context = rng.integers(first_word, VOCAB_SIZE, CONTEXT)
            rows.append({"image": image,
                         "token_ids": [*rng.integers(first_word, VOCAB_SIZE, length - 1).tolist(),
                                       eos],
                         "context_ids": context.tolist(),
                         "context_words": [tokens[i] for i in context],
                         "user_id": f"u{n % 50}", "post_id": f"{split}-{n}", "text": ""})
            images.append(image)
            features.append(rng.random(2048, dtype=np.float32))
        storage.write_parquet(
            storage.join(layout.examples_dir(str(root), "post", split), "part-00000.parquet"),
            schemas.conform(rows, "example"))
    storage.write_parquet(
        storage.join(layout.features_dir(str(root), "pool5"), "part-00000.parquet"),
        schemas.conform({"image": images, "feature": [f.tolist() for f in features]},
                        "features_pool5"))
    storage.write_json(layout.features_meta_uri(str(root), "pool5"), {
        "layer": "pool5", "status": "complete", "random_weights": True,
        "weights": {"name": "random", "fingerprint": "bench-train"}})
    layout.write_manifest(str(root), {"version": 1, "root": str(root)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=100)
    args = parser.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from csmn.pipeline.train import TrainConfig, train

    workdir = Path(tempfile.mkdtemp(prefix="csmn-bench-train-"))
    root = workdir / "root"
    write_data_root(root, args.examples)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, object_store_memory=500 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    figures: dict[str, object] = {"cpus": cpus, "examples": args.examples,
                                  "global_batch": args.global_batch, "model": MODEL,
                                  "vocab_size": VOCAB_SIZE, "context_size": CONTEXT,
                                  "matmul_gflops_1_thread": None}
    for workers in (1, 2):
        config = TrainConfig(
            data=str(root), task="post", variant="P5", context_size=CONTEXT,
            workers=workers, cpus_per_worker=1.0, epochs=args.epochs,
            batch_size=args.global_batch // workers, model=dict(MODEL),
            val_sample_size=64, run_name=f"bench-{workers}-workers", max_failures=0)
        started = time.perf_counter()
        summary = train(config)
        wall = time.perf_counter() - started
        history = MlflowClient().get_metric_history(summary.mlflow_run_id, "examples_per_s")
        steady = [m.value for m in sorted(history, key=lambda m: m.step)][1:] or [
            m.value for m in history]
        figures[f"examples_per_s_{workers}_workers"] = round(float(np.mean(steady)), 1)
        figures[f"per_epoch_{workers}_workers"] = [round(m.value, 1) for m in history]
        figures[f"wall_s_{workers}_workers"] = round(wall, 1)
    figures["scaling_ratio"] = round(
        figures["examples_per_s_2_workers"] / figures["examples_per_s_1_workers"], 2)
    import torch

    torch.set_num_threads(1)
    figures["matmul_gflops_1_thread"] = round(matmul_peak(torch.device("cpu")) / 1e9, 1)
    ray.shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
