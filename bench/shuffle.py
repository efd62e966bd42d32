"""How the training data is mixed each epoch: cost and mixing of the per-epoch shuffles.

Rows are laid out as the joined train split is (csmn.pipeline.train_data): one user's posts
after another, each with a pool5 feature (2048 float32, 8 KiB), in blocks of ``--block-rows``.
For each way of mixing, one epoch is iterated as a training worker does (batches of
``--batch-size`` through ``iter_batches``), at each size:

- ``none``: the blocks in file order, no buffer (the unmixed reference);
- ``blocks+buffer``: ``randomize_block_order`` each epoch and a local shuffle buffer of
  ``--buffer`` rows (what csmn trains with: it moves block references, not rows);
- ``random_shuffle``: a full ``random_shuffle`` each epoch (every row through the object
  store, an all-to-all exchange).

Printed per size and way: seconds per epoch, the ratio to ``none``, and the distinct users
per batch (mean, and the worst batch).

    python bench/shuffle.py [--sizes 20000,80000] [--posts-per-user 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csmn.pipeline.train_data import batch_options, shuffled_each_epoch  # noqa: E402

FEATURE_DIM = 2048


def build(rows: int, posts_per_user: int, block_rows: int):
    import pyarrow as pa
    import ray

    users = np.arange(rows) // posts_per_user
    # One shared feature row: the bytes move as real ones do, without a 2048 x rows draw.
    feature = np.random.default_rng(0).standard_normal(FEATURE_DIM).astype(np.float32)
    tables = []
    for start in range(0, rows, block_rows):
        n = min(block_rows, rows - start)
        tables.append(pa.table({
            "user": pa.array(users[start:start + n], type=pa.int32()),
            "feature": pa.FixedSizeListArray.from_arrays(
                pa.array(np.tile(feature, n)), FEATURE_DIM),
        }))
    return ray.data.from_arrow(tables).materialize()


def epoch(dataset, batch_size: int, **options) -> tuple[float, list[int]]:
    started = time.perf_counter()
    distinct = [len(np.unique(b["user"])) for b in dataset.iter_batches(
        batch_size=batch_size, batch_format="numpy", **options)]
    return time.perf_counter() - started, distinct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000,80000")
    parser.add_argument("--posts-per-user", type=int, default=200)
    parser.add_argument("--block-rows", type=int, default=64)
    parser.add_argument("--buffer", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per way (mean)")
    args = parser.parse_args(argv)

    from csmn.pipeline.runtime import init_ray

    init_ray()
    print(f"{'rows':>7} {'way':>15} {'s/epoch':>8} {'x none':>7} {'users/batch':>12} "
          f"{'worst':>6}")
    for rows in (int(s) for s in args.sizes.split(",")):
        dataset = build(rows, args.posts_per_user, args.block_rows)
        # As training does: one dataset whose block order is drawn again at every pass.
        reordered = shuffled_each_epoch(dataset, seed=0)
        ways = {
            "none": lambda e, d=dataset: (d, {}),
            "blocks+buffer": lambda e, d=reordered: (d, batch_options(args.buffer, 0, e, 0)),
            "random_shuffle": lambda e, d=dataset: (d.random_shuffle(seed=e), {}),
        }
        base = None
        for name, make in ways.items():
            seconds, users = [], []
            for e in range(1, args.epochs + 1):
                ds, options = make(e)
                took, distinct = epoch(ds, args.batch_size, **options)
                seconds.append(took)
                users += distinct
            mean = sum(seconds) / len(seconds)
            base = base or mean
            print(f"{rows:>7} {name:>15} {mean:>8.2f} {mean / base:>7.1f} "
                  f"{np.mean(users):>12.1f} {min(users):>6}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
