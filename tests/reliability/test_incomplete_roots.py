"""Every stage that reads a data root refuses a half-written one before it writes anything,
with exit code 2 and the stage to rerun (csmn.data.completeness)."""

from __future__ import annotations

import os
from pathlib import Path

import helpers
import pytest
import reliability_tally

from csmn.data import layout, storage
from csmn.data.completeness import IncompleteRoot, require_data_root
from csmn.experiments import ablation
from csmn.pipeline import evaluate, extract, promote, train

STAGES = {
    "extract-features": lambda root: extract.main(["--data", root, "--weights", "random"]),
    "train": lambda root: train.main(["--data", root, "--task", "hashtag"]),
    "evaluate": lambda root: evaluate.main(["--data", root, "--baselines", "1nn-im"]),
    "promote": lambda root: promote.main(["--name", "csmn-hashtag", "--data", root]),
    "ablation": lambda root: ablation.main(["--data", root]),
}
# The stages that read features, and so also refuse an unfinished extraction.
FEATURE_STAGES = ("train", "evaluate", "ablation")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _preprocessed(root: Path) -> None:
    """A root preprocessing finished (manifest last), with pool5 parts."""
    tagged = helpers.write_tagged_root(str(root), train_posts=8, val_posts=4, users=2,
                                       example_parts=1, feature_parts=1)
    assert tagged.vocab


def _without_manifest(root: Path) -> None:  # preprocessing killed before its last write
    _preprocessed(root)
    (root / layout.MANIFEST_FILE).unlink()


def _cut_manifest(root: Path) -> None:  # a manifest edited or cut short
    _preprocessed(root)
    manifest = storage.read_json(layout.manifest_uri(str(root)))
    manifest["records"] = {"in": 1}
    storage.write_json(layout.manifest_uri(str(root)), manifest)


def _split_missing(root: Path) -> None:  # examples of a split the manifest names are gone
    _preprocessed(root)
    helpers.finish_root(str(root), splits={"hashtag": {"train": {"posts": 8, "users": 2},
                                                        "test": {"posts": 3, "users": 1}}})


def _extraction_running(root: Path) -> None:  # extraction killed: _meta.json says running
    _preprocessed(root)
    uri = layout.features_meta_uri(str(root), "pool5")
    storage.write_json(uri, {**storage.read_json(uri), "status": "running"})


HALF_ROOTS = {"no_manifest": _without_manifest, "manifest_digest_mismatch": _cut_manifest,
              "manifest_names_missing_split": _split_missing}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("kind", sorted(HALF_ROOTS))
def test_a_stage_refuses_a_root_preprocessing_did_not_finish(stage, kind, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    root = tmp_path / "root"
    HALF_ROOTS[kind](root)
    before = _files(tmp_path)
    assert STAGES[stage](str(root)) == 2
    captured = capsys.readouterr()
    message = captured.err + captured.out
    assert "incomplete" in message and "Rerun preprocess" in message, message
    assert f"then {stage}." in message, message
    assert _files(tmp_path) == before  # nothing written: no features, runs, MLflow store
    reliability_tally.bad_input(f"data_root:{kind}")


@pytest.mark.parametrize("stage", FEATURE_STAGES)
def test_a_stage_that_reads_features_refuses_an_unfinished_extraction(stage, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    root = tmp_path / "root"
    _extraction_running(root)
    before = _files(tmp_path)
    assert STAGES[stage](str(root)) == 2
    captured = capsys.readouterr()
    message = captured.err + captured.out
    assert "Rerun extract-features" in message and "--layer pool5" in message, message
    assert "did not finish" in message, message
    assert _files(tmp_path) == before
    reliability_tally.bad_input("data_root:extraction_running")


def test_a_complete_root_passes_and_parts_without_meta_do_not(tmp_path):
    root = tmp_path / "root"
    _preprocessed(root)
    assert require_data_root(str(root), "train", ("pool5",))["digest"]
    os.remove(layout.features_meta_uri(str(root), "pool5"))
    with pytest.raises(IncompleteRoot, match="parts but no _meta.json"):
        require_data_root(str(root), "train", ("pool5",))
    with pytest.raises(IncompleteRoot, match="no res5c features"):
        require_data_root(str(root), "train", ("res5c",))
