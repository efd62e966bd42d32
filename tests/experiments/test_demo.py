"""``csmn demo`` end to end, the way ``make demo`` runs it: its own local Ray head (token
authentication, ports of its own, a private temp dir: the session's in-process Ray is never
touched), the whole pipeline as one ``ray job submit``, at a tiny size (hashtags only, one
epoch, a tiny network, 32-pixel crops). Then Ctrl-C in the middle of a job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import browser
import pytest
from mlflow.tracking import MlflowClient

from csmn.experiments.demo import DemoConfig, job_arguments

REPO = Path(__file__).resolve().parents[2]
TINY = ["--users", "10", "--posts-per-user", "56", "--train-user-fraction", "0.6",
        "--tasks", "hashtag", "--hashtags-by-posts", "false", "--epochs", "2",
        "--batch-size", "64", "--embed-dim", "16", "--memory-dim", "32", "--cnn-depth", "8",
        "--crop-size", "32", "--resize-size", "32", "--report-examples", "2",
        "--head-cpus", "2", "--head-object-store-mb", "300"]


def _demo(out: Path, *extra: str, **options) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-m", "csmn.cli", "demo", "--out", str(out),
                             *TINY, *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **options)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _dashboard(output: str) -> tuple[str, str]:
    match = re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+)  \(token: (\S+)\)", output)
    assert match, output[-3000:]
    return match.group(1), match.group(2)


def test_job_arguments_round_trip():
    from csmn.config import config_from_args
    from csmn.experiments.demo import build_parser

    config = DemoConfig(out="/x", tasks=("hashtag",), hashtags_by_posts=False, epochs=1)
    again = config_from_args(DemoConfig, build_parser().parse_args(job_arguments(config)))
    assert again == config


def test_demo_through_ray_job_submit(tmp_path):
    out = tmp_path / "demo"
    started = time.monotonic()
    demo = _demo(out)
    output, _ = demo.communicate(timeout=900)
    seconds = time.monotonic() - started
    assert demo.returncode == 0, output[-6000:]
    print(f"tiny demo through ray job submit: {seconds:.0f} s")

    dashboard, token_path = _dashboard(output)
    assert "Job 'csmn-demo-" in output and "succeeded" in output
    # The head it started is gone, with its temp dir and token.
    assert not _answers(dashboard) and not Path(token_path).exists()
    # One line per stage with counts, one line per epoch (once, not twice), no flood.
    assert re.search(r"archive: 10 users, [\d,]+ posts", output)
    assert re.search(r"preprocess: [\d,]+ records -> [\d,]+ posts of \d+ users", output)
    assert re.search(r"features: [\d,]+ images -> [\d,]+ pool5 vectors", output)
    for epoch in (1, 2):
        lines = [line for line in output.splitlines() if f"epoch {epoch}/2  loss " in line]
        assert len(lines) == 1, lines
        assert re.search(r"val_f1 \d\.\d{3}  [\d,]+ ex/s  \S+ left", lines[0])
    assert "Failed to query Ray Train Controller" not in output
    assert "Found multiple active Ray instances" not in output
    assert "Execution plan of Dataset" not in output
    assert "_TrainingReport" not in output
    assert "Checkpoint successfully created" not in output
    assert "is now ignored by default" not in output and "Ignoring upload" not in output
    assert "RAY_ADDRESS is set but" not in output
    assert "exclude_resources" not in output
    # Random weights: the extraction banner, the nightly job's line and the closing note,
    # never once per actor.
    assert output.count("RANDOM WEIGHTS") <= 3, output.count("RANDOM WEIGHTS")
    # The outcome: the table beside the paper's, where the report and MLflow are.
    assert re.search(r"CSMN-P5\s+\d\.\d{3}\s+0\.230", output)
    # The nightly job over the newest posts, held back from training, with the champion.
    nightly = re.search(r"nightly:   (\d+) new posts predicted \((\d+) older as history\)",
                        output)
    assert nightly and int(nightly.group(1)) >= 10 and int(nightly.group(2)) > 100, output[-3000:]
    assert f"report:    {out}/report.html" in output
    assert f"mlflow ui --backend-store-uri sqlite:///{out}/data/mlflow.db" in output

    summary = json.loads((out / "demo-summary.json").read_text())
    (section,) = summary["sections"]
    assert [step for step, _ in section["training"]["metrics"]["val_loss"]] == [1, 2]
    assert section["examples"] and all(e["attention"] for e in section["examples"])
    client = MlflowClient(f"sqlite:///{out}/data/mlflow.db")
    champion = client.get_model_version_by_alias("csmn-hashtag", "champion")
    assert champion.run_id == section["training"]["run_id"]

    if browser.chromium() is None:
        pytest.skip("chromium missing: run `make system-packages`")
    check = browser.open_page(out / "report.html")
    assert check.errors == [] and check.broken_images == []
    assert len(check.images) == 3 + len(section["examples"])


def test_ctrl_c_stops_the_job_and_the_head(tmp_path):
    demo = _demo(tmp_path / "demo", start_new_session=True)
    seen = []
    deadline = time.monotonic() + 300
    for line in demo.stdout:
        seen.append(line)
        if "Running entrypoint" in line or time.monotonic() > deadline:
            break
    dashboard, token_path = _dashboard("".join(seen))
    assert _answers(dashboard)
    os.killpg(demo.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    rest, _ = demo.communicate(timeout=180)
    assert demo.returncode == 130, "".join(seen)[-3000:] + rest[-3000:]
    assert "interrupted: the job and the local Ray head were stopped" in rest
    assert not _answers(dashboard) and not Path(token_path).exists()


def test_a_password_in_the_tracking_uri_is_never_shown():
    from csmn.experiments.demo import outcome_lines

    uri = "postgresql://alice:s3cr3tpassw0rd@db.example.com/mlflow"
    lines = outcome_lines({"archive": "a", "data": "d", "sections": [], "tracking_uri": uri,
                           "seconds": 1})
    shown = "\n".join(lines)
    assert "mlflow ui --backend-store-uri postgresql://***@db.example.com/mlflow" in shown
    assert "s3cr3tpassw0rd" not in shown


def test_one_config_file_holds_the_demo_and_its_launch(tmp_path):
    from csmn.config import configs_from_args
    from csmn.experiments.demo import LaunchConfig, build_parser

    path = tmp_path / "demo.yaml"
    path.write_text("epochs: 2\nin_process: true\nhead_cpus: 3\n")
    args = build_parser().parse_args(["--config", str(path), "--epochs", "3"])
    config, launch = configs_from_args((DemoConfig, LaunchConfig), args, args.config_file)
    assert config.epochs == 3  # the flag over the file
    assert launch.in_process is True and launch.head_cpus == 3
    path.write_text("epochs: 2\nhead_cpu: 3\n")
    with pytest.raises(ValueError, match="unknown DemoConfig / LaunchConfig field.*head_cpu"):
        configs_from_args((DemoConfig, LaunchConfig), args, args.config_file)
