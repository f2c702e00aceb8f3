"""`perplexity(...)`: how well a base model, alone or with LoRAs, predicts a text.

    check     names and numbers that can be refused without loading a model
    text      tokenizer + the text's ids
    model     base model on the device, then the LoRAs on it, all active together
    windows   sliding-window negative log-likelihood, a progress event per window
    clean up  drop the model and free GPU memory, whatever happened

The method is Hugging Face's "perplexity of fixed-length models". The text is tokenized once
with the tokenizer's special tokens (a BOS at the start where the tokenizer adds one). Windows
of at most `max_length` ids start at 0, stride, 2*stride, ... and the last one ends with the
text. A window scores only the ids after the end of the window before it (their labels; the
rest of the window is context, label -100), so every id is scored once, with as much context
as the window leaves it. The very first id has nothing before it and is never scored, so with
windows that overlap (stride < max_length) exactly len(ids) - 1 ids are scored. With
stride == max_length the windows do not overlap and the first id of every window has no
context inside it either: it is not scored, and len(ids) - windows ids are.

    perplexity = exp(sum of the scored ids' negative log-likelihoods / number of scored ids)

This is the mean over ids, not over windows: text-generation-webui averages the windows'
mean losses, which gives a short last window as much weight as a full one.

Several LoRAs are combined by loading each as its own peft adapter and activating them all at
once (`set_adapter([...])` of the LoRA layer model): every LoRA layer then adds the sum of the
adapters' updates, each with its own rank and alpha, which is the same as applying the LoRAs
one after the other to the weights. Nothing is merged or re-weighted (peft's
`add_weighted_adapter` would build a new adapter, and its "linear" mode mixes the A and B
matrices, which is not the sum of the updates).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dispatcher.access.links import inside
from gpuworker.engine.cleanup import run_releasing
from gpuworker.engine.config import Folders
from gpuworker.engine.loading import (
    check_model_folder,
    compute_dtype,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_precision,
)
from gpuworker.engine.lora import ADAPTER_CONFIG, existing_adapter
from gpuworker.engine.report import Report
from gpuworker.errors import EngineError

Progress = Callable[[dict[str, Any]], None]
TEXT_EXTS = (".txt",)


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Window:
    """One forward pass: ids[begin:end] go in, ids[first:end] are scored."""

    begin: int
    end: int
    first: int

    @property
    def scored(self) -> int:
        return self.end - self.first


def plan_windows(n_ids: int, max_length: int, stride: int) -> list[Window]:
    """The windows over a text of `n_ids` ids (see the module docstring)."""
    if n_ids < 2 or max_length < 2 or not 0 < stride <= max_length:
        raise ValueError(f"bad window plan: {n_ids} ids, max_length {max_length}, stride {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, n_ids, stride):
        end = min(begin + max_length, n_ids)
        # An id needs the id before it inside the window to be predicted.
        windows.append(Window(begin=begin, end=end, first=max(prev_end, begin + 1)))
        prev_end = end
        if end == n_ids:
            break
    return windows


def model_context_length(config: Any) -> int | None:
    """The context length a model config declares, or None when it names none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def safe_exp(x: float) -> float:
    """exp(x), or the largest float where it would overflow (events are strict JSON)."""
    try:
        return math.exp(x)
    except OverflowError:
        return 1.7976931348623157e308


# --------------------------------------------------------------------------- shared with generate


def check_lora_names(names: list[str], paths: Folders) -> list[Path]:
    """The folders of the LoRAs `names`, each checked to hold a saved adapter."""
    folders = []
    for name in names:
        p = Path(name)
        if not name.strip() or p.is_absolute() or ".." in p.parts:
            raise EngineError(f"LoRA '{name}' must be a folder name inside loras/")
        folder = paths.loras / name
        if not folder.is_dir():
            raise EngineError(f"LoRA '{name}' was not found in loras/")
        if not inside(folder, paths.loras):
            raise EngineError(f"loras/{name} is a link that leads outside loras/: it is not "
                              "loaded")
        if existing_adapter(folder) is None or not (folder / ADAPTER_CONFIG).is_file():
            raise EngineError(f"LoRA '{name}' has no saved adapter (adapter_config.json and "
                              "adapter_model.safetensors): was its training stopped before "
                              "it saved?")
        if folder in folders:
            raise EngineError(f"LoRA '{name}' is listed twice")
        folders.append(folder)
    return folders


def _saved_keys(folder: Path) -> set[str]:
    found = existing_adapter(folder)
    assert found is not None  # check_lora_names made sure
    if found.weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(found.weights), framework="pt") as f:
            return set(f.keys())
    return set(torch.load(found.weights, map_location="cpu", weights_only=True))


def load_saved_loras(model: Any, names: list[str], folders: list[Path], base_model: str,
                     log: Callable[[str], None]) -> Any:
    """`model` wrapped with the saved LoRAs, all active together, for inference only.

    Adapters are named lora0, lora1, ... inside peft (a LoRA's own name may hold dots, which
    peft's module names cannot). A LoRA that does not fit the base model is an EngineError
    naming it: peft refuses wrong shapes and missing target modules itself, but silently
    skips weights for modules the model lacks (a LoRA of a deeper model), so the saved
    weight names are compared with what was loaded.
    """
    if not names:
        return model
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    adapters = [f"lora{i}" for i in range(len(names))]
    for i, (name, folder, adapter) in enumerate(zip(names, folders, adapters, strict=True)):
        log(f"Loading LoRA {name}...")
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter,
                                                  is_trainable=False)
            else:
                model.load_adapter(str(folder), adapter_name=adapter, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            # peft's "target modules not found" is a ValueError; wrong shapes a RuntimeError.
            raise EngineError(f"LoRA '{name}' does not fit base model '{base_model}' "
                              f"({str(e).strip().splitlines()[0][:300]})") from None
        # save_embedding_layers=False: "auto" would look the base model's name up online.
        loaded = set(get_peft_model_state_dict(model, adapter_name=adapter,
                                               save_embedding_layers=False))
        skipped = sorted(k for k in _saved_keys(folder) - loaded if "lora_" in k)
        if skipped:
            raise EngineError(f"LoRA '{name}' does not fit base model '{base_model}': it has "
                              f"weights for modules the model lacks ({skipped[0]}, ...)")
    if len(adapters) > 1:
        # PeftModel.set_adapter takes one name; the LoRA model underneath takes a list.
        model.base_model.set_adapter(adapters, inference_mode=True)
        log(f"{len(adapters)} LoRAs active together: {', '.join(names)}")
    return model


def autocast_for(precision: str, device: torch.device) -> Any:
    """The autocast context the training loop uses for this precision (or a null context)."""
    import contextlib

    dtype = compute_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- perplexity


def perplexity(*, base_model: str, loras: list[str], text_file: str, paths: Folders,
               stride: int = 512, max_length: int = 0, precision: str = "auto",
               progress: Progress, should_stop: Callable[[], bool],
               log: Callable[[str], None], device: str | None = None) -> dict[str, Any]:
    """Perplexity of `base_model` (+ `loras`, all active together) on datasets/`text_file`.

    `max_length` 0 means the model's context length (config.max_position_embeddings).
    Emits {"type": "eval_progress", "window", "windows", "ppl_so_far"} after every window and
    checks `should_stop()` before each; a stop returns the value so far with "stopped": True.
    Raises EngineError (with a message for the user) for anything the user can fix.
    """
    dev = pick_device(device)
    return run_releasing(
        dev, lambda: _perplexity(base_model, list(loras), text_file, paths, stride, max_length,
                                 precision, progress, should_stop, log, dev),
        f"lower max_length (now {max_length or 'the context'})"
        + ("" if precision == "4bit" else " or use precision 4bit"))


@dataclass
class _Plan:
    """What the check phase of a perplexity job resolved."""

    model_dir: Path
    folders: list[Path]
    text_path: Path
    max_length: int
    precision: str


def _check(base_model: str, loras: list[str], text_file: str, paths: Folders, stride: int,
           max_length: int, precision: str, report: Report, device: torch.device) -> _Plan:
    """Everything that can be refused without loading a model; `max_length` 0 resolved."""
    if stride <= 0:
        raise EngineError(f"stride must be at least 1 (now {stride})")
    if max_length < 0 or max_length == 1:
        raise EngineError(f"max_length must be 0 (the model's context) or at least 2 "
                          f"(now {max_length})")
    model_dir = paths.models / base_model
    check_model_folder(model_dir, base_model)
    folders = check_lora_names(loras, paths)
    text_path = _resolve_text_file(text_file, paths)
    context = _context_length(model_dir, base_model)
    if max_length == 0:
        if context is None:
            raise EngineError(f"base model '{base_model}' does not state its context length; "
                              "set max_length")
        max_length = context
    if stride > max_length:
        raise EngineError(f"stride ({stride}) cannot be larger than max_length ({max_length})")
    if context is not None and max_length > context:
        report.warn(f"max_length {max_length} is longer than the {context} tokens base model "
                    f"'{base_model}' was built for; its perplexity past that is not meaningful")
    precision = resolve_precision(precision, device, report.warn)
    return _Plan(model_dir=model_dir, folders=folders, text_path=text_path,
                 max_length=max_length, precision=precision)


def _perplexity(base_model: str, loras: list[str], text_file: str, paths: Folders,
                stride: int, max_length: int, precision: str, progress: Progress,
                should_stop: Callable[[], bool], log: Callable[[str], None],
                device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    report = Report(progress, should_stop, log)
    plan = _check(base_model, loras, text_file, paths, stride, max_length, precision, report,
                  device)
    max_length, precision = plan.max_length, plan.precision

    # -- text ----------------------------------------------------------------------------------
    tokenizer = load_tokenizer(plan.model_dir, base_model)
    text = _read_text(plan.text_path, paths)
    ids = list(tokenizer.encode(text, add_special_tokens=True, verbose=False))
    if len(ids) < 2:
        raise EngineError(f"text_file '{text_file}' is {len(ids)} token(s) long; perplexity "
                          "needs at least 2")
    windows = plan_windows(len(ids), max_length, stride)
    log(f"{len(ids)} tokens in {len(windows)} window(s) of at most {max_length}, "
        f"stride {stride}")

    # -- model ---------------------------------------------------------------------------------
    loaded = load_base_model(plan.model_dir, base_model, precision, device, log)
    model = load_saved_loras(loaded.model, loras, plan.folders, base_model, log)
    del loaded
    model.eval()

    total_nll, scored, done, stopped = _score(model, ids, windows, precision, device, report)
    value = safe_exp(total_nll / scored) if scored else None
    runtime = time.perf_counter() - started
    if value is not None:
        log(f"Perplexity {value:.4f} over {scored} tokens ({runtime:.1f} s)")
    return {
        "perplexity": value, "tokens": scored, "windows": done, "windows_total": len(windows),
        "text_tokens": len(ids), "stride": stride, "max_length": max_length,
        "base_model": base_model, "loras": loras, "text_file": text_file,
        "precision": precision, "device": str(device), "stopped": stopped,
        "runtime_s": round(runtime, 3),
    }


def _score(model: Any, ids: list[int], windows: list[Window], precision: str,
           device: torch.device, report: Report) -> tuple[float, int, int, bool]:
    """Sliding-window NLL: (sum of the scored ids' NLL, ids scored, windows done, stopped),
    a progress event per window, `should_stop()` asked before each."""
    input_ids = torch.tensor([ids], dtype=torch.long)  # (1, N), moved a window at a time
    total_nll, scored, done = 0.0, 0, 0
    with torch.no_grad():
        for i, w in enumerate(windows, start=1):
            if report.should_stop():
                report.log(f"Stopped after {done} of {len(windows)} windows")
                return total_nll, scored, done, True
            chunk = input_ids[:, w.begin:w.end].to(device)  # (1, T)
            targets = chunk[0, w.first - w.begin:]  # (S,)
            with autocast_for(precision, device):
                logits = _last_logits(model, chunk, w.scored + 1)  # (1, S + 1, V)
            # logits[t] predicts id t + 1: the last position predicts past the window.
            nll = torch.nn.functional.cross_entropy(
                logits[0, :-1].float(), targets, reduction="sum")
            total_nll += float(nll)
            if not math.isfinite(total_nll):
                raise EngineError(f"the model's loss became {total_nll} in window {i} "
                                  f"(precision {precision}); try fp32 or bf16")
            scored += w.scored
            done = i
            report.progress({"type": "eval_progress", "window": i, "windows": len(windows),
                             "ppl_so_far": safe_exp(total_nll / scored)})
    return total_nll, scored, done, False


def _resolve_text_file(text_file: str, paths: Folders) -> Path:
    from gpuworker.engine.boundary import resolve_data_name

    rel, error = resolve_data_name(text_file, paths.datasets, TEXT_EXTS, allow_dir=True)
    if rel is None:
        if Path(text_file.strip()).suffix.lower() in (".json", ".jsonl"):
            error = f"'{text_file}' is a dataset; perplexity reads plain .txt text"
        raise EngineError(f"text_file {error}")
    return paths.datasets / rel


def _read_text(path: Path, paths: Folders) -> str:
    from formats import FormatError, read_raw_text

    try:
        # A folder's .txt files are joined with the raw-text hard cut (three newlines).
        return read_raw_text(path)
    except (FormatError, OSError) as e:
        raise EngineError(str(e).replace(f"{paths.home}{os.sep}", "")) from None


def _context_length(model_dir: Path, name: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise EngineError(f"could not read the config of base model '{name}': {e}") from None
    # Multimodal configs keep the language model's settings in text_config.
    return model_context_length(getattr(config, "text_config", None) or config)


def _last_logits(model: Any, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits of the last `keep` positions: (1, keep, V).

    Most models compute only those when asked (`logits_to_keep`), which saves a
    (T, vocabulary) tensor per window; the others compute all and are sliced.
    """
    try:
        return model(input_ids=input_ids, logits_to_keep=keep).logits[:, -keep:]
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
    return model(input_ids=input_ids).logits[:, -keep:]
