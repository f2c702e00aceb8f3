"""Several LoRAs trained together over one base model (a pack of a sweep's trials).

The model holds one peft adapter per trial ("lane"). A forward pass takes a batch made of
every active lane's micro-batch, one copy after another (the lanes share their data stream,
so the copies are equal); every adapted layer runs its frozen base layer once on the whole
batch and each lane's LoRA on that lane's rows only. Nothing mixes rows, so a lane's loss,
and its gradients, are those of its rows alone: the lane trains as it would alone.

The lanes' LoRA products run batched: each adapted layer keeps a stack of every lane's A and
B (`LaneStack`, zero-padded to the layer's largest rank, zero for a lane without an adapter
there), and its forward is two batched matmuls over all lanes, not a loop of small ones per
lane (at 8 lanes the loop's kernel launches, not the GPU, bounded the step). The zeros add
nothing to a lane's product and receive zero gradient. The lanes' own parameters stay the
truth that the optimizers, checkpoints and LoRA folders use: `Routing.refresh` copies them
into the stacks after each optimizer step, `Routing.share_grads` copies the stacks'
gradients out to them before it.

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
from dataclasses import dataclass, field
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


class LaneStack:
    """One adapted layer's LoRA weights, every lane's stacked in lane order: `a` (lanes, rank,
    in), `b` (lanes, out, rank), the rank the layer's largest, the rest zero. Leaves of their
    own: their gradients are copied out to the lanes' parameters (`Routing.share_grads`)."""

    def __init__(self, layer: Any, names: list[str]):
        present = [n for n in names if n in layer.lora_A]
        self.params = {n: (layer.lora_A[n].weight, layer.lora_B[n].weight) for n in present}
        a0, b0 = self.params[present[0]]
        rank = max(a.shape[0] for a, _ in self.params.values())
        kw = dict(dtype=a0.dtype, device=a0.device)
        self.a = torch.zeros(len(names), rank, a0.shape[1], **kw).requires_grad_()
        self.b = torch.zeros(len(names), b0.shape[0], rank, **kw).requires_grad_()
        a, b = self.a.detach(), self.b.detach()  # views outside autograd, for the copies
        self.views = {n: (a[i, :self.params[n][0].shape[0]], b[i, :, :self.params[n][0].shape[0]])
                      for i, n in enumerate(names) if n in self.params}
        self.scaling = {n: float(layer.scaling[n]) if n in self.params else 0.0 for n in names}
        # For the lanes of the coming batches (`pick`): their rows of the stacks (None: all,
        # in order), whether any draws dropout here, their scalings by the product's dtype.
        self.rows: torch.Tensor | None = None
        self.draws = False
        self.scales: dict[torch.dtype, torch.Tensor] = {}

    def pick(self, lanes: tuple[str, ...], rows: torch.Tensor | None,
             dropout: dict[str, float]) -> None:
        """Set what the forward pass reads for `lanes` (made here, in plain Python before the
        batches: a compiled layer then reads fixed values, the same for every layer).

        The scalings multiply a product as peft multiplies it by a Python float: in fp32
        (torch's arithmetic type for bf16 and fp16), rounded once. So for a half-precision
        product they are fp32, unless every scaling is exact in that dtype (the usual powers
        of two), where the product in its own dtype is the same and needs no fp32 copy."""
        self.rows = rows
        self.draws = any(dropout[n] > 0 and n in self.params for n in lanes)
        values = [self.scaling[n] for n in lanes]
        self.scales = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            exact = torch.tensor(values, dtype=dtype).double().tolist() == values
            self.scales[dtype] = torch.tensor(
                values, dtype=dtype if exact else torch.float32,
                device=self.a.device).view(-1, 1, 1)

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The picked lanes' scalings, (lanes, 1, 1), for a product of `dtype`."""
        return self.scales[dtype]


@dataclass
class Routing:
    """Which lanes the current batch holds, in row order (none: the base model alone), their
    generators, and the adapted layers' stacks of their LoRA weights."""

    rngs: dict[str, LaneRng]
    dropout: dict[str, float]  # each lane's LoRA dropout: a lane without any draws nothing
    active: tuple[str, ...] = ()
    layers: list[Any] = field(default_factory=list)  # the adapted layers, in model order
    stacks: list[LaneStack] = field(default_factory=list)  # theirs, built by `refresh`

    @property
    def names(self) -> list[str]:
        return list(self.rngs)

    def set_active(self, lanes: tuple[str, ...]) -> None:
        """The lanes the coming batches hold, in row order; every stack picks its rows,
        dropout and scalings for them (only when they change)."""
        if lanes == self.active:
            return
        self.active = lanes
        if not lanes or not self.stacks:
            return
        order = self.names
        rows = None if list(lanes) == order else torch.tensor(
            [order.index(n) for n in lanes], device=self.stacks[0].a.device)
        for st in self.stacks:
            st.pick(lanes, rows, self.dropout)

    @torch.no_grad()
    def refresh(self, lanes: list[str] | None = None) -> None:
        """Copy the lanes' (default: all) LoRA weights into the stacks, building them the
        first time (after the model's preparation: they take the weights' final dtype)."""
        if not self.stacks:
            self.stacks = [LaneStack(layer, self.names) for layer in self.layers]
            # Each layer finds its own stack as an attribute: a compiled layer's code then
            # serves every layer alike (an index closed over would compile one per layer).
            for layer, st in zip(self.layers, self.stacks, strict=True):
                layer._lane_stack = st
            lanes, self.active = self.active, ()
            self.set_active(lanes)  # lanes set before the stacks existed: their picks now
        dst, src = [], []
        for st in self.stacks:
            for n in lanes or self.names:
                if n in st.views:
                    dst.extend(st.views[n])
                    src.extend(st.params[n])
        torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def share_grads(self, lanes: tuple[str, ...]) -> None:
        """Copy the stacks' gradients (of the step's backward passes) out to the lanes'
        parameters, then drop them."""
        dst, src = [], []
        for st in self.stacks:
            if st.a.grad is None:  # the layer was not reached: no lane got a gradient here
                continue
            ga, gb = st.a.grad, st.b.grad
            for i, n in enumerate(self.names):
                if n in lanes and n in st.params:
                    (pa, pb), r = st.params[n], st.params[n][0].shape[0]
                    for p, g in ((pa, ga[i, :r]), (pb, gb[i, :, :r])):
                        if p.grad is None:
                            p.grad = torch.empty_like(p)
                        dst.append(p.grad)
                        src.append(g)
            st.a.grad = st.b.grad = None
        if dst:
            torch._foreach_copy_(dst, src)

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
            routing.layers.append(module)
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
    """A LoRA layer's forward over a pack's batch: the base layer once, then every lane's
    LoRA on its own rows as two batched matmuls over the layer's stack (peft's arithmetic
    for one adapter, each lane's dropout drawn from its own generators)."""

    quantised = type(layer).__module__.endswith(".bnb")  # peft's 4-bit and 8-bit LoRA layers

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        lanes = routing.active
        if not lanes:  # no lane's batch (a check of the model itself): the base alone
            return result
        k = len(lanes)
        if x.shape[0] % k:
            raise ValueError(f"a pack's batch of {x.shape[0]} rows is not one copy per lane "
                             f"({k} lanes)")
        st = layer._lane_stack
        xs = x.reshape(k, -1, x.shape[-1])  # (lanes, the lane's tokens, in)
        # As peft: its bitsandbytes layers leave the input to autocast (one shared bf16
        # input), its plain layers cast it to the LoRA's dtype.
        if not (quantised and torch.is_autocast_enabled(x.device.type)):
            xs = layer._cast_input_dtype(xs, st.a.dtype)
        if layer.training and st.draws:
            xs = torch.stack([_dropped(layer, routing, n, xs[i]) for i, n in enumerate(lanes)])
        a, b = (st.a, st.b) if st.rows is None else (st.a.index_select(0, st.rows),
                                                     st.b.index_select(0, st.rows))
        # peft's order: lora_B(lora_A(x)) * scaling, the scaling last.
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        delta = (delta * st.scale(delta.dtype)).to(delta.dtype)
        return (result + delta.view_as(result)).to(result.dtype)

    return forward


def _dropped(layer: Any, routing: Routing, name: str, x: torch.Tensor) -> torch.Tensor:
    """A lane's input after its LoRA dropout, drawn from the lane's own generators (the
    same masks it draws alone: the same number of elements in the same order). Drawn here at
    the lane's rate, not by the layer's dropout module: the lean dropout (kernels.py) leaves
    that an Identity and draws in the down projection, which the batched product bypasses."""
    if name not in layer.lora_A or routing.dropout[name] <= 0:
        return x
    with routing.rngs[name].drawing():
        return torch.nn.functional.dropout(x, routing.dropout[name], training=True)
