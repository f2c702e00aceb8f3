"""A LoRA folder's lock (loras/<name>/.lock, gpuworker.folderlock; review15 H2, M7): what a
process that died left half-saved is cleared only while nobody holds the lock, so a live
process's staging survives a clear, a dead one's is cleared, and a second job on the same LoRA
is refused at once, naming the LoRA, instead of deleting the first one's files. Real processes
hold the lock (the kernel drops it when they die), on a real Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.settings import DataPaths, Settings
from gpuworker.folderlock import LOCK_NAME, holder_of, me, try_lock
from gpuworker.tasks import requeue_after_crash

ROOT = Path(__file__).resolve().parents[2]

# A process that holds the lock of a LoRA folder while it "saves": it takes the lock, leaves
# staging work in the folder, says so, and holds on until its stdin closes (or it is killed).
# (What it says it does, as the lock file tells: "training" unless told.)
HOLDER = r"""
import sys
from pathlib import Path
from gpuworker.folderlock import me, try_lock
folder = Path(sys.argv[1])
lock = try_lock(folder, me(job=sys.argv[2], doing=sys.argv[3]))
assert lock is not None, "the lock was held"
stage = folder / ".checkpoint-3-abc"
stage.mkdir()
(stage / "training_state.pt").write_bytes(b"half of a state")
(folder / ".saving-xyz").mkdir()
(folder / ".0123abcd.tmp").write_bytes(b"half")
print("held", flush=True)
sys.stdin.read()
"""


def hold(folder: Path, job: str, doing: str = "training") -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), job, doing], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(10)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


STAGING = [".0123abcd.tmp", ".checkpoint-3-abc", ".checkpoint-3-abc/training_state.pt",
           ".saving-xyz"]


@pytest.fixture
def settings(redis_server, prefix, tmp_path) -> Settings:
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    return s


def running(store: JobStore, lora: str, worker: str = "w1", attempt: int = 1) -> str:
    job = store.create("train", {"lora_name": lora})
    store.transition(job, JobState.ASSIGNED, "a", worker=worker, attempt=attempt)
    store.transition(job, JobState.RUNNING, "r")
    return job


def test_a_live_processs_staging_survives_the_workers_clear_and_a_dead_ones_is_cleared(
        settings, redis_client):
    """A worker restarted under its name settles the job its earlier life left running while
    that life's training process (an orphan) may still be saving: its staging stays. Once
    the process is dead, the next settle clears what it left."""
    store = JobStore(redis_client, settings.prefix)
    folder = settings.paths.loras / "shared"
    first = running(store, "shared")
    holder = hold(folder, first)
    try:
        (folder / "notes.txt").write_text("mine")
        before = snapshot(folder)
        assert requeue_after_crash(settings, first, "w1",
                                   "worker w1 restarted while the job was on it") == "retrying"
        assert snapshot(folder) == before  # every staging file as the live process left it
        assert holder_of(folder)["job"] == first and holder_of(folder)["doing"] == "training"
    finally:
        kill(holder)
    second = running(store, "shared", attempt=2)
    assert requeue_after_crash(settings, second, "w1", "the process died") == "retrying"
    left = snapshot(folder)
    assert set(left) == {"notes.txt"}  # (the lock file goes with the lock: nobody works here)


def test_a_cut_short_checkpoint_replace_is_put_back(settings, redis_client):
    """save_checkpoint replaces checkpoint-N by renaming it to .old-checkpoint-N, the new one
    into place, then removing the old: killed between the two renames, checkpoint-N is gone
    and .old-checkpoint-N is the complete one. The clear puts it back; where checkpoint-N is
    there, the old copy is what was left to remove."""
    store = JobStore(redis_client, settings.prefix)
    folder = settings.paths.loras / "replaced"
    for name in (".old-checkpoint-2", ".old-checkpoint-4", "checkpoint-4"):
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_model.safetensors").write_bytes(name.encode())
    job = running(store, "replaced")
    assert requeue_after_crash(settings, job, "w1", "the process died") == "retrying"
    assert snapshot(folder) == {
        "checkpoint-2": None,
        "checkpoint-2/adapter_model.safetensors": b".old-checkpoint-2",
        "checkpoint-4": None, "checkpoint-4/adapter_model.safetensors": b"checkpoint-4"}


def test_the_clear_after_a_kill_of_an_ended_job_and_never_through_a_link(settings,
                                                                         redis_client,
                                                                         tmp_path):
    """review15 M7: the stop watchdog ends the job (cancelled) and then kills its process,
    maybe in the middle of a checkpoint: the task_failure handler finds the job ended and does
    not re-queue it, but still clears what the process left. A loras/<name> that became a link
    out of the data folder is left alone."""
    store = JobStore(redis_client, settings.prefix)
    folder = settings.paths.loras / "watched"
    job = running(store, "watched")
    holder = hold(folder, job)
    store.transition(job, JobState.CANCELLED, "stopped by the user: the training process was "
                     "killed after not answering the stop request within 60 s",
                     expect_worker="w1")
    kill(holder)
    assert requeue_after_crash(settings, job, "w1", "killed") is None
    assert store.get(job)["state"] == "cancelled"
    assert not [n for n in STAGING if n in snapshot(folder)]

    outside = tmp_path / "outside"
    (outside / ".saving-q").mkdir(parents=True)
    (settings.paths.loras / "escape").symlink_to(outside)
    job = running(store, "escape")
    assert requeue_after_crash(settings, job, "w1", "the process died") == "retrying"
    assert (outside / ".saving-q").is_dir() and not (outside / LOCK_NAME).exists()


def test_a_process_forked_by_the_holder_does_not_keep_the_lock(tmp_path):
    """A data loader or compile worker forked by the training process must not hold the lock
    after the training process dies: the forked child closes its copy at once."""
    folder = tmp_path / "loras" / "forked"
    folder.mkdir(parents=True)
    script = r"""
import os, sys, time
from pathlib import Path
from gpuworker.folderlock import me, try_lock
lock = try_lock(Path(sys.argv[1]), me(job="parent"))
if os.fork() == 0:
    os.write(1, b"child\n")  # (after the fork's hooks ran in the child)
    time.sleep(30)
    os._exit(0)
os.write(1, b"parent\n")
sys.stdin.read()
"""
    p = subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert {p.stdout.readline().strip() for _ in range(2)} == {"parent", "child"}
        assert try_lock(folder, me()) is None  # the parent holds it
        p.kill()
        p.wait(10)
        lock = try_lock(folder, me(job="next"))  # the child still sleeps; the lock is free
        assert lock is not None
        assert json.loads((folder / LOCK_NAME).read_text())["job"] == "next"
        lock.release()
        assert not (folder / LOCK_NAME).exists()
    finally:
        os.killpg(p.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the engine


def tiny_paths(home: Path) -> DataPaths:
    """A data folder with the tiny model and dataset test_engine's specs train on."""
    from tests.tiny import make_tiny_model, write_tiny_dataset
    from tests.unit.test_engine import ALPACA

    p = DataPaths(home)
    p.ensure()
    make_tiny_model(p.models / "tiny")
    write_tiny_dataset(p.datasets / "tiny.json", n=24)
    (p.formats / "alpaca-test.json").write_text(json.dumps(ALPACA))
    return p


@pytest.fixture
def paths(tmp_path) -> DataPaths:
    return tiny_paths(tmp_path / "home")


def test_a_second_job_on_the_lora_is_refused_and_the_first_ones_files_stay(paths,
                                                                         monkeypatch):
    """Two jobs with one lora_name at once: the second finds the folder's lock held by the
    first's process and, once it has waited OTHER_HOLDER_WAIT_S (cut short here) for it to let
    go, is refused (FolderBusy: the worker re-queues it), naming the LoRA and the job, before it
    moves, clears or writes anything of the first's."""
    from gpuworker.engine import folder as engine_folder
    from gpuworker.errors import FolderBusy
    from tests.unit.test_engine import Recorder, make_spec

    monkeypatch.setattr(engine_folder, "OTHER_HOLDER_WAIT_S", 2.0)
    folder = paths.loras / "tiny-lora"
    holder = hold(folder, "first-job")
    try:
        (folder / "training_parameters.json").write_text('{"lora_name": "tiny-lora"}')
        before = snapshot(folder)
        rec = Recorder()
        started = time.monotonic()
        with pytest.raises(FolderBusy, match=r"^loras/tiny-lora is being trained by another "
                                             r"job \(first-job\)"):
            rec.run(make_spec(epochs=1), paths)
        assert time.monotonic() - started < 60
        assert snapshot(folder) == before
        assert not rec.of("train")
    finally:
        kill(holder)
    # Once the first job's process is gone, the LoRA trains, and its leftovers are cleared.
    rec = Recorder()
    rec.run(make_spec(epochs=1), paths)
    names = {n for n in snapshot(folder) if "/" not in n}
    assert {"adapter_model.safetensors", "training_log.json"} <= names
    assert not [n for n in STAGING if n in names]


def test_a_run_waits_for_an_earlier_run_of_its_own_job(paths):
    """The job's earlier attempt (an orphan of a worker's earlier life, fenced out) still
    holds the folder: the new attempt waits for it to stop rather than fail, then trains."""
    from gpuworker.engine.boundary import train
    from tests.unit.test_engine import Recorder, make_spec

    folder = paths.loras / "tiny-lora"
    holder = hold(folder, "job-1")
    threading.Timer(2.0, kill, [holder]).start()
    rec = Recorder()
    result = train(make_spec(epochs=1), paths, rec.progress, rec.should_stop, rec.lines.append,
                   device="cpu", job_id="job-1")
    assert result["saved"] and not result["stopped"]
    assert any("held by an earlier run of this job" in line for line in rec.lines), rec.lines
    assert holder.poll() is not None


# --------------------------------------------------------------------------- another OS user


NOBODY = 65534


def _lock_twice(folder: Path) -> dict:
    """Take the folder's lock, try it a second time while holding it, release it."""
    lock = try_lock(folder, me(job="next"))
    if lock is None:
        return {"taken": False}
    try:
        second = try_lock(folder, me(job="second")) is not None
        holder = holder_of(folder).get("job")
    finally:
        lock.release()
    return {"taken": True, "second": second, "holder": holder,
            "left": (folder / LOCK_NAME).exists()}


def _as_nobody(fn) -> dict:
    """`fn()` in a forked child that runs as another OS user (nobody), its answer as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = json.dumps(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = json.dumps({"error": repr(e)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.parametrize("folder_writable", [True, False])
def test_a_lock_file_another_os_user_left_does_not_block_the_lora(tmp_path, folder_writable):
    """review15b L8: a `.lock` left by a killed process of another OS user (0644: this user
    may only read it) gave PermissionError on try_lock's read-write open, so every later job on
    the LoRA failed. The lock is taken on a read-only descriptor (flock needs no more): held, it
    keeps out a second taker. Where the folder lets this user remove the stale file, it is
    replaced by one of its own, naming the holder; else the lock is held on it as it is.
    (As root, the taker is a child running as nobody and the file is root's; as any other
    user, the file is made read-only to its owner, which refuses the same open.)"""
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp()) if root else tmp_path  # (pytest's is private to root)
    try:
        base.chmod(0o755)
        folder = base / "loras" / "theirs"
        folder.mkdir(parents=True)
        (base / "loras").chmod(0o755)
        lock_file = folder / LOCK_NAME
        lock_file.write_text(json.dumps(me(job="old")))
        lock_file.chmod(0o644 if root else 0o444)
        folder.chmod(0o777 if folder_writable else 0o555)
        got = _as_nobody(lambda: _lock_twice(folder)) if root else _lock_twice(folder)
        assert got == {"taken": True, "second": False,
                       "holder": "next" if folder_writable else "old",
                       "left": not folder_writable}, got
    finally:
        (base / "loras" / "theirs").chmod(0o755)
        if root:
            shutil.rmtree(base)
