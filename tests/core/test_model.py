"""CSMN model and decoding: shapes, the paper's parameter count, exactness of the fast forms
(parallel teacher forcing vs step by step, precomputed conv products vs literal eq. 9-10),
masking, initialization, learning, decoding."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from csmn.core.decoding import beam_search, dedupe, greedy_decode
from csmn.core.model import (
    CSMN,
    ModelConfig,
    aligned_linear,
    count_parameters,
    flops_per_token,
    linear_cross_entropy,
    sequence_loss,
)
from csmn.core.tokens import EOS_ID, GO_ID, PAD_ID, task_rules
from csmn.data.layout import LAYERS

VARIANTS = {
    "full": {},
    "NoCNN": {"use_cnn": False},
    "NoUC": {"use_user_context": False},
    "NoWO": {"use_word_output": False},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds spin-waiting, which on a
    busy 2-core machine made the file 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = dict(
        vocab_size=24, embed_dim=8, memory_dim=12, image_feature_dim=10, context_size=7,
        max_length=6, cnn_depth=5,
    )
    values.update(overrides)
    return ModelConfig(**values)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, scale: float = 0.4, dtype: torch.dtype = torch.float64,
               **overrides: object) -> CSMN:
    """A model with weights large enough that logits differ by O(1) between inputs (the
    paper's init makes the tiny model's logits almost constant, which would make equality
    checks vacuous)."""
    torch.manual_seed(seed)
    model = CSMN(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-scale, scale)
    return model


def tiny_batch(config: ModelConfig, batch: int = 3, steps: int = 5, seed: int = 1,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Image features, context ids (row 0 has 3 padded slots), input ids (row 1 is padded
    after 3 steps) and targets."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, config.image_feature_dim) if config.image_layer == "pool5" else (
        batch, config.image_slots, config.image_feature_dim)
    image = torch.rand(shape, generator=gen, dtype=dtype) * 2
    context = torch.randint(4, config.vocab_size, (batch, config.context_size), generator=gen)
    context[0, -3:] = PAD_ID
    targets = torch.randint(4, config.vocab_size, (batch, steps), generator=gen)
    targets[:, -1] = EOS_ID
    targets[1, 2] = EOS_ID
    targets[1, 3:] = PAD_ID
    inputs = torch.cat([torch.full((batch, 1), GO_ID), targets[:, :-1]], dim=1)
    inputs[1, 3:] = PAD_ID
    return image, context, inputs, targets


# ---- configuration ---------------------------------------------------------------------------


def test_variant_names_set_the_right_fields():
    assert ModelConfig.for_variant("CSMN-P5") == ModelConfig()
    r5c = ModelConfig.for_variant("R5C")
    assert r5c.image_layer == "res5c" and r5c.image_slots == 49
    assert ModelConfig.for_variant("CSMN-NoCNN-P5").use_cnn is False
    assert ModelConfig.for_variant("NoUC-R5C").use_user_context is False
    assert ModelConfig.for_variant("NoWO").use_word_output is False
    assert ModelConfig.for_variant("W80-P5").context_size == 80
    assert ModelConfig.for_variant("P5", vocab_size=60_000).vocab_size == 60_000
    with pytest.raises(ValueError):
        ModelConfig.for_variant("P7")
    with pytest.raises(ValueError):
        ModelConfig.for_variant("P5", no_such_field=1)


def test_readout_sizes_follow_the_paper():
    assert ModelConfig().state_dim == 3 * 3 * 300 == 2700
    assert ModelConfig.for_variant("R5C").state_dim == 2700
    assert ModelConfig.for_variant("NoUC").state_dim == 1800
    assert ModelConfig.for_variant("NoWO").state_dim == 1800
    assert ModelConfig.for_variant("NoCNN").state_dim == 3 * 1024


# ---- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "variant"), list(itertools.product(LAYERS, VARIANTS)))
def test_shapes_of_every_variant(layer: str, variant: str):
    model = tiny_model(image_layer=layer, **VARIANTS[variant])
    config = model.config
    image, context, inputs, _ = tiny_batch(config)
    out = model.teacher_forced(image, context, inputs)
    assert out.logits.shape == (3, 5, config.vocab_size)
    expected_types = ["image"] + (["context"] if config.use_user_context else []) + (
        ["output"] if config.use_word_output else [])
    assert list(out.attention) == expected_types
    slots = {"image": 1 if layer == "pool5" else 49, "context": 7, "output": 6}
    for name, weights in out.attention.items():
        assert weights.shape == (3, 5, slots[name])
    total = sum(w.sum(-1) for w in out.attention.values())
    torch.testing.assert_close(total, torch.ones_like(total))
    assert torch.isfinite(out.logits).all()


def test_res5c_accepts_channel_first_and_channel_last_maps():
    model = tiny_model(image_layer="res5c")
    image, context, inputs, _ = tiny_batch(model.config)
    reference = model(image, context, inputs)
    grid = image.view(3, 7, 7, model.config.image_feature_dim)
    torch.testing.assert_close(model(grid, context, inputs), reference)
    torch.testing.assert_close(model(grid.permute(0, 3, 1, 2), context, inputs), reference)
    with pytest.raises(ValueError):
        model(image[:, :10], context, inputs)


# ---- the paper's parameter count -------------------------------------------------------------


# Derived by hand from the paper's dimensions (V = 40,000, D = 60 does not add parameters):
#   word embeddings W_e^a, W_e^c, W_e^b: 3 x (40,000 x 512)              = 61,440,000
#   image memory W_im^a, W_im^c: 2 x (1,024 x 2,048 + 1,024 bias)        =  4,196,352
#   W_h (shared by user context and word output) 1,024 x 512 + 1,024    =    525,312
#   W_q 1,024 x 512 + 1,024                                              =    525,312
#   memory CNN of one memory type: filters (3 + 4 + 5) x 1,024 x 300
#       + one bias per filter 3 x 300                                     =  3,687,300
#     user context CNN + word output CNN: 2 x 3,687,300                  =  7,374,600
#   image read-out
#     pool5: one slot, projected to the CNN width: 1,024 x 900 + 900     =    922,500
#     res5c: a third memory CNN                                          =  3,687,300
#   W_o 2,700 x 2,700 + 2,700                                            =  7,292,700
#   W_f 2,700 x 40,000 (eq. 12 has no bias)                              = 108,000,000
# pool5: 61,440,000 + 4,196,352 + 525,312 + 525,312 + 7,374,600 + 922,500 + 7,292,700
#        + 108,000,000 = 190,276,776
# res5c: 190,276,776 - 922,500 + 3,687,300 = 193,041,576
PAPER_PARAMETERS = {"pool5": 190_276_776, "res5c": 193_041_576}


@pytest.mark.parametrize("layer", LAYERS)
def test_parameter_count_of_the_paper_configuration(layer: str):
    with torch.device("meta"):  # no memory, no init time: only shapes
        model = CSMN(ModelConfig(vocab_size=40_000, context_size=60, image_layer=layer))
    assert count_parameters(model) == PAPER_PARAMETERS[layer]


# ---- exactness of the fast forms -------------------------------------------------------------


@pytest.mark.parametrize(("layer", "variant"), list(itertools.product(LAYERS, VARIANTS)))
def test_parallel_teacher_forcing_equals_step_by_step_decoding(layer: str, variant: str):
    model = tiny_model(image_layer=layer, **VARIANTS[variant])
    image, context, inputs, targets = tiny_batch(model.config)
    parallel = model.teacher_forced(image, context, inputs)
    state = model.start_decoding(image, context)
    step_logits, step_attention = [], []
    for step in range(inputs.shape[1]):
        logits, attention, state = model.decode_step(state, inputs[:, step])
        step_logits.append(logits)
        step_attention.append(attention)
    stepwise = torch.stack(step_logits, dim=1)
    real = targets != PAD_ID  # after a sequence ends the step-by-step run was fed padding
    assert parallel.logits.std() > 0.1  # the comparison is not between near-constants
    torch.testing.assert_close(parallel.logits[real], stepwise[real], atol=1e-5, rtol=0)
    for name in parallel.attention:
        stacked = torch.stack([a[name] for a in step_attention], dim=1)
        torch.testing.assert_close(parallel.attention[name][real], stacked[real],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize(("layer", "variant"), list(itertools.product(LAYERS, VARIANTS)))
def test_precomputed_conv_products_equal_the_literal_memory_cnn(layer: str, variant: str):
    model = tiny_model(image_layer=layer, **VARIANTS[variant])
    image, context, inputs, targets = tiny_batch(model.config)
    fast = model(image, context, inputs)
    literal = model(image, context, inputs, literal=True)
    torch.testing.assert_close(fast, literal, atol=1e-10, rtol=0)
    # ... and so are the gradients.
    grads = []
    for use_literal in (False, True):
        model.zero_grad()
        sequence_loss(model(image, context, inputs, literal=use_literal), targets).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=0,
                                   msg=name)


def test_efficient_form_also_matches_in_float32():
    model = tiny_model(dtype=torch.float32)
    image, context, inputs, _ = tiny_batch(model.config, dtype=torch.float32)
    torch.testing.assert_close(model(image, context, inputs),
                               model(image, context, inputs, literal=True),
                               atol=1e-5, rtol=1e-5)


def test_aligned_linear_pads_without_changing_results():
    torch.manual_seed(0)
    layer = torch.nn.Linear(45, 7).double()
    inputs = torch.randn(3, 4, 45, dtype=torch.float64, requires_grad=True)
    padded = aligned_linear(inputs, layer, multiple=8)
    plain = layer(inputs)
    torch.testing.assert_close(padded, plain)
    (grad_padded,) = torch.autograd.grad(padded.sum(), inputs)
    (grad_plain,) = torch.autograd.grad(plain.sum(), inputs)
    torch.testing.assert_close(grad_padded, grad_plain)


# ---- masking ---------------------------------------------------------------------------------


def test_padded_context_and_future_output_slots_get_zero_attention():
    model = tiny_model()
    image, context, inputs, _ = tiny_batch(model.config)
    attention = model.teacher_forced(image, context, inputs).attention
    assert (attention["context"][0, :, -3:] == 0).all()  # row 0's padded context slots
    assert (attention["context"][0, :, :-3] > 0).all()
    output = attention["output"]
    steps, slots = output.shape[1:]
    future = torch.arange(slots).unsqueeze(0) >= torch.arange(steps).unsqueeze(1)
    assert (output[:, future] == 0).all()  # slot j holds y_{j+1}: seen only from step j+1
    assert (output[0][~future] > 0).all()
    assert (output[1, :, 2:] == 0).all()  # row 1: slots of padding


def test_padded_slot_contents_do_not_change_outputs():
    model = tiny_model()
    image, context, inputs, targets = tiny_batch(model.config)
    reference = model(image, context, inputs)
    with torch.no_grad():
        model.embed_input.weight[PAD_ID].normal_(0, 5.0)
        model.embed_output.weight[PAD_ID].normal_(0, 5.0)
    torch.testing.assert_close(model(image, context, inputs), reference, atol=0, rtol=0)


def test_future_words_do_not_change_earlier_steps():
    model = tiny_model()
    image, context, inputs, _ = tiny_batch(model.config)
    reference = model(image, context, inputs)
    changed = inputs.clone()
    changed[:, 3:] = torch.where(changed[:, 3:] == PAD_ID, PAD_ID, 5)
    torch.testing.assert_close(model(image, context, changed)[:, :3], reference[:, :3],
                               atol=0, rtol=0)


# ---- initialization --------------------------------------------------------------------------


def test_initialization_in_the_papers_range():
    torch.manual_seed(0)
    config = tiny_config(vocab_size=200, embed_dim=16, memory_dim=32, image_feature_dim=48,
                         context_size=8, max_length=8, cnn_depth=20)
    model = CSMN(config)
    state = 3 * 3 * 20  # c_t: three memory types x three widths x depth
    # uniform +-sqrt(3/dim), dim = the input size of the map (V for an embedding).
    expected = {
        "embed_input.weight": 200, "embed_output.weight": 200, "embed_query.weight": 200,
        "image_input.weight": 48, "image_output.weight": 48,
        "word_hidden.weight": 16, "query.weight": 16,
        "readouts.image.projection.weight": 32,
        "readouts.context.weights.0": 3 * 32, "readouts.context.weights.1": 4 * 32,
        "readouts.context.weights.2": 5 * 32,
        "readouts.output.weights.0": 3 * 32, "readouts.output.weights.1": 4 * 32,
        "readouts.output.weights.2": 5 * 32,
        "hidden.weight": state, "vocab.weight": state,
    }
    for name, param in model.named_parameters():
        if name in expected:
            bound = math.sqrt(3.0 / expected[name])
            assert param.abs().max() <= bound, name
            assert param.abs().max() > 0.9 * bound, name  # uses the whole range
            assert abs(param.mean().item()) < 0.1 * bound, name
        else:
            assert "bias" in name, name
            assert (param == 0).all(), name


# ---- learning --------------------------------------------------------------------------------


def test_loss_averages_over_real_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9)
    targets = torch.tensor([[5, 6, EOS_ID, PAD_ID], [7, EOS_ID, PAD_ID, PAD_ID]])
    loss = sequence_loss(logits, targets)
    log_probs = torch.log_softmax(logits, -1)
    real = [(0, 0, 5), (0, 1, 6), (0, 2, EOS_ID), (1, 0, 7), (1, 1, EOS_ID)]
    by_hand = -sum(log_probs[b, t, y] for b, t, y in real) / 5
    torch.testing.assert_close(loss, by_hand)
    longer_logits = torch.cat([logits, torch.randn(2, 3, 9) * 100], dim=1)
    longer_targets = torch.cat([targets, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(sequence_loss(longer_logits, longer_targets), loss)
    assert sequence_loss(logits, torch.zeros_like(targets)) == 0


def ragged_batch(config: ModelConfig, lengths: tuple[int, ...], steps: int, seed: int = 1,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """A batch padded to ``steps`` whose rows have ``lengths`` real targets (the last _EOS)."""
    image, context, _, targets = tiny_batch(config, len(lengths), steps, seed, dtype)
    for row, length in enumerate(lengths):
        targets[row, length - 1] = EOS_ID
        targets[row, length:] = PAD_ID
    inputs = torch.cat([torch.full((len(lengths), 1), GO_ID), targets[:, :-1]], dim=1)
    return image, context, inputs, targets


def _gradients(model: CSMN, loss: torch.Tensor) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("layer,variant", [(layer, variant) for layer in LAYERS
                                           for variant in VARIANTS])
@pytest.mark.parametrize("lengths", [(5, 3, 2), (12, 1, 4), (1, 1)])
def test_real_token_loss_and_gradients_equal_the_padded_form(layer: str, variant: str,
                                                             lengths: tuple[int, ...]):
    # max_length 12 and a longest row of 5: both the steps and the output slots get cut.
    model = tiny_model(image_layer=layer, max_length=12, **VARIANTS[variant])
    image, context, inputs, targets = ragged_batch(model.config, lengths, steps=12)
    padded = sequence_loss(model(image, context, inputs), targets)
    real, tokens = model.training_loss(image, context, inputs, targets)
    assert int(tokens) == sum(lengths)
    torch.testing.assert_close(real, padded, rtol=1e-12, atol=1e-12)
    for new, old in zip(_gradients(model, real), _gradients(model, padded), strict=True):
        torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_tokens", [None, 2, 4])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(chunk_tokens):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=gen)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets,
                                                 reduction="sum")
    loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # A scale on the way back, as the mean over tokens puts there.
    scale = torch.tensor(0.3, dtype=torch.float64)
    got = torch.autograd.grad(loss * scale, (hidden, weight))
    want = torch.autograd.grad(expected * scale, (hidden, weight))
    for new, old in zip(got, want, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_tokens),
                                   expected.detach(), rtol=1e-12, atol=1e-12)


def test_linear_cross_entropy_in_float32_over_more_rows_than_a_softmax_pass():
    # 40 x 30,000 logits: more than one cache-sized pass (2^20) of the bf16 path; float32
    # on the CPU turns them in one in-place log_softmax.
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(40, 16, generator=gen, requires_grad=True)
    weight = torch.randn(30_000, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 30_000, (40,), generator=gen)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets,
                                                 reduction="sum")
    loss = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(expected, (hidden, weight))
    for new, old in zip(got, want, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_chunked_real_token_loss_equals_the_unchunked_one():
    model = tiny_model(max_length=12)
    batch = ragged_batch(model.config, (5, 3, 2), steps=12)
    whole, tokens = model.training_loss(*batch)
    chunked, chunked_tokens = model(*batch[:3], target_ids=batch[3], chunk_tokens=3)
    assert int(chunked_tokens) == int(tokens) == 10
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for new, old in zip(_gradients(model, chunked), _gradients(model, whole), strict=True):
        torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-12)


def test_real_token_loss_matches_the_literal_memory_cnn():
    model = tiny_model(image_layer="res5c", max_length=12)
    batch = ragged_batch(model.config, (5, 3, 2), steps=12)
    efficient, _ = model.training_loss(*batch)
    literal, _ = model.training_loss(*batch, literal=True)
    torch.testing.assert_close(efficient, literal, rtol=1e-12, atol=1e-12)


def test_real_token_loss_runs_under_bf16_autocast():
    # The GPU path's dtype, on the CPU: logits and the loss stay float32.
    model = tiny_model(dtype=torch.float32, max_length=12)
    batch = ragged_batch(model.config, (5, 3, 2), steps=12, dtype=torch.float32)
    exact, _ = model.training_loss(*batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, tokens = model.training_loss(*batch, chunk_tokens=4)
    assert loss.dtype == torch.float32 and int(tokens) == 10
    torch.testing.assert_close(loss, exact, rtol=0.05, atol=0.05)
    loss.backward()


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    config = tiny_config(vocab_size=30, embed_dim=16, memory_dim=24, cnn_depth=8)
    model = CSMN(config)
    image, context, inputs, targets = tiny_batch(config, batch=4, steps=5, seed=3,
                                                 dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        loss = sequence_loss(model(image, context, inputs), targets)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert first > 3.0  # about log(30) at the start
    assert loss.item() < 0.05
    decoded = greedy_decode(model, image, context)
    for row, ids in enumerate(decoded.token_ids):
        real = [t for t in targets[row].tolist() if t not in (PAD_ID, EOS_ID)]
        assert ids == real


# ---- decoding --------------------------------------------------------------------------------


def partly_trained_model(**overrides: object) -> tuple[CSMN, tuple[torch.Tensor, ...]]:
    """20 Adam steps on 6 posts: unlike a random model it ends posts at various lengths,
    and it is not yet so sure of itself that every search finds the same words."""
    torch.manual_seed(0)
    config = tiny_config(vocab_size=30, embed_dim=16, memory_dim=24, cnn_depth=8, **overrides)
    model = CSMN(config)
    batch = tiny_batch(config, batch=6, steps=5, seed=3, dtype=torch.float32)
    image, context, inputs, targets = batch
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        sequence_loss(model(image, context, inputs), targets).backward()
        optimizer.step()
    return model, batch


@pytest.mark.parametrize("variant", ["full", "NoWO"])
def test_beam_width_one_equals_greedy(variant: str):
    model, (image, context, _, _) = partly_trained_model(**VARIANTS[variant])
    greedy = greedy_decode(model, image, context)
    beam = beam_search(model, image, context, beam_width=1)
    lengths = greedy.lengths.tolist()
    assert min(lengths) < model.config.max_length and len(set(lengths)) > 2
    assert beam.token_ids == greedy.token_ids
    torch.testing.assert_close(beam.scores, greedy.scores)
    torch.testing.assert_close(beam.lengths, greedy.lengths)
    for name in greedy.attention:
        torch.testing.assert_close(beam.attention[name], greedy.attention[name])


def test_greedy_decoding_is_the_argmax_of_teacher_forced_logits():
    model, (image, context, _, _) = partly_trained_model()
    decoded = greedy_decode(model, image, context)
    for row, ids in enumerate(decoded.token_ids):
        steps = int(decoded.lengths[row])
        emitted = ids + [EOS_ID] if steps > len(ids) else ids
        inputs = torch.tensor([[GO_ID] + emitted[:-1]])
        out = model.teacher_forced(image[row:row + 1], context[row:row + 1], inputs)
        logits = out.logits[0].clone()
        logits[:, [PAD_ID, GO_ID]] = float("-inf")
        assert logits.argmax(-1).tolist() == emitted
        for name, weights in decoded.attention.items():
            torch.testing.assert_close(weights[row, :steps], out.attention[name][0])
            assert (weights[row, steps:] == 0).all()


def test_beam_search_is_exact_when_the_beam_holds_every_hypothesis():
    model = tiny_model(scale=0.6, vocab_size=8)  # words: _EOS, _UNK and ids 4..7
    image, context, _, _ = tiny_batch(model.config, batch=2)
    length = 3
    emittable = [i for i in range(8) if i not in (PAD_ID, GO_ID)]
    for row in range(2):
        best_score, best_words = -math.inf, None
        for n in range(1, length + 1):
            for seq in itertools.product(emittable, repeat=n):
                ends = seq[-1] == EOS_ID
                if EOS_ID in seq[:-1] or (n < length and not ends):
                    continue
                inputs = torch.tensor([[GO_ID, *seq[:-1]]])
                log_probs = torch.log_softmax(
                    model(image[row:row + 1], context[row:row + 1], inputs)[0].float(), -1)
                score = sum(log_probs[t, y].item() for t, y in enumerate(seq))
                if score > best_score:
                    best_score, best_words = score, [t for t in seq if t != EOS_ID]
        # hypotheses alive at the last step: 1 + 5 finished, 5 x 5 open, each x 6 words
        beam = beam_search(model, image[row:row + 1], context[row:row + 1], beam_width=160,
                           max_length=length)
        assert beam.token_ids[0] == best_words
        assert beam.scores[0].item() == pytest.approx(best_score, abs=1e-4)


def peaked_model() -> CSMN:
    """A model that always ranks word 5 > 6 > 7 > _EOS > the rest."""
    model = tiny_model(scale=0.6)
    with torch.no_grad():
        model.vocab.weight.zero_()
        for token, weight in ((5, 3.0), (6, 2.0), (7, 1.0), (EOS_ID, 0.5)):
            model.vocab.weight[token] = weight
    return model


def test_hashtag_duplicates_removed_after_decoding_or_blocked_while_decoding():
    assert dedupe([5, 6, 5, 7, 6]) == [5, 6, 7]
    model = peaked_model()
    image, context, _, _ = tiny_batch(model.config, batch=2)
    plain = greedy_decode(model, image, context)
    assert plain.token_ids == [[5] * 6, [5] * 6]  # max_length tokens, no _EOS
    assert greedy_decode(model, image, context, dedupe_tokens=True).token_ids == [[5], [5]]
    blocked = greedy_decode(model, image, context, block_repeats=True)
    assert blocked.token_ids == [[5, 6, 7], [5, 6, 7]]  # then _EOS
    assert blocked.lengths.tolist() == [4, 4]
    # Blocking makes every order of 5, 6, 7 about equally likely: any may win the beam.
    beam = beam_search(model, image, context, beam_width=3, block_repeats=True)
    assert [sorted(ids) for ids in beam.token_ids] == [[5, 6, 7], [5, 6, 7]]
    assert beam_search(model, image, context, beam_width=3, dedupe_tokens=True).token_ids == [
        [5], [5]]
    assert greedy_decode(model, image, context, max_length=2).token_ids == [[5, 5], [5, 5]]


def constant_logits_model(eos_weight: float) -> CSMN:
    """A model whose every step gives each of the 20 words (ids 4..23) weight 1 and _EOS
    ``eos_weight`` (softmax weights, i.e. exp of the logits): h_t is all ones (W_o = 0,
    b_o = 1), and each row of W_f sums to the token's logit."""
    model = tiny_model()
    state_dim = model.config.state_dim
    with torch.no_grad():
        model.hidden.weight.zero_()
        model.hidden.bias.fill_(1.0)
        model.vocab.weight.zero_()
        model.vocab.weight[EOS_ID] = math.log(eos_weight) / state_dim
    return model


def test_stop_rules_end_a_sequence_when_eos_is_likely_not_when_it_beats_each_word():
    # _EOS 15.5 against 20 words of 1: the most probable token, but P(_EOS) = 15.5/35.5.
    model = constant_logits_model(15.5)
    image, context, _, _ = tiny_batch(model.config, batch=2)
    paper = greedy_decode(model, image, context, block_repeats=True)
    assert paper.token_ids == [[], []] and paper.lengths.tolist() == [1, 1]
    # Ending is more probable than going on once blocking has left 15 words: 15.5/30.5 after
    # five words, 15.5/31.5 after four (ties go to the lowest id).
    likely = greedy_decode(model, image, context, block_repeats=True, eos_threshold=0.5)
    assert likely.token_ids == [[4, 5, 6, 7, 8], [4, 5, 6, 7, 8]]
    assert likely.lengths.tolist() == [6, 6]  # the _EOS step included
    # Without blocking P(_EOS) stays 15.5/35.5: the post runs to max_length without _EOS.
    unblocked = greedy_decode(model, image, context, eos_threshold=0.5)
    assert unblocked.token_ids == [[4] * 6, [4] * 6]
    beam = beam_search(model, image, context, beam_width=3, block_repeats=True,
                       eos_threshold=0.5)
    assert [len(set(ids)) for ids in beam.token_ids] == [5, 5]
    # A step where _EOS holds half or more ends the sequence under both rules.
    sure = constant_logits_model(21.0)
    for threshold in (None, 0.5):
        assert greedy_decode(sure, image, context, eos_threshold=threshold).token_ids == [
            [], []]
    # The project's rule is the default of every task; the paper's is one switch away.
    assert task_rules("hashtag")["eos_threshold"] == task_rules("post")["eos_threshold"] == 0.5
    assert task_rules("hashtag", stop="paper")["eos_threshold"] is None
    with pytest.raises(ValueError, match="stop must be one of likely, paper"):
        task_rules("hashtag", stop="never")


# ---- FLOP accounting -------------------------------------------------------------------------


def test_flop_counts_match_the_design_notes():
    flops = flops_per_token(ModelConfig())
    # docs/method.md rounds the literal memory CNN to 0.44 GFLOP/token on the context memory and
    # 0.12 on the output memory (slots x widths). Counting the valid positions exactly:
    # context: 2 x 1,024 x 300 x (58 x 3 + 57 x 4 + 56 x 5) + the attention scaling 2 x 60 x 1,024
    assert flops.literal["context_readout"] == 2 * 1024 * 300 * 682 + 2 * 60 * 1024
    assert flops.literal["context_readout"] == pytest.approx(0.44e9, rel=0.05)
    # output: 2 x 1,024 x 300 x (14 x 3 + 13 x 4 + 12 x 5) + 2 x 16 x 1,024
    assert flops.literal["output_readout"] == 2 * 1024 * 300 * 154 + 2 * 16 * 1024
    # ... the output layer 2 x 2,700 x 40,000 = 0.216 GFLOP ...
    assert flops.literal["vocab_W_f"] == flops.efficient["vocab_W_f"] == 2 * 2700 * 40_000
    # ... and precomputing W_k M[j] once per sequence of 16 steps divides the CNN by ~16.
    assert flops.efficient["context_readout"] < flops.literal["context_readout"] / 14
    assert 2.5 < flops.literal_total / flops.efficient_total < 3.5


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layer", LAYERS)
def test_cuda_matches_cpu_and_runs_under_bf16_autocast(layer: str):
    cpu_model = tiny_model(image_layer=layer)
    image, context, inputs, targets = tiny_batch(cpu_model.config)
    reference = cpu_model(image, context, inputs)
    model = copy.deepcopy(cpu_model).float().cuda()
    batch = [t.cuda() for t in (image.float(), context, inputs, targets)]
    image, context, inputs, targets = batch
    torch.backends.cuda.matmul.allow_tf32 = False
    logits = model(image, context, inputs)
    torch.testing.assert_close(logits.double().cpu(), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(image, context, inputs, literal=True), logits,
                               atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sequence_loss(model(image, context, inputs), targets)
        loss.backward()
        decoded = beam_search(model, image, context, beam_width=2)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert len(decoded.token_ids) == 3
