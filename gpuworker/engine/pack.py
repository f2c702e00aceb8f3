"""Several LoRAs trained together over one base model (a pack of a sweep's trials).

The model holds one peft adapter per trial ("lane"). A forward pass takes a batch made of
every active lane's micro-batch, one copy after another (the lanes share their data stream,
so the copies are equal); every adapted layer runs its frozen base layer once on the whole
batch and each lane's LoRA on that lane's rows only. Nothing mixes rows, so a lane's loss,
and its gradients, are those of its rows alone: the lane trains as it would alone.

A lane's randomness is its own too. A LoRA's dropout draws from torch's generators; alone, a
trial draws from them in a fixed order. Here each lane keeps its own copy of the generators'
state (taken right after its adapter's initialisation, where a trial alone would start
training from) and swaps it in around its own dropout, so it draws exactly the masks it would
draw alone. Gradient checkpointing recomputes a layer in backward: the checkpoint's contexts
put the lanes' states back to where they were in that layer's forward pass, so the
recomputation draws the same masks again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gpuworker.engine.lora import SOLO_ADAPTER


class LaneRng:
    """One lane's copy of the CPU generator's state and of the training device's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu, self.cuda = self._now()

    def _now(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    @contextlib.contextmanager
    def drawing(self) -> Iterator[None]:
        """Draw from this lane's state inside; the process's own state is back after."""
        saved = self._now()
        self._set(self.cpu, self.cuda)
        try:
            yield
        finally:
            self.cpu, self.cuda = self._now()
            self._set(*saved)

    def state(self) -> dict[str, torch.Tensor | None]:
        """For a checkpoint: what `_resume_state` stores for a trial alone."""
        return {"rng_cpu": self.cpu.clone(), "rng_cuda": None if self.cuda is None
                else self.cuda.clone()}

    def load(self, cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
        self.cpu = cpu.clone()
        if cuda is not None and self.device.type == "cuda":
            self.cuda = cuda.clone()


@dataclass
class Routing:
    """Which lanes the current batch holds, in row order (none: the base model alone), and
    their generators."""

    rngs: dict[str, LaneRng]
    dropout: dict[str, float]  # each lane's LoRA dropout: a lane without any draws nothing
    active: tuple[str, ...] = ()

    def checkpoint_contexts(self) -> tuple[Any, Any]:
        """`context_fn` for torch's checkpoint: the forward pass notes every lane's state; the
        recomputation in backward runs from those states and leaves them as it found them."""
        noted: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        rngs = self.rngs

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            noted.update({n: (r.cpu, r.cuda) for n, r in rngs.items()})
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            now = {n: (r.cpu, r.cuda) for n, r in rngs.items()}
            for n, (cpu, cuda) in noted.items():
                rngs[n].cpu, rngs[n].cuda = cpu, cuda
            try:
                yield
            finally:
                for n, (cpu, cuda) in now.items():
                    rngs[n].cpu, rngs[n].cuda = cpu, cuda

        return forward(), recompute()


def attach_lanes(model: Any, lanes: list[tuple[str, Any]], seed: int,
                 device: torch.device) -> tuple[Any, Routing]:
    """Wrap `model` with one adapter per lane ((adapter name, peft LoraConfig)), each seeded
    as a trial alone seeds its own, and route every adapted layer by lane. Every lane's
    adapter is trainable."""
    from peft import get_peft_model

    rngs: dict[str, LaneRng] = {}
    dropout = {name: float(config.lora_dropout or 0.0) for name, config in lanes}
    peft_model = None
    for name, config in lanes:
        torch.manual_seed(seed)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name,
                                        autocast_adapter_dtype=True)
        else:
            peft_model.add_adapter(name, config, autocast_adapter_dtype=True)
        rngs[name] = LaneRng(device)
    routing = Routing(rngs=rngs, dropout=dropout)
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.forward = _routed_forward(module, routing)
    for n, p in peft_model.named_parameters():
        p.requires_grad = any(f".{name}." in n for name in rngs) and "lora_" in n
    return peft_model, routing


def lane_parameters(model: Any, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """A lane's trainable parameters, named as a trial alone names them (its checkpoints'
    optimizer state then loads into either)."""
    mark = f".{name}."
    return [(n.replace(mark, f".{SOLO_ADAPTER}."), p) for n, p in model.named_parameters()
            if mark in n and p.requires_grad]


def _routed_forward(layer: Any, routing: Routing) -> Any:
    """A LoRA layer's forward over a pack's batch: the base layer once, then each lane's LoRA
    on its own rows (peft's arithmetic for one adapter, per lane)."""

    quantised = type(layer).__module__.endswith(".bnb")  # peft's 4-bit and 8-bit LoRA layers

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        lanes = routing.active
        if not lanes:  # no lane's batch (a check of the model itself): the base alone
            return result
        dtype = result.dtype
        rows = x.shape[0] // len(lanes)
        if rows * len(lanes) != x.shape[0]:
            raise ValueError(f"a pack's batch of {x.shape[0]} rows is not one copy per lane "
                             f"({len(lanes)} lanes)")
        parts = []
        for i, name in enumerate(lanes):
            part = result[i * rows:(i + 1) * rows]
            if name in layer.lora_A:
                xi = x[i * rows:(i + 1) * rows]
                # As peft: its bitsandbytes layers leave the input to autocast (one shared
                # bf16 input, not an fp32 copy per lane), its plain layers cast it.
                if not (quantised and torch.is_autocast_enabled(xi.device.type)):
                    xi = layer._cast_input_dtype(xi, layer.lora_A[name].weight.dtype)
                # Swapping generators costs time (and splits a compiled layer): only where
                # this lane's dropout draws.
                draws = layer.training and routing.dropout[name] > 0
                with routing.rngs[name].drawing() if draws else contextlib.nullcontext():
                    low = layer.lora_A[name](layer.lora_dropout[name](xi))
                part = part + layer.lora_B[name](low) * layer.scaling[name]
            parts.append(part)
        return torch.cat(parts).to(dtype)

    return forward
