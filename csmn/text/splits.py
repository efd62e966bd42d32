"""Train/validation/test splits (paper 5.1), deterministic from a seed.

By users (both tasks): users are ordered by a seeded hash of their id; the first 90% are
training users; the other users, in the same order, go to test until the test split holds
``min(test_posts, max_test_share x held-out posts)`` posts (5K as in the paper once the data
is large enough, half of the held-out posts on small data), the rest to validation.
Training and test users are disjoint, and so are validation users.

By posts (hashtag task): every user's posts are ordered by a seeded hash of (user, post) and
cut with the same proportions: test gets the share the by-users test has of all posts, at
least one post per user; validation the rest of the held-out 10% (at least one post when the
user has three or more); training the remainder. Every user is in both train and test.

Nothing depends on the order records arrive in or on how Ray partitions them: only on the
seed, the ids and the per-user post counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from csmn.data.layout import (
    TEST,
    TEST_BY_POSTS,
    TRAIN,
    TRAIN_BY_POSTS,
    VAL,
    VAL_BY_POSTS,
)


def unit_hash(seed: int, *parts: str) -> float:
    """A number in [0, 1) from the seed and the parts: stable across runs and machines."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def test_post_target(heldout_posts: int, test_posts: int, max_test_share: float) -> int:
    """How many posts the test split aims for: 5K, or less on data too small for that."""
    return int(min(test_posts, max_test_share * heldout_posts))


def split_users(
    post_counts: Mapping[str, int],
    seed: int,
    train_fraction: float = 0.9,
    test_posts: int = 5000,
    max_test_share: float = 0.5,
) -> dict[str, str]:
    """``{user_id: "train" | "val" | "test"}`` from each user's number of posts."""
    users = sorted(post_counts, key=lambda u: (unit_hash(seed, "user", u), u))
    n_train = min(len(users), int(round(train_fraction * len(users))))
    if len(users) >= 2 and n_train == len(users):
        n_train -= 1  # keep at least one held-out user for the test split
    assignment = {u: TRAIN for u in users[:n_train]}
    heldout = users[n_train:]
    target = test_post_target(sum(post_counts[u] for u in heldout), test_posts, max_test_share)
    # Test takes users in hash order until it reaches the target, always at least one, and
    # leaves at least one for validation when there are two or more.
    max_test_users = max(1, len(heldout) - 1)
    in_test = 0
    for i, user in enumerate(heldout):
        if i == 0 or (in_test < target and i < max_test_users):
            assignment[user] = TEST
            in_test += post_counts[user]
        else:
            assignment[user] = VAL
    return assignment


def by_posts_fractions(
    total_posts: int,
    train_fraction: float = 0.9,
    test_posts: int = 5000,
    max_test_share: float = 0.5,
) -> tuple[float, float]:
    """(test, validation) shares of each user's posts for the split by posts."""
    heldout_share = 1.0 - train_fraction
    if total_posts <= 0:
        return 0.0, heldout_share
    target = test_post_target(round(heldout_share * total_posts), test_posts, max_test_share)
    test_share = min(heldout_share, target / total_posts)
    return test_share, heldout_share - test_share


def split_user_posts(
    user_id: str,
    post_ids: Sequence[str],
    seed: int,
    test_fraction: float,
    val_fraction: float,
) -> dict[str, str]:
    """``{post_id: "train_by_posts" | "val_by_posts" | "test_by_posts"}`` for one user."""
    order = sorted(post_ids, key=lambda p: (unit_hash(seed, "post", user_id, p), p))
    n = len(order)
    n_test = max(1, int(round(test_fraction * n))) if n >= 2 else 0
    n_val = max(1, int(round(val_fraction * n))) if n >= 3 else 0
    n_val = min(n_val, max(0, n - n_test - 1))  # at least one training post
    assignment = {}
    for i, post_id in enumerate(order):
        if i < n_test:
            assignment[post_id] = TEST_BY_POSTS
        elif i < n_test + n_val:
            assignment[post_id] = VAL_BY_POSTS
        else:
            assignment[post_id] = TRAIN_BY_POSTS
    return assignment
