"""User context for posts nobody has labelled yet: the nightly job's side of paper 4.1.

At training time a post's context comes from the user's kept posts minus the post itself
(:mod:`csmn.text.user_context`). A new post has no later posts to learn from, so its context
is built from the user's *history*: the posts created strictly before it. The history goes
through the same per-post rules as training data did (3.1: non-English, advertisement, too
short or too long for the task) and the same cap (the most recent ``max_posts_per_user``),
and is ranked with the vocabulary, D and document frequencies the model's training data used
(:class:`ContextSpec`, carried in the checkpoint). So the nightly context of a post equals
what preprocessing would have computed from the same posts.

A post without a time (layouts such as InstaPIC have none) cannot be placed on the user's
timeline: its history is every other post of the user, as in training. A post whose history
leaves no vocabulary word gets no context: the Predictor then masks every context slot.

One user at a time, in numpy: each new post costs one pass over the user's distinct words,
so a first run over a whole archive (every post new) stays linear in its posts per word.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from csmn.text.filters import FilterThresholds, length_rule, recency_key
from csmn.text.user_context import ContextSpec
from csmn.text.vocab import Vocabulary


@dataclass
class TaskContext:
    """What makes one model's contexts: its vocabulary, its :class:`ContextSpec` and the
    per-post thresholds of its training data; ``task`` names the tokens a post carries
    (``<task>_tokens``)."""

    task: str
    vocab: Vocabulary
    spec: ContextSpec
    thresholds: FilterThresholds

    def __post_init__(self) -> None:
        self.idf = self.spec.idf()


def eligible(post: dict[str, Any], task: str, thresholds: FilterThresholds) -> bool:
    """Whether a post could have been training data of ``task`` on its own (3.1's per-post
    rules; the per-user rules judge whole archives, not one user's history)."""
    if post["non_english"] or post["advertisement"]:
        return False
    return length_rule(len(post[f"{task}_tokens"]), thresholds.min_tokens,
                       thresholds.max_tokens) is None


class _UserWords:
    """One user's posts as count vectors over the vocabulary words they use."""

    def __init__(self, posts: Sequence[dict[str, Any]], context: TaskContext):
        vocab = context.vocab
        token_lists = [[t for t in p[f"{context.task}_tokens"] if vocab.is_word(t)]
                       for p in posts]
        self.words = sorted({t for tokens in token_lists for t in tokens})
        column = {w: i for i, w in enumerate(self.words)}
        self.counts = np.zeros((len(posts), len(self.words)), dtype=np.int64)
        for row, tokens in enumerate(token_lists):
            for token in tokens:
                self.counts[row, column[token]] += 1
        default = context.spec.user_context({}, vocab, context.idf)._default_idf
        self.idf = np.array([context.idf.get(w, default) for w in self.words], dtype=np.float64)
        self.size = context.spec.size

    def top(self, totals: np.ndarray) -> list[str]:
        """The D best words by count x IDF, ties by the word (as UserContext ranks them)."""
        present = np.flatnonzero(totals > 0)
        if not present.size:
            return []
        scores = totals[present] * self.idf[present]
        # self.words is sorted, so the column index is the tie-break by string
        order = np.lexsort((present, -scores))[: self.size]
        return [self.words[present[i]] for i in order]


def history_contexts(posts: Sequence[dict[str, Any]], new: Sequence[int],
                     context: TaskContext) -> dict[int, list[str]]:
    """For each index in ``new``, the context words of that post from its history among
    ``posts`` (one user's posts: ``post_id``, ``created_at``, ``non_english``,
    ``advertisement``, ``<task>_tokens``)."""
    if not len(new):
        return {}
    words = _UserWords(posts, context)
    cap = context.thresholds.max_posts_per_user
    usable = [i for i, p in enumerate(posts) if eligible(p, context.task, context.thresholds)]
    # Most recent first, undated last, ties by post id: the order of the training cap. The
    # history of a dated post is then one window of it: the dated posts older than it, the
    # first `cap` of them; prefix sums give any window's counts in one subtraction.
    order = sorted(usable, key=lambda i: recency_key(posts[i]))
    position = {i: k for k, i in enumerate(order)}
    prefix = np.zeros((len(order) + 1, len(words.words)), dtype=np.int64)
    if order:
        np.cumsum(words.counts[order], axis=0, out=prefix[1:])
    newest_first = [-posts[i]["created_at"].timestamp() for i in order
                    if posts[i]["created_at"] is not None]
    out = {}
    for i in new:
        created = posts[i]["created_at"]
        if created is None:
            # every other post of the user, the most recent `cap` of them
            stop = min(cap + 1, len(order))
            if position.get(i, len(order)) < stop:
                totals = prefix[stop] - words.counts[i]
            else:
                totals = prefix[min(cap, len(order))]
        else:
            first = bisect.bisect_right(newest_first, -created.timestamp())
            totals = prefix[min(first + cap, len(newest_first))] - prefix[first]
        out[i] = words.top(totals)
    return out


__all__ = ["TaskContext", "eligible", "history_contexts"]
