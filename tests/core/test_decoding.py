"""Decoding never emits _PAD, _GO or _UNK, greedy or beam, whatever else a caller bans."""

from __future__ import annotations

import torch
from helpers import rig_logits

from csmn.core.decoding import beam_search, greedy_decode
from csmn.core.model import CSMN, ModelConfig
from csmn.core.tokens import EOS_ID, GO_ID, NEVER_EMITTED_IDS, PAD_ID, UNK_ID

ID = {"#x": 4}


def rigged(preferences: dict[int, float]) -> CSMN:
    torch.manual_seed(0)
    model = CSMN(ModelConfig(vocab_size=10, embed_dim=8, memory_dim=16, context_size=5,
                             max_length=8, cnn_depth=4)).eval()
    return rig_logits(model, preferences)


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(batch, 2048), torch.zeros(batch, 5, dtype=torch.long)


def test_never_emitted_tokens_are_banned_in_greedy_and_beam_decoding():
    # every step's favourites are the three never-emitted tokens, then #x; _EOS far behind
    # (beam search would otherwise keep the short, finished hypothesis)
    model = rigged({PAD_ID: 9.0, GO_ID: 8.0, UNK_ID: 7.0, ID["#x"]: 5.0, EOS_ID: -20.0})
    image, context = _inputs(3)
    for result in (greedy_decode(model, image, context),
                   beam_search(model, image, context, beam_width=3)):
        assert result.token_ids == [[ID["#x"]] * 8] * 3
    # a caller's own bans add to them (the benchmark bans _EOS): they never lift them
    greedy = greedy_decode(model, image, context, banned_ids=(PAD_ID, GO_ID, EOS_ID))
    assert greedy.token_ids == [[ID["#x"]] * 8] * 3
    beam = beam_search(model, image, context, beam_width=2, banned_ids=(ID["#x"],))
    emitted = {t for row in beam.token_ids for t in row}
    assert emitted and emitted <= set(range(5, 10))  # other real words only
    assert not emitted & set(NEVER_EMITTED_IDS)
