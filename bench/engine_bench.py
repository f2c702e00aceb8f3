"""Training throughput and peak memory of lorafleet's engine, set up like `hf_baseline.py`.

Same model shapes (random-initialised Llama), LoRA rank 32 on all linear layers, alpha 64,
dropout 0.05, AdamW at 3e-4, micro batch = batch (no accumulation), every sample exactly `seq`
tokens (no padding), first `warmup` steps not timed. Tokens/s counts every token of the batch.

    python -m bench.engine_bench --size 1b --precision 4bit --bs 4 --seq 512
prints one line `RESULT {...}`; run the baseline in the same command to compare on one card.
`--loss`, `--batching` and `--prepare` pick the engine's levers (gpuworker/engine/levers.py).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1b": "llama-3.2-1b", "8b": "llama-3-8b"}
WORDS = ("the quick brown fox jumps over a lazy dog while small models learn to write short "
         "answers about water tea trains birds and the sea").split()


def prepare(home: Path, size: str, seq: int, n: int, spread: bool = False) -> None:
    """Model folder (random weights + the tests' small tokenizer) and a dataset of long rows."""
    from dispatcher.settings import DataPaths

    paths = DataPaths(home)
    paths.ensure()
    model_dir = paths.models / size
    if not (model_dir / "config.json").exists():
        from bench.random_model import make_random_model

        make_random_model(model_dir, SIZES[size])
    elif not (model_dir / "tokenizer.json").exists():
        # A model folder the baseline wrote (weights only): add the small tokenizer.
        from transformers import AutoTokenizer

        from tests.tiny import make_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            make_tiny_model(Path(tmp))
            AutoTokenizer.from_pretrained(tmp).save_pretrained(model_dir)
    rng = random.Random(0)
    if spread:
        # The sample dataset's spread of row lengths (formats/samples/alpaca-sample.json),
        # scaled so its longest row is about seq tokens (~3 tokens a word with the small
        # tokenizer): what padding wastes and packing saves on such data.
        sample = json.loads((ROOT / "formats" / "samples" / "alpaca-sample.json").read_text())
        lengths = [len(" ".join(r.values())) for r in sample]
        words = [max(1, round(seq / 3 * n / max(lengths))) for n in lengths]
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.choice(words)))}
                for _ in range(n)]
    else:
        # ~3 tokens a word with the small tokenizer: rows are longer than seq, so cutoff makes
        # every sample exactly seq tokens.
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(seq * 2))} for _ in range(n)]
    (paths.datasets / "bench.json").write_text(json.dumps(rows))
    (paths.formats / "text.json").write_text(json.dumps({"text": "%text%"}))


def bench_config(a: argparse.Namespace, lora_name: str, steps: int) -> Any:
    """The run the benchmark arguments describe (data folder prepared for `steps` steps), as
    the engine's config with the levers asked for."""
    from dispatcher.jobs.specs import TrainSpec
    from dispatcher.settings import DataPaths
    from gpuworker.engine.boundary import config_from_spec
    from gpuworker.engine.config import Levers

    home = Path(a.home)
    prepare(home, a.size, a.seq, steps * a.bs, spread=bool(getattr(a, "spread", 0)))
    spec = TrainSpec(
        lora_name=lora_name, base_model=a.size, dataset="bench.json", format="text",
        precision=a.precision, lora_rank=32, lora_alpha=64, lora_dropout=0.05,
        target_modules=["all"], micro_batch_size=a.bs, batch_size=a.bs, epochs=1,
        learning_rate="3e-4", lr_scheduler_type="constant", warmup_steps=0, cutoff_len=a.seq,
        optimizer="adamw_torch", always_override=True)
    levers = Levers(loss=a.loss, batching=a.batching, prepare=tuple(a.prepare),
                    upcast=bool(a.upcast), checkpoint_layers=a.ckpt,
                    checkpoint_budget=a.budget_gib is not None,
                    memory_budget_bytes=int(a.budget_gib * 2**30) if a.budget_gib else None,
                    compile_mode=a.compile_mode, cuda_graphs=bool(a.graphs))
    return config_from_spec(spec, DataPaths(home), levers)


def add_lever_options(p: argparse.ArgumentParser) -> None:
    """The engine's levers (gpuworker/engine/levers.py), today's by default."""
    p.add_argument("--loss", default="fp32_logits")
    p.add_argument("--batching", default="pad")
    p.add_argument("--prepare", action="append", default=[], help="a preparation hook (repeat)")
    p.add_argument("--ckpt", type=int, default=None, help="checkpointed layers (all)")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="checkpoint only as many layers as fit this memory (0: the card's)")
    p.add_argument("--upcast", type=int, default=1, help="1: fp32 non-quantised weights (peft)")
    p.add_argument("--compile-mode", default="default", help="torch.compile's mode (compile)")
    p.add_argument("--graphs", type=int, default=1,
                   help="1: compiled layers move on to CUDA graphs where the run allows (a job's)")


def run(a: argparse.Namespace) -> dict:
    import torch

    from gpuworker.engine.report import Report
    from gpuworker.engine.train import run_training

    home = Path(a.home)
    cfg = bench_config(a, "bench", a.warmup + a.steps)
    stamps: list[float] = []

    tokens: list[int] = []
    losses: list[float] = []

    def progress(ev: dict) -> None:
        if ev.get("type") == "train":
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            tokens.append(ev["tokens"])
            losses.append(round(float(ev["loss"]), 4))

    torch.cuda.reset_peak_memory_stats()
    lines: list[str] = []
    if a.pack > 1:
        result = run_as_pack(cfg, a.pack, Report(progress, lambda: False, lines.append))
    else:
        result = run_training(cfg, Report(progress, lambda: False, lines.append), device="cuda")
    timed = stamps[a.warmup:]
    dt = (timed[-1] - timed[0]) / (len(timed) - 1)
    # Real (not padding) tokens trained per second over the timed steps.
    useful = (tokens[-1] - tokens[a.warmup]) / (timed[-1] - timed[0])
    out = dict(engine="lorafleet", size=a.size, precision=a.precision, bs=a.bs, seq=a.seq,
               loss=a.loss, batching=a.batching, prepare=list(a.prepare), upcast=a.upcast,
               ckpt=a.ckpt, budget_gib=a.budget_gib,
               checkpointing=[x for x in lines if "checkpointing" in x.lower()][-1:],
               spread=a.spread, pack=a.pack, steps=result["steps"], s_per_step=round(dt, 4),
               # A pack: every trial's tokens together (each trains bs x seq a step).
               tokens_per_s=round(a.pack * a.bs * a.seq / dt),
               useful_tokens_per_s=round(a.pack * useful),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               graphs=result.get("speed", {}).get("cuda_graphs"), losses=losses,
               gpu=torch.cuda.get_device_name())
    shutil.rmtree(home / "loras" / "bench", ignore_errors=True)
    return out


def run_as_pack(cfg: Any, k: int, report: Any) -> dict:
    """`k` trials of `cfg` trained together over one base (engine/train_pack.py), learning
    rates 1e-4 x 2^i; `report` gets the first trial's events, the others' go nowhere."""
    from dataclasses import replace

    from gpuworker.engine.report import Report
    from gpuworker.engine.train_pack import PackMember, run_pack

    results: list = []
    quiet = Report(lambda ev: None, lambda: False, lambda line: None)
    members = [PackMember(replace(cfg, lora_name=f"bench{i}", learning_rate=f"{1e-4 * 2**i:g}"),
                          report if i == 0 else quiet, results.append) for i in range(k)]
    run_pack(members, device="cuda")
    for i in range(k):
        shutil.rmtree(cfg.loras_dir / f"bench{i}", ignore_errors=True)
    bad = [r for r in results if isinstance(r, Exception)]
    if bad:
        raise bad[0]
    return results[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1b", choices=sorted(SIZES))
    p.add_argument("--precision", default="4bit")
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    add_lever_options(p)
    p.add_argument("--pack", type=int, default=1,
                   help="train this many trials together over one base (a sweep's pack)")
    p.add_argument("--spread", type=int, default=0,
                   help="1: rows of the sample dataset's spread of lengths (longest ~ seq)")
    p.add_argument("--home", default=str(Path(tempfile.gettempdir()) / "lorafleet-bench"))
    a = p.parse_args()
    print("RESULT " + json.dumps(run(a)), flush=True)


if __name__ == "__main__":
    main()
