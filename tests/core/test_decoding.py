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


def _phrases(words: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def test_post_texts_never_hold_a_phrase_twice_greedy_or_beam():
    # x > y > z > the rest at every step, whatever came before: the model loops on x x y
    x, y, z = 4, 5, 6
    model = rigged({x: 5.0, y: 4.0, z: 3.0, EOS_ID: -20.0})
    image, context = _inputs(2)
    runs_only = greedy_decode(model, image, context, max_run=2)
    assert runs_only.token_ids[0] == [x, x, y, x, x, y, x, x]
    # the third x x y would repeat a phrase: z instead, then x x again
    rules = {"max_run": 2, "no_repeat_ngram": 3}
    greedy = greedy_decode(model, image, context, **rules)
    assert greedy.token_ids == [[x, x, y, x, x, z, x, x]] * 2
    for result in (greedy, beam_search(model, image, context, beam_width=3, **rules)):
        for words in result.token_ids:
            assert len(words) == 8
            assert len(set(_phrases(words, 3))) == len(_phrases(words, 3))
            assert all(len(set(run)) > 1 for run in _phrases(words, 3))
    # one-word phrases: every word at most once, as block_repeats
    assert (greedy_decode(model, image, context, no_repeat_ngram=1).token_ids
            == greedy_decode(model, image, context, block_repeats=True).token_ids)


def test_the_post_rule_holds_for_a_random_model():
    # a random model decodes whatever it likes; under the post rule no 3-word phrase twice
    from csmn.core.tokens import task_rules

    torch.manual_seed(3)
    model = CSMN(ModelConfig(vocab_size=12, embed_dim=8, memory_dim=16, context_size=5,
                             max_length=16, cnn_depth=4)).eval()
    image, context = torch.randn(16, 2048), torch.randint(4, 12, (16, 5))
    rules = {k: v for k, v in task_rules("post").items() if k != "eos_threshold"}
    rules["banned_ids"] = (EOS_ID,)  # 16 words each: the most room for a loop
    for result in (greedy_decode(model, image, context, **rules),
                   beam_search(model, image, context, beam_width=4, **rules)):
        for words in result.token_ids:
            assert len(words) == 16
            assert len(set(_phrases(words, 3))) == len(_phrases(words, 3))
    loose = greedy_decode(model, image, context, banned_ids=(EOS_ID,))
    assert any(len(set(_phrases(w, 3))) < len(_phrases(w, 3)) for w in loose.token_ids)
