"""The training engine: `train` turns a TrainSpec into a LoRA folder; `perplexity` and
`generate` evaluate a base model with LoRAs.

The engine works on its own plain config, not the app's types: boundary.py turns a TrainSpec
and the data folder's paths into an `EngineConfig` (config.py) once per job, and is the only
module here that imports the job model or the settings. `run_training(config, report)` is the
engine's own entry (train.py).

Seams for a faster engine (levers.py; chosen by name in `EngineConfig.levers`, today's
behaviour is the default of each):

    prepare hooks  `hook(model, config) -> model`, in order, after the model is loaded,
                   LoRA-wrapped and its earlier weights loaded: kernel patches, compilation.
                   Today: none.
    loss_fn        `loss_fn(model, batch)` -> the sum of next-token losses over the batch's
                   label tokens. Today "fp32_logits": full logits under autocast, cross-entropy
                   in fp32 outside the model. A fused loss may compute it inside the model.
    batcher        one optimizer step's micro-batches -> `Batch`es (a dict of (B, T) tensors
                   with the counts of real and label tokens). Today "pad": pad each micro-batch
                   to its longest sample. A packer may regroup a step's samples, never change
                   which samples make up the step.

The dispatcher's memory estimate (dispatcher/schedule/estimate.py) takes the same loss and
batching names, so a job is placed by the memory its levers need.

Importing this package imports torch; only the worker process that trains does so.
"""

from __future__ import annotations

from gpuworker.engine.boundary import train
from gpuworker.engine.evaluate import perplexity
from gpuworker.engine.generate import generate
from gpuworker.engine.resume import latest_checkpoint
from gpuworker.errors import EngineError

__all__ = ["EngineError", "generate", "latest_checkpoint", "perplexity", "train"]
