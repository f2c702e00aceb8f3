"""How much GPU memory a job needs: a pure estimate from the model's shape and the job's settings.

The dispatcher places a job only on a card with at least this much memory free. The figure is
the card memory the job's process takes: a fixed CUDA context plus the peak of PyTorch's
allocator, which is

    weights + LoRA training state + max(floor, activations)

  weights      decoder linear layers x bytes per parameter (4bit 0.55 with the quantisation
               constants, 8bit 1.1, bf16/fp16 2, fp32 4); the rest (embeddings, norms, an untied
               output layer) in the compute dtype, or fp32 when training a quantised model
               (peft's prepare_model_for_kbit_training casts them up).
  LoRA state   trainable parameters x 16 bytes (fp32 weight 4 + AdamW's two moments 8 + grad 4).
  activations  per token of a micro-batch (the batcher's most: micro_batch_size x cutoff_len
               for "pad", the most a padded batch can hold): layers x hidden x 2 bytes x a
               factor (6 with the gradient checkpointing a quantised model trains with, 42
               without), plus the loss's bytes per token and vocabulary entry ("fp32_logits":
               2 + 4 + 4, the bf16 logits, their fp32 copy for the loss, its gradient); with
               checkpointing, also a fixed 1.8 bytes per embedding parameter.
  floor        working buffers that do not shrink with the batch, measured at small batches:
               9.7 bytes per embedding parameter for a quantised model, 16.4 unquantised.

Calibration (random Llama-3.2-1B shape on an H100, LoRA on all linear layers, PyTorch's peak
allocation; MiB, measured -> estimated):
  4bit r=32, 4 x 512 tokens      5,581 (5.45 GiB) -> 5,581
  4bit r=32, 2 x 2048 tokens     8,858 (8.65 GiB) -> 8,854
  bf16 r=32, 4 x 512 tokens     10,516 (10.27 GiB) -> 10,582
  4bit r=16, 4 x ~100 tokens     4,107 -> 4,115 (the floor)
  8bit / bf16 r=16, same data    4,558 / 6,614 -> 4,625 / 6,637
The card figure then adds 5% and the 500 MB context and rounds up to 64 MB (6,400 MB for the
first row): it errs on the high side, so a job placed by it does not run out of memory on a
card that was just big enough, at the cost of sometimes waiting for a card it would have fit.

The loss and the batcher are the engine's levers (gpuworker/engine/levers.py): the estimate
takes the same names, LOSS_LOGIT_BYTES and BATCH_TOKENS say what each costs, and a test keeps
their names equal to the engine's. Today's choice is the default.

Sizes are in MB as the workers' heartbeats count them (2**20 bytes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher.jobs.precisions import QUANTISED

MB = 2**20
CUDA_CONTEXT_MB = 500
MARGIN = 1.05
ROUND_MB = 64
# Bytes per parameter of a decoder linear layer, by precision.
LINEAR_BYTES = {"4bit": 0.55, "8bit": 1.1, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}
# fp32 LoRA weight (4) + AdamW moments (8) + gradient (4).
LORA_STATE_BYTES = 16
# In a pack, each trial's LoRA also sits in the layers' stacks: fp32 weight (4) + gradient (4).
PACK_STACK_BYTES = 8
# Bytes per token and vocabulary entry that each loss (the engine's levers) holds at the peak.
# fp32_logits: bf16 logits 2 + their fp32 copy 4 + its gradient 4.
# fused: the logits of one chunk of (at most 1024) label positions at a time, not per token:
# counted as if the micro-batch had min(tokens, 1024) tokens.
LOSS_LOGIT_BYTES = {"fp32_logits": 2 + 4 + 4, "fused": 2 + 4 + 4}
LOSS_TOKEN_CAP = {"fp32_logits": None, "fused": 1024}
# Tokens in one micro-batch at the most, for each batcher, from (micro_batch_size, cutoff_len).
# pack: the same tokens at the most (a packed row holds only real tokens, and a micro-batch
# never has more real tokens than its padded form).
BATCH_TOKENS = {"pad": lambda micro_batch_size, cutoff_len: micro_batch_size * cutoff_len,
                "pack": lambda micro_batch_size, cutoff_len: micro_batch_size * cutoff_len}
DEFAULT_LOSS = "fp32_logits"
DEFAULT_BATCHING = "pad"
# Activation bytes per layer, token and hidden unit, in units of 2 bytes (bf16).
ACT_FACTOR_CHECKPOINTED = 6
ACT_FACTOR_FULL = 42
# Fixed per embedding parameter (vocab x hidden), fitted to the measurements above.
CHECKPOINTED_FIXED_BYTES = 1.8
FLOOR_BYTES_QUANTISED = 9.7
FLOOR_BYTES_FULL = 16.4
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# Inference: the prompt window of a generation job, and the longest evaluation window assumed
# when a job says "the model's context" and the config names none.
GENERATE_PROMPT_TOKENS = 512
DEFAULT_CONTEXT = 2048
# Safetensors dtypes, bytes per element (for a model whose config lacks the shape).
_ST_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8,
             "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-like decoder that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int = 0
    max_positions: int = 0

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in features, out features) of each linear projection of one layer."""
        h, i = self.hidden, self.intermediate
        return {"q": (h, self.q_dim), "k": (h, self.kv_dim), "v": (h, self.kv_dim),
                "o": (self.q_dim, h), "gate": (h, i), "up": (h, i), "down": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linear projections (what 4/8-bit quantises)."""
        return self.layers * sum(a * b for a, b in self.projection_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def other_params(self) -> int:
        """Embeddings, norms and an untied output layer: kept out of quantisation."""
        norms = (2 * self.layers + 1) * self.hidden
        return self.embedding_params * (1 if self.tied else 2) + norms

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def shape_from_config(cfg: dict[str, Any]) -> ModelShape | None:
    """The shape from a Hugging Face config.json (Llama, Mistral, Qwen and alike); None when a
    size it needs is missing."""
    cfg = {**(cfg.get("text_config") or {}), **cfg}
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    inter = cfg.get("intermediate_size") or 4 * hidden
    kv = cfg.get("num_key_value_heads") or heads
    return ModelShape(hidden=hidden, intermediate=int(inter), layers=layers, heads=heads,
                      kv_heads=int(kv), vocab=vocab,
                      tied=bool(cfg.get("tie_word_embeddings", False)),
                      head_dim=int(cfg.get("head_dim") or 0),
                      max_positions=int(cfg.get("max_position_embeddings") or 0))


def safetensors_params(folder: Path) -> int:
    """Parameter count from the headers of the folder's *.safetensors files (0 if none)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            continue
        for name, t in header.items():
            if name != "__metadata__" and isinstance(t, dict):
                total += math.prod(t.get("shape") or [1]) if t.get("dtype") in _ST_BYTES else 0
    return total


def lora_params(shape: ModelShape, rank: int, target_modules: list[str]) -> int:
    """Trainable parameters: rank x (in + out) per targeted projection per layer."""
    targets = PROJECTIONS if "all" in target_modules else [t for t in PROJECTIONS
                                                           if t in target_modules]
    per_layer = sum(rank * (a + b) for t, (a, b) in shape.projection_shapes().items()
                    if t in targets)
    return shape.layers * per_layer


def _precision(precision: str) -> str:
    # `auto` is 4-bit QLoRA on a GPU: the card the estimate is for.
    return "4bit" if precision in ("auto", "") else precision


def weight_bytes(shape: ModelShape, precision: str, training: bool) -> float:
    p = _precision(precision)
    if p in QUANTISED:
        other = 4.0 if training else 2.0
    else:
        other = LINEAR_BYTES[p]
    return shape.linear_params * LINEAR_BYTES[p] + shape.other_params * other


def train_peak_bytes(shape: ModelShape, precision: str, rank: int, target_modules: list[str],
                     micro_batch_size: int, cutoff_len: int, *, loss: str = DEFAULT_LOSS,
                     batching: str = DEFAULT_BATCHING) -> float:
    """PyTorch's peak allocation for a LoRA training job (no context, no margin) with the
    engine's `loss` and `batching` levers (KeyError for a name the estimate does not know)."""
    p = _precision(precision)
    tokens = BATCH_TOKENS[batching](micro_batch_size, cutoff_len)
    checkpointed = p in QUANTISED  # the engine checkpoints activations of quantised models
    factor = ACT_FACTOR_CHECKPOINTED if checkpointed else ACT_FACTOR_FULL
    cap = LOSS_TOKEN_CAP[loss]
    logit_tokens = tokens if cap is None else min(tokens, cap)
    activations = (tokens * shape.layers * shape.hidden * 2 * factor
                   + logit_tokens * shape.vocab * LOSS_LOGIT_BYTES[loss])
    if checkpointed:
        activations += shape.embedding_params * CHECKPOINTED_FIXED_BYTES
    floor = shape.embedding_params * (FLOOR_BYTES_QUANTISED if checkpointed else FLOOR_BYTES_FULL)
    return (weight_bytes(shape, p, training=True)
            + lora_params(shape, rank, target_modules) * LORA_STATE_BYTES
            + max(floor, activations))


def inference_peak_bytes(shape: ModelShape, precision: str, tokens: int, loras: int = 0) -> float:
    """Peak for scoring or generating `tokens` at once: weights, one window's activations and
    its fp32 logits and log-probabilities; each LoRA adds a little (counted as rank 64, all)."""
    per_token = shape.layers * shape.hidden * 2 * 4 + shape.vocab * (2 + 4 + 4)
    adapters = loras * lora_params(shape, 64, ["all"]) * 2
    return weight_bytes(shape, precision, training=False) + adapters + tokens * per_token


def to_card_mb(peak_bytes: float) -> int:
    """Card memory for a process whose allocator peaks at `peak_bytes`: 5% more, the CUDA
    context, rounded up to 64 MB."""
    mb = CUDA_CONTEXT_MB + peak_bytes * MARGIN / MB
    return int(math.ceil(mb / ROUND_MB) * ROUND_MB)


def _int(spec: dict[str, Any], key: str, default: int) -> int:
    try:
        return int(spec.get(key, default))
    except (TypeError, ValueError):
        return default


def read_model_shape(folder: Path) -> ModelShape | None:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return shape_from_config(cfg) if isinstance(cfg, dict) else None


# Config keys of models whose logits are more than the output layer's product: the engine's
# fused loss does not apply to them (gpuworker.engine.losses.split_causal_lm), so a job that
# asks for it runs, and is estimated, with the full logits.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def transforms_logits(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # unknown: estimate as if the full logits are built
    return not isinstance(cfg, dict) or any(
        cfg.get(k, plain) not in (plain, None) for k, plain in LOGIT_TRANSFORMS.items())


def _setting(spec: dict[str, Any], name: str) -> Any:
    """A training spec's setting, its default where the spec leaves it out (a bare spec sent
    to /api/v1/estimate is estimated as the job it would become)."""
    from dispatcher.jobs.specs.fields import _to_bool  # here: the specs import this module
    from dispatcher.jobs.specs.train import TrainSpec

    default = TrainSpec.__dataclass_fields__[name].default
    if name not in spec:
        return default
    try:  # as the spec's parse reads it ("true", 1, "" ...)
        return _to_bool(spec[name]) if isinstance(default, bool) else spec[name]
    except ValueError:
        return default  # the parse refuses it; the estimate need not


def job_memory_mb(kind: str, spec: dict[str, Any], models: Path) -> int:
    """The card memory (MB) a job of `kind` with `spec` needs; 0 when the model cannot be read
    (then the job is not held back by memory). A spec's `min_gpu_memory_mb` > 0 replaces the
    estimate: the user knows their job best."""
    own = _int(spec, "min_gpu_memory_mb", 0)
    if own > 0:
        return own
    name = str(spec.get("base_model") or "")
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return 0
    folder = models / name
    precision = str(spec.get("precision") or "auto")
    if precision not in ("auto", *LINEAR_BYTES):
        return 0
    shape = read_model_shape(folder)
    if shape is None:
        # No usable config: the weights alone, doubled for training (a rough guess).
        n = safetensors_params(folder)
        if not n:
            return 0
        per = LINEAR_BYTES[_precision(precision)]
        return to_card_mb(n * per * (2.0 if kind == "train" else 1.2))
    if kind == "train":
        targets = spec.get("target_modules") or ["q", "v"]
        if isinstance(targets, str):
            targets = [t for t in targets.replace(",", " ").split() if t]
        peak = train_peak_bytes(shape, precision, max(1, _int(spec, "lora_rank", 32)),
                                list(targets), max(1, _int(spec, "micro_batch_size", 4)),
                                max(1, _int(spec, "cutoff_len", 256)),
                                # The job's speed settings (boundary.levers_from_spec's names).
                                loss=("fused" if _setting(spec, "fused_loss") is True
                                      and not transforms_logits(folder) else DEFAULT_LOSS),
                                batching=("pack" if _setting(spec, "packing") is True
                                          else DEFAULT_BATCHING))
    elif kind == "evaluate":
        window = _int(spec, "max_length", 0) or shape.max_positions or DEFAULT_CONTEXT
        peak = inference_peak_bytes(shape, precision, min(window, 32768),
                                    len(spec.get("loras") or []))
    else:
        tokens = GENERATE_PROMPT_TOKENS + _int(spec, "max_new_tokens", 128)
        peak = inference_peak_bytes(shape, precision, tokens, 1 if spec.get("lora") else 0)
    return to_card_mb(peak)


def base_memory_mb(spec: dict[str, Any], models: Path) -> int:
    """Of a training job's estimate, what its base model's weights (and the CUDA context)
    take: a pack of trials holds them once (0 when the model cannot be read: then a pack is
    estimated as its trials side by side)."""
    name = str(spec.get("base_model") or "")
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return 0
    precision = str(spec.get("precision") or "auto")
    shape = read_model_shape(models / name)
    if shape is None or precision not in ("auto", *LINEAR_BYTES):
        return 0
    return to_card_mb(weight_bytes(shape, precision, training=True))


def pack_lane_mb(specs: list[dict[str, Any]], models: Path) -> int:
    """What one trial of these adds when trained in a pack: its row of the adapted layers'
    stacks (gpuworker/engine/pack.py), fp32 weights and their gradient, padded to the
    largest rank of them over every projection any of them targets. An upper bound for any
    pack of these trials (0 when the model cannot be read)."""
    if not specs:
        return 0
    name = str(specs[0].get("base_model") or "")
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return 0
    shape = read_model_shape(models / name)
    if shape is None:
        return 0
    rank = max(max(1, _int(s, "lora_rank", 32)) for s in specs)
    targets: set[str] = set()
    for s in specs:
        t = s.get("target_modules") or ["q", "v"]
        targets.update(t.replace(",", " ").split() if isinstance(t, str) else t)
    return math.ceil(lora_params(shape, rank, sorted(targets)) * PACK_STACK_BYTES / MB)


def pack_memory_mb(trials: list[tuple[int, int, int]]) -> int:
    """The card memory of trials (job estimate, base part, stack row) trained together over
    one base: every trial's estimate, the shared base counted once, and (two or more
    trials) every trial's row of the stacks."""
    if not trials:
        return 0
    base = min(b for _, b, _ in trials)
    stacks = sum(lane for _, _, lane in trials) if len(trials) > 1 else 0
    return sum(mb for mb, _, _ in trials) - base * (len(trials) - 1) + stacks
