"""The fuzz run's figures: per property, the cases tried, the requests sent, the refusals among
them, the answers of 500 or more and the bytes written on refusals (both 0 in a passing run).
A property that does not measure what a refusal wrote says so: its bytes read "n/a" (and
"B of M" where only M of its refusals were measured), never a 0 it did not count.

Every fuzz property counts into `TALLY` of its own process. Under pytest-xdist each worker hands
its counts to the controller (tests/conftest.py wires the three hooks below), which prints one
table after the run and, with `LORAFLEET_FUZZ_REPORT=PATH`, writes them as JSON to PATH.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from typing import Any

FIELDS = ("cases", "requests", "refusals", "status_5xx", "bytes_written_on_refusals",
          "refusals_measured")
WORKER_KEY = "lorafleet_fuzz_tally"

TALLY: dict[str, Counter] = defaultdict(Counter)


def case(prop: str) -> None:
    """One example of property `prop` ran."""
    TALLY[prop]["cases"] += 1


def answer(prop: str, status: int, refused: bool, bytes_written: int | None = None) -> None:
    """One request of property `prop` was answered with `status`; `bytes_written`: what it
    wrote, as the harness's snapshots measured it (None: not measured)."""
    t = TALLY[prop]
    t["requests"] += 1
    t["refusals"] += refused
    t["status_5xx"] += status >= 500
    if refused and bytes_written is not None:
        t["bytes_written_on_refusals"] += bytes_written
        t["refusals_measured"] += 1


def bytes_shown(row: dict[str, int]) -> str:
    """The bytes written on refusals as the table shows them: "n/a" where none was measured."""
    if row["refusals_measured"] == row["refusals"]:
        return str(row["bytes_written_on_refusals"])
    if row["refusals_measured"] == 0:
        return "n/a"
    return f"{row['bytes_written_on_refusals']} of {row['refusals_measured']}"


def merge(into: dict[str, Counter], other: dict[str, dict[str, int]]) -> None:
    for prop, counts in other.items():
        into.setdefault(prop, Counter()).update(counts)


def as_json(tally: dict[str, Counter]) -> dict[str, dict[str, int]]:
    return {prop: {f: int(c.get(f, 0)) for f in FIELDS} for prop, c in sorted(tally.items())}


def grouped(detail: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Counts by property: "routes accounts | POST /api/v1/jobs" counts under
    "routes accounts" (the part before " | " names the property, the rest one case of it)."""
    out: dict[str, dict[str, int]] = {}
    for prop, counts in detail.items():
        row = out.setdefault(prop.split(" | ")[0], dict.fromkeys(FIELDS, 0))
        for f in FIELDS:
            row[f] += counts[f]
    return out


# -- pytest hooks (wired in tests/conftest.py) ---------------------------------------------------
_FROM_WORKERS: dict[str, Counter] = defaultdict(Counter)


def sessionfinish(session: Any) -> None:
    """On an xdist worker: hand this process's counts to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[WORKER_KEY] = json.dumps(as_json(TALLY))


def testnodedown(node: Any) -> None:
    """On the xdist controller: a worker's counts arrived."""
    raw = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    if raw:
        merge(_FROM_WORKERS, json.loads(raw))


def terminal_summary(terminalreporter: Any) -> None:
    tally: dict[str, Counter] = defaultdict(Counter)
    merge(tally, as_json(TALLY))
    merge(tally, as_json(_FROM_WORKERS))
    if not tally:
        return
    detail = as_json(tally)
    rows = grouped(detail)
    totals = {f: sum(r[f] for r in rows.values()) for f in FIELDS}
    tr = terminalreporter
    tr.section("fuzz figures")
    width = max(len(p) for p in rows) + 2
    tr.write_line(f"{'property':<{width}}" + "".join(f"{f:>14}" for f in
                                                      ("cases", "requests", "refusals", "5xx",
                                                       "bytes_on_ref")))
    shown = ("cases", "requests", "refusals", "status_5xx")
    for prop, r in rows.items():
        tr.write_line(f"{prop:<{width}}" + "".join(f"{r[f]:>14}" for f in shown)
                      + f"{bytes_shown(r):>14}")
    tr.write_line(f"{'total':<{width}}" + "".join(f"{totals[f]:>14}" for f in shown)
                  + f"{bytes_shown(totals):>14}")
    path = os.environ.get("LORAFLEET_FUZZ_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"properties": rows, "total": totals, "detail": detail}, f, indent=1)
        tr.write_line(f"fuzz figures written to {path}")
