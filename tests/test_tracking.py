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
    MlflowClient(uri).set_terminated(run_id, "FINISHED")
    with pytest.raises(ValueError, match="already FINISHED"):
        tracking.start_or_resume_run(uri, "csmn-test", "r1")


def test_registered_model_names():
    assert tracking.registered_model_name("hashtag") == "csmn-hashtag"
    assert tracking.registered_model_name("caption") == "csmn-post"
    with pytest.raises(ValueError):
        tracking.registered_model_name("poem")
