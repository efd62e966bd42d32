"""The one way a trained CSMN answers posts: image features and user context words in,
words out (paper 4.2: greedy decoding, or beam search on request).

Every consumer decodes through :class:`Predictor`: the evaluation job's Ray Data actors, the
MLflow pyfunc and the nightly generation job. So the rules that turn words into ids and ids
back into words exist once:

- context words (the user's D TF-IDF words, paper 3.2) outside the checkpoint's vocabulary,
  and special tokens, are dropped, then the rest is cut to the model's context size D; a post
  with none left has every context slot masked (``used_context`` is False for it);
- decoding never emits ``_PAD``, ``_GO`` or ``_UNK`` (csmn.core.decoding), and an output id
  that is a special token never becomes a word;
- a hashtag list holds each tag once, and a post text no word three times in a row and no
  three-word phrase twice: such repeats are forbidden while decoding (``repeats="block"``),
  or, as the paper's 4.2 does, duplicate hashtags are removed afterwards
  (``repeats="paper"``; csmn.core.tokens);
- a sequence ends once P(_EOS) >= 1/2 (``stop="likely"``), or when _EOS is the most probable
  token, as the paper's 4.2 (``stop="paper"``; csmn.core.tokens).

Only torch and numpy: the predictor runs in a Ray actor, an MLflow model server or a plain
process alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from csmn.core.checkpoint import LoadedCheckpoint, load_checkpoint
from csmn.core.decoding import decode, dedupe
from csmn.core.tokens import BLOCK, FIRST_WORD_ID, LIKELY, task_rules


@dataclass
class Prediction:
    """Decoded posts, in input order. ``words[i]``: post i's words (a hashtag at most once).
    ``used_context[i]``: whether any of post i's context words reached the context memory.
    ``attention[i]`` (when asked): memory type (``image``, ``context``, ``output``) ->
    ``[steps, slots]`` attention of post i's decoding steps (paper eq. 5), ``_EOS`` step
    included."""

    words: list[list[str]]
    used_context: list[bool]
    attention: list[dict[str, np.ndarray]] | None = None


class Predictor:
    """A loaded checkpoint that decodes batches of posts.

    ``device``: ``cpu`` or ``cuda``; ``batch_size``: posts per decoding batch (a larger input
    is decoded in several); ``beam_width``: 1 is greedy decoding, the paper's;
    ``repeats``: ``block`` or ``paper``; ``stop``: ``likely`` or ``paper``
    (csmn.core.tokens.task_rules)."""

    def __init__(self, loaded: LoadedCheckpoint, *, device: str = "cpu", batch_size: int = 256,
                 beam_width: int = 1, repeats: str = BLOCK, stop: str = LIKELY):
        _check_device(device)
        if batch_size < 1 or beam_width < 1:
            raise ValueError(f"batch_size and beam_width must be >= 1, got {batch_size}, "
                             f"{beam_width}")
        self.model = loaded.model.to(device).eval()
        self.config = loaded.model_config
        self.vocab = list(loaded.vocab)
        self.task = loaded.task
        self.device, self.batch_size, self.beam_width = device, batch_size, beam_width
        self.rules = task_rules(self.task, repeats, stop)
        self._word_ids = {word: i for i, word in enumerate(self.vocab) if i >= FIRST_WORD_ID}

    @classmethod
    def from_checkpoint(cls, directory: str, **options: Any) -> Predictor:
        """Load the checkpoint folder (local or ``s3://``) straight onto ``options['device']``."""
        device = options.get("device", "cpu")
        _check_device(device)
        return cls(load_checkpoint(directory, device), **options)

    @property
    def feature_size(self) -> int:
        """Floats per image: 2048 for pool5, 49 x 2048 for res5c (slot-major)."""
        return self.config.image_slots * self.config.image_feature_dim

    def context_ids(self, words: Sequence[str] | str | None) -> list[int]:
        """The ids a post's context words take in the context memory (see the module)."""
        if words is None:
            return []
        if isinstance(words, str):
            words = words.split()
        ids = [self._word_ids[w] for w in words if w in self._word_ids]
        return ids[: self.config.context_size]

    def words_of(self, token_ids: Sequence[int]) -> list[str]:
        words = [self.vocab[i] for i in token_ids if FIRST_WORD_ID <= i < len(self.vocab)]
        return dedupe(words) if self.rules["dedupe_tokens"] else words

    def feature_matrix(self, features: np.ndarray | Sequence[Any]) -> np.ndarray:
        """``[N, slots, dim]`` float32 from ``[N, size]``, ``[N, slots, dim]`` or a sequence of
        rows; a row of the wrong size is refused with its index."""
        if isinstance(features, np.ndarray) and features.ndim >= 2:
            rows = features.reshape(len(features), -1)
            bad = [] if rows.shape[1] == self.feature_size else list(range(len(rows)))
        else:
            flat = [np.asarray(r, dtype=np.float32).reshape(-1) for r in features]
            bad = [i for i, r in enumerate(flat) if r.size != self.feature_size]
            rows = np.stack(flat) if flat and not bad else np.zeros((len(flat), 0), np.float32)
        if bad:
            raise ValueError(f"image features must hold {self.feature_size} floats per row for "
                             f"{self.config.image_layer}; rows {bad[:5]} do not")
        rows = np.require(rows, dtype=np.float32, requirements=["C", "W"])
        return rows.reshape(len(rows), self.config.image_slots, self.config.image_feature_dim)

    def predict(self, features: np.ndarray | Sequence[Any],
                contexts: Sequence[Sequence[str] | str | None], *,
                with_attention: bool = False) -> Prediction:
        """Decode every post: ``features`` one row per post, ``contexts`` its words."""
        matrix = self.feature_matrix(features)
        if len(contexts) != len(matrix):
            raise ValueError(f"{len(matrix)} feature rows but {len(contexts)} contexts")
        result = Prediction([], [], [] if with_attention else None)
        for start in range(0, len(matrix), self.batch_size):
            stop = start + self.batch_size
            self._predict_batch(matrix[start:stop], contexts[start:stop], result)
        return result

    def _predict_batch(self, matrix: np.ndarray, contexts: Sequence[Any],
                       result: Prediction) -> None:
        context = np.zeros((len(matrix), self.config.context_size), dtype=np.int64)
        for row, words in enumerate(contexts):
            ids = self.context_ids(words)
            context[row, : len(ids)] = ids
            result.used_context.append(bool(ids) and self.config.use_user_context)
        image = torch.from_numpy(matrix)
        if self.config.image_slots == 1:
            image = image.squeeze(1)
        decoded = decode(self.model, image.to(self.device),
                         torch.from_numpy(context).to(self.device),
                         beam_width=self.beam_width, block_repeats=self.rules["block_repeats"],
                         max_run=self.rules["max_run"],
                         no_repeat_ngram=self.rules["no_repeat_ngram"],
                         eos_threshold=self.rules["eos_threshold"])
        result.words.extend(self.words_of(ids) for ids in decoded.token_ids)
        if result.attention is not None:
            lengths = decoded.lengths.tolist()
            weights = {name: a.cpu().numpy() for name, a in decoded.attention.items()}
            result.attention.extend({name: w[row, :length] for name, w in weights.items()}
                                    for row, length in enumerate(lengths))


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked, but torch sees no GPU")


__all__ = ["Prediction", "Predictor"]
