"""Vocabularies: the most frequent tokens of a training split, special tokens first.

Ids: ``_PAD``=0, ``_GO``=1, ``_EOS``=2, ``_UNK``=3, then tokens by count descending, ties by
the token string. The size counts the special tokens (as the authors' code did: a 40K
vocabulary holds 39,996 words). Out-of-vocabulary tokens encode to ``_UNK``.

Stored as ``<root>/vocab/<name>.json`` = ``{"tokens": [...], "context": {...}}`` (tokens in id
order; ``context``: how user contexts over this vocabulary are computed, see
:class:`csmn.text.user_context.ContextSpec`), where name is the
task (``caption``, ``hashtag``) or ``hashtag_by_posts`` for the hashtag task's split by posts
(its training split differs, so does its vocabulary): use :func:`vocab_name` /
:func:`vocab_uri` to find the right one for a split.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

from csmn.core.tokens import EOS_ID, GO_ID, PAD_ID, SPECIAL_TOKENS, UNK, UNK_ID
from csmn.data import storage
from csmn.data.layout import vocab_uri


def rank_tokens(counts: Mapping[str, int]) -> list[str]:
    """Tokens by count descending, ties by string (special tokens excluded)."""
    return sorted(
        (t for t, c in counts.items() if c > 0 and t not in SPECIAL_TOKENS),
        key=lambda t: (-counts[t], t),
    )


class Vocabulary:
    """Tokens in id order; ``context`` (JSON, optional) says how the user contexts over this
    vocabulary were computed, so that a model trained on it rebuilds them the same way."""

    def __init__(self, tokens: Sequence[str], context: dict[str, Any] | None = None):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary has duplicate tokens")
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}
        self.context = context

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], size: int) -> Vocabulary:
        """The ``size`` - 4 most frequent tokens after the special ones."""
        if size < len(SPECIAL_TOKENS):
            raise ValueError(f"vocabulary size {size} is smaller than the special tokens")
        ranked = rank_tokens(counts)[: size - len(SPECIAL_TOKENS)]
        return cls(list(SPECIAL_TOKENS) + ranked)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self.index

    def id_of(self, token: str) -> int:
        return self.index.get(token, UNK_ID)

    def is_word(self, token: str) -> bool:
        """In the vocabulary and not a special token."""
        i = self.index.get(token)
        return i is not None and i >= len(SPECIAL_TOKENS)

    def ids(self, tokens: Iterable[str]) -> list[int]:
        """``[id_of(t) for t in tokens]``, without a method call per token (preprocessing
        looks up 60 context words per example)."""
        return list(map(self.index.get, tokens, repeat(UNK_ID)))

    def encode(self, tokens: Iterable[str], add_eos: bool = True) -> list[int]:
        ids = self.ids(tokens)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> list[str]:
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID and stop_at_eos:
                break
            if i in (PAD_ID, GO_ID, EOS_ID):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return words

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": list(self.tokens)}
        if self.context is not None:
            out["context"] = self.context
        return out

    def save(self, uri: str) -> None:
        storage.write_json(uri, self.to_json())

    @classmethod
    def load(cls, uri: str) -> Vocabulary:
        data = storage.read_json(uri)
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise ValueError(f"{uri}: expected a JSON object with a 'tokens' list")
        context = data.get("context")
        if context is not None and not isinstance(context, dict):
            raise ValueError(f"{uri}: 'context' must be a JSON object")
        return cls(data["tokens"], context)


def load_vocab(root: str, task: str, split: str | None = None) -> Vocabulary:
    return Vocabulary.load(vocab_uri(root, task, split))
