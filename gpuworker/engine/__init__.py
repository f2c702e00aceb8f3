"""The training engine: `train` turns a TrainSpec into a LoRA folder; `perplexity` and
`generate` evaluate a base model with LoRAs.

Importing this package imports torch; only the worker process that trains does so.
"""

from __future__ import annotations

from gpuworker.engine.errors import EngineError
from gpuworker.engine.evaluate import perplexity
from gpuworker.engine.generate import generate
from gpuworker.engine.resume import latest_checkpoint
from gpuworker.engine.train import train

__all__ = ["EngineError", "generate", "latest_checkpoint", "perplexity", "train"]
