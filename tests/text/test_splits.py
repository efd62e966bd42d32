"""Splits by users and by posts: disjoint, sized as in paper 5.1, deterministic from a seed."""

from __future__ import annotations

import random
from collections import Counter

from csmn.data.layout import TEST, TRAIN, VAL
from csmn.text.splits import (
    by_posts_fractions,
    split_user_posts,
    split_users,
    unit_hash,
)


def _counts(n_users: int, seed: int = 1) -> dict[str, int]:
    rng = random.Random(seed)
    return {f"user{i}": rng.randint(50, 300) for i in range(n_users)}


def test_by_users_split_sizes_and_determinism():
    counts = _counts(1000)
    splits = split_users(counts, seed=3)
    assert set(splits) == set(counts)
    users = Counter(splits.values())
    assert users[TRAIN] == 900
    test_posts = sum(counts[u] for u, s in splits.items() if s == TEST)
    assert 5000 <= test_posts < 5000 + 300  # "5K posts": users are whole
    assert users[VAL] > 0
    # the same seed gives the same split whatever the order of the input
    shuffled = dict(sorted(counts.items(), key=lambda kv: unit_hash(9, kv[0])))
    assert split_users(shuffled, seed=3) == splits
    assert split_users(counts, seed=4) != splits


def test_small_data_scales_the_test_split():
    counts = _counts(20)
    splits = split_users(counts, seed=0)
    heldout = [u for u, s in splits.items() if s != TRAIN]
    assert len(heldout) == 2
    assert Counter(splits[u] for u in heldout) == {TEST: 1, VAL: 1}


def test_by_posts_every_user_in_train_and_test():
    test_fraction, val_fraction = by_posts_fractions(100_000)
    assert test_fraction == 0.05 and abs(val_fraction - 0.05) < 1e-12
    test_fraction, val_fraction = by_posts_fractions(1_000_000)
    assert test_fraction == 0.005 and abs(val_fraction - 0.095) < 1e-12
    posts = [f"p{i}" for i in range(100)]
    assignment = split_user_posts("u1", posts, 0, test_fraction, val_fraction)
    split_counts = Counter(assignment.values())
    assert split_counts == {"train_by_posts": 90, "val_by_posts": 9, "test_by_posts": 1}
    assert split_user_posts("u1", posts[::-1], 0, test_fraction, val_fraction) == assignment
    # a user with 3 posts still has one in each split
    assert set(split_user_posts("u1", posts[:3], 0, 0.001, 0.001).values()) == {
        "train_by_posts", "val_by_posts", "test_by_posts"}
