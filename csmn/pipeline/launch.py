"""A local Ray head for one command's lifetime, and ``ray job submit`` against it.

``csmn demo`` runs the pipeline the way it runs on a cluster: as one job submitted to a head
node. The head is started here with ``ray start --head --block``:

- token authentication on (``RAY_AUTH_MODE=token``), with a fresh token in a 0600 file of the
  head's private temp dir (``RAY_AUTH_TOKEN_PATH``): the user's ``~/.ray/auth_token`` is left
  alone and the token never appears in a log or a command line;
- every port chosen free, so another Ray on the host (a test session, a second demo) is never
  in the way; the dashboard (and with it the job server) bound to 127.0.0.1. The GCS, the
  raylet and the node's agents listen on every interface whatever ``--node-ip-address`` says
  (Ray replaces a loopback address by the host's own, ``services.resolve_ip_for_localhost``),
  so the token is what keeps others out of them; the node's address is the host's IP;
- a private ``--temp-dir``: ``ray start`` writes its address to ``<temp dir>/ray_current_cluster``
  where a later ``ray.init()`` would otherwise find a dead head;
- ``--block`` ties the node to our child process: terminating it stops exactly this node.
  ``ray stop`` has no way to name one node and would stop every Ray of the user on the host.

Ctrl-C and SIGTERM stop the job (``ray job stop``), then the head; so does a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

# Never shipped with the job: version control, environments, the demo's own output, caches.
# Ray honours .gitignore too, but a copy of the project may have none. Named here rather than
# left to Ray's own default list, whose use it announces with a warning per directory.
WORKING_DIR_EXCLUDES = [".git", ".venv", "__pycache__", "demo-data", "mlruns", "*.pyc",
                        ".pytest_cache", ".ruff_cache", "*.egg-info", "build"]
HEAD_START_S = 120.0
# Relative to the working dir, which is every job process's current directory.
RAY_DATA_LOGGING_CONFIG = "csmn/pipeline/ray_data_logging.yaml"
# The job server answers before the node's job agent has registered with it; a submission in
# that window is refused with this message, which Ray itself says to retry.
NO_AGENT = "No available agent"


def ray_cli() -> str:
    """The ``ray`` of this interpreter's environment (the one with csmn installed)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Head:
    """A running head node: where to reach it and the environment a client needs."""

    address: str
    temp_dir: str
    env: dict[str, str]
    process: subprocess.Popen
    log_path: str
    token_path: str

    @property
    def dashboard_url(self) -> str:
        return self.address

    @property
    def gcs_address(self) -> str:
        """host:port of the node's GCS, as ``ray start`` wrote it for later clients."""
        return Path(self.temp_dir, "ray_current_cluster").read_text().strip()

    def job_env_vars(self) -> dict[str, str]:
        """Environment of every process of a job on this head. ``RAY_ADDRESS``: Ray Train's
        placement group cleaner and Ray's state API otherwise look for "the" Ray on the host
        and fail when there are several (a test session's, another user's). The Ray Data
        logging config keeps its per-dataset INFO lines in the log files, off the console."""
        return {"RAY_ADDRESS": self.gcs_address,
                "RAY_DATA_LOGGING_CONFIG": RAY_DATA_LOGGING_CONFIG}


@dataclass
class HeadOptions:
    num_cpus: int | None = None
    object_store_bytes: int = 1024**3
    start_timeout_s: float = HEAD_START_S
    # Environment variables every Ray process of the head inherits (the job's driver too).
    extra_env: dict[str, str] = field(default_factory=dict)


def client_env(token_path: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """What ``ray job submit`` needs to talk to a head with token authentication: Ray 2.60
    clients send the token only when ``RAY_AUTH_MODE=token`` is set in their environment."""
    env = dict(os.environ if base is None else base)
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
                # WORKING_DIR_EXCLUDES lists what Ray would leave out by default.
                "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": "",
                # A SIGTERM'd node drains for Ray Serve's sake, 30 s by default; a head whose
                # job has ended (or was stopped) has nothing to drain.
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    # The head's processes find `ray` and `python` of this environment first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _write_token(temp_dir: str) -> str:
    path = os.path.join(temp_dir, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def start_head(options: HeadOptions | None = None, attempts: int = 2) -> Head:
    """Start a head node and wait until its job server accepts an authenticated client; on a
    loaded machine Ray's node start can time out ("The current node timed out during
    startup"), so a failed start is tried again, on fresh ports."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_head_once(options or HeadOptions())
        except RuntimeError as error:
            if attempt == attempts:
                raise
            log.warning("the Ray head did not start (%s); trying again",
                        str(error).splitlines()[0])
    raise AssertionError("unreachable")


def _start_head_once(options: HeadOptions) -> Head:
    # Short and under /tmp: Ray's Unix socket paths live under it (108 bytes at most).
    temp_dir = tempfile.mkdtemp(prefix="csmn-head-", dir="/tmp")
    token_path = _write_token(temp_dir)
    env = {**client_env(token_path), **options.extra_env}
    dashboard_port = free_port()
    command = [ray_cli(), "start", "--head", "--block", "--temp-dir", temp_dir,
               "--port", str(free_port()),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard_port),
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()),
               "--metrics-export-port", str(free_port()),
               "--ray-client-server-port", str(free_port()),
               "--object-store-memory", str(options.object_store_bytes),
               "--disable-usage-stats"]
    if options.num_cpus is not None:
        command += ["--num-cpus", str(options.num_cpus)]
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "w") as log_file:
        # Its own session: a Ctrl-C in the terminal reaches us, and we stop the job before
        # the node it runs on.
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard_port}", temp_dir, env, process, log_path,
                token_path)
    try:
        _wait_until_up(head, options.start_timeout_s)
    except BaseException:
        stop_head(head)
        raise
    return head


def _wait_until_up(head: Head, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run([ray_cli(), "job", "list", "--address", head.address],
                               env=head.env, capture_output=True, text=True)
        # `ray start` writes the node's address last, after the job server is up.
        if probe.returncode == 0 and Path(head.temp_dir, "ray_current_cluster").exists():
            return
        if head.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the Ray head did not come up; its log ends with:\n"
                               + Path(head.log_path).read_text()[-3000:])
        time.sleep(1.0)


def stop_head(head: Head, grace_s: float = 30.0) -> None:
    """Stop exactly this node: SIGTERM to ``ray start --block``, whose handler stops the
    node's processes; SIGKILL if it hangs (the node's reaper then ends what is left)."""
    if head.process.poll() is None:
        head.process.terminate()
        try:
            head.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait(timeout=grace_s)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def local_head(options: HeadOptions | None = None) -> Iterator[Head]:
    head = start_head(options)
    try:
        yield head
    finally:
        stop_head(head)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI timeout, ``kill``) unwinds like Ctrl-C, so every ``finally`` runs."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def submit_command(head: Head, entrypoint: Sequence[str], working_dir: str,
                   submission_id: str, runtime_env: dict[str, Any] | None = None) -> list[str]:
    import json

    env = {"excludes": WORKING_DIR_EXCLUDES, **(runtime_env or {})}
    return [ray_cli(), "job", "submit", "--address", head.address,
            "--submission-id", submission_id, "--working-dir", working_dir,
            "--runtime-env-json", json.dumps(env), "--log-style", "record", "--",
            *entrypoint]


def submit_job(head: Head, entrypoint: Sequence[str], working_dir: str, submission_id: str,
               runtime_env: dict[str, Any] | None = None, out: TextIO | None = None,
               line_filter: Callable[[str], bool] | None = None,
               agent_wait_s: float = 60.0) -> int:
    """``ray job submit`` (it waits for the job and tails its logs), its lines written to
    ``out`` as they come; returns its exit status (0: the job succeeded). Interrupted, the
    job is stopped before this returns."""
    out = out or sys.stdout
    command = submit_command(head, entrypoint, working_dir, submission_id, runtime_env)
    deadline = time.monotonic() + agent_wait_s
    while True:
        status, refused = _run_streaming(head, command, submission_id, out, line_filter)
        if not refused or time.monotonic() > deadline:
            return status
        time.sleep(2.0)


def _run_streaming(head: Head, command: list[str], submission_id: str, out: TextIO,
                   line_filter: Callable[[str], bool] | None) -> tuple[int, bool]:
    """(exit status, refused for want of a job agent)."""
    process = subprocess.Popen(command, env=head.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                               bufsize=1, start_new_session=True)
    refused = False
    try:
        assert process.stdout is not None
        for line in process.stdout:
            refused = refused or NO_AGENT in line
            if not refused and (line_filter is None or line_filter(line)):
                out.write(line)
                out.flush()
        return process.wait(), refused
    except BaseException:
        stop_job(head, submission_id)
        raise
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def stop_job(head: Head, submission_id: str) -> None:
    """Stop the job and wait for it to end (its driver, its actors), so that the head can
    then stop cleanly."""
    subprocess.run([ray_cli(), "job", "stop", "--address", head.address, submission_id],
                   env=head.env, capture_output=True, text=True, timeout=60)


def job_logs(head: Head, submission_id: str) -> str:
    done = subprocess.run([ray_cli(), "job", "logs", "--address", head.address, submission_id],
                          env=head.env, capture_output=True, text=True, timeout=60)
    return done.stdout
