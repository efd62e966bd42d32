"""What the reliability tests tried, for the one summary the suite prints at its end
(``pytest_terminal_summary`` in tests/conftest.py): bad inputs by kind, faults injected, and
the records that went in, came out, were rejected and were lost (which must stay 0).

A plain module, imported as ``reliability_tally`` by the tests of this folder; the hook finds
it in ``sys.modules`` and prints nothing when no reliability test ran.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping

bad_inputs: Counter[str] = Counter()
faults: Counter[str] = Counter()
records: Counter[str] = Counter()


def bad_input(kind: str, count: int = 1) -> None:
    bad_inputs[kind] += count


def bad_kinds(kinds: Mapping[str, int] | Iterable[str]) -> None:
    """Several kinds at once: a mapping of kind -> count, or kinds tried once each."""
    items = kinds.items() if isinstance(kinds, Mapping) else ((k, 1) for k in kinds)
    for kind, count in items:
        bad_inputs[kind] += count


def fault(name: str, count: int = 1) -> None:
    faults[name] += count


def balance(records_in: int, out: int, rejected: int) -> int:
    """Add one stage run's balance; returns what it lost (in - out - rejected)."""
    lost = records_in - out - rejected
    records.update({"in": records_in, "out": out, "rejected": rejected, "lost": lost})
    return lost


def lines() -> list[str]:
    if not (bad_inputs or faults or records):
        return []
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(bad_inputs.items()))
    injected = ", ".join(f"{k} {n}" for k, n in sorted(faults.items()))
    return [
        f"bad inputs tried: {sum(bad_inputs.values())} of {len(bad_inputs)} kinds",
        *textwrap.wrap(kinds, 96, initial_indent="  ", subsequent_indent="  "),
        f"faults injected: {sum(faults.values())}" + (f" ({injected})" if injected else ""),
        f"records: in {records['in']}, out {records['out']}, rejected {records['rejected']}, "
        f"lost {records['lost']}",
    ]
