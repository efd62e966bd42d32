"""The data roots the benchmarks build by hand pass the checks the stages start with: a
benchmark is run rarely, and bench/train.py stopped at the completeness check (and read a
vocab file the layout no longer names) for sessions before anyone ran it."""

from __future__ import annotations

import pyarrow.parquet as pq

from csmn.core.tokens import EOS_ID
from csmn.data import layout
from csmn.data.completeness import require_data_root
from csmn.text.vocab import load_vocab


def test_bench_train_root_is_one_training_starts_from(tmp_path):
    from bench.train import write_data_root

    root = str(tmp_path / "train")
    write_data_root(tmp_path / "train", examples=20)
    require_data_root(root, "train", ["pool5"])
    vocab = load_vocab(root, "post")
    features = pq.read_table(layout.features_dir(root, "pool5")).column("image").to_pylist()
    for split, count in (("train", 20), ("val", 64)):
        rows = pq.read_table(layout.examples_dir(root, "post", split)).to_pylist()
        assert len(rows) == count
        for row in rows:
            assert row["token_ids"][-1] == EOS_ID
            assert all(vocab.is_word(vocab.tokens[i]) for i in row["token_ids"][:-1])
            assert row["image"] in features


def test_bench_features_root_is_one_extraction_starts_from(tmp_path):
    from bench.features import write_examples

    root = str(tmp_path / "features")
    write_examples(tmp_path / "features", [str(tmp_path / "a.jpg")])
    require_data_root(root, "extract-features")
