"""What each kind of job runs: one engine function per kind, with its bookkeeping around it.

`run_job_kind` is what the task wrapper calls; it imports the engine (and so torch) only here,
in the process that trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispatcher.jobs.evaltable import EvalTable
from dispatcher.jobs.specs import find_format, spec_from_dict
from dispatcher.settings import Settings

EVAL_TABLE = "evaluations.csv"


def resume_point(asked: str, attempt: int, log: Callable[[str], None]) -> str | None:
    """Where a training run (a job alone, or a pack's trial) resumes from: the checkpoint its
    spec asks for; on a later attempt of a job that asked for none (re-queued after its worker
    was lost), the last checkpoint this job wrote, if any (OWN_LATEST: an earlier job's
    checkpoint in the folder is not this job's run)."""
    if asked or attempt <= 1:
        return asked or None
    from gpuworker.engine.resume import OWN_LATEST

    log(f"attempt {attempt}: resuming from this job's latest checkpoint, if it has one")
    return OWN_LATEST


def run_job_kind(kind: str, spec_dict: dict[str, Any], settings: Settings, *, job_id: str,
                 attempt: int, progress: Callable[[dict], None],
                 should_stop: Callable[[], bool], log: Callable[[str], None]) -> dict[str, Any]:
    from gpuworker import engine
    from gpuworker.engine.evaluate import perplexity
    from gpuworker.engine.generate import generate

    paths = settings.paths
    spec = spec_from_dict(spec_dict, kind)
    if kind == "train":
        resume = resume_point(spec.resume_from_checkpoint, attempt, log)
        kwargs = {"resume_from": resume} if resume else {}
        return engine.train(spec, paths, progress, should_stop, log, job_id=job_id, **kwargs)
    if kind == "evaluate":
        table = EvalTable(paths.evals / EVAL_TABLE)
        if not spec.force:
            prev = table.find(spec.base_model, spec.loras, spec.text_file, spec.stride,
                              spec.max_length)
            if prev is not None:
                log(f"this combination was evaluated on {prev['date']} (perplexity "
                    f"{prev['perplexity']:.4f}); skipped (set force to run it again)")
                return {"skipped": True, "perplexity": prev["perplexity"], "row": prev["id"],
                        "reason": f"skipped: already evaluated on {prev['date']}"}
        result = perplexity(
            base_model=spec.base_model, loras=spec.loras, text_file=spec.text_file, paths=paths,
            stride=spec.stride, max_length=spec.max_length, precision=spec.precision,
            progress=progress, should_stop=should_stop, log=log)
        if not result.get("stopped"):
            row = table.add(base_model=spec.base_model, loras=spec.loras,
                            text_file=spec.text_file, perplexity=result["perplexity"],
                            stride=spec.stride, max_length=result.get("max_length", spec.max_length),
                            tokens=result.get("tokens", 0), job=job_id, comment=spec.comment)
            result["row"] = row["id"]
        return result
    if kind == "generate":
        fmt = find_format(spec.format, paths) if spec.format else None
        return generate(
            base_model=spec.base_model, lora=spec.lora or None, prompt=spec.prompt,
            format_file=fmt, paths=paths, max_new_tokens=spec.max_new_tokens,
            temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed,
            precision=spec.precision, progress=progress, should_stop=should_stop, log=log)
    raise ValueError(f"unknown job kind {kind!r}")
