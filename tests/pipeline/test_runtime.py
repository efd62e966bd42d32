"""The in-process Ray that ``csmn train``, ``ablation`` and the other jobs start without
RAY_ADDRESS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

_SCRIPT = """
import json, urllib.error, urllib.request, ray
from ray.util.state import list_actors
from csmn.pipeline.runtime import ensure_private_token, init_ray
init_ray(num_cpus=1, object_store_memory=100 * 1024 * 1024)
# Ray Train's placement-group cleaner asks the State API this way, from a worker, once a
# second, and another Ray (the test session's) runs beside this one
actors = ray.get(ray.remote(lambda: len(list_actors())).remote())
webui = ray._private.worker.global_worker.node.address_info["webui_url"]
token_file = ensure_private_token()  # the file init_ray made: the same path, now found
token = token_file.read_text().strip()
def status(headers):
    request = urllib.request.Request(f"http://{webui}/api/v0/actors", headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as error:
        return error.code
print(json.dumps({"webui": webui, "actors": actors, "without_token": status({}),
                  "with_token": status({"Authorization": f"Bearer {token}"}),
                  "token_file": str(token_file)}))
ray.shutdown()
"""


def test_the_in_process_ray_answers_the_state_api_on_localhost_behind_a_token(
        ray_session, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(tmp_path), PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["webui"].startswith("127.0.0.1:"), answer
    assert "Failed to connect to API server" not in done.stderr
    # token auth stays on: the dashboard refuses a request without the run's token, which
    # is private to its user
    assert (answer["without_token"], answer["with_token"]) == (401, 200), answer
    token_file = Path(answer["token_file"])
    assert token_file.is_relative_to(tmp_path), answer
    assert token_file.stat().st_mode & 0o077 == 0
