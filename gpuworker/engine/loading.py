"""Phase 1: pick the device and precision, load the tokenizer and the base model.

This is the only place a model is moved to a device: quantised models are placed by
`from_pretrained(device_map=...)` (bitsandbytes quantises while loading onto the GPU), the
others are loaded on the CPU and moved with one `.to(device)`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpuworker.engine.config import QUANTISED
from gpuworker.errors import EngineError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(device: str | None) -> torch.device:
    """The device to train on: the one asked for, else the first CUDA GPU, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise EngineError(f"unknown device '{device}': {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device '{device}' was asked for, but this worker has no CUDA GPU")
    return dev


def resolve_precision(precision: str, device: torch.device,
                      warn: Callable[[str], None] | None = None) -> str:
    """The concrete precision for `device`; refuses quantisation without CUDA or bitsandbytes.

    'auto' is 4bit (QLoRA) on a GPU and fp32 on the CPU; on a GPU without a working
    bitsandbytes it falls back to bf16 (fp16 on cards without bf16) and says so through `warn`.
    """
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        try:
            require_bitsandbytes("precision 4bit")
            return "4bit"
        except EngineError as e:
            half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            if warn:
                warn(f"precision auto: {e}; training in {half} instead, which needs about four "
                     "times the GPU memory for the base model")
            return half
    if precision in QUANTISED:
        if device.type != "cuda":
            raise EngineError(
                f"precision {precision} (QLoRA, bitsandbytes) needs a CUDA GPU, and this job runs "
                f"on the {device.type}; choose fp32 or bf16 to train on the CPU")
        require_bitsandbytes(f"precision {precision}")
    elif precision not in _DTYPES:
        raise EngineError(f"unknown precision '{precision}'; use auto, 4bit, 8bit, bf16, fp16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EngineError("precision bf16 is not supported by this GPU; choose fp16 or 4bit")
    return precision


def require_bitsandbytes(what: str) -> None:
    """Refuse early, with the install hint, when bitsandbytes cannot be used.

    Imported here, lazily, and only for quantised precisions and 8-bit optimizers: it is a
    CUDA-only package that CPU workers do not have.
    """
    hint = "pip install 'lorafleet[gpu]' (CUDA machines only)"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EngineError(f"{what} needs the bitsandbytes package on the worker: {hint}")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # a broken install fails in many ways; the user needs to know which
        raise EngineError(f"{what} needs bitsandbytes, which is installed but does not load "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): {hint}") from None


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the forward pass, or None to run in the weights' own dtype.

    On CUDA, quantised and half-precision weights compute in bf16 (fp16 where the card lacks
    bf16, or where fp16 was asked for); fp32 and anything on the CPU run without autocast.
    """
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@dataclass
class LoadedModel:
    """The base model as loaded, with what the LoRA folder's training_log.json records."""

    model: Any
    precision: str
    model_class: str
    model_type: str
    total_params: int
    upcast: bool = True  # quantised: fp32 copies of the weights that are not quantised


def check_model_folder(folder: Path, name: str) -> None:
    if not folder.is_dir():
        raise EngineError(f"base model '{name}' was not found in models/")
    if not (folder / "config.json").is_file():
        raise EngineError(f"base model '{name}' has no config.json: not a Hugging Face model folder")


def load_tokenizer(folder: Path, name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise EngineError(f"could not load the tokenizer of '{name}': {e}") from None
    return tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """Padding id for batches: the tokenizer's own, else EOS, else 0 (as text-generation-webui).

    Its value never reaches the loss: padded positions have attention 0 and label -100.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def load_base_model(folder: Path, name: str, precision: str, device: torch.device,
                    log: Any, upcast: bool = True) -> LoadedModel:
    """Load `folder` in `precision` and put it on `device` (the one move to the device).

    `upcast` (quantised precisions): peft's preparation, which casts every weight that is not
    quantised (embeddings, norms, output layer) to fp32, so the hidden states between the
    layers run in fp32; without it they stay in the compute dtype, as in plain bf16 training
    (half the memory traffic of the many small operations, and no fp32 copy of the output
    layer). Either way the base is frozen and its activations are checkpointed."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if precision in QUANTISED:
        from transformers import BitsAndBytesConfig

        cdtype = compute_dtype(precision, device) or torch.bfloat16
        if not upcast and cdtype == torch.float16:
            # fp16's range is too small for the hidden states between layers of some models.
            log("fp32_norms off needs bf16, which this card lacks: keeping fp32 copies of the "
                "norms, embeddings and output layer")
            upcast = True
        if precision == "4bit":
            # QLoRA: NF4 weights, the quantisation constants quantised too, bf16 matmuls.
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=cdtype)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = cdtype
        kwargs["device_map"] = {"": device.index if device.index is not None
                                else torch.cuda.current_device()}
    else:
        kwargs["dtype"] = _DTYPES[precision]

    log(f"Loading {name} ({precision}) on {device}...")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ImportError as e:  # e.g. a bitsandbytes too old for this transformers
        raise EngineError(f"could not load base model '{name}' in {precision}: {e}") from None
    except (OSError, ValueError, KeyError) as e:
        raise EngineError(f"could not load base model '{name}': {e}") from None
    if precision not in QUANTISED:
        model.to(device)
    # The KV cache is for generation; in training it only costs memory.
    model.config.use_cache = False
    if precision in QUANTISED and upcast:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32, freezes the base, and turns on gradient checkpointing, which
        # QLoRA relies on to fit large models.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif precision in QUANTISED:
        for p in model.parameters():
            p.requires_grad_(False)
        # Non-reentrant checkpointing needs no input that requires grad and keeps the RNG
        # state of the LoRA dropout for the recomputation.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model, precision=precision, model_class=type(model).__name__,
                       model_type=str(getattr(model.config, "model_type", "")),
                       total_params=total, upcast=upcast)
