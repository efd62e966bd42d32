"""Transient storage errors are retried, and tell themselves apart from bad records.

A moto S3 server of the test's own on 127.0.0.1 (its objects live in the process, as a
MinIO's survive its restart) is stopped in the middle of a multipart upload, every open
connection reset, and started again on the same port: the write completes, and no reader
ever sees a partial object under the final name. A writer killed mid-upload leaves nothing
under the final name either.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import reliability_tally
from botocore.config import Config
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from csmn.core.image_features import ImageRejected, read_image_bytes
from csmn.data import readers, rejects, storage

PAYLOAD_MB = 24  # pyarrow uploads parts of 10 MB: three parts


class RestartableS3:
    """moto's server, stoppable like a crashed process: the listening socket closes and every
    connection it accepted is reset, requests in flight included. ``part_seen`` is set when
    an upload's first part starts arriving."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.part_seen = threading.Event()
        self.server = None
        self.connections: list[socket.socket] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self):
        app = DomainDispatcherApplication(create_backend_app)

        def watched(environ, start_response):
            if "partNumber=" in environ.get("QUERY_STRING", ""):
                self.part_seen.set()
            return app(environ, start_response)

        return watched

    def start(self) -> None:
        server = make_server("127.0.0.1", self.port, self._app(), threaded=True,
                             request_handler=MotoRequestHandler)
        accept = server.get_request

        def get_request():
            connection, address = accept()
            self.connections.append(connection)
            return connection, address

        server.get_request = get_request
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connections.clear()

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, config=Config(
            retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))


@pytest.fixture()
def s3(monkeypatch, s3_endpoint):
    """The restartable server, named by AWS_ENDPOINT_URL for csmn.data.storage (the session
    server's credentials and region stay)."""
    server = RestartableS3()
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    storage._s3_filesystem.cache_clear()
    bucket = f"restart-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    server.bucket = bucket
    yield server
    try:
        server.stop()
    except OSError:
        pass
    storage._s3_filesystem.cache_clear()


def _sizes_seen(client, bucket: str, key: str, stop: threading.Event, seen: list[int]) -> None:
    """Poll the final name the whole time: any size other than the full one is a partial
    object visible to readers."""
    while not stop.is_set():
        try:
            seen.append(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception:  # 404 while the upload runs, or the server is down
            pass
        time.sleep(0.02)


def test_a_write_survives_the_store_restarting_in_the_middle(s3):
    key = "data/features/part-0.parquet"
    uri = f"s3://{s3.bucket}/{key}"
    payload = os.urandom(PAYLOAD_MB << 20)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            storage.write_bytes(uri, payload)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    stop_polling, seen = threading.Event(), []
    poller = threading.Thread(target=_sizes_seen,
                              args=(s3.client(), s3.bucket, key, stop_polling, seen))
    poller.start()
    writer = threading.Thread(target=write)
    writer.start()
    assert s3.part_seen.wait(60), "the upload never started"
    s3.stop()  # the store dies with the upload half sent
    stopped_at = time.perf_counter()
    assert writer.is_alive(), "the upload ended before the store stopped"
    time.sleep(1.5)
    s3.start()  # the same port, the same objects
    writer.join(120)
    deadline = time.monotonic() + 10  # the poller sees the committed object too
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_polling.set()
    poller.join()
    assert not writer.is_alive() and errors == [], errors
    assert storage.read_bytes(uri) == payload
    assert seen and set(seen) == {len(payload)}, "a partial object was visible"
    reliability_tally.fault("s3_server_restarted_mid_upload")
    print(f"write done {time.perf_counter() - stopped_at:.1f}s after the store stopped")


_WRITER = """
import os, sys
from csmn.data import storage
storage.write_bytes(sys.argv[1], os.urandom(int(sys.argv[2]) << 20))
"""


def test_a_writer_killed_mid_upload_leaves_nothing_under_the_final_name(s3):
    key = "data/examples/part-0.parquet"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, f"s3://{s3.bucket}/{key}",
                               str(PAYLOAD_MB)], env=env)
    try:
        assert s3.part_seen.wait(60), "the upload never started"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(30)
    client = s3.client()
    uploads = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [key]  # begun, never completed
    assert client.list_objects_v2(Bucket=s3.bucket).get("KeyCount", 0) == 0
    assert not storage.exists(f"s3://{s3.bucket}/{key}")
    reliability_tally.fault("writer_killed_mid_upload")


def test_an_unreachable_store_is_transient_never_a_bad_record(s3, monkeypatch, tmp_path):
    """After every retry, a store that stays down raises TransientStorageError from the
    readers (never a bad_file reject, never a guessed count) and makes an image a
    ``transient_io`` reject, which ``--retry-rejects`` tries again."""
    source = f"s3://{s3.bucket}/archive/posts/part-0.jsonl"
    image = f"s3://{s3.bucket}/archive/images/a.jpg"
    storage.write_text(source, '{"user_id": "u", "post_id": "p", "image": "images/a.jpg", '
                               '"caption": "c", "hashtags": []}\n')
    storage.write_bytes(image, b"\xff\xd8 not really")
    # Fail fast: the retries themselves are the test above.
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "STORAGE_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "STORAGE_BACKOFF_S", 0.05)
    storage._s3_filesystem.cache_clear()
    s3.stop()

    with pytest.raises(storage.TransientStorageError):
        readers.count_records(source)
    with pytest.raises(storage.TransientStorageError):
        list(readers.parse_source(source, f"s3://{s3.bucket}/archive"))
    with pytest.raises(ImageRejected) as caught:
        read_image_bytes(image, 1 << 20)
    assert caught.value.code == rejects.TRANSIENT_IO
    reliability_tally.fault("s3_server_down", 3)

    # The extraction's rejects: one transient, one final; a retry forgets the transient only.
    root = str(tmp_path / "root")
    rows = [rejects.reject_row("extract_features", caught.value.reason, image, image),
            rejects.reject_row("extract_features", "not_an_image: text", "b.jpg", "b.jpg")]
    rejects.write_reject_part(rows[:1], storage.join(root, "rejects", "extract_features"), "1")
    rejects.write_reject_part(rows[1:], storage.join(root, "rejects", "extract_features"), "2")
    assert rejects.forget_transient_rejects(root, "extract_features") == 1
    left = rejects.read_rejects(root, "extract_features")
    assert [r["record_id"] for r in left] == ["b.jpg"]
    assert rejects.forget_transient_rejects(root, "extract_features") == 0


def test_transient_errors_are_told_from_broken_ones():
    import errno

    transient = [TimeoutError("read timed out"), ConnectionResetError(errno.ECONNRESET, "x"),
                 OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce"),
                 OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: "
                         "7, Could not connect to server"),
                 OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation")]
    broken = [FileNotFoundError("no such key"), PermissionError("AccessDenied"),
              OSError("Parquet magic bytes not found in footer"), ValueError("bad json")]
    assert all(storage.is_transient(e) for e in transient)
    assert not any(storage.is_transient(e) for e in broken)
    reliability_tally.bad_kinds([f"storage_error:{type(e).__name__}" for e in broken])
