"""Train CSMN on Ray Train (TorchTrainer, DDP on CPU or GPU), tracked in MLflow.

Paper 4.3: softmax cross-entropy averaged over the real target tokens, Adam (0.9, 0.999,
1e-8), learning rate 0.001 divided by 1.2 every 5 epochs, 20 epochs, 200 examples per worker
and step, data parallel. The authors' code also clipped gradients at norm 100 (here too;
``grad_clip_norm 0`` turns it off).

Each epoch every worker trains on its shard of the joined train split, then the workers
share the validation sample: loss, and greedy decoding scored by hashtag-set F1 (hashtags)
or corpus BLEU-1 (posts). Rank 0 writes a checkpoint (csmn/checkpoint.py) that Ray Train
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
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from csmn.config import config_from_args, config_parser
from csmn.core.checkpoint import load_checkpoint, save_checkpoint, unwrap
from csmn.core.model import CSMN, ModelConfig, sequence_loss
from csmn.core.tokens import SPECIAL_TOKENS
from csmn.data import storage
from csmn.data.layout import HASHTAG, POST, canonical_task
from csmn.eval.metrics import hashtag_prf
from csmn.pipeline.train_data import Collate, JoinStats, joined_dataset
from csmn.text.vocab import load_vocab

log = logging.getLogger(__name__)

METRIC_NAMES = {HASHTAG: "val_f1", POST: "val_bleu1"}
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
    max_length: int = field(default=16, metadata={"help": "output tokens incl. _EOS"})
    train_split: str = "train"
    val_split: str = "val"
    val_sample_size: int = field(default=1000, metadata={
        "help": "validation examples scored each epoch (the first ones of the split)"})
    shuffle_buffer: int = field(default=2000, metadata={
        "help": "examples in each worker's local shuffle buffer"})
    seed: int = 0
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
        self.task = canonical_task(self.task)
        for name in ("workers", "epochs", "batch_size", "lr_decay_every", "max_length",
                     "val_sample_size", "checkpoints_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

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
    data: dict[str, dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Validation metrics: sums that add up across workers
# --------------------------------------------------------------------------------------------


def _words(ids: list[int]) -> list[int]:
    return [i for i in ids if i >= len(SPECIAL_TOKENS)]


def hashtag_f1(predicted: list[int], truth: list[int]) -> float:
    """2PR/(P+R) between the predicted and true hashtag sets of one post (paper 5.1), on ids:
    the evaluation's own F1 (csmn.eval.metrics), so validation and evaluation agree."""
    return hashtag_prf([str(i) for i in _words(truth)], [str(i) for i in _words(predicted)])[2]


def bleu1_counts(predicted: list[int], truth: list[int]) -> tuple[int, int, int]:
    """(clipped unigram matches, predicted length, reference length) of one post."""
    predicted_words, true_words = _words(predicted), _words(truth)
    true_counts = Counter(true_words)
    matches = sum(min(n, true_counts[w]) for w, n in Counter(predicted_words).items())
    return matches, len(predicted_words), len(true_words)


def corpus_bleu1(matches: float, predicted_length: float, reference_length: float) -> float:
    """BLEU-1 over a corpus with one reference per post: brevity penalty x unigram precision
    (what pycocoevalcap's Bleu(1) computes from the same counts)."""
    if predicted_length <= 0:
        return 0.0
    precision = matches / predicted_length
    brevity = 1.0 if predicted_length > reference_length else math.exp(
        1 - reference_length / predicted_length)
    return brevity * precision


# --------------------------------------------------------------------------------------------
# The loop every worker runs
# --------------------------------------------------------------------------------------------


def _all_reduce(values: list[float], device: torch.device, world_size: int) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from csmn import tracking
    from csmn.core.decoding import greedy_decode

    config = TrainConfig(**loop_config["train"])
    model_config = ModelConfig(**loop_config["model"])
    vocab: list[str] = loop_config["vocab"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # The same seed everywhere: DDP broadcasts rank 0's weights anyway, and a resumed run
    # replaces them from the checkpoint.
    torch.manual_seed(config.seed)
    model = CSMN(model_config)
    start_epoch = 1
    optimizer_state = None
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
    network = unwrap(model)
    collate = Collate(model_config.context_size, model_config.max_length,
                      model_config.image_layer)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, config.epochs + 1):
        _maybe_inject_failure(loop_config, epoch, rank)
        learning_rate = config.learning_rate_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        model.train()
        started = time.perf_counter()
        loss_sum = tokens = examples = 0.0
        batches = train_shard.iter_torch_batches(
            batch_size=config.batch_size, collate_fn=collate, device="cpu",
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            local_shuffle_seed=config.seed * 1000 + epoch * 10 + rank)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(batch["image_features"], batch["context_ids"], batch["input_ids"])
            mean_loss = sequence_loss(logits, batch["targets"])
            local_tokens = (batch["targets"] != 0).sum()
            global_tokens = local_tokens.detach().clone()
            if world_size > 1:
                torch.distributed.all_reduce(global_tokens)
            # DDP averages gradients over workers; weighting each worker's token mean by its
            # share of the step's tokens makes the result the mean over all real tokens of
            # the global batch, exactly as one worker with the whole batch would compute.
            loss = mean_loss * local_tokens * world_size / global_tokens.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            loss_sum += float(mean_loss.detach()) * float(local_tokens)
            tokens += float(local_tokens)
            examples += batch["targets"].shape[0]
        train_seconds = time.perf_counter() - started

        model.eval()
        val_loss_sum = val_tokens = metric_sum = posts = 0.0
        matches = predicted_length = reference_length = 0.0
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=config.batch_size,
                                                      collate_fn=collate, device="cpu"):
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = network(batch["image_features"], batch["context_ids"],
                                 batch["input_ids"])
                batch_tokens = float((batch["targets"] != 0).sum())
                val_loss_sum += float(sequence_loss(logits, batch["targets"])) * batch_tokens
                val_tokens += batch_tokens
                decoded = greedy_decode(network, batch["image_features"], batch["context_ids"],
                                        dedupe_tokens=config.task == "hashtag")
                for predicted, truth in zip(decoded.token_ids, batch["targets"].tolist(),
                                            strict=True):
                    if config.task == "hashtag":
                        metric_sum += hashtag_f1(predicted, truth)
                    else:
                        m, p, r = bleu1_counts(predicted, truth)
                        matches, predicted_length, reference_length = (
                            matches + m, predicted_length + p, reference_length + r)
                    posts += 1

        totals = _all_reduce([loss_sum, tokens, examples, train_seconds, val_loss_sum,
                              val_tokens, metric_sum, posts, matches, predicted_length,
                              reference_length], device, world_size)
        (loss_sum, tokens, examples, summed_seconds, val_loss_sum, val_tokens, metric_sum,
         posts, matches, predicted_length, reference_length) = totals
        if config.task == "hashtag":
            metric = metric_sum / posts if posts else float("nan")
        else:
            metric = corpus_bleu1(matches, predicted_length, reference_length)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(tokens, 1),
            "val_loss": val_loss_sum / val_tokens if val_tokens else float("inf"),
            config.metric_name: metric,
            # Workers train at the same time: global examples over the mean worker time.
            "examples_per_s": examples / max(summed_seconds / world_size, 1e-9),
            "learning_rate": learning_rate,
            "train_examples": examples,
            "val_examples": posts,
        }

        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, model, model_config, vocab, config.task,
                                epoch=epoch, metrics=metrics,
                                train_config=loop_config["train"], optimizer=optimizer)
                ray.train.report(metrics,
                                 checkpoint=ray.train.Checkpoint.from_directory(directory))
            # After the report: a crash before it repeats the epoch, so no step is logged
            # twice.
            tracking.log_metrics(loop_config["tracking_uri"], loop_config["run_id"],
                                 {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        else:
            ray.train.report(metrics)


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


def train(config: TrainConfig) -> TrainSummary:
    """Run (or resume) a training run; returns where everything went."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from csmn import tracking
    from csmn.pipeline.runtime import init_ray

    if not config.data:
        raise ValueError("--data is required: the data root written by preprocessing")
    init_ray()
    config = dataclasses.replace(
        config,
        run_name=config.run_name or _default_run_name(config),
        experiment=config.experiment or f"csmn-{config.task}",
        storage=config.storage or storage.join(config.data, "runs"),
    )
    # The by-posts hashtag split has its own vocabulary, fit on train_by_posts.
    vocab = load_vocab(config.data, config.task, config.train_split).tokens
    model_config = build_model_config(config, len(vocab))
    layer = model_config.image_layer

    train_ds, train_stats = joined_dataset(config.data, config.task, config.train_split, layer)
    val_ds, val_stats = joined_dataset(config.data, config.task, config.val_split, layer,
                                       limit=config.val_sample_size)
    for stats in (train_stats, val_stats):
        if stats.joined == 0:
            raise ValueError(f"{config.task}/{stats.split}: none of {stats.examples} examples "
                             f"has {layer} features: run extract-features first")
    data = _data_params([train_stats, val_stats])
    log.info("data: %s", data)

    tracking_uri = tracking.resolve_tracking_uri(config.data)
    run_id = tracking.start_or_resume_run(
        tracking_uri, config.experiment, config.run_name,
        tags={"csmn.task": config.task, "csmn.variant": config.variant,
              "csmn.storage": config.storage})
    params = tracking.flatten_params({
        "train": {k: v for k, v in dataclasses.asdict(config).items()
                  if k not in ("model", "fail_once_at_epoch")},
        "model": dataclasses.asdict(model_config),
        "data": data,
    })
    tracking.log_params(tracking_uri, run_id, params)

    _check_cluster_fits(config)
    fs, storage_path = storage.resolve(config.storage)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    loop_config = {
        "train": dataclasses.asdict(config),
        "model": dataclasses.asdict(model_config),
        "vocab": vocab,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "run_storage": storage.join(config.storage, config.run_name),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
        datasets={"train": train_ds, "val": val_ds},
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise

    final_metrics = {k: float(v) for k, v in (result.metrics or {}).items()
                     if isinstance(v, (int, float))}
    best = (result.get_best_checkpoint(metric=config.metric_name, mode="max")
            or result.checkpoint)
    best_metrics: dict[str, float] = {}
    model_uri = registered_version = None
    best_path = None
    if best is not None:
        best_path = best.path
        with tempfile.TemporaryDirectory() as directory:
            best.to_directory(directory)
            restored = load_checkpoint(directory)
            best_metrics = restored.metrics
            tracking.log_metrics(tracking_uri, run_id,
                                 {f"best_{k}": v for k, v in best_metrics.items()},
                                 step=int(best_metrics.get("epoch", 0)))
            info = tracking.log_pyfunc_model(
                tracking_uri, run_id, directory, config.task, register=config.register,
                input_example=_input_example(val_ds, vocab))
        model_uri = info.model_uri
        if config.register:
            registered_version = str(info.registered_model_version)
            tracking.tag_model_version(
                tracking_uri, tracking.registered_model_name(config.task), registered_version,
                {**{f"best_{k}": v for k, v in best_metrics.items()},
                 **{f"final_{k}": v for k, v in final_metrics.items()},
                 "run_id": run_id, "variant": config.variant})
    client.set_terminated(run_id, status="FINISHED")
    return TrainSummary(
        run_name=config.run_name, mlflow_run_id=run_id, tracking_uri=tracking_uri,
        storage=config.storage, epochs_completed=int(final_metrics.get("epoch", 0)),
        best_checkpoint=best_path, best_metrics=best_metrics, final_metrics=final_metrics,
        model_uri=model_uri, registered_version=registered_version, data=data)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """One ``--field-name VALUE`` flag per TrainConfig field (``--use-gpu`` and
    ``--register`` need no value)."""
    return config_parser(TrainConfig, "csmn train", __doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> int:
    import json

    from csmn.pipeline.runtime import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    config = config_from_args(TrainConfig, args, args.config_file)
    summary = train(config)
    print(json.dumps(dataclasses.asdict(summary), indent=2, default=str))
    return 0
