"""User context (paper 4.1): the top-D TF-IDF tokens of a user's posts, best first.

As in the authors' code each user is one document, term frequency is the raw count and the
IDF is scikit-learn's smoothed one, ln((1 + n) / (1 + df)) + 1, fitted on the training users
(the L2 normalization they applied does not change a user's ranking, so it is left out).
Only vocabulary words can enter a context (special tokens and OOV tokens are skipped); ties
are broken by the token string so that contexts are deterministic.

Leak-free: the authors built a test user's context from the very posts being predicted.
Here the context of a post comes from the user's counts MINUS the post's own counts, so a
token that occurs only in that post can never be in its context.
"""

from __future__ import annotations

import math
from bisect import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from csmn.text.vocab import Vocabulary


def fit_idf(doc_freq: Mapping[str, int], n_docs: int) -> dict[str, float]:
    """Smoothed IDF per token from document frequencies over ``n_docs`` training users."""
    return {token: smoothed_idf(df, n_docs) for token, df in doc_freq.items()}


def smoothed_idf(df: int, n_docs: int) -> float:
    return math.log((1 + n_docs) / (1 + df)) + 1.0


def count_tokens(token_lists: Iterable[Sequence[str]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    return counts


class UserContext:
    """One user's counts, ranked once; contexts of single posts derived cheaply from them."""

    def __init__(
        self,
        counts: Mapping[str, int],
        idf: Mapping[str, float],
        vocab: Vocabulary,
        size: int,
        n_docs: int = 0,
    ):
        self.counts = dict(counts)
        self.idf = idf
        self.size = size
        self._default_idf = smoothed_idf(0, n_docs)
        self._words = {t for t in self.counts if vocab.is_word(t)}
        # Entries are (-score, token): plain tuple order is the ranking (score descending,
        # ties by token), so sorts and insertions need no key function. Tokens are distinct,
        # so the order is total and every way of sorting gives the same list.
        ranked = [(-self._score(t, self.counts[t]), t) for t in self._words if self.counts[t] > 0]
        ranked.sort()
        self._ranked = ranked
        self._tokens = [t for _, t in ranked]
        self._rank = {t: i for i, t in enumerate(self._tokens)}
        self._full = self._tokens[:size]

    def _score(self, token: str, count: int) -> float:
        return count * self.idf.get(token, self._default_idf)

    def full(self) -> list[str]:
        """The context from all of the user's posts (for posts the user has not written yet)."""
        return list(self._full)

    def without(self, post_tokens: Sequence[str]) -> list[str]:
        """The context from the user's posts other than the one with ``post_tokens``.

        Removing a post only lowers the scores of its own tokens, so the answer lies in the
        first D + k entries of the full ranking (k = the post's distinct words): rescore
        those k, re-sort that head, cut at D. The head minus the post's words is still in
        order, so the re-sort is: take them out by rank, put them back by bisection (work in
        k, not in D: 60 context words per post, some 8 words per post).
        """
        rank = self._rank
        own: dict[str, int] = {}
        for t in post_tokens:
            if t in rank:  # a vocabulary word the user has: the others cannot be in the head
                own[t] = own.get(t, 0) + 1
        if not own:
            return list(self._full)
        n = self.size + len(own)
        hits = sorted(i for i in map(rank.__getitem__, own) if i < n)
        if not hits:
            return list(self._full)
        keys = self._ranked[:n]
        tokens = self._tokens[:n]
        for i in reversed(hits):
            del keys[i], tokens[i]
        for i in hits:
            token = self._tokens[i]
            remaining = self.counts[token] - own[token]
            if remaining < 0:
                raise ValueError(f"post token {token!r} is not counted in the user's counts")
            if remaining:
                key = (-self._score(token, remaining), token)
                at = bisect(keys, key)
                keys.insert(at, key)
                tokens.insert(at, token)
        del tokens[self.size:]
        return tokens


def top_context(
    counts: Mapping[str, int],
    idf: Mapping[str, float],
    vocab: Vocabulary,
    size: int,
    n_docs: int = 0,
) -> list[str]:
    """Top-``size`` vocabulary words of ``counts`` by TF-IDF, best first (reference form)."""
    return UserContext(counts, idf, vocab, size, n_docs).full()


@dataclass(frozen=True)
class ContextSpec:
    """Everything that makes a user's context (paper 4.1) over one vocabulary: D, and the
    IDF's statistics from the training users (how many, and each word's document frequency).

    Preprocessing writes it beside the vocabulary and training carries it into the
    checkpoint, so that the nightly job computes the context of a new post exactly as the
    model's training data did, without the data root.
    """

    size: int
    documents: int
    document_frequencies: Mapping[str, int]

    def idf(self) -> dict[str, float]:
        return fit_idf(self.document_frequencies, self.documents)

    def user_context(self, counts: Mapping[str, int], vocab: Vocabulary,
                     idf: Mapping[str, float] | None = None) -> UserContext:
        """The context ranking of a user with these token ``counts`` (pass ``idf``, from
        :meth:`idf`, when making many)."""
        return UserContext(counts, self.idf() if idf is None else idf, vocab, self.size,
                           self.documents)

    def to_json(self, vocab: Vocabulary) -> dict[str, Any]:
        """Frequencies as a list aligned with the vocabulary's ids (0: never in training)."""
        return {"size": self.size, "documents": self.documents,
                "document_frequencies": [int(self.document_frequencies.get(t, 0))
                                         for t in vocab.tokens]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], vocab: Sequence[str]) -> ContextSpec:
        frequencies = data.get("document_frequencies")
        if not isinstance(frequencies, list) or len(frequencies) != len(vocab):
            raise ValueError(f"a context spec has {len(vocab)} document frequencies, one per "
                             f"token, got {type(frequencies).__name__} of "
                             f"{len(frequencies) if isinstance(frequencies, list) else '?'}")
        return cls(size=int(data["size"]), documents=int(data["documents"]),
                   document_frequencies={t: int(d) for t, d in zip(vocab, frequencies,
                                                                   strict=True) if d})
