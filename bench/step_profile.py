"""Where a training step's GPU time goes: the engine as `bench.engine_bench` runs it, with
torch's profiler around a few steps after the warm-up.

    python -m bench.step_profile --size 8b --bs 2 --seq 2048 --loss fp32_logits

Prints the step's wall time, the GPU's busy time in it (the sum of kernel times; a gap between
the two is time the GPU waited for the CPU), the time per kind of kernel (matrix products,
NF4 dequantisation, attention, element-wise, ...), the 25 costliest kernels, and the 30
operations that take most of the CPU's own time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from bench.engine_bench import add_lever_options

# Kernel name fragments -> the kind of work, first match wins.
KINDS = (
    ("dequant", ("dequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "ampere_", "sm80_")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("reduce", ("reduce", "norm")),
    ("copy/cast", ("copy", "cast", "fill", "cat", "index")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "triton")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, parts in KINDS:
        if any(p in low for p in parts):
            return kind
    return "other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1b")
    p.add_argument("--precision", default="4bit")
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    add_lever_options(p)
    p.add_argument("--home", default="/tmp")
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.engine_bench import bench_config
    from gpuworker.engine.report import Report
    from gpuworker.engine.train import run_training

    cfg = bench_config(a, "profile", a.warmup + a.steps + 1)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    stamps: list[float] = []

    def progress(ev: dict) -> None:
        if ev.get("type") != "train":
            return
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if ev["step"] == a.warmup:
            prof.start()
        elif ev["step"] == a.warmup + a.steps:
            prof.stop()

    run_training(cfg, Report(progress, lambda: False, lambda line: None), device="cuda")
    wall = (stamps[a.warmup + a.steps - 1] - stamps[a.warmup - 1]) / a.steps
    by_kind: Counter[str] = Counter()
    kernels: Counter[str] = Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            by_kind[kind_of(ev.name)] += us
            kernels[ev.name[:110]] += us
    busy = sum(by_kind.values()) / 1e6 / a.steps
    out = {"size": a.size, "bs": a.bs, "seq": a.seq, "loss": a.loss, "prepare": a.prepare,
           "upcast": a.upcast, "ckpt": a.ckpt,
           "wall_s": round(wall, 4), "gpu_busy_s": round(busy, 4),
           "tokens_per_s": round(a.bs * a.seq / wall),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "by_kind_s": {k: round(v / 1e6 / a.steps, 4) for k, v in by_kind.most_common()}}
    print("RESULT " + json.dumps(out), flush=True)
    print(f"{'s/step':>8}  kernel")
    for name, us in kernels.most_common(25):
        print(f"{us / 1e6 / a.steps:8.4f}  {name}")
    # Where the CPU's time goes (what keeps the GPU waiting when it is idle).
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
