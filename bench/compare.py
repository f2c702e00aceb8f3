"""The engine against the plain Hugging Face Trainer baseline, in one command on one card.

For each model shape, runs `hf_baseline.py` (NF4, LoRA r=32 on all linear layers, bf16 compute,
gradient checkpointing) plain and with `--liger 1` (the second anchor), and `bench.engine_bench`
with the same setting, each run in its own process, alternating, `--repeat` times; prints every
run, then the medians of tokens/s and peak memory and the ratios against both anchors as a
Markdown table.

    python -m bench.compare --baseline path/to/hf_baseline.py --size 8b --repeat 3 \\
        --engine "defaults=" --engine "fast=--loss fused --upcast 0 --budget-gib 17.19"

`--engine LABEL=ARGS` (repeatable) names an engine run and its lever options (engine_bench's
`--loss --batching --prepare --ckpt --budget-gib --upcast`); without any, the engine runs with
its defaults. `--no-liger` leaves the Liger anchor out (it needs liger-kernel).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time


def result_line(cmd: list[str], timeout: float) -> dict:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = round(time.monotonic() - start, 1)
            return out
    raise RuntimeError(f"{' '.join(cmd)} printed no RESULT (exit {proc.returncode}):\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")


def runs_of(a: argparse.Namespace, size: str) -> list[tuple[str, list[str]]]:
    """(label, command) of every run of one round, in the order they alternate."""
    common = ["--size", size, "--bs", str(a.bs), "--seq", str(a.seq), "--steps", str(a.steps)]
    runs = [("HF", [sys.executable, a.baseline, *common])]
    if not a.no_liger:
        runs.append(("HF+Liger", [sys.executable, a.baseline, *common, "--liger", "1"]))
    # The baseline leaves its model in /tmp/models/<size>; a data folder at /tmp makes the
    # engine train that very folder (the small tokenizer is added to it).
    engine = [sys.executable, "-m", "bench.engine_bench", "--precision", "4bit", "--home", "/tmp",
              *common]
    for spec in a.engine or ["lorafleet="]:
        label, _, args = spec.partition("=")
        runs.append((label, engine + shlex.split(args)))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="path to hf_baseline.py")
    ap.add_argument("--size", action="append", default=None, choices=["1b", "8b"])
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 untimed)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each runs every run once")
    ap.add_argument("--engine", action="append", default=None, metavar="LABEL=ARGS")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    table = []
    gpu = ""
    for size in a.size or ["1b"]:
        results: dict[str, list[dict]] = {}
        for _ in range(a.repeat):
            for label, cmd in runs_of(a, size):
                out = result_line(cmd, a.timeout)
                gpu = out.get("gpu", gpu)
                results.setdefault(label, []).append(out)
                print("RESULT " + json.dumps({"size": size, "run": label, **out}), flush=True)
        table.append((size, results))
    print(f"\n{gpu}, NF4 4-bit, LoRA r=32 all linear, batch {a.bs} x {a.seq}, medians of "
          f"{a.repeat}\n")
    print("| shape | run | tokens/s (each run) | median | × HF | × HF+Liger | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for size, results in table:
        med = {label: statistics.median(r["tokens_per_s"] for r in runs)
               for label, runs in results.items()}
        for label, runs in results.items():
            each = " / ".join(f"{r['tokens_per_s']:,}" for r in runs)
            liger = f"{med[label] / med['HF+Liger']:.2f}" if "HF+Liger" in med else "—"
            peak = statistics.median(r["peak_gib"] for r in runs)
            print(f"| {size} | {label} | {each} | {med[label]:,.0f} | "
                  f"{med[label] / med['HF']:.2f} | {liger} | {peak} |")


if __name__ == "__main__":
    main()
