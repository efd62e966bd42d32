"""Throughput, memory and the cost of distribution of ``csmn preprocess``. Not a test.

For each archive size (written by ``csmn.synth``, no images: preprocessing never opens
them) the job runs twice in fresh processes: on Ray Data (in-process Ray, this node's CPUs)
and as the same stage functions in a plain single-process loop (``--engine local``). Ray runs
the job twice in its process: cold (workers import and load the dictionary) and warm.

Printed per run: raw records/s; CPU seconds of the whole process tree and raw records per CPU
second (on a shared machine the figure that does not depend on the neighbours' load; records/s
on N free cores is at most N times it); peak RSS of the driver and of its whole process tree
(Ray's raylet, GCS and workers are its children; shared object-store pages count once per
process, so the tree figure is an upper bound); and the ratio Ray / plain loop.

    python bench/preprocess.py                  # ~5K and ~20K raw posts
    python bench/preprocess.py --sizes 2000 100000
    python bench/preprocess.py --text-stage 20000 --baseline-rev e4fb5c8

``--text-stage N`` times only the per-post text work (normalize the caption and hashtags, the
English and advertisement tests) on N synthetic posts, in this process, for the code as it is
and for ``csmn/text`` at ``--baseline-rev`` (read with ``git show``), in turns in one run.
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
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss_bytes(root_pid: int) -> int:
    """RSS summed over ``root_pid`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {root_pid}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


def _tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of ``root_pid`` and its live descendants (and the children
    they reaped): on a shared machine, work done is what CPU time measures, not wall time."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
    tree, grew = {root_pid}, True
    while grew:
        grew = False
        for pid, fields in stats.items():
            if int(fields[1]) in tree and pid not in tree:
                tree.add(pid)
                grew = True
    # fields after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
    return sum(sum(int(x) for x in stats[pid][11:15]) for pid in tree if pid in stats) / tick


class TreeRssSampler:
    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _driver_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    from csmn.pipeline.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig()
    runs = []
    ray_init_s = None
    with TreeRssSampler() as sampler:
        if args.engine == "ray":
            from csmn.pipeline.runtime import init_ray

            started = time.perf_counter()
            init_ray()
            ray_init_s = round(time.perf_counter() - started, 2)
        for i in range(args.repeat):
            started, cpu_started = time.perf_counter(), _tree_cpu_seconds(os.getpid())
            manifest = preprocess(args.archive, args.out, config, engine=args.engine)
            seconds = time.perf_counter() - started
            cpu_seconds = _tree_cpu_seconds(os.getpid()) - cpu_started
            runs.append({
                "run": "cold" if i == 0 else "warm",
                "seconds": round(seconds, 2),
                "records_per_s": round(manifest["records"]["in"] / seconds, 1),
                "cpu_seconds": round(cpu_seconds, 2),
                "records_per_cpu_s": round(manifest["records"]["in"] / max(cpu_seconds, 1e-9), 1),
            })
    print(json.dumps({
        "engine": args.engine,
        "records": manifest["records"]["in"],
        "kept": {t: manifest["stats"][t]["posts"] for t in ("post", "hashtag")},
        "ray_init_s": ray_init_s,
        "runs": runs,
        "driver_peak_rss_mib": round(_driver_peak_mib(), 1),
        "tree_peak_rss_mib": round(sampler.peak / 2**20, 1),
    }))


def users_for(posts: int, config) -> int:
    from csmn.synth import make_user

    sample = [make_user(replace(config, seed=config.seed + 1), i).n_posts for i in range(300)]
    return max(1, math.ceil(posts / (sum(sample) / len(sample))))


def run_child(engine: str, archive: str, out: str, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--archive", archive,
           "--out", out, "--repeat", str(repeat)]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _text_modules(rev: str | None) -> tuple[object, object]:
    """(normalize, filters) as they are, or as committed at ``rev``."""
    import importlib
    import types

    filters = importlib.import_module("csmn.text.filters")
    current = importlib.import_module("csmn.text.normalize")
    if rev is None:
        return current, filters
    loaded = []
    try:
        for name in ("normalize", "filters"):
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:csmn/text/{name}.py"],
                                    check=True, capture_output=True, text=True).stdout
            module = types.ModuleType(f"csmn.text.{name}")
            # The old filters import has_url and language_words from the old normalize.
            sys.modules[module.__name__] = module
            exec(compile(source, f"{rev}:csmn/text/{name}.py", "exec"), module.__dict__)
            loaded.append(module)
    finally:
        sys.modules["csmn.text.normalize"] = current
        sys.modules["csmn.text.filters"] = filters
    return loaded[0], loaded[1]


def _synthetic_posts(count: int) -> list[dict]:
    from csmn.synth import SynthConfig, iter_user_posts, make_user

    config = SynthConfig(users=max(1, count // 150))
    posts: list[dict] = []
    for index in range(config.users):
        for planned in iter_user_posts(config, make_user(config, index)):
            try:
                post = json.loads(planned.line)
            except ValueError:
                continue  # a deliberately broken record
            # Broken records (a caption that is not text, ...) are the read stage's rejects.
            if not isinstance(post, dict):
                continue
            tags = post.get("hashtags") or []
            if (isinstance(post.get("caption") or "", str) and isinstance(tags, list)
                    and all(isinstance(t, str) for t in tags)):
                posts.append(post)
            if len(posts) == count:
                return posts
    return posts


def text_stage(count: int, rev: str, repeats: int = 3) -> dict:
    """Posts/s of the text work of preprocessing, as it is and at ``rev``, timed in turns."""
    posts = _synthetic_posts(count)
    variants = {"before": _text_modules(rev), "after": _text_modules(None)}

    def run(normalize, filters) -> None:
        # Each pass starts with cold caches.
        filters.is_english_word.cache_clear()
        if hasattr(normalize.normalize_hashtag, "cache_clear"):
            normalize.normalize_hashtag.cache_clear()
        for post in posts:
            caption = post.get("caption") or ""
            normalize.normalize_caption(caption)
            normalize.normalize_hashtags(post.get("hashtags") or [])
            filters.is_non_english(caption)
            filters.is_advertisement(caption)

    best = dict.fromkeys(variants, math.inf)
    for _ in range(repeats):
        for name, modules in variants.items():
            start = time.process_time()
            run(*modules)
            best[name] = min(best[name], time.process_time() - start)
    rates = {name: len(posts) / seconds for name, seconds in best.items()}
    print(f"text stage, {len(posts)} synthetic posts (CPU time, best of {repeats}): "
          f"before ({rev}) {rates['before']:.0f} posts/s, after {rates['after']:.0f} posts/s, "
          f"{rates['after'] / rates['before']:.2f}x")
    return {"posts": len(posts), "before_posts_per_s": rates["before"],
            "after_posts_per_s": rates["after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000],
                        help="approximate raw posts per archive")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="ray", help=argparse.SUPPRESS)
    parser.add_argument("--archive", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--text-stage", type=int, default=0, metavar="N",
                        help="only time the text work on N synthetic posts, before and after")
    parser.add_argument("--baseline-rev", default="e4fb5c8",
                        help="git revision of csmn/text for --text-stage's 'before'")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.text_stage:
        print(json.dumps(text_stage(args.text_stage, args.baseline_rev)))
        return

    from csmn.synth import SynthConfig, write_archive

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    results = []
    try:
        for size in args.sizes:
            archive = str(work / f"archive-{size}")
            config = SynthConfig(out=archive, seed=11, write_images=False)
            summary = write_archive(replace(config, users=users_for(size, config)))
            local = run_child("local", archive, str(work / f"local-{size}"), repeat=1)
            ray = run_child("ray", archive, str(work / f"ray-{size}"), repeat=2)
            local_s = local["runs"][0]["seconds"]
            row = {
                "raw_posts": summary["posts"], "users": summary["users"],
                "kept": ray["kept"],
                "local": local, "ray": ray,
                "ratio_ray_cold_to_local": round(ray["runs"][0]["seconds"] / local_s, 2),
                "ratio_ray_warm_to_local": round(ray["runs"][-1]["seconds"] / local_s, 2),
            }
            results.append(row)
            print(json.dumps(row, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nraw posts | engine        | s      | records/s | CPU s  | records/CPU s "
          "| driver RSS MiB | tree RSS MiB")
    for row in results:
        for engine, run in (("local", row["local"]["runs"][0]),
                            ("ray cold", row["ray"]["runs"][0]),
                            ("ray warm", row["ray"]["runs"][-1])):
            stats = row["local" if engine == "local" else "ray"]
            print(f"{row['raw_posts']:>9} | {engine:<13} | {run['seconds']:>6} | "
                  f"{run['records_per_s']:>9} | {run['cpu_seconds']:>6} | "
                  f"{run['records_per_cpu_s']:>13} | {stats['driver_peak_rss_mib']:>14} | "
                  f"{stats['tree_peak_rss_mib']:>12}")
        print(f"{'':>9} | ratio Ray/loop: cold {row['ratio_ray_cold_to_local']}, "
              f"warm {row['ratio_ray_warm_to_local']}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared)")


if __name__ == "__main__":
    main()
