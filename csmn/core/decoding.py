"""Batched greedy decoding (the paper's inference, 4.2) and batched beam search.

Both decode many posts at once and are incremental: the image and context memories, with
their memory-CNN products, are computed once per post, and each generated word adds one slot
to the output memory (its products computed once, like a KV cache); no step recomputes the
prefix. Decoding stops at ``_EOS`` or after ``max_length`` tokens (16 in the paper).

For hashtags the paper removes duplicates after decoding (4.2, ``dedupe_tokens=True``);
``block_repeats=True`` instead forbids a post's already emitted words while decoding. Which
the project uses is ``csmn.core.tokens.task_rules``: a hashtag list never holds a tag twice (the
preprocessing drops duplicates), so a repeated tag is a step the model wastes; forbidding it
gives the step's probability to the other tags, the model's distribution conditioned on what
every real list satisfies. Measured on the niche archive split by users (README), the model
repeats its first tags (9 steps, 3 distinct tags on average), and blocking raises CSMN-P5's
F1 from 0.125 to 0.175 on the same checkpoint. ``max_run=k`` forbids a word a (k+1)-th
time in a row (post texts: ``so so so``); ``no_repeat_ngram=n`` forbids the word that would
make an n-word phrase the post already holds (post texts: ``time for beach time for beach``).

The paper ends a sequence when ``_EOS`` is the most probable token (4.2). ``eos_threshold=p``
ends it once P(_EOS) >= p and otherwise takes the most probable word: with many plausible
words the paper's rule ends a list when _EOS beats each of them alone, though the model puts
most of the step's probability on going on (csmn.core.tokens, the stop rules).

``_PAD``, ``_GO`` and ``_UNK`` are never emitted (``NEVER_EMITTED_IDS``): padding and the start
symbol are not words, and ``_UNK`` is a guess that is always wrong, so the step takes the most
probable real word instead. ``banned_ids`` adds to them, it never lifts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from csmn.core.model import CSMN
from csmn.core.tokens import EOS_ID, GO_ID, NEVER_EMITTED_IDS, PAD_ID

# Always banned, whatever a caller adds.
DEFAULT_BANNED_IDS: tuple[int, ...] = NEVER_EMITTED_IDS


@dataclass
class DecodeResult:
    """Decoded posts. ``token_ids[i]``: post i's words, without ``_EOS`` (deduplicated when
    asked). ``attention[type]``: [B, steps, slots] for ``image``, ``context`` and ``output``
    (the types the model has), one row per decoding step, zero after the post ended.
    ``scores``: the sum of the chosen words' log-probabilities, ``_EOS`` included.
    ``lengths``: decoding steps per post (``_EOS`` step included)."""

    token_ids: list[list[int]]
    scores: Tensor
    lengths: Tensor
    attention: dict[str, Tensor]


def dedupe(token_ids: Sequence[int]) -> list[int]:
    """First occurrence of each id, in order (the paper's hashtag post-processing)."""
    seen: set[int] = set()
    kept = []
    for token in token_ids:
        if token not in seen:
            seen.add(token)
            kept.append(token)
    return kept


def _ban_repeated_ngrams(log_probs: Tensor, history: Tensor, n: int) -> None:
    """Forbid, in each row, every word that would complete an n-word phrase already in the
    row's history (the phrase's first n - 1 words are the row's last n - 1)."""
    if n < 1:
        raise ValueError(f"no_repeat_ngram must be >= 1, got {n}")
    if history.shape[1] < n:
        return
    phrases = history.unfold(1, n, 1)  # [B, phrases, n]: every n-gram so far
    last = history[:, history.shape[1] - (n - 1):].unsqueeze(1)
    rows, starts = (phrases[:, :, :-1] == last).all(dim=-1).nonzero(as_tuple=True)
    log_probs[rows, phrases[rows, starts, -1]] = float("-inf")


def _log_probs(logits: Tensor, history: Tensor | None, banned_ids: Sequence[int],
               block_repeats: bool, max_run: int | None = None,
               eos_threshold: float | None = None,
               no_repeat_ngram: int | None = None) -> Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_probs[:, sorted(set(NEVER_EMITTED_IDS) | set(banned_ids))] = float("-inf")
    if block_repeats and history is not None and history.shape[1] > 0:
        # history holds only real words (finished rows are not decoded further).
        log_probs.scatter_(1, history, float("-inf"))
    if max_run is not None and history is not None and history.shape[1] >= max_run:
        last = history[:, -max_run:]
        run = (last == last[:, :1]).all(dim=1)
        rows = run.nonzero().squeeze(1)
        log_probs[rows, last[rows, 0]] = float("-inf")
    if no_repeat_ngram is not None and history is not None:
        _ban_repeated_ngrams(log_probs, history, no_repeat_ngram)
    if eos_threshold is not None:
        # P(_EOS) among the tokens still allowed: the bans condition the distribution. A row
        # with no word left allowed ends.
        eos = log_probs[:, EOS_ID].clone()
        log_probs[:, EOS_ID] = float("-inf")
        no_word = log_probs.amax(dim=-1) == float("-inf")
        allowed = torch.logaddexp(torch.logsumexp(log_probs, dim=-1), eos)
        ending = ((eos - allowed) >= math.log(eos_threshold)) | no_word
        log_probs[ending] = float("-inf")
        log_probs[:, EOS_ID] = torch.where(ending, eos, float("-inf"))
    return log_probs


def _finish(history: Tensor, scores: Tensor, lengths: Tensor,
            attention: dict[str, Tensor], dedupe_tokens: bool) -> DecodeResult:
    token_ids = []
    for row, length in zip(history.tolist(), lengths.tolist(), strict=True):
        words = [t for t in row[:length] if t not in (EOS_ID, PAD_ID)]
        token_ids.append(dedupe(words) if dedupe_tokens else words)
    return DecodeResult(token_ids, scores, lengths, attention)


@torch.no_grad()
def greedy_decode(model: CSMN, image_features: Tensor, context_ids: Tensor | None,
                  max_length: int | None = None, *, block_repeats: bool = False,
                  dedupe_tokens: bool = False, max_run: int | None = None,
                  eos_threshold: float | None = None, no_repeat_ngram: int | None = None,
                  banned_ids: Sequence[int] = DEFAULT_BANNED_IDS) -> DecodeResult:
    """The paper's inference: the most probable word at every step, for a batch of posts
    (``max_run``: a word never more than that many times in a row; None: no limit;
    ``no_repeat_ngram``: no phrase of that many words twice in a post; None: no limit;
    ``eos_threshold``: end a post once P(_EOS) reaches it, else take the best word; None:
    once _EOS is the most probable token, as the paper).
    Posts that have emitted ``_EOS`` leave the batch once half of it is done, so the last
    steps cost only what the unfinished posts need."""
    max_length = _check_length(model, max_length)
    state = model.start_decoding(image_features, context_ids)
    batch = state.batch_size
    device = image_features.device
    history = torch.full((batch, max_length), PAD_ID, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    attention = _empty_attention(model, batch, max_length, device)
    rows = torch.arange(batch, device=device)  # the post of each row of ``state``
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    previous = torch.full((batch,), GO_ID, dtype=torch.long, device=device)
    for step in range(max_length):
        logits, step_attention, state = model.decode_step(state, previous)
        log_probs = _log_probs(logits, history[rows, :step], banned_ids, block_repeats,
                               max_run, eos_threshold, no_repeat_ngram)
        best, token = log_probs.max(dim=-1)
        live = alive.nonzero().squeeze(1)
        posts = rows[live]
        history[posts, step] = token[live]
        scores[posts] += best[live]
        lengths[posts] = step + 1
        for name, weights in step_attention.items():
            attention[name][posts, step] = weights[live].float()
        alive &= token != EOS_ID
        if not bool(alive.any()):
            break
        # Finished rows ride along (their words are not recorded) until half the rows are
        # done; then the batch is compacted, which copies the cached memories once.
        previous = torch.where(alive, token, EOS_ID)
        if int(alive.sum()) * 2 <= alive.numel():
            keep = alive.nonzero().squeeze(1)
            state, rows, previous = state.index_select(keep), rows[keep], previous[keep]
            alive = alive[keep]
    return _finish(history, scores, lengths, attention, dedupe_tokens)


@torch.no_grad()
def beam_search(model: CSMN, image_features: Tensor, context_ids: Tensor | None,
                beam_width: int = 5, max_length: int | None = None, *,
                block_repeats: bool = False, dedupe_tokens: bool = False,
                length_penalty: float = 0.0, max_run: int | None = None,
                eos_threshold: float | None = None, no_repeat_ngram: int | None = None,
                banned_ids: Sequence[int] = DEFAULT_BANNED_IDS) -> DecodeResult:
    """Beam search over a batch of posts (beam_width hypotheses each, all in one batch).
    ``eos_threshold`` as in greedy decoding, per hypothesis: one whose P(_EOS) reaches it can
    only end, any other can only go on; ``max_run`` and ``no_repeat_ngram`` per hypothesis too.
    A finished hypothesis keeps its score and competes with the open ones; the answer is the
    best of the final beams by ``score / length ** length_penalty`` (0: plain log-probability,
    so beam width 1 is greedy decoding)."""
    max_length = _check_length(model, max_length)
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    state = model.start_decoding(image_features, context_ids)
    batch = state.batch_size
    width = beam_width
    device = image_features.device
    state = state.index_select(torch.arange(batch, device=device).repeat_interleave(width))
    flat = batch * width
    vocab = model.config.vocab_size
    # Only the first beam of each post is alive at the start: all beams are the same there.
    beam_scores = torch.full((batch, width), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    history = torch.full((flat, 0), PAD_ID, dtype=torch.long, device=device)
    finished = torch.zeros(flat, dtype=torch.bool, device=device)
    lengths = torch.zeros(flat, dtype=torch.long, device=device)
    attention = {name: torch.zeros(flat, 0, slots, device=device)
                 for name, slots in model.config.memory_slots.items()}
    previous = torch.full((flat,), GO_ID, dtype=torch.long, device=device)
    base = (torch.arange(batch, device=device) * width).unsqueeze(1)
    for _ in range(max_length):
        logits, step_attention, state = model.decode_step(state, previous)
        log_probs = _log_probs(logits, history, banned_ids, block_repeats, max_run,
                               eos_threshold, no_repeat_ngram)
        # A finished hypothesis extends only by padding, at no cost.
        log_probs[finished] = float("-inf")
        log_probs[finished, PAD_ID] = 0.0
        candidates = beam_scores.unsqueeze(-1) + log_probs.view(batch, width, vocab)
        beam_scores, best = candidates.view(batch, width * vocab).topk(width, dim=-1)
        origin = (base + best // vocab).view(-1)
        token = (best % vocab).view(-1)
        state = state.reorder_output_memory(origin)  # origin stays within each post
        was_finished = finished[origin]
        history = torch.cat([history[origin], token.unsqueeze(1)], dim=1)
        lengths = torch.where(was_finished, lengths[origin], lengths[origin] + 1)
        for name, weights in step_attention.items():
            step_weights = weights.float()[origin].masked_fill(was_finished.unsqueeze(1), 0.0)
            attention[name] = torch.cat([attention[name][origin], step_weights.unsqueeze(1)],
                                        dim=1)
        finished = was_finished | (token == EOS_ID)
        if bool(finished.all()):
            break
        previous = torch.where(finished, EOS_ID, token)
    normalized = beam_scores / lengths.view(batch, width).clamp(min=1).float() ** length_penalty
    chosen = (torch.arange(batch, device=device) * width + normalized.argmax(dim=-1))
    return _finish(history[chosen], beam_scores.view(-1)[chosen], lengths[chosen],
                   {name: a[chosen] for name, a in attention.items()}, dedupe_tokens)


def decode(model: CSMN, image_features: Tensor, context_ids: Tensor | None,
           beam_width: int = 1, **options: object) -> DecodeResult:
    """Greedy decoding for beam_width 1 (the paper), beam search otherwise."""
    if beam_width == 1:
        options.pop("length_penalty", None)
        return greedy_decode(model, image_features, context_ids, **options)  # type: ignore[arg-type]
    return beam_search(model, image_features, context_ids, beam_width,
                       **options)  # type: ignore[arg-type]


def _check_length(model: CSMN, max_length: int | None) -> int:
    limit = model.config.max_length
    if max_length is None:
        return limit
    if not 1 <= max_length <= limit:
        # The output memory has max_length slots; a longer sequence has nowhere to go.
        raise ValueError(f"max_length must be in 1..{limit}, got {max_length}")
    return max_length


def _empty_attention(model: CSMN, batch: int, steps: int,
                     device: torch.device) -> dict[str, Tensor]:
    return {name: torch.zeros(batch, steps, slots, device=device)
            for name, slots in model.config.memory_slots.items()}


__all__ = ["DEFAULT_BANNED_IDS", "DecodeResult", "beam_search", "decode", "dedupe",
           "greedy_decode"]
