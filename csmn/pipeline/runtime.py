"""Where a job runs: an in-process Ray by default, a cluster when ``RAY_ADDRESS`` is set.

``ray job submit`` sets ``RAY_ADDRESS`` for the entry point, so the same ``jobs/*.py`` runs
on a laptop and on a cluster unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csmn.data.storage import STORAGE_ENV_VARS, TransientStorageError

log = logging.getLogger(__name__)

# Options of the plain Ray tasks that read the store (counting a source's records): one whose
# storage error outlived csmn.data.storage's retries is run again, as is one whose worker
# died. Ray Data's map tasks retry in process instead (their remote args are deprecated in
# Ray 2.60), as Ray Data's own file reads do.
TASK_RETRIES: dict = {"max_retries": 3, "retry_exceptions": [TransientStorageError]}


def ensure_private_token() -> Path | None:
    """The token file a local head authenticates with, readable by its owner only.

    Ray writes ``~/.ray/auth_token`` with the process umask (0644 by default): any local user
    could read it and then submit jobs. So the file is created here first, mode 0600, with a
    token of the same strength Ray's own (256 random bits), and an existing one is tightened
    to 0600. Nothing is written when the token comes from ``RAY_AUTH_TOKEN`` or when token
    authentication is turned off. Returns the file, or None.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or \
            os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            try:
                path.chmod(0o600)
                log.warning("the Ray token file %s was readable by others (mode %o): now "
                            "0600", path, mode)
            except PermissionError:
                log.warning("the Ray token file %s is readable by others (mode %o) and not "
                            "ours to change", path, mode)
        return path
    with os.fdopen(fd, "w") as stream:
        stream.write(secrets.token_hex(32))
    return path


# Set by `ray job submit` for the driver: the job's config, its runtime env included.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The runtime env this driver adds for every worker of its job: the storage variables
    it has (:data:`csmn.data.storage.STORAGE_ENV_VARS`), once for the whole job. A runtime
    env given per task or per read instead makes Ray start a separate worker pool for it.

    Under ``ray job submit`` the job's own runtime env already reaches every worker, and Ray
    refuses a ``ray.init`` env that names one of its variables again: those are left out.
    None when nothing is left to add."""
    environ = os.environ if environ is None else environ
    submitted: dict[str, Any] = {}
    if environ.get(_JOB_CONFIG_ENV):
        try:
            config = json.loads(environ[_JOB_CONFIG_ENV])
            submitted = (config.get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            log.warning("unreadable %s; handing no storage variables on", _JOB_CONFIG_ENV)
            return None
    env = {key: environ[key] for key in STORAGE_ENV_VARS
           if environ.get(key) and key not in submitted}
    return {"env_vars": env} if env else None


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start Ray in this process (once).

    On a cluster the storage variables go to every worker of the job through the job's
    runtime env (:func:`job_runtime_env`). An in-process Ray needs none: its workers are
    children of this process's raylet and inherit this environment."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        runtime_env = job_runtime_env()
        log.info("connecting to the Ray cluster at %s%s", address,
                 f" (storage settings for the job's workers: "
                 f"{', '.join(sorted(runtime_env['env_vars']))})" if runtime_env else "")
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        return
    log.info("starting an in-process Ray (set RAY_ADDRESS to use a cluster)")
    ensure_private_token()
    ray.init(**local_ray_options(num_cpus, object_store_memory))


def local_ray_options(num_cpus: int | None = None,
                      object_store_memory: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments of the in-process Ray.

    With its dashboard: Ray Train's placement-group cleaner asks the State API, which the
    dashboard serves, whether the controller is alive once a second, and without it logs
    a warning at each ask, thousands in an hour of training. On 127.0.0.1, behind the token.
    The workers learn this cluster's address (:func:`point_the_state_api_at_this_cluster`).
    ``address="local"``: never attach to a cluster some other process left in /tmp/ray."""
    hook = f"{__name__}.{point_the_state_api_at_this_cluster.__name__}"
    return {"address": "local", "num_cpus": num_cpus,
            "object_store_memory": object_store_memory, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "log_to_driver": True,
            "runtime_env": {"worker_process_setup_hook": hook}}


def point_the_state_api_at_this_cluster() -> None:
    """Each worker's setup hook in the in-process Ray. The State API finds its cluster by
    ``RAY_ADDRESS``, else by looking for Ray processes on the machine, and refuses when it
    finds two (another job's in-process Ray, a test session's): Ray Train's placement-group
    cleaner then dies with a traceback in every training."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def warn_if_local_output_on_a_cluster(out: str, is_remote: bool) -> None:
    """A local output root is fine on one node (a laptop, the demo's head) but on a cluster
    each worker would write to its own disk: say so when more than one node is alive."""
    import ray

    if is_remote or not ray.is_initialized():
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        log.warning("--out %s is a local path on a cluster of %d nodes: workers on other nodes "
                    "write to their own disks; use s3:// or a shared mount", out, nodes)


def quiet_ray_data() -> None:
    """Ray Data logs a progress table every few seconds when stdout is not a terminal; a
    job that prints its own steps turns it off. Full logs stay in the Ray session folder."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def quiet_train_reports() -> None:
    """Ray Train's workers log every ``ray.train.report`` as a raw ``_TrainingReport`` repr
    (metrics dict, checkpoint object) and every checkpoint's path at INFO; the training loop
    prints its own line per epoch instead, and the run's checkpoints are in MLflow and the
    run folder. Called in the worker process, where those loggers live."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # another Ray layout: its logs stay as they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(storage.__name__).setLevel(logging.WARNING)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
