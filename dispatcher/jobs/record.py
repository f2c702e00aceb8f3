"""A job record as the store hands it out, with fields, and THE decoder of records kept as Redis
hashes (job records here; the sweep store decodes its records with `decode_hash` too).

Redis keeps every field of a hash as text: the decoder turns the JSON fields back into objects
and the numbers into numbers. `JobRecord` names the fields every job has; whatever else a
record holds (progress, results, a sweep's marks) stays readable through `get` and `to_dict`,
which gives the record exactly as the store's dict readers (and the HTTP API) see it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.jobs.states import JobState

# Job record fields that hold JSON rather than text.
JOB_JSON_FIELDS = ("spec", "result")
JOB_NUMBER_FIELDS = ("created", "updated", "started", "finished", "step", "total_steps", "loss",
                     "eta_s", "epoch", "attempt", "gpu_memory_mb", "eval_loss",
                     "best_eval_loss", "pack_max", "pack_base_mb", "pack_lane_mb", "pack_splits",
                     "lock_requeues", "unsent_requeues")
JOB_INT_FIELDS = ("step", "total_steps", "attempt", "gpu_memory_mb", "pack_max", "pack_base_mb",
                  "pack_lane_mb", "pack_splits", "lock_requeues", "unsent_requeues")


def decode_hash(raw: Mapping[str, str], *, json_fields: Collection[str] = (),
                number_fields: Collection[str] = (), int_fields: Collection[str] = (),
                absent_as_none: bool = False) -> dict[str, Any]:
    """A Redis hash as a record: `json_fields` parsed, `number_fields` as floats (`int_fields`
    among them as ints). An empty or missing field stays as Redis had it (missing, or ""), or
    becomes None with `absent_as_none` (the sweep store's records)."""
    rec: dict[str, Any] = dict(raw)
    for k in json_fields:
        if rec.get(k):
            rec[k] = json.loads(rec[k])
        elif absent_as_none:
            rec[k] = None
    for k in number_fields:
        if rec.get(k) not in (None, ""):
            v = float(rec[k])
            rec[k] = int(v) if k in int_fields else v
        elif absent_as_none:
            rec[k] = None
    return rec


def decode_job(raw: Mapping[str, str]) -> dict[str, Any]:
    """A job's Redis hash (or some of its fields) as the dict the store's readers return."""
    return decode_hash(raw, json_fields=JOB_JSON_FIELDS, number_fields=JOB_NUMBER_FIELDS,
                       int_fields=JOB_INT_FIELDS)


def job_name(kind: str, spec: dict[str, Any]) -> str:
    """What the job lists show as a job's name."""
    if kind == "train":
        return spec.get("lora_name", "")
    loras = spec.get("loras") or ([spec["lora"]] if spec.get("lora") else [])
    what = "perplexity" if kind == "evaluate" else "generate"
    return f"{what}: {spec.get('base_model', '')}" + (f" + {', '.join(loras)}" if loras else "")


def _number(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


@dataclass(frozen=True)
class JobRecord:
    """One job as stored: what every record has, typed. Read-only: the store changes a job."""

    id: str
    kind: str  # train | evaluate | generate
    state: JobState
    owner: str
    priority: str  # low | normal | high | urgent
    spec: dict[str, Any]  # the validated spec, as JSON
    name: str  # what job lists show
    created: float
    updated: float
    worker: str = ""  # the worker it is (or was last) assigned to
    reason: str = ""  # why it is in its state (an error, "stopped by the user", ...)
    attempt: int = 0  # runs started so far (retries count)
    gpu_memory_mb: int = 0  # card memory it needs (the estimate, or the spec's own figure)
    started: float | None = None  # the start of its (latest) run
    finished: float | None = None  # when it reached a terminal state
    result: dict[str, Any] | None = None
    sweep: str = ""  # the sweep it is a trial of
    # Every field of the record, decoded (those above, progress fields, and the rest).
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, rec: Mapping[str, Any]) -> JobRecord:
        """A record from its decoded dict (the store's `get`, or the API's JSON)."""
        result = rec.get("result")
        return cls(
            id=str(rec["id"]), kind=str(rec.get("kind") or "train"),
            state=JobState(rec["state"]), owner=str(rec.get("owner") or ""),
            priority=str(rec.get("priority") or "normal"), spec=dict(rec.get("spec") or {}),
            name=str(rec.get("name") or ""), created=_number(rec.get("created")) or 0.0,
            updated=_number(rec.get("updated")) or 0.0, worker=str(rec.get("worker") or ""),
            reason=str(rec.get("reason") or ""), attempt=int(rec.get("attempt") or 0),
            gpu_memory_mb=int(rec.get("gpu_memory_mb") or 0),
            started=_number(rec.get("started")), finished=_number(rec.get("finished")),
            result=result if isinstance(result, dict) else None,
            sweep=str(rec.get("sweep") or ""), fields=dict(rec))

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> JobRecord:
        """A record from its Redis hash."""
        return cls.from_dict(decode_job(raw))

    @classmethod
    def of(cls, rec: JobRecord | Mapping[str, Any]) -> JobRecord:
        """`rec` as a JobRecord (readers that still get dicts pass them through this)."""
        return rec if isinstance(rec, JobRecord) else cls.from_dict(rec)

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def get(self, key: str, default: Any = None) -> Any:
        """A field that has no attribute (progress: step, loss, eta_s, ...; marks such as
        sweep_eval or lora_admitted_by), as the record holds it."""
        return self.fields.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """The record as the store's dict readers return it (a copy: changing it changes
        nothing here)."""
        out = dict(self.fields)
        for k in JOB_JSON_FIELDS:
            if isinstance(out.get(k), dict):
                out[k] = dict(out[k])
        return out
