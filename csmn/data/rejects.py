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

# The store could not be reached (it outlived every retry, csmn.data.storage): the record may
# be fine, and ``--retry-rejects`` tries these again; every other code is final.
TRANSIENT_IO = "transient_io"
TRANSIENT_CODES = frozenset({TRANSIENT_IO})


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


def write_reject_part(rows: Sequence[dict[str, Any]], directory: str, key: str) -> str | None:
    """One Parquet part of ``rows`` under ``directory``, named by a digest of ``key`` (where
    the rows come from: a source's batch, a user) and of the rows, so that a retried task
    overwrites its own part instead of adding a second one. Returns its URI."""
    if not rows:
        return None
    name = parts_digest([key, *(f"{r['record_id']}|{r['source']}|{r['reason']}" for r in rows)])
    uri = storage.join(directory, f"part-{name}.parquet")
    storage.write_parquet(uri, conform(list(rows), "reject"))
    return uri


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


def forget_transient_rejects(root: str, stage: str) -> int:
    """Drop the stage's transient rejects, so that a rerun tries those records again; the
    others stay. The kept rows are written as a new part before the old parts go: a crash in
    between leaves a row twice, never a final reject lost. Returns how many were dropped."""
    directory = layout.rejects_dir(root, stage)
    parts = storage.list_files(directory, suffix=".parquet")
    if not parts:
        return 0
    rows = read_rejects(root, stage)
    kept = [row for row in rows if not is_transient_reason(row["reason"])]
    if len(kept) == len(rows):
        return 0
    survivor = write_reject_part(kept, directory, "kept-after-retry")
    for part in parts:
        if part != survivor:
            storage.delete(part)
    return len(rows) - len(kept)


def reason_code(reason: str) -> str:
    """Reasons are written ``code: detail``; summaries count by the code."""
    return reason.split(":", 1)[0].strip()


def is_transient_reason(reason: str) -> bool:
    return reason_code(reason) in TRANSIENT_CODES


def transient_reason(err: BaseException) -> str:
    """The reason of a record lost to a transient storage error."""
    return f"{TRANSIENT_IO}: {type(err).__name__}: {err}"


def count_rejects(root: str, stage: str) -> Counter[str]:
    """Reject counts by reason code for one stage."""
    return Counter(reason_code(row["reason"]) for row in read_rejects(root, stage))
