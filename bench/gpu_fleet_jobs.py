"""Drive a running fleet (`lorafleet up` on a GPU machine) through the engine's GPU cases:
4-bit, 8-bit and bf16 training, a stop and a resume from the checkpoint, perplexity with and
without the LoRA, generation, and an out-of-memory job followed by a good one on the same
worker. Prints one summary line per job and writes the details as JSON.

    python -m bench.gpu_fleet_jobs --url http://127.0.0.1:8765 --model llama-3.2-1b-random \
        --out summary.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dispatcher.cli.client import Client
from dispatcher.jobs.states import TERMINAL_VALUES

BASE = {"dataset": "alpaca-sample", "format": "alpaca-format", "lora_rank": 16,
        "lora_alpha": 32, "target_modules": ["all"], "micro_batch_size": 4, "batch_size": 8,
        "epochs": 2, "learning_rate": "2e-4", "warmup_steps": 2, "cutoff_len": 256}


def wait(c: Client, job: str, timeout: float = 400) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = c.job(job)
        if rec["state"] in TERMINAL_VALUES:
            return rec
        time.sleep(1)
    raise TimeoutError(job)


def summary(c: Client, label: str, job: str, rec: dict[str, Any]) -> dict[str, Any]:
    events = c.history(job)
    train = [e for e in events if e.get("type") == "train"]
    res = rec.get("result") or {}
    row = {"label": label, "job": job, "state": rec["state"], "reason": rec.get("reason"),
           "worker": rec.get("worker"), "steps": [train[0]["step"], train[-1]["step"]] if train else None,
           "total_steps": rec.get("total_steps"),
           "first_loss": train[0]["loss"] if train else None,
           "last_loss": train[-1]["loss"] if train else None,
           "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
           "gpu_mem_mb": max((e.get("gpu_mem_mb") or 0) for e in train) if train else None,
           "wall_s": round(float(rec.get("finished", 0)) - float(rec.get("started", 0) or 0), 1)}
    for key in ("perplexity", "resumed_from", "peak_gpu_memory_mb", "precision"):
        if key in res:
            row[key] = res[key]
    if "base" in res:
        row["answers"] = {"base": res["base"]["text"][:120],
                          "lora": (res.get("lora") or {}).get("text", "")[:120]}
    print(json.dumps(row), flush=True)
    return row


def run_job(c: Client, label: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    job = c.submit(spec, kind=kind)
    return summary(c, label, job, wait(c, job))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    c = Client(a.url)
    base = {**BASE, "base_model": a.model}
    rows = []
    for precision in ("4bit", "8bit", "bf16"):
        rows.append(run_job(c, f"train {precision}", "train",
                            {**base, "lora_name": f"gpu-{precision}", "precision": precision}))

    # Stop a 4-bit run after a few steps, then resume it from the checkpoint the stop wrote.
    spec = {**base, "lora_name": "gpu-resume", "precision": "4bit", "epochs": 3, "save_steps": 5}
    job = c.submit(spec)
    while (c.job(job).get("step") or 0) < 4 and c.job(job)["state"] not in TERMINAL_VALUES:
        time.sleep(0.5)
    c.cancel(job)
    rows.append(summary(c, "stopped", job, wait(c, job)))
    rows.append(run_job(c, "resumed", "train", {**spec, "resume_from_checkpoint": "latest"}))
    rows.append(run_job(c, "uninterrupted", "train", {**spec, "lora_name": "gpu-straight"}))

    for loras in ([], ["gpu-4bit"]):
        rows.append(run_job(c, f"perplexity {loras or 'base'}", "evaluate",
                            {"base_model": a.model, "loras": loras,
                             "text_file": "alpaca-heldout.txt", "stride": 256,
                             "max_length": 512, "force": True}))
    rows.append(run_job(c, "generate", "generate",
                        {"base_model": a.model, "lora": "gpu-4bit", "format": "alpaca-format",
                         "prompt": "Who founded Marrowby?", "temperature": 0,
                         "max_new_tokens": 24}))

    # Far beyond any card: 64 samples of 8192 tokens at once in bf16 (the logits alone would
    # take ~270 GB). Then a good job on the same worker.
    rows.append(run_job(c, "out of memory", "train",
                        {**base, "lora_name": "gpu-oom", "precision": "bf16", "dataset": "long",
                         "format": "text", "micro_batch_size": 64, "batch_size": 64,
                         "cutoff_len": 8192, "epochs": 1}))
    rows.append(run_job(c, "after the OOM", "train",
                        {**base, "lora_name": "gpu-after-oom", "precision": "4bit", "epochs": 1}))
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
