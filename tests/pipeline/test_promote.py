"""The promotion gate with a real MLflow: the SQLite store, and an ``mlflow server`` on
127.0.0.1 for the same cases. Models are tiny CSMNs trained here in plain PyTorch (a good one,
and one trained on unpaired posts that is worse), registered through the project's own pyfunc
logging, and evaluated by the real evaluation job (Ray Data decoding)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from helpers import tiny_model_config, train_tiny_model, write_data_root
from mlflow.tracking import MlflowClient

from csmn.core.checkpoint import save_checkpoint
from csmn.core.model import CSMN
from csmn.data import layout, storage
from csmn.pipeline.promote import PromoteConfig, Refused, main, promote
from csmn.tracking import log_pyfunc_model
from csmn.tracking.promotion import CHAMPION, RANDOM_FEATURES_TAG, history

REPO = Path(__file__).resolve().parents[2]
NAME = "csmn-hashtag"


# ------------------------------------------------------------------ models and stores


def _train(root: str, steps: int, seed: int, out: str, unpaired: bool = False) -> str:
    """A tiny hashtag model trained on the root's training split (``unpaired``: on images
    and contexts paired with other posts' tags)."""
    return train_tiny_model(root, "hashtag", out, steps, seed, unpaired=unpaired)


@pytest.fixture(scope="module")
def promo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("promote-data"))
    write_data_root(root)
    storage.write_json(layout.manifest_uri(root), {"config": {"context_size": 5}})
    models = tmp_path_factory.mktemp("promote-models")
    good = _train(root, steps=150, seed=0, out=str(models / "good"))
    # Not an untrained model: its P(_EOS) never reaches 1/2, so it names as many tags as
    # max_length allows, half of this 16-tag vocabulary, which scores almost as well as the
    # trained model (F1 0.40 against 0.53). Trained on unpaired posts, it scores 0.
    bad = _train(root, steps=150, seed=1, out=str(models / "bad"), unpaired=True)
    # another vocabulary: a model of another data root
    other = str(models / "other")
    vocab = storage.read_json(layout.vocab_uri(root, "hashtag"))["tokens"] + ["#elsewhere"]
    config = tiny_model_config(len(vocab))
    save_checkpoint(other, CSMN(config).eval(), config, vocab, "hashtag")
    return {"root": root, "good": good, "bad": bad, "other": other}


@pytest.fixture()
def http_store(tmp_path):
    """``mlflow server`` on 127.0.0.1 and a free port, serving its own artifacts; one per
    test, so that each starts from an empty registry."""
    with helpers.mlflow_server(str(tmp_path / "mlflow-server")) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(params=["sqlite", "http"])
def store(request, tmp_path, monkeypatch):
    uri = (f"sqlite:///{tmp_path}/mlflow.db" if request.param == "sqlite"
           else request.getfixturevalue("http_store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


_runs = iter(range(10**6))


def _register(tracking_uri: str, checkpoint: str, random_features: bool = False) -> str:
    """A training-like run holding the checkpoint as its pyfunc model, registered."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("promote-test")
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment("promote-test"))
    run_id = client.create_run(experiment_id, run_name=f"train-{next(_runs)}",
                               tags={RANDOM_FEATURES_TAG: str(random_features).lower()}).info.run_id
    info = log_pyfunc_model(tracking_uri, run_id, checkpoint, "hashtag", register=True)
    client.set_terminated(run_id)
    version = str(info.registered_model_version)
    client.set_model_version_tag(NAME, version, RANDOM_FEATURES_TAG, str(random_features).lower())
    return version


def _champion(tracking_uri: str) -> str:
    return str(MlflowClient(tracking_uri).get_model_version_by_alias(NAME, CHAMPION).version)


def _config(root: str, **kwargs) -> PromoteConfig:
    return PromoteConfig(name=NAME, data=root, resamples=2000, **kwargs)


# ------------------------------------------------------------------ the gate


def test_gate_first_better_worse_tie_dry_run_rollback(ray_session, promo_root, store):
    root = promo_root["root"]
    bad = _register(store, promo_root["bad"])
    first = promote(_config(root, candidate=bad))
    assert first["decision"] == "promoted" and first["champion"] is None
    assert _champion(store) == bad

    good = _register(store, promo_root["good"])
    # a dry run decides but changes nothing
    dry = promote(_config(root, candidate=good, dry_run=True))
    assert dry["decision"] == "promoted" and _champion(store) == bad
    better = promote(_config(root, candidate="latest"))
    comparison = better["comparison"]
    assert better["decision"] == "promoted" and better["champion"] == bad
    assert comparison["low"] > 0 and comparison["candidate_mean"] > comparison["champion_mean"]
    assert _champion(store) == good

    worse = _register(store, promo_root["bad"])
    refused = promote(_config(root, candidate=worse))
    assert refused["decision"] == "refused" and _champion(store) == good
    assert refused["comparison"]["high"] < 0

    same = _register(store, promo_root["good"])
    tie = promote(_config(root, candidate=same, min_gain=0.01))
    assert tie["decision"] == "refused" and tie["comparison"]["mean_difference"] == 0.0
    assert _champion(store) == good

    # the decisions are on the versions, the promotion runs hold the comparison
    client = MlflowClient(store)
    tags = client.get_model_version(NAME, worse).tags
    assert tags["csmn.promotion.decision"] == "refused"
    assert tags["csmn.promotion.metric"] == "f1" and tags["csmn.promotion.champion"] == good
    assert "csmn.promotion.interval" in tags and tags["csmn.promotion.data_digest"]
    # the champion records the challenge it fended off
    defended = client.get_model_version(NAME, good).tags
    assert (defended["csmn.challenge.decision"], defended["csmn.challenge.candidate"]) == (
        "refused", same)
    promotion_runs = client.search_runs(
        [client.get_experiment_by_name("csmn-promotion").experiment_id])
    assert len(promotion_runs) == 4 and all(r.info.status == "FINISHED" for r in promotion_runs)
    assert {"low", "high", "mean_difference", "n_posts"} <= set(promotion_runs[0].data.metrics)

    # rollback moves champion to the one before and says which
    assert main(["--name", NAME, "--data", root, "--rollback"]) == 0
    assert _champion(store) == bad
    moves = history(client, NAME)
    assert [m["action"] for m in moves] == ["promote", "promote", "rollback"]
    assert moves[-1] == {**moves[-1], "version": bad, "previous": good}
    # nothing older to go back to
    assert main(["--name", NAME, "--data", root, "--rollback"]) == 2
    assert _champion(store) == bad


def test_refusals_change_nothing(ray_session, promo_root, store, capsys):
    root = promo_root["root"]
    argv = ["--name", NAME, "--data", root]
    assert main([*argv, "--candidate", "1"]) == 2  # no registered model yet
    assert "no registered model" in capsys.readouterr().out
    assert main([*argv, "--rollback"]) == 2
    random = _register(store, promo_root["good"], random_features=True)
    assert main([*argv, "--candidate", "7"]) == 2
    assert "has no version 7" in capsys.readouterr().out
    assert main([*argv, "--candidate", random]) == 2
    assert "random" in capsys.readouterr().out
    other = _register(store, promo_root["other"])
    assert main([*argv, "--candidate", other]) == 2
    assert "vocabulary" in capsys.readouterr().out
    client = MlflowClient(store)
    assert not client.get_registered_model(NAME).aliases
    assert "csmn.promotion.decision" not in client.get_model_version(NAME, random).tags
    # with leave, a random-features model can be promoted, and the version says so
    assert main([*argv, "--candidate", random, "--allow-random-features"]) == 0
    assert _champion(store) == random
    tags = client.get_model_version(NAME, random).tags
    assert tags["csmn.promoted_with_random_features"] == "true"
    with pytest.raises(Refused, match="already the champion"):
        promote(_config(root, candidate=random, allow_random_features=True))


def test_two_promotions_at_once_leave_a_winner(ray_session, promo_root, tmp_path,
                                               monkeypatch):
    """Two processes promote two copies of the good model over the bad champion. Whatever
    the interleaving, exactly one wins: the other, compared again with the new champion, ties
    and is refused."""
    root = promo_root["root"]
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    bad = _register(tracking_uri, promo_root["bad"])
    assert promote(_config(root, candidate=bad))["decision"] == "promoted"
    first, second = (_register(tracking_uri, promo_root["good"]) for _ in range(2))
    # evaluate both once, so that the two processes race on the alias, not on Ray
    for version in (first, second):
        promote(_config(root, candidate=version, dry_run=True))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "promote.py"), "--name", NAME, "--data", root,
         "--candidate", version, "--resamples", "2000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for version in (first, second)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    client = MlflowClient(tracking_uri)
    champion = str(client.get_model_version_by_alias(NAME, CHAMPION).version)
    decisions = {v: client.get_model_version(NAME, v).tags["csmn.promotion.decision"]
                 for v in (first, second)}
    assert sorted(decisions.values()) == ["promoted", "refused"], outputs
    winner = next(v for v, d in decisions.items() if d == "promoted")
    loser = next(v for v, d in decisions.items() if d == "refused")
    assert champion == winner
    assert client.get_model_version(NAME, loser).tags["csmn.promotion.champion"] == winner
    assert [m["version"] for m in history(client, NAME)] == [bad, winner]


def test_promotion_lock_excludes_and_expires(tmp_path):
    from csmn.tracking.promotion import LOCK_SUFFIX, promotion_lock, rollback

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    with promotion_lock(client, NAME):
        with pytest.raises(Refused, match="holds"):
            with promotion_lock(client, NAME, timeout_s=1, poll_s=0.2):
                pass
        # a rollback moves the alias and writes history too: it waits for the lock as well
        with pytest.raises(Refused, match="holds"):
            rollback(client, NAME, lock_timeout_s=1)
    with promotion_lock(client, NAME):  # released: free again
        pass
    # a lock whose holder died long ago is broken, not waited for
    client.create_registered_model(NAME + LOCK_SUFFIX, tags={"csmn.lock.since": "0"})
    with promotion_lock(client, NAME, timeout_s=5):
        pass
    assert client.search_registered_models() == []


def test_a_deleted_champion_stops_the_gate_and_a_deleted_predecessor_the_rollback(tmp_path):
    """MLflow drops @champion with its version: the next candidate must not pass unopposed
    as if it were the first; and a rollback to a version since deleted is a refusal."""
    from csmn.pipeline.promote import _record
    from csmn.tracking.promotion import (
        check_first_champion,
        move_champion,
        rollback,
        rollback_target,
    )

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model(NAME)
    versions = [client.create_model_version(NAME, source=str(tmp_path)).version
                for _ in range(4)]
    check_first_champion(client, NAME)  # no history: the first promotion needs no rival
    move_champion(client, NAME, "1", None, "promote")
    move_champion(client, NAME, "2", "1", "promote")
    assert rollback_target(client, NAME) == ("1", "2")
    client.delete_model_version(NAME, "1")
    with pytest.raises(Refused, match="was deleted: nothing to roll back to"):
        rollback(client, NAME, lock_timeout_s=5)
    client.delete_model_version(NAME, "2")  # the champion: its alias goes with it
    assert not client.get_registered_model(NAME).aliases
    with pytest.raises(Refused, match="history records champions"):
        check_first_champion(client, NAME)
    # A refused candidate with random features is not tagged as promoted with them.
    config = PromoteConfig(name=NAME, data=str(tmp_path), allow_random_features=True)
    _record(config, client, versions[3], {
        "decision": "refused", "candidate": versions[3], "champion": None, "metric": "f1",
        "data_digest": "d", "split": "test", "at": "now", "reason": "lost",
        "comparison": {}, "random_features": True})
    assert "csmn.promoted_with_random_features" not in client.get_model_version(
        NAME, versions[3]).tags


def test_post_comparison_per_post_with_cider_beside():
    """Posts are compared on METEOR per post by default (real pycocoevalcap, Java), CIDEr of
    the split beside it; a candidate that writes the references wins."""
    from csmn.pipeline.promote import compare

    config = PromoteConfig(name="csmn-post", data="unused", resamples=500)
    assert config.metric == "meteor"
    words = ["sunny", "beach", "pasta", "city", "lights", "morning", "coffee", "trail"]
    truths = {("u", str(i)): " ".join(words[i % 8:] + words[:i % 8][:2]) for i in range(12)}
    candidate = dict(truths)
    champion = {key: "the the the" for key in truths}
    result = compare(config, candidate, champion, truths)
    assert result["wins"] and result["n_posts"] == 12
    assert result["candidate_mean"] > result["champion_mean"]
    assert result["candidate_cider"] > result["champion_cider"]
    bleu = compare(PromoteConfig(name="csmn-post", data="unused", metric="bleu_1",
                                 resamples=500), champion, candidate, truths)
    assert not bleu["wins"] and bleu["high"] < 0
