"""A sweep run twice on a running fleet, its trials trained together (`pack: auto`) and each
alone (`pack: off`), one after the other: the makespan of each (from the sweep's submission to
its last trial's end), their ratio, and every trial's final training loss in both runs.

    python -m bench.gpu_pack_sweep --sweep bench/gpu_pack_sweep.yaml --model M --out r.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.gpu_team import wait_sweep
from dispatcher.cli.client import Client


def run(c: Client, body: dict[str, Any], pack: str, timeout: float) -> dict[str, Any]:
    t0 = time.time()
    sweep_id = c.create_sweep({**body, "name": f"{body['name']}-{pack}", "pack": pack,
                               "base": {**body["base"],
                                        "lora_name": f"{body['base']['lora_name']}-{pack}"}})["id"]
    info = wait_sweep(c, sweep_id, timeout)
    recs = {r["id"]: c.job(r["id"]) for r in info["rows"]}
    ends = [float(r["finished"]) for r in recs.values() if r.get("finished")]
    trials = []
    for r in info["rows"]:
        rec = recs[r["id"]]
        res = rec.get("result") or {}
        trials.append({"params": r["params"], "state": rec["state"], "pack": rec.get("pack"),
                       "final_loss": res.get("final_loss"), "steps": res.get("steps"),
                       "tokens_per_s": res.get("tokens_per_s"),
                       "peak_gpu_memory_mb": res.get("peak_gpu_memory_mb"),
                       "wall_time_s": res.get("wall_time_s")})
    return {"sweep": sweep_id, "pack": pack, "makespan_s": round(max(ends) - t0, 1),
            "summary": info["summary"], "trials": trials}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--order", default="auto,off")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import yaml

    body = yaml.safe_load(Path(a.sweep).read_text())
    body["base"]["base_model"] = a.model
    c = Client(a.url)
    out: dict[str, Any] = {}
    for pack in a.order.split(","):
        out[pack] = run(c, body, pack, a.timeout)
        print(f"pack {pack}: makespan {out[pack]['makespan_s']} s", flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))  # what a cut-short run had
    if "auto" in out and "off" in out:
        out["makespan_ratio"] = round(out["off"]["makespan_s"] / out["auto"]["makespan_s"], 2)
        print(f"makespan: pack auto {out['auto']['makespan_s']} s, pack off "
              f"{out['off']['makespan_s']} s: {out['makespan_ratio']}x")
        for x, y in zip(out["auto"]["trials"], out["off"]["trials"], strict=True):
            print(f"  {x['params']}: final loss packed {x['final_loss']} alone {y['final_loss']}"
                  f" (pack {x['pack']}, {x['state']}/{y['state']})")
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("PACKSWEEP " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
