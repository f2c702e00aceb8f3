"""Real resource limits for the disk and memory fault tests (tests/integration/
test_disk_memory_faults.py): a worker process whose LoRA folder lies on a small file system of
its own, and a memory cgroup with a limit the kernel enforces. Nothing here is simulated: a
full tmpfs answers ENOSPC, a cgroup over its limit gets the kernel's OOM killer.

A small file system without root: the worker starts in user and mount namespaces of its own
(`unshare --user --map-root-user --mount`), mounts a tmpfs of a given size over its data
folder's loras/ and only then becomes the worker (exec). Only that process tree sees the tmpfs;
the test reads and fills it through /proc/<pid>/root. A memory cgroup needs a writable cgroup
hierarchy (root, or one delegated to this user); each helper says why when the machine cannot.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fleetproc import ROOT, FleetProcs

# --------------------------------------------------------------------------- small file system


def small_fs_refusal() -> str | None:
    """None when this machine lets this user mount a tmpfs in namespaces of its own and a
    write past its size fails with ENOSPC; else why not (for a skip)."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux) on this machine"
    with tempfile.TemporaryDirectory() as d:
        script = ('mount -t tmpfs -o size=64k lorafleet-probe "$1" && '
                  'head -c 200000 /dev/zero > "$1/x"')
        try:
            p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--",
                                "sh", "-c", script, "sh", d], capture_output=True, text=True,
                               timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unshare failed: {e}"
    if "No space left on device" in p.stderr:
        return None
    return ("cannot mount a small tmpfs in a user and mount namespace here (user namespaces "
            f"off?): unshare said {p.stderr.strip()[-300:]!r}")


def start_worker_on_small_fs(f: FleetProcs, name: str, size: int) -> subprocess.Popen:
    """Start worker `name` (a real `python -m gpuworker.worker`) whose data folder's loras/
    is a fresh tmpfs of `size` bytes: the same process id becomes the worker (sh and unshare
    exec into it), so f.children, f.kill and f.log work as for any worker."""
    loras = f.settings.paths.loras
    mode = oct(loras.stat().st_mode & 0o7777)[2:]
    script = ('mount -t tmpfs -o "size=$1,mode=$2" lorafleet-small "$3" && '
              'exec "$4" -m gpuworker.worker --name "$5"')
    log = open(f.home / f"worker-{name}.log", "ab")
    p = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c", script, "sh",
         str(size), mode, str(loras), sys.executable, name],
        env=f.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    f.procs[f"worker-{name}"] = p
    return p


def seen_by(pid: int, path: Path) -> Path:
    """`path` as process `pid` sees it (through its mount namespace)."""
    return Path(f"/proc/{pid}/root") / Path(path).resolve().relative_to("/")


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def fill(folder: Path, leave: int, name: str = "someone-elses-big-file") -> Path:
    """Fill the file system holding `folder` with one file until a write fails with ENOSPC,
    then shorten the file so that about `leave` bytes stay free (to the file system's block).
    Returns the file (delete it to free the space)."""
    filler = folder / name
    chunk = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as out:  # unbuffered: closing writes nothing more
        try:
            while True:
                out.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes): to show a folder did not change."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- memory cgroup


class MemoryCgroup:
    """A memory cgroup made for one test, under the cgroup this process is in (v1's memory
    controller, or v2 where memory can be enabled for children); removed by `remove`."""

    def __init__(self, folder: Path, v2: bool, path: str):
        self.folder, self.v2 = folder, v2
        self.path = path  # as /proc/<pid>/cgroup names it

    @classmethod
    def make(cls, name: str) -> MemoryCgroup | str:
        """A new cgroup, or why this machine cannot give one (for a skip)."""
        from gpuworker.oomkills import _memory_cgroup

        found = _memory_cgroup(Path("/proc"))
        if found is None:
            return "no memory cgroup hierarchy is mounted here"
        parent_path, parent, v2 = found
        if v2 and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            return (f"cgroup v2 at {parent} does not enable the memory controller for its "
                    "children (it needs a delegated cgroup, e.g. systemd-run --user --scope)")
        folder = parent / name
        try:
            folder.mkdir()
        except OSError as e:
            return f"cannot make a memory cgroup under {parent}: {e}"
        return cls(folder, v2, f"{parent_path.rstrip('/')}/{name}")

    def _file(self, v1: str, v2: str) -> Path:
        return self.folder / (v2 if self.v2 else v1)

    def set_limit(self, limit: int | None) -> None:
        f = self._file("memory.limit_in_bytes", "memory.max")
        f.write_text(str(limit) if limit is not None else ("max" if self.v2 else "-1"))

    def usage(self) -> int:
        return int(self._file("memory.usage_in_bytes", "memory.current").read_text())

    def peak(self) -> int:
        """The most it has used since it was made (v2: kernel 5.19 and later)."""
        return int(self._file("memory.max_usage_in_bytes", "memory.peak").read_text())

    def oom_kills(self) -> int:
        text = self._file("memory.oom_control", "memory.events").read_text()
        return int(next(line.split()[1] for line in text.splitlines()
                        if line.startswith("oom_kill ")))

    def join_command(self) -> list[str]:
        """A command prefix that puts the process into this cgroup before it execs the rest."""
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh",
                str(self.folder / "cgroup.procs")]

    def pids(self) -> list[int]:
        return [int(x) for x in (self.folder / "cgroup.procs").read_text().split()]

    def remove(self, timeout: float = 10) -> None:
        """Remove the cgroup once its processes are gone (they must be stopped first)."""
        deadline = time.monotonic() + timeout
        while self.folder.exists():
            try:
                self.folder.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def start_worker_in_cgroup(f: FleetProcs, name: str, cg: MemoryCgroup) -> subprocess.Popen:
    """Start worker `name` inside `cg` (its Celery children are forked there too), as a
    container or a systemd unit with a memory limit runs it."""
    log = open(f.home / f"worker-{name}.log", "ab")
    p = subprocess.Popen([*cg.join_command(), sys.executable, "-m", "gpuworker.worker",
                          "--name", name],
                         env=f.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    f.procs[f"worker-{name}"] = p
    return p
