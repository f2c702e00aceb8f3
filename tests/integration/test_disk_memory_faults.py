"""Disk and memory faults, through real processes (issue 15): the data folder filling up while
a checkpoint or the LoRA is being saved, and a training process killed by the kernel's
out-of-memory killer.

Both faults are real, not simulated. The full disk is a tmpfs of a few MiB mounted over the
worker's loras/ in user and mount namespaces of the worker's own (no root needed; see
tests/resourcekit.py), filled by the test while the job trains, so the trainer's own writes hit
ENOSPC. The OOM kill is the kernel's: the worker runs in a memory cgroup whose limit lets it
idle and train the tiny model, and a job on a larger model crosses it. Each test skips, saying
why, where the machine cannot do this (no user namespaces; no writable memory cgroup).

Every wait has a deadline; a process that dies while a test waits fails it with its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dispatcher.jobs.fleet import Fleet
from gpuworker.diskspace import human_bytes
from tests.faultkit import SLOW, TERMINAL, events, states, submit
from tests.fleetproc import ROOT, FleetProcs
from tests.lorafolders import assert_no_half_written as _no_half_written
from tests.resourcekit import (
    MemoryCgroup,
    fill,
    free_bytes,
    seen_by,
    small_fs_refusal,
    start_worker_in_cgroup,
    start_worker_on_small_fs,
    tree_digest,
)

pytestmark = pytest.mark.integration

# The worker's loras/: room for the tiny model's LoRA and a few checkpoints (each ~30 KiB).
SMALL_FS = 4 << 20


def _small_fs_fleet(fleet_factory) -> tuple[FleetProcs, int]:
    """A dispatcher and worker `a` whose loras/ is a SMALL_FS tmpfs; (fleet, worker pid)."""
    refusal = small_fs_refusal()
    if refusal:
        pytest.skip(refusal)
    f = fleet_factory(workers=())
    worker = start_worker_on_small_fs(f, "a", SMALL_FS)
    f.wait_for_workers(1)
    loras = seen_by(worker.pid, f.settings.paths.loras)
    # The worker's loras/ is the small file system; the test's own view is the real folder.
    assert os.statvfs(loras).f_blocks * os.statvfs(loras).f_frsize == SMALL_FS
    assert os.statvfs(f.settings.paths.loras).f_blocks * os.statvfs(
        f.settings.paths.loras).f_frsize > SMALL_FS
    return f, worker.pid


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _train_steps(f: FleetProcs, job: str) -> list[int]:
    return [e["step"] for e in events(f, job) if e["type"] == "train"]


def _worker_idle_and_alive(f: FleetProcs, name: str) -> None:
    assert f.procs[f"worker-{name}"].poll() is None, f.log(f"worker-{name}")[-3000:]
    f.wait_for(lambda: any(w["name"] == name and w.get("state") == "idle"
                           for w in Fleet(f.r, f.prefix, timeout=6).alive()),
               10, f"worker {name} to be idle")


# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_disk_full_while_saving_a_checkpoint_then_resumed_once_space_is_freed(fleet_factory):
    """The disk fills up after checkpoint-10; the trainer's checkpoint-20 runs out of space
    half-way (half a checkpoint's room is left). The job fails at once with a reason naming
    the folder and the checkpoint that stays, not a traceback; checkpoint-10 is byte for byte
    as it was, nothing half-written is left, and the worker stays up. Once the space is freed,
    the next job on the same worker resumes from checkpoint-10 and succeeds."""
    f, pid = _small_fs_fleet(fleet_factory)
    loras = seen_by(pid, f.settings.paths.loras)
    lora = "full-at-checkpoint"
    out = loras / lora
    spec = {"lora_name": lora, "epochs": 25, "save_steps": 10, **SLOW}
    job = submit(f, **spec)
    f.wait_for(lambda: (out / "checkpoint-10").is_dir(), 90, "checkpoint-10")
    kept = tree_digest(out / "checkpoint-10")
    filler = fill(loras, leave=_size(out / "checkpoint-10") // 2)
    assert free_bytes(loras) < _size(out / "checkpoint-10")

    rec = f.wait_for_state(job, TERMINAL, 90)
    assert rec["state"] == "failed", rec
    reason = rec["reason"]
    assert reason.startswith(
        f"no space left on the device while saving checkpoint-20 in loras/{lora}/ "
        "(its file system holds 4.0 MiB); checkpoint-10 stays as it was: free some space, "
        "then resume from it"), reason
    assert "Traceback" not in reason and str(f.home) not in reason
    assert states(f, job) == ["queued", "assigned", "running", "failed"]
    assert _train_steps(f, job)[-1] == 20  # it failed at step 20's checkpoint, not before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10"]
    assert tree_digest(out / "checkpoint-10") == kept
    _no_half_written(out)
    # The LoRA was never finished, and nothing says it was.
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "training_log.json").exists()
    _worker_idle_and_alive(f, "a")

    filler.unlink()
    again = submit(f, **spec, resume_from_checkpoint="latest")
    rec = f.wait_for_state(again, TERMINAL, 120)
    assert rec["state"] == "succeeded", rec.get("reason")
    assert rec["worker"] == "a" and rec["result"]["resumed_from"] == "checkpoint-10"
    assert _train_steps(f, again) == list(range(11, 26))
    log = json.loads((out / "training_log.json").read_text())
    assert log["current_steps"] == 25 and log["resumed_from"] == "checkpoint-10"
    assert (out / "adapter_model.safetensors").is_file()
    _no_half_written(out)


@pytest.mark.timeout(240)
def test_disk_full_while_saving_the_lora_leaves_the_earlier_lora_as_it_was(fleet_factory):
    """A LoRA trained once; a second job continues it, and the disk fills up while it trains,
    so its final save runs out of space (room for part of the new files is left). The job
    fails naming the folder; the LoRA's adapter, config and training log are byte for byte
    the first run's (the new files were all written aside before any took its place), nothing
    half-written is left, and the worker takes the next job, which succeeds once the space is
    freed."""
    f, pid = _small_fs_fleet(fleet_factory)
    loras = seen_by(pid, f.settings.paths.loras)
    lora = "full-at-save"
    out = loras / lora
    spec = {"lora_name": lora, "epochs": 1}
    first = submit(f, **spec)
    assert f.wait_for_state(first, TERMINAL, 90)["state"] == "succeeded"
    final = ("adapter_model.safetensors", "adapter_config.json", "training_log.json")
    before = {n: (out / n).read_bytes() for n in final}

    job = submit(f, **{**spec, "epochs": 12, **SLOW})
    # Past the start (the earlier files are copied to a backup), into training.
    f.wait_for(lambda: any(s >= 2 for s in _train_steps(f, job)), 60, "training to start")
    filler = fill(loras, leave=len(before["adapter_model.safetensors"]) + 1024)
    rec = f.wait_for_state(job, TERMINAL, 90)
    assert rec["state"] == "failed", rec
    reason = rec["reason"]
    assert reason == (
        f"no space left on the device while saving the LoRA in loras/{lora}/ (its file system "
        "holds 4.0 MiB); the LoRA's files are as they were before this save; free some space, "
        "then run the job again"), reason
    assert _train_steps(f, job)[-1] == 12  # trained to the end, then the save failed
    assert {n: (out / n).read_bytes() for n in final} == before
    _no_half_written(out)
    assert [p.name for p in out.glob("backup-*")]  # the continued run's copy of the first
    _worker_idle_and_alive(f, "a")

    filler.unlink()
    again = submit(f, **{**spec, "epochs": 2})
    rec = f.wait_for_state(again, TERMINAL, 90)
    assert rec["state"] == "succeeded", rec.get("reason")
    log = json.loads((out / "training_log.json").read_text())
    assert log["current_steps"] == rec["total_steps"] == 12  # this run's (2 epochs of 6)
    _no_half_written(out)


# The engine alone on a small file system, in a process of its own (the namespaces need one):
# the LoRA's final files fit only without training_log.json, the last one written.
_SAVE_ON_A_FULL_DISK = """
import json, math, os, shutil, sys
from pathlib import Path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from gpuworker.engine.lora import backup_folder
from gpuworker.engine.save import save_adapter
from gpuworker.errors import DiskFull
from tests.resourcekit import fill

model_dir, small = sys.argv[1], Path(sys.argv[2])
model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
# What peft writes (the adapter, its config and a README.md that save_adapter removes), in
# whole pages: exactly that much is left free.
scratch = small / "scratch"
model.save_pretrained(str(scratch))
page = os.sysconf("SC_PAGE_SIZE")
written = {p.name: p.stat().st_size for p in scratch.iterdir()}
shutil.rmtree(scratch)
lora = small / "loras" / "x"
lora.mkdir(parents=True)
earlier = small / "loras" / "y"  # a LoRA with a file larger than the room that is left
earlier.mkdir()
(earlier / "adapter_model.safetensors").write_bytes(os.urandom(300 << 10))
fill(small, leave=sum(math.ceil(n / page) for n in written.values()) * page)
log = {"loss_history": [{"step": i, "loss": 1.0} for i in range(3000)]}  # ~80 KiB
try:
    save_adapter(model, lora, model_dir, training_log=log)
    result = "saved"
except DiskFull as e:
    result = str(e)
try:
    backup_folder(earlier, move=False)
    backup = "copied"
except OSError as e:
    backup = e.strerror
print(json.dumps({"written": written, "result": result, "left": sorted(os.listdir(lora)),
                  "backup": backup, "earlier": sorted(os.listdir(earlier))}))
"""


@pytest.mark.timeout(120)
def test_final_save_out_of_space_at_the_training_log_writes_none_of_the_lora(tmp_path):
    """save_adapter on a real full tmpfs where the adapter and its config fit but
    training_log.json does not: it raises DiskFull naming loras/x/, and the LoRA folder gets
    none of the three files (all are written aside first; an adapter without its log would
    look like a finished LoRA). And a backup copy that runs out of space is removed."""
    refusal = small_fs_refusal()
    if refusal:
        pytest.skip(refusal)
    from tests.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "tiny")
    small = tmp_path / "small"
    small.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c",
         'mount -t tmpfs -o size=1m lorafleet-small "$1" && exec "$2" -c "$3" "$4" "$1"', "sh",
         str(small), sys.executable, _SAVE_ON_A_FULL_DISK, str(model_dir)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=100)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert sorted(out["written"]) == ["README.md", "adapter_config.json",
                                      "adapter_model.safetensors"]
    assert out["result"] == ("no space left on the device while saving the LoRA in loras/x/ "
                             "(its file system holds 1.0 MiB)"), out
    assert out["left"] == [], out
    # Continuing a LoRA copies its files to a backup first: a copy that runs out of space
    # leaves no half of a backup behind.
    assert out["backup"] == "No space left on device"
    assert out["earlier"] == ["adapter_model.safetensors"], out


# ---------------------------------------------------------------------------------------------
def _sig_kill_reason(f: FleetProcs, job: str) -> str:
    return next(h for h in f.store.history(job) if h["state"] in ("retrying", "failed"))["reason"]


def test_training_process_killed_by_hand_is_not_called_out_of_memory(fleet_factory):
    """kill -9 of the training child (not the OOM killer): the job is re-queued, and its reason
    says the process was killed by SIGKILL and, since the kernel's OOM-kill count did not
    move, that it was not out of memory (the counterpart of the OOM test below: the same
    words must not come from every kill)."""
    f = fleet_factory(workers=("a",))
    job = submit(f, lora_name="killed-by-hand", epochs=12, **SLOW)
    f.wait_for(lambda: len(_train_steps(f, job)) >= 2, 60, "training")
    kids = f.children("worker-a")
    assert len(kids) == 1, kids
    os.kill(kids[0], signal.SIGKILL)
    f.wait_for(lambda: "retrying" in states(f, job), 10, "the job to be re-queued")
    assert _sig_kill_reason(f, job) == (
        "the training process on a died: it was killed by signal 9 (SIGKILL), not by the "
        "kernel's out-of-memory killer (it killed nothing meanwhile); re-queued")
    rec = f.wait_for_state(job, TERMINAL, 120)
    assert rec["state"] == "succeeded" and rec["attempt"] == 2, rec.get("reason")
    assert f.procs["worker-a"].poll() is None


@pytest.fixture
def memory_cgroup():
    made = MemoryCgroup.make(f"lorafleet-oom-{os.getpid()}-{time.monotonic_ns()}")
    if isinstance(made, str):
        pytest.skip(made)
    yield made
    made.remove()


# What the tiny job may use above the worker's peak so far: the limit lets every tiny job
# train, while the big model (BIG_PARAMS weights, ~800 MB in fp32) cannot even be loaded.
HEADROOM = 250 << 20
BIG_PARAMS = 200_000_000


def _make_big_model(dest) -> None:
    """The tiny model's tokenizer with a Llama of ~200M parameters (4 layers of 2048) in
    bf16: a CPU worker needs ~800 MB of its own to load it in fp32, far beyond HEADROOM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_tiny_model

    make_tiny_model(dest)
    tiny = json.loads((dest / "config.json").read_text())
    config = LlamaConfig(vocab_size=tiny["vocab_size"], hidden_size=2048,
                         intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=16, max_position_embeddings=512,
                         bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"],
                         pad_token_id=tiny["pad_token_id"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) >= BIG_PARAMS
    # Stored in bf16, as most models are: a CPU worker trains in fp32, so loading converts
    # every weight into memory of the process's own (fp32 weights would be mapped from the
    # file instead, and the page cache is charged to whoever read the file first).
    model.to(torch.bfloat16).save_pretrained(dest)


@pytest.mark.timeout(300)
def test_training_process_killed_by_the_oom_killer_is_retried_with_its_reason(
        memory_cgroup, fleet_factory):
    """The worker runs in a memory cgroup (as in a container or a systemd unit with a memory
    limit) whose limit leaves it room to train the tiny model but not to load a larger one.
    A job on the larger model: the kernel's OOM killer kills its training process (a real
    SIGKILL from the kernel, counted in the cgroup's oom_kill), the worker's main process
    survives and re-queues the job at once with the reason "killed by signal 9 (SIGKILL),
    likely by the kernel's out-of-memory killer ... in the worker's memory cgroup"; the job is
    tried again (never left `running`) until it has failed three times. Meanwhile and after,
    the worker takes the next job, which fits, and trains it."""
    f = fleet_factory(workers=())
    _make_big_model(f.settings.paths.models / "big")
    start_worker_in_cgroup(f, "a", memory_cgroup)
    f.wait_for_workers(1)
    # What the worker needs to train the tiny model, measured: the limit is that plus room.
    fits = submit(f, lora_name="fits", epochs=1)
    assert f.wait_for_state(fits, TERMINAL, 90)["state"] == "succeeded"
    limit = memory_cgroup.peak() + HEADROOM
    memory_cgroup.set_limit(limit)
    main = f.procs["worker-a"].pid
    assert main in memory_cgroup.pids()
    kills_before = memory_cgroup.oom_kills()

    big = submit(f, lora_name="too-big", base_model="big", epochs=1)
    f.wait_for(lambda: "retrying" in states(f, big), 60, "the big job to be re-queued")
    assert memory_cgroup.oom_kills() > kills_before  # the kernel did kill
    reason = next(h for h in f.store.history(big) if h["state"] == "retrying")["reason"]
    assert reason.startswith(
        "the training process on a died: it was killed by signal 9 (SIGKILL), likely by the "
        "kernel's out-of-memory killer: it killed 1 process(es) in the worker's memory cgroup "
        f"{memory_cgroup.path}, limit {human_bytes(limit)} while the job ran. "), reason
    assert ("The job needs more memory than the worker may use: lower micro_batch_size, "
            "cutoff_len or lora_rank, or give the worker more memory; re-queued") in reason
    assert f.procs["worker-a"].poll() is None and main in memory_cgroup.pids()

    rec = f.wait_for_state(big, TERMINAL, 180)
    assert rec["state"] == "failed", rec
    assert rec["reason"].endswith("it happened 3 times, giving up"), rec["reason"]
    assert states(f, big) == ["queued"] + ["assigned", "running", "retrying"] * 2 + [
        "assigned", "running", "failed"]
    assert memory_cgroup.oom_kills() >= kills_before + 3
    # The worker, its main process never killed, takes the next job and trains it.
    after = submit(f, lora_name="fits-after", epochs=1)
    rec = f.wait_for_state(after, TERMINAL, 90)
    assert rec["state"] == "succeeded" and rec["worker"] == "a", rec.get("reason")
    assert f.procs["worker-a"].pid == main and f.procs["worker-a"].poll() is None
