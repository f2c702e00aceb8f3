"""The engine against the plain Hugging Face Trainer baseline, in one command on one card.

For each model shape, runs `hf_baseline.py` (NF4, LoRA r=32 on all linear layers, bf16 compute,
gradient checkpointing) and `bench.engine_bench` with the same setting, each in its own process,
and prints tokens/s, peak memory and the ratios (lorafleet / baseline) as a Markdown table.

    python -m bench.compare --baseline path/to/hf_baseline.py --size 1b --size 8b --bs 2 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def result_line(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(cmd)} printed no RESULT (exit {proc.returncode}):\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="path to hf_baseline.py")
    ap.add_argument("--size", action="append", default=None, choices=["1b", "8b"])
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 untimed)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    rows = []
    for size in a.size or ["1b"]:
        common = ["--size", size, "--bs", str(a.bs), "--seq", str(a.seq), "--steps", str(a.steps)]
        for _ in range(a.repeat):
            base = result_line([sys.executable, a.baseline, *common], a.timeout)
            # The baseline leaves its model in /tmp/models/<size>; a data folder at /tmp makes
            # the engine train that very folder (the small tokenizer is added to it).
            ours = result_line([sys.executable, "-m", "bench.engine_bench", "--precision",
                                "4bit", "--home", "/tmp", *common], a.timeout)
            rows.append((size, base, ours))
            print("RESULT " + json.dumps({"baseline": base, "lorafleet": ours}), flush=True)
    print(f"\n{rows[0][1]['gpu']}, NF4 4-bit, LoRA r=32 all linear, batch {a.bs} x {a.seq}\n")
    print("| shape | baseline tokens/s | lorafleet tokens/s | ratio | baseline peak GiB | "
          "lorafleet peak GiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for size, b, o in rows:
        print(f"| {size} | {b['tokens_per_s']:,} | {o['tokens_per_s']:,} | "
              f"{o['tokens_per_s'] / b['tokens_per_s']:.2f} | {b['peak_gib']} | {o['peak_gib']} | "
              f"{o['peak_gib'] / b['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
