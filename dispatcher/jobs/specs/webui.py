"""text-generation-webui's keys for a training run, as its "Train LoRA" tab writes them in
`training_parameters.json`: lorafleet writes the same file and reads either program's, so a
LoRA's parameters can be copied between the two (the conversions are in specs/train.py)."""

from __future__ import annotations

from typing import Any

from dispatcher.jobs.specs.fields import DATASET_EXTS, RAW_TEXT_EXTS

# The webui's own list, in its order (the version whose raw-text settings lorafleet keeps),
# with `all_linear` from later versions.
WEBUI_PARAMETERS = (
    "lora_name", "always_override", "all_linear", "q_proj_en", "v_proj_en", "k_proj_en",
    "o_proj_en", "gate_proj_en", "down_proj_en", "up_proj_en", "save_steps", "micro_batch_size",
    "batch_size", "epochs", "learning_rate", "lr_scheduler_type", "lora_rank", "lora_alpha",
    "lora_dropout", "cutoff_len", "dataset", "eval_dataset", "format", "eval_steps",
    "raw_text_file", "overlap_len", "newline_favor_len", "higher_rank_limit", "warmup_steps",
    "optimizer", "hard_cut_string", "train_only_after", "stop_at_loss", "add_eos_token",
    "min_chars", "report_to")
# text-generation-webui writes one boolean per projection instead of a list.
WEBUI_PROJECTION_KEYS = {"q_proj_en": "q", "k_proj_en": "k", "v_proj_en": "v",
                         "o_proj_en": "o", "gate_proj_en": "gate", "up_proj_en": "up",
                         "down_proj_en": "down"}
# Its file choices: dropdown values are names without extension, "None" when nothing is chosen.
WEBUI_CHOICES = ("dataset", "eval_dataset", "format", "raw_text_file")
# Where lorafleet keeps its exact file names in training_parameters.json (the webui ignores it).
LORAFLEET_FILES = "lorafleet_files"
WEBUI_NONE = ("None", "none", None)
# Keys only the webui's training_parameters.json has (lorafleet's own file has them too).
WEBUI_ONLY = (*WEBUI_PROJECTION_KEYS, "all_linear", "report_to", LORAFLEET_FILES)


def webui_choice(name: str) -> str:
    """A data-folder name as the webui's dropdown holds it: no extension, "None" when empty."""
    if not name:
        return "None"
    for ext in (*DATASET_EXTS, *RAW_TEXT_EXTS):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def webui_true(value: Any) -> bool:
    """A webui checkbox's value: true, or a hand-edited "true"/"1"/"yes" (not the string
    "False", which Python would count as true)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return value is True or value == 1


def is_webui_spec(data: dict[str, Any]) -> bool:
    """Does a submitted spec use the webui's keys (or its "None" for an empty choice)?"""
    return (any(k in data for k in WEBUI_ONLY)
            or any(data.get(k) in ("None", "none") for k in WEBUI_CHOICES))
