"""CSMN: the Context Sequence Memory Network (Park, Kim, Kim, CVPR 2017), sections 4.1-4.3.

Memory layout (eq. 1-7): up to three memory types, each with an input representation M^a
(attention keys) and an output representation M^c (what the memory CNN reads):

- ``image``: 1 slot (pool5) or 49 slots (res5c), ``ReLU(W_im I + b_im)``;
- ``context``: the user's D TF-IDF words, ``ReLU(W_h W_e u + b_h)``; id 0 marks padding;
- ``output``: the previously emitted words y_1..y_{t-1} in a fixed buffer of ``max_length``
  slots, ``ReLU(W_h W_e y + b_h)`` with the same W_h and W_e as the context memory.

Each step t: ``q_t = ReLU(W_q W_e^b y_{t-1} + b_q)``, ``p_t = softmax(M^a q_t)`` jointly over
the real slots of all memory types (padded and future slots are masked, so they get exactly
zero attention), a memory CNN per type reads ``p_t o M^c``, and
``logits = W_f ReLU(W_o c_t + b_o)``.

The speed idea (docs/method.md, "The model"): attention only rescales whole slots and a
convolution is linear before its ReLU, so ``(w * (p o M))[i] = sum_k p[i+k] (W_k M[i+k])``.
The products ``W_k M[j]`` are computed once per sequence (and once per generated word while
decoding), each step only weighs and sums them. ``literal=True`` computes the convolution over
``p o M`` as written in eq. 9-10: tests compare the two, the benchmark uses it as a baseline.

Only torch is imported here: the model runs on a GPU box without Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csmn.core.tokens import PAD_ID, SPECIAL_TOKENS
from csmn.data.names import IMAGE_SLOTS

MEMORY_TYPES = ("image", "context", "output")


@dataclass
class ModelConfig:
    """Model sizes; the defaults are the paper's (CSMN-P5, V = 40K, D = 60)."""

    vocab_size: int = field(default=40_000, metadata={"help": "V, special tokens included"})
    embed_dim: int = field(default=512, metadata={"help": "word embedding size (a, b, c)"})
    memory_dim: int = field(default=1024, metadata={"help": "memory slot size"})
    image_feature_dim: int = field(default=2048, metadata={"help": "ResNet-101 channels"})
    image_layer: str = field(default="pool5", metadata={"help": "pool5 (1 slot) | res5c (49)"})
    context_size: int = field(default=60, metadata={"help": "D, user context words"})
    max_length: int = field(default=16, metadata={"help": "output tokens and output slots"})
    cnn_widths: tuple[int, ...] = field(default=(3, 4, 5), metadata={"help": "filter widths"})
    cnn_depth: int = field(default=300, metadata={"help": "filters per width"})
    use_cnn: bool = field(default=True, metadata={"help": "False: the NoCNN variant"})
    use_user_context: bool = field(default=True, metadata={"help": "False: NoUC"})
    use_word_output: bool = field(default=True, metadata={"help": "False: NoWO"})

    def __post_init__(self) -> None:
        self.cnn_widths = tuple(int(w) for w in self.cnn_widths)
        if self.image_layer not in IMAGE_SLOTS:
            raise ValueError(f"image_layer must be one of {sorted(IMAGE_SLOTS)}, "
                             f"got {self.image_layer!r}")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {self.vocab_size} leaves no room for real words")
        if self.use_cnn:
            if not self.cnn_widths or min(self.cnn_widths) < 1:
                raise ValueError(f"cnn_widths must be positive, got {self.cnn_widths}")
            widest = max(self.cnn_widths)
            for name, slots in self.memory_slots.items():
                if name != "image" or self.image_slots > 1:
                    if slots < widest:
                        raise ValueError(f"{name} memory has {slots} slots, fewer than the "
                                         f"widest filter ({widest})")

    @classmethod
    def for_variant(cls, name: str, **overrides: object) -> ModelConfig:
        """The paper's variants (5.2) by name: parts joined by '-', e.g. ``CSMN-NoUC-R5C``,
        ``P5``, ``NoCNN-P5``, ``W80-R5C``. Parts: P5 | R5C (image layer), NoCNN, NoUC, NoWO,
        W<D> (context size). ``overrides`` set any other field (e.g. ``vocab_size``)."""
        values: dict[str, object] = {}
        for part in (p for p in name.replace("_", "-").split("-") if p):
            key = part.lower()
            if key == "csmn":
                continue
            if key == "p5":
                values["image_layer"] = "pool5"
            elif key == "r5c":
                values["image_layer"] = "res5c"
            elif key == "nocnn":
                values["use_cnn"] = False
            elif key == "nouc":
                values["use_user_context"] = False
            elif key == "nowo":
                values["use_word_output"] = False
            elif key.startswith("w") and key[1:].isdigit():
                values["context_size"] = int(key[1:])
            else:
                raise ValueError(f"unknown CSMN variant part {part!r} in {name!r}; known: "
                                 "CSMN, P5, R5C, NoCNN, NoUC, NoWO, W<context size>")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def image_slots(self) -> int:
        return IMAGE_SLOTS[self.image_layer]

    @property
    def memory_slots(self) -> dict[str, int]:
        """Slots per active memory type, in attention order."""
        slots = {"image": self.image_slots}
        if self.use_user_context:
            slots["context"] = self.context_size
        if self.use_word_output:
            slots["output"] = self.max_length
        return slots

    @property
    def cnn_out_dim(self) -> int:
        """Width of one memory type's CNN read-out (900 in the paper)."""
        return len(self.cnn_widths) * self.cnn_depth

    @property
    def readout_dim(self) -> int:
        """What one memory type adds to c_t: the CNN width, or a summed slot (NoCNN)."""
        return self.cnn_out_dim if self.use_cnn else self.memory_dim

    @property
    def state_dim(self) -> int:
        """Size of c_t and h_t (2,700 in the paper); W_o is square as in eq. 11."""
        return self.readout_dim * len(self.memory_slots)


# --------------------------------------------------------------------------------------------
# Read-outs: what turns one memory type's attention p and output memory M^c into part of c_t.
# Each has precompute (per sequence / per new slot), read (efficient) and read_literal.
# --------------------------------------------------------------------------------------------


class MemoryCNN(nn.Module):
    """Eq. 10 for one memory type: conv widths h over slots, depth filters each, ReLU, max-pool
    over positions, concatenated. One bias per filter (the paper's 49 x 300 bias shape cannot be
    meant: the output has 47/46/45 positions, and the authors' code uses a per-filter bias)."""

    def __init__(self, memory_dim: int, widths: tuple[int, ...], depth: int) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.depth = depth
        self.memory_dim = memory_dim
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(depth, memory_dim, width)) for width in self.widths])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.empty(depth)) for _ in self.widths])

    @property
    def out_dim(self) -> int:
        return len(self.widths) * self.depth

    def _stacked_filters(self) -> Tensor:
        # Rows ordered (width, offset k, filter f), so products[..., j, :] holds W_k M[j]
        # for every width and offset at once: one GEMM instead of one per offset.
        return torch.cat([w.permute(2, 0, 1).reshape(-1, self.memory_dim) for w in self.weights])

    def precompute(self, values: Tensor) -> Tensor:
        """[B, N, memory_dim] -> [B, N, sum(widths) * depth]: W_k M[j] for every slot j."""
        return F.linear(values, self._stacked_filters())

    def read(self, attention: Tensor, products: Tensor) -> Tensor:
        """attention [B, T, N], products [B, N, K] -> [B, T, out_dim]: eq. 10, exact up to
        the order of floating-point additions."""
        batch, slots, _ = products.shape
        steps = attention.shape[1]
        winners = []
        offset = 0
        with torch.no_grad():
            for width in self.widths:
                positions = slots - width + 1
                block = products[..., offset:offset + width * self.depth]
                block = block.reshape(batch, slots, width, self.depth)
                offset += width * self.depth
                # shifted[b, i, k, f] = W_k M[i + k] (filter f): what position i sums.
                shifted = torch.stack(
                    [block[:, k:k + positions, k, :] for k in range(width)], dim=2)
                # weights[b, i, t, k] = p_t[i + k]
                weights = attention.unfold(2, width, 1).permute(0, 2, 1, 3)
                # One small GEMM per (sequence, position): [T, width] @ [width, depth].
                conv = torch.matmul(weights, shifted)  # [B, positions, T, depth]
                # ReLU and "+ bias" are monotone, so they commute with the max over
                # positions: the winning position is that of the raw sums. max(...).indices,
                # not argmax: the same first-maximum rule, and on CPU at paper size it was
                # twice as fast over this strided dimension.
                best = conv.max(dim=1).indices  # [B, T, depth]
                del conv, shifted, weights
                # [b, t, k, f] = i* + k: the slots that the winning position of filter f sums,
                # in the column order of ``products`` (width, offset k, filter f).
                offsets = torch.arange(width, device=best.device).view(1, 1, -1, 1)
                winners.append((best.unsqueeze(2) + offsets).view(batch, steps, -1))
            index = winners[0] if len(winners) == 1 else torch.cat(winners, dim=-1)
        # The max-pool passes gradient to its winning position only, so the sum is
        # recomputed with autograd there alone: the [B, positions, T, depth] tensors are
        # neither kept for the backward pass nor rebuilt by it. One gather for every width:
        # its backward pass scatters into one gradient of ``products``.
        product_at = torch.gather(products, 1, index)  # products[b, i* + k, (w, k, f)]
        weight_at = torch.gather(attention, 2, index)  # p_t[i* + k]
        sums = (weight_at * product_at).split([w * self.depth for w in self.widths], dim=-1)
        pooled = [torch.relu(part.view(batch, steps, width, self.depth).sum(dim=2) + bias)
                  for part, width, bias in zip(sums, self.widths, self.biases, strict=True)]
        return torch.cat(pooled, dim=-1)

    def read_literal(self, attention: Tensor, values: Tensor) -> Tensor:
        """Eq. 9-10 as written: convolve the attended memory p_t o M^c at every step."""
        batch, steps, slots = attention.shape
        attended = attention.unsqueeze(-1) * values.unsqueeze(1)  # [B, T, N, memory_dim]
        attended = attended.reshape(batch * steps, slots, self.memory_dim).transpose(1, 2)
        pooled = [
            torch.relu(F.conv1d(attended, weight, bias)).amax(dim=-1)
            for weight, bias in zip(self.weights, self.biases, strict=True)
        ]
        return torch.cat(pooled, dim=-1).reshape(batch, steps, self.out_dim)


class AttendedSumProjection(nn.Module):
    """pool5 with the memory CNN on: the image memory is one slot, shorter than a width-3
    filter, so (as in the authors' code, its ``Wpool5`` layer) the attended image slot is
    projected to the CNN output width with a ReLU: ``ReLU(W (sum_j p_j M^c_j) + b)``. Being
    linear before the ReLU, ``W M^c_j`` is precomputed like the CNN products. It keeps c_t at
    3 x 900 = 2,700, the size the paper gives W_o."""

    def __init__(self, memory_dim: int, out_dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(memory_dim, out_dim)
        self.out_dim = out_dim

    def precompute(self, values: Tensor) -> Tensor:
        return F.linear(values, self.projection.weight)

    def read(self, attention: Tensor, products: Tensor) -> Tensor:
        return torch.relu(torch.matmul(attention, products) + self.projection.bias)

    def read_literal(self, attention: Tensor, values: Tensor) -> Tensor:
        attended = (attention.unsqueeze(-1) * values.unsqueeze(1)).sum(dim=2)
        return torch.relu(self.projection(attended))


class AttendedSum(nn.Module):
    """NoCNN: the paper drops the memory CNN but does not say what replaces it. We use the
    classic memory-network read-out (the attended output memory summed over its slots,
    ``sum_j p_j M^c_j``), per memory type, concatenated: c_t has 1,024 per type and W_o stays
    square. No parameters; the sum is already cheap, so nothing is precomputed."""

    def __init__(self, memory_dim: int) -> None:
        super().__init__()
        self.out_dim = memory_dim

    def precompute(self, values: Tensor) -> Tensor:
        return values

    def read(self, attention: Tensor, products: Tensor) -> Tensor:
        return torch.matmul(attention, products)

    def read_literal(self, attention: Tensor, values: Tensor) -> Tensor:
        return (attention.unsqueeze(-1) * values.unsqueeze(1)).sum(dim=2)


# --------------------------------------------------------------------------------------------
# Memories and decoder state
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryBank:
    """One memory type for a batch: keys M^a, values M^c, the read-out's precomputed products
    (W_k M^c per slot) and which slots are real (None: all)."""

    keys: Tensor
    values: Tensor
    products: Tensor
    mask: Tensor | None = None

    def index_select(self, index: Tensor) -> MemoryBank:
        return MemoryBank(
            keys=self.keys.index_select(0, index),
            values=self.values.index_select(0, index),
            products=self.products.index_select(0, index),
            mask=None if self.mask is None else self.mask.index_select(0, index),
        )


@dataclass
class DecoderState:
    """Everything step-by-step decoding keeps, like a KV cache: the image and context memories
    (computed once per post) and the output memory buffer, whose slot ``steps_taken - 1`` is
    filled when the next step is fed the word generated last."""

    banks: dict[str, MemoryBank]
    steps_taken: int = 0

    @property
    def batch_size(self) -> int:
        return self.banks["image"].keys.shape[0]

    def index_select(self, index: Tensor) -> DecoderState:
        """Rows ``index`` of the batch (beam reordering, dropping finished posts)."""
        return DecoderState({k: b.index_select(index) for k, b in self.banks.items()},
                            self.steps_taken)

    def reorder_output_memory(self, index: Tensor) -> DecoderState:
        """Rows ``index`` of the output memory only. For beam search, where ``index`` moves
        hypotheses among the rows of one post, whose image and context memories are the
        same: copying those (D x 3,600 products per row) every step would be waste."""
        banks = dict(self.banks)
        if "output" in banks:
            banks["output"] = banks["output"].index_select(index)
        return DecoderState(banks, self.steps_taken)


@dataclass
class CSMNOutput:
    logits: Tensor  # [B, T, V]
    attention: dict[str, Tensor]  # memory type -> [B, T, slots]; rows sum to 1 over all types


def image_slots_from_features(image_features: Tensor, config: ModelConfig) -> Tensor:
    """[B, F] (pool5), [B, S, F], [B, F, 7, 7] or [B, 7, 7, F] -> [B, S, F]."""
    feature_dim = config.image_feature_dim
    if image_features.dim() == 2:
        slots = image_features.unsqueeze(1)
    elif image_features.dim() == 3:
        slots = image_features
    elif image_features.dim() == 4 and image_features.shape[1] == feature_dim:
        slots = image_features.flatten(2).transpose(1, 2)
    elif image_features.dim() == 4 and image_features.shape[-1] == feature_dim:
        slots = image_features.flatten(1, 2)
    else:
        raise ValueError(f"image features of shape {tuple(image_features.shape)} do not match "
                         f"{config.image_layer} with {feature_dim} channels")
    if slots.shape[1] != config.image_slots or slots.shape[2] != feature_dim:
        raise ValueError(f"image features of shape {tuple(image_features.shape)} do not match "
                         f"{config.image_layer}: expected {config.image_slots} slot(s) of "
                         f"{feature_dim}")
    return slots


class CSMN(nn.Module):
    """The Context Sequence Memory Network. ``forward`` is the teacher-forced training pass:
    all T steps at once, a causal mask over the word output memory, no loop over time."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_input = nn.Embedding(c.vocab_size, c.embed_dim)  # W_e^a
        self.embed_output = nn.Embedding(c.vocab_size, c.embed_dim)  # W_e^c
        self.embed_query = nn.Embedding(c.vocab_size, c.embed_dim)  # W_e^b
        self.image_input = nn.Linear(c.image_feature_dim, c.memory_dim)  # W_im^a, b_im^a
        self.image_output = nn.Linear(c.image_feature_dim, c.memory_dim)  # W_im^c, b_im^c
        self.word_hidden = nn.Linear(c.embed_dim, c.memory_dim)  # W_h, b_h (context + output)
        self.query = nn.Linear(c.embed_dim, c.memory_dim)  # W_q, b_q
        self.readouts = nn.ModuleDict(
            {name: self._make_readout(name, slots) for name, slots in c.memory_slots.items()})
        self.hidden = nn.Linear(c.state_dim, c.state_dim)  # W_o, b_o
        self.vocab = nn.Linear(c.state_dim, c.vocab_size, bias=False)  # W_f (eq. 12: no bias)
        self.reset_parameters()

    def _make_readout(self, memory_type: str, slots: int) -> nn.Module:
        c = self.config
        if not c.use_cnn:
            return AttendedSum(c.memory_dim)
        if slots < max(c.cnn_widths):
            return AttendedSumProjection(c.memory_dim, c.cnn_out_dim)
        return MemoryCNN(c.memory_dim, c.cnn_widths, c.cnn_depth)

    @property
    def memory_types(self) -> tuple[str, ...]:
        return tuple(self.readouts.keys())

    def reset_parameters(self) -> None:
        """Paper 4.3: uniform +-sqrt(3 / dim), the authors' ``uniform_unit_scaling(1.0)``, where
        dim is the input size of the map: in_features for a linear layer, width x channels for
        a filter, V for an embedding (a 512 x V matrix applied to a one-hot word). Biases 0,
        as the authors' code."""
        for name, param in self.named_parameters():
            if name.endswith("bias") or ".biases." in name:
                nn.init.zeros_(param)
                continue
            bound = math.sqrt(3.0 / init_fan_in(name, param))
            nn.init.uniform_(param, -bound, bound)

    # ---- memories (eq. 1-7) ----------------------------------------------------------------

    def _bank(self, memory_type: str, keys: Tensor, values: Tensor,
              mask: Tensor | None = None) -> MemoryBank:
        readout = self.readouts[memory_type]
        return MemoryBank(keys, values, readout.precompute(values), mask)

    def _word_memory(self, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self._word_slots(self.embed_input(token_ids), self.embed_output(token_ids))

    def _word_slots(self, embedded_a: Tensor, embedded_c: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of word memory slots from their a and c embeddings (eq. 3-4)."""
        return (torch.relu(self.word_hidden(embedded_a)),
                torch.relu(self.word_hidden(embedded_c)))

    def encode_static_memories(self, image_features: Tensor,
                               context_ids: Tensor | None) -> dict[str, MemoryBank]:
        """Image and user-context memories: they do not change during a sequence."""
        return self._encode_memories(image_features, context_ids, None)[0]

    def _encode_memories(
        self, image_features: Tensor, context_ids: Tensor | None, output_words: Tensor | None,
    ) -> tuple[dict[str, MemoryBank], tuple[Tensor, Tensor] | None]:
        """(the image and context memories, the a and c embeddings of ``output_words``
        [B, slots] when given). Context and output words go through each embedding table in
        one lookup: each lookup's gradient is a dense V x 512 tensor, zero-filled and then
        added to the others (about 30 ms a lookup at paper size on CPU)."""
        image = image_slots_from_features(image_features, self.config)
        banks = {"image": self._bank("image", torch.relu(self.image_input(image)),
                                     torch.relu(self.image_output(image)))}
        ids = []
        if "context" in self.readouts:
            if context_ids is None:
                raise ValueError("this CSMN variant needs context_ids (user context memory)")
            if context_ids.shape[1] != self.config.context_size:
                raise ValueError(f"context_ids has {context_ids.shape[1]} slots, the model "
                                 f"{self.config.context_size}")
            ids.append(context_ids)
        if output_words is not None:
            ids.append(output_words)
        if not ids:
            return banks, None
        joined = ids[0] if len(ids) == 1 else torch.cat(ids, 1)
        sizes = [t.shape[1] for t in ids]
        embedded_a = self.embed_input(joined).split(sizes, 1)
        embedded_c = self.embed_output(joined).split(sizes, 1)
        if "context" in self.readouts:
            keys, values = self._word_slots(embedded_a[0], embedded_c[0])
            banks["context"] = self._bank("context", keys, values, context_ids != PAD_ID)
        output = (embedded_a[-1], embedded_c[-1]) if output_words is not None else None
        return banks, output

    def _queries(self, previous_ids: Tensor) -> Tensor:
        return torch.relu(self.query(self.embed_query(previous_ids)))  # eq. 8

    # ---- attention, memory CNN, output (eq. 9-12) ------------------------------------------

    def _memory_read(self, queries: Tensor, banks: dict[str, MemoryBank],
                     step_masks: dict[str, Tensor | None],
                     literal: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """-> (c_t [B, T, state_dim], attention per type), eq. 9-10. queries [B, T, memory_dim];
        step_masks[type]: bool, broadcastable to [B, T, slots], True where the slot is real at
        that step (None: all)."""
        names = self.memory_types
        scores = []
        for name in names:
            score = torch.matmul(queries, banks[name].keys.transpose(1, 2))
            mask = step_masks.get(name)
            if mask is not None:
                score = score.masked_fill(~mask, float("-inf"))
            scores.append(score)
        # One softmax over all slots of all types (eq. 9); exp(-inf) = 0 exactly.
        attention = torch.softmax(_at_least_float32(torch.cat(scores, dim=-1)), dim=-1)
        attention = attention.to(queries.dtype)
        per_type = dict(zip(names, attention.split([s.shape[-1] for s in scores], dim=-1),
                            strict=True))
        parts = []
        for name in names:
            readout = self.readouts[name]
            if literal:
                parts.append(readout.read_literal(per_type[name], banks[name].values))
            else:
                parts.append(readout.read(per_type[name], banks[name].products))
        return torch.cat(parts, dim=-1), per_type

    def _read(self, queries: Tensor, banks: dict[str, MemoryBank],
              step_masks: dict[str, Tensor | None],
              literal: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """-> (h_t [B, T, state_dim], attention per type): ``_memory_read`` and eq. 11."""
        state, per_type = self._memory_read(queries, banks, step_masks, literal)
        return self.hidden_state(state), per_type

    def hidden_state(self, memory_state: Tensor) -> Tensor:
        """h_t = ReLU(W_o c_t + b_o), eq. 11, for c_t of any leading shape."""
        return torch.relu(aligned_linear(memory_state, self.hidden))

    def teacher_forced(self, image_features: Tensor, context_ids: Tensor | None,
                       input_ids: Tensor, literal: bool = False) -> CSMNOutput:
        """All steps of a batch of sequences in one pass.

        input_ids [B, T] = ``_GO y_1 .. y_{T-1}``, 0-padded after the sequence. Step t attends
        to the output slots y_1..y_{t-1} (slot j holds y_{j+1} = input_ids[:, j + 1]), masked
        causally and where padded. The buffer always has ``max_length`` slots, as while
        decoding, so the memory CNN sees the same positions in both.
        """
        steps = input_ids.shape[1]
        if steps - 1 > self.config.max_length:
            raise ValueError(f"{steps} steps need {steps - 1} output slots; max_length is "
                             f"{self.config.max_length}")
        banks, step_masks = self._teacher_forced_memories(
            image_features, context_ids, input_ids, self.config.max_length)
        hidden, attention = self._read(self._queries(input_ids), banks, step_masks, literal)
        return CSMNOutput(self.logits(hidden), attention)

    def _teacher_forced_memories(
        self, image_features: Tensor, context_ids: Tensor | None, input_ids: Tensor,
        output_slots: int,
    ) -> tuple[dict[str, MemoryBank], dict[str, Tensor | None]]:
        """The memories of a teacher-forced pass and their per-step masks, with the word
        output memory cut to its first ``output_slots`` slots."""
        words = self._output_words(input_ids, output_slots)
        banks, embedded = self._encode_memories(image_features, context_ids, words)
        step_masks: dict[str, Tensor | None] = {}
        if "context" in banks:
            step_masks["context"] = banks["context"].mask.unsqueeze(1)
        if embedded is not None:
            banks["output"] = self._bank("output", *self._word_slots(*embedded))
            step_masks["output"] = _output_mask(words, input_ids.shape[1])
        return banks, step_masks

    def _output_words(self, input_ids: Tensor, output_slots: int) -> Tensor | None:
        """What the teacher-forced output slots hold: slot j holds y_{j+1} = input_ids[:, j+1]
        (0-padded to ``output_slots``); None without a word output memory."""
        if "output" not in self.readouts:
            return None
        words = input_ids[:, 1:1 + output_slots]
        return F.pad(words, (0, output_slots - words.shape[1]), value=PAD_ID)

    def _output_slots(self, steps: int) -> int:
        """Output slots a pass of ``steps`` steps needs: the slots a step can attend to, plus
        the widest filter's reach past them (``training_loss``)."""
        if "output" not in self.readouts:
            return self.config.max_length
        reach = max(self.config.cnn_widths) if self.config.use_cnn else 1
        return min(self.config.max_length, max(1, steps - 1 + reach))

    def training_loss(self, image_features: Tensor, context_ids: Tensor | None,
                      input_ids: Tensor, target_ids: Tensor, literal: bool = False,
                      chunk_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """-> (softmax cross-entropy averaged over the real target tokens, their number as an
        int64 tensor): ``sequence_loss(self(...), target_ids)`` (section 4.3: the loss stops at
        _EOS), without the work that padding costs there.

        - Steps after the batch's last real target are dropped; no kept step attends to them.
        - c_t is gathered at the real targets before W_o and W_f (eq. 11-12), the largest
          layers, so padding costs neither them nor the V-wide softmax.
        - The word output memory keeps only the slots a kept step can attend to, plus the
          widest filter's reach past them: later slots get zero attention (eq. 9), so every
          window over them sums to exactly 0, and one all-zero window is kept, so the
          max-pool of eq. 10 sees the same values. Results equal the padded form's up to
          the order of floating-point additions.
        - W_f and the cross-entropy are one operation (``linear_cross_entropy``): the logits
          become, in place, their own gradient, which the backward pass multiplies into W_f
          and h. ``chunk_tokens``: no more than that many V-wide rows exist at once, the
          gradients of W_f and h_t are then made chunk by chunk in the forward pass.
        """
        real = target_ids != PAD_ID
        # One host sync per batch: the sizes below depend on the data.
        kept = int(real.any(dim=0).nonzero().max()) + 1 if bool(real.any()) else 1
        input_ids, real = input_ids[:, :kept], real[:, :kept]
        banks, step_masks = self._teacher_forced_memories(
            image_features, context_ids, input_ids, self._output_slots(kept))
        state, _ = self._memory_read(self._queries(input_ids), banks, step_masks, literal)
        hidden = self.hidden_state(state[real])  # [tokens, state_dim], row-major
        targets = target_ids[:, :kept][real]
        loss_sum = self._vocab_loss_sum(hidden, targets, chunk_tokens)
        tokens = real.sum()
        return loss_sum / tokens.clamp(min=1), tokens

    def _vocab_loss_sum(self, hidden: Tensor, targets: Tensor,
                        chunk_tokens: int | None) -> Tensor:
        """Summed cross-entropy of softmax(W_f h) (eq. 12) against ``targets``."""
        hidden, weight, _ = _aligned_operands(hidden, self.vocab.weight)
        return linear_cross_entropy(hidden, weight, targets, chunk_tokens)

    def forward(self, image_features: Tensor, context_ids: Tensor | None,
                input_ids: Tensor, literal: bool = False, target_ids: Tensor | None = None,
                chunk_tokens: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """-> logits [B, T, V] for the targets ``y_1 .. y_T`` (teacher forcing); with
        ``target_ids``, ``training_loss`` instead, so that a DistributedDataParallel wrapper,
        which syncs gradients only through ``forward``, can call it."""
        if target_ids is not None:
            return self.training_loss(image_features, context_ids, input_ids, target_ids,
                                      literal, chunk_tokens)
        return self.teacher_forced(image_features, context_ids, input_ids, literal).logits

    def logits(self, hidden: Tensor) -> Tensor:
        """W_f h_t: eq. 12 before its softmax (which the loss and the decoders apply)."""
        return aligned_linear(hidden, self.vocab)

    # ---- incremental decoding --------------------------------------------------------------

    def start_decoding(self, image_features: Tensor,
                       context_ids: Tensor | None) -> DecoderState:
        banks = self.encode_static_memories(image_features, context_ids)
        if "output" in self.readouts:
            ref = banks["image"].keys
            batch, slots = ref.shape[0], self.config.max_length
            empty = ref.new_zeros(batch, slots, self.config.memory_dim)
            readout = self.readouts["output"]
            banks["output"] = MemoryBank(empty, empty.clone(), readout.precompute(empty))
        return DecoderState(banks)

    def decode_step(self, state: DecoderState,
                    previous_ids: Tensor) -> tuple[Tensor, dict[str, Tensor], DecoderState]:
        """One step for every row of ``state``: previous_ids [B] is _GO at the first step, else
        the word chosen last, which first enters the output memory (its slot products computed
        once, here). Returns logits [B, V], attention (type -> [B, slots]) and the new state
        (the old one is left as it was, so autograd and beam bookkeeping stay simple)."""
        hidden, attention, state = self.decode_step_hidden(state, previous_ids)
        return self.logits(hidden), attention, state

    def decode_step_hidden(
        self, state: DecoderState, previous_ids: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor], DecoderState]:
        """``decode_step`` up to h_t [B, state_dim], before the output layer W_f."""
        banks = dict(state.banks)
        step = state.steps_taken
        step_masks: dict[str, Tensor | None] = {}
        if "context" in banks:
            step_masks["context"] = banks["context"].mask.unsqueeze(1)
        if "output" in banks:
            slots = self.config.max_length
            if step > 0:
                if step - 1 >= slots:
                    raise ValueError(f"the output memory holds {slots} words")
                keys, values = self._word_memory(previous_ids.unsqueeze(1))
                products = self.readouts["output"].precompute(values)
                old = banks["output"]
                banks["output"] = MemoryBank(
                    _with_slot(old.keys, step - 1, keys),
                    _with_slot(old.values, step - 1, values),
                    _with_slot(old.products, step - 1, products))
            filled = torch.arange(slots, device=previous_ids.device) < step
            step_masks["output"] = filled.view(1, 1, slots)
        hidden, attention = self._read(self._queries(previous_ids.unsqueeze(1)), banks,
                                       step_masks, literal=False)
        attention = {name: a.squeeze(1) for name, a in attention.items()}
        return hidden.squeeze(1), attention, DecoderState(banks, step + 1)


def aligned_linear(inputs: Tensor, layer: nn.Linear, multiple: int | None = None) -> Tensor:
    """``layer(inputs)``, with the inner size zero-padded to a ``multiple`` (default: 8 on CUDA,
    no padding elsewhere). Rows of the paper's 2,700 bf16 values are not 16-byte aligned, and
    cuBLAS then falls back from the Hopper GEMM kernels to older ones: on an H200 the W_f
    products ran at about half speed. The zeros change no sum."""
    inputs, weight, bias = _aligned_operands(inputs, layer.weight, layer.bias, multiple)
    return F.linear(inputs, weight, bias)


def _aligned_operands(inputs: Tensor, weight: Tensor, bias: Tensor | None = None,
                      multiple: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(inputs, weight, bias) of ``aligned_linear``: the inner size padded, or as given when
    it needs no padding."""
    multiple = multiple or (8 if inputs.is_cuda else 1)
    pad = -weight.shape[1] % multiple
    if pad == 0:
        return inputs, weight, bias
    device_type = inputs.device.type
    if torch.is_autocast_enabled(device_type):
        # Cast before padding, so that the padded copy is the half-size one.
        dtype = torch.get_autocast_dtype(device_type)
        inputs, weight = inputs.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return F.pad(inputs, (0, pad)), F.pad(weight, (0, pad)), bias


# Logits per softmax pass where the pass makes a copy (bf16/fp16 logits, or off the CPU):
# a few MB. Float32 logits on the CPU are turned in one pass.
_SOFTMAX_ELEMENTS = 1 << 20


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                         chunk_tokens: int | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")`` (eq. 12, no
    bias), the softmax in float32 at least, as ``sequence_loss`` does under autocast.

    The V-wide logits are made once and turned in place into the gradient of the loss with
    respect to them (softmax minus one-hot), which the backward pass multiplies into W_f
    and h: one V-wide buffer instead of the three of log_softmax,
    its saved output and their gradients. ``chunk_tokens``: at most that many rows of
    logits at a time; the gradients of ``hidden`` and ``weight`` are then made in the
    forward pass, chunk by chunk, and scaled in the backward pass. Without gradients (no
    grad mode, or nothing requires them) only the loss is made, chunk by chunk."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        with torch.autocast(device_type, enabled=False):
            return _cross_entropy_sum(hidden, weight, targets, chunk_tokens or max(
                1, _SOFTMAX_ELEMENTS // weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)


def _cross_entropy_sum(hidden: Tensor, weight: Tensor, targets: Tensor, rows: int) -> Tensor:
    total = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype))
    for start in range(0, hidden.shape[0], rows):
        logits = _at_least_float32(F.linear(hidden[start:start + rows], weight))
        total = total + F.cross_entropy(logits, targets[start:start + rows], reduction="sum")
    return total


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax_gradient_(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [N, V] (float32 at least) -> their summed cross-entropy; ``logits`` become
    softmax(logits) - onehot(targets), in place: one log_softmax and one exp over all rows.
    On CPU the log_softmax writes into its input (its kernel finishes reading a row before
    writing it; out of place gives the same bits); elsewhere it goes through a temporary.
    A logsumexp, subtract and exp per few-MB chunk made a dozen small parallel ops per
    chunk: on a busy 2-core machine their threads' waiting cost about 250 ms of CPU a step
    at paper size against 30 ms now."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if logits.device.type == "cpu":
        torch.log_softmax(logits, 1, out=logits)
    else:
        logits.copy_(torch.log_softmax(logits, 1))
    loss = -logits[rows, targets].sum()
    logits.exp_()
    logits[rows, targets] -= 1
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """See ``linear_cross_entropy``. hidden [N, H], weight [V, H] of one dtype."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor,  # type: ignore[override]
                chunk_tokens: int | None) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            rows, vocab = hidden.shape[0], weight.shape[0]
            upcast = hidden.dtype in (torch.float16, torch.bfloat16)
            total = hidden.new_zeros((), dtype=_loss_dtype(hidden.dtype))
            in_place = not upcast and hidden.device.type == "cpu"
            step = rows if in_place else max(1, _SOFTMAX_ELEMENTS // vocab)
            if not chunk_tokens or rows <= chunk_tokens:
                grads = F.linear(hidden, weight)  # [N, V]: the logits, then their gradient
                for start in range(0, rows, step):
                    part = grads[start:start + step]
                    logits = part.float() if upcast else part
                    total += _softmax_gradient_(logits, targets[start:start + step])
                    if upcast:
                        part.copy_(logits)
                ctx.save_for_backward(grads, hidden, weight)
                ctx.fused = False
                return total
            grad_hidden = torch.empty_like(hidden)
            grad_weight = weight.new_zeros(weight.shape, dtype=_loss_dtype(weight.dtype))
            for start in range(0, rows, chunk_tokens):
                h = hidden[start:start + chunk_tokens]
                part = F.linear(h, weight)
                logits = part.float() if upcast else part
                total += _softmax_gradient_(logits, targets[start:start + chunk_tokens])
                grad = logits.to(hidden.dtype)
                grad_hidden[start:start + chunk_tokens] = grad @ weight
                product = grad.t() @ h
                grad_weight += product if product.dtype == grad_weight.dtype else product.to(
                    grad_weight.dtype)
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            ctx.fused = True
            return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):  # type: ignore[override]
        with torch.autocast(grad_total.device.type, enabled=False):
            need_hidden, need_weight = ctx.needs_input_grad[:2]
            grad_hidden = grad_weight = None
            if ctx.fused:
                saved_hidden, saved_weight = ctx.saved_tensors
                scale = grad_total.to(saved_hidden.dtype)
                if need_hidden:
                    grad_hidden = saved_hidden * scale
                if need_weight:
                    grad_weight = saved_weight * scale
            else:
                grads, hidden, weight = ctx.saved_tensors
                scale = grad_total.to(hidden.dtype)
                # The scalar goes on the [N, H] side of each product, the smaller one.
                if need_hidden:
                    grad_hidden = (grads @ weight).mul_(scale)
                if need_weight:
                    grad_weight = grads.t() @ (hidden * scale)
        return grad_hidden, grad_weight, None, None


def _output_mask(words: Tensor, steps: int) -> Tensor:
    """[B, steps, slots]: step t attends to the teacher-forced output slots j < t that hold a
    word (slot j holds y_{j+1})."""
    slot = torch.arange(words.shape[1], device=words.device)
    step = torch.arange(steps, device=words.device)
    causal = slot.unsqueeze(0) < step.unsqueeze(1)  # [T, slots]: j < t
    return causal.unsqueeze(0) & (words != PAD_ID).unsqueeze(1)


def _with_slot(buffer: Tensor, slot: int, value: Tensor) -> Tensor:
    # Out of place: earlier steps saved the old buffer for backward (teacher-forced loops).
    updated = buffer.clone()
    updated[:, slot:slot + 1] = value
    return updated


def _at_least_float32(x: Tensor) -> Tensor:
    # Softmax and cross-entropy in fp32 under bf16/fp16 autocast; float64 stays float64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def init_fan_in(name: str, param: Tensor) -> int:
    """The 'dim' of the paper's init range for a weight: the input size of its map."""
    if name.startswith("embed_"):
        return param.shape[0]  # V: an embedding is a 512 x V map of one-hot words
    if param.dim() == 3:
        return param.shape[1] * param.shape[2]  # conv filter: channels x width
    return param.shape[1]  # linear [out, in]


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy averaged over real target tokens (targets 0-padded after _EOS).
    Unlike the authors' code, not divided by batch x max length and not trained past _EOS."""
    losses = F.cross_entropy(_at_least_float32(logits.reshape(-1, logits.shape[-1])),
                             targets.reshape(-1), ignore_index=PAD_ID, reduction="sum")
    real = (targets != PAD_ID).sum().clamp(min=1)
    return losses / real


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# FLOP accounting (multiply-adds x 2 of the forward pass; elementwise work not counted)
# --------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    """Forward FLOPs per target token, by part. Per-sequence work (memory embeddings, the
    CNN products) is divided by the steps per sequence."""

    efficient: dict[str, float]
    literal: dict[str, float]

    @property
    def efficient_total(self) -> float:
        return sum(self.efficient.values())

    @property
    def literal_total(self) -> float:
        return sum(self.literal.values())


def flops_per_token(config: ModelConfig, steps_per_sequence: int | None = None) -> FlopCount:
    """Forward FLOPs per teacher-forced token for the efficient and the literal form.
    A training step (forward + backward) is about 3x this."""
    c = config
    steps = steps_per_sequence or c.max_length
    m, e = c.memory_dim, c.embed_dim
    slots = c.memory_slots
    common: dict[str, float] = {
        "image_memory": 2 * 2 * slots["image"] * c.image_feature_dim * m / steps,
        "query": 2 * e * m,
        "attention_scores": 2 * sum(slots.values()) * m,
        "hidden_W_o": 2 * c.state_dim * c.state_dim,
        "vocab_W_f": 2 * c.state_dim * c.vocab_size,
    }
    for name in ("context", "output"):
        if name in slots:
            common[f"{name}_memory"] = 2 * 2 * slots[name] * e * m / steps
    efficient = dict(common)
    literal = dict(common)
    for name, n in slots.items():
        key = f"{name}_readout"
        if not c.use_cnn:
            efficient[key] = literal[key] = 2 * n * m
        elif n < max(c.cnn_widths):  # pool5 projection
            efficient[key] = 2 * n * m * c.cnn_out_dim / steps + 2 * n * c.cnn_out_dim
            literal[key] = 2 * n * m + 2 * m * c.cnn_out_dim
        else:
            products = 2 * n * m * sum(c.cnn_widths) * c.cnn_depth / steps
            weighing = sum(2 * (n - h + 1) * h * c.cnn_depth for h in c.cnn_widths)
            efficient[key] = products + weighing
            literal[key] = 2 * n * m + sum(
                2 * (n - h + 1) * h * m * c.cnn_depth for h in c.cnn_widths)
    return FlopCount(efficient, literal)


__all__ = [
    "CSMN", "CSMNOutput",
    "DecoderState", "FlopCount", "MemoryBank", "ModelConfig", "count_parameters",
    "aligned_linear", "flops_per_token", "image_slots_from_features", "init_fan_in",
    "linear_cross_entropy", "sequence_loss",
]
