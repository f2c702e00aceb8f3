"""Telling a training process that the kernel's out-of-memory killer ended from one killed by
hand, in the worker's main process (no torch here).

The kernel's OOM killer ends a process with SIGKILL, which looks, to the worker's main process,
like any `kill -9` of its Celery child. What tells them apart is the kernel's own count of OOM
kills: the worker's memory cgroup counts those inside it (`oom_kill` in cgroup v2's
memory.events, or in v1's memory.oom_control), and /proc/vmstat counts every one on the
machine. The main process reads both when a job starts (`read_oom_counts`) and again when its
child dies; `death_reason` says what the difference means.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

from gpuworker.diskspace import human_bytes

# cgroup v1 writes "no limit" as the largest page-aligned 63-bit number.
_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class OomCounts:
    """The kernel's OOM-kill counts at one moment (None: not readable here)."""

    machine: int | None  # /proc/vmstat oom_kill: every OOM kill on the machine (or host)
    cgroup: int | None  # the oom_kill count of the memory cgroup this process is in
    cgroup_path: str = ""  # that cgroup, as /proc/self/cgroup names it
    cgroup_limit: int | None = None  # its memory limit in bytes (None: none set)


def read_oom_counts(proc: Path = Path("/proc")) -> OomCounts:
    """The counts as this process sees them now."""
    machine = _field(_read(proc / "vmstat"), "oom_kill")
    found = _memory_cgroup(proc)
    if found is None:
        return OomCounts(machine, None)
    path, folder, v2 = found
    if v2:
        count = _field(_read(folder / "memory.events"), "oom_kill")
        limit = _number(_read(folder / "memory.max"))
    else:
        count = _field(_read(folder / "memory.oom_control"), "oom_kill")
        limit = _number(_read(folder / "memory.limit_in_bytes"))
    return OomCounts(machine, count, path, limit if limit and limit < _NO_LIMIT else None)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _field(text: str, name: str) -> int | None:
    m = re.search(rf"^{name} (\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def _number(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def _memory_cgroup(proc: Path) -> tuple[str, Path, bool] | None:
    """(the cgroup's path, its folder in the mounted hierarchy, whether it is cgroup v2) of
    this process's memory cgroup: v1's memory controller where mounted, else v2's."""
    mounts = []  # (root in the hierarchy, mount point, v2?)
    for line in _read(proc / "self/mountinfo").splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        if rest[0] == "cgroup2" or (rest[0] == "cgroup" and "memory" in rest[2].split(",")):
            mounts.append((fields[3], fields[4], rest[0] == "cgroup2"))
    groups = {}  # v1's memory line, or v2's "0::" line
    for line in _read(proc / "self/cgroup").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            groups[False] = path
        elif hier == "0" and controllers == "":
            groups[True] = path
    for v2 in (False, True):
        if v2 not in groups:
            continue
        path = groups[v2]
        for root, point, is_v2 in mounts:
            if is_v2 != v2 or not (path == root or path.startswith(root.rstrip("/") + "/")):
                continue
            folder = Path(point) / path[len(root):].lstrip("/")
            if (folder / ("memory.events" if v2 else "memory.oom_control")).exists():
                return path, folder, v2
    return None


def _rose(before: int | None, after: int | None) -> int:
    return after - before if before is not None and after is not None and after > before else 0


def killed_by_signal(lost: str) -> int | None:
    """The signal number in billiard's "Worker exited prematurely: signal 9 (SIGKILL) Job: 0."
    (None when the process exited with a code)."""
    m = re.search(r"signal (\d+)", lost)
    return int(m.group(1)) if m else None


def death_reason(worker: str, lost: str, before: OomCounts | None, after: OomCounts) -> str:
    """Why the training process on `worker` died, for the job's record. `lost` is the
    WorkerLostError's text; `before`/`after` the OOM counts when the job started and now."""
    sig = killed_by_signal(lost)
    if sig is None:
        m = re.search(r"exitcode (-?\d+)", lost)
        return (f"the training process on {worker} died: it exited with code {m.group(1)}" if m
                else f"the training process on {worker} died ({lost})")
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    killed = f"the training process on {worker} died: it was killed by signal {sig} ({name})"
    if sig != signal.SIGKILL or before is None:
        return killed
    in_cgroup = (_rose(before.cgroup, after.cgroup)
                 if before.cgroup_path == after.cgroup_path else 0)
    if in_cgroup:
        limit = (f", limit {human_bytes(after.cgroup_limit)}"
                 if after.cgroup_limit is not None else "")
        return (f"{killed}, likely by the kernel's out-of-memory killer: it killed {in_cgroup} "
                f"process(es) in the worker's memory cgroup {after.cgroup_path}{limit} while "
                "the job ran. The job needs more memory than the worker may use: lower "
                "micro_batch_size, cutoff_len or lora_rank, or give the worker more memory")
    on_machine = _rose(before.machine, after.machine)
    if on_machine:
        return (f"{killed}, likely by the kernel's out-of-memory killer: it killed "
                f"{on_machine} process(es) on this machine while the job ran (/proc/vmstat "
                "oom_kill). The machine likely ran out of memory: lower micro_batch_size, "
                "cutoff_len or lora_rank, or free memory on the machine")
    if before.machine is not None and after.machine is not None:
        return f"{killed}, not by the kernel's out-of-memory killer (it killed nothing meanwhile)"
    return killed
