"""Which worker can take which job: pure functions of a job record and worker heartbeats.

  - `fits`: quantised jobs need a CUDA card; a card needs as much free memory as the job's
    `gpu_memory_mb` (its estimate), and once idle as much as it has beyond what processes
    outside lorafleet hold; a CPU worker takes any other job (host memory not gated) unless
    it was started with `--memory-mb`, which gates it like a card.
  - `best_card`: among the idle workers that fit, the smallest card that is enough.
  - `sweep_full`: a sweep's trials hold at most its `max_concurrent` workers at once.
  - `waiting_reason`: what a job that no worker can take is waiting for, in words.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from dispatcher.jobs.precisions import QUANTISED


def needs_cuda(job: dict[str, Any]) -> bool:
    return (job.get("spec") or {}).get("precision") in QUANTISED


def is_cuda(worker: dict[str, Any]) -> bool:
    return str(worker.get("device", "")).startswith("cuda")


def memory_mb(worker: dict[str, Any], key: str) -> float | None:
    """A memory figure of a worker's heartbeat (MB), None when it reports none."""
    v = worker.get(key, "")
    return None if v in ("", None) else float(v)


def memory_gated(worker: dict[str, Any]) -> bool:
    """Cards are placed by memory; a CPU worker only when it advertises a cap (--memory-mb)."""
    return is_cuda(worker) or memory_mb(worker, "mem_limit_mb") is not None


def fits(job: dict[str, Any], worker: dict[str, Any], key: str = "mem_free_mb") -> bool:
    """Can `worker` take `job` now (key mem_free_mb), or once idle (key mem_total_mb: then
    `mem_usable_mb` where the worker reports it, the total less memory held outside
    lorafleet, capped by --memory-mb)?"""
    if needs_cuda(job) and not is_cuda(worker):
        return False
    if not memory_gated(worker):
        return True
    need = int(job.get("gpu_memory_mb") or 0)
    have = memory_mb(worker, key)
    if key == "mem_total_mb" and memory_mb(worker, "mem_usable_mb") is not None:
        have = memory_mb(worker, "mem_usable_mb")
    return need <= 0 or have is None or have >= need


def fits_any(job: dict[str, Any], workers: list[dict[str, Any]]) -> bool:
    """Could one of `workers` ever take `job` (once idle)?"""
    return any(fits(job, w, key="mem_total_mb") for w in workers)


def best_card(job: dict[str, Any], idle: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The idle worker to give `job`: a CUDA card before a CPU worker, and among cards the one
    with the least free memory that is enough (big cards stay free for big jobs)."""
    ok = [w for w in idle if fits(job, w)]
    if not ok:
        return None
    return min(ok, key=lambda w: (not is_cuda(w), memory_mb(w, "mem_free_mb") or math.inf,
                                  w["name"]))


def sweep_full(job: dict[str, Any], in_sweep: Counter) -> bool:
    """Is `job` a trial of a sweep that already has its `sweep_cap` trials on workers?"""
    cap = int(job.get("sweep_cap") or 0)
    return bool(job.get("sweep")) and cap > 0 and in_sweep[job["sweep"]] >= cap


def waiting_reason(job: dict[str, Any], workers: list[dict[str, Any]]) -> str:
    """Why a job that no idle worker can take is waiting."""
    need = int(job.get("gpu_memory_mb") or 0)
    if needs_cuda(job) and not any(is_cuda(w) for w in workers):
        return "waiting for a CUDA GPU worker"
    if need > 0 and (needs_cuda(job) or all(memory_gated(w) for w in workers)):
        reason = f"waiting for a card with {need} MB free"
        held = [f"{w['name']}: {int(w['outside_mb'])} MB in use outside lorafleet"
                for w in workers if (memory_mb(w, "outside_mb") or 0) > 0]
        return reason + (f" ({'; '.join(held)})" if held else "")
    return "waiting for a worker"
