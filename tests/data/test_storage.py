"""Storage round trips on a local folder and on S3 through a real HTTP endpoint (moto server)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from csmn.data import storage


def _round_trip(root: str) -> None:
    storage.write_text(storage.join(root, "a", "b.txt"), "héllo")
    storage.write_json(storage.join(root, "a", "c.json"), {"x": [1, 2]})
    table = pa.table({"k": ["a", "b"], "v": [1, 2]})
    storage.write_parquet(storage.join(root, "t", "part-0.parquet"), table)
    storage.write_parquet(storage.join(root, "t", "part-1.parquet"), table)

    assert storage.read_text(storage.join(root, "a", "b.txt")) == "héllo"
    assert storage.read_json(storage.join(root, "a", "c.json")) == {"x": [1, 2]}
    assert storage.exists(storage.join(root, "a", "b.txt"))
    assert not storage.exists(storage.join(root, "missing"))
    assert storage.list_files(storage.join(root, "a")) == [
        storage.join(root, "a", "b.txt"),
        storage.join(root, "a", "c.json"),
    ]
    assert storage.list_files(root, suffix=".parquet") == [
        storage.join(root, "t", "part-0.parquet"),
        storage.join(root, "t", "part-1.parquet"),
    ]
    both = storage.read_parquet(storage.join(root, "t"))
    assert both.num_rows == 4 and both.column("v").to_pylist() == [1, 2, 1, 2]
    storage.delete(storage.join(root, "t"))
    assert storage.list_files(root, suffix=".parquet") == []
    with pytest.raises(FileNotFoundError):
        storage.read_parquet(storage.join(root, "t"))


def test_local_round_trip(tmp_path):
    _round_trip(str(tmp_path / "store"))


def test_s3_round_trip(s3_bucket):
    _round_trip(f"{s3_bucket}/prefix")


def test_s3_keys_with_url_characters_name_their_own_objects(s3_bucket):
    """A key may hold ``#`` and ``?``; a URL parser would cut them off as a fragment or a
    query and read another object (here: ``img``)."""
    assert storage.s3_bucket_key("s3://b/a/img#1.jpg?x=1") == ("b", "a/img#1.jpg?x=1")
    assert storage.s3_bucket_key("s3a://b") == ("b", "")
    names = ["img", "img#1.jpg", "img?v=2.jpg", "img 3#?.jpg"]
    for name in names:
        storage.write_text(f"{s3_bucket}/keys/{name}", name)
    for name in names:
        assert storage.read_text(f"{s3_bucket}/keys/{name}") == name
        assert storage.exists(f"{s3_bucket}/keys/{name}")
    assert sorted(storage.list_files(f"{s3_bucket}/keys")) == sorted(
        f"{s3_bucket}/keys/{name}" for name in names)
    assert storage.create_if_absent(f"{s3_bucket}/keys/new#1", b"first")
    assert not storage.create_if_absent(f"{s3_bucket}/keys/new#1", b"second")
    assert not storage.exists(f"{s3_bucket}/keys/new")


def _failing_write(uri: str) -> None:
    with pytest.raises(RuntimeError):
        with storage.atomic_output(uri) as out:
            out.write(b"half a file")
            raise RuntimeError("killed mid-write")


def test_failed_local_write_leaves_nothing_visible(tmp_path):
    target = str(tmp_path / "out" / "x.bin")
    storage.write_bytes(target, b"old")
    _failing_write(target)
    assert storage.read_bytes(target) == b"old"
    assert os.listdir(tmp_path / "out") == ["x.bin"]  # no stray temporary either


def test_failed_s3_write_leaves_nothing_visible(s3_bucket):
    target = f"{s3_bucket}/x.bin"
    _failing_write(target)
    assert not storage.exists(target)
    assert storage.list_files(s3_bucket) == []


def test_of_writers_racing_for_a_name_only_the_first_creates_it(tmp_path, s3_bucket):
    from concurrent.futures import ThreadPoolExecutor

    for base in (str(tmp_path / "race"), f"{s3_bucket}/race"):
        target = storage.join(base, "commit.json")
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(storage.create_if_absent, [target] * 8,
                                [b"writer %d" % i for i in range(8)]))
        assert won.count(True) == 1
        assert storage.read_bytes(target) == b"writer %d" % won.index(True)
        assert storage.list_files(base) == [target]  # no temporary left behind
        assert not storage.create_if_absent(target, b"late")


def test_hidden_temporaries_are_not_listed(tmp_path):
    (tmp_path / ".part-0.parquet.abc.tmp").write_bytes(b"partial")
    (tmp_path / "part-1.parquet").write_bytes(b"x")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "part-1.parquet")]


def test_s3_credentials_come_from_the_environment_not_the_repo(s3_endpoint):
    fs, path = storage.resolve("s3://bucket/key")
    assert path == "bucket/key"
    assert isinstance(fs, pa.fs.S3FileSystem)
    assert s3_endpoint.startswith("http://127.0.0.1:")


def test_local_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """The real fsync and rename, watched: the file's data is flushed before its name
    appears, and the folder's entry after."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out" / "data.bin"
    storage.write_bytes(str(target), b"payload")
    assert target.read_bytes() == b"payload"
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert os.path.basename(events[0][1]).startswith(".data.bin.")  # the temporary file
    assert events[2][1] == str(tmp_path / "out")  # then its folder
