"""The chaos run by hand (tests/chaos/harness.py says what it does and checks):

    python -m tests.chaos.run --minutes 30 --jobs 200 --seed 1 --report chaos.json

prints the kills, the counts and every invariant's violations (the goal is none), writes them
as JSON to --report, and exits 1 if any invariant was violated."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.chaos.harness import Plan, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0, help="how long things are killed")
    ap.add_argument("--jobs", type=int, default=200, help="training jobs (plus the others)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each training job")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--home", default=None, help="the data folder (default: a new temporary one)")
    ap.add_argument("--report", default="chaos-report.json")
    a = ap.parse_args()
    home = Path(a.home or tempfile.mkdtemp(prefix="lorafleet-chaos-"))
    plan = Plan(seed=a.seed, jobs=a.jobs, minutes=a.minutes, epochs=a.epochs,
                drain_s=max(900.0, a.minutes * 60))
    print(f"chaos run: data folder {home}", flush=True)
    report = run(plan, home, log=lambda line: print(line, flush=True)).to_dict()
    Path(a.report).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("kills", "counts", "violation_counts", "seconds")},
                     indent=1))
    sys.exit(1 if any(report["violation_counts"].values()) else 0)


if __name__ == "__main__":
    main()
