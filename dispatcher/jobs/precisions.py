"""The precisions that load the base model quantised (bitsandbytes, CUDA only): one list for the
job specs and the scheduler (a module of its own, so the scheduler needs not import the specs,
which import the scheduler's estimate)."""

from __future__ import annotations

QUANTISED = ("4bit", "8bit")
