"""The registry side of promotion: versions, the ``champion`` alias, its history, the
decision tags and the promotion run.

MLflow aliases keep no history, so every move of ``champion`` is recorded as one tag of the
registered model, ``csmn.champion.<sequence>`` = JSON ``{"version", "previous", "action",
"at"}``: one tag per move keeps each value small however long the history grows, and
replaying them in order gives the stack of champions that ``--rollback`` pops.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from csmn.tracking.runs import finished_or_failed, get_or_create_experiment, log_metrics

CHAMPION = "champion"
HISTORY_PREFIX = "csmn.champion."
PROMOTION_EXPERIMENT = "csmn-promotion"
# Written by training: the image features came from a ResNet-101 with random weights.
RANDOM_FEATURES_TAG = "csmn.random_features"


class Refused(Exception):
    """A promotion that cannot go ahead; nothing was changed."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def open_client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri)


def _missing(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def registered_model(client: MlflowClient, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _missing(err):
            raise Refused(f"no registered model {name!r}") from err
        raise


def model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """``version`` is a number or ``latest`` (the highest number)."""
    registered_model(client, name)
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise Refused(f"{name} has no versions")
        return max(versions, key=lambda v: int(v.version))
    try:
        return client.get_model_version(name, str(int(version)))
    except ValueError as err:
        raise Refused(f"--candidate must be a version number or 'latest', got {version!r}") from err
    except MlflowException as err:
        if _missing(err):
            raise Refused(f"{name} has no version {version}") from err
        raise


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if _missing(err):
            return None
        raise


def check_first_champion(client: MlflowClient, name: str) -> None:
    """A model without ``champion`` is promoted without a comparison only if it never had
    one: MLflow drops the alias with a deleted version, and the next candidate would
    otherwise pass the gate unopposed."""
    earlier = champion_stack(history(client, name))
    if earlier:
        raise Refused(f"{name} has no @{CHAMPION}, but its history records champions (latest "
                      f"v{earlier[-1]}): the version was deleted or the alias removed outside "
                      f"csmn promote. Set @{CHAMPION} to the version to compare against "
                      f"(client.set_registered_model_alias), then promote again")


def uses_random_features(client: MlflowClient, version: ModelVersion) -> bool:
    """The version's tag, else its training run's (older versions carry it on the run only)."""
    if version.tags.get(RANDOM_FEATURES_TAG) is not None:
        return version.tags[RANDOM_FEATURES_TAG] == "true"
    if version.run_id:
        return client.get_run(version.run_id).data.tags.get(RANDOM_FEATURES_TAG) == "true"
    return False


def history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every move of ``champion``, oldest first."""
    tags = registered_model(client, name).tags
    keys = sorted(k for k in tags if k.startswith(HISTORY_PREFIX))
    return [json.loads(tags[k]) for k in keys]


def champion_stack(entries: list[dict[str, Any]]) -> list[str]:
    """The champions in order, each rollback popping the latest promotion."""
    stack: list[str] = []
    for entry in entries:
        if entry["action"] == "rollback":
            stack.pop()
        else:
            stack.append(str(entry["version"]))
    return stack


def move_champion(client: MlflowClient, name: str, version: str, previous: str | None,
                  action: str) -> dict[str, Any]:
    entry = {"version": version, "previous": previous, "action": action, "at": now()}
    sequence = len(history(client, name))
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{sequence:06d}", json.dumps(entry))
    return entry


def rollback_target(client: MlflowClient, name: str) -> tuple[str, str]:
    """(the champion before the current one, the current one), or Refused."""
    current = champion(client, name)
    stack = champion_stack(history(client, name))
    if current is None or len(stack) < 2:
        raise Refused(f"{name}: no earlier champion recorded to roll back to")
    if stack[-1] != str(current.version):
        raise Refused(f"{name}: champion v{current.version} was set outside csmn promote; "
                      "its history cannot say what came before")
    try:
        client.get_model_version(name, stack[-2])
    except MlflowException as err:
        if _missing(err):
            raise Refused(f"{name}: the champion before v{stack[-1]}, v{stack[-2]}, was "
                          "deleted: nothing to roll back to") from err
        raise
    return stack[-2], stack[-1]


def rollback(client: MlflowClient, name: str, lock_timeout_s: float = 600.0) -> dict[str, Any]:
    """Move ``champion`` back to the champion before the current one, under the promotion
    lock: a promotion recording its move at the same moment would otherwise read the same
    history and write its entry under the same number."""
    with promotion_lock(client, name, timeout_s=lock_timeout_s):
        target, current = rollback_target(client, name)
        return move_champion(client, name, target, current, "rollback")


def tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


LOCK_SUFFIX = "--promotion-lock"
# A lock older than this belongs to a promotion that died holding it.
STALE_LOCK_SECONDS = 3600.0


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str, timeout_s: float = 600.0,
                   poll_s: float = 0.5) -> Iterator[None]:
    """Mutual exclusion between promotions of ``name``, in whatever store the registry is
    (SQLite, a database, an MLflow server): creating a registered model is atomic and
    refused when the name exists, so the lock is a registered model of its own,
    ``<name>--promotion-lock``, deleted on release. A lock left by a dead process expires."""
    lock = name + LOCK_SUFFIX
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"csmn.lock.holder": f"{socket.gethostname()}:{os.getpid()}",
                            "csmn.lock.since": str(time.time())},
                description=f"held while a promotion of {name} records its decision")
            break
        except MlflowException as err:
            # "does not exist": the holder released it between our insert and the store's
            # look-up of the name; try again.
            if err.error_code != "RESOURCE_ALREADY_EXISTS" and not _missing(err):
                raise
        _break_if_stale(client, lock)
        if time.monotonic() > deadline:
            raise Refused(f"another promotion of {name} holds {lock} (waited {timeout_s:.0f} s)")
        time.sleep(poll_s)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _break_if_stale(client: MlflowClient, lock: str) -> None:
    try:
        since = float(client.get_registered_model(lock).tags.get("csmn.lock.since", "0"))
        if time.time() - since > STALE_LOCK_SECONDS:
            client.delete_registered_model(lock)
    except MlflowException as err:
        if not _missing(err):
            raise


def tag_decision(client: MlflowClient, name: str, candidate: str, champion: str | None,
                 decision: dict[str, Any]) -> None:
    """The decision on both versions: ``csmn.promotion.*`` on the candidate, and
    ``csmn.challenge.*`` on the champion it was compared with. The latest decision wins."""
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in decision.items()}
    for key, value in values.items():
        client.set_model_version_tag(name, candidate, f"csmn.promotion.{key}", value)
        if champion is not None:
            client.set_model_version_tag(name, champion, f"csmn.challenge.{key}", value)


def download_predictions(client: MlflowClient, run_id: str, work_dir: str) -> str:
    """The evaluation run's predictions.parquet, downloaded into ``work_dir``."""
    return client.download_artifacts(run_id, "report/predictions.parquet", work_dir)


def log_promotion_run(tracking_uri: str, name: str, decision: dict[str, Any],
                      report_markdown: str) -> str:
    """One run per decision in the ``csmn-promotion`` experiment: the comparison as metrics,
    the decision as tags, the report as an artifact."""
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(tracking_uri, PROMOTION_EXPERIMENT)
    tags = {"csmn.kind": "promotion", "csmn.registered_model": name,
            **{f"csmn.{k}": str(decision[k]) for k in
               ("candidate", "champion", "decision", "metric", "split", "data_digest")}}
    run = client.create_run(experiment_id, run_name=f"promote-{name}-v{decision['candidate']}",
                            tags=tags)
    with finished_or_failed(tracking_uri, run.info.run_id):
        numbers = {k: v for k, v in (decision.get("comparison") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        log_metrics(tracking_uri, run.info.run_id, numbers, step=0)
        with tempfile.TemporaryDirectory(prefix="csmn-promotion-") as directory:
            for file_name, text in (("promotion.md", report_markdown),
                                    ("promotion.json", json.dumps(decision, indent=2))):
                with open(os.path.join(directory, file_name), "w", encoding="utf-8") as handle:
                    handle.write(text)
            client.log_artifacts(run.info.run_id, directory, artifact_path="report")
    return run.info.run_id
