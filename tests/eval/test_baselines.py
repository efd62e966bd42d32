"""Nearest-neighbour baselines on crafted data whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from csmn.eval.baselines import (
    NeighbourTrainingSet,
    Queries,
    nearest_rows_l2,
    nearest_users,
    one_nn_image,
    one_nn_user,
    one_nn_user_image,
    run_baselines,
    seeded_choice,
)

DIM = 16


def _unit(index: int, scale: float = 1.0) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[index] = scale
    return vector


@pytest.fixture()
def training() -> NeighbourTrainingSet:
    # alice: beach posts; bob: food posts; carol: a beach post that is the nearest image
    # overall to the "beach" query direction 0.
    return NeighbourTrainingSet(
        user_ids=["alice", "alice", "bob", "bob", "carol"],
        texts=["#beach #sun", "#surf", "#pasta", "#pizza #dinner", "#carolbeach"],
        features=np.stack([_unit(0, 0.8), _unit(1), _unit(2), _unit(3), _unit(0, 1.0)]),
        user_contexts={
            "alice": ["#beach", "#sun", "#surf", "#waves"],
            "bob": ["#pasta", "#pizza", "#dinner", "#food"],
            "carol": ["#carolbeach", "#beach"],
        },
    )


@pytest.fixture()
def queries() -> Queries:
    return Queries(
        post_ids=["q1", "q2", "q3"],
        # q1: image like carol's (dir 0), user talks like alice
        # q2: image like bob's pizza (dir 3), user talks like alice
        # q3: image like alice's surf (dir 1), user talks like bob
        features=np.stack([_unit(0, 1.05), _unit(3, 0.9), _unit(1, 1.1)]),
        context_words=[
            ["#sun", "#surf", "#waves", "#beach"],
            ["#waves", "#surf"],
            ["#food", "#pasta", "#unknownword"],
        ],
    )


def test_one_nn_image_returns_the_nearest_training_image(training, queries):
    result = one_nn_image(training, queries)
    assert result.neighbour_rows.tolist() == [4, 3, 1]
    assert result.texts == ["#carolbeach", "#pizza #dinner", "#surf"]
    assert result.hashtags[1] == ["#pizza", "#dinner"]
    assert result.neighbour_users == ["carol", "bob", "alice"]


def test_one_nn_user_picks_a_seeded_post_of_the_most_overlapping_user(training, queries):
    result = one_nn_user(training, queries, seed=7)
    assert result.neighbour_users == ["alice", "alice", "bob"]
    expected_rows = [
        [0, 1][seeded_choice(7, "q1", 2)],
        [0, 1][seeded_choice(7, "q2", 2)],
        [2, 3][seeded_choice(7, "q3", 2)],
    ]
    assert result.neighbour_rows.tolist() == expected_rows
    # the draw belongs to the query, not to its position in the batch
    reversed_queries = Queries(
        post_ids=queries.post_ids[::-1],
        features=queries.features[::-1],
        context_words=queries.context_words[::-1],
    )
    again = one_nn_user(training, reversed_queries, seed=7)
    assert again.neighbour_rows.tolist() == expected_rows[::-1]
    # different seeds draw differently somewhere over many queries
    many = Queries(
        post_ids=[f"p{i}" for i in range(40)],
        features=np.zeros((40, DIM), dtype=np.float32),
        context_words=[["#pasta"]] * 40,
    )
    draws = {
        seed: one_nn_user(training, many, seed=seed).neighbour_rows.tolist() for seed in (1, 2)
    }
    assert set(draws[1]) == {2, 3} and draws[1] != draws[2]


def test_one_nn_user_image_searches_only_the_nearest_users_posts(training, queries):
    result = one_nn_user_image(training, queries)
    # q1: alice's nearest image is her beach post (row 0), not carol's nearer one (row 4);
    # q2: both of alice's images are orthogonal to it, row 0 is shorter (0.8) so nearer;
    # q3: bob's two images are orthogonal to it with equal norms: the tie goes to the first
    assert result.neighbour_rows.tolist() == [0, 0, 2]
    assert result.texts == ["#beach #sun", "#beach #sun", "#pasta"]


def test_l2_search_is_exact_across_chunks():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(301, DIM)).astype(np.float32)
    queries = rng.normal(size=(57, DIM)).astype(np.float32)
    brute = ((queries[:, None, :] - candidates[None, :, :]) ** 2).sum(-1).argmin(1)
    chunked = nearest_rows_l2(queries, candidates, query_chunk=10, candidate_chunk=32)
    assert chunked.tolist() == brute.tolist()


def test_run_baselines_and_bad_input(training, queries):
    results = run_baselines(training, queries, names=["1nn-im", "1nn-usrim"])
    assert sorted(results) == ["1nn-im", "1nn-usrim"]
    with pytest.raises(ValueError, match="unknown baselines"):
        run_baselines(training, queries, names=["2nn"])
    with pytest.raises(ValueError, match="no context words"):
        NeighbourTrainingSet(["x"], ["#a"], np.zeros((1, DIM)), {})
    with pytest.raises(ValueError, match="one row per query"):
        Queries(["q"], np.zeros((2, DIM)), [["#a"]])


def test_users_match_on_their_first_60_context_words_only():
    # a context stored for W100 (best first): word 61 onwards must not pick the neighbour
    filler = [f"#w{i}" for i in range(60)]
    training = NeighbourTrainingSet(
        user_ids=["ann", "ben"], texts=["#a", "#b"],
        features=np.stack([_unit(0), _unit(1)]),
        user_contexts={"ann": filler[:30] + [f"#ann{i}" for i in range(30)],
                       "ben": filler[30:] + [f"#ben{i}" for i in range(30)] + filler[:30]},
    )
    queries = Queries(post_ids=["q"], features=np.stack([_unit(2)]),
                      context_words=[filler[:30] + [f"#q{i}" for i in range(30)]])
    # ann shares 30 of her first 60 words with the query; ben's shared words sit at 61-90
    assert nearest_users(training, queries).tolist() == [0]
    assert nearest_users(training, queries, context_words=100).tolist() == [0]
    # counted over 100 words, ben overlaps 30 too and a longer query tips it his way
    longer = Queries(post_ids=["q"], features=np.stack([_unit(2)]),
                     context_words=[[f"#q{i}" for i in range(60)] + filler[30:]])
    assert nearest_users(training, longer).tolist() == [0]  # no overlap in the first 60
    assert nearest_users(training, longer, context_words=100).tolist() == [1]
