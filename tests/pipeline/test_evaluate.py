"""The evaluation job end to end: a real Ray (Data actor pool), a real MLflow SQLite store,
real pycocoevalcap, on a tiny data root written here in the contract format."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_model_config, write_data_root
from mlflow.tracking import MlflowClient

from csmn.core.checkpoint import load_checkpoint, save_checkpoint
from csmn.core.decoding import greedy_decode
from csmn.core.model import CSMN
from csmn.core.tokens import task_rules
from csmn.data import schemas, storage
from csmn.eval import metrics
from csmn.eval.baselines import Queries, load_training_set, run_baselines
from csmn.pipeline.evaluate import EvaluateConfig, evaluate, main
from csmn.tracking import data_digest, find_evaluation, resolve_checkpoint


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("eval-data"))
    write_data_root(root)
    vocab = storage.read_json(storage.join(root, "vocab", "hashtag.json"))["tokens"]
    torch.manual_seed(0)
    config = tiny_model_config(len(vocab))
    save_checkpoint(
        storage.join(root, "checkpoint"),
        CSMN(config).eval(),
        config,
        vocab,
        "hashtag",
        epoch=3,
        train_config={"variant": "CSMN-P5"},
    )
    return root


def _direct_decoding(checkpoint_dir: str, root: str, post_ids: list[str]) -> list[list[str]]:
    """The same model decoded without Ray, to check the actor-pool path."""
    loaded = load_checkpoint(checkpoint_dir)
    table = storage.read_parquet(storage.join(root, "examples", "hashtag", "test")).to_pylist()
    by_post = {r["post_id"]: r for r in table}
    features = pq.read_table(storage.join(root, "features", "pool5")).to_pylist()
    feature_of = {r["image"]: r["feature"] for r in features}
    ids = {w: i for i, w in enumerate(loaded.vocab)}
    image = torch.tensor([feature_of[by_post[p]["image"]] for p in post_ids])
    context = torch.zeros(len(post_ids), loaded.model_config.context_size, dtype=torch.long)
    for row, post in enumerate(post_ids):
        cids = [ids[w] for w in by_post[post]["context_words"] if ids.get(w, 0) >= 4][:5]
        context[row, : len(cids)] = torch.tensor(cids)
    result = greedy_decode(loaded.model, image, context, **task_rules("hashtag"))
    return [[loaded.vocab[i] for i in row if i >= 4] for row in result.token_ids]


def test_hashtag_evaluation_with_model_and_baselines(ray_session, data_root, tmp_path):
    out = str(tmp_path / "report")
    checkpoint_dir = storage.join(data_root, "checkpoint")
    report = evaluate(
        EvaluateConfig(
            data=data_root,
            model=checkpoint_dir,
            split="test",
            task="hashtag",
            out=out,
            batch_size=2,
            report_examples=3,
            cpus_per_actor=0.5,
        )
    )
    # 6 test posts, one without a feature: counted, not lost
    assert report["counts"] == {"examples": 6, "scored": 5, "skipped_no_features": 1}
    assert sorted(report["results"]) == ["1nn-im", "1nn-usr", "1nn-usrim", "csmn"]
    assert report["model"]["epoch"] == 3 and report["model"]["variant"] == "CSMN-P5"

    predictions = pq.read_table(storage.join(out, "predictions.parquet"))
    schemas.validate(predictions, "evaluation_prediction")
    assert predictions.num_rows == 5 * 4
    rows = predictions.to_pylist()
    by_method = {m: [r for r in rows if r["method"] == m] for m in report["results"]}
    post_ids = [r["post_id"] for r in by_method["csmn"]]
    assert "t1-2" not in post_ids

    # the actor pool decodes exactly what a direct greedy decode gives
    direct = _direct_decoding(checkpoint_dir, data_root, post_ids)
    assert [r["prediction"].split() for r in by_method["csmn"]] == direct

    # baselines equal the library's, and every F1 equals csmn.eval.metrics on the stored rows
    test = {
        r["post_id"]: r
        for r in storage.read_parquet(
            storage.join(data_root, "examples", "hashtag", "test")
        ).to_pylist()
    }
    features = {
        r["image"]: r["feature"]
        for r in pq.read_table(storage.join(data_root, "features", "pool5")).to_pylist()
    }
    queries = Queries(
        post_ids,
        np.array([features[test[p]["image"]] for p in post_ids]),
        [test[p]["context_words"] for p in post_ids],
    )
    library = run_baselines(load_training_set(data_root, "hashtag"), queries)
    truths = [test[p]["text"] for p in post_ids]
    for method, method_rows in by_method.items():
        predicted = [r["prediction"].split() for r in method_rows]
        if method != "csmn":
            assert predicted == library[method].hashtags
        expected = metrics.score_hashtags(truths, predicted)
        assert report["results"][method]["f1"] == pytest.approx(expected.f1)
        assert report["results"][method]["context_share"] == pytest.approx(
            metrics.context_share(predicted, [test[p]["context_words"] for p in post_ids])
        )
    # crafted so that image neighbours are right: 1NN-Im gets the category tags
    assert report["results"]["1nn-im"]["f1"] > 0.5
    assert {u["user_id"] for u in report["per_user"]["csmn"]} == {"t0", "t1"}

    saved = json.loads(storage.read_text(storage.join(out, "report.json")))
    assert saved["results"] == report["results"] and len(saved["examples"]) == 3
    markdown = storage.read_text(storage.join(out, "report.md"))
    assert "| 1nn-usrim |" in markdown and "skipped (no image features)" in markdown
    # Figure 4's marks: 1NN-Usr copies a training user's tags, among them category tags of
    # the query user's context memory, so some example shows a context word used
    used = [w for e in saved["examples"] for ws in e["context_used"].values() for w in ws]
    assert used and all(
        set(ws) <= set(test[e["post_id"]]["context_words"])
        for e in saved["examples"] for ws in e["context_used"].values()
    )
    assert "_#" in markdown  # a context word, italic
    # the HTML report: self-contained, thumbnails embedded, the same marks
    page = storage.read_text(storage.join(out, "report.html"))
    assert page.startswith("<!DOCTYPE html>") and "<td>1nn-usrim</td>" in page
    shown = [e for e in saved["examples"] if e["post_id"] != "t0-0"]
    assert page.count("data:image/jpeg;base64,") == len(shown)
    # the methods beside the paper's, and the per-user spread, drawn by matplotlib
    assert page.count("<img class='chart' alt=") == 2
    assert page.count("data:image/png;base64,") == 2
    assert 'class="ctx"' in page or 'class="hit ctx"' in page
    # a checkpoint folder has no MLflow run: nothing was logged
    assert "mlflow" not in report


def test_registered_model_by_alias_and_cli(ray_session, data_root, tmp_path, monkeypatch):
    from csmn.tracking import log_pyfunc_model

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("eval-test")
    run_id = (
        MlflowClient(tracking_uri)
        .create_run(mlflow.get_experiment_by_name("eval-test").experiment_id)
        .info.run_id
    )
    info = log_pyfunc_model(
        tracking_uri, run_id, storage.join(data_root, "checkpoint"), "hashtag", register=True
    )
    MlflowClient(tracking_uri).set_registered_model_alias(
        "csmn-hashtag", "champion", str(info.registered_model_version)
    )

    by_path = evaluate(
        EvaluateConfig(
            data=data_root,
            model=storage.join(data_root, "checkpoint"),
            baselines="none",
            out=str(tmp_path / "a"),
            cpus_per_actor=0.5,
        )
    )
    out = str(tmp_path / "b")
    assert (
        main(
            [
                "--data",
                data_root,
                "--model",
                "models:/csmn-hashtag@champion",
                "--baselines",
                "none",
                "--out",
                out,
                "--cpus-per-actor",
                "0.5",
            ]
        )
        == 0
    )
    by_alias = json.loads(storage.read_text(storage.join(out, "report.json")))
    assert by_alias["results"] == by_path["results"]
    assert by_alias["model"]["uri"] == "models:/csmn-hashtag@champion"
    # the alias is read once, pinned to the version it named then (a promotion moving it
    # during the evaluation cannot make it decode one version and record another)
    assert by_alias["model"]["evaluated_uri"] == "models:/csmn-hashtag/1"
    # an MLflow model: a new evaluation run in the model's experiment, tagged, with the
    # metrics and the report files
    client = MlflowClient(tracking_uri)
    evaluation = client.get_run(by_alias["mlflow"]["run_id"])
    assert evaluation.info.experiment_id == client.get_run(run_id).info.experiment_id
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["csmn.model_uri"] == "models:/csmn-hashtag/1"  # as decoded
    assert evaluation.data.tags["csmn.split"] == "test"
    assert evaluation.data.tags["csmn.model_run_id"] == run_id
    assert evaluation.data.tags["csmn.model_version"] == str(info.registered_model_version)
    assert evaluation.data.metrics["csmn/f1"] == pytest.approx(by_alias["results"]["csmn"]["f1"])
    assert evaluation.data.metrics["count/scored"] == 5
    logged = {a.path for a in client.list_artifacts(evaluation.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report.json"} <= logged
    # linked to the LoggedModel and the data root (MLflow 3), and found again by the gate's
    # keys: registered name and version, split, data digest
    digest = data_digest(data_root)
    assert evaluation.data.tags["csmn.data_digest"] == digest
    assert [d.dataset.digest for d in evaluation.inputs.dataset_inputs] == [digest]
    model_metrics = {m.key: m.value for m in mlflow.get_logged_model(info.model_id).metrics
                     if m.run_id == evaluation.info.run_id}
    assert model_metrics["csmn/f1"] == pytest.approx(by_alias["results"]["csmn"]["f1"])
    decoding = EvaluateConfig(data=data_root, model="models:/csmn-hashtag/1").decoding
    assert evaluation.data.tags["csmn.decoding"] == decoding == (
        "beam_width=1 repeats=block stop=likely")
    # post texts name their phrase rule: evaluations decoded before it are not reused
    assert EvaluateConfig(data=data_root, model="m", task="post").decoding == (
        "beam_width=1 repeats=block stop=likely no_repeat_ngram=3")
    assert EvaluateConfig(data=data_root, model="m", task="post", repeats="paper").decoding == (
        "beam_width=1 repeats=paper stop=likely")
    found = find_evaluation(tracking_uri, "csmn-hashtag", info.registered_model_version,
                            "test", digest, decoding)
    assert found.run_id == evaluation.info.run_id
    # the features the model read are named too: the same root's are, another's are not
    # (features extracted again with other weights leave the manifest's digest as it was)
    from csmn.data import layout

    assert evaluation.data.tags["csmn.features_layer"] == "pool5"
    assert evaluation.data.tags["csmn.features_digest"] == layout.features_digest(
        data_root, "pool5")
    assert find_evaluation(tracking_uri, "csmn-hashtag", info.registered_model_version,
                           "test", digest, decoding, data_root=data_root).run_id == found.run_id
    other = str(tmp_path / "re-extracted")
    meta = storage.read_json(layout.features_meta_uri(data_root, "pool5"))
    storage.write_json(layout.features_meta_uri(other, "pool5"),
                       {**meta, "weights": {**(meta.get("weights") or {}),
                                            "fingerprint": "other-weights"}})
    assert find_evaluation(tracking_uri, "csmn-hashtag", info.registered_model_version,
                           "test", digest, decoding, data_root=other) is None
    assert found.metrics["csmn/f1"] == evaluation.data.metrics["csmn/f1"]
    # every MLflow URI form reaches the same checkpoint
    for uri in (f"runs:/{run_id}/model", "models:/csmn-hashtag/1", info.model_uri):
        found = resolve_checkpoint(uri, tracking_uri, str(tmp_path / "dl" / uri.replace("/", "_")))
        assert storage.read_json(storage.join(found, "csmn.json"))["task"] == "hashtag"
    with pytest.raises(ValueError, match="hashtag model, not post"):
        evaluate(
            EvaluateConfig(
                data=data_root,
                model="models:/csmn-hashtag@champion",
                task="post",
                baselines="none",
                out=str(tmp_path / "c"),
            )
        )


def test_caption_baselines_only(data_root, tmp_path):
    report = evaluate(
        EvaluateConfig(
            data=data_root,
            task="post",
            baselines="1nn-im,1nn-usr",
            out=str(tmp_path / "post"),
        )
    )
    results = report["results"]
    assert sorted(results) == ["1nn-im", "1nn-usr"]
    assert {"bleu_1", "bleu_4", "meteor", "cider", "rouge_l"} <= set(results["1nn-im"])
    assert 0 < results["1nn-im"]["bleu_1"] <= 1
    assert 0 <= results["1nn-im"]["triple_repeats"] <= 1
    # per-user breakdowns carry BLEU-1 but never CIDEr
    assert all("cider" not in u and u["bleu_1"] is not None for u in report["per_user"]["1nn-im"])
    with pytest.raises(ValueError, match="unknown baselines"):
        EvaluateConfig(data=data_root, baselines="2nn").baseline_names  # noqa: B018
