"""Throughput and memory of ``csmn synth`` at two archive sizes. Not a test: it prints figures.

Each size runs in a fresh process so that its peak RSS is its own; a flat memory profile
shows as the same peak at both sizes (one shard and a bounded image queue in memory).

    python bench/synth.py                    # ~2K and ~20K posts, 64x64 images, local disk
    python bench/synth.py --big              # adds ~200K posts
    python bench/synth.py --sizes 1100000    # the paper's scale (1.1M posts)
    python bench/synth.py --write-images false
    python bench/synth.py --sizes 40000 --write-images false --reference   # + reference F1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def users_for(posts: int, config) -> int:
    """Users needed for about ``posts`` posts, from the mean post count of sampled users."""
    from csmn.synth import make_user

    sample = [make_user(replace(config, seed=config.seed + 1), i).n_posts for i in range(400)]
    return max(1, math.ceil(posts / (sum(sample) / len(sample))))


def child(args: argparse.Namespace) -> None:
    from csmn.synth import SynthConfig, reference_scores, write_archive

    config = SynthConfig(out=args.out, seed=args.seed, write_images=args.write_images,
                         image_threads=args.image_threads)
    config = replace(config, users=users_for(args.posts, config))
    before = _rss_mib()
    started = time.perf_counter()
    summary = write_archive(config)
    seconds = time.perf_counter() - started
    # Hashtag F1 of the truth's reference predictors, split by users: what the niches let a
    # model learn for new users against what copying one of the user's own posts gives.
    reference = {}
    if args.reference:
        scores = reference_scores(args.out)
        reference = {f"{name}_f1": scores[name]["f1"]
                     for name in ("category_mode", "niche_category_mode", "another_post")}
        reference["reference_test_posts"] = scores["test_posts"]
    print(json.dumps({
        "target_posts": args.posts,
        "users": config.users,
        "posts": summary["posts"],
        "images": summary["images_written"],
        "seconds": round(seconds, 2),
        "posts_per_s": round(summary["posts"] / seconds, 1),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(_rss_mib(), 1),
        "archive_mib": round(
            sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file()) / 2**20, 1),
        **reference,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,20000", help="comma-separated post counts")
    parser.add_argument("--big", action="store_true", help="also ~200K posts")
    parser.add_argument("--write-images", default="true", choices=("true", "false"))
    parser.add_argument("--image-threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true",
                        help="also the hashtag F1 of the truth's reference predictors")
    parser.add_argument("--dir", help="where to write (default: a temporary folder, removed)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--posts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.write_images = args.write_images == "true"
    if args.child:
        child(args)
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.big:
        sizes.append(200_000)
    base = Path(args.dir or tempfile.mkdtemp(prefix="csmn-bench-synth-"))
    print(f"cpus: {os.cpu_count()}, image threads: {args.image_threads}, "
          f"images: {args.write_images}, writing under {base}")
    results = []
    try:
        for size in sizes:
            out = base / f"archive-{size}"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, __file__, "--child", "--posts", str(size), "--out",
                       str(out), "--seed", str(args.seed), "--write-images",
                       "true" if args.write_images else "false",
                       "--image-threads", str(args.image_threads)]
            command += ["--reference"] if args.reference else []
            line = subprocess.run(command, check=True, capture_output=True, text=True,
                                  cwd=ROOT).stdout.strip().splitlines()[-1]
            results.append(json.loads(line))
            print(line, flush=True)
            if not args.dir:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{'posts':>9} {'users':>6} {'seconds':>8} {'posts/s':>8} {'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['posts']:>9} {r['users']:>6} {r['seconds']:>8} {r['posts_per_s']:>8} "
              f"{r['peak_rss_mib']:>13}")
    if args.reference:
        print(f"{'posts':>9} {'category mode':>14} {'niche+category mode':>20} "
              f"{'another post':>13}")
        for r in results:
            print(f"{r['posts']:>9} {r['category_mode_f1']:>14} {r['niche_category_mode_f1']:>20} "
                  f"{r['another_post_f1']:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
