"""Whether a data root is complete enough for a stage to start, in one place.

A stage that starts from a root some earlier stage left half-written would train on part of
the data, or fail an hour later; so every stage that reads a data root checks it first and
refuses, naming the stage to rerun, before it writes anything:

- preprocessing writes ``manifest.json`` last (a rerun deletes it first), so a root without
  one was never finished. A manifest whose ``digest`` does not match its content was cut or
  edited; every examples folder, vocabulary and context table it names must be there.
- feature extraction marks ``features/<layer>/_meta.json`` ``running`` when it starts and
  ``complete`` when every image is written or rejected; parts without it have no known
  weights.

The error is :class:`IncompleteRoot` (a ``ValueError``); the command lines turn it into exit
code 2 (:func:`exit_code_2`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from csmn.data import layout, storage

COMPLETE = "complete"


class IncompleteRoot(ValueError):
    """A data root a stage cannot start from; the message says what to rerun."""


def _shown(root: str) -> str:
    from csmn.config import redact_text

    return redact_text(root)


def _manifest_problem(root: str) -> tuple[dict[str, Any] | None, str | None]:
    uri = layout.manifest_uri(root)
    if not storage.exists(uri):
        return None, (f"no {layout.MANIFEST_FILE}: preprocessing did not finish there "
                      "(or is running)")
    try:
        manifest = storage.read_json(uri)
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"{layout.MANIFEST_FILE} is not JSON ({err})"
    if not isinstance(manifest, dict):
        return None, f"{layout.MANIFEST_FILE} is not an object"
    digest = manifest.get("digest")
    if digest is not None and digest != layout.content_digest(manifest):
        return None, f"{layout.MANIFEST_FILE} does not match its digest (cut short or edited)"
    missing = [relative for relative in _named_files(manifest)
               if not _present(storage.join(root, relative))]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return None, f"{', '.join(missing[:3])}{more} named by the manifest are missing"
    return manifest, None


def _named_files(manifest: dict[str, Any]) -> list[str]:
    """The paths (relative to the root) of what the manifest says preprocessing wrote."""
    named: list[str] = []
    for task, splits in (manifest.get("splits") or {}).items():
        for split, counts in (splits or {}).items():
            if isinstance(counts, dict) and counts.get("posts"):
                named.append("/".join(("examples", task, split)))
    for entry in (manifest.get("vocab") or {}).values():
        if isinstance(entry, dict) and entry.get("path"):
            named.append(str(entry["path"]))
    for entry in (manifest.get("contexts") or {}).values():
        if isinstance(entry, dict) and entry.get("path") and entry.get("users"):
            named.append(str(entry["path"]))
    return named


def _present(uri: str) -> bool:
    """A file the manifest names exists; a folder it names holds Parquet parts."""
    if uri.endswith((".json", ".parquet")):
        return storage.exists(uri)
    return bool(storage.list_files(uri, suffix=".parquet"))


def features_problem(root: str, layer: str) -> str | None:
    uri = layout.features_meta_uri(root, layer)
    if not storage.exists(uri):
        if storage.list_files(layout.features_dir(root, layer), suffix=".parquet"):
            return f"features/{layer} has parts but no {layout.FEATURES_META_FILE}"
        return f"no {layer} features"
    try:
        meta = storage.read_json(uri)
    except (ValueError, UnicodeDecodeError) as err:
        return f"features/{layer}/{layout.FEATURES_META_FILE} is not JSON ({err})"
    status = meta.get("status") if isinstance(meta, dict) else None
    if status != COMPLETE:
        return (f"{layer} feature extraction did not finish (status {status!r}: killed, "
                "or still running)")
    return None


def require_data_root(root: str, stage: str, layers: Iterable[str] = ()) -> dict[str, Any]:
    """The manifest of ``root`` when preprocessing (and extraction of ``layers``) finished
    there; else :class:`IncompleteRoot`, naming the stage to rerun. Reads only."""
    if not root:
        raise IncompleteRoot(f"{stage}: --data is required: the data root written by "
                             "preprocessing")
    manifest, problem = _manifest_problem(root)
    if problem:
        raise IncompleteRoot(f"{stage}: the data root {_shown(root)} is incomplete: {problem}. "
                             f"Rerun preprocess (csmn preprocess --out {_shown(root)}), then "
                             f"{stage}.")
    for layer in dict.fromkeys(layers):
        problem = features_problem(root, layout.check_layer(layer))
        if problem:
            raise IncompleteRoot(
                f"{stage}: the data root {_shown(root)} is incomplete: {problem}. Rerun "
                f"extract-features (csmn extract-features --data {_shown(root)} --layer "
                f"{layer}), then {stage}.")
    assert manifest is not None
    return manifest


def exit_code_2(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a command's ``main``: an incomplete root, or a configuration that cannot run
    (:class:`csmn.config.ConfigError`: the config file, a field, a value), is one line and
    exit code 2, as argparse answers a bad flag, not a traceback: a scheduler can tell a
    refusal from a crash."""
    from csmn.config import ConfigError

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except IncompleteRoot as err:
                print(f"{prog}: refused: {err}", file=sys.stderr, flush=True)
                return 2
            except ConfigError as err:
                print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
                return 2

        return wrapper

    return wrap
