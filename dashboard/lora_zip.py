"""Find a job's LoRA folder inside the data folder and stream it as a zip archive."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dispatcher.access.links import inside
from dispatcher.jobs.states import TERMINAL_VALUES
from dispatcher.settings import DataPaths

CHUNK = 1 << 20
# Weights barely compress; storing them keeps the download fast and the CPU idle.
STORED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def lora_dir(job: dict[str, Any], paths: DataPaths) -> Path | None:
    """The job's LoRA folder (loras/<lora_name>/), or None when the name would leave loras/."""
    spec = job.get("spec") or {}
    name = str(spec.get("lora_name") or "").strip()
    if not name:
        return None
    path = paths.loras / name
    if not inside(path, paths.loras) or path.resolve() == paths.loras.resolve():
        return None
    return path.resolve()


def lora_available(job: dict[str, Any], paths: DataPaths) -> bool:
    """True when the job has finished and its folder holds an adapter to download."""
    if job.get("state") not in TERMINAL_VALUES:
        return False
    path = lora_dir(job, paths)
    return path is not None and path.is_dir() and any((path / f).is_file() for f in ADAPTER_FILES)


def _files(folder: Path, with_checkpoints: bool) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not with_checkpoints and rel.parts[0].startswith("checkpoint-"):
            continue
        # A link that points out of the folder is not part of the LoRA.
        if p.is_file() and inside(p, folder):
            out.append(p)
    return out


class _Sink:
    """A write-only file for zipfile that hands the written bytes to a generator."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def stream_zip(folder: Path, arcroot: str, with_checkpoints: bool = False) -> Iterator[bytes]:
    """Zip `folder` as `arcroot/...` while sending it, without a temporary file."""
    sink = _Sink()
    # A sink without tell() makes zipfile write data descriptors, as a streamed zip needs.
    with zipfile.ZipFile(sink, "w") as zf:  # type: ignore[arg-type]
        for path in _files(folder, with_checkpoints):
            arcname = f"{arcroot}/{path.relative_to(folder).as_posix()}"
            method = (zipfile.ZIP_STORED if path.suffix.lower() in STORED_SUFFIXES
                      else zipfile.ZIP_DEFLATED)
            info = zipfile.ZipInfo.from_file(path, arcname)
            info.compress_type = method
            with path.open("rb") as src, zf.open(info, "w") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    if data := sink.take():
                        yield data
            if data := sink.take():
                yield data
    if data := sink.take():
        yield data
