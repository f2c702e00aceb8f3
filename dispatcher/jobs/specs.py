"""The training job spec: one typed object built by the form, the REST API, the CLI and sweeps.

Field names and defaults are those of text-generation-webui's "Train LoRA" tab, so a
`training_parameters.json` written by either tool can be read by the other. Validation lives
in `parse_train_spec` and nowhere else; it returns every problem at once, each naming its field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dispatcher.access.links import inside, too_long
from dispatcher.jobs.problems import SpecError
from dispatcher.settings import DataPaths

SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
              "polynomial", "inverse_sqrt")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "adamw_bnb_8bit",
              "paged_adamw_8bit", "sgd", "adagrad")
PRECISIONS = ("auto", "4bit", "8bit", "bf16", "fp16", "fp32")
# Short projection names; the engine maps them onto each architecture's module names.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
RESUME_RE = re.compile(r"^(latest|checkpoint-[0-9]{1,18})$")
DATASET_EXTS = (".json", ".jsonl")
RAW_TEXT_EXTS = (".txt",)
FORMAT_EXTS = (".json",)
# Where the format files that ship with lorafleet live (a data folder, read, never imported).
SHIPPED_FORMATS = Path(__file__).resolve().parents[2] / "formats" / "shipped"


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


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
    min_gpu_memory_mb: int = _f(0, "Card memory in MB this job needs before it is placed; 0 = the dispatcher's estimate.")

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
            if key in _WEBUI_PROJECTION_KEYS:
                out[key] = "all" in targets or _WEBUI_PROJECTION_KEYS[key] in targets
            elif key == "all_linear":
                out[key] = "all" in targets
            elif key in _WEBUI_CHOICES:
                out[key] = _webui_choice(own[key])
            elif key == "report_to":
                out[key] = "None"
            else:
                out[key] = own[key]
        out.update((k, v) for k, v in own.items() if k not in out)
        out[LORAFLEET_FILES] = {k: own[k] for k in _WEBUI_CHOICES}
        return out


FIELD_DOCS = {f.name: f.metadata.get("help", "") for f in fields(TrainSpec)}


def default_spec() -> dict[str, Any]:
    return _defaults(TrainSpec)


def resolve_data_name(name: str, root: Path, exts: tuple[str, ...], *, allow_dir: bool,
                      extra_roots: tuple[Path, ...] = ()) -> tuple[str | None, str | None]:
    """Find `name` (with or without extension, or a relative path) under `root`.

    Returns (relative path as stored in the spec, None) or (None, error message). Absolute paths,
    `..` and anything that resolves outside the folder are refused.
    """
    name = name.strip()
    if not name:
        return None, "is empty"
    long = too_long(name)
    if long:  # before the file system answers ENAMETOOLONG
        return None, f"'{name[:40]}...' {long}"
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\x00" in name:
        return None, f"'{name}' must be a name inside {root.name}/ (no absolute paths, no '..')"
    for base in (root, *extra_roots):
        candidates = [base / name] + [base / (name + e) for e in exts]
        for c in candidates:
            if not inside(c, base):
                return None, (f"'{name}' is a link that leads outside {root.name}/: only links "
                              "that stay inside the data folder are followed")
            try:
                if c.is_file() and (c.suffix.lower() in exts):
                    return c.relative_to(base).as_posix(), None
                if allow_dir and c.is_dir():
                    return c.relative_to(base).as_posix(), None
            except OSError as e:  # a name the file system refuses
                return None, f"'{name[:40]}' cannot be used: {e.strerror}"
    return None, f"'{name}' was not found in {root.name}/"


def _check_format_file(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path.name} is not valid JSON: {e}"
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return f"{path.name} must be a JSON object mapping key lists to template strings"
    return None


def find_format(name: str, paths: DataPaths, only: str = "") -> Path | None:
    """The format file a spec's `format` names: the user's formats/ first, then the shipped ones
    (`only` "user" or "shipped" looks in that one place)."""
    places = {"user": paths.formats, "shipped": SHIPPED_FORMATS}
    for base in [places[only]] if only else places.values():
        rel, _ = resolve_data_name(name, base, FORMAT_EXTS, allow_dir=False)
        if rel:
            return base / rel
    return None


def _coerce(value: Any, typ: str, name: str, errors: list[dict[str, str]]) -> Any:
    """Turn form/CLI text into the field's type; record an error instead of raising."""
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            s = str(value).strip().lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off", ""):
                return False
            raise ValueError
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if typ == "str":
            if value is None:
                return ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if typ == "list[str]":
            if isinstance(value, str):
                value = [v for v in re.split(r"[,\s]+", value) if v]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    want = {"int": "a whole number", "float": "a number", "bool": "true or false",
            "str": "text", "list[str]": "a list of names"}[typ]
    errors.append({"field": name, "message": f"must be {want}, got {value!r}"})
    return None


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            for f in fields(cls)}


def _build(cls: type, data: dict[str, Any], errors: list[dict[str, str]], what: str) -> Any:
    """An instance of the spec class `cls` from untrusted `data`: unknown keys and values of the
    wrong type are recorded in `errors`; the defaults stand in for them."""
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            errors.append({"field": str(key), "message": f"is not a known {what}"})
    values = _defaults(cls)
    for name, f in known.items():
        if name in data:
            v = _coerce(data[name], str(f.type), name, errors)
            if v is not None:
                values[name] = v
    return cls(**values)


def parse_train_spec(data: Any, paths: DataPaths) -> TrainSpec:
    """Build a TrainSpec from untrusted input (form, JSON, YAML) or raise SpecError."""
    if not isinstance(data, dict):
        raise SpecError([{"field": "spec", "message": "must be a JSON object of training parameters"}])
    check_size(data)
    data = from_webui_keys(data)
    errors: list[dict[str, str]] = []
    s = _build(TrainSpec, data, errors, "training parameter")
    check_lengths("train", s, errors)
    s.target_modules = list(dict.fromkeys(s.target_modules))  # ["q", "q"] is ["q"]

    def bad(name: str, message: str) -> None:
        errors.append({"field": name, "message": message})

    if not s.lora_name.strip():
        bad("lora_name", "is required")
    elif not LORA_NAME_RE.match(s.lora_name):
        bad("lora_name", f"'{s.lora_name[:40]}' may use only letters, digits, '.', '_' and '-', "
                         "start with a letter or digit, and be at most 100 characters")
    max_rank = 2048 if s.higher_rank_limit else 1024
    if not 1 <= s.lora_rank <= max_rank:
        bad("lora_rank", f"must be between 1 and {max_rank}"
                         + ("" if s.higher_rank_limit else " (2048 with higher_rank_limit)"))
    if not 1 <= s.lora_alpha <= 4096:
        bad("lora_alpha", "must be between 1 and 4096")
    if not 0.0 <= s.lora_dropout < 1.0:
        bad("lora_dropout", "must be at least 0 and less than 1")
    if s.micro_batch_size < 1:
        bad("micro_batch_size", "must be at least 1")
    if s.batch_size < 1:
        bad("batch_size", "must be at least 1")
    elif s.micro_batch_size >= 1 and s.batch_size < s.micro_batch_size:
        bad("batch_size", "must be at least micro_batch_size")
    if not 0 < s.epochs <= 1000:
        bad("epochs", "must be more than 0 and at most 1000")
    try:
        lr = float(s.learning_rate)
        if not (math.isfinite(lr) and 0 < lr < 1):
            bad("learning_rate", f"'{s.learning_rate}' must be a number between 0 and 1, like 3e-4")
    except ValueError:
        bad("learning_rate", f"'{s.learning_rate}' is not a number; write it like 3e-4")
    if s.lr_scheduler_type not in SCHEDULERS:
        bad("lr_scheduler_type", f"must be one of {', '.join(SCHEDULERS)}")
    if s.optimizer not in OPTIMIZERS:
        bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    if s.precision not in PRECISIONS:
        bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    if not 8 <= s.cutoff_len <= 131072:
        bad("cutoff_len", "must be between 8 and 131072 tokens")
    if s.overlap_len < 0:
        bad("overlap_len", "must be 0 or more")
    elif s.overlap_len >= s.cutoff_len and s.raw_text_file.strip():
        # Only raw text is cut with the overlap; a dataset job ignores it, as in the webui.
        bad("overlap_len", f"must be less than cutoff_len ({s.cutoff_len})")
    if s.newline_favor_len < 0:
        bad("newline_favor_len", "must be 0 or more")
    for name in ("save_steps", "warmup_steps", "min_chars"):
        if getattr(s, name) < 0:
            bad(name, "must be 0 or more")
    if s.eval_steps < 1:
        bad("eval_steps", "must be at least 1")
    if s.stop_at_loss < 0:
        bad("stop_at_loss", "must be 0 (off) or more")
    if s.seed < 0:
        bad("seed", "must be 0 or more")
    if s.resume_from_checkpoint and not RESUME_RE.match(s.resume_from_checkpoint):
        bad("resume_from_checkpoint", "must be empty, latest, or checkpoint-<step>")
    if not s.target_modules:
        bad("target_modules", "name at least one projection")
    else:
        unknown = [m for m in s.target_modules if m not in PROJECTIONS and m != "all"]
        if unknown:
            bad("target_modules", f"unknown {', '.join(unknown)}; use {', '.join(PROJECTIONS)} or all")

    _check_min_memory(s.min_gpu_memory_mb, bad)
    check_bounds("train", s, errors)

    # Names in the data folder.
    s.base_model = _check_model(s.base_model, paths, bad)
    has_dataset, has_raw = bool(s.dataset.strip()), bool(s.raw_text_file.strip())
    if not has_dataset and not has_raw:
        bad("dataset", "choose a dataset (with a format) or a raw_text_file")
    elif has_dataset and has_raw:
        bad("raw_text_file", "choose either a dataset or a raw_text_file, not both")
    if has_dataset:
        rel, err = resolve_data_name(s.dataset, paths.datasets, DATASET_EXTS, allow_dir=False)
        if err:
            bad("dataset", err)
        else:
            s.dataset = rel
        if not s.format.strip():
            bad("format", "is required with a dataset")
    if s.format.strip():
        fmt = find_format(s.format, paths)
        if fmt is None:
            rel, err = resolve_data_name(s.format, paths.formats, FORMAT_EXTS, allow_dir=False)
            bad("format", err or f"'{s.format}' was not found")
        else:
            problem = _check_format_file(fmt)
            if problem:
                bad("format", problem)
            else:
                s.format = fmt.stem
    if s.eval_dataset.strip() and has_raw and not has_dataset:
        # It would be formatted with the training set's format file, and raw text has none.
        bad("eval_dataset", "works with a dataset and its format, not with raw text; to score "
                            "a held-out text, queue a perplexity job")
    elif s.eval_dataset.strip():
        rel, err = resolve_data_name(s.eval_dataset, paths.datasets, DATASET_EXTS, allow_dir=False)
        if err:
            bad("eval_dataset", err)
        else:
            s.eval_dataset = rel
    if has_raw:
        rel, err = resolve_data_name(s.raw_text_file, paths.datasets, RAW_TEXT_EXTS, allow_dir=True)
        if err:
            bad("raw_text_file", err)
        else:
            s.raw_text_file = rel
    link = LORA_NAME_RE.match(s.lora_name) and lora_folder_problem(s.lora_name, paths)
    if link:
        bad("lora_name", link)
    elif (s.resume_from_checkpoint.startswith("checkpoint-") and LORA_NAME_RE.match(s.lora_name)
            and RESUME_RE.match(s.resume_from_checkpoint)
            and not (paths.loras / s.lora_name / s.resume_from_checkpoint).is_dir()):
        bad("resume_from_checkpoint",
            f"loras/{s.lora_name}/{s.resume_from_checkpoint} does not exist")
    if errors:
        raise SpecError(errors)
    return s


# ---------------------------------------------------------------------------------------------
# evaluation and generation jobs


@dataclass
class EvalSpec:
    """A perplexity evaluation: a base model with none, one or several LoRAs, on a text file."""

    base_model: str = _f("", "Base model: a folder under models/.", choice="models")
    loras: list[str] = field(default_factory=list, metadata={
        "help": "LoRAs under loras/ applied together (none = the base model alone).",
        "choice": "loras"})
    text_file: str = _f("", "Text to score: a .txt file (or folder of them) under datasets/.", choice="raw_texts")
    stride: int = _f(512, "Tokens the sliding window moves by; smaller is slower and more exact.")
    max_length: int = _f(0, "Window length in tokens (0 = the model's context length).")
    precision: str = _f("auto", "How the base model is loaded (as for training).", choices=PRECISIONS)
    comment: str = _f("", "A note kept beside the result in the evaluations table.")
    force: bool = _f(False, "Evaluate again even if this combination was evaluated before.")
    min_gpu_memory_mb: int = _f(0, "Card memory in MB this job needs before it is placed; 0 = the dispatcher's estimate.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateSpec:
    """A prompt answered by the base model and by base + LoRA, side by side."""

    base_model: str = _f("", "Base model: a folder under models/.", choice="models")
    lora: str = _f("", "LoRA under loras/ to compare with the base model (empty = base only).", choice="loras")
    prompt: str = _f("", "The prompt (the instruction, when a format file is chosen).")
    format: str = _f("", "Optional format file: the prompt becomes its instruction.", choice="formats")
    max_new_tokens: int = _f(128, "Longest answer, in tokens.")
    temperature: float = _f(0.7, "Sampling temperature (0 = greedy).")
    top_p: float = _f(0.9, "Nucleus sampling: keep the most likely tokens up to this probability.")
    seed: int = _f(0, "Random seed; the same for both answers, so the difference is the LoRA's.")
    precision: str = _f("auto", "How the base model is loaded (as for training).", choices=PRECISIONS)
    min_gpu_memory_mb: int = _f(0, "Card memory in MB this job needs before it is placed; 0 = the dispatcher's estimate.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_GPU_MEMORY_MB = 16 * 1024 * 1024  # 16 TB: anything more is a typo
# The most tokens in one sample or window: 128k, the longest context of common open models (a
# longer window needs attention memory beyond any single card lorafleet places jobs on).
MAX_TOKENS = 131072
# Optimizer steps: a million steps is weeks on any card; more is a typo.
MAX_STEPS = 10**6
# Seeds: transformers.set_seed also seeds numpy, whose seeds end at 2**32 - 1.
MAX_SEED = 2**32 - 1
# A perplexity window slides by at least max_length / this many tokens, so each token is
# scored at most this many times (stride 1 on a 1024-token window is still allowed).
MAX_WINDOW_OVERLAP = 1024

# The upper bound of every number in a spec, per job kind. Each is generous for any real job
# and keeps one request from asking a worker for what no machine can do (a 1e9-sample batch,
# a 1e9-token window) or from overflowing what the engine hands to torch and numpy. Lower
# bounds are checked with each field (their messages say what 0 means); a field that a
# field-specific check already refused is not named twice.
UPPER_BOUNDS: dict[str, dict[str, float]] = {
    "train": {
        "micro_batch_size": 4096,  # samples per forward pass: more fits no card, even at 8 tokens
        "batch_size": 65536,  # samples per optimizer step (accumulated): large-batch runs use ~4k
        "epochs": 1000,  # tiny datasets are run for hundreds of epochs; fair share bounds the rest
        "cutoff_len": MAX_TOKENS,
        "overlap_len": MAX_TOKENS,
        "newline_favor_len": MAX_TOKENS,  # characters, used near chunk edges of MAX_TOKENS
        "lora_rank": 2048,  # higher_rank_limit's ceiling (the check names 1024 without it)
        "lora_alpha": 4096,
        "lora_dropout": 1.0,  # a probability (the check refuses 1 itself)
        "save_steps": MAX_STEPS,
        "eval_steps": MAX_STEPS,
        "warmup_steps": MAX_STEPS,
        "stop_at_loss": 100.0,  # cross-entropy of a uniform guess over 256k tokens is 12.5
        "min_chars": 10**7,  # characters: a 10 MB block is longer than any dataset's paragraph
        "seed": MAX_SEED,
        "min_gpu_memory_mb": MAX_GPU_MEMORY_MB,
    },
    "evaluate": {
        "stride": MAX_TOKENS,
        "max_length": MAX_TOKENS,
        "min_gpu_memory_mb": MAX_GPU_MEMORY_MB,
    },
    "generate": {
        "max_new_tokens": 4096,
        "temperature": 5.0,
        "top_p": 1.0,
        "seed": MAX_SEED,
        "min_gpu_memory_mb": MAX_GPU_MEMORY_MB,
    },
}


def upper_bound(kind: str, name: str) -> float | None:
    """The largest value `name` may have in a spec of `kind` (None: not a bounded number)."""
    return UPPER_BOUNDS.get(kind, {}).get(name)


def check_bounds(kind: str, spec: Any, errors: list[dict[str, str]]) -> None:
    """Refuse every number of `spec` above its bound: "at most 4096 (got 1000000000)"."""
    named = {e["field"] for e in errors}
    for name, most in UPPER_BOUNDS[kind].items():
        value = getattr(spec, name)
        if name not in named and isinstance(value, (int, float)) and value > most:
            shown = int(most) if float(most).is_integer() else most
            errors.append({"field": name, "message": f"at most {shown} (got {value})"})


# The longest value of every text field of a spec, per job kind: characters for text, entries
# for a list (each entry at most MAX_LIST_ENTRY characters). A spec is stored in full in its job
# record (and in every trial of a sweep), and its owner may keep max_queued_jobs of them in
# Redis: nothing in one may be unbounded. Names in the data folder also have their own checks.
NAME_CHARS = 4096  # a relative path in the data folder (links.too_long's bound)
MAX_LIST_ENTRY = 100  # an entry of a list: a LoRA name (LORA_NAME_RE) or a projection
TEXT_BOUNDS: dict[str, dict[str, int]] = {
    "train": {
        "lora_name": 100,
        "base_model": NAME_CHARS,
        "dataset": NAME_CHARS,
        "eval_dataset": NAME_CHARS,
        "format": NAME_CHARS,
        "raw_text_file": NAME_CHARS,
        "learning_rate": 32,  # a number written as text: "3e-4"
        "lr_scheduler_type": 32,
        "optimizer": 32,
        "precision": 32,
        "hard_cut_string": 1000,  # a separator, like "\\n\\n\\n" or "### End"
        "train_only_after": 1000,  # a marker, like "### Response:" or "Assistant:"
        "resume_from_checkpoint": 32,  # latest or checkpoint-<step>
        "target_modules": len(PROJECTIONS) + 1,  # entries: the 7 projections and "all"
    },
    "evaluate": {
        "base_model": NAME_CHARS,
        "loras": 16,  # entries: LoRAs applied together; more is no real experiment
        "text_file": NAME_CHARS,
        "precision": 32,
        "comment": 500,
    },
    "generate": {
        "base_model": NAME_CHARS,
        "lora": 100,
        "prompt": 32000,  # a real prompt: a long document with its instruction
        "format": NAME_CHARS,
        "precision": 32,
    },
}
# The most characters a spec may take as JSON: a backstop for what the fields do not bound
# (unknown keys) and a cap on the record. A 32,000-character prompt in a script of 3-byte
# characters is 96 KB; every training spec the bounds allow is far smaller.
MAX_SPEC_CHARS = 128 * 1024


def check_size(data: Any, field: str = "spec", most: int = MAX_SPEC_CHARS) -> None:
    """Refuse (SpecError, alone) input whose JSON text is over `most` characters, before
    anything else looks at it."""
    size = len(json.dumps(data, ensure_ascii=False, default=str))
    if size > most:
        raise SpecError([{"field": field, "message": f"is {size} characters as JSON; at "
                                                     f"most {most}"}])


def check_lengths(kind: str, spec: Any, errors: list[dict[str, str]]) -> None:
    """Refuse every text over its bound ("at most 1000 characters (got 20000000)"), every list
    with too many entries, and then raise: nothing else is checked on oversized input (the
    checks that follow read lists entry by entry and names on disk)."""
    named, before = {e["field"] for e in errors}, len(errors)
    for name, most in TEXT_BOUNDS[kind].items():
        value = getattr(spec, name)
        if name in named:  # of the wrong type: already refused
            continue
        if isinstance(value, str) and len(value) > most:
            errors.append({"field": name, "message": f"at most {most} characters (got "
                                                     f"{len(value)})"})
        elif isinstance(value, list) and len(value) > most:
            errors.append({"field": name, "message": f"at most {most} entries (got "
                                                     f"{len(value)})"})
        elif isinstance(value, list) and any(len(v) > MAX_LIST_ENTRY for v in value):
            errors.append({"field": name, "message": f"each entry is at most {MAX_LIST_ENTRY} "
                                                     "characters"})
    if len(errors) > before:
        raise SpecError(errors)


def _window_problem(s: EvalSpec, paths: DataPaths) -> str | None:
    """Stride against the window: each token is scored about window / stride times."""
    from dispatcher.schedule.estimate import read_model_shape

    window = s.max_length
    if not window:
        shape = read_model_shape(paths.models / s.base_model)
        window = shape.max_positions if shape else 0
    least = math.ceil(window / MAX_WINDOW_OVERLAP) if window else 1
    if 1 <= s.stride < least:
        return (f"at least {least} with a {window}-token window (got {s.stride}): each token "
                f"would be scored {window // s.stride} times, at most {MAX_WINDOW_OVERLAP}")
    return None


def _check_min_memory(value: int, bad) -> None:
    if not 0 <= value <= MAX_GPU_MEMORY_MB:
        bad("min_gpu_memory_mb", f"must be between 0 (use the estimate) and {MAX_GPU_MEMORY_MB}")


def _check_model(name: str, paths: DataPaths, bad) -> str:
    if not name.strip():
        bad("base_model", "is required: pick a model folder under models/")
        return name
    rel, err = resolve_data_name(name, paths.models, (), allow_dir=True)
    if err:
        bad("base_model", err)
    elif not (paths.models / rel / "config.json").is_file():
        bad("base_model", f"'{name}' has no config.json: not a model folder")
    else:
        return rel
    return name


def lora_folder_problem(name: str, paths: DataPaths) -> str | None:
    """Why a training job may not write loras/`name` (None: it may). The folder must be a real
    folder: writing through a link would write where the link leads (another LoRA's folder, or
    outside the data folder)."""
    folder = paths.loras / name
    if folder.is_symlink():
        return (f"loras/{name} is a link, not a folder: a job writes only into a real folder "
                "under loras/ (choose another lora_name, or replace the link)")
    return None


def _check_lora(name: str, paths: DataPaths, field_name: str, bad) -> str:
    if not LORA_NAME_RE.match(name):
        bad(field_name, f"'{name[:40]}' is not a LoRA name")
    elif not inside(paths.loras / name, paths.loras):
        bad(field_name, f"loras/{name} is a link that leads outside loras/: refused")
    elif not (paths.loras / name / "adapter_config.json").is_file():
        bad(field_name, f"loras/{name} has no adapter_config.json: not a trained LoRA")
    return name


def parse_eval_spec(data: Any, paths: DataPaths) -> EvalSpec:
    if not isinstance(data, dict):
        raise SpecError([{"field": "spec", "message": "must be a JSON object of evaluation settings"}])
    check_size(data)
    errors: list[dict[str, str]] = []
    s = _build(EvalSpec, data, errors, "evaluation setting")
    check_lengths("evaluate", s, errors)

    def bad(name: str, message: str) -> None:
        errors.append({"field": name, "message": message})

    s.base_model = _check_model(s.base_model, paths, bad)
    for name in s.loras:
        _check_lora(name, paths, "loras", bad)
    if len(set(s.loras)) != len(s.loras):
        bad("loras", "names a LoRA twice")
    if not s.text_file.strip():
        bad("text_file", "is required: a .txt file under datasets/")
    else:
        rel, err = resolve_data_name(s.text_file, paths.datasets, RAW_TEXT_EXTS, allow_dir=True)
        if err:
            bad("text_file", err)
        else:
            s.text_file = rel
    if s.stride < 1:
        bad("stride", "must be at least 1")
    if s.max_length < 0:
        bad("max_length", "must be 0 (the model's context) or more")
    elif s.max_length and s.stride > s.max_length:
        bad("stride", f"must not be more than max_length ({s.max_length})")
    if s.precision not in PRECISIONS:
        bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    _check_min_memory(s.min_gpu_memory_mb, bad)
    check_bounds("evaluate", s, errors)
    if not any(e["field"] in ("stride", "max_length", "base_model") for e in errors):
        problem = _window_problem(s, paths)
        if problem:
            bad("stride", problem)
    if errors:
        raise SpecError(errors)
    return s


def parse_generate_spec(data: Any, paths: DataPaths) -> GenerateSpec:
    if not isinstance(data, dict):
        raise SpecError([{"field": "spec", "message": "must be a JSON object of generation settings"}])
    check_size(data)
    errors: list[dict[str, str]] = []
    s = _build(GenerateSpec, data, errors, "generation setting")
    check_lengths("generate", s, errors)

    def bad(name: str, message: str) -> None:
        errors.append({"field": name, "message": message})

    s.base_model = _check_model(s.base_model, paths, bad)
    if s.lora:
        _check_lora(s.lora, paths, "lora", bad)
    if not s.prompt.strip():
        bad("prompt", "is required")
    if s.format.strip():
        fmt = find_format(s.format, paths)
        if fmt is None:
            bad("format", f"'{s.format}' was not found")
        else:
            s.format = fmt.stem
    if not 1 <= s.max_new_tokens <= 4096:
        bad("max_new_tokens", "must be between 1 and 4096")
    if not 0 <= s.temperature <= 5:
        bad("temperature", "must be between 0 and 5")
    if not 0 < s.top_p <= 1:
        bad("top_p", "must be more than 0 and at most 1")
    if s.seed < 0:
        bad("seed", "must be 0 or more")
    if s.precision not in PRECISIONS:
        bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    _check_min_memory(s.min_gpu_memory_mb, bad)
    check_bounds("generate", s, errors)
    if errors:
        raise SpecError(errors)
    return s


SPEC_PARSERS = {"train": parse_train_spec, "evaluate": parse_eval_spec,
                "generate": parse_generate_spec}
SPEC_CLASSES = {"train": TrainSpec, "evaluate": EvalSpec, "generate": GenerateSpec}


def parse_spec(kind: str, data: Any, paths: DataPaths) -> TrainSpec | EvalSpec | GenerateSpec:
    """Validate a spec of any job kind (train, evaluate, generate)."""
    if kind not in SPEC_PARSERS:
        raise SpecError([{"field": "kind", "message": f"must be one of {', '.join(SPEC_PARSERS)}"}])
    return SPEC_PARSERS[kind](data, paths)


def spec_from_dict(data: dict[str, Any], kind: str = "train") -> Any:
    """Rebuild an already-validated spec (from a job record); no checks against the disk."""
    cls = SPEC_CLASSES[kind]
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def list_choices(paths: DataPaths) -> dict[str, list[str]]:
    """What the form's dropdowns offer: names found in the data folder."""
    def names(root: Path, pred) -> list[str]:
        if not root.is_dir():
            return []
        # A link that leads out of its folder is not offered (a job would refuse it).
        return sorted(p.relative_to(root).as_posix() for p in root.iterdir()
                      if inside(p, root) and pred(p))

    formats = set(names(paths.formats, lambda p: p.suffix == ".json"))
    formats |= set(names(SHIPPED_FORMATS, lambda p: p.suffix == ".json"))
    return {
        "models": names(paths.models, lambda p: (p / "config.json").is_file()),
        "datasets": names(paths.datasets, lambda p: p.is_file() and p.suffix in DATASET_EXTS),
        "formats": sorted(Path(f).stem for f in formats),
        "raw_texts": names(paths.datasets, lambda p: (p.is_file() and p.suffix in RAW_TEXT_EXTS)
                           or (p.is_dir() and any(p.glob("*.txt")))),
        "loras": names(paths.loras, lambda p: (p / "adapter_config.json").is_file()),
    }


# ---------------------------------------------------------------------------------------------
# "copy parameters from" an existing LoRA

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
_WEBUI_PROJECTION_KEYS = {"q_proj_en": "q", "k_proj_en": "k", "v_proj_en": "v",
                          "o_proj_en": "o", "gate_proj_en": "gate", "up_proj_en": "up",
                          "down_proj_en": "down"}
# Its file choices: dropdown values are names without extension, "None" when nothing is chosen.
_WEBUI_CHOICES = ("dataset", "eval_dataset", "format", "raw_text_file")
# Where lorafleet keeps its exact file names in training_parameters.json (the webui ignores it).
LORAFLEET_FILES = "lorafleet_files"
_WEBUI_NONE = ("None", "none", None)


def _webui_choice(name: str) -> str:
    """A data-folder name as the webui's dropdown holds it: no extension, "None" when empty."""
    if not name:
        return "None"
    for ext in (*DATASET_EXTS, *RAW_TEXT_EXTS):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def spec_from_training_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """A spec (as a form or the API takes it) from a LoRA's training_parameters.json, written by
    lorafleet or by text-generation-webui. Keys neither knows are dropped; nothing is checked
    against the disk (submitting does that)."""
    known = {f.name for f in fields(TrainSpec)}
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in known:
            out[key] = "" if (value in _WEBUI_NONE and key in _WEBUI_CHOICES) else value
    exact = params.get(LORAFLEET_FILES)
    if isinstance(exact, dict):
        out.update((k, v) for k, v in exact.items() if k in _WEBUI_CHOICES and isinstance(v, str))
    if "target_modules" not in params:
        if _webui_true(params.get("all_linear")):
            out["target_modules"] = ["all"]
        elif any(k in params for k in _WEBUI_PROJECTION_KEYS):
            out["target_modules"] = [short for key, short in _WEBUI_PROJECTION_KEYS.items()
                                     if _webui_true(params.get(key))]
    # A resumed run's checkpoint belongs to that run, not to a copy of its parameters.
    out.pop("resume_from_checkpoint", None)
    return out


def _webui_true(value: Any) -> bool:
    """A webui checkbox's value: true, or a hand-edited "true"/"1"/"yes" (not the string
    "False", which Python would count as true)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return value is True or value == 1


# Keys only the webui's training_parameters.json has (lorafleet's own file has them too).
_WEBUI_ONLY = (*_WEBUI_PROJECTION_KEYS, "all_linear", "report_to", LORAFLEET_FILES)


def from_webui_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A submitted spec that is a text-generation-webui training_parameters.json (its projection
    booleans, `all_linear`, `report_to`, "None" for an empty choice) as lorafleet's own keys.
    A plain spec comes back as it is; keys neither program knows stay, to be refused by name.
    `report_to` is dropped: lorafleet records the losses itself."""
    if not (any(k in data for k in _WEBUI_ONLY)
            or any(data.get(k) in ("None", "none") for k in _WEBUI_CHOICES)):
        return data
    known = {f.name for f in fields(TrainSpec)}
    out = {k: v for k, v in data.items() if k not in known and k not in _WEBUI_ONLY}
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
