"""Timing shared by the benchmarks: the machine's own matmul peak, measured in the same run
as the figure it scales (docs/method.md, "Where the time goes": about 300 GFLOP/s fp32 at
n=2048 on these 2-core machines). Only torch: the benchmarks also run on a bare GPU box
without Ray."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device,
          warmup: int = 1) -> float:
    """Seconds per call, the best of ``repeats`` timed calls after warm-up calls (allocator,
    autotuning, lazy init). The best, not the mean: on a shared machine other processes only
    ever add time."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of one large square matmul: n = 2048 on CPU (docs/method.md), 8192 on CUDA."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: torch.matmul(a, b), 10 if device.type == "cuda" else 5, device)
    return 2 * n**3 / seconds
