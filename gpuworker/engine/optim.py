"""The optimizer and learning-rate schedule a spec names, with the same defaults as the
Hugging Face Trainer that text-generation-webui used (betas 0.9/0.999, eps 1e-8, no weight
decay, gradient clipping at 1.0)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from gpuworker.engine.loading import require_bitsandbytes
from gpuworker.errors import EngineError

MAX_GRAD_NORM = 1.0
_BNB = {"adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def check_optimizer(name: str, device: torch.device) -> None:
    """Refuse, before any loading, an optimizer this device cannot run."""
    if name == "adamw_torch_fused" and device.type != "cuda":
        raise EngineError("optimizer adamw_torch_fused needs a CUDA GPU; use adamw_torch on the CPU")
    if name in _BNB:
        if device.type != "cuda":
            raise EngineError(f"optimizer {name} (bitsandbytes) needs a CUDA GPU; "
                              "use adamw_torch on the CPU")
        require_bitsandbytes(f"optimizer {name}")
    elif name not in ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad"):
        raise EngineError(f"unknown optimizer '{name}'")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> Any:
    params = list(params)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                 fused=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # With an explicit learning rate, Adafactor's own relative step size must be off.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name in _BNB:
        import bitsandbytes as bnb

        return getattr(bnb.optim, _BNB[name])(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                               weight_decay=0.0)
    raise EngineError(f"unknown optimizer '{name}'")


def make_scheduler(name: str, optimizer: Any, warmup_steps: int, total_steps: int) -> Any:
    """transformers' schedule of that name, counted in optimizer steps."""
    from transformers import get_scheduler

    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=total_steps)
    except ValueError as e:
        raise EngineError(f"lr_scheduler_type '{name}': {e}") from None
