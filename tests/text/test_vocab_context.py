"""Vocabulary order and ties; TF-IDF user contexts, leak-free."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from csmn.core.tokens import EOS_ID, SPECIAL_TOKENS, UNK_ID
from csmn.data.layout import vocab_name, vocab_uri
from csmn.text.user_context import UserContext, count_tokens, fit_idf, smoothed_idf, top_context
from csmn.text.vocab import Vocabulary, load_vocab


def test_vocabulary_special_tokens_then_count_then_string():
    counts = {"b": 5, "a": 5, "c": 9, "d": 1, "e": 5, "_UNK": 100}
    vocab = Vocabulary.from_counts(counts, size=8)
    assert vocab.tokens == ["_PAD", "_GO", "_EOS", "_UNK", "c", "a", "b", "e"]
    assert vocab.id_of("d") == UNK_ID  # cut by the size: out of vocabulary
    assert vocab.encode(["c", "d", "a"]) == [4, UNK_ID, 5, EOS_ID]
    assert vocab.decode([4, UNK_ID, 5, EOS_ID, 6]) == ["c", "_UNK", "a"]
    assert not vocab.is_word("_UNK") and vocab.is_word("c")


def test_vocabulary_size_counts_special_tokens_and_round_trips(tmp_path):
    vocab = Vocabulary.from_counts(Counter("abcdefg"), size=6)
    assert len(vocab) == 6 and vocab.tokens[:4] == list(SPECIAL_TOKENS)
    vocab.save(str(tmp_path / "vocab" / "post.json"))
    # the post task answers to its command-line alias "caption" too
    assert load_vocab(str(tmp_path), "caption").tokens == vocab.tokens
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])


def test_by_posts_split_has_its_own_vocabulary_name():
    assert vocab_name("hashtag", "train_by_posts") == "hashtag_by_posts"
    assert vocab_name("hashtag", "test") == "hashtag"
    assert vocab_uri("/r", "hashtag", "test_by_posts") == "/r/vocab/hashtag_by_posts.json"


def test_smoothed_idf_as_scikit_learn():
    assert smoothed_idf(1, 3) == pytest.approx(math.log(4 / 2) + 1)
    assert fit_idf({"a": 3, "b": 1}, 3)["a"] == pytest.approx(1.0)


def _vocab(*words: str) -> Vocabulary:
    return Vocabulary(list(SPECIAL_TOKENS) + list(words))


def test_context_ranks_by_tfidf_then_string_and_skips_oov():
    vocab = _vocab("common", "rare", "mid", "tie1", "tie2")
    idf = fit_idf({"common": 10, "rare": 1, "mid": 3, "tie1": 2, "tie2": 2}, 10)
    counts = {"common": 20, "rare": 2, "mid": 3, "tie1": 1, "tie2": 1, "oov": 50}
    context = top_context(counts, idf, vocab, size=10, n_docs=10)
    scores = {t: counts[t] * idf[t] for t in vocab.tokens[4:]}
    assert context == sorted(scores, key=lambda t: (-scores[t], t))
    assert "oov" not in context and context.index("tie1") < context.index("tie2")
    assert top_context(counts, idf, vocab, size=2, n_docs=10) == context[:2]


def test_context_is_leak_free():
    posts = [["#a", "#b", "#only"], ["#a", "#b", "#c"], ["#a", "#c", "#d"]]
    vocab = _vocab("#a", "#b", "#c", "#d", "#only")
    idf = fit_idf({t: 1 for t in vocab.tokens[4:]}, 5)
    context = UserContext(count_tokens(posts), idf, vocab, size=10, n_docs=5)
    assert "#only" in context.full()
    assert "#only" not in context.without(posts[0])
    assert "#only" in context.without(posts[1]) and "#only" in context.without(posts[2])
    assert "#d" not in context.without(posts[2])


def test_fast_leave_one_out_equals_recomputing():
    import random

    rng = random.Random(7)
    words = [f"w{i}" for i in range(40)]
    vocab = _vocab(*words[:30])
    posts = [[rng.choice(words) for _ in range(rng.randint(3, 12))] for _ in range(60)]
    idf = fit_idf({w: rng.randint(1, 20) for w in words}, 25)
    counts = count_tokens(posts)
    context = UserContext(counts, idf, vocab, size=8, n_docs=25)
    for post in posts:
        slow = top_context(counts - Counter(post), idf, vocab, size=8, n_docs=25)
        assert context.without(post) == slow


def _brute_force_context(counts, idf, vocab, size, n_docs):
    """The definition, scored and sorted from scratch (no shortcut of UserContext)."""
    default = smoothed_idf(0, n_docs)
    scored = [(c * idf.get(t, default), t) for t, c in counts.items()
              if c > 0 and vocab.is_word(t)]
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [t for _, t in scored[:size]]


@pytest.mark.parametrize("seed", range(5))
def test_leave_one_out_equals_the_definition_with_many_ties(seed):
    import random

    # Few distinct counts and IDFs: many equal scores, so the tie order by token decides.
    rng = random.Random(seed)
    words = [f"w{i:02d}" for i in range(90)]
    vocab = _vocab(*words[:70])
    posts = [[rng.choice(words) for _ in range(rng.randint(1, 14))] for _ in range(80)]
    idf = fit_idf({w: rng.choice((1, 3)) for w in words[::2]}, 9)
    counts = count_tokens(posts)
    context = UserContext(counts, idf, vocab, size=20, n_docs=9)
    assert context.full() == _brute_force_context(counts, idf, vocab, 20, 9)
    for post in [*posts, [], ["not-a-word"]]:
        assert context.without(post) == _brute_force_context(
            counts - Counter(post), idf, vocab, 20, 9)
