"""`generate(...)`: the base model's answer to a prompt and, beside it, the answer with a LoRA.

    check     names and settings that can be refused without loading a model
    prompt    the prompt text (through a format file when one is given) and its ids
    model     base model on the device, the LoRA on it (loaded once)
    answers   base (LoRA layers disabled), then base + LoRA, each after torch.manual_seed(seed)
    clean up  drop the model and free GPU memory, whatever happened

Both answers start from the same seed and the same prompt ids, so with sampling they draw the
same random numbers and any difference comes from the LoRA. Temperature 0 is greedy decoding.
When sampling, only `temperature` and `top_p` shape the distribution (top-k is turned off);
other defaults of the model's generation_config.json (e.g. its EOS ids) still apply.

The prompt, with a format file (see :func:`format_prompt`): the file's entry for the key set
{instruction, output}, else its entry for {instruction}, rendered with instruction = the
prompt, and cut just before the text the %output% placeholder stands for. That is exactly the
beginning of the training text of a row with this instruction, so the model continues where it
learned to write the answer. Without a format file the prompt is used as it is; a chat
template the tokenizer may carry is deliberately *not* applied, because LoRAs trained here
learn their format file's text, not the tokenizer's template. Either way the text is tokenized
like training text: with the tokenizer's special tokens, a leading BOS run collapsed to one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpuworker.engine.cleanup import run_releasing
from gpuworker.engine.config import Folders
from gpuworker.engine.evaluate import (
    autocast_for,
    check_lora_names,
    load_saved_loras,
)
from gpuworker.engine.loading import (
    check_model_folder,
    load_base_model,
    load_tokenizer,
    pad_token_id,
    pick_device,
    resolve_precision,
)
from gpuworker.engine.report import Report
from gpuworker.errors import EngineError

Progress = Callable[[dict[str, Any]], None]
PROMPT_KEY_SETS = (frozenset({"instruction", "output"}), frozenset({"instruction"}))


def format_prompt(fmt: Any, prompt: str) -> str:
    """The text a model is asked to continue: `prompt` in format `fmt` (a formats.Format).

    The first entry whose key set is {instruction, output} is used, else the first whose key
    set is {instruction}. The entry's template is rendered with formats' own substitution
    (instruction = `prompt`) and cut at the first place where %output% stood: the result is
    the rendering with output = "" up to that place, and nothing of the template after it.
    A template without %output% is rendered whole.
    """
    from formats.templates import substitute

    for keys in PROMPT_KEY_SETS:
        entry = next((e for e in fmt.entries if e.keys == keys), None)
        if entry is not None:
            break
    else:
        raise EngineError(f"format {Path(fmt.source).name} has no entry for the keys "
                          f"{{instruction, output}} or {{instruction}} (its key sets: "
                          f"{fmt.key_sets()})")
    # A marker found neither in the prompt nor in the template marks where %output% stood.
    n = 0
    while (marker := f"\ue000{n}\ue000") in prompt or marker in entry.template:
        n += 1
    rendered = substitute(entry.template, {"instruction": prompt, "output": marker})
    cut = rendered.find(marker)
    return rendered if cut < 0 else rendered[:cut]


def generate(*, base_model: str, lora: str | None, prompt: str, format_file: Path | None,
             paths: Folders, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, seed: int = 0, precision: str = "auto", progress: Progress,
             should_stop: Callable[[], bool], log: Callable[[str], None],
             device: str | None = None) -> dict[str, Any]:
    """Answer `prompt` with `base_model`, and with `base_model` + `lora` when one is given.

    Emits {"type": "generate_progress", "answer": "base" | "lora", "answers", "text",
    "tokens", "seconds"} after each answer. `should_stop()` is checked after every generated
    token and between the answers; a stop returns what was generated with "stopped": True.
    Raises EngineError (with a message for the user) for anything the user can fix.
    """
    dev = pick_device(device)
    return run_releasing(
        dev, lambda: _generate(base_model, lora, prompt, format_file, paths, max_new_tokens,
                               temperature, top_p, seed, precision, progress, should_stop, log,
                               dev),
        f"lower max_new_tokens (now {max_new_tokens})"
        + ("" if precision == "4bit" else " or use precision 4bit"))


def _check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be at least 1 (now {max_new_tokens})")
    if temperature < 0:
        raise EngineError(f"temperature must be 0 (greedy) or more (now {temperature})")
    if not 0 < top_p <= 1:
        raise EngineError(f"top_p must be more than 0 and at most 1 (now {top_p})")


def _generate(base_model: str, lora: str | None, prompt: str, format_file: Path | None,
              paths: Folders, max_new_tokens: int, temperature: float, top_p: float,
              seed: int, precision: str, progress: Progress, should_stop: Callable[[], bool],
              log: Callable[[str], None], device: torch.device) -> dict[str, Any]:
    # -- check ---------------------------------------------------------------------------------
    _check_settings(max_new_tokens, temperature, top_p)
    model_dir = paths.models / base_model
    check_model_folder(model_dir, base_model)
    loras = [lora] if lora else []
    folders = check_lora_names(loras, paths)
    prompt_text = prompt if format_file is None else format_prompt(_load_format(format_file),
                                                                   prompt)
    precision = resolve_precision(precision, device, Report(progress, should_stop, log).warn)

    # -- prompt --------------------------------------------------------------------------------
    from formats.tokenize import collapse_leading_bos, encode

    tokenizer = load_tokenizer(model_dir, base_model)
    ids = collapse_leading_bos(encode(tokenizer, prompt_text, special_tokens=True),
                               tokenizer.bos_token_id)
    if not ids:
        raise EngineError("the prompt is empty")

    # -- model ---------------------------------------------------------------------------------
    loaded = load_base_model(model_dir, base_model, precision, device, log)
    model = load_saved_loras(loaded.model, loras, folders, base_model, log)
    del loaded
    model.eval()
    # load_base_model turns the KV cache off (it only costs memory in training); generation
    # without it would recompute the whole prefix for every new token.
    model.config.use_cache = True

    do_sample = temperature > 0
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "seed": seed, "do_sample": do_sample, "precision": precision, "device": str(device),
        "base_model": base_model, "lora": lora,
        "format": format_file.name if format_file is not None else None,
    }
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) \
        if do_sample else dict(do_sample=False)
    stop = _StopWhenAsked(should_stop)
    answerer = _Answerer(model, tokenizer, torch.tensor([ids], dtype=torch.long, device=device),
                         dict(max_new_tokens=max_new_tokens, stopping_criteria=[stop],
                              **sampling),
                         seed, precision, Report(progress, should_stop, log), 1 + bool(lora))

    # -- answers -------------------------------------------------------------------------------
    if lora:
        with model.disable_adapter():
            base = answerer("base")
    else:
        base = answerer("base")
    with_lora = None
    if lora and not stop.stopped and not should_stop():
        with_lora = answerer("lora")
    stopped = stop.stopped or (bool(lora) and with_lora is None)
    if stopped:
        log("Stopped; the answers so far are returned")
    return {"prompt_text": prompt_text, "base": base, "lora": with_lora, "settings": settings,
            "stopped": stopped}


class _Answerer:
    """One answer to the prompt ids (1, P), each from the same seed, with a progress event."""

    def __init__(self, model: Any, tokenizer: Any, input_ids: torch.Tensor,
                 generation: dict[str, Any], seed: int, precision: str, report: Report,
                 answers: int):
        self.model, self.tokenizer, self.input_ids = model, tokenizer, input_ids
        self.generation, self.seed, self.precision = generation, seed, precision
        self.report, self.answers = report, answers

    def __call__(self, which: str) -> dict[str, Any]:
        self.report.log(f"Generating the {which} answer...")
        started = time.perf_counter()
        input_ids = self.input_ids
        torch.manual_seed(self.seed)  # seeds the CPU and every CUDA device
        with torch.no_grad(), autocast_for(self.precision, input_ids.device):
            out = self.model.generate(input_ids=input_ids,
                                      attention_mask=torch.ones_like(input_ids),
                                      pad_token_id=pad_token_id(self.tokenizer), use_cache=True,
                                      **self.generation)
        new = out[0, input_ids.shape[1]:].tolist()
        result = {"text": self.tokenizer.decode(new, skip_special_tokens=True),
                  "tokens": len(new), "seconds": round(time.perf_counter() - started, 3)}
        self.report.progress({"type": "generate_progress", "answer": which,
                              "answers": self.answers, **result})
        return result


def _load_format(format_file: Path) -> Any:
    from formats import FormatError, load_format

    if not Path(format_file).is_file():
        raise EngineError(f"format file '{Path(format_file).name}' was not found")
    try:
        return load_format(format_file)
    except (FormatError, OSError) as e:
        raise EngineError(str(e).replace(str(format_file), Path(format_file).name)) from None


class _StopWhenAsked:
    """A transformers stopping criterion that ends generation when `should_stop()` says so."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.stopped = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if not self.stopped and self.should_stop():
            self.stopped = True
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool,
                          device=input_ids.device)
