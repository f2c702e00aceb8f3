"""The training engine: one function, `train`, that turns a TrainSpec into a LoRA folder.

Importing this package imports torch; only the worker process that trains does so.
"""

from __future__ import annotations

from gpuworker.engine.errors import EngineError
from gpuworker.engine.train import train

__all__ = ["EngineError", "train"]
