"""A job's failure as one EngineError, with the card's memory given back whatever happens."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from gpuworker.errors import EngineError


class OutOfGpuMemory(EngineError):
    """The run ran out of the card's memory (the message says what to lower)."""


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def run_releasing(dev: torch.device, run: Callable[[], dict[str, Any]],
                  oom_advice: str) -> dict[str, Any]:
    """`run()`, with its failure as one EngineError: the engine's own message and type (the
    worker tells a FolderBusy from a failure), or "out of GPU memory: <oom_advice>". The card's
    memory is released whatever happens; only the message is kept on failure, because the
    traceback's frames hold the model."""
    failure, error = "", EngineError
    try:
        return run()
    except EngineError as e:
        failure, error = str(e), type(e)
    except Exception as e:
        if not is_oom(e):
            raise
        failure, error = f"out of GPU memory: {oom_advice}", OutOfGpuMemory
    finally:
        release_memory(dev)
    raise error(failure)
