"""Image feature extraction throughput: the Ray Data job against a plain PyTorch loop.

Default (CPU, a few minutes): makes N photo-like JPEGs and runs, interleaved because a
shared machine's load moves (plain, Ray, plain, Ray, plain), a plain single-process loop
(read+decode+resize, then ResNet-101, timed apart) and the Ray Data job (``csmn.extract``)
over the same images with the same model. It prints images/s of each, the job's steady
rate (the model operator's span from Ray Data's stats, i.e. without Ray's fixed start-up)
and its end-to-end rate, their ratios to the plain loop (goal: steady >= 0.9 on one node),
where the time goes, and the fp32 matmul peak measured in the same run.

``--decode-compare`` times only decode + resize + crop, PIL (the CPU decode tasks) against
``decode_images_on_device`` (the GPU actors' path) on ``--device``, one line with the ratio::

    python bench/features.py --decode-compare --device cuda --images 256 --decode-images 2048

``--plain-only`` needs no Ray and no pyarrow (a GPU box with only torch/torchvision):

    python bench/features.py --plain-only --device cuda --images 512 --batch-sizes 128,256 \
        --precisions bf16,fp16 --workers 1,4,8,15

measures, at the full 224 crop: the model alone (uint8 batches already in pinned memory ->
normalise -> ResNet-101 -> pool5 back on the host), decode+resize throughput with a
DataLoader of N workers, the two together, and says which is the bottleneck.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import matmul_peak  # noqa: E402
from csmn.core.image_features import (  # noqa: E402
    FeatureExtractor,
    PreprocessConfig,
    build_resnet101_trunk,
    decode_image,
    load_trunk,
)

# FLOPs (2 x the 7.8 G multiply-adds) of one 224 x 224 forward pass, conv1..layer4: the unit
# of matmul_peak, which counts 2 n^3 per product.
RESNET101_GFLOP = 15.6


def photo_like_jpeg(seed: int, width: int, height: int, quality: int = 90) -> bytes:
    """Smooth colour fields, a few hard edges and sensor-like noise: decodes about as fast
    as a real photo (pure noise would be the worst case, flat colour the best)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    image = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32
    )
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        image[y0:y0 + height // 4, x0:x0 + width // 5] = rng.random(3) * 255
    image += rng.normal(0, 6, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.getvalue()


def write_images(folder: Path, count: int, width: int, height: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img-{i:05d}.jpg"
        path.write_bytes(photo_like_jpeg(i, width, height))
        paths.append(str(path))
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(text: str) -> float:
    """'1.5s' / '120.3ms' / '15us' (Ray Data's stats) -> seconds."""
    text = text.strip()
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def load_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- plain loop on this machine (CPU default) -------------------------------------------------


def plain_loop(
    paths: list[str], extractor: FeatureExtractor, preprocess: PreprocessConfig, batch_size: int
) -> dict[str, float]:
    """One process: read+decode+resize a batch, then run the model on it; timed apart."""
    decode_s = model_s = 0.0
    # warm-up batch (oneDNN/cuDNN pick their kernels), not counted
    extractor(np.stack([decode_image(load_bytes(p), preprocess) for p in paths[:batch_size]]))
    cpu_start = time.process_time()
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        t0 = time.perf_counter()
        crops = np.stack([decode_image(load_bytes(p), preprocess) for p in paths[i:i + batch_size]])
        t1 = time.perf_counter()
        extractor(crops)
        _sync(extractor.device)
        model_s += time.perf_counter() - t1
        decode_s += t1 - t0
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    n = len(paths)
    return {
        "cpu_ms_per_image": 1000 * cpu / n,
        "images": n,
        "seconds": total,
        "images_per_s": n / total,
        "decode_ms_per_image": 1000 * decode_s / n,
        "model_ms_per_image": 1000 * model_s / n,
        "decode_share": decode_s / total,
    }


def write_examples(root: Path, paths: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "examples" / "post" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "user_id": ["u"] * len(paths),
            "post_id": [str(i) for i in range(len(paths))],
            "image": paths,
        }
    )
    pq.write_table(table, folder / "part-0.parquet")
    # The manifest preprocessing writes last: extraction refuses a root without it.
    from csmn.data import layout

    layout.write_manifest(str(root), {"version": 1, "root": str(root)})


def ray_job(
    workdir: Path, paths: list[str], args: argparse.Namespace, name: str
) -> tuple[dict, list[str]]:
    from csmn.pipeline.extract import ExtractConfig, run_extract

    root = workdir / name
    write_examples(root, paths)
    config = ExtractConfig(
        data=str(root),
        layer=args.layer,
        weights=args.weights,
        batch_size=args.batch_size,
        decode_batch_size=args.decode_batch_size,
        rows_per_part=256,
        precision=args.precision,
        # The plain loop's work: the model on --device, JPEGs decoded by PIL on CPUs (Ray
        # would find a GPU by itself, and on one decode in the actors with nvJPEG).
        device=args.device,
        decode="tasks",
    )
    stats: list[str] = []
    summary = run_extract(config, stats=stats)
    return summary, stats


def _operator_lines(stats: list[str]) -> list[str]:
    return "\n".join(stats).splitlines()


def _actor_span_s(stats: list[str]) -> float:
    """Wall time of the model operator, first batch in to last batch out (Ray Data's
    'N blocks produced in X s'): the job's steady state, without Ray's start-up."""
    for line in _operator_lines(stats):
        if line.startswith("Operator") and "FeatureActor" in line:
            return _seconds(line.rsplit("produced in", 1)[1])
    raise ValueError("no FeatureActor operator in the Ray Data stats")


def _workers_cpu_s(stats: list[str]) -> float:
    return sum(
        _seconds(line.split("mean,")[-1].replace("total", ""))
        for line in _operator_lines(stats)
        if "Remote cpu time" in line
    )


def run_default(args: argparse.Namespace) -> None:
    import ray

    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    preprocess = PreprocessConfig.for_weights(args.weights)
    workdir = Path(tempfile.mkdtemp(prefix="csmn-bench-features-"))
    width, height = (int(v) for v in args.image_size.split("x"))
    paths = write_images(workdir / "images", args.images, width, height)
    print(f"{args.images} JPEGs of {width}x{height} in {workdir}; {cores} cores", flush=True)

    trunk, info = load_trunk(args.weights)
    layers = ("pool5", "res5c") if args.layer == "both" else (args.layer,)
    extractor = FeatureExtractor(trunk, layers, device, args.precision, preprocess.mean,
                                 preprocess.std, info)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             object_store_memory=1024**3)
    # A shared machine's load moves by 2x within a minute: interleave plain and Ray runs
    # (plain, Ray, plain, Ray, ..., plain) and compare medians.
    peaks, plains, jobs = [matmul_peak(device) / 1e9], [], []
    for round_index in range(args.rounds):
        plains.append(plain_loop(paths, extractor, preprocess, args.batch_size))
        summary, stats = ray_job(workdir, paths, args, f"ray-{round_index}")
        jobs.append((summary, stats))
        print(f"round {round_index}: plain {plains[-1]['images_per_s']:.2f} img/s, Ray job "
              f"{summary['images'] / summary['seconds']:.2f} img/s end-to-end, "
              f"{len(paths) / _actor_span_s(stats):.2f} img/s steady", flush=True)
    plains.append(plain_loop(paths, extractor, preprocess, args.batch_size))
    peaks.append(matmul_peak(device) / 1e9)
    ray.shutdown()

    def median(values: list[float]) -> float:
        return float(np.median(values))

    plain_rate = median([p["images_per_s"] for p in plains])
    end_to_end = median([s["images"] / s["seconds"] for s, _ in jobs])
    steady = median([len(paths) / _actor_span_s(stats) for _, stats in jobs])
    startup = median([s["seconds"] - _actor_span_s(stats) for s, stats in jobs])
    peak = median(peaks)
    decode_ms = median([p["decode_ms_per_image"] for p in plains])
    model_ms = median([p["model_ms_per_image"] for p in plains])
    model_gflops = 1000 / model_ms * RESNET101_GFLOP * (preprocess.crop_size / 224) ** 2
    print("\nRay Data, where the time went (last run):")
    for line in _operator_lines(jobs[-1][1]):
        if line.startswith("Operator") or "Remote wall time" in line or "Remote cpu" in line:
            print("  " + line.strip())
    result = {
        "cores": cores,
        "matmul_fp32_gflops": [round(p, 1) for p in peaks],
        "images": len(paths),
        "image_size": args.image_size,
        "crop": preprocess.crop_size,
        "batch_size": args.batch_size,
        "weights": info.name,
        "plain_images_per_s": [round(p["images_per_s"], 2) for p in plains],
        "ray_end_to_end_images_per_s": [round(s["images"] / s["seconds"], 2) for s, _ in jobs],
        "ray_steady_images_per_s": [round(len(paths) / _actor_span_s(st), 2) for _, st in jobs],
        "ray_startup_s": round(startup, 1),
        "ratio_steady": round(steady / plain_rate, 3),
        "ratio_end_to_end": round(end_to_end / plain_rate, 3),
        "decode_ms_per_image": round(decode_ms, 2),
        "model_ms_per_image": round(model_ms, 1),
        "model_share_of_fp32_peak": round(model_gflops / peak, 3),
        # CPU time is robust to a shared machine where wall time is not
        "plain_cpu_ms_per_image": round(median([p["cpu_ms_per_image"] for p in plains]), 1),
        "ray_workers_cpu_ms_per_image": round(
            median([1000 * _workers_cpu_s(st) / len(paths) for _, st in jobs]), 1
        ),
        "load_average": [round(v, 1) for v in os.getloadavg()],
    }
    print("\n" + json.dumps(result, indent=2))
    print(
        f"\nmedians: plain {plain_rate:.2f} img/s | Ray steady {steady:.2f} img/s "
        f"({result['ratio_steady']:.2f}x of plain; goal >= 0.9) | Ray end-to-end "
        f"{end_to_end:.2f} img/s ({result['ratio_end_to_end']:.2f}x; {startup:.0f} s of "
        f"start-up: Ray Data planning, reading the examples, actor and model start)"
    )
    print(f"where the time goes: decode+resize {decode_ms:.1f} ms/image, model "
          f"{model_ms:.0f} ms/image ({decode_ms / (decode_ms + model_ms):.0%} / "
          f"{model_ms / (decode_ms + model_ms):.0%}); model at "
          f"{result['model_share_of_fp32_peak']:.0%} of the measured fp32 matmul peak")


# --- plain-only mode, for a GPU box without Ray ------------------------------------------------


class _DecodeDataset(torch.utils.data.Dataset):
    """``length`` decodes cycling over the files (writing thousands of large JPEGs would
    take longer than decoding them)."""

    def __init__(self, paths: list[str], preprocess: PreprocessConfig, length: int) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index % len(self.paths)]
        return torch.from_numpy(decode_image(load_bytes(path), self.preprocess))


def _loader(
    paths: list[str], preprocess: PreprocessConfig, workers: int, batch: int, length: int
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _DecodeDataset(paths, preprocess, length),
        batch_size=batch,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def decode_rate(
    paths: list[str], preprocess: PreprocessConfig, workers: int, batch: int, length: int
) -> float:
    loader = _loader(paths, preprocess, workers, batch, length)
    start = time.perf_counter()
    count = sum(len(b) for b in loader)
    return count / (time.perf_counter() - start)


def model_rate(
    extractor: FeatureExtractor, batch: int, crop: int, seconds: float = 3.0
) -> tuple[float, float]:
    """Images/s of normalise + forward + features back to the host, inputs pinned on the host.
    Returns (images/s, fraction of the bf16/fp32 matmul peak is computed by the caller)."""
    rng = np.random.default_rng(0)
    batches = [
        torch.from_numpy(rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8))
        for _ in range(3)
    ]
    if extractor.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    for b in batches:  # warm-up: cuDNN autotuning, allocator
        extractor(b)
    _sync(extractor.device)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        extractor(batches[done % len(batches)])
        done += 1
    _sync(extractor.device)
    elapsed = time.perf_counter() - start
    return done * batch / elapsed, elapsed


def calibrate_batchnorm(trunk: torch.nn.Module, device: torch.device) -> None:
    """Give random weights the activation scale of a trained network: BatchNorm running
    statistics from a few photo-like crops. Without it a random ResNet-101's res5c reaches
    ~1e5, past fp16's range, which real ImageNet weights never do."""
    preprocess = PreprocessConfig()
    crops = np.stack([
        decode_image(photo_like_jpeg(2000 + i, 640, 480), preprocess) for i in range(32)
    ])
    extractor = FeatureExtractor(trunk, ("pool5",), device, "fp32")
    for module in trunk.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    trunk.train()
    with torch.no_grad():
        for i in range(0, len(crops), 8):
            trunk(extractor.to_input(crops[i:i + 8]))
    trunk.eval()


def precision_error(
    trunk: torch.nn.Module, device: torch.device, preprocess: PreprocessConfig,
    args: argparse.Namespace,
) -> dict[str, float]:
    """||f_p - f_fp32|| / ||f_fp32|| of pool5 over a few real-looking crops, each precision
    against fp32 with TF32 off (the features are stored as float32 either way)."""
    crops = np.stack([
        decode_image(photo_like_jpeg(1000 + i, 640, 480), preprocess) for i in range(8)
    ])
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    reference = FeatureExtractor(trunk, ("pool5",), device, "fp32")(crops)["pool5"]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    errors = {}
    for precision in ["fp32"] + args.precisions.split(","):
        out = FeatureExtractor(trunk, ("pool5",), device, precision)(crops)["pool5"]
        name = "tf32" if precision == "fp32" else precision
        errors[name] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        print(f"pool5 {name} vs fp32: relative error {errors[name]:.2e}", flush=True)
    return errors


def device_decode_compare(
    paths: list[str], preprocess: PreprocessConfig, device: torch.device, count: int,
    batch: int = 64,
) -> dict[str, float]:
    """Decode + resize + center crop, one process, the same bytes both ways: PIL
    (``decode_image``, the CPU decode tasks' path) against ``decode_images_on_device`` (the
    GPU actors' path: torchvision's batched decode_jpeg, resize and crop on ``device``; on a
    CPU it runs libjpeg-turbo like PIL, so the ratio there is the resize and the batching,
    not nvJPEG). Also how far apart their pixels are."""
    from csmn.core.image_features import decode_images_on_device

    encoded = [load_bytes(p) for p in paths]
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One thread, like PIL: on a loaded shared machine torch's intra-op threads spin on
        # each small copy and resize (measured several times slower with 2 than with 1).
        torch.set_num_threads(1)
    batches = [[encoded[i % len(encoded)] for i in range(start, min(count, start + batch))]
               for start in range(0, count, batch)]
    decode_images_on_device(batches[0], preprocess, device)  # warm-up (nvJPEG handles)
    _sync(device)
    # Batch by batch, the two in turn: a shared machine's load moves within seconds.
    pil_s = ours_s = 0.0
    fell_back = 0
    for chunk in batches:
        start = time.perf_counter()
        for data in chunk:
            decode_image(data, preprocess)
        middle = time.perf_counter()
        out = decode_images_on_device(chunk, preprocess, device)
        _sync(device)
        pil_s += middle - start
        ours_s += time.perf_counter() - middle
        fell_back += out.on_device.count(False)
    pil, ours = count / pil_s, count / ours_s
    sample = encoded[: min(len(encoded), 32)]
    got = decode_images_on_device(sample, preprocess, device).pixels.cpu().numpy().astype(int)
    want = np.stack([decode_image(d, preprocess) for d in sample]).astype(int)
    diff = np.abs(got - want)
    torch.set_num_threads(threads)
    result = {"pil_images_per_s": round(pil, 1), "device_images_per_s": round(ours, 1),
              "ratio": round(ours / pil, 2), "fell_back_to_pil": fell_back,
              "pixel_diff_max": int(diff.max()), "pixel_diff_mean": round(float(diff.mean()), 3)}
    print(f"decode+resize+crop, 1 process (1 thread), {count} images: PIL {pil:.0f} img/s, "
          f"decode_images_on_device({device.type}) {ours:.0f} img/s: ratio {ours / pil:.2f}x "
          f"(pixels vs PIL: max {diff.max()} levels, mean {diff.mean():.3f}; "
          f"{fell_back} fell back to PIL)", flush=True)
    return result


def run_plain_only(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, device {name}, {cores} CPU cores")
    peak32 = matmul_peak(device) / 1e9
    line = f"matmul peak: fp32 {peak32:.0f} GFLOP/s"
    if device.type == "cuda":
        peak16 = matmul_peak(device, torch.bfloat16) / 1e9
        line += f", bf16 {peak16:.0f} GFLOP/s (n=8192)"
    print(line)
    preprocess = PreprocessConfig.for_weights(args.weights)
    crop = preprocess.crop_size
    results: dict[str, object] = {"device": name, "cores": cores}

    # 1. the model alone
    if args.weights == "random":
        trunk = build_resnet101_trunk(None).to(device)
        calibrate_batchnorm(trunk, device)
    else:
        trunk = load_trunk(args.weights)[0]
    model_rows = []
    for precision in args.precisions.split(","):
        extractor = FeatureExtractor(trunk, (args.layer if args.layer != "both" else "res5c",),
                                     device, precision, preprocess.mean, preprocess.std)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            rate, _ = model_rate(extractor, batch, crop, args.seconds)
            tflops = rate * RESNET101_GFLOP * (crop / 224) ** 2 / 1000
            model_rows.append((precision, batch, rate, tflops))
            print(f"model {precision:>4} batch {batch:>4}: {rate:8.0f} images/s "
                  f"({tflops:.0f} TFLOP/s)", flush=True)
    results["model"] = [
        {"precision": p, "batch": b, "images_per_s": round(r, 1), "tflops": round(t, 1)}
        for p, b, r, t in model_rows
    ]
    best_precision, best_batch, best_model, _ = max(model_rows, key=lambda row: row[2])
    if device.type == "cuda":
        results["pool5_relative_error_vs_fp32"] = precision_error(trunk, device, preprocess, args)

    # 2. decode + resize with a DataLoader of N workers
    width, height = (int(v) for v in args.image_size.split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="csmn-bench-decode-"))
    paths = write_images(workdir, args.images, width, height)
    size_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    print(f"{len(paths)} JPEGs of {width}x{height}, {size_kb:.0f} KB each")
    decode_rows = []
    for draft in (False, True):
        config = PreprocessConfig(
            preprocess.resize_size, crop, preprocess.mean, preprocess.std, jpeg_draft=draft
        )
        for workers in (int(w) for w in args.workers.split(",")):
            rate = decode_rate(paths, config, workers, 64, args.decode_images)
            decode_rows.append((draft, workers, rate))
            print(f"decode+resize{' (jpeg draft)' if draft else ''}: {workers:>2} workers "
                  f"{rate:7.0f} images/s ({rate / max(workers, 1):.0f} per worker)", flush=True)
    results["decode"] = [
        {"jpeg_draft": d, "workers": w, "images_per_s": round(r, 1)} for d, w, r in decode_rows
    ]
    full_decode = [row for row in decode_rows if not row[0]]
    draft_workers, best_decode = max(((w, r) for d, w, r in full_decode), key=lambda x: x[1])

    # 2b. the alternative the GPU actors use: nvJPEG decode + resize + crop on the GPU itself
    results["device_decode"] = device_decode_compare(paths, preprocess, device,
                                                     args.decode_images)

    # 3. both together: DataLoader workers feeding the model
    extractor = FeatureExtractor(trunk, ("pool5",), device, best_precision,
                                 preprocess.mean, preprocess.std)
    loader = _loader(paths, preprocess, draft_workers, best_batch, args.decode_images)
    count = 0
    start = time.perf_counter()
    for batch in loader:
        extractor(batch)
        count += len(batch)
    _sync(device)
    together = count / (time.perf_counter() - start)
    results["pipeline"] = {"workers": draft_workers, "precision": best_precision,
                           "batch": best_batch, "images_per_s": round(together, 1)}
    per_worker = best_decode / max(draft_workers, 1)
    needed = math.ceil(best_model / per_worker) if per_worker else None
    bottleneck = "decode" if best_decode < best_model else "model"
    results["bottleneck"] = bottleneck
    results["decode_workers_to_feed_the_model"] = needed
    print(json.dumps(results, indent=2))
    print(
        f"\nmodel {best_model:.0f} img/s ({best_precision}, batch {best_batch}) | decode "
        f"{best_decode:.0f} img/s with {draft_workers} workers ({per_worker:.0f}/worker) | "
        f"together {together:.0f} img/s | bottleneck: {bottleneck}; about {needed} decode "
        f"workers of this CPU would keep one such GPU busy"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plain-only", action="store_true", help="no Ray: model + DataLoader")
    parser.add_argument("--decode-compare", action="store_true",
                        help="no Ray, no model: PIL decode vs the device decode path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", default="640x480", help="WxH of the generated JPEGs")
    parser.add_argument("--weights", default="random", help="random | imagenet | PATH")
    parser.add_argument("--layer", default="pool5", choices=("pool5", "res5c", "both"))
    parser.add_argument("--precision", default="auto", help="default mode's precision")
    parser.add_argument("--batch-size", type=int, default=16, help="default mode's batch")
    parser.add_argument("--decode-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="default mode: plain/Ray pairs")
    parser.add_argument("--batch-sizes", default="128,256", help="plain-only model batches")
    parser.add_argument("--precisions", default="bf16,fp16", help="plain-only precisions")
    parser.add_argument("--workers", default="1,4,8", help="plain-only DataLoader workers")
    parser.add_argument("--seconds", type=float, default=3.0, help="plain-only model timing")
    parser.add_argument("--decode-images", type=int, default=1024,
                        help="plain-only: decodes per measurement, cycling over --images files")
    args = parser.parse_args(argv)
    if args.decode_compare:
        width, height = (int(v) for v in args.image_size.split("x"))
        workdir = Path(tempfile.mkdtemp(prefix="csmn-bench-decode-"))
        paths = write_images(workdir, args.images, width, height)
        print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} CPU cores, "
              f"{len(paths)} JPEGs of {width}x{height}")
        result = device_decode_compare(paths, PreprocessConfig.for_weights(args.weights),
                                       torch.device(args.device), args.decode_images)
        print(json.dumps(result))
    elif args.plain_only:
        run_plain_only(args)
    else:
        run_default(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
