"""Which cards this machine's workers may use: found without initialising CUDA (NVML, then
nvidia-smi) and filtered by CUDA_VISIBLE_DEVICES the way CUDA reads it."""

from __future__ import annotations

import subprocess

from dispatcher.settings import visible_devices


class GpuListError(ValueError):
    """A --gpus value that is neither `all`, `cpu` nor a list of card numbers."""


def detect_gpus() -> list[int]:
    """Physical card indices this process may use, filtered by CUDA_VISIBLE_DEVICES."""
    cards: dict[int, str] = {}  # index -> UUID
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            cards[i] = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    except Exception:  # no NVML (no driver, no library): ask nvidia-smi
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            for line in out.splitlines():
                index, _, uuid = line.partition(",")
                cards[int(index)] = uuid.strip()
        except Exception:  # no nvidia-smi either: no card, the fleet gets a CPU worker
            cards = {}
    return visible_cards(cards, visible_devices())


def visible_cards(cards: dict[int, str], visible: str | None) -> list[int]:
    """The cards of `cards` (index -> UUID) that CUDA_VISIBLE_DEVICES = `visible` lets through.

    As CUDA reads it: unset means every card, set but empty means none; entries are indices or
    UUIDs (a unique prefix such as ``GPU-8a3f`` is enough), and the list ends at the first entry
    that names no card. Indices come back in the order the variable gives them."""
    if visible is None:
        return sorted(cards)
    chosen: list[int] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit() and int(entry) in cards:
            match = [int(entry)]
        else:
            match = [i for i, uuid in cards.items() if entry and uuid.startswith(entry)]
        if len(match) != 1:
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def parse_gpus(value: str) -> list[int | None]:
    """`all` -> every card (or one CPU worker when there is none), `cpu`, or a list `0,2`.
    None in the list stands for a CPU worker."""
    value = value.strip().lower()
    if value == "cpu":
        return [None]
    if value == "all":
        cards = detect_gpus()
        return list(cards) if cards else [None]
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise GpuListError(f"{value!r}: use all, cpu, or card numbers like 0,2") from None
