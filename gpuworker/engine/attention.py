"""Attention over packed rows without a mask: each sample of a row attends causally within
itself, through the variable-length flash-attention kernel that ships with PyTorch.

A packed row (batching.PackBatcher) holds several samples end to end. Given as a (T, T) mask,
its attention runs through SDPA's masked kernels, which compute every sample against every
other only to throw the result away, and keep the mask in memory. With the samples' start
offsets (`cu_seq_lens`: 0, l1, l1 + l2, ..., T) the row goes to flash attention's
variable-length kernel instead (torch.ops.aten._flash_attention_forward, the kernel behind
SDPA's flash path and nested tensors, with its registered backward), which computes each
sample's own causal attention and nothing else.

The model gets the offsets as two extra keyword arguments of its forward
(`lorafleet_cu_seq_lens`, `lorafleet_max_len`) that transformers hands down to each layer's
attention function; `install()` wraps the registered "sdpa" function so that it takes that
path when they are there and is SDPA itself otherwise. `lorafleet_max_len` is the run's
cutoff_len, not the row's longest sample: one value for the whole run, so compiled layers are
not compiled again for each row (the kernel only needs an upper bound).

On the CPU, and on inputs the flash kernel does not take (fp32, a card older than compute
capability 8.0, an unusual head size, attention dropout), the same arguments run SDPA causally
on each sample's slice, one sample at a time: the same numbers as the masked row, which the
exactness tests check.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CU_SEQ_LENS = "lorafleet_cu_seq_lens"
MAX_LEN = "lorafleet_max_len"

_installed: dict[str, Any] = {}


def install() -> None:
    """Route packed rows' attention through `packed_attention` (once per process)."""
    if _installed:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
    _installed["sdpa"] = plain

    def sdpa_or_packed(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any
                       ) -> tuple[torch.Tensor, None]:
        cu = kwargs.pop(CU_SEQ_LENS, None)
        max_len = kwargs.pop(MAX_LEN, None)
        if cu is None:
            return plain(module, query, key, value, attention_mask, *args, **kwargs)
        return packed_attention(query, key, value, cu, int(max_len),
                                scaling=kwargs.get("scaling"),
                                dropout=kwargs.get("dropout", 0.0)), None

    ALL_ATTENTION_FUNCTIONS.register("sdpa", sdpa_or_packed)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seq_lens: torch.Tensor, max_len: int, scaling: float | None = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each sample of packed rows. query (B, Hq, T, D), key and value
    (B, Hkv, T, D) with Hq a multiple of Hkv (grouped-query attention); every row has the
    samples `cu_seq_lens` (0, ..., T; int32) marks. Returns (B, T, Hq, D), as transformers'
    attention functions do."""
    b, hq, t, d = query.shape
    if flash_applies(query, dropout):
        # (B, H, T, D) -> (B*T, H, D); the rows' offsets one after another. The kernel takes
        # grouped key/value heads as they are.
        q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
        offsets = cu_seq_lens.to(torch.int32)
        if b > 1:
            rows = torch.arange(b, device=offsets.device, dtype=torch.int32)[:, None] * t
            offsets = torch.cat([(offsets[:-1][None, :] + rows).reshape(-1),
                                 offsets[-1:] + (b - 1) * t])
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, offsets, offsets, max_len, max_len, 0.0, True, False, scale=scaling)[0]
        return out.reshape(b, t, hq, d)
    # Each sample's slice through SDPA: the CPU, and what the flash kernel does not take.
    groups = hq // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_lens.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                            is_causal=True, scale=scaling, dropout_p=dropout)
             for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def flash_applies(query: torch.Tensor, dropout: float) -> bool:
    """Does PyTorch's flash kernel take these inputs: a CUDA card of compute capability 8.0 or
    newer, fp16 or bf16 (not fp32: `fp32_norms` on a quantised model, or a plain fp32 job), a
    head size that is a multiple of 8 up to 256, and no attention dropout."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    d = query.shape[-1]
    return d % 8 == 0 and d <= 256 and torch.cuda.get_device_capability(query.device) >= (8, 0)
