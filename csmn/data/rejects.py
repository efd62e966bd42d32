"""Records a stage could not use go to ``<root>/rejects/<stage>/`` with a reason, never nowhere.

Rows follow ``schemas/reject.json``; a reason reads ``code: detail`` (``bad_json: Expecting
value at line 1``) so that summaries can count by code. Stages collect them (in Ray Data, as
a second output of a map) and write them with :func:`write_rejects`; summaries count them
with :func:`count_rejects` so that records in = records out + records rejected can be checked.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from csmn.data import layout, storage
from csmn.data.schemas import conform, validate

PAYLOAD_LIMIT = 2000


def reject_row(
    stage: str,
    reason: str,
    record_id: str | None = None,
    source: str | None = None,
    payload: Any = None,
) -> dict[str, Any]:
    if payload is not None and not isinstance(payload, str):
        payload = json.dumps(payload, default=str, ensure_ascii=False)
    if payload is not None and len(payload) > PAYLOAD_LIMIT:
        payload = payload[:PAYLOAD_LIMIT] + "…"
    return {
        "stage": stage,
        "record_id": None if record_id is None else str(record_id),
        "reason": reason,
        "source": source,
        "payload": payload,
        "rejected_at": datetime.now(UTC),
    }


def parts_digest(parts: Iterable[str]) -> str:
    """A short digest of ``parts`` in order: names of files a retried task rewrites."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def write_reject_part(rows: Sequence[dict[str, Any]], directory: str, key: str) -> None:
    """One Parquet part of ``rows`` under ``directory``, named by a digest of ``key`` (where
    the rows come from: a source's batch, a user) and of the rows, so that a retried task
    overwrites its own part instead of adding a second one."""
    if rows:
        name = parts_digest([key, *(f"{r['record_id']}|{r['source']}|{r['reason']}"
                                    for r in rows)])
        storage.write_parquet(storage.join(directory, f"part-{name}.parquet"),
                              conform(list(rows), "reject"))


def write_rejects(root: str, stage: str, rows: list[dict[str, Any]]) -> str | None:
    """Write one Parquet part of reject rows; returns its URI (None when there is nothing)."""
    if not rows:
        return None
    uri = storage.join(layout.rejects_dir(root, stage), f"part-{uuid.uuid4().hex[:12]}.parquet")
    storage.write_parquet(uri, conform(rows, "reject"))
    return uri


def read_rejects(root: str, stage: str) -> list[dict[str, Any]]:
    directory = layout.rejects_dir(root, stage)
    if not storage.list_files(directory, suffix=".parquet"):
        return []
    return validate(storage.read_parquet(directory), "reject").to_pylist()


def reason_code(reason: str) -> str:
    """Reasons are written ``code: detail``; summaries count by the code."""
    return reason.split(":", 1)[0].strip()


def count_rejects(root: str, stage: str) -> Counter[str]:
    """Reject counts by reason code for one stage."""
    return Counter(reason_code(row["reason"]) for row in read_rejects(root, stage))
