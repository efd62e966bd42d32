"""The paired bootstrap of the promotion gate, on crafted per-post scores whose answer is
known."""

from __future__ import annotations

import numpy as np
import pytest

from csmn.eval.bootstrap import paired_bootstrap


def test_bootstrap_interval_on_known_differences():
    rng = np.random.default_rng(1)
    champion = rng.uniform(size=400)
    # a constant gain: every resample has the same mean
    constant = paired_bootstrap(champion + 0.05, champion, min_gain=0.01)
    assert constant.low == pytest.approx(0.05) and constant.high == pytest.approx(0.05)
    assert constant.wins
    # identical models: a tie, refused whenever a gain is asked for
    tie = paired_bootstrap(champion, champion, min_gain=0.0)
    assert (tie.low, tie.high, tie.wins) == (0.0, 0.0, False)
    # gains of +1 and -1 in equal numbers: mean 0, standard error 1/sqrt(n) = 0.05, so the 95%
    # percentile interval is about +-1.96 x 0.05
    signs = np.array([1.0, -1.0] * 200)
    noisy = paired_bootstrap(champion + signs, champion, resamples=20_000, seed=3)
    assert noisy.mean_difference == pytest.approx(0.0, abs=1e-12)
    assert noisy.low == pytest.approx(-0.098, abs=0.012)
    assert noisy.high == pytest.approx(0.098, abs=0.012)
    assert not noisy.wins
    # pairing matters: a small gain on every post wins, although the two score lists overlap
    paired = paired_bootstrap(champion + 0.002, champion, min_gain=0.0)
    assert paired.wins and paired.low > 0
    with pytest.raises(ValueError, match="pair up"):
        paired_bootstrap(champion[:3], champion[:4])
