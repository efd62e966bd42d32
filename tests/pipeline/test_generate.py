"""The nightly job end to end: a tiny synthetic archive, preprocessed and featurized by the
real stages, tiny models for both tasks trained here and promoted to ``@champion`` in a real
MLflow store; then ``csmn generate`` over it (Ray Data, the actors, the commit), again on the
same date, on a later date after new posts arrived, after kills, and on S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime

import pyarrow.dataset as pads
import pytest
import torch
from helpers import tiny_model_config, train_tiny_model
from mlflow.tracking import MlflowClient

from csmn.core.checkpoint import save_checkpoint
from csmn.core.model import CSMN
from csmn.data import layout, lease, storage
from csmn.data.layout import HASHTAG, POST, REGISTERED_MODEL_NAMES
from csmn.data.schemas import validate
from csmn.pipeline.generate import GenerateConfig, _part_files, build_parser, run_generate
from csmn.pipeline.train import training_inputs
from csmn.text.history import TaskContext, history_contexts
from csmn.text.user_context import ContextSpec, UserContext, count_tokens
from csmn.text.vocab import load_vocab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELD_BACK = 3  # each user's newest posts, written to the archive after training
NEW_USER = "nightly-newcomer"


def _split_archive(archive: str, later: str) -> list[dict]:
    """Move each user's newest posts out of the archive into ``later`` (JSONL lines)."""
    lines_by_file = {}
    for uri in storage.list_files(storage.join(archive, "posts"), suffix=".jsonl"):
        lines_by_file[uri] = storage.read_text(uri).splitlines()
    records = []
    for uri, lines in lines_by_file.items():
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("created_at") and record.get("user_id"):
                records.append((uri, line, record))
    newest: dict[str, list] = {}
    for _, line, record in sorted(records, key=lambda r: str(r[2]["created_at"]), reverse=True):
        newest.setdefault(str(record["user_id"]), [])
        if len(newest[str(record["user_id"])]) < HELD_BACK:
            newest[str(record["user_id"])].append(line)
    held = {line for lines in newest.values() for line in lines}
    for uri, lines in lines_by_file.items():
        storage.write_text(uri, "".join(f"{line}\n" for line in lines if line not in held))
    later_records = [json.loads(line) for line in sorted(held)]
    # a user the archive has never seen: no history at all
    first = later_records[0]
    later_records.append({**first, "user_id": NEW_USER, "post_id": "first-post",
                          "caption": "", "hashtags": []})
    storage.write_text(later, "".join(json.dumps(r) + "\n" for r in later_records))
    return later_records


def _train(root: str, task: str, out: str, steps: int = 30) -> str:
    """A tiny model saved with the inputs the real trainer records (vocabulary statistics,
    features, thresholds); the synthetic posts have up to 15 tokens (+ _EOS), paper 3.1."""
    inputs = training_inputs(root, load_vocab(root, task), "pool5")
    return train_tiny_model(root, task, out, steps, max_length=16, inputs=inputs)


def _promote(tracking_uri: str, checkpoint: str, task: str) -> str:
    from csmn.tracking import log_pyfunc_model

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("generate-test")
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment("generate-test"))
    run_id = client.create_run(experiment_id, run_name=f"train-{task}").info.run_id
    info = log_pyfunc_model(tracking_uri, run_id, checkpoint, task, register=True)
    client.set_terminated(run_id)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(REGISTERED_MODEL_NAMES[task], "champion", version)
    return version


@pytest.fixture(scope="module")
def nightly(ray_session, mlflow_tracking_uri, tmp_path_factory):
    from csmn.pipeline.extract import ExtractConfig, run_extract
    from csmn.pipeline.preprocess import PreprocessConfig, preprocess
    from csmn.synth import SynthConfig, write_archive

    base = tmp_path_factory.mktemp("nightly")
    archive, root = str(base / "archive"), str(base / "data")
    write_archive(SynthConfig(out=archive, users=5, seed=4, image_size=32, image_threads=2,
                              posts_median=16, posts_min=14, posts_max=20,
                              too_few_users_rate=0.0, too_many_users_rate=0.0,
                              spammer_users_rate=0.0))
    later = _split_archive(archive, str(base / "later.jsonl"))
    preprocess(archive, root, PreprocessConfig(seed=0, min_posts_per_user=5, test_posts=10))
    run_extract(ExtractConfig(data=root, layer="pool5", weights="random", seed=0,
                              crop_size=32, resize_size=32, batch_size=64))
    models = base / "models"
    checkpoints = {task: _train(root, task, str(models / task)) for task in (HASHTAG, POST)}
    versions = {task: _promote(mlflow_tracking_uri, path, task)
                for task, path in checkpoints.items()}
    return {"archive": archive, "root": root, "later": later, "base": base,
            "later_file": str(base / "later.jsonl"), "checkpoints": checkpoints,
            "versions": versions}


def _rows(out: str) -> list[dict]:
    """Every committed prediction (hive partitions; '_' names are skipped as Ray Data
    and pyarrow skip them)."""
    if not _part_files(out):
        return []
    fs, path = storage.resolve(layout.predictions_dir(out))
    return pads.dataset(path, filesystem=fs, format="parquet",
                        partitioning="hive").to_table().to_pylist()


def _archive_posts(archive: str) -> set[tuple[str, str]]:
    from csmn.data.readers import read_all

    posts, _ = read_all(archive)
    return {(p["user_id"], p["post_id"]) for p in posts}


def _config(nightly, out: str, run_date: str, **kwargs) -> GenerateConfig:
    options = {"archive": nightly["archive"], "batch_size": 32, "feature_batch_size": 32,
               "commit_every": 2, **kwargs}
    return GenerateConfig(out=out, run_date=run_date, **options)


def test_history_context_equals_the_training_context():
    """A new post's context is what UserContext makes of the posts before it (cap,
    per-post rules and ties included); an undated post's is every other post's."""
    from csmn.core.tokens import SPECIAL_TOKENS
    from csmn.text.filters import FilterThresholds
    from csmn.text.vocab import Vocabulary

    vocab = Vocabulary([*SPECIAL_TOKENS, "#a", "#b", "#c", "#d", "#e"])
    spec = ContextSpec(size=3, documents=4, document_frequencies={"#a": 4, "#b": 1, "#c": 2,
                                                                  "#d": 1})
    thresholds = FilterThresholds(min_tokens=2, max_tokens=4, max_posts_per_user=3)
    context = TaskContext(HASHTAG, vocab, spec, thresholds)

    def post(i, tags, day, **kw):
        return {"post_id": f"p{i}", "hashtag_tokens": tags, "non_english": False,
                "advertisement": False,
                "created_at": None if day is None else datetime(2026, 1, day, tzinfo=UTC), **kw}

    posts = [post(0, ["#a", "#b"], 1), post(1, ["#c", "#c", "#x"], 2),
             post(2, ["#d", "#a"], 3), post(3, ["#b"], 4),  # too short: not history
             post(4, ["#e", "#e"], 5, non_english=True),  # filtered: not history
             post(5, ["#b", "#c"], 6), post(6, ["#a", "#d"], 6),  # same time: not before
             post(7, ["#e", "#a"], None), post(8, [], 9)]
    out = history_contexts(posts, [0, 1, 5, 6, 7, 8], context)
    idf = spec.idf()

    def reference(history):
        return UserContext(count_tokens(posts[j]["hashtag_tokens"] for j in history), idf,
                           vocab, 3, 4).full()

    assert out[0] == []  # nothing before the first post
    assert out[1] == reference([0])
    assert out[5] == out[6] == reference([0, 1, 2])
    # the cap keeps the 3 most recent usable posts before day 9: 5, 6 (day 6) and 2
    assert out[8] == reference([5, 6, 2])
    # undated: every other usable post, the 3 most recent
    assert out[7] == reference([5, 6, 2])
    assert out[1] and out[8] != out[1]


def _copy_to(local: str, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    pafs.copy_files(local, path, destination_filesystem=fs)


def test_end_to_end_on_s3_rerun_later_date_and_accounting(nightly, s3_bucket):
    """Archive in and predictions out on S3 (moto's server): a first night, the same date
    again, then a later night after new posts were appended."""
    archive, out = f"{s3_bucket}/archive", f"{s3_bucket}/out"
    _copy_to(nightly["archive"], archive)
    first = run_generate(_config(nightly, out, "2026-11-30", archive=archive))
    rows = _rows(out)
    keys = [(r["user_id"], r["post_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == first["counts"]["predicted"] > 40
    assert set(keys) <= _archive_posts(archive)
    counts = first["counts"]
    assert first["balance"]["balanced"]
    assert counts["records_in"] == (counts["predicted"] + counts["already_done"]
                                    + counts["before_since"] + counts["rejected"])
    assert counts["already_done"] == 0
    validate(storage.read_parquet(layout.predictions_partition(out, "2026-11-30")),
             "generated_post")
    row = rows[0]
    assert row["hashtag_model"] == REGISTERED_MODEL_NAMES[HASHTAG]
    assert row["hashtag_model_version"] == nightly["versions"][HASHTAG]
    assert row["post_model_version"] == nightly["versions"][POST]
    assert all(len(r["hashtags"]) == len(set(r["hashtags"])) for r in rows)
    # decoding never names a special token
    assert not any(w.startswith("_") for r in rows for w in r["hashtags"])
    # a user's first post has no history, so no context; its later ones do
    by_user = {}
    for r in sorted(rows, key=lambda r: r["created_at"]):
        by_user.setdefault(r["user_id"], []).append(r)
    assert all(posts[0]["history_posts"] == 0 and posts[0]["hashtag_used_context"] is False
               for posts in by_user.values())
    assert any(r["hashtag_used_context"] for r in rows)
    summary = storage.read_json(layout.generation_summary_uri(out, "2026-11-30"))
    assert summary["attempt"] == first["attempt"]

    # the same date again: nothing new, nothing duplicated
    again = run_generate(_config(nightly, out, "2026-11-30", archive=archive))
    assert again["counts"]["predicted"] == 0
    assert again["counts"]["already_done"] == counts["predicted"]
    assert len(_rows(out)) == len(rows)

    # new posts arrive; the next night predicts only those, with the older posts as context
    storage.write_text(storage.join(archive, "posts", "part-99999.jsonl"),
                       storage.read_text(nightly["later_file"]))
    second = run_generate(_config(nightly, out, "2026-12-01", archive=archive))
    new_rows = [r for r in _rows(out) if str(r["run_date"]) == "2026-12-01"]
    expected = {(str(r["user_id"]), str(r["post_id"])) for r in nightly["later"]}
    assert {(r["user_id"], r["post_id"]) for r in new_rows} == expected
    assert second["counts"]["predicted"] == len(expected)
    assert second["counts"]["already_done"] == counts["predicted"]
    assert len({(r["user_id"], r["post_id"]) for r in _rows(out)}) == len(_rows(out))
    newcomer = [r for r in new_rows if r["user_id"] == NEW_USER]
    assert len(newcomer) == 1 and newcomer[0]["hashtag_used_context"] is False
    assert newcomer[0]["post_used_context"] is False and newcomer[0]["history_posts"] == 0
    old_users = [r for r in new_rows if r["user_id"] != NEW_USER]
    assert all(r["history_posts"] > 0 for r in old_users)
    assert sum(r["hashtag_used_context"] for r in old_users) >= len(old_users) // 2


def test_since_leaves_older_posts_as_history(nightly, tmp_path):
    out = str(tmp_path / "out")
    summary = run_generate(_config(nightly, out, "2026-11-30", since="2100-01-01T00:00:00Z",
                                   post_model="none"))
    assert summary["counts"]["predicted"] == 0
    assert summary["counts"]["before_since"] > 40
    assert summary["balance"]["balanced"]


def test_feature_actors_decoding_the_images_predict_as_the_cpu_tasks_do(nightly, tmp_path):
    """--decode actor (what GPU actors do under auto, with nvJPEG): the same posts, counts and
    rejects as decoding in CPU tasks; the two resize kernels round apart by a grey level or
    two (tests/core/test_features.py), which may move a prediction now and then."""
    runs = {}
    for decode in ("tasks", "actor"):
        out = str(tmp_path / decode)
        summary = run_generate(_config(nightly, out, "2026-11-30", decode=decode,
                                       post_model="none"))
        assert summary["balance"]["balanced"]
        runs[decode] = (summary, {(r["user_id"], r["post_id"]): r["hashtags"]
                                  for r in _rows(out)})
    (tasks, by_tasks), (actor, by_actor) = runs["tasks"], runs["actor"]
    assert tasks["counts"] == actor["counts"] and tasks["rejects"] == actor["rejects"]
    predicted = tasks["counts"]["predicted"]
    assert tasks["decoded_on"] == {"pil": predicted}
    assert actor["decoded_on"] == {"torchvision-cpu": predicted}  # the archive's JPEGs
    assert by_tasks.keys() == by_actor.keys() and len(by_tasks) > 10
    same = sum(by_tasks[key] == by_actor[key] for key in by_tasks)
    assert same >= 0.8 * len(by_tasks), (same, len(by_tasks))
    with pytest.raises(ValueError, match="decode must be one of"):
        GenerateConfig(out="x", decode="gpu")


def test_refuses_other_weights_and_old_checkpoints(nightly, tmp_path):
    with pytest.raises(ValueError, match="learned from features of"):
        run_generate(_config(nightly, str(tmp_path / "a"), "2026-11-30", post_model="none",
                             weights=_other_weights(tmp_path)))
    old = str(tmp_path / "old")
    vocab = load_vocab(nightly["root"], HASHTAG).tokens
    config = tiny_model_config(len(vocab))
    save_checkpoint(old, CSMN(config), config, vocab, HASHTAG)
    with pytest.raises(ValueError, match="Preprocess and train again"):
        run_generate(_config(nightly, str(tmp_path / "b"), "2026-11-30", post_model="none",
                             hashtag_model=old))


def _other_weights(tmp_path) -> str:
    import torchvision

    path = str(tmp_path / "other-resnet101.pt")
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet101().state_dict(), path)
    return path


def test_killed_actor_and_killed_process_end_exactly_once(nightly, tmp_path):
    # a decoding actor killed by ray.kill while the run works: Ray restarts it, retries its
    # batch, and the retried part replaces its own staged file
    reference_out = str(tmp_path / "reference")
    killer = _kill_when_staged("GenerateActor", reference_out)
    reference = run_generate(_config(nightly, reference_out, "2026-11-30", batch_size=4,
                                     feature_batch_size=4, commit_every=1))
    killer.join()
    assert killer.killed, "no decoding actor was alive to kill"
    expected = {(r["user_id"], r["post_id"]) for r in _rows(reference_out)}
    assert len(_rows(reference_out)) == len(expected) == reference["counts"]["predicted"]
    counts = reference["counts"]
    assert counts["records_in"] - counts["rejected"] == len(expected)

    # the whole job killed at its first part, then run again: what it staged is committed
    # first, the rest is computed, and every post ends with one row
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "csmn.cli", "generate", "--archive", nightly["archive"],
               "--out", out, "--run-date", "2026-11-30", "--batch-size", "8",
               "--feature-batch-size", "8", "--commit-every", "1", "--lease-ttl-s", "5"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": REPO},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    predictions = layout.predictions_dir(out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if storage.exists(predictions) and storage.list_files(predictions, suffix=".parquet"):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    summary = run_generate(_config(nightly, out, "2026-11-30"))
    keys = Counter((r["user_id"], r["post_id"]) for r in _rows(out))
    assert max(keys.values()) == 1 and set(keys) == expected
    assert summary["balance"]["balanced"]
    assert (summary["counts"]["predicted"] + summary["counts"]["already_done"]
            == len(expected))
    assert not storage.list_files(layout.predictions_staging_dir(out), suffix=".parquet")


def _kill_when_staged(udf: str, out: str):
    """A thread that ray.kills (restart allowed, as a lost node would) the live actor running
    ``udf`` once it has been up a moment, so that it dies while the run feeds it."""
    import threading

    import ray

    def kill() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            handles = _live_actors(udf)
            if handles:
                time.sleep(0.3)
                ray.kill(handles[0], no_restart=False)
                thread.killed.append(handles[0])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.killed = []
    thread.start()
    return thread


def _live_actors(udf: str) -> list:
    """Handles of the live Ray Data map actors running ``udf`` (pool actors are unnamed:
    from the GCS actor table, whose class name is ``MapWorker(MapBatches(<udf>))``)."""
    import ray

    worker = ray._private.worker.global_worker.core_worker
    return [worker.get_actor_handle(ray.ActorID.from_hex(actor_id))
            for actor_id, info in ray._private.state.actors().items()
            if udf in info.get("ActorClassName", "") and info["State"] == "ALIVE"]


def test_lease_is_exclusive_and_expires(tmp_path, s3_bucket):
    for uri in (str(tmp_path / "lease"), f"{s3_bucket}/lease"):
        held = lease.acquire(uri, ttl_s=60, wait_s=0)
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(uri, ttl_s=60, wait_s=0.3, poll_s=0.1)
        lease.release(held)
        short = lease.acquire(uri, ttl_s=0.2, wait_s=0)
        time.sleep(0.3)
        taken = lease.acquire(uri, ttl_s=60, wait_s=1)  # the expired one is broken
        assert taken.owner != short.owner and not lease.still_held(short)
        lease.release(taken)
        assert not storage.exists(uri)


def test_help_shows_defaults():
    text = build_parser().format_help()
    assert "models:/csmn-hashtag@champion" in text and "auto" in text


def test_run_date_has_one_spelling_per_day():
    # The partition is named by the date: 20261201 and 2026-W49-2 are the same day as
    # 2026-12-01 and must not open partitions of their own.
    for spelling in ("2026-12-01", "20261201", "2026-W49-2"):
        assert GenerateConfig(out="x", run_date=spelling).run_date == "2026-12-01"
    for bad in ("yesterday", "2026-13-01"):
        with pytest.raises(ValueError, match="--run-date must be a date"):
            GenerateConfig(out="x", run_date=bad)


def test_image_rejects_of_two_users_posts_of_one_id_are_both_kept(tmp_path):
    import pyarrow as pa

    from csmn.data.rejects import read_rejects
    from csmn.pipeline.generate import write_staged

    out = str(tmp_path / "out")
    rejects_dir = layout.rejects_dir(out, layout.GENERATE_STAGE)
    # Two batches (two tasks), each one post: the same post id, image and error, other users.
    for user in ("u1", "u2"):
        batch = pa.table({"user_id": [user], "post_id": ["p1"], "image": ["s3://b/shared.jpg"],
                          "error": ["bad_image: cannot identify image file"],
                          "decoded_on": ["cpu"]})
        outcome = write_staged(batch, out, "attempt-1", rejects_dir)
        assert outcome.column("outcome").to_pylist() == ["bad_image"]
    rows = read_rejects(out, layout.GENERATE_STAGE)
    assert sorted(json.loads(r["payload"])["user_id"] for r in rows) == ["u1", "u2"]


def test_a_part_an_overlapping_run_recovered_first_is_accounted_for(tmp_path):
    """Run 2 starts while run 1 works and recovers every staged part, run 1's too (commits
    them, as they have its models). Run 1 then finds its part gone: its posts are counted as
    taken by another run, and its records still balance; each post has one row."""
    import pyarrow as pa

    from csmn.data.schemas import conform
    from csmn.pipeline.generate import Committer, _summary, recover_staged

    out = str(tmp_path / "out")
    config = GenerateConfig(archive=str(tmp_path / "archive"), out=out, post_model="none")
    versions = {HASHTAG: "3"}
    run1 = Committer(config, "2026-12-01", versions)
    rows = [{"user_id": "u", "post_id": f"p{i}", "image": "/x.jpg", "created_at": None,
             "hashtags": ["#a"], "post_text": None, "hashtag_model": "csmn-hashtag",
             "hashtag_model_version": "3", "hashtag_used_context": False, "post_model": None,
             "post_model_version": None, "post_used_context": None, "history_posts": 0,
             "generated_at": datetime.now(UTC), "attempt": "A"} for i in range(3)]
    part = storage.join(layout.predictions_staging_dir(out, "A"), "part-a.parquet")
    storage.write_parquet(part, conform(pa.Table.from_pylist(rows), "generated_post"))
    run2 = Committer(config, "2026-12-01", versions)
    assert recover_staged(run2, out) == 3
    assert run1.commit([part], staged_rows={part: 3}) == 0
    assert (run1.rows, run1.taken_by_another_run) == (0, 3)
    summary = _summary(config, "2026-12-01", "A", {}, Counter(records_in=3, posts=3), 3,
                       Counter(staged=3), run1, 0, {}, 1.0, 1.0, Counter())
    assert summary["balance"]["balanced"] and summary["counts"]["taken_by_another_run"] == 3
    assert len(_rows(out)) == 3


def test_a_lease_the_store_cannot_read_is_waited_for_not_broken(tmp_path, monkeypatch):
    uri = str(tmp_path / "lease")
    first = lease.acquire(uri, ttl_s=600, wait_s=0)
    real_read = storage.read_bytes

    def failing(target):
        if target == uri:
            raise storage.TransientStorageError(5, "SlowDown: the store is busy")
        return real_read(target)

    monkeypatch.setattr(storage, "read_bytes", failing)
    with pytest.raises(lease.LeaseHeld, match="unknown"):
        lease.acquire(uri, ttl_s=600, wait_s=0.3, poll_s=0.1)
    monkeypatch.setattr(storage, "read_bytes", real_read)
    assert lease.still_held(first)  # never broken
    lease.release(first)


def test_a_held_lease_is_renewed_and_a_lost_one_is_said_so(tmp_path):
    uri = str(tmp_path / "lease")
    held = lease.acquire(uri, ttl_s=0.6, wait_s=0)
    assert lease.renewed(held, 0.6) == held  # most of its time left: not rewritten
    time.sleep(0.3)
    renewed = lease.renewed(held, 0.6)
    assert renewed.expires_at > held.expires_at and lease.still_held(renewed)
    time.sleep(0.7)  # expired: another run breaks it
    other = lease.acquire(uri, ttl_s=60, wait_s=1)
    with pytest.raises(lease.LeaseLost):
        lease.renewed(renewed, 0.6)
    lease.release(other)


def test_recovery_reads_committed_parts_outside_the_lease_and_drops_other_models(
        tmp_path, monkeypatch):
    """A large output's committed parts are read before the lease is taken (read under it,
    they outlasted its time to live); a staged row of another registered model with the same
    version number is dropped, not committed."""
    import pyarrow as pa

    from csmn.data.schemas import conform
    from csmn.pipeline import generate
    from csmn.pipeline.generate import Committer, recover_staged

    out = str(tmp_path / "out")
    config = GenerateConfig(archive=str(tmp_path / "a"), out=out, post_model="none",
                            lease_ttl_s=1.0)

    def rows(model: str, posts) -> pa.Table:
        return conform(pa.Table.from_pylist([
            {"user_id": "u", "post_id": f"p{i}", "image": "/x.jpg", "created_at": None,
             "hashtags": ["#a"], "post_text": None, "hashtag_model": model,
             "hashtag_model_version": "3", "hashtag_used_context": False, "post_model": None,
             "post_model_version": None, "post_used_context": None, "history_posts": 0,
             "generated_at": datetime.now(UTC), "attempt": "A"} for i in posts]),
            "generated_post")

    partition = layout.predictions_partition(out, "2026-11-30")
    for i in range(6):  # committed by earlier nights
        storage.write_parquet(storage.join(partition, f"part-{i}.parquet"),
                              rows("csmn-hashtag", range(i, i + 1)))
    staging = layout.predictions_staging_dir(out, "A")
    # p3 is committed already (a killed run staged it after an earlier night committed it).
    storage.write_parquet(storage.join(staging, "part-a.parquet"),
                          rows("csmn-hashtag", [3, 10, 11, 12]))
    storage.write_parquet(storage.join(staging, "part-b.parquet"),
                          rows("csmn-hashtag-experiment", range(20, 22)))
    real_keys = generate._keys

    def slow_keys(parts):
        time.sleep(0.2 * len(parts))
        return real_keys(parts)

    monkeypatch.setattr(generate, "_keys", slow_keys)
    committer = Committer(config, "2026-12-01", {HASHTAG: "3"},
                          names={HASHTAG: "csmn-hashtag"})
    assert recover_staged(committer, out) == 3
    assert (committer.dropped_other_models, committer.dropped_as_done) == (2, 1)
    assert sorted(r["post_id"] for r in _rows(out)) == sorted(
        f"p{i}" for i in (*range(6), 10, 11, 12))  # one row per post
