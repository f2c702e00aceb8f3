"""What a worker says about its card in each heartbeat, read without initialising CUDA.

NVML (nvidia-ml-py) reads name, memory, utilisation and temperature of a card from outside the
CUDA context, so the worker's main process can report while its child trains. Without NVML
(no driver, a CPU worker) the host's memory is reported instead.

It also reports memory on the card held by processes that are not this worker's (another
user's notebook, a second lorafleet worker sharing the card): `outside_use` decides that from
NVML's process lists and the worker's own process tree (see its docstring for containers,
where NVML's pids are not this namespace's). `--memory-mb N` caps what the worker advertises.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Memory a card reports as used with nothing running on it (driver reservations, display; an
# idle H200 reports about 620 MB): used memory above this on an idle worker's card belongs to
# someone else.
IDLE_BASELINE_MB = 1024
# What NVML returns for "not available" in usedGpuMemory when the binding does not map it to None.
_NVML_NOT_AVAILABLE = 2**64 - 1


@dataclass(frozen=True)
class GpuProcess:
    """One entry of NVML's compute or graphics process list of a card."""

    pid: int
    # None when the driver does not say (some containers, MIG, Windows display drivers).
    used_mb: int | None


@dataclass(frozen=True)
class OutsideUse:
    """Card memory held by processes that are not this worker's."""

    mb: int = 0
    # The pids NVML names for that memory (in the driver's pid namespace); empty when unknown.
    pids: tuple[int, ...] = ()
    # "processes": summed from NVML's per-process figures; "idle memory": the card's used
    # memory above IDLE_BASELINE_MB while this worker runs nothing; "" when nothing is held.
    how: str = ""

    def fields(self) -> dict:
        return {"outside_mb": self.mb, "outside_pids": ",".join(map(str, self.pids)),
                "outside_how": self.how}


def outside_use(processes: Iterable[GpuProcess], own_pids: set[int], visible_pids: set[int],
                used_mb: int, busy: bool, last: OutsideUse | None = None,
                baseline_mb: int = IDLE_BASELINE_MB) -> OutsideUse:
    """How much of a card processes outside this worker hold.

    `processes`: NVML's list for the card; `own_pids`: this worker's process tree; `visible_pids`:
    those of the listed pids that exist in this process's pid namespace; `used_mb`: the card's
    used memory; `busy`: whether this worker runs a job (its child then holds memory); `last`:
    the previous answer.

    When NVML's pids are this namespace's and it gives each one's memory, the answer is the sum
    over the pids that are not the worker's. In a container NVML lists host pids (or none at
    all), so the worker cannot pick out its own: then, while the worker is idle (its processes
    hold no card memory: the main process never initialises CUDA and the child that trains is
    replaced after each job), everything above `baseline_mb` is someone else's; while it is
    busy, the last idle answer stands.
    """
    procs = list(processes)
    foreign = [p for p in procs if p.pid not in own_pids]
    pids = tuple(sorted({p.pid for p in foreign}))
    known = sum(p.used_mb or 0 for p in foreign)
    readable = (all(p.pid in visible_pids and p.used_mb is not None for p in foreign)
                and (not busy or any(p.pid in own_pids for p in procs)))
    if not busy:
        above_baseline = max(0, used_mb - baseline_mb)
        if readable and known >= above_baseline:
            return OutsideUse(known, pids, "processes") if known > 0 else OutsideUse()
        if above_baseline > 0:
            return OutsideUse(max(known, above_baseline), pids, "idle memory")
        return OutsideUse()
    if readable:
        return OutsideUse(known, pids, "processes") if known > 0 else OutsideUse()
    return last or OutsideUse()


def process_tree(root: int, proc: Path = Path("/proc")) -> set[int]:
    """`root` and every process descended from it (Linux /proc; just `root` elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in proc.iterdir() if e.name.isdigit()]
    except OSError:
        return {root}
    for e in entries:
        ppid = parent_pid(int(e.name), proc)
        if ppid is not None:
            children.setdefault(ppid, []).append(int(e.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    return tree


def parent_pid(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The parent of `pid`, or None when there is no such process (here)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


def _nvml_card(index: int) -> dict | None:
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        info = {
            "card": name.decode() if isinstance(name, bytes) else name,
            "mem_total_mb": round(mem.total / 2**20),
            "mem_free_mb": round(mem.free / 2**20),
            "mem_used_mb": round((mem.total - mem.free) / 2**20),
            "processes": _nvml_processes(pynvml, h),
        }
        try:
            info["util_pct"] = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            info["temp_c"] = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        except pynvml.NVMLError:
            pass
        return info
    except Exception:  # NVML present but no usable driver
        return None


def _nvml_processes(pynvml, handle) -> list[GpuProcess]:
    """The card's compute and graphics processes (one entry per pid, the larger figure)."""
    found: dict[int, int | None] = {}
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            listed = getattr(pynvml, query)(handle)
        except Exception:  # not supported on this card or driver
            continue
        for p in listed:
            used = getattr(p, "usedGpuMemory", None)
            mb = None if used in (None, _NVML_NOT_AVAILABLE) else round(used / 2**20)
            old = found.get(int(p.pid))
            found[int(p.pid)] = mb if old is None else max(old, mb or 0)
    return [GpuProcess(pid, mb) for pid, mb in sorted(found.items())]


def _host_memory() -> tuple[int, int]:
    total = free = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                if k == "MemTotal":
                    total = int(v.split()[0]) // 1024
                elif k == "MemAvailable":
                    free = int(v.split()[0]) // 1024
    except OSError:
        pass
    return total, free


def card_info(gpu_index: int | None) -> dict:
    """Heartbeat fields for this worker's device (a card's also carry `mem_used_mb` and
    NVML's `processes`, which CardReport turns into the outside_* fields)."""
    if gpu_index is not None:
        info = _nvml_card(gpu_index)
        if info is not None:
            return {"device": f"cuda:{gpu_index}", "gpu_index": gpu_index, **info}
    total, free = _host_memory()
    cpu = platform.processor() or platform.machine()
    return {"device": "cpu", "gpu_index": "", "card": f"CPU ({os.cpu_count()} cores, {cpu})",
            "mem_total_mb": total, "mem_free_mb": free}


def cap_memory(info: dict, memory_mb: int | None) -> dict:
    """Advertise at most `memory_mb` (`lorafleet worker --memory-mb`): total and free memory
    are capped and `mem_limit_mb` tells the scheduler to gate this worker on it, a CPU worker
    included. `mem_usable_mb` is what a job could have once the worker is idle: the cap or the
    card's total, less what processes outside lorafleet hold."""
    out = dict(info)
    usable = int(out.get("mem_total_mb") or 0) - int(out.get("outside_mb") or 0)
    if memory_mb is not None:
        out["mem_total_mb"] = min(int(out.get("mem_total_mb") or 0), memory_mb)
        out["mem_free_mb"] = min(int(out.get("mem_free_mb") or 0), memory_mb)
        out["mem_limit_mb"] = memory_mb
        usable = min(usable, memory_mb)
    out["mem_usable_mb"] = max(0, usable)
    return out


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all the host's CPUs since boot, from /proc/stat; None where
    there is no /proc/stat (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if len(parts) < 5 or parts[0] != "cpu":
        return None
    ticks = [int(x) for x in parts[1:9]]  # user..steal; guest time is already in user
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


class CpuLoad:
    """A CPU worker's load column (issue 11, point 19): the host's CPU use between two
    heartbeats (`util_pct`, as a card's utilisation) and the 1-minute load average, or a
    `load_note` saying why there is no figure."""

    def __init__(self) -> None:
        self.last = cpu_times()

    def fields(self) -> dict:
        # Every key each time: a heartbeat overwrites the fields it names, no others.
        out: dict = {"util_pct": None, "load_avg": None, "load_note": ""}
        now = cpu_times()
        if now is not None and self.last is not None and now[1] > self.last[1]:
            busy, total = now[0] - self.last[0], now[1] - self.last[1]
            out["util_pct"] = round(100.0 * max(0, busy) / total)
        self.last = now or self.last
        try:
            out["load_avg"] = round(os.getloadavg()[0], 2)
        except (AttributeError, OSError):
            pass
        if out["util_pct"] is None and out["load_avg"] is None:
            out["load_note"] = ("no CPU figures on this system (no /proc/stat, no load average)"
                                if now is None else "measuring: the next heartbeat has it")
        return out


class CardReport:
    """The heartbeat's device fields, with memory held outside lorafleet and the memory cap.

    Lives in the worker's main process (whose descendants are the worker's own processes) and
    remembers the last outside figure for the times it cannot be measured (see outside_use)."""

    def __init__(self, gpu_index: int | None, memory_mb: int | None = None,
                 root_pid: int | None = None):
        self.gpu_index = gpu_index
        self.memory_mb = memory_mb
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.last = OutsideUse()
        self.cpu = CpuLoad()

    def fields(self, busy: bool) -> dict:
        info = card_info(self.gpu_index)
        if info.get("device") == "cpu":
            info.update(self.cpu.fields())
        procs = info.pop("processes", None)
        used = info.pop("mem_used_mb", None)
        if procs is not None and used is not None:
            own = process_tree(self.root_pid)
            visible = {p.pid for p in procs if Path(f"/proc/{p.pid}").exists()}
            self.last = outside_use(procs, own, visible, used, busy, self.last)
            info.update(self.last.fields())
        return cap_memory(info, self.memory_mb)
