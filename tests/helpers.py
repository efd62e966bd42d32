"""Builders of tiny data roots in the contract format, shared by the tests.

A plain module (pytest puts ``tests/`` on ``sys.path`` for the test modules and conftest),
imported as ``import helpers``. Everything is written through ``csmn.data.layout`` and
``csmn.data.schemas.conform``, so a builder breaks when the contract changes, as the jobs do.

Two levels:

* pieces: :func:`example_row`, :func:`write_vocab`, :func:`write_examples`,
  :func:`write_features`, :func:`write_contexts`, :func:`category_feature`, for a test that
  lays out its own users and posts (local paths or ``s3://`` roots alike);
* :func:`write_tagged_root`: a learnable hashtag archive (an image's feature says its
  category, the category picks most hashtags, the user adds a signature tag that is in the
  user's context), written grouped by user, in user order, as preprocessing writes it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from csmn.core.model import ModelConfig
from csmn.core.tokens import EOS_ID, SPECIAL_TOKENS, UNK_ID
from csmn.data import layout, schemas, storage

FEATURE_DIM = layout.FEATURE_DIM


# ---- pieces ----------------------------------------------------------------------------------

# Raw posts of hand-written archives (preprocessing and hostile-archive tests): a start
# time, everyday English words the dictionary knows, and hashtags.
T0 = datetime(2016, 6, 1, tzinfo=UTC)
WORDS = (
    "sunny morning coffee beach walk with friends happy weekend family dinner lovely garden "
    "flowers blue sky city lights night music book reading quiet afternoon mountain trail "
    "river cold warm bread fresh market street photo window rain dog cat park lake summer"
).split()
TAGS = [f"#{w}" for w in "travel food nature love art style design fitness".split()]


def category_feature(category: int, rng: np.random.Generator, noise: float = 0.1,
                     width: int = 16) -> np.ndarray:
    """A pool5-sized vector whose ``width`` dimensions at ``category * width`` stand out."""
    vector = rng.normal(0, noise, FEATURE_DIM).astype(np.float32)
    vector[category * width:(category + 1) * width] += 1.0
    return vector


def example_row(user_id: str, post_id: str, image: str, tokens: Sequence[str],
                context: Sequence[str], ids: Mapping[str, int],
                context_size: int | None = None) -> dict[str, Any]:
    """One ``example`` row: tokens out of the vocabulary become ``_UNK``, ``_EOS`` ends them."""
    context = list(context)[:context_size]
    return {
        "user_id": user_id, "post_id": post_id, "created_at": None, "image": image,
        "text": " ".join(tokens),
        "token_ids": [ids.get(t, UNK_ID) for t in tokens] + [EOS_ID],
        "context_ids": [ids.get(w, UNK_ID) for w in context],
        "context_words": context,
    }


def write_vocab(root: str, task: str, words: Iterable[str], split: str | None = None) -> list[str]:
    """The special tokens, then ``words``; returns the token list (index = id)."""
    tokens = [*SPECIAL_TOKENS, *words]
    storage.write_json(layout.vocab_uri(root, task, split), {"tokens": tokens})
    return tokens


def _parts(rows: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    size = -(-len(rows) // parts) if rows else 0
    return [rows[i * size:(i + 1) * size] for i in range(parts) if rows[i * size:(i + 1) * size]]


def write_examples(root: str, task: str, split: str, rows: Sequence[dict[str, Any]],
                   parts: int = 1) -> None:
    """The rows, in their order, as ``parts`` parquet files of the split."""
    folder = layout.examples_dir(root, task, split)
    for part, chunk in enumerate(_parts(rows, parts)):
        storage.write_parquet(storage.join(folder, f"part-{part:05d}.parquet"),
                              schemas.conform(list(chunk), "example"))


def write_features(root: str, features: Sequence[tuple[str, np.ndarray]], parts: int = 1,
                   layer: str = "pool5") -> None:
    """(image, feature) pairs, in their order, as ``parts`` parquet files of ``layer``."""
    folder = layout.features_dir(root, layer)
    for part, chunk in enumerate(_parts(features, parts)):
        table = schemas.conform({"image": [image for image, _ in chunk],
                                 "feature": [np.ravel(f).tolist() for _, f in chunk]},
                                f"features_{layer}")
        storage.write_parquet(storage.join(folder, f"part-{part:05d}.parquet"), table)


def write_contexts(root: str, task: str, contexts: Mapping[str, Sequence[str]]) -> None:
    """The per-user context table of ``task`` (user -> context words)."""
    storage.write_parquet(layout.contexts_uri(root, task), schemas.conform(
        {"user_id": list(contexts), "context_words": [list(c) for c in contexts.values()]},
        "user_context"))


def finish_root(root: str, layers: Sequence[str] = ("pool5",), **manifest: Any) -> None:
    """Mark a hand-built root complete as the stages do (csmn.data.completeness): each
    layer's ``_meta.json`` with status ``complete`` (random weights), then the manifest with
    its digest, last."""
    for layer in layers:
        storage.write_json(layout.features_meta_uri(root, layer), {
            "layer": layer, "status": "complete", "random_weights": True,
            "weights": {"name": "random", "fingerprint": "test-helpers"}})
    layout.write_manifest(root, {"version": 1, "root": root, **manifest})


# ---- a learnable hashtag archive -------------------------------------------------------------


@dataclass
class TaggedArchive:
    """What :func:`write_tagged_root` wrote, for assertions."""

    root: str
    vocab: list[str]
    rows: dict[str, list[dict[str, Any]]] = field(repr=False)
    features_missing: list[str] = field(default_factory=list)

    def users_by_image(self) -> dict[str, str]:
        return {r["image"]: r["user_id"] for rows in self.rows.values() for r in rows}


def write_tagged_root(root: str, train_posts: int = 320, val_posts: int = 64,
                      missing_features: int = 2, users: int = 8, categories: int = 4,
                      tags_per_category: int = 5, context_size: int = 8, seed: int = 0,
                      example_parts: int = 2, feature_parts: int = 3) -> TaggedArchive:
    """A hashtag data root (task ``hashtag``, splits ``train`` and ``val``, pool5 features).

    Posts go to users at random, then are written grouped by user in user order (and the
    features in the same order), as preprocessing and extraction write a real archive: a
    reader that does not mix sees one user at a time. The first ``missing_features`` train
    images get no feature row (their examples must be skipped and counted).
    """
    rng = np.random.default_rng(seed)
    category_tags = [[f"#c{c}t{k}" for k in range(tags_per_category)]
                     for c in range(categories)]
    user_tags = [f"#u{u}" for u in range(users)]
    filler = ["#photo", "#nice"]
    vocab = write_vocab(root, layout.HASHTAG,
                        [t for ts in category_tags for t in ts] + user_tags + filler)
    ids = {t: i for i, t in enumerate(vocab)}
    rows: dict[str, list[dict[str, Any]]] = {}
    features: list[tuple[str, np.ndarray]] = []
    for split, count in ((layout.TRAIN, train_posts), (layout.VAL, val_posts)):
        drawn = []
        for n in range(count):
            user, category = int(rng.integers(users)), int(rng.integers(categories))
            words = list(rng.choice(category_tags[category], size=int(rng.integers(3, 6)),
                                    replace=False))
            words.insert(int(rng.integers(len(words) + 1)), user_tags[user])
            context = [user_tags[user], *filler, *category_tags[(user + 1) % categories]]
            image = f"file:///archive/images/u{user}/{split}-{n}.jpg"
            drawn.append((user, example_row(f"u{user}", f"{split}-{n}", image, words, context,
                                            ids, context_size),
                          category_feature(category, rng)))
        drawn.sort(key=lambda d: d[0])  # stable: grouped by user, posts in drawn order
        rows[split] = [row for _, row, _ in drawn]
        features += [(row["image"], feature) for _, row, feature in drawn]
        write_examples(root, layout.HASHTAG, split, rows[split], parts=example_parts)
    missing = [image for image, _ in features[:missing_features]]
    write_features(root, features[missing_features:], parts=feature_parts)
    finish_root(root, context_size=context_size)
    return TaggedArchive(root=root, vocab=vocab, rows=rows, features_missing=missing)


# ---- the evaluation tests' root: train users u0..u3, test users t0, t1 (also used by promotion)

DIM = 2048
CATEGORY_TAGS = {0: ["#beach", "#sun"], 1: ["#food", "#pasta"], 2: ["#city", "#night"]}
CATEGORY_WORDS = {
    0: ["sunny", "beach", "day"],
    1: ["homemade", "pasta", "tonight"],
    2: ["city", "lights", "tonight"],
}


def _feature(category: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(scale=noise, size=DIM).astype(np.float32)
    vector[category * 10 : category * 10 + 10] += 1.0
    return vector


def _write_jpeg(uri: str, category: int) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (80 * category, 120, 200 - 60 * category)).save(buffer, "JPEG")
    storage.write_bytes(uri, buffer.getvalue())


def write_data_root(root: str) -> None:
    """Train users u0..u3 and test users t0, t1; each user has a signature tag and favourite
    category. One test post's image has no feature (it must be counted, not lost); the test
    images exist as small JPEGs (for the HTML report's thumbnails) except t0's first."""
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    features = []
    contexts = {}
    for split, users, posts in (("train", ["u0", "u1", "u2", "u3"], 5), ("test", ["t0", "t1"], 3)):
        for u, user in enumerate(users):
            favourite = u % 3
            signature = f"#{user}tag"
            contexts[user] = [signature, *CATEGORY_TAGS[favourite], "emoji😍"]
            for p in range(posts):
                category = favourite if p % 2 == 0 else (favourite + 1) % 3
                image = f"{root}/images/{user}_{p}.jpg"
                if split == "test" and (user, p) != ("t0", 0):
                    _write_jpeg(image, category)
                rows[split].append(
                    {
                        "user_id": user,
                        "post_id": f"{user}-{p}",
                        "created_at": None,
                        "image": image,
                        "category": category,
                        "signature": signature,
                    }
                )
                if not (split == "test" and user == "t1" and p == 2):
                    features.append(
                        {"image": image, "feature": _feature(category, 0.05, rng).tolist()}
                    )
    tags = sorted(
        {t for ts in CATEGORY_TAGS.values() for t in ts} | {c[0] for c in contexts.values()}
    )
    words = sorted({w for ws in CATEGORY_WORDS.values() for w in ws} | {"😍"})
    vocab = {"hashtag": [*SPECIAL_TOKENS, *tags, "emoji😍"], "post": [*SPECIAL_TOKENS, *words]}
    for task in ("hashtag", "post"):
        ids = {t: i for i, t in enumerate(vocab[task])}
        storage.write_json(storage.join(root, "vocab", f"{task}.json"), {"tokens": vocab[task]})
        for split, split_rows in rows.items():
            out = []
            for row in split_rows:
                if task == "hashtag":
                    tokens = [*CATEGORY_TAGS[row["category"]], row["signature"]]
                else:
                    tokens = [*CATEGORY_WORDS[row["category"]], "😍"]
                context = contexts[row["user_id"]] if task == "hashtag" else ["tonight", "😍"]
                out.append(
                    {
                        **{k: row[k] for k in ("user_id", "post_id", "created_at", "image")},
                        "text": " ".join(tokens),
                        "token_ids": [ids.get(t, 3) for t in tokens] + [2],
                        "context_ids": [ids.get(w, 3) for w in context],
                        "context_words": context,
                    }
                )
            storage.write_parquet(
                storage.join(root, "examples", task, split, "part-00000.parquet"),
                schemas.conform(out, "example"),
            )
        storage.write_parquet(
            storage.join(root, "contexts", f"{task}.parquet"),
            schemas.conform(
                {
                    "user_id": list(contexts),
                    "context_words": [
                        contexts[u] if task == "hashtag" else ["tonight", "😍"] for u in contexts
                    ],
                },
                "user_context",
            ),
        )
    storage.write_parquet(
        storage.join(root, "features", "pool5", "part-00000.parquet"),
        schemas.conform(features, "features_pool5"),
    )
    # written last, as preprocessing does: the evaluation's dataset digest comes from it
    finish_root(root)


def tiny_model_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, embed_dim=8, memory_dim=16, context_size=5, max_length=8, cnn_depth=4
    )


def rig_logits(model, preferences: dict[int, float]):
    """Make every decoding step of ``model`` give the same logits: ``preferences`` (id ->
    logit), 0 for the rest. W_o = 0 and b_o = 1 make the readout's ReLU a vector of ones, so
    W_f's row sums are the logits (eq. 12). Returns the model, changed in place."""
    import torch

    with torch.no_grad():
        model.hidden.weight.zero_()
        model.hidden.bias.fill_(1.0)
        model.vocab.weight.zero_()
        for token, logit in preferences.items():
            model.vocab.weight[token] = logit / model.vocab.weight.shape[1]
    return model


def train_tiny_model(root: str, task: str, out: str, steps: int, seed: int = 0,
                     max_length: int | None = None, inputs: dict[str, Any] | None = None,
                     unpaired: bool = False) -> str:
    """A tiny model trained by a plain full-batch loop on the root's pool5 training split
    (steps=0: untrained), saved as a checkpoint at ``out`` (with ``inputs``, as the trainer
    records them). ``unpaired``: each post's image and context come with another post's
    words, so the model learns which words are frequent and how long posts are, not what
    an image or a user says."""
    import dataclasses

    import torch

    from csmn.core.checkpoint import save_checkpoint
    from csmn.core.model import CSMN, sequence_loss
    from csmn.pipeline.train_data import collate_batch

    vocab = storage.read_json(layout.vocab_uri(root, task))["tokens"]
    config = tiny_model_config(len(vocab))
    if max_length is not None:
        config = dataclasses.replace(config, max_length=max_length)
    torch.manual_seed(seed)
    model = CSMN(config)
    examples = storage.read_parquet(layout.examples_dir(root, task, "train")).to_pylist()
    features = {r["image"]: r["feature"] for r in storage.read_parquet(
        layout.features_dir(root, "pool5")).to_pylist()}
    rows = [r for r in examples if r["image"] in features]
    batch = collate_batch({"token_ids": [r["token_ids"] for r in rows],
                           "context_ids": [r["context_ids"] for r in rows],
                           "feature": [features[r["image"]] for r in rows]},
                          config.context_size, config.max_length)
    if unpaired:
        others = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        for key in ("input_ids", "targets"):
            batch[key] = batch[key][others]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(batch["image_features"], batch["context_ids"], batch["input_ids"])
        sequence_loss(logits, batch["targets"]).backward()
        optimizer.step()
    save_checkpoint(out, model.eval(), config, vocab, task, epoch=steps, inputs=inputs)
    return out


@contextlib.contextmanager
def mlflow_server(folder: str, start_timeout_s: float = 90.0) -> Iterator[int]:
    """``mlflow server`` on 127.0.0.1 and a free port, with a SQLite store and its own
    artifacts under ``folder``; yields the port once ``/health`` answers. Stopped with its
    workers (its own process group); SIGKILL after a short grace, since its graceful stop
    waits out idle keep-alive connections and a test's store needs no orderly close."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from csmn.pipeline.launch import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--serve-artifacts", "--artifacts-destination", f"{folder}/artifacts"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("mlflow server did not come up on 127.0.0.1")
            time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
