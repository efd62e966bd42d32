"""Metrics against direct pycocoevalcap calls (real Java METEOR and PTB tokenizer)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from csmn.eval.metrics import (
    CocoScorer,
    context_share,
    escape_emoji,
    hashtag_prf,
    per_user_metrics,
    ptb_tokenize,
    repeated_phrase_share,
    score_hashtags,
    score_posts,
    triple_repeat_share,
)

REFERENCES = [
    "a sunny day at the beach with my best friends",
    "homemade pasta for dinner tonight , so good !",
    "my new shoes are finally here",
    "morning run along the river before work",
    "throwback to the best concert ever",
]
PREDICTIONS = [
    "a sunny day at the beach",
    "pasta for dinner tonight",
    "my new shoes",
    "evening walk along the river",
    "",  # an empty prediction is scored, not dropped
]


@pytest.fixture(scope="module")
def scorer():
    # one METEOR JVM for the whole module: its start-up costs seconds
    with CocoScorer() as shared:
        yield shared


def _direct_pycocoevalcap(references, predictions):
    """The plain pycocoevalcap recipe (as in its COCOEvalCap), with nothing of ours."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    meteor, _ = meteor_scorer.compute_score(gts, res)
    del meteor_scorer
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "bleu_1": bleu[0],
        "bleu_2": bleu[1],
        "bleu_3": bleu[2],
        "bleu_4": bleu[3],
        "meteor": meteor,
        "cider": cider,
        "rouge_l": rouge,
    }


def test_post_metrics_equal_direct_pycocoevalcap(scorer):
    ours = scorer.score(REFERENCES, PREDICTIONS).summary()
    direct = _direct_pycocoevalcap(REFERENCES, PREDICTIONS)
    assert ours["n_posts"] == len(REFERENCES)
    for name, value in direct.items():
        assert math.isclose(ours[name], float(value), rel_tol=1e-9, abs_tol=1e-12), name
    # sanity: partial matches give scores strictly between 0 and 1
    assert 0 < ours["bleu_1"] < 1 and 0 < ours["meteor"] < 1 and 0 < ours["rouge_l"] < 1


def test_token_lists_and_markers_score_like_strings(scorer):
    as_tokens = [p.split() + ["_EOS"] for p in PREDICTIONS]
    assert (
        scorer.score(REFERENCES, as_tokens).summary()
        == scorer.score(REFERENCES, PREDICTIONS).summary()
    )


def test_emoji_escaped_and_counted(scorer):
    assert escape_emoji("so good 😍").split() == ["so", "good", "u0001f60d"]
    assert escape_emoji("☕️").split() == ["u2615"]  # as preprocessing, ☕️ is ☕
    assert escape_emoji("👨‍👩‍👧 fam😂").split() == [
        "u0001f468u200du0001f469u200du0001f467", "fam", "u0001f602"]

    references = ["sunset at the beach 😍 with you", "coffee first ☕️ always"]
    exact = scorer.score(references, references)
    other_emoji = scorer.score(
        references, ["sunset at the beach 😂 with you", "coffee first ☕️ always"]
    )
    no_emoji = scorer.score(references, ["sunset at the beach with you", "coffee first ☕️ always"])
    assert exact.references_tokenized[0] == "sunset at the beach u0001f60d with you"
    for metric in ("bleu_1", "bleu_4", "meteor", "rouge_l"):
        exact_value = getattr(exact, metric)
        assert getattr(other_emoji, metric) < exact_value, metric
        assert getattr(no_emoji, metric) < exact_value, metric
    # without the escape the PTB tokenizer drops the emoji: the same pair would be "exact"
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    raw = PTBTokenizer().tokenize(
        {0: [{"caption": references[0]}], 1: [{"caption": "sunset at the beach 😂 with you"}]}
    )
    raw_bleu, _ = Bleu(4).compute_score({0: raw[0]}, {0: raw[1]}, verbose=0)
    assert raw_bleu[3] > 0.99


@pytest.mark.parametrize(("reference", "wrong_emoji"), [
    ("i love it 😍", "i love it 🎉"),
    ("so happy ❤️ today", "so happy ☀️ today"),  # emoji + variation selector
    ("the family 👨‍👩‍👧 at home", "the family 👨‍👩‍👦 at home"),  # ZWJ sequences
])
def test_a_wrong_emoji_scores_as_a_wrong_word_in_every_metric(scorer, reference, wrong_emoji):
    """One emoji, one token, in every scorer: no credit for a backslash, a variation selector
    or a joiner that two different emoji share."""
    emoji = next(t for t in wrong_emoji.split() if not t.isascii())
    wrong_word = wrong_emoji.replace(emoji, "zebra")
    by_emoji = scorer.score([reference], [wrong_emoji])
    by_word = scorer.score([reference], [wrong_word])
    for metric in ("bleu_1", "bleu_2", "bleu_4", "meteor", "rouge_l"):
        assert getattr(by_emoji, metric) == pytest.approx(getattr(by_word, metric)), metric
    assert scorer.score([reference], [reference]).meteor > by_emoji.meteor


def test_ptb_tokenize_is_pycocoevalcaps_and_writes_nothing_into_the_package():
    from pycocoevalcap.tokenizer import ptbtokenizer

    texts = ["Hello, world!", "", "so good u0001f60d at the beach...", "  ",
             "it's a dog's life -- isn't it?", 'U.S.A. (c) 2016 "me"', "x"]
    package = Path(ptbtokenizer.__file__).parent
    before = sorted(package.iterdir())
    ours = ptb_tokenize(texts)
    assert sorted(package.iterdir()) == before
    theirs = ptbtokenizer.PTBTokenizer().tokenize(
        {i: [{"caption": t}] for i, t in enumerate(texts)})
    assert ours == [theirs[i][0] for i in range(len(texts))]
    assert ours[0] == "hello world" and ours[1] == ""


def test_score_posts_bad_input(scorer):
    scores = score_posts(["my new shoes are here"], ["my new shoes are here"], scorer=scorer)
    assert scores.bleu_1 == pytest.approx(1.0) and scores.meteor == pytest.approx(1.0)
    with pytest.raises(ValueError, match="references but"):
        score_posts(["a b c"], [], scorer=scorer)
    with pytest.raises(ValueError, match="no posts"):
        score_posts([], [], scorer=scorer)


@pytest.mark.parametrize(
    ("truth", "predicted", "expected"),
    [
        (["#a", "#b"], [], (0.0, 0.0, 0.0)),  # empty prediction
        ([], ["#a"], (0.0, 0.0, 0.0)),  # empty truth
        (["#a", "#b"], ["#c", "#d"], (0.0, 0.0, 0.0)),  # no overlap
        (["#a", "#b"], ["#a", "#a", "#a"], (1.0, 0.5, 2 / 3)),  # duplicates count once
        # partial: P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7
        (["#a", "#b", "#c", "#d"], ["#a", "#b", "#x"], (2 / 3, 0.5, 4 / 7)),
        ("#a #b", "a B _EOS", (1.0, 1.0, 1.0)),  # '#', case and markers do not matter
    ],
)
def test_hashtag_f1_hand_computed(truth, predicted, expected):
    assert hashtag_prf(truth, predicted) == pytest.approx(expected)


def test_hashtag_scores_average_over_posts():
    scores = score_hashtags(["#a #b", "#c", "#d #e"], [["#a", "#b"], ["#x"], ["#d"]])
    # F1 per post: 1, 0, 2/3; averaged over posts, not pooled
    assert scores.f1 == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert scores.precision == pytest.approx((1 + 0 + 1) / 3)
    assert scores.recall == pytest.approx((1 + 0 + 0.5) / 3)
    assert scores.n_posts == 3
    np.testing.assert_allclose(scores.f1_per_post, [1, 0, 2 / 3])


def test_context_share_and_per_user_breakdown(scorer):
    user_ids = ["u1", "u1", "u2"]
    truths = ["#a #b", "#c", "#d #e"]
    predictions = [["#a", "#z"], ["#c"], ["#q", "#r", "_EOS"]]
    contexts = [["#a", "#c"], ["#c"], ["#d"]]
    hashtags = score_hashtags(truths, predictions)
    # tokens in context: #a, #c of 5 real predicted tokens
    assert context_share(predictions, contexts) == pytest.approx(2 / 5)
    users = per_user_metrics(user_ids, predictions, contexts, hashtags=hashtags)
    assert [u.user_id for u in users] == ["u1", "u2"]
    assert users[0].n_posts == 2 and users[0].f1 == pytest.approx((0.5 + 1) / 2)
    assert users[0].context_share == pytest.approx(2 / 3)
    assert users[1].f1 == 0.0 and users[1].context_share == 0.0
    assert users[0].bleu_1 is None

    references = ["my new shoes", "the river at dawn", "pasta night"]
    posts = scorer.score(references, ["my new shoes", "a river", "pasta night"])
    users = per_user_metrics(
        ["u1", "u2", "u1"],
        ["my new shoes", "a river", "pasta night"],
        [["shoes"], [], ["pasta"]],
        posts=posts,
    )
    by_id = {u.user_id: u for u in users}
    assert by_id["u1"].bleu_1 == pytest.approx(1.0)
    assert 0 < by_id["u2"].bleu_1 < 1
    assert by_id["u1"].context_share == pytest.approx(2 / 5)
    assert not hasattr(by_id["u1"], "cider")


def test_triple_repeat_share_counts_posts_with_a_word_three_times_in_a_row():
    predictions = ["so so so good", ["so", "so", "good", "so"], "a b a b a", "", "x x _EOS x"]
    # the last: markers are not words, so "x x x" is a run once _EOS is gone
    assert triple_repeat_share(predictions) == pytest.approx(2 / 5)
    assert triple_repeat_share([]) == 0.0


def test_repeated_phrase_share_counts_posts_with_a_phrase_twice():
    predictions = ["time for beach time for beach", "a b c a b d", ["x", "y", "z", "x", "y", "z"],
                   "so so so", "a b _EOS a b", ""]
    # "a b c a b d" and "so so so" hold no 3-word phrase twice; markers are not words, so the
    # fifth is "a b a b": two-word phrases twice, three-word ones not
    assert repeated_phrase_share(predictions) == pytest.approx(2 / 6)
    assert repeated_phrase_share(predictions, n=2) == pytest.approx(5 / 6)
    assert repeated_phrase_share([]) == 0.0

