"""The words a job's record gets for a full disk and for a training process killed by the
kernel's out-of-memory killer (gpuworker.diskspace, gpuworker.oomkills): pure code, exact
strings. The faults themselves, on a real full file system and in a real memory cgroup, are in
tests/integration/test_disk_memory_faults.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from billiard.common import human_status

from gpuworker.diskspace import disk_full, human_bytes, is_disk_full, says_full, space_of
from gpuworker.errors import DiskFull, EngineError
from gpuworker.oomkills import OomCounts, death_reason, killed_by_signal, read_oom_counts
from gpuworker.tasks import _reason


def lost(exitcode: int) -> str:
    """What billiard's WorkerLostError says for a pool process that ended with `exitcode`
    (negative: killed by that signal), built by billiard's own function."""
    return f"Worker exited prematurely: {human_status(exitcode)} Job: 0."


CG = "/fleet/worker-a"
KILLED = "the training process on a died: it was killed by signal 9 (SIGKILL)"


def counts(machine: int | None, cgroup: int | None, path: str = CG,
           limit: int | None = 3 << 30) -> OomCounts:
    return OomCounts(machine, cgroup, path, limit)


def test_billiards_message_gives_the_signal():
    assert lost(-9) == "Worker exited prematurely: signal 9 (SIGKILL) Job: 0."
    assert killed_by_signal(lost(-9)) == 9
    assert killed_by_signal(lost(-15)) == 15
    assert killed_by_signal(lost(1)) is None


def test_an_oom_kill_in_the_workers_cgroup_is_named_with_its_limit():
    assert death_reason("a", lost(-9), counts(5, 0), counts(6, 1)) == (
        f"{KILLED}, likely by the kernel's out-of-memory killer: it killed 1 process(es) in "
        f"the worker's memory cgroup {CG}, limit 3.0 GiB while the job ran. The job needs more "
        "memory than the worker may use: lower micro_batch_size, cutoff_len or lora_rank, or "
        "give the worker more memory")
    no_limit = death_reason("a", lost(-9), counts(5, 2, limit=None),
                            counts(5, 4, limit=None))
    assert "killed 2 process(es) in the worker's memory cgroup /fleet/worker-a while" in no_limit


def test_an_oom_kill_elsewhere_on_the_machine_is_likely_out_of_memory():
    """The cgroup counted nothing (or cannot be read), the machine's count rose: the machine
    ran out (a global OOM kill, or one in a cgroup the worker cannot see)."""
    want = (f"{KILLED}, likely by the kernel's out-of-memory killer: it killed 2 process(es) "
            "on this machine while the job ran (/proc/vmstat oom_kill). The machine likely ran "
            "out of memory: lower micro_batch_size, cutoff_len or lora_rank, or free memory on "
            "the machine")
    assert death_reason("a", lost(-9), counts(5, 0), counts(7, 0)) == want
    assert death_reason("a", lost(-9), counts(5, None), counts(7, None)) == want
    # The process moved to another cgroup meanwhile: the two cgroup counts are not compared.
    assert death_reason("a", lost(-9), counts(5, 0, "/x"), counts(7, 3, "/y")) == want


def test_a_kill_with_no_oom_kill_counted_says_so():
    assert death_reason("a", lost(-9), counts(5, 0), counts(5, 0)) == (
        f"{KILLED}, not by the kernel's out-of-memory killer (it killed nothing meanwhile)")


def test_nothing_is_claimed_without_the_counts():
    # No baseline (the task was received before this worker code ran), or no /proc/vmstat.
    assert death_reason("a", lost(-9), None, counts(9, 9)) == KILLED
    assert death_reason("a", lost(-9), counts(None, None), counts(None, None)) == KILLED


def test_other_deaths_are_not_called_out_of_memory():
    # The OOM killer sends SIGKILL only: another signal is said as it is, even if the
    # count moved.
    assert death_reason("a", lost(-15), counts(5, 0), counts(6, 1)) == (
        "the training process on a died: it was killed by signal 15 (SIGTERM)")
    assert death_reason("a", lost(1), counts(5, 0), counts(6, 1)) == (
        "the training process on a died: it exited with code 1")
    assert death_reason("a", "something else", None, counts(5, 0)) == (
        "the training process on a died (something else)")


def test_oom_counts_are_read_from_this_machine():
    now = read_oom_counts()
    vmstat = Path("/proc/vmstat").read_text()
    if "oom_kill " in vmstat:
        assert isinstance(now.machine, int) and now.machine >= 0
    if now.cgroup is not None:
        assert now.cgroup >= 0
        assert now.cgroup_path in Path("/proc/self/cgroup").read_text()


# --------------------------------------------------------------------------- full disk


def test_a_full_disk_is_told_from_its_errors():
    assert says_full(OSError(errno.ENOSPC, "No space left on device"))
    assert says_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors' and torch's ways of saying it
    assert says_full(RuntimeError("Error while serializing: I/O error: No space left on "
                                  "device (os error 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("unexpected pos 576 vs 534") from inner
    except RuntimeError as chained:
        assert says_full(chained)
    assert not says_full(OSError(errno.EACCES, "Permission denied"))
    assert not says_full(RuntimeError("unexpected pos 576 vs 534"))


def test_an_opaque_error_on_a_disk_with_room_is_not_a_full_disk(tmp_path):
    # torch.save's own words on a full disk say nothing of space: only the file system can
    # (tests/integration: a real full tmpfs). Here there is room.
    assert space_of(tmp_path).free > (1 << 20)
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    # A folder not made yet is measured at its nearest parent.
    assert space_of(tmp_path / "not" / "yet").total == space_of(tmp_path).total


@pytest.mark.parametrize("n, want", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (1536, "1.5 KiB"), (4 << 20, "4.0 MiB"),
                                     (3 << 30, "3.0 GiB"), (5 << 40, "5.0 TiB")])
def test_human_bytes(n, want):
    assert human_bytes(n) == want


def test_the_reason_names_the_folder_and_is_the_jobs_reason_as_it_is():
    from gpuworker.diskspace import Space

    e = disk_full("loras/x/", "saving checkpoint-20", Space(free=0, total=4 << 20))
    assert isinstance(e, DiskFull) and isinstance(e, EngineError)
    assert str(e) == ("no space left on the device while saving checkpoint-20 in loras/x/ "
                      "(its file system holds 4.0 MiB)")
    assert _reason(e) == str(e)
    # A write the engine does not name itself still says what happened, not just a type.
    assert _reason(OSError(errno.ENOSPC, "No space left on device")) == (
        "no space left on the device (OSError: [Errno 28] No space left on device)")


def test_a_run_removes_what_an_interrupted_save_left_half_written(tmp_path):
    """A process killed in the middle of a checkpoint leaves its hidden staging folder (the
    chaos run found two); the next run of the LoRA removes such leftovers before it writes,
    and nothing else."""
    import json

    from dispatcher.settings import DataPaths
    from tests.tiny import make_tiny_model, write_tiny_dataset
    from tests.unit.test_engine import ALPACA, Recorder, make_spec

    p = DataPaths(tmp_path / "home")
    p.ensure()
    make_tiny_model(p.models / "tiny")
    write_tiny_dataset(p.datasets / "tiny.json", n=24)
    (p.formats / "alpaca-test.json").write_text(json.dumps(ALPACA))
    folder = p.loras / "tiny-lora"
    (folder / ".checkpoint-14-a_0u_d12").mkdir(parents=True)
    (folder / ".checkpoint-14-a_0u_d12" / ".d5bb7d6d8a218077.tmp").write_bytes(b"half")
    (folder / ".saving-xyz").mkdir()
    (folder / ".0123abcd.tmp").write_bytes(b"half")
    (folder / "notes.txt").write_text("mine")
    rec = Recorder()
    rec.run(make_spec(epochs=1), p)
    names = sorted(x.name for x in folder.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert "notes.txt" in names and "adapter_model.safetensors" in names
    assert any("interrupted save left half-written" in line for line in rec.lines)
