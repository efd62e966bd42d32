"""Training on a real Ray (Train V2, Ray Data) with a real MLflow SQLite store.

The data root (tests/helpers.py) is in the contract format with a learnable structure: an
image's feature says its category, the category picks most hashtags, the user adds a
signature hashtag that sits in the user's context; its files are grouped by user, as
preprocessing writes them. The model is tiny (embed 16, memory 32, CNN depth 8).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import helpers
import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from csmn.config import config_from_args
from csmn.core import checkpoint as ckpt
from csmn.core.model import CSMN
from csmn.core.tokens import EOS_ID, FIRST_WORD_ID, GO_ID, PAD_ID
from csmn.eval import metrics
from csmn.pipeline import train_data
from csmn.pipeline.train import (
    FAILURE_MARKER,
    TrainConfig,
    ValidationSums,
    Worker,
    bleu1_counts,
    build_model_config,
    build_parser,
    corpus_bleu1,
    epoch_line,
    hashtag_f1,
    hide_context_words,
    resolve_defaults,
    train,
    training_datasets,
    validate,
)
from csmn.pipeline.train_data import (
    JOIN_COMMIT_FILE,
    batch_options,
    choose_materialize,
    collate_batch,
    joined_dataset,
    read_examples,
    streamed_dataset,
)
from csmn.text.vocab import load_vocab

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = 4
TAGS_PER_CATEGORY = 5
USERS = 8
TINY_MODEL = {"embed_dim": 16, "memory_dim": 32, "cnn_depth": 8}
CONTEXT = 8


def write_data_root(root: Path, **options) -> Path:
    """The tests' tiny hashtag archive (helpers.write_tagged_root), grouped by user."""
    helpers.write_tagged_root(str(root), users=USERS, categories=CATEGORIES,
                              tags_per_category=TAGS_PER_CATEGORY, context_size=CONTEXT,
                              **options)
    return root


def tiny_config(root: Path, **overrides) -> TrainConfig:
    values = dict(data=str(root), task="hashtag", variant="P5", context_size=CONTEXT,
                  workers=1, cpus_per_worker=0.5, epochs=3, batch_size=32,
                  learning_rate=0.01, model=dict(TINY_MODEL), val_sample_size=64,
                  shuffle_buffer=64, block_rows=8, checkpoints_to_keep=2, max_failures=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_data_root(tmp_path_factory.mktemp("csmn-data"))


@pytest.fixture(scope="module")
def one_worker_run(ray_session, data_root, mlflow_tracking_uri):
    return train(tiny_config(data_root, run_name="one-worker", register=True))


# ---- pieces without a trainer ----------------------------------------------------------------


def test_collate_builds_shifted_padded_tensors():
    batch = {
        "token_ids": np.array([np.array([5, 6, EOS_ID]), np.array([7, EOS_ID])], dtype=object),
        "context_ids": np.array([np.array([9, 10]), np.array([], dtype=np.int32)],
                                dtype=object),
        "feature": np.stack([np.ones(2048, np.float32), np.zeros(2048, np.float32)]),
    }
    out = collate_batch(batch, context_size=4, max_length=16)
    assert out["image_features"].shape == (2, 2048)
    assert out["context_ids"].tolist() == [[9, 10, 0, 0], [0, 0, 0, 0]]
    assert out["targets"].shape == (2, 16)
    assert out["targets"][0, :4].tolist() == [5, 6, EOS_ID, 0]
    assert out["input_ids"][0, :4].tolist() == [GO_ID, 5, 6, 0]
    assert out["input_ids"][1, :3].tolist() == [GO_ID, 7, 0]
    with pytest.raises(ValueError, match="longer than max_length"):
        collate_batch({**batch, "token_ids": np.array([np.arange(17), np.arange(3)],
                                                      dtype=object)}, 4)


def test_validation_metrics():
    assert hashtag_f1([5, 6, EOS_ID], [5, 7, EOS_ID]) == pytest.approx(0.5)
    assert hashtag_f1([], [5, EOS_ID]) == 0.0
    assert bleu1_counts([5, 5, 6], [5, 7, 8, EOS_ID]) == (1, 3, 3)
    assert corpus_bleu1(1, 3, 3) == pytest.approx(1 / 3)
    assert corpus_bleu1(2, 2, 4) == pytest.approx(np.exp(1 - 2))


def test_validation_scores_as_the_evaluation_does():
    """Validation's numbers from words and texts equal csmn.eval.metrics' on the same posts,
    out-of-vocabulary truths (``_UNK`` in token_ids) included."""
    texts = ["#beach #sun #rare", "#food #pasta", "#city #unseen1 #unseen2"]
    predicted = [["#beach", "#sun"], ["#pasta", "#food", "#night"], ["#city"]]
    sums = ValidationSums()
    for words, text in zip(predicted, texts, strict=True):
        sums.add_post("hashtag", words, text)
    assert sums.metric("hashtag") == pytest.approx(metrics.score_hashtags(texts, predicted).f1)
    # By ids, the two unknown tags would be one _UNK and F1 would be 2/3, not 0.5.
    assert hashtag_f1(["#city"], "#city #unseen1 #unseen2".split()) == pytest.approx(0.5)

    references = ["a sunny day at the beach", "homemade pasta tonight", "city lights"]
    words = [["sunny", "beach", "day", "day"], ["pasta", "tonight"], ["lights"]]
    posts = ValidationSums()
    for prediction, text in zip(words, references, strict=True):
        posts.add_post("post", prediction, text)
    assert posts.metric("post") == pytest.approx(
        metrics.corpus_bleu_1(references, [" ".join(w) for w in words]), rel=1e-6)


def test_validation_sums_reduce_by_field_name():
    sums = ValidationSums(loss_sum=3.0, tokens=4.0, posts=2.0, f1_sum=1.5)
    assert sums.reduced(torch.device("cpu"), world_size=1) == sums


def test_epoch_line_is_for_people():
    line = epoch_line({"epoch": 3, "train_loss": 4.1234, "val_loss": 4.5, "val_f1": 0.2312,
                       "examples_per_s": 1234.4}, 20, "val_f1", 12.2)
    assert line == "epoch 3/20  loss 4.123  val_loss 4.500  val_f1 0.231  1,234 ex/s  12s left"
    assert epoch_line({"epoch": 1, "train_loss": 1, "val_loss": 1, "val_bleu1": 0,
                       "examples_per_s": 5}, 2, "val_bleu1", 8000).endswith("2h13m left")


def test_validation_sample_spreads_over_users(data_root):
    """The files hold one user after another; the sample must not be their first rows."""
    first = read_examples(str(data_root), "hashtag", "val", columns=("user_id",))
    assert len(set(first.column("user_id").to_pylist()[:16])) <= 2
    sample = read_examples(str(data_root), "hashtag", "val", limit=16, columns=("user_id",))
    assert sample.num_rows == 16 and len(set(sample.column("user_id").to_pylist())) >= 6
    again = read_examples(str(data_root), "hashtag", "val", limit=16,
                          columns=("post_id", "user_id"))
    other = read_examples(str(data_root), "hashtag", "val", limit=16,
                          columns=("post_id", "user_id"), seed=1)
    assert again.column("user_id").to_pylist() == sample.column("user_id").to_pylist()
    assert again.column("post_id").to_pylist() != other.column("post_id").to_pylist()


def _user_batches(dataset, config: TrainConfig, epoch: int, users: dict[str, str]):
    """Users of each batch, iterating as a training worker does (its shuffle options)."""
    batches = dataset.iter_batches(
        batch_size=config.batch_size, batch_format="pyarrow",
        **batch_options(config.shuffle_buffer, config.seed, epoch, rank=0))
    return [[users[image] for image in b.column("image").to_pylist()] for b in batches]


def test_training_batches_mix_users_and_change_every_epoch(ray_session, data_root):
    config = resolve_defaults(tiny_config(data_root))
    users = {r["image"]: r["user_id"] for r in read_examples(
        str(data_root), "hashtag", "train", columns=("image", "user_id")).to_pylist()}
    train_ds, _, _ = training_datasets(config, "pool5")
    epochs = [_user_batches(train_ds, config, epoch, users) for epoch in (1, 2)]
    distinct = [len(set(b)) for batches in epochs for b in batches]
    # 8 users, ~40 posts each, batches of 32: one user after another without mixing.
    assert min(distinct) >= 3 and np.mean(distinct) >= 5.5, distinct
    assert sum(len(b) for b in epochs[0]) == 318
    assert [u for b in epochs[0] for u in b] != [u for b in epochs[1] for u in b]
    # The same blocks read in file order mix far less: the shuffle is what mixes.
    in_order, _ = joined_dataset(str(data_root), "hashtag", "train", "pool5", block_rows=8)
    unmixed = [len(set(b)) for b in _user_batches(in_order, config, 1, users)]
    assert np.mean(unmixed) < np.mean(distinct) - 1.5, (unmixed, distinct)


def test_context_dropout_hides_words_as_padding_at_its_rate():
    context = torch.arange(FIRST_WORD_ID, FIRST_WORD_ID + 60).repeat(500, 1)
    context[:, 50:] = PAD_ID  # a short context: its padding stays padding
    hidden = hide_context_words(context, 0.3, torch.Generator().manual_seed(1))
    dropped = hidden[:, :50] == PAD_ID
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.01)
    kept = ~dropped
    assert torch.equal(hidden[:, :50][kept], context[:, :50][kept])  # the rest untouched
    assert (hidden[:, 50:] == PAD_ID).all()
    again = hide_context_words(context, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(hidden, again)  # seeded: a resumed epoch hides the same words
    assert TrainConfig(data="/d").context_dropout == 0.0  # the paper has none
    with pytest.raises(ValueError, match="context_dropout"):
        TrainConfig(data="/d", context_dropout=1.0)


def test_parser_switches_and_defaults():
    args = build_parser().parse_args(["--data", "/d", "--task", "caption", "--use-gpu",
                                      "--register", "--workers", "2", "--epochs", "3"])
    parsed = config_from_args(TrainConfig, args)
    assert (parsed.use_gpu, parsed.register, parsed.workers, parsed.epochs) == (True, True, 2, 3)
    assert parsed.task == "post"  # "caption" is the command line's alias of the post task
    args = build_parser().parse_args(["--data", "/d", "--use-gpu", "false"])
    assert config_from_args(TrainConfig, args).use_gpu is False
    paper = TrainConfig(data="/d")
    assert (paper.epochs, paper.batch_size, paper.learning_rate, paper.adam_epsilon) == (
        20, 200, 0.001, 1e-8)
    assert paper.learning_rate_at(5) == 0.001
    assert paper.learning_rate_at(6) == pytest.approx(0.001 / 1.2)
    assert paper.learning_rate_at(20) == pytest.approx(0.001 / 1.2 ** 3)


def test_validation_decodes_by_the_evaluation_rules(ray_session, data_root):
    """The validation F1 picks the kept checkpoints, so it must decode as the evaluation
    does: a model whose _EOS is the most probable token at every step but less likely than
    all words together ends at once under the paper's stop rule and names tags under
    'likely' (tests/core/test_model.py has the same model at the decoder)."""
    import math

    config = tiny_config(data_root)
    vocab = load_vocab(config.data, config.task, config.train_split).tokens
    model_config = build_model_config(config, len(vocab))
    words = len(vocab) - FIRST_WORD_ID
    torch.manual_seed(0)
    network = CSMN(model_config)
    with torch.no_grad():
        network.hidden.weight.zero_()
        network.hidden.bias.fill_(1.0)
        network.vocab.weight.zero_()
        network.vocab.weight[EOS_ID] = math.log(words / 2 + 0.5) / model_config.state_dim
    _, val_ds, _ = training_datasets(config, model_config.image_layer)
    scores = {}
    for stop in ("paper", "likely"):
        rules = dataclasses.replace(config, stop=stop)
        worker = Worker(rules, model_config, vocab, 0, 1, torch.device("cpu"), network,
                        torch.optim.Adam(network.parameters()), 1)
        sums = validate(worker, val_ds)
        assert sums.posts == 64
        scores[stop] = sums.metric("hashtag")
    assert scores["paper"] == 0.0 and scores["likely"] > 0.05, scores
    with pytest.raises(ValueError, match="stop"):
        TrainConfig(data="/d", stop="sometimes")


def test_join_counts_examples_without_features(ray_session, data_root):
    joined, stats = joined_dataset(str(data_root), "hashtag", "train", "pool5")
    assert (stats.examples, stats.joined, stats.skipped_no_features) == (320, 318, 2)
    row = joined.take(1)[0]
    assert len(row["feature"]) == 2048 and row["token_ids"][-1] == EOS_ID


# ---- the train split streamed from Parquet (--materialize never) -----------------------------


def test_materialize_choice_weighs_the_join_against_the_object_store():
    gib = 2**30
    assert choose_materialize("auto", 3 * gib, 10 * gib)[0] == "always"  # 30%: still fits
    mode, why = choose_materialize("auto", 3 * gib + 1, 10 * gib)
    assert mode == "never" and "30%" in why and "10 GiB" in why
    assert choose_materialize("auto", 1, 0)[0] == "never"  # no object store reported
    assert choose_materialize("always", 100 * gib, gib)[0] == "always"
    assert choose_materialize("never", 1, 100 * gib)[0] == "never"
    with pytest.raises(ValueError, match="materialize must be one of"):
        choose_materialize("sometimes", 1, 1)
    with pytest.raises(ValueError, match="materialize must be one of"):
        TrainConfig(data="/d", materialize="sometimes")
    assert "--materialize" in build_parser().format_help()
    args = build_parser().parse_args(["--data", "/d", "--materialize", "never"])
    assert config_from_args(TrainConfig, args).materialize == "never"
    assert TrainConfig(data="/d").materialize == "auto"


def _rows(dataset) -> Counter:
    return Counter((r["image"], tuple(r["token_ids"]), tuple(r["context_ids"]))
                   for r in dataset.iter_rows())


def _images(dataset) -> list[str]:
    return [image for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow")
            for image in batch.column("image").to_pylist()]


def test_streamed_split_has_the_materialized_rows_in_a_new_order_each_epoch(
        ray_session, data_root):
    streamed, stats = streamed_dataset(str(data_root), "hashtag", "train", "pool5",
                                       block_rows=8, seed=0)
    materialized, materialized_stats = joined_dataset(str(data_root), "hashtag", "train",
                                                      "pool5", block_rows=8)
    # Each pass (epoch) is an execution of the dataset, in an order of its own.
    first, second = _images(streamed), _images(streamed)
    assert first != second and sorted(first) == sorted(second)
    assert stats == materialized_stats
    assert (stats.examples, stats.joined, stats.skipped_no_features) == (320, 318, 2)
    assert _rows(streamed) == _rows(materialized)
    # Files of a block each, so that the file order is a block order.
    commit = json.loads(next((data_root / "cache").rglob(JOIN_COMMIT_FILE)).read_text())
    assert len(commit["files"]) >= 318 // 8
    again, _ = streamed_dataset(str(data_root), "hashtag", "train", "pool5", block_rows=8,
                                seed=0)
    assert [_images(again), _images(again)] == [first, second]
    other_seed, _ = streamed_dataset(str(data_root), "hashtag", "train", "pool5",
                                     block_rows=8, seed=1)
    assert _images(other_seed) != first
    # Through streaming_split, as Ray Train's workers read it: a new order every epoch too.
    shard, = again.streaming_split(1, equal=True)
    passes = [[image for b in shard.iter_batches(batch_size=None, batch_format="pyarrow")
               for image in b.column("image").to_pylist()] for _ in range(2)]
    assert passes[0] != passes[1] and sorted(passes[0]) == sorted(first)
    # A worker's batches (file order + its local shuffle buffer) mix users as the
    # materialized blocks do (test_training_batches_mix_users_and_change_every_epoch).
    config = tiny_config(data_root)
    users = {r["image"]: r["user_id"] for r in read_examples(
        str(data_root), "hashtag", "train", columns=("image", "user_id")).to_pylist()}
    distinct = [len(set(b)) for b in _user_batches(streamed, config, 1, users)]
    assert min(distinct) >= 3 and np.mean(distinct) >= 5.5, distinct


def test_streamed_cache_is_reused_finished_only_and_rebuilt_for_new_features(
        ray_session, tmp_path):
    root = write_data_root(tmp_path / "data")

    def stream():
        dataset, stats = streamed_dataset(str(root), "hashtag", "train", "pool5",
                                          block_rows=16, seed=0)
        commits = sorted((root / "cache").rglob(JOIN_COMMIT_FILE))
        return dataset, stats, commits

    _, stats, commits = stream()
    assert len(commits) == 1 and stats.joined == 318
    written = commits[0].stat().st_mtime_ns
    _, again, commits = stream()
    assert again == stats and commits[0].stat().st_mtime_ns == written  # reused

    # A build that began before that one committed (another job on the same root): it
    # loses the commit, deletes its own files and reads the winner's.
    cache = commits[0].parent
    winner = json.loads(commits[0].read_text())
    spec = train_data.JoinSpec("hashtag", "train", "pool5", block_rows=16)
    _, feature_files = train_data._input_files(str(root), "hashtag", "train", "pool5")
    late = train_data._write_join(str(root), spec, feature_files, str(cache),
                                  winner["spec_digest"])
    assert late == winner and json.loads(commits[0].read_text()) == winner
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        {JOIN_COMMIT_FILE, train_data.LAST_READ_FILE, winner["files"][0].split("/")[0]})
    dataset, again, _ = stream()
    assert again == stats and sum(Counter(_images(dataset)).values()) == 318

    # A job killed before its commit record: its files are there, but never read, and the
    # next build deletes them.
    commits[0].unlink()
    (cache / "build-killed").mkdir()
    (cache / "build-killed" / "part-999999-stray-0.parquet").write_bytes(b"half a file")
    dataset, rebuilt, commits = stream()
    assert rebuilt == stats and commits[0].parent == cache
    assert not (cache / "build-killed").exists()
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    assert sum(Counter(_images(dataset)).values()) == 318

    # Extraction rewrote a feature file (one image fewer): a new join. The old one was
    # streamed moments ago, by a training that may read it still: it stays until a commit
    # finds its last read older than the grace.
    part = sorted((root / "features" / "pool5").glob("part-*.parquet"))[0]  # train images
    table = pq.read_table(part)
    pq.write_table(table.slice(0, table.num_rows - 1), part)
    dataset, changed, commits = stream()
    assert (changed.examples, changed.joined, changed.skipped_no_features) == (320, 317, 3)
    assert len(commits) == 2 and cache.exists()
    assert len(_images(dataset)) == 317
    new_cache = next(c.parent for c in commits if c.parent != cache)
    # A day later, the next training of this join (on the new cache) deletes the old one.
    (cache / train_data.LAST_READ_FILE).write_text(json.dumps(
        {"time": time.time() - train_data.SUPERSEDED_GRACE_S - 1}))
    _, _, commits = stream()
    assert not cache.exists() and [c.parent for c in commits] == [new_cache]


# ---- training --------------------------------------------------------------------------------


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def test_one_worker_trains_logs_and_serves(one_worker_run, mlflow_tracking_uri, data_root):
    summary = one_worker_run
    assert summary.epochs_completed == 3
    assert summary.data["train"] == {"examples": 320, "joined": 318, "skipped_no_features": 2}
    losses = [v for _, v in _history(summary.mlflow_run_id, "train_loss")]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.9
    assert [s for s, _ in _history(summary.mlflow_run_id, "val_loss")] == [1, 2, 3]
    for key in ("val_f1", "examples_per_s", "learning_rate"):
        assert len(_history(summary.mlflow_run_id, key)) == 3

    run = MlflowClient().get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.batch_size"] == "32" and params["model.embed_dim"] == "16"
    assert params["data.train.skipped_no_features"] == "2"
    # 2.6 MB of joined rows against 30% of the tests' 400 MiB object store: held there.
    assert (params["train.materialize"], params["data.materialize"]) == ("auto", "always")
    assert params["model.vocab_size"] == str(4 + CATEGORIES * TAGS_PER_CATEGORY + USERS + 2)

    # The pyfunc: no Ray needed to answer a DataFrame of posts.
    model = mlflow.pyfunc.load_model(summary.model_uri)
    feature = np.zeros(2048, dtype=np.float32)
    feature[16:32] = 1.0
    frame = pd.DataFrame({"image_feature": [feature.tolist(), feature.tolist()],
                          "context_words": [["#u1", "#photo", "#c1t0"], []]})
    predicted = model.predict(frame)
    assert list(predicted.columns) == ["prediction"] and len(predicted) == 2
    for tags in predicted["prediction"]:
        assert all(isinstance(t, str) and t.startswith("#") for t in tags)
        assert len(tags) == len(set(tags))
    signature = model.metadata.signature.to_dict()
    assert "image_feature" in signature["inputs"] and "prediction" in signature["outputs"]

    # Loading and predicting never imports Ray (a serving box may not have it).
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "import mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({summary.model_uri!r})\n"
        "frame = pd.DataFrame({'image_feature': [[0.0] * 2048], 'context_words': [['#u1']]})\n"
        "print(type(model.predict(frame)['prediction'][0]).__name__)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_tracking_uri}
    without_ray = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                 text=True, env=env, timeout=120)
    assert without_ray.returncode == 0, without_ray.stderr[-2000:]
    assert without_ray.stdout.strip().splitlines()[-1] in ("list", "ndarray")

    # Registered as a new version of csmn-hashtag, tagged with the run's metrics.
    client = MlflowClient()
    version = client.get_model_version("csmn-hashtag", summary.registered_version)
    assert version.run_id == summary.mlflow_run_id
    assert float(version.tags["best_val_loss"]) == pytest.approx(
        summary.best_metrics["val_loss"])
    assert "final_val_f1" in version.tags
    assert version.tags["csmn.data_context_size"] == "8"  # write_data_root's D
    # The logged model is the model: Adam's state (twice its size) stays in Ray Train's
    # checkpoints, which resuming reads.
    logged = mlflow.artifacts.download_artifacts(summary.model_uri)
    files = {name for _, _, names in os.walk(logged) for name in names}
    assert ckpt.MODEL_FILE in files and ckpt.TRAIN_STATE_FILE not in files, files
    assert ckpt.TRAIN_STATE_FILE in os.listdir(summary.best_checkpoint)

    # The checkpoint rebuilds the model without Ray, with weights_only loading.
    loaded = ckpt.load_checkpoint(summary.best_checkpoint)
    assert loaded.vocab[:3] == ["_PAD", "_GO", "_EOS"] and loaded.task == "hashtag"
    assert loaded.model_config.embed_dim == 16


def test_one_worker_trains_on_the_streamed_split(ray_session, data_root, mlflow_tracking_uri):
    """One epoch on the train split streamed from its Parquet cache: every joined row is
    trained on once, with the same counts as the materialized run's; with context dropout
    on, which is a training option like any other (logged, a finite loss)."""
    summary = train(tiny_config(data_root, run_name="streamed", epochs=1, materialize="never",
                                context_dropout=0.3))
    assert summary.epochs_completed == 1
    assert summary.data["train"] == {"examples": 320, "joined": 318, "skipped_no_features": 2}
    assert summary.data["materialize"] == "never"
    params = MlflowClient().get_run(summary.mlflow_run_id).data.params
    assert (params["train.materialize"], params["data.materialize"]) == ("never", "never")
    assert params["train.context_dropout"] == "0.3"
    assert _history(summary.mlflow_run_id, "train_examples") == [(1, 318.0)]
    assert np.isfinite(_history(summary.mlflow_run_id, "train_loss")[0][1])


def test_two_workers_match_one_worker_and_resume_after_a_kill_and_a_worker_failure(
        one_worker_run, ray_session, data_root, mlflow_tracking_uri):
    """Two workers at half the batch each (the same global batch as one_worker_run).
    Attempt 1 dies at the start of epoch 2 with no retries left: the run is 'killed'.
    Started again under the same name it resumes after epoch 1, in the same MLflow run; then
    rank 0 fails at the start of epoch 3 and FailureConfig restarts the group from the
    epoch-2 checkpoint. Every epoch ran (and was logged) exactly once."""
    config = tiny_config(data_root, run_name="two-flaky", workers=2, batch_size=16, epochs=3,
                         fail_once_at_epoch=2, max_failures=0)
    with pytest.raises(Exception, match="injected failure"):
        train(config)
    client = MlflowClient()
    experiment_id = mlflow.get_experiment_by_name("csmn-hashtag").experiment_id
    run_id = client.search_runs(
        [experiment_id], filter_string="tags.mlflow.runName = 'two-flaky'")[0].info.run_id
    assert client.get_run(run_id).info.status == "FAILED"
    assert [s for s, _ in _history(run_id, "train_loss")] == [1]

    summary = train(dataclasses.replace(config, fail_once_at_epoch=3, max_failures=1))
    assert summary.mlflow_run_id == run_id and summary.epochs_completed == 3
    run_dir = data_root / "runs" / "two-flaky"
    assert (run_dir / f"{FAILURE_MARKER}_epoch2").exists()
    assert (run_dir / f"{FAILURE_MARKER}_epoch3").exists()
    losses = _history(run_id, "train_loss")
    assert [s for s, _ in losses] == [1, 2, 3]
    assert [v for _, v in _history(run_id, "resumed_at_epoch")] == [2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["csmn.resumed_with.train.max_failures"] == "0 -> 1"

    # Both shards together saw every joined example once per epoch, and the loss fell.
    assert [v for _, v in _history(run_id, "train_examples")] == [318, 318, 318]
    assert losses[-1][1] < losses[0][1] * 0.9
    # DDP with token-weighted losses = one worker with the whole batch (orders differ).
    one_first = _history(one_worker_run.mlflow_run_id, "train_loss")[0][1]
    assert losses[0][1] == pytest.approx(one_first, rel=0.05)


def test_checkpoint_round_trip_without_ray(tmp_path):
    from csmn.core.model import CSMN, ModelConfig

    config = ModelConfig(vocab_size=10, context_size=6, **TINY_MODEL)
    model = CSMN(config)
    vocab = ["_PAD", "_GO", "_EOS", "_UNK"] + [f"w{i}" for i in range(6)]
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 2048), torch.ones(2, 6, dtype=torch.long),
          torch.ones(2, 3, dtype=torch.long)).sum().backward()
    optimizer.step()
    ckpt.save_checkpoint(str(tmp_path / "c"), model, config, vocab, "post", epoch=4,
                         metrics={"val_loss": 1.5}, optimizer=optimizer)
    loaded = ckpt.load_checkpoint(str(tmp_path / "c"), with_train_state=True)
    assert loaded.epoch == 4 and loaded.metrics == {"val_loss": 1.5}
    assert loaded.model_config == config and loaded.vocab == vocab
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    assert loaded.train_state["optimizer"]["state"]
    with pytest.raises(ValueError, match="vocabulary has 3 tokens"):
        ckpt.save_checkpoint(str(tmp_path / "d"), model, config, vocab[:3], "post")


# ---- end to end: `ray job submit` against a head node with token authentication ----------------


@pytest.fixture()
def ray_head():
    """A head node the way ``csmn demo`` starts one for its job (csmn.pipeline.launch):
    token authentication on, a token of its own in a 0600 file (the shared
    ~/.ray/auth_token is left alone), its own ports and temp dir."""
    from csmn.pipeline.launch import HeadOptions, local_head

    with local_head(HeadOptions(num_cpus=2, object_store_bytes=300 * 1024 * 1024)) as head:
        yield head


def test_ray_job_submit_end_to_end(ray_head, tmp_path):
    from csmn.pipeline.launch import ray_cli, submit_job

    head = ray_head
    root = write_data_root(tmp_path / "root", train_posts=160, val_posts=32)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Without the token the job server refuses the client.
    wrong_token = tmp_path / "wrong-token"
    wrong_token.write_text(uuid.uuid4().hex)
    refused = subprocess.run([ray_cli(), "job", "list", "--address", head.address],
                             env={**head.env, "RAY_AUTH_TOKEN_PATH": str(wrong_token)},
                             capture_output=True, text=True)
    assert refused.returncode != 0
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, **head.job_env_vars()}}
    entrypoint = [
        "python", "jobs/train.py", "--data", str(root), "--task", "hashtag",
        "--context-size", str(CONTEXT), "--epochs", "2", "--batch-size", "32",
        "--cpus-per-worker", "0.5", "--learning-rate", "0.01", "--val-sample-size", "32",
        "--model", json.dumps(TINY_MODEL), "--run-name", "submitted", "--register"]
    logs = io.StringIO()
    status = submit_job(head, entrypoint, str(REPO), f"train-{uuid.uuid4().hex[:8]}",
                        runtime_env=runtime_env, out=logs)
    output = logs.getvalue()
    assert status == 0, output[-6000:]
    assert "epoch 2/2  loss " in output
    client = MlflowClient(tracking_uri)
    run = client.search_runs(
        [client.get_experiment_by_name("csmn-hashtag").experiment_id],
        filter_string="tags.mlflow.runName = 'submitted'")[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    versions = client.search_model_versions("name = 'csmn-hashtag'")
    assert [v.run_id for v in versions] == [run.info.run_id]
