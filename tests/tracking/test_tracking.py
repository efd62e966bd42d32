"""MLflow helpers against a real SQLite store (no Ray)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from csmn import tracking


def test_tracking_uri_defaults_to_sqlite_in_a_local_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        tracking.resolve_tracking_uri("s3://bucket/root")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.resolve_tracking_uri("s3://bucket/root") == "http://mlflow.internal:5000"


def test_params_are_flat_and_secret_free():
    params = tracking.flatten_params({
        "train": {"epochs": 20, "aws_secret_access_key": "x", "widths": (3, 4, 5)},
        "model": {"embed_dim": 512}, "api_token": "y"})
    assert params == {"train.epochs": "20", "train.widths": "3,4,5", "model.embed_dim": "512"}


def test_a_resumed_run_keeps_its_params_and_refuses_a_changed_config(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.resolve_tracking_uri(str(tmp_path))
    run_id = tracking.start_or_resume_run(uri, "csmn-test", "r1")
    tracking.log_params(uri, run_id, {"train.epochs": "20", "train.batch_size": "200"})
    # Started again under the same name: the same (unfinished) run.
    assert tracking.start_or_resume_run(uri, "csmn-test", "r1") == run_id
    tracking.log_params(uri, run_id, {"train.epochs": "30", "train.batch_size": "200"})
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["train.epochs"] == "20"
    assert run.data.tags["csmn.resumed_with.train.epochs"] == "20 -> 30"
    with pytest.raises(ValueError, match="different config"):
        tracking.log_params(uri, run_id, {"train.batch_size": "100"})
    # A run a dead job left FAILED, started again with another config: refused before it is
    # touched, so it stays FAILED (not RUNNING forever).
    MlflowClient(uri).set_terminated(run_id, "FAILED")
    with pytest.raises(ValueError, match="different config"):
        tracking.start_or_resume_run(uri, "csmn-test", "r1", params={"train.batch_size": "100"})
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"
    assert tracking.start_or_resume_run(uri, "csmn-test", "r1",
                                        params={"train.batch_size": "200"}) == run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    MlflowClient(uri).set_terminated(run_id, "FINISHED")
    with pytest.raises(ValueError, match="already FINISHED"):
        tracking.start_or_resume_run(uri, "csmn-test", "r1")


def test_a_local_store_keeps_artifacts_beside_it_not_in_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, elsewhere = tmp_path / "root", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would be ./mlruns here
    uri = tracking.resolve_tracking_uri(str(root))
    run_id = tracking.start_or_resume_run(uri, "csmn-test", "r1")
    client = MlflowClient(uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    (tmp_path / "note.txt").write_text("x")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    assert list((root / "mlartifacts").rglob("note.txt"))
    assert not list(elsewhere.iterdir())
    # The same experiment again, and a store elsewhere than SQLite decides for itself.
    assert tracking.get_or_create_experiment(uri, "csmn-test") == experiment.experiment_id
    assert tracking.local_artifact_location("http://127.0.0.1:5000") is None


def test_registered_model_names():
    assert tracking.registered_model_name("hashtag") == "csmn-hashtag"
    assert tracking.registered_model_name("caption") == "csmn-post"
    with pytest.raises(ValueError):
        tracking.registered_model_name("poem")


# ------------------------------------------------------------------ evaluation runs


def _registered_version(tmp_path, uri: str) -> tuple[str, object]:
    """A tiny checkpoint logged and registered as csmn-hashtag (a real LoggedModel)."""
    import mlflow
    import torch

    from csmn.core.checkpoint import save_checkpoint
    from csmn.core.model import CSMN, ModelConfig

    config = ModelConfig(vocab_size=6, embed_dim=4, memory_dim=8, context_size=5,
                         max_length=6, cnn_depth=2)
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "ckpt")
    save_checkpoint(checkpoint, CSMN(config), config,
                    ["_PAD", "_GO", "_EOS", "_UNK", "#a", "#b"], "hashtag")
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.set_experiment("csmn-hashtag").experiment_id
    run_id = MlflowClient(uri).create_run(experiment_id).info.run_id
    return run_id, tracking.log_pyfunc_model(uri, run_id, checkpoint, "hashtag", register=True)


def _report(directory, f1: float) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text(f"# f1 {f1}\n")
    return {"out": str(directory), "counts": {"examples": 3, "scored": 2},
            "results": {"csmn": {"f1": f1, "n": 2, "flag": True}}}


def test_evaluation_runs_are_linked_to_the_model_and_the_data_and_found_again(
        tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    (root / "manifest.json").write_text('{"version": 1, "records": {"in": 7}}\n')
    uri = tracking.resolve_tracking_uri(str(root))
    train_run, info = _registered_version(tmp_path, uri)
    version = str(info.registered_model_version)
    digest = tracking.data_digest(str(root))
    assert digest and len(digest) == 16 and tracking.data_digest(str(tmp_path)) is None
    assert tracking.model_source(f"runs:/{train_run}/model", uri).model_id == info.model_id
    source = tracking.model_source("models:/csmn-hashtag/1", uri)
    assert (source.run_id, source.name, source.version, source.model_id) == (
        train_run, "csmn-hashtag", version, info.model_id)

    found = {}
    greedy = "beam_width=1 repeats=block stop=likely"
    beam = "beam_width=5 repeats=block stop=likely"
    for split, f1, decoding in (("test", 0.25, greedy), ("test", 0.5, greedy),
                                ("val", 0.75, greedy), ("test", 0.9, beam)):
        with tracking.evaluation_run(uri, model_uri="models:/csmn-hashtag/1", task="hashtag",
                                     split=split, data_root=str(root),
                                     out=str(tmp_path / split), decoding=decoding) as run:
            tracking.log_evaluation(run, _report(tmp_path / f"r{f1}", f1))
        found[f1] = run.run_id
    with pytest.raises(RuntimeError, match="report failed"):
        with tracking.evaluation_run(uri, model_uri="models:/csmn-hashtag/1", task="hashtag",
                                     split="test", data_root=str(root), out="x",
                                     decoding=greedy) as failed:
            raise RuntimeError("report failed")
    client = MlflowClient(uri)
    assert client.get_run(failed.run_id).info.status == "FAILED"

    # the latest FINISHED evaluation of (name, version, split, data digest, decoding rules):
    # a beam search's predictions never stand in for greedy decoding's
    record = tracking.find_evaluation(uri, "csmn-hashtag", version, "test", digest, greedy)
    assert record.run_id == found[0.5]
    assert tracking.find_evaluation(uri, "csmn-hashtag", version, "test", digest,
                                    beam).run_id == found[0.9]
    assert record.metrics == {"csmn/f1": 0.5, "csmn/n": 2.0, "count/examples": 3.0,
                              "count/scored": 2.0}
    assert tracking.find_evaluation(uri, "csmn-hashtag", version, "val", digest,
                                    greedy).run_id == found[0.75]
    assert tracking.find_evaluation(uri, "csmn-hashtag", version, "test", "0" * 16,
                                    greedy) is None
    assert tracking.find_evaluation(uri, "csmn-hashtag", version, "val", digest,
                                    beam) is None

    run = client.get_run(found[0.5])
    assert run.info.experiment_id == client.get_run(train_run).info.experiment_id
    assert run.data.tags["csmn.data_digest"] == digest
    assert run.data.tags["csmn.model_version"] == version
    assert run.data.tags["csmn.model_run_id"] == train_run
    # MLflow 3: the data root is a dataset input with the manifest's digest, the model an
    # input too, and the metrics are the LoggedModel's, measured on that dataset
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == digest and dataset_input.dataset.name == "data"
    assert [m.model_id for m in run.inputs.model_inputs] == [info.model_id]
    model_metrics = [m for m in mlflow.get_logged_model(info.model_id).metrics
                     if m.run_id == found[0.5]]
    assert {m.key: m.value for m in model_metrics}["csmn/f1"] == 0.5
    assert {m.dataset_digest for m in model_metrics} == {digest}
    assert [a.path for a in client.list_artifacts(found[0.5], "report")] == ["report/report.md"]


def test_an_alias_or_latest_is_pinned_to_the_version_it_names_now(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_registered_model("csmn-hashtag")
    for _ in range(3):
        client.create_model_version("csmn-hashtag", source=str(tmp_path))
    client.set_registered_model_alias("csmn-hashtag", "champion", "2")
    assert tracking.pinned_model_uri("models:/csmn-hashtag@champion", uri) == \
        "models:/csmn-hashtag/2"
    assert tracking.pinned_model_uri("models:/csmn-hashtag/latest", uri) == \
        "models:/csmn-hashtag/3"
    for unchanged in ("models:/csmn-hashtag/1", "runs:/abc/model", "/a/checkpoint"):
        assert tracking.pinned_model_uri(unchanged, uri) == unchanged
    # the alias moves afterwards: what was pinned stays
    client.set_registered_model_alias("csmn-hashtag", "champion", "3")
    assert tracking.pinned_model_uri("models:/csmn-hashtag@champion", uri) == \
        "models:/csmn-hashtag/3"
