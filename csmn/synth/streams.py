"""Random streams and length distributions.

Every user and every image draws from its own stream derived from (seed, user, post), so the
same seed gives byte-identical posts and images whatever the thread timing.
"""

from __future__ import annotations

import hashlib
import math


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts; stable across processes (unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def length_cum_weights(mean: float, low: int = 3, high: int = 15) -> tuple[list[int], list[float]]:
    """Lengths low..high, right-skewed like real caption lengths, with mean ``mean``.

    A gamma-like base shape, exponentially tilted (weights x exp(t x length)); the mean grows
    monotonically with t, so bisection finds the t that makes the knob mean what it says.
    """
    values = list(range(low, high + 1))
    if not low < mean < high:
        raise ValueError(f"mean length {mean} must lie strictly inside ({low}, {high})")
    base = [(v - low + 1) ** 1.5 * math.exp(-(v - low + 1) / 3.0) for v in values]

    def weights(tilt: float) -> list[float]:
        return [b * math.exp(tilt * (v - low)) for b, v in zip(base, values, strict=True)]

    def mean_of(tilt: float) -> float:
        w = weights(tilt)
        return sum(v * x for v, x in zip(values, w, strict=True)) / sum(w)

    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_of(mid) < mean:
            lo = mid
        else:
            hi = mid
    cumulative, total = [], 0.0
    for x in weights((lo + hi) / 2):
        total += x
        cumulative.append(total)
    return values, cumulative


def zipf_cum_weights(n: int, exponent: float = 1.0) -> list[float]:
    cumulative, total = [], 0.0
    for rank in range(1, n + 1):
        total += 1.0 / rank**exponent
        cumulative.append(total)
    return cumulative
