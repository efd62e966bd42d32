"""A lease in the store itself: one holder at a time for a short critical section.

Two runs of the nightly job may overlap (the KubeRay RayCronJob has no concurrency policy),
and both commit predictions into the same output. The commit step runs under this lease, so
that its check "which posts are committed already" and its write are never interleaved with
another run's.

The lease is one small JSON object created only if absent (:func:`storage.create_if_absent`:
a hard link on a local disk, a conditional ``PutObject`` on S3). It names its holder and
expires: a holder that died leaves a lease that the next run breaks once it has expired.
Holders keep their critical sections far shorter than the expiry, and check before they write
that the lease is still theirs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from csmn.data import storage

log = logging.getLogger(__name__)


class LeaseHeld(TimeoutError):
    """Another holder kept the lease for longer than we were willing to wait."""


class LeaseLost(RuntimeError):
    """The lease expired while held and another holder broke it."""


@dataclass(frozen=True)
class Lease:
    uri: str
    owner: str
    expires_at: float


def _read(uri: str) -> dict[str, Any] | None:
    """The lease's body, None when there is none. A store that cannot answer raises: a lease
    that could not be read is never taken for an expired one (breaking a live lease lets two
    runs commit at once). A body that is not JSON, which the atomic writes never leave, reads
    as expired."""
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def acquire(uri: str, ttl_s: float, wait_s: float, poll_s: float = 0.5,
            owner: str | None = None) -> Lease:
    """Take the lease at ``uri`` for ``ttl_s`` seconds, waiting up to ``wait_s`` for the
    current holder; an expired lease is broken."""
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    while True:
        expires_at = time.time() + ttl_s
        body = json.dumps({"owner": owner, "expires_at": expires_at}).encode()
        if storage.create_if_absent(uri, body):
            return Lease(uri, owner, expires_at)
        try:
            current = _read(uri)
        except OSError as err:  # unknown: as if held, until the store answers or we give up
            log.warning("could not read the lease %s (%s); waiting", uri, err)
            current = {"owner": "unknown (unreadable)", "expires_at": float("inf")}
        if current is not None and float(current.get("expires_at", 0)) < time.time():
            log.warning("breaking the expired lease %s of %s", uri, current.get("owner"))
            storage.delete(uri)
            continue
        if time.monotonic() > deadline:
            raise LeaseHeld(f"{uri} is held by {(current or {}).get('owner')} (expires "
                            f"{(current or {}).get('expires_at')}); waited {wait_s:.0f} s")
        time.sleep(poll_s)


def still_held(lease: Lease) -> bool:
    current = _read(lease.uri)
    return bool(current) and current.get("owner") == lease.owner and \
        lease.expires_at > time.time()


def renewed(lease: Lease, ttl_s: float) -> Lease:
    """``lease`` with ``ttl_s`` from now, rewritten once a third of it has passed: a holder
    with a long critical section calls this between steps. Raises when it is no longer
    ours (it expired and another run broke it): the step must not be done."""
    if not still_held(lease):
        raise LeaseLost(f"lost the lease {lease.uri} (it expired and another run broke it): "
                        "raise the lease's time to live")
    if lease.expires_at - time.time() > ttl_s * 2 / 3:
        return lease
    expires_at = time.time() + ttl_s
    storage.write_bytes(lease.uri, json.dumps({"owner": lease.owner,
                                               "expires_at": expires_at}).encode())
    return Lease(lease.uri, lease.owner, expires_at)


def release(lease: Lease) -> None:
    try:
        current = _read(lease.uri)
    except OSError as err:  # it expires by itself
        log.warning("could not release the lease %s (%s): it expires at %.0f", lease.uri, err,
                    lease.expires_at)
        return
    if current and current.get("owner") == lease.owner:
        storage.delete(lease.uri)


@contextmanager
def held(uri: str, ttl_s: float = 600.0, wait_s: float = 900.0) -> Iterator[Lease]:
    lease = acquire(uri, ttl_s, wait_s)
    try:
        yield lease
    finally:
        release(lease)


__all__ = ["Lease", "LeaseHeld", "LeaseLost", "acquire", "held", "release", "renewed",
           "still_held"]
