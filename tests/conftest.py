"""Shared fixtures: one real local Ray for the session, one real S3 endpoint on 127.0.0.1."""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """A real Ray, started once with 2 CPUs and a capped object store (it is not capped by
    num_cpus, and an uncapped one takes 30% of RAM). The S3 endpoint starts first so that
    Ray's workers inherit AWS_ENDPOINT_URL and its credentials, as they would on a cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=400 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode on 127.0.0.1: a real HTTP endpoint, not an in-process mock.

    Credentials are dummies the fake server accepts; the code under test finds the endpoint
    and credentials the way it would in production (AWS_ENDPOINT_URL, the AWS chain).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    from csmn.data import storage

    storage._s3_filesystem.cache_clear()
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._s3_filesystem.cache_clear()


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket per test; returns its ``s3://`` URI."""
    import boto3

    name = f"csmn-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def mlflow_tracking_uri(tmp_path_factory):
    """A SQLite MLflow store of the test module's own, named by MLFLOW_TRACKING_URI (which
    wins over the data-root default, as it does for users)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def pytest_terminal_summary(terminalreporter):
    """One summary of the reliability tests (tests/reliability/reliability_tally.py)."""
    import sys

    tally = sys.modules.get("reliability_tally")
    lines = tally.lines() if tally is not None else []
    if lines:
        terminalreporter.section("reliability")
        for line in lines:
            terminalreporter.write_line(line)
