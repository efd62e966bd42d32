"""The project's security rules as checks over its source and a few real runs: token auth on
and 127.0.0.1 in what the project starts, ``weights_only`` loads (and a malicious pickle that
must not run), no write outside the output root whatever the ids, reports that render hostile
ids and captions inert, and no planted credential in what a tracked run leaves behind.
(The cluster files' token auth is tests/test_cluster_config.py's; the Ray token file's mode
and the redaction of values tests/reliability/test_security.py's.)"""

from __future__ import annotations

import ast
import html.parser
import json
import os
import re
import stat
import time
from pathlib import Path

import helpers
import pytest
import reliability_tally
import torch

from csmn.core.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from csmn.core.image_features import WeightsUnavailable, load_trunk
from csmn.data import layout
from csmn.eval import report as report_module
from csmn.pipeline import launch

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "csmn").rglob("*.py"), *(REPO / "jobs").glob("*.py"),
                  *(REPO / "bench").glob("*.py")])
HOSTILE_IDS = ["../../x", "/etc/passwd", "..", "a/../../b", "<script>alert(1)</script>",
               "u\nnext", "[x](javascript:alert(1))", "**b**|c", "&amp;<img src=x onerror=1>"]


def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Call)]


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def test_every_checkpoint_load_is_weights_only_and_nothing_is_unpickled():
    loads = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call)
            assert not name.endswith(("pickle.load", "pickle.loads", "cloudpickle.load",
                                      "cloudpickle.loads", "yaml.load", "yaml.unsafe_load",
                                      "joblib.load", "numpy.load", "np.load")), (path, name)
            # torch.hub's loaders (and torchvision's get_state_dict over them) default to
            # weights_only=False.
            if name == "torch.load" or name.endswith(("get_state_dict",
                                                      "load_state_dict_from_url")):
                flags = {k.arg: ast.unparse(k.value) for k in call.keywords}
                assert flags.get("weights_only") == "True", (path, call.lineno)
                loads.append(f"{path.name}:{call.lineno}")
    assert len(loads) >= 3, loads  # the checkpoint, a ResNet state_dict, torchvision's


class _Payload:
    """A pickle that runs a command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_as_a_checkpoint_and_as_weights(tmp_path):
    vocab = ["_PAD", "_GO", "_EOS", "_UNK", "#a"]
    config = helpers.tiny_model_config(len(vocab))
    from csmn.core.model import CSMN

    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(str(checkpoint), CSMN(config).eval(), config, vocab, "hashtag")
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, checkpoint / MODEL_FILE)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(str(checkpoint))
    weights = tmp_path / "resnet101.pth"
    torch.save(_Payload(marker), weights)
    with pytest.raises(WeightsUnavailable, match="weights_only"):
        load_trunk(str(weights), 0)
    time.sleep(0.1)
    assert not marker.exists(), "the pickle ran"
    reliability_tally.bad_kinds(["pickle:checkpoint", "pickle:weights"])


def test_a_planted_torch_hub_cache_file_is_neither_unpickled_nor_used(tmp_path, monkeypatch):
    """torch.hub reads a file already in its cache without checking its hash, and unpickles
    it by default: --weights imagenet must do neither."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    url = torchvision.models.ResNet101_Weights.IMAGENET1K_V2.url
    cached = tmp_path / "hub" / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # so that TORCH_HOME decides
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), cached)
    with pytest.raises(WeightsUnavailable):
        load_trunk("imagenet-v2", 0)
    time.sleep(0.1)
    assert not marker.exists(), "the pickle ran"
    # A loadable state_dict that is not the published file is refused by its hash.
    torch.save({"conv1.weight": torch.zeros(1)}, cached)
    with pytest.raises(WeightsUnavailable, match="not the published"):
        load_trunk("imagenet-v2", 0)


def test_the_demo_launcher_keeps_token_auth_and_binds_127_0_0_1(tmp_path, monkeypatch):
    source = (REPO / "csmn" / "pipeline" / "launch.py").read_text()
    command = next(c for c in _calls(REPO / "csmn" / "pipeline" / "launch.py")
                   if _name(c) == "subprocess.Popen")
    assert command
    # The dashboard and its job server; Ray's GCS and raylet listen on every interface
    # whatever --node-ip-address says, which is why the token must stay on.
    assert '"--dashboard-host", "127.0.0.1"' in source
    assert "disabled" not in source and "0.0.0.0" not in source
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    env = launch.client_env(str(tmp_path / "auth_token"), base=dict(os.environ))
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
    token = Path(launch._write_token(str(tmp_path)))
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64


def test_nothing_the_project_starts_listens_beyond_127_0_0_1():
    places = [*SOURCES, *(REPO / "tests").rglob("*.py"), REPO / "Makefile"]
    for path in places:
        text = path.read_text()
        if path.name == "test_security_checks.py":
            continue
        assert "0.0.0.0" not in text, path
        for flag in ("--host", "--dashboard-host", "ip_address="):
            for at in (i for i in range(len(text)) if text.startswith(flag, i)):
                assert "127.0.0.1" in text[at:at + 40], (path, text[at:at + 40])


def test_hostile_ids_write_nothing_outside_the_output_root(tmp_path):
    """Every file a job names after a record goes through csmn.data.layout / a digest: with
    ids like ``../../x`` the rejects and the report stay under their roots."""
    from csmn.data.rejects import reject_row, write_reject_part

    root = tmp_path / "deep" / "root"
    rows = [reject_row("read", "bad_json: x", record_id=i, source=i) for i in HOSTILE_IDS]
    write_reject_part(rows, layout.rejects_dir(str(root), "read"), key=HOSTILE_IDS[0])
    out = root / "evaluations" / "e"
    built = _hostile_report(str(root), str(out))
    report_module.write_report(str(out), built, HOSTILE_IDS, HOSTILE_IDS,
                               {"csmn": [[w] for w in HOSTILE_IDS]})
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    assert outside == []
    reliability_tally.bad_kinds([f"id:{i!r}" for i in HOSTILE_IDS])


def _hostile_report(root: str, out: str) -> dict:
    predictions = {"csmn": [[w, "#ok"] for w in HOSTILE_IDS]}
    contexts = [[w] for w in HOSTILE_IDS]
    examples = report_module.example_rows(HOSTILE_IDS, HOSTILE_IDS, HOSTILE_IDS, contexts,
                                          predictions, len(HOSTILE_IDS), 0)
    per_user = {"csmn": [{"user_id": u, "posts": 1, "f1": 0.0} for u in HOSTILE_IDS]}
    return report_module.build_report(
        config={"task": "hashtag", "split": "test", "data": root + "/<b>x</b>"}, out=out,
        model={"uri": "models:/csmn-hashtag/1<script>", "epoch": 1},
        counts={"examples": 9, "scored": 9, "skipped_no_features": 0},
        results={"csmn": {"f1": 0.1}}, per_user=per_user, examples=examples)


class _Elements(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += attrs


def test_hostile_ids_and_captions_render_inert(tmp_path):
    built = _hostile_report(str(tmp_path), str(tmp_path / "out"))
    page = report_module.render_html(built)
    parsed = _Elements()
    parsed.feed(page)
    assert not {"script", "iframe", "object", "embed", "svg", "a", "form"} & set(parsed.tags)
    assert not [a for a, _ in parsed.attributes if a.startswith("on")]
    assert all(v.startswith("data:") for a, v in parsed.attributes if a == "src" and v)
    for hostile in HOSTILE_IDS:
        if "<" in hostile:
            assert hostile not in page, hostile

    markdown = report_module.render_markdown(built)
    # Rendered by a markdown renderer (CommonMark: raw HTML passes through), the data must
    # make no tag, link, image or table cell: no "<" from the data, "[", "|", "*" escaped.
    for hostile in HOSTILE_IDS:
        shown = report_module.md_text(hostile)
        assert "<" not in shown and "\n" not in shown
        assert all(shown[i - 1] == "\\" for i, c in enumerate(shown) if c in "[]|*_`")
    assert "<script" not in markdown and "<img" not in markdown
    # Every row of a table has its header's cells: no "|" of the data opened a cell.
    blocks, block = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append(re.sub(r"\\\|", "", line).count("|"))
        elif block:
            blocks.append(block)
            block = []
    assert blocks and all(len(set(b)) == 1 for b in blocks), blocks
    reliability_tally.bad_kinds([f"report:{i!r}" for i in HOSTILE_IDS])


SECRET = "pl4nted-S3cret-9f3a"


def test_a_planted_credential_appears_in_no_log_param_tag_or_artifact(
        ray_session, tmp_path, monkeypatch, capfd):
    """A tiny tracked run (a pyfunc model logged, then evaluated through ``runs:/``) against
    an MLflow server on 127.0.0.1 reached as ``http://csmn:SECRET@...``, with the secret also
    in the environment (as a token variable and a database URI)."""
    from mlflow.tracking import MlflowClient

    from csmn import tracking
    from csmn.pipeline.evaluate import EvaluateConfig, evaluate

    with helpers.mlflow_server(str(tmp_path / "server")) as port:
        uri = f"http://csmn:{SECRET}@127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        # csmn.tracking turns MLflow's printed run URLs off for this URI; undone after.
        monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
        monkeypatch.setenv("CSMN_SERVICE_TOKEN", SECRET)
        monkeypatch.setenv("CSMN_DATABASE_URL", f"postgresql://u:{SECRET}@db.internal/x")
        root = tmp_path / "root"
        helpers.write_data_root(str(root))
        checkpoint = helpers.train_tiny_model(str(root), "hashtag", str(tmp_path / "ck"), 5)
        client = MlflowClient(uri)
        experiment = client.create_experiment("csmn-secret-check")
        run_id = client.create_run(experiment, tags={"mlflow.runName": "t"}).info.run_id
        tracking.log_params(uri, run_id, {"tracking": uri, "db": os.environ["CSMN_DATABASE_URL"]})
        info = tracking.log_pyfunc_model(uri, run_id, checkpoint, "hashtag")
        built = evaluate(EvaluateConfig(data=str(root), model=info.model_uri, task="hashtag",
                                        split="test", baselines="none"))

        stored = []
        for experiment_ in client.search_experiments():
            for run in client.search_runs([experiment_.experiment_id]):
                stored += [repr(run.data.params), repr(run.data.tags), repr(run.info)]
                stored += [_artifact_text(p) for p in _download_all(client, run.info.run_id,
                                                                    tmp_path / "dl")]
        stored += [_artifact_text(p) for p in Path(built["out"]).rglob("*") if p.is_file()]
        logs = capfd.readouterr()
        stored += [logs.out, logs.err]
        leaks = [text[max(0, text.find(SECRET) - 80):text.find(SECRET) + 20]
                 for text in stored if SECRET in text]
        assert leaks == [], leaks
        assert len(stored) > 10
        reliability_tally.bad_kinds(["credential:tracking_uri", "credential:env_token",
                                     "credential:database_uri"])


def _download_all(client, run_id: str, into: Path) -> list[Path]:
    if not client.list_artifacts(run_id):
        return []
    target = into / run_id
    target.mkdir(parents=True, exist_ok=True)
    local = client.download_artifacts(run_id, "", str(target))
    return [p for p in Path(local).rglob("*") if p.is_file()]


def _artifact_text(path: Path) -> str:
    data = path.read_bytes()
    return data.decode("utf-8", "replace") + json.dumps(str(path))
