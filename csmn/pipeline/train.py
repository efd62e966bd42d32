"""Train CSMN on Ray Train (TorchTrainer, DDP on CPU or GPU), tracked in MLflow.

Paper 4.3: softmax cross-entropy averaged over the real target tokens, Adam (0.9, 0.999,
1e-8), learning rate 0.001 divided by 1.2 every 5 epochs, 20 epochs, 200 examples per worker
and step, data parallel. The authors' code also clipped gradients at norm 100 (here too;
``grad_clip_norm 0`` turns it off).

Each epoch every worker trains on its shard of the joined train split, in a new order: the
split is cut into small blocks whose order is shuffled every epoch (held in the object
store, or streamed from Parquet when it would not fit: ``--materialize``), and each worker's
local shuffle buffer mixes the blocks it holds (files are grouped by user, and a batch of one
user's posts would be a poor estimate of the gradient). Then the workers share the validation
sample (a seeded sample of posts, spread over the users): loss, and greedy decoding scored on
words against each post's text exactly as the evaluation scores it, by hashtag-set F1
(hashtags) or corpus BLEU-1 (posts; without the evaluation's PTB tokenizer). Rank 0 prints
one line per epoch. Rank 0 writes a checkpoint (csmn.core.checkpoint) that Ray Train
stores under ``<storage>/<run name>/``, keeping the best few by the validation metric plus
the latest. The metric, not the loss, picks the model: with users split apart, validation
users' own hashtags and words are out of the vocabulary, and their loss rises while the model
still gets better at what it can predict (seen on the synthetic archive: the loss was lowest
after epoch 1, whose model wrote the same words for every image).

A failed worker restarts the group from the latest checkpoint (``max_failures``);
a run started again with the same name and storage resumes there too (Train V2 finds its
own snapshot; ``TorchTrainer.restore`` is gone in V2), and continues the same MLflow run.

MLflow: the driver creates the run and logs the config as params; rank 0 logs per-epoch
metrics (the tracking URI and run id travel in ``train_loop_config``, since the loop runs in
worker processes); the driver logs the best checkpoint as a pyfunc model and, with
``--register``, registers it as a new version of ``csmn-hashtag`` / ``csmn-post``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

import torch

from csmn.config import coerce_values, config_from_args, config_parser, redact
from csmn.core.checkpoint import TRAIN_STATE_FILE, load_checkpoint, save_checkpoint, unwrap
from csmn.core.model import CSMN, ModelConfig
from csmn.core.tokens import (
    BLOCK,
    EOS_ID,
    FIRST_WORD_ID,
    GO_ID,
    LIKELY,
    MARKERS,
    PAD_ID,
    REPEATS_HELP,
    STOP_HELP,
    task_rules,
)
from csmn.data import layout, storage
from csmn.data.completeness import exit_code_2, require_data_root
from csmn.data.layout import HASHTAG, POST, SPLITS, canonical_task, family_of
from csmn.eval.metrics import hashtag_prf
from csmn.pipeline.train_data import (
    MATERIALIZE_MODES,
    MATERIALIZE_SHARE,
    VALIDATION_COLUMNS,
    Collate,
    JoinStats,
    batch_options,
    choose_materialize,
    collate_batch,
    estimated_joined_bytes,
    ingest_config,
    joined_dataset,
    shuffled_each_epoch,
    streamed_dataset,
)
from csmn.text.filters import FilterThresholds
from csmn.text.vocab import Vocabulary, load_vocab

log = logging.getLogger(__name__)

METRIC_NAMES = {HASHTAG: "val_f1", POST: "val_bleu1"}
_MAX_LENGTH = ModelConfig.max_length  # 16: 15 words and _EOS (3.1)
FAILURE_MARKER = "_csmn_injected_failure"


@dataclass
class TrainConfig:
    """Training settings; defaults are the paper's (4.3) where it gives one."""

    data: str = field(default="", metadata={"help": "data root (local path or s3://)"})
    task: str = field(default="hashtag", metadata={
        "help": "hashtag | post (caption is accepted for post)"})
    variant: str = field(default="P5", metadata={
        "help": "P5 | R5C | NoCNN | NoUC | NoWO | W20 ... (parts joined by '-')"})
    context_size: int | None = field(default=None, metadata={
        "help": "D, user context words (default: the variant's, 60)"})
    workers: int = field(default=1, metadata={"help": "data-parallel training workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = field(default=1.0, metadata={
        "help": "CPUs reserved per worker; leave some for Ray Data on a small node"})
    epochs: int = field(default=20, metadata={"help": "paper: 20"})
    batch_size: int = field(default=200, metadata={"help": "examples per worker and step"})
    learning_rate: float = 0.001
    lr_decay_factor: float = field(default=1.2, metadata={"help": "lr divided by this ..."})
    lr_decay_every: int = field(default=5, metadata={"help": "... every this many epochs"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    grad_clip_norm: float = field(default=100.0, metadata={
        "help": "clip the gradient norm (authors' code: 100); 0 turns it off"})
    context_dropout: float = field(default=0.0, metadata={
        "help": "share of each training example's user-context words hidden at each step "
                "(not in the paper, which has 0): a new user's context never holds the "
                "words only one training user writes, so the model must not lean on any one"})
    max_length: int = field(default=_MAX_LENGTH, metadata={"help": "output tokens incl. _EOS"})
    train_split: str = "train"
    val_split: str = "val"
    val_sample_size: int = field(default=1000, metadata={
        "help": "validation examples scored each epoch (a seeded sample over all users)"})
    shuffle_buffer: int = field(default=2000, metadata={
        "help": "examples in each worker's local shuffle buffer"})
    block_rows: int = field(default=64, metadata={
        "help": "rows per block of the joined train split, whose order is shuffled each "
                "epoch: a buffer then holds shuffle_buffer / block_rows places of the archive"})
    materialize: str = field(default="auto", metadata={
        "help": "auto | always | never: keep the joined train split in the object store "
                "(always), or write it once to Parquet under <data>/cache/joined/ and stream "
                "it, files in a new order each epoch (never); auto streams a split bigger "
                # No percent sign: argparse formats help texts with %.
                f"than {MATERIALIZE_SHARE:g} of the cluster's object store"})
    seed: int = 0
    # The validation F1 picks the kept checkpoints, so it decodes by the evaluation's rules.
    repeats: str = field(default=BLOCK, metadata={
        "help": f"validation decoding, as the evaluation's: {REPEATS_HELP}"})
    stop: str = field(default=LIKELY, metadata={
        "help": f"validation decoding, as the evaluation's: {STOP_HELP}"})
    checkpoints_to_keep: int = field(default=3, metadata={
        "help": "best checkpoints kept by the validation metric (the latest is kept too)"})
    max_failures: int = field(default=2, metadata={
        "help": "worker-group restarts from the latest checkpoint before giving up"})
    experiment: str = field(default="", metadata={
        "help": "MLflow experiment (default: csmn-<task>)"})
    storage: str = field(default="", metadata={
        "help": "checkpoint storage, local or s3:// (default: <data>/runs)"})
    run_name: str = field(default="", metadata={
        "help": "Ray Train and MLflow run name; the same name resumes (default: new)"})
    register: bool = field(default=False, metadata={
        "help": "register the model as a new version of csmn-hashtag / csmn-post"})
    model: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "ModelConfig overrides, e.g. '{embed_dim: 16, memory_dim: 32}'"})
    fail_once_at_epoch: int = field(default=0, metadata={
        "help": "testing only: rank 0 raises once at the start of this epoch (0: never)"})

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            import yaml

            self.model = yaml.safe_load(self.model) or {}
        if not isinstance(self.model, dict):
            raise ValueError(f"model overrides must be a mapping, got {self.model!r}")
        # Typed as ModelConfig's fields: a quoted "false" is false, "16" is 16.
        self.model = coerce_values(ModelConfig, self.model)
        self.task = canonical_task(self.task)
        for name in ("workers", "epochs", "batch_size", "lr_decay_every", "max_length",
                     "val_sample_size", "checkpoints_to_keep", "block_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        task_rules(self.task, self.repeats, self.stop)  # refuses an unknown rule now
        # Checked here, not where a worker first uses them: after the MLflow run started, or
        # epochs in (a decay factor of 0 divides by zero at the first decay).
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (math.isfinite(self.lr_decay_factor) and self.lr_decay_factor > 0):
            raise ValueError(f"lr_decay_factor must be > 0, got {self.lr_decay_factor}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        if not (math.isfinite(self.grad_clip_norm) and self.grad_clip_norm >= 0):
            raise ValueError(f"grad_clip_norm must be >= 0 (0: off), got {self.grad_clip_norm}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        for name in ("train_split", "val_split"):
            if getattr(self, name) not in SPLITS:
                raise ValueError(f"{name} must be one of {', '.join(SPLITS)}, got "
                                 f"{getattr(self, name)!r}")
        # Each family has its own vocabulary (the hashtag task's by posts): the validation
        # split's ids would name other words in the model's.
        if family_of(self.train_split) != family_of(self.val_split):
            raise ValueError(f"train_split {self.train_split} and val_split {self.val_split} "
                             "are of two splits (by users, by posts), each with its own "
                             "vocabulary: give both of one")
        # --model sets the network's sizes. The vocabulary's size is the data's (another would
        # index past the output layer) and the image layer the variant's (R5C); max_length
        # and context_size have flags of their own, which --model may only agree with.
        fixed = sorted({"vocab_size", "image_layer"} & set(self.model))
        if fixed:
            raise ValueError(f"--model may not set {', '.join(fixed)}: the vocabulary's size "
                             "is the data's, the image layer the variant's (R5C)")
        for name, default in (("max_length", _MAX_LENGTH), ("context_size", None)):
            if name in self.model:
                value = self.model.pop(name)
                if getattr(self, name) not in (default, value):
                    raise ValueError(f"--model sets {name} {value}, --{name.replace('_', '-')} "
                                     f"{getattr(self, name)}: give one")
                setattr(self, name, value)
        if not 0.0 <= self.context_dropout < 1.0:
            raise ValueError(f"context_dropout must be in [0, 1), got {self.context_dropout}")
        if self.materialize not in MATERIALIZE_MODES:
            raise ValueError(f"materialize must be one of {', '.join(MATERIALIZE_MODES)}, "
                             f"got {self.materialize!r}")

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.task]

    def learning_rate_at(self, epoch: int) -> float:
        """Epochs count from 1: 1-5 at the initial rate, 6-10 divided by 1.2, ..."""
        return self.learning_rate / self.lr_decay_factor ** ((epoch - 1) // self.lr_decay_every)


def build_model_config(config: TrainConfig, vocab_size: int) -> ModelConfig:
    overrides: dict[str, Any] = {"vocab_size": vocab_size, "max_length": config.max_length}
    if config.context_size is not None:
        overrides["context_size"] = config.context_size
    overrides.update(config.model)
    return ModelConfig.for_variant(config.variant, **overrides)


@dataclass
class TrainSummary:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    storage: str
    epochs_completed: int
    best_checkpoint: str | None
    best_metrics: dict[str, float]
    final_metrics: dict[str, float]
    model_uri: str | None
    registered_version: str | None
    data: dict[str, Any]  # join counts per split; "materialize": how train was held


# --------------------------------------------------------------------------------------------
# Validation metrics: the evaluation's, from sums that add up across workers
# --------------------------------------------------------------------------------------------

_MARKER_IDS = frozenset({PAD_ID, GO_ID, EOS_ID})


def _tokens(sequence: Sequence[int | str]) -> list[int | str]:
    """The tokens of a sequence (ids or words) without the markers _PAD, _GO, _EOS; ``_UNK``
    stays, as in the evaluation (csmn.eval.metrics), where an unknown word is a real word of
    the truth that no prediction can match."""
    return [t for t in sequence if t not in _MARKER_IDS and t not in MARKERS]


def hashtag_f1(predicted: Sequence[int | str], truth: Sequence[int | str]) -> float:
    """2PR/(P+R) between the predicted and true hashtag sets of one post (paper 5.1): the
    evaluation's own F1 (``csmn.eval.metrics.hashtag_prf``)."""
    return hashtag_prf([str(t) for t in _tokens(truth)], [str(t) for t in _tokens(predicted)])[2]


def bleu1_counts(predicted: Sequence[int | str],
                 truth: Sequence[int | str]) -> tuple[int, int, int]:
    """(clipped unigram matches, predicted length, reference length) of one post."""
    predicted_words, true_words = _tokens(predicted), _tokens(truth)
    true_counts = Counter(true_words)
    matches = sum(min(n, true_counts[w]) for w, n in Counter(predicted_words).items())
    return matches, len(predicted_words), len(true_words)


def corpus_bleu1(matches: float, predicted_length: float, reference_length: float) -> float:
    """BLEU-1 over a corpus with one reference per post (paper 5.1): brevity penalty x unigram
    precision (what pycocoevalcap's Bleu(1) computes from the same counts)."""
    if predicted_length <= 0:
        return 0.0
    precision = matches / predicted_length
    brevity = 1.0 if predicted_length > reference_length else math.exp(
        1 - reference_length / predicted_length)
    return brevity * precision


def prediction_words(token_ids: Sequence[int], vocab: Sequence[str]) -> list[str]:
    """Decoded ids as the evaluation writes them: real words only (ids past the specials)."""
    return [vocab[i] for i in token_ids if i >= FIRST_WORD_ID]


@dataclass
class Sums:
    """Per-worker sums whose totals over the workers are the epoch's numbers."""

    def reduced(self, device: torch.device, world_size: int) -> Self:
        """The sums over all workers: one all-reduce of a tensor of the fields, read back by
        field name."""
        names = [f.name for f in dataclasses.fields(self)]
        tensor = torch.tensor([float(getattr(self, n)) for n in names], dtype=torch.float64,
                              device=device)
        if world_size > 1:
            torch.distributed.all_reduce(tensor)
        return type(self)(**dict(zip(names, tensor.tolist(), strict=True)))


@dataclass
class TrainSums(Sums):
    loss_sum: float = 0.0  # token-weighted: sum over batches of mean loss x real tokens
    tokens: float = 0.0
    examples: float = 0.0
    seconds: float = 0.0


@dataclass
class ValidationSums(Sums):
    """Validation loss, and the counts behind hashtag F1 (its per-post sum) and corpus
    BLEU-1 (matches and lengths), scored on words against each post's text as
    ``csmn.pipeline.evaluate`` scores them."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    posts: float = 0.0
    f1_sum: float = 0.0
    matches: float = 0.0
    predicted_length: float = 0.0
    reference_length: float = 0.0

    def add_post(self, task: str, predicted: list[str], text: str) -> None:
        self.posts += 1
        if task == HASHTAG:
            self.f1_sum += hashtag_f1(predicted, text.split())
            return
        matches, predicted_length, reference_length = bleu1_counts(predicted, text.split())
        self.matches += matches
        self.predicted_length += predicted_length
        self.reference_length += reference_length

    def metric(self, task: str) -> float:
        if task == HASHTAG:
            return self.f1_sum / self.posts if self.posts else float("nan")
        return corpus_bleu1(self.matches, self.predicted_length, self.reference_length)


def epoch_metrics(config: TrainConfig, epoch: int, train_sums: TrainSums,
                  val_sums: ValidationSums, world_size: int) -> dict[str, float]:
    """The epoch's numbers from the totals over the workers."""
    return {
        "epoch": epoch,
        "train_loss": train_sums.loss_sum / max(train_sums.tokens, 1),
        "val_loss": val_sums.loss_sum / val_sums.tokens if val_sums.tokens else float("inf"),
        config.metric_name: val_sums.metric(config.task),
        # Workers train at the same time: global examples over the mean worker time.
        "examples_per_s": train_sums.examples / max(train_sums.seconds / world_size, 1e-9),
        "learning_rate": config.learning_rate_at(epoch),
        "train_examples": train_sums.examples,
        "val_examples": val_sums.posts,
    }


def epoch_line(metrics: dict[str, float], epochs: int, metric_name: str,
               seconds_left: float | None) -> str:
    """``epoch 3/20  loss 4.123  val_loss 4.500  val_f1 0.231  1,234 ex/s  12s left``"""
    left = "" if seconds_left is None else f"  {_duration(seconds_left)} left"
    return (f"epoch {int(metrics['epoch'])}/{epochs}  loss {metrics['train_loss']:.3f}  "
            f"val_loss {metrics['val_loss']:.3f}  {metric_name} {metrics[metric_name]:.3f}  "
            f"{metrics['examples_per_s']:,.0f} ex/s{left}")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --------------------------------------------------------------------------------------------
# The loop every worker runs
# --------------------------------------------------------------------------------------------


def _maybe_inject_failure(loop_config: dict[str, Any], epoch: int, rank: int) -> None:
    """Testing hook: rank 0 raises once at the start of the chosen epoch; a marker in the
    run's storage makes the restarted attempt go on."""
    if rank != 0 or loop_config["train"]["fail_once_at_epoch"] != epoch:
        return
    marker = storage.join(loop_config["run_storage"], f"{FAILURE_MARKER}_epoch{epoch}")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"failed once at the start of epoch {epoch}\n")
    raise RuntimeError(f"injected failure at the start of epoch {epoch} (fail_once_at_epoch)")


@dataclass
class Worker:
    """What one training worker holds across epochs."""

    config: TrainConfig
    model_config: ModelConfig
    vocab: list[str]
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped when there are several workers
    optimizer: torch.optim.Optimizer
    start_epoch: int

    @property
    def network(self) -> CSMN:
        return unwrap(self.model)

    def collate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tensors = collate_batch(batch, self.model_config.context_size,
                                self.model_config.max_length, self.model_config.image_layer)
        return {k: v.to(self.device) for k, v in tensors.items()}


def setup_worker(loop_config: dict[str, Any]) -> Worker:
    """Model and optimizer of this worker, restored from the latest checkpoint if any."""
    import ray.train
    import ray.train.torch

    from csmn import tracking

    config = TrainConfig(**loop_config["train"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # The same seed everywhere: DDP broadcasts rank 0's weights anyway, and a resumed run
    # replaces them from the checkpoint.
    torch.manual_seed(config.seed)
    model = CSMN(ModelConfig(**loop_config["model"]))
    start_epoch, optimizer_state = 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = load_checkpoint(directory, with_train_state=True)
        model.load_state_dict(restored.model.state_dict())
        optimizer_state = (restored.train_state or {}).get("optimizer")
        start_epoch = int(restored.epoch) + 1
        log.info("rank %d: resuming after epoch %d", rank, restored.epoch)
        if rank == 0:
            # One point per restart (in-run retry or a run started again): its history
            # shows every resume.
            tracking.log_metrics(loop_config["tracking_uri"], loop_config["run_id"],
                                 {"resumed_at_epoch": start_epoch}, step=start_epoch)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_epsilon,
                                 # The per-tensor loop of the default Adam costs seconds a
                                 # step at paper size on CPU; the fused kernel does not.
                                 fused=True)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return Worker(config, ModelConfig(**loop_config["model"]), loop_config["vocab"], rank,
                  context.get_world_size(), ray.train.torch.get_device(), model, optimizer,
                  start_epoch)


def train_epoch(worker: Worker, shard: Any, epoch: int) -> TrainSums:
    """One pass over this worker's shard (paper 4.3: token-averaged cross-entropy, Adam)."""
    config, model = worker.config, worker.model
    for group in worker.optimizer.param_groups:
        group["lr"] = config.learning_rate_at(epoch)
    model.train()
    sums = TrainSums()
    started = time.perf_counter()
    # Ray's iterator collates in its own threads, ahead of the step.
    batches = shard.iter_torch_batches(
        batch_size=config.batch_size, device="cpu",
        collate_fn=Collate(worker.model_config.context_size, worker.model_config.max_length,
                           worker.model_config.image_layer),
        **batch_options(config.shuffle_buffer, config.seed, epoch, worker.rank))
    # Its own stream, seeded like the shuffle: a resumed epoch hides the same words.
    dropout_generator = torch.Generator(worker.device).manual_seed(
        hash((config.seed, epoch, worker.rank)) % 2**63)
    for batch in batches:
        batch = {k: v.to(worker.device) for k, v in batch.items()}
        if config.context_dropout > 0:
            batch["context_ids"] = hide_context_words(batch["context_ids"],
                                                      config.context_dropout, dropout_generator)
        # h_t and the logits at real targets only (CSMN.training_loss); through forward, so
        # that DDP syncs the gradients.
        mean_loss, local_tokens = model(batch["image_features"], batch["context_ids"],
                                        batch["input_ids"], target_ids=batch["targets"])
        global_tokens = local_tokens.detach().clone()
        if worker.world_size > 1:
            torch.distributed.all_reduce(global_tokens)
        # DDP averages gradients over workers; weighting each worker's token mean by its
        # share of the step's tokens makes the result the mean over all real tokens of the
        # global batch, exactly as one worker with the whole batch would compute.
        loss = mean_loss * local_tokens * worker.world_size / global_tokens.clamp(min=1)
        worker.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        worker.optimizer.step()
        sums.loss_sum += float(mean_loss.detach()) * float(local_tokens)
        sums.tokens += float(local_tokens)
        sums.examples += batch["targets"].shape[0]
    sums.seconds = time.perf_counter() - started
    return sums


def hide_context_words(context_ids: torch.Tensor, rate: float,
                       generator: torch.Generator) -> torch.Tensor:
    """``context_ids`` with each word replaced by ``_PAD`` with probability ``rate``: the
    model masks padded slots (eq. 9), so a hidden word is as if the user never wrote it."""
    hidden = torch.rand(context_ids.shape, generator=generator,
                        device=context_ids.device) < rate
    return context_ids.masked_fill(hidden, PAD_ID)


def validate(worker: Worker, shard: Any) -> ValidationSums:
    """Loss and greedy decoding of this worker's share of the validation sample, scored on
    words as the evaluation scores them (paper 5.1)."""
    from csmn.core.decoding import greedy_decode

    network, task = worker.network, worker.config.task
    rules = task_rules(task, worker.config.repeats, worker.config.stop)
    network.eval()
    sums = ValidationSums()
    with torch.no_grad():
        for numpy_batch in shard.iter_batches(batch_size=worker.config.batch_size,
                                              batch_format="numpy"):
            batch = worker.collate(numpy_batch)
            mean_loss, tokens = network.training_loss(
                batch["image_features"], batch["context_ids"], batch["input_ids"],
                batch["targets"])
            sums.loss_sum += float(mean_loss) * float(tokens)
            sums.tokens += float(tokens)
            decoded = greedy_decode(network, batch["image_features"], batch["context_ids"],
                                    **rules)
            for ids, text in zip(decoded.token_ids, numpy_batch["text"], strict=True):
                sums.add_post(task, prediction_words(ids, worker.vocab), str(text))
    return sums


def checkpoint_and_report(worker: Worker, loop_config: dict[str, Any],
                          metrics: dict[str, float]) -> None:
    """Rank 0 saves the checkpoint and reports it with the metrics; the others report the
    metrics only (Ray Train wants a report from every worker)."""
    import ray.train

    from csmn import tracking

    if worker.rank != 0:
        ray.train.report(metrics)
        return
    epoch = int(metrics["epoch"])
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, worker.model, worker.model_config, worker.vocab,
                        worker.config.task, epoch=epoch, metrics=metrics,
                        train_config=loop_config["train"], optimizer=worker.optimizer,
                        inputs=loop_config["inputs"])
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    # After the report: a crash before it repeats the epoch, so no step is logged twice.
    tracking.log_metrics(loop_config["tracking_uri"], loop_config["run_id"],
                         {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from csmn.pipeline.runtime import quiet_train_reports

    quiet_train_reports()
    worker = setup_worker(loop_config)
    config = worker.config
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    started, epochs_run = time.perf_counter(), 0
    for epoch in range(worker.start_epoch, config.epochs + 1):
        _maybe_inject_failure(loop_config, epoch, worker.rank)
        train_sums = train_epoch(worker, train_shard, epoch).reduced(worker.device,
                                                                     worker.world_size)
        val_sums = validate(worker, val_shard).reduced(worker.device, worker.world_size)
        metrics = epoch_metrics(config, epoch, train_sums, val_sums, worker.world_size)
        checkpoint_and_report(worker, loop_config, metrics)
        epochs_run += 1
        if worker.rank == 0:
            per_epoch = (time.perf_counter() - started) / epochs_run
            # A log record, not print: Ray Train V2 patches print on its workers to log it
            # and also to write it to the wrapped stdout, which showed every line twice.
            log.info("%s", epoch_line(metrics, config.epochs, config.metric_name,
                                      per_epoch * (config.epochs - epoch)))


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _default_run_name(config: TrainConfig) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{config.task}-{config.variant}-{stamp}"


def _data_params(stats: list[JoinStats]) -> dict[str, Any]:
    return {s.split: {"examples": s.examples, "joined": s.joined,
                      "skipped_no_features": s.skipped_no_features} for s in stats}


def _input_example(val_ds: Any, vocab: list[str]) -> Any:
    import pandas as pd

    row = val_ds.take(1)[0]
    words = [vocab[i] for i in row["context_ids"] if 0 <= i < len(vocab)]
    return pd.DataFrame({"image_feature": [list(map(float, row["feature"]))],
                         "context_words": [words]})


def _check_cluster_fits(config: TrainConfig) -> None:
    """Say so when the workers ask for more than the cluster has: Ray Train would wait for
    the resources (on an autoscaling cluster they may come; on a laptop they never do)."""
    import ray

    available = ray.cluster_resources()
    wanted = {"CPU": config.workers * config.cpus_per_worker}
    if config.use_gpu:
        wanted["GPU"] = float(config.workers)
    short = {k: (v, available.get(k, 0.0)) for k, v in wanted.items()
             if v > available.get(k, 0.0)}
    if short:
        log.warning("%d workers need %s but the cluster has %s: training waits until the "
                    "cluster grows", config.workers, wanted,
                    {k: have for k, (_, have) in short.items()})


def resolve_defaults(config: TrainConfig) -> TrainConfig:
    """The run name, experiment and storage that the user left empty."""
    if not config.data:
        raise ValueError("--data is required: the data root written by preprocessing")
    return dataclasses.replace(
        config,
        run_name=config.run_name or _default_run_name(config),
        experiment=config.experiment or f"csmn-{config.task}",
        storage=config.storage or storage.join(config.data, "runs"),
    )


def train_materialize(config: TrainConfig, layer: str) -> tuple[str, str]:
    """(``always`` | ``never``, why) for the train split (``--materialize``): ``auto``
    weighs the join's size, from the files' footers, against the cluster's object store."""
    import ray

    joined_bytes, object_store = 0, 0.0
    if config.materialize == "auto":
        joined_bytes = estimated_joined_bytes(config.data, config.task, config.train_split,
                                              layer)
        object_store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    return choose_materialize(config.materialize, joined_bytes, object_store)


def training_datasets(config: TrainConfig, layer: str) -> tuple[Any, Any, dict[str, Any]]:
    """(train, validation sample, join counts and how the train split is kept): the train
    split in small blocks whose order changes every epoch, held in the object store or
    streamed from Parquet (:func:`train_materialize`); the validation sample, a few thousand
    rows at most, is always held, spread over users with its texts."""
    mode, why = train_materialize(config, layer)
    log.info("%s/%s: materialize=%s (%s)", config.task, config.train_split, mode, why)
    if mode == "always":
        train_ds, train_stats = joined_dataset(config.data, config.task, config.train_split,
                                               layer, block_rows=config.block_rows)
        train_ds = shuffled_each_epoch(train_ds, config.seed)
    else:
        train_ds, train_stats = streamed_dataset(config.data, config.task, config.train_split,
                                                 layer, config.block_rows, config.seed)
    val_ds, val_stats = joined_dataset(config.data, config.task, config.val_split, layer,
                                       limit=config.val_sample_size,
                                       columns=VALIDATION_COLUMNS, seed=config.seed)
    for stats in (train_stats, val_stats):
        if stats.joined == 0:
            raise ValueError(f"{config.task}/{stats.split}: none of {stats.examples} examples "
                             f"has {layer} features: run extract-features first")
    data = _data_params([train_stats, val_stats])
    log.info("data: %s", data)
    # Beside the counts: logged as the run's param data.materialize.
    return train_ds, val_ds, {**data, "materialize": mode}


def features_provenance(data: str, layer: str) -> dict[str, str]:
    """Where the image features came from, as tags that follow the model to its registered
    versions: the promotion gate refuses a model that learned from random ResNet weights."""
    from csmn.tracking.promotion import RANDOM_FEATURES_TAG

    uri = layout.features_meta_uri(data, layer)
    meta = storage.read_json(uri) if storage.exists(uri) else {}
    weights = meta.get("weights") or {}
    return {RANDOM_FEATURES_TAG: str(bool(meta.get("random_weights", True))).lower(),
            "csmn.features_weights": str(weights.get("fingerprint", "unknown"))}


def training_inputs(data: str, vocab: Vocabulary, layer: str) -> dict[str, Any]:
    """How the training data was made (checkpoint ``inputs``): the nightly job makes the
    contexts and features of new posts from this, exactly as this data root did."""
    manifest_uri = layout.manifest_uri(data)
    manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {}
    preprocess_config = manifest.get("config") or {}
    meta_uri = layout.features_meta_uri(data, layer)
    meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
    inputs: dict[str, Any] = {
        "text": {f.name: preprocess_config[f.name] for f in dataclasses.fields(FilterThresholds)
                 if f.name in preprocess_config},
        "data_digest": manifest.get("digest"),
    }
    if vocab.context is not None:
        inputs["context"] = vocab.context
    if meta:
        inputs["features"] = {"layer": layer, "weights": meta.get("weights") or {},
                              "preprocess": meta.get("preprocess") or {},
                              "random_weights": bool(meta.get("random_weights", True))}
    return inputs


def _start_run(config: TrainConfig, model_config: ModelConfig, data: dict[str, Any],
               provenance: dict[str, str]) -> tuple[str, str]:
    """(tracking URI, run id) of the run created (or resumed, by name), its params logged."""
    from csmn import tracking

    tracking_uri = tracking.resolve_tracking_uri(config.data)
    params = tracking.flatten_params({
        "train": {k: v for k, v in dataclasses.asdict(config).items()
                  if k not in ("model", "fail_once_at_epoch")},
        "model": dataclasses.asdict(model_config),
        "data": data,
    })
    run_id = tracking.start_or_resume_run(
        tracking_uri, config.experiment, config.run_name,
        tags={"csmn.task": config.task, "csmn.variant": config.variant,
              "csmn.storage": config.storage,
              **provenance}, params=params)
    tracking.log_params(tracking_uri, run_id, params)
    return tracking_uri, run_id


def build_trainer(config: TrainConfig, loop_config: dict[str, Any], datasets: dict[str, Any]):
    """The TorchTrainer: DDP workers, checkpoints kept by the validation metric, restarts."""
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, storage_path = storage.resolve(config.storage)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        dataset_config=ingest_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu,
            resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.checkpoints_to_keep,
                checkpoint_score_attribute=config.metric_name,
                checkpoint_score_order="max"),
        ),
        datasets=datasets,
    )


@dataclass
class LoggedModel:
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    registered_version: str | None = None


def log_best_model(config: TrainConfig, result: Any, tracking_uri: str, run_id: str,
                   input_example: Any, final_metrics: dict[str, float],
                   provenance: dict[str, str]) -> LoggedModel:
    """The best checkpoint by the validation metric, logged as the run's pyfunc model (and
    registered with ``--register``)."""
    from csmn import tracking

    best = (result.get_best_checkpoint(metric=config.metric_name, mode="max")
            or result.checkpoint)
    if best is None:
        return LoggedModel()
    with tempfile.TemporaryDirectory() as directory:
        best.to_directory(directory)
        # Adam's state is twice the model's size and only resuming reads it, from Ray
        # Train's own checkpoints: the logged model (every download of @champion) leaves it.
        train_state = os.path.join(directory, TRAIN_STATE_FILE)
        if os.path.exists(train_state):
            os.remove(train_state)
        best_metrics = load_checkpoint(directory).metrics
        tracking.log_metrics(tracking_uri, run_id,
                             {f"best_{k}": v for k, v in best_metrics.items()},
                             step=int(best_metrics.get("epoch", 0)))
        info = tracking.log_pyfunc_model(tracking_uri, run_id, directory, config.task,
                                         register=config.register, input_example=input_example)
    logged = LoggedModel(best.path, best_metrics, info.model_uri)
    if config.register:
        logged.registered_version = str(info.registered_model_version)
        tracking.tag_model_version(
            tracking_uri, tracking.registered_model_name(config.task), logged.registered_version,
            {**{f"best_{k}": v for k, v in best_metrics.items()},
             **{f"final_{k}": v for k, v in final_metrics.items()},
             "run_id": run_id, "variant": config.variant, **provenance})
    return logged


def train(config: TrainConfig) -> TrainSummary:
    """Run (or resume) a training run; returns where everything went. The MLflow run ends
    FINISHED, or FAILED on any error after it started."""
    from csmn import tracking
    from csmn.pipeline.runtime import init_ray

    config = resolve_defaults(config)
    require_data_root(config.data, "train", (build_model_config(config, 10).image_layer,))
    init_ray()
    # The by-posts hashtag split has its own vocabulary, fit on train_by_posts.
    vocabulary = load_vocab(config.data, config.task, config.train_split)
    vocab = vocabulary.tokens
    model_config = build_model_config(config, len(vocab))
    train_ds, val_ds, data = training_datasets(config, model_config.image_layer)
    inputs = training_inputs(config.data, vocabulary, model_config.image_layer)
    provenance = features_provenance(config.data, model_config.image_layer)
    data_context = layout.manifest_context_size(config.data)
    if data_context is not None:
        provenance["csmn.data_context_size"] = str(data_context)
        if model_config.context_size > data_context:
            log.warning("%s reads %d context words, the data root's contexts hold at most %d: "
                        "%d slots stay empty (preprocess with --context-size %d to fill them)",
                        config.variant, model_config.context_size, data_context,
                        model_config.context_size - data_context, model_config.context_size)
    tracking_uri, run_id = _start_run(config, model_config, data, provenance)
    with tracking.finished_or_failed(tracking_uri, run_id):
        _check_cluster_fits(config)
        loop_config = {
            "train": dataclasses.asdict(config),
            "model": dataclasses.asdict(model_config),
            "vocab": vocab,
            "inputs": inputs,
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "run_storage": storage.join(config.storage, config.run_name),
        }
        trainer = build_trainer(config, loop_config, {"train": train_ds, "val": val_ds})
        result = trainer.fit()
        final_metrics = {k: float(v) for k, v in (result.metrics or {}).items()
                         if isinstance(v, (int, float))}
        logged = log_best_model(config, result, tracking_uri, run_id,
                                _input_example(val_ds, vocab), final_metrics, provenance)
    return TrainSummary(
        run_name=config.run_name, mlflow_run_id=run_id, tracking_uri=tracking_uri,
        storage=config.storage, epochs_completed=int(final_metrics.get("epoch", 0)),
        best_checkpoint=logged.checkpoint, best_metrics=logged.metrics,
        final_metrics=final_metrics, model_uri=logged.model_uri,
        registered_version=logged.registered_version, data=data)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """One ``--field-name VALUE`` flag per TrainConfig field (``--use-gpu`` and
    ``--register`` need no value)."""
    return config_parser(TrainConfig, "csmn train", __doc__.split("\n")[0])


@exit_code_2("csmn train")
def main(argv: list[str] | None = None) -> int:
    import json

    from csmn.pipeline.runtime import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    config = config_from_args(TrainConfig, args, args.config_file)
    summary = train(config)
    print(json.dumps(redact(dataclasses.asdict(summary)), indent=2, default=str))
    return 0
