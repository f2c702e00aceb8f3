"""Names in the data folder, as a spec gives them: THE resolver of a data name (with or without
its extension, never outside its folder), the format files (the user's, then the shipped ones),
and what the form's dropdowns offer. Every other reader of a data name calls these."""

from __future__ import annotations

import json
from pathlib import Path

from dispatcher.access.links import inside, too_long
from dispatcher.jobs.problems import Problems
from dispatcher.jobs.specs.fields import DATASET_EXTS, FORMAT_EXTS, LORA_NAME_RE, RAW_TEXT_EXTS
from dispatcher.settings import DataPaths

# Where the format files that ship with lorafleet live (a data folder, read, never imported).
SHIPPED_FORMATS = Path(__file__).resolve().parents[3] / "formats" / "shipped"


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


def format_file_problem(path: Path) -> str | None:
    """Why the format file at `path` cannot be used (None: it can)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
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


def check_model(name: str, paths: DataPaths, problems: Problems) -> str:
    """The base model folder `name` names, as stored in the spec (the name itself on a problem)."""
    if not name.strip():
        problems.add("base_model", "is required: pick a model folder under models/")
        return name
    rel, err = resolve_data_name(name, paths.models, (), allow_dir=True)
    if err:
        problems.add("base_model", err)
    elif not (paths.models / rel / "config.json").is_file():
        problems.add("base_model", f"'{name}' has no config.json: not a model folder")
    else:
        return rel
    return name


def check_lora(name: str, paths: DataPaths, field_name: str, problems: Problems) -> None:
    """A trained LoRA under loras/ that a job reads (evaluates, or compares with the base)."""
    if not LORA_NAME_RE.match(name):
        problems.add(field_name, f"'{name[:40]}' is not a LoRA name")
    elif not inside(paths.loras / name, paths.loras):
        problems.add(field_name, f"loras/{name} is a link that leads outside loras/: refused")
    elif not (paths.loras / name / "adapter_config.json").is_file():
        problems.add(field_name, f"loras/{name} has no adapter_config.json: not a trained LoRA")


def lora_folder_problem(name: str, paths: DataPaths) -> str | None:
    """Why a training job may not write loras/`name` (None: it may). The folder must be a real
    folder: writing through a link would write where the link leads (another LoRA's folder, or
    outside the data folder)."""
    folder = paths.loras / name
    if folder.is_symlink():
        return (f"loras/{name} is a link, not a folder: a job writes only into a real folder "
                "under loras/ (choose another lora_name, or replace the link)")
    return None


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
