"""The training job spec: one typed object built by the form, the REST API, the CLI and sweeps.

Field names and defaults are those of text-generation-webui's "Train LoRA" tab, so a
`training_parameters.json` written by either tool can be read by the other: this module holds
the spec and both conversions (its vocabulary is in specs/webui.py). Validation lives in
specs/train_checks.py (`parse_train_spec`) and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dispatcher.access.links import inside
from dispatcher.jobs.problems import SpecError
from dispatcher.jobs.specs.fields import (
    CHECKPOINTING,
    DATASET_EXTS,
    LORA_NAME_RE,
    OPTIMIZERS,
    PRECISIONS,
    RAW_TEXT_EXTS,
    SCHEDULERS,
    defaults,
)
from dispatcher.jobs.specs.fields import spec_field as _f
from dispatcher.jobs.specs.names import resolve_data_name
from dispatcher.jobs.specs.webui import (
    LORAFLEET_FILES,
    WEBUI_CHOICES,
    WEBUI_NONE,
    WEBUI_ONLY,
    WEBUI_PARAMETERS,
    WEBUI_PROJECTION_KEYS,
    is_webui_spec,
    webui_choice,
    webui_true,
)
from dispatcher.settings import DataPaths


@dataclass
class TrainSpec:
    """A LoRA training job. Paths are resolved names inside the data folder."""

    lora_name: str = _f("", "Name of the LoRA: its folder under loras/.")
    base_model: str = _f("", "Base model: a folder under models/.", choice="models")
    always_override: bool = _f(False, "Replace an existing LoRA of this name instead of continuing it.")
    save_steps: int = _f(0, "Save a checkpoint every this many optimizer steps (0 = only at the end).")
    micro_batch_size: int = _f(4, "Samples per forward pass; lower it if memory runs out.")
    batch_size: int = _f(128, "Samples per optimizer step (gradient accumulation = batch / micro batch).")
    epochs: float = _f(3.0, "Passes over the dataset.")
    learning_rate: str = _f("3e-4", "Learning rate, in scientific notation (3e-4 is 0.0003).")
    lr_scheduler_type: str = _f("linear", "How the learning rate changes over the run.", choices=SCHEDULERS)
    lora_rank: int = _f(32, "LoRA rank (dimension): larger learns more and uses more memory.")
    lora_alpha: int = _f(64, "LoRA alpha: scaling = alpha / rank; usually twice the rank.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA layers, 0 to 1.")
    cutoff_len: int = _f(256, "Longest sample in tokens; longer text is cut.")
    dataset: str = _f("", "Alpaca-style JSON dataset under datasets/.", choice="datasets")
    eval_dataset: str = _f("", "Optional evaluation dataset (same format as the dataset).", choice="datasets")
    format: str = _f("", "Format file that turns a dataset row into text.", choice="formats")
    eval_steps: int = _f(100, "Evaluate every this many optimizer steps (with an evaluation dataset).")
    raw_text_file: str = _f("", "Raw text file (or folder of .txt files) under datasets/, instead of a dataset.", choice="raw_texts")
    overlap_len: int = _f(128, "Raw text: tokens shared between consecutive chunks.")
    newline_favor_len: int = _f(128, "Raw text: move chunk edges to a newline within this many characters.")
    higher_rank_limit: bool = _f(False, "Allow ranks up to 2048 (instead of 1024).")
    warmup_steps: int = _f(100, "Optimizer steps of learning-rate warm-up at the start.")
    optimizer: str = _f("adamw_torch", "How weights are updated; adamw_torch is the usual choice, the 8-bit and paged ones save memory (CUDA only).", choices=OPTIMIZERS)
    hard_cut_string: str = _f("\\n\\n\\n", "Raw text: split the text at this string (\\n means a newline); no chunk crosses it.")
    train_only_after: str = _f("", "Train only on the text after this string in each sample (e.g. 'Assistant:').")
    stop_at_loss: float = _f(0.0, "Stop once the loss reaches this value (0 = never).")
    add_eos_token: bool = _f(False, "Append the end-of-sequence token to each sample.")
    min_chars: int = _f(0, "Raw text: ignore blocks shorter than this many characters.")
    precision: str = _f("auto", "Weights: 4bit/8bit (QLoRA, CUDA only), bf16, fp16, fp32; auto = 4bit on a GPU, fp32 on CPU.", choices=PRECISIONS)
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"], metadata={
        "help": "Projections that get LoRA layers: q, k, v, o, gate, up, down, or all."})
    seed: int = _f(0, "Random seed for initialisation and data order.")
    resume_from_checkpoint: str = _f("", "Resume this LoRA's run from a checkpoint: latest, or checkpoint-<step> (empty = start anew).")
    min_gpu_memory_mb: int = _f(0, "Card memory in MB this job needs before it is placed, and (with gradient_checkpointing auto) stays within; 0 = the dispatcher's estimate, and the card's free memory.")
    # Speed settings: how the engine computes, not what it learns (README, "Engine speed levers").
    fused_loss: bool = _f(True, "Compute the loss with the output layer a chunk at a time, never all the logits (less memory, the same loss).")
    packing: bool = _f(True, "Put each micro-batch's samples end to end in one row instead of padding them (the same samples per step, no work on padding).")
    fused_kernels: bool = _f(False, "Liger's fused kernels for RMSNorm, SwiGLU and RoPE (CUDA only; skipped where they do not apply).")
    compile: bool = _f(True, "Compile each decoder layer with torch.compile (GPU only; the first job on a model spends a minute compiling, later ones reuse the cache in the data folder).")
    fp32_norms: bool = _f(False, "4bit/8bit: keep fp32 copies of the norms, embeddings and output layer, as peft does (off: all in bf16, faster and smaller; cards without bf16 keep them in any case).")
    gradient_checkpointing: str = _f("auto", "4bit/8bit: recompute every layer's activations in backward (all), or only as many as the card's memory needs (auto).", choices=CHECKPOINTING)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training_parameters(self) -> dict[str, Any]:
        """training_parameters.json: text-generation-webui's keys with its values, then
        lorafleet's own fields, so either program can copy a LoRA's parameters.

        The webui writes what its form holds: one boolean per projection (`q_proj_en`, ...,
        and `all_linear` in newer versions) instead of a list, file names without their
        extension (its dropdowns list stems), and the string "None" for an empty choice.
        The exact names lorafleet used go under `lorafleet_files` (`d.jsonl`, not `d`, which
        could also be `d.json`), and lorafleet's reader (:func:`spec_from_training_parameters`)
        prefers them and `target_modules`, so nothing is lost on the way back.
        """
        own = self.to_dict()
        targets = set(self.target_modules)
        out: dict[str, Any] = {}
        for key in WEBUI_PARAMETERS:
            if key in WEBUI_PROJECTION_KEYS:
                out[key] = "all" in targets or WEBUI_PROJECTION_KEYS[key] in targets
            elif key == "all_linear":
                out[key] = "all" in targets
            elif key in WEBUI_CHOICES:
                out[key] = webui_choice(own[key])
            elif key == "report_to":
                out[key] = "None"
            else:
                out[key] = own[key]
        out.update((k, v) for k, v in own.items() if k not in out)
        out[LORAFLEET_FILES] = {k: own[k] for k in WEBUI_CHOICES}
        return out


FIELD_DOCS = {f.name: f.metadata.get("help", "") for f in fields(TrainSpec)}


def default_spec() -> dict[str, Any]:
    return defaults(TrainSpec)


# ---------------------------------------------------------------------------------------------
# "copy parameters from" an existing LoRA


def spec_from_training_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """A spec (as a form or the API takes it) from a LoRA's training_parameters.json, written by
    lorafleet or by text-generation-webui. Keys neither knows are dropped; nothing is checked
    against the disk (submitting does that)."""
    known = {f.name for f in fields(TrainSpec)}
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in known:
            out[key] = "" if (value in WEBUI_NONE and key in WEBUI_CHOICES) else value
    exact = params.get(LORAFLEET_FILES)
    if isinstance(exact, dict):
        out.update((k, v) for k, v in exact.items() if k in WEBUI_CHOICES and isinstance(v, str))
    if "target_modules" not in params:
        if webui_true(params.get("all_linear")):
            out["target_modules"] = ["all"]
        elif any(k in params for k in WEBUI_PROJECTION_KEYS):
            out["target_modules"] = [short for key, short in WEBUI_PROJECTION_KEYS.items()
                                     if webui_true(params.get(key))]
    # A resumed run's checkpoint belongs to that run, not to a copy of its parameters.
    out.pop("resume_from_checkpoint", None)
    return out


def from_webui_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A submitted spec that is a text-generation-webui training_parameters.json (its projection
    booleans, `all_linear`, `report_to`, "None" for an empty choice) as lorafleet's own keys.
    A plain spec comes back as it is; keys neither program knows stay, to be refused by name.
    `report_to` is dropped: lorafleet records the losses itself."""
    if not is_webui_spec(data):
        return data
    known = {f.name for f in fields(TrainSpec)}
    out = {k: v for k, v in data.items() if k not in known and k not in WEBUI_ONLY}
    out.update(spec_from_training_parameters(data))
    if "resume_from_checkpoint" in data:  # a submitted spec may resume; a copy may not
        out["resume_from_checkpoint"] = data["resume_from_checkpoint"]
    return out


def lora_parameters(name: str, paths: DataPaths) -> dict[str, Any]:
    """The spec of the LoRA `name` from its training_parameters.json; SpecError if it has none."""
    if not LORA_NAME_RE.match(name):
        raise SpecError([{"field": "lora", "message": f"'{name}' is not a LoRA name"}])
    path = paths.loras / name / "training_parameters.json"
    if not inside(path, paths.loras):
        raise SpecError([{"field": "lora", "message":
                          f"loras/{name}/training_parameters.json is a link that leads outside "
                          "loras/: refused"}])
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([{"field": "lora", "message":
                          f"loras/{name} has no training_parameters.json"}]) from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        raise SpecError([{"field": "lora", "message":
                          f"loras/{name}/training_parameters.json is not valid JSON: {e}"}]) from None
    if not isinstance(params, dict):
        raise SpecError([{"field": "lora", "message":
                          f"loras/{name}/training_parameters.json is not a JSON object"}])
    spec = spec_from_training_parameters(params)
    if isinstance(params.get(LORAFLEET_FILES), dict):
        return spec  # lorafleet's own file: the exact names are there
    # The webui's file names data without extension: name the file that is there now, as the
    # form's dropdowns do. A name that is not there stays, and submitting reports it.
    for key, exts, allow_dir in (("dataset", DATASET_EXTS, False),
                                 ("eval_dataset", DATASET_EXTS, False),
                                 ("raw_text_file", RAW_TEXT_EXTS, True)):
        if isinstance(spec.get(key), str) and spec[key]:
            found, _ = resolve_data_name(spec[key], paths.datasets, exts, allow_dir=allow_dir)
            spec[key] = found or spec[key]
    return spec
