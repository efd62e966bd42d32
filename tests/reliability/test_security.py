"""Secrets never leave in what the project logs or writes; the local Ray token stays private."""

from __future__ import annotations

import dataclasses
import stat

from mlflow.tracking import MlflowClient

from csmn import tracking
from csmn.config import config_to_dict, is_secret_key, redact, redact_text
from csmn.pipeline.runtime import ensure_private_token

SECRET = "s3cr3t-Pa55w0rd-xyz"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
URIS = {
    f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow": "postgresql://***@db.internal:5432/mlflow",
    f"https://{SECRET}@api.example.com/v1": "https://***@api.example.com/v1",
    f"s3://{KEY_ID}:{SECRET}@bucket/root": "s3://***@bucket/root",
    f"https://b.s3.amazonaws.com/k?X-Amz-Credential={KEY_ID}%2F2024&X-Amz-Signature={SECRET}":
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***",
    "s3://bucket/plain/prefix": "s3://bucket/plain/prefix",
    "sqlite:////tmp/root/mlflow.db": "sqlite:////tmp/root/mlflow.db",
}


def test_uri_values_are_redacted():
    for raw, shown in URIS.items():
        assert redact_text(raw) == shown
    assert redact_text(f"--key {KEY_ID} done") == "--key *** done"
    nested = redact({"data": list(URIS), "db": {"password": SECRET, "max_tokens": 15}})
    assert SECRET not in repr(nested) and KEY_ID not in repr(nested)
    assert nested["db"] == {"password": "***", "max_tokens": 15}
    assert not any(is_secret_key(k) for k in ("max_tokens", "token_ids", "context_size"))
    assert all(is_secret_key(k) for k in ("api_token", "dbPassword", "AWS_SECRET_ACCESS_KEY"))


def test_a_credential_in_the_environment_is_redacted_wherever_it_appears(monkeypatch):
    monkeypatch.setenv("CSMN_TEST_SERVICE_TOKEN", "tok-0123456789abcdef")
    assert redact_text("header=tok-0123456789abcdef;") == "header=***;"
    # The shell's working directory is no password, though "pwd" names one elsewhere.
    monkeypatch.setenv("PWD", "/srv/csmn/checkout")
    assert redact_text("data /srv/csmn/checkout/data") == "data /srv/csmn/checkout/data"


@dataclasses.dataclass
class _Config:
    archive: str = f"s3://{KEY_ID}:{SECRET}@bucket/archive"
    tracking: str = f"postgresql://u:{SECRET}@h/db"
    api_token: str = SECRET
    epochs: int = 3


def test_params_tags_and_config_dicts_carry_no_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    written = config_to_dict(_Config())
    assert SECRET not in repr(written) and written["epochs"] == 3
    params = tracking.flatten_params({"job": dataclasses.asdict(_Config())})
    assert "job.api_token" not in params and params["job.epochs"] == "3"
    uri = tracking.resolve_tracking_uri(str(tmp_path))
    run_id = tracking.start_or_resume_run(uri, "csmn-secrets", "r", tags={
        "csmn.data": f"s3://{KEY_ID}:{SECRET}@bucket/root"})
    tracking.log_params(uri, run_id, {**params, "raw": f"https://{SECRET}@h/x"})
    run = MlflowClient(uri).get_run(run_id)
    stored = repr(run.data.params) + repr(run.data.tags)
    assert SECRET not in stored and KEY_ID not in stored
    assert run.data.tags["csmn.data"] == "s3://***@bucket/root"


def test_the_local_ray_token_file_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    path = ensure_private_token()
    assert path == tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    # A token Ray (or an older run) wrote world-readable is tightened, not replaced.
    path.chmod(0o644)
    assert ensure_private_token() == path and path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A token given in the environment needs no file.
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    path.unlink()
    assert ensure_private_token() is None and not path.exists()
