"""The engine's one door to the app: a `TrainSpec` and the data folder's `DataPaths` become an
`EngineConfig` here, once per job.

This is the only module of the engine that imports the job model (dispatcher.jobs.specs) or the
settings (dispatcher.settings); tests/unit/test_engine_seams.py keeps it so. Data names are
resolved with the app's one resolver (`find_format`, `resolve_data_name`, which evaluate.py
takes from here) here; whether the files exist is still the
engine's check phase, so a refused job's message is the same whoever calls the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dispatcher.jobs.specs import TrainSpec, find_format, resolve_data_name
from dispatcher.settings import WORKER_MEMORY_ENV, DataPaths
from gpuworker.engine.config import EngineConfig, Levers
from gpuworker.engine.report import Report
from gpuworker.engine.resume import run_settings
from gpuworker.engine.train import run_training

__all__ = ["config_from_spec", "resolve_data_name", "train"]


def config_from_spec(spec: TrainSpec, paths: DataPaths, levers: Levers | None = None
                     ) -> EngineConfig:
    """The run `spec` describes, in the engine's terms (today's levers unless given)."""
    return EngineConfig(
        lora_name=spec.lora_name, base_model=spec.base_model,
        model_dir=paths.models / spec.base_model, loras_dir=paths.loras,
        datasets_dir=paths.datasets, home=paths.home,
        dataset=spec.dataset, format=spec.format, raw_text_file=spec.raw_text_file,
        eval_dataset=spec.eval_dataset,
        format_file=find_format(spec.format, paths) if spec.format.strip() else None,
        cutoff_len=spec.cutoff_len, overlap_len=spec.overlap_len,
        newline_favor_len=spec.newline_favor_len, hard_cut_string=spec.hard_cut_string,
        min_chars=spec.min_chars, add_eos_token=spec.add_eos_token,
        train_only_after=spec.train_only_after,
        precision=spec.precision, target_modules=list(spec.target_modules),
        lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
        optimizer=spec.optimizer, learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler_type, warmup_steps=spec.warmup_steps,
        micro_batch_size=spec.micro_batch_size, batch_size=spec.batch_size,
        epochs=spec.epochs, seed=spec.seed, save_steps=spec.save_steps,
        eval_steps=spec.eval_steps, stop_at_loss=spec.stop_at_loss,
        always_override=spec.always_override,
        training_parameters=spec.training_parameters(),
        run_settings=run_settings(spec.to_dict()),
        levers=levers or levers_from_spec(spec))


# Card memory a CUDA process holds beyond what its allocator hands out (the context, the
# kernels' code): a limit in card memory leaves this much out of the activations' budget.
CUDA_CONTEXT_MB = 512


def memory_budget(spec: TrainSpec) -> int | None:
    """Bytes the job's checkpointing may fit its allocations to: the job's own
    `min_gpu_memory_mb` when set, at most the worker's `--memory-mb`, less the CUDA context;
    None (the card's free memory) with neither."""
    try:
        cap = int(os.environ.get(WORKER_MEMORY_ENV) or 0)
    except ValueError:
        cap = 0
    limits = [mb for mb in (spec.min_gpu_memory_mb, cap) if mb > 0]
    return max(1, min(limits) - CUDA_CONTEXT_MB) * 2**20 if limits else None


def levers_from_spec(spec: TrainSpec) -> Levers:
    """The job's speed settings as the engine's levers."""
    return Levers(loss="fused" if spec.fused_loss else "fp32_logits",
                  batching="pack" if spec.packing else "pad",
                  prepare=(("liger_kernels",) if spec.fused_kernels else ())
                  + (("compile",) if spec.compile else ()),
                  upcast=spec.fp32_norms, cuda_graphs=spec.compile,
                  checkpoint_budget=spec.gradient_checkpointing == "auto",
                  memory_budget_bytes=memory_budget(spec))


def train(spec: TrainSpec, paths: DataPaths, progress: Callable[[dict[str, Any]], None],
          should_stop: Callable[[], bool], log: Callable[[str], None],
          device: str | None = None, resume_from: str | None = None,
          job_id: str = "") -> dict[str, Any]:
    """Train the LoRA `spec` describes into loras/<lora_name>/ and return the run's result.

    `resume_from` carries on an interrupted run from one of its checkpoints: "latest" (the
    highest-numbered complete checkpoint-<step>/; with none, the run starts from scratch and
    says so) or a folder name "checkpoint-<step>" (missing: EngineError). None or "" trains
    as usual. `job_id` names the run in the LoRA folder's lock (EngineConfig.job_id). Raises
    EngineError (with a message for the user) for anything the user can fix.
    """
    cfg = replace(config_from_spec(spec, paths), job_id=job_id)
    return run_training(cfg, Report(progress, should_stop, log), device=device,
                        resume_from=resume_from)
