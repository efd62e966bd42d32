"""The paired bootstrap that decides a promotion: is the candidate better than the champion on
the same posts, by more than a minimum gain, with a given confidence?

Both models are scored post by post on the same test posts (hashtag F1 per post, section 5.1;
or a per-post text score for posts). The statistic is the mean of the per-post differences
candidate - champion; resampling posts with replacement (the same resampled posts for both
models, hence *paired*) gives its sampling distribution, and the percentile interval at the
chosen confidence is reported. The candidate wins when the interval's lower end exceeds the
minimum gain: a tie, or a gain the test set cannot tell from noise, does not promote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Resamples are drawn in blocks so that memory stays flat for large test sets.
_BLOCK = 1000


@dataclass(frozen=True)
class PairedBootstrap:
    """The interval of the mean per-post difference, and what it decides."""

    n_posts: int
    candidate_mean: float
    champion_mean: float
    mean_difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    min_gain: float

    @property
    def wins(self) -> bool:
        return self.low > self.min_gain

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "wins": self.wins}


def paired_bootstrap(
    candidate: np.ndarray,
    champion: np.ndarray,
    confidence: float = 0.95,
    min_gain: float = 0.0,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedBootstrap:
    """Percentile interval of mean(candidate - champion) over ``resamples`` resamplings of
    the posts. Deterministic for a seed."""
    candidate = np.asarray(candidate, dtype=np.float64)
    champion = np.asarray(champion, dtype=np.float64)
    if candidate.shape != champion.shape or candidate.ndim != 1:
        raise ValueError(f"per-post scores must pair up: {candidate.shape} vs {champion.shape}")
    n = candidate.size
    if n == 0:
        raise ValueError("no posts to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    differences = candidate - champion
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _BLOCK):
        size = min(_BLOCK, resamples - start)
        picks = rng.integers(0, n, size=(size, n))
        means[start:start + size] = differences[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedBootstrap(
        n_posts=n,
        candidate_mean=float(candidate.mean()),
        champion_mean=float(champion.mean()),
        mean_difference=float(differences.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
        min_gain=min_gain,
    )
