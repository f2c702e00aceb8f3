"""The final save as a set (review15 M8): a training process killed between the renames that
put its adapter, config and training_log.json into the LoRA folder leaves the complete set
behind, and the worker, settling the dead process's job, finishes it: the folder ends with the
whole new set, never the new adapter beside the old config and log. A real process is killed
(SIGKILL, from inside its own rename) in the middle of the engine's real save."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.settings import Settings
from gpuworker.tasks import requeue_after_crash

ROOT = Path(__file__).resolve().parents[2]
FILES = ("adapter_model.safetensors", "adapter_config.json", "training_log.json")

# Train the tiny LoRA again (it continues the saved one) and die by SIGKILL right after the
# final save's first rename into loras/tiny-lora/.
CHILD = r"""
import os, signal, sys
from pathlib import Path
real = os.replace
def replace(src, dst, *a, **kw):
    real(src, dst, *a, **kw)
    d = Path(dst)
    if d.parent.name == "tiny-lora" and d.name in ("adapter_model.safetensors",
                                                   "adapter_config.json"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from dispatcher.settings import DataPaths
from tests.unit.test_engine import Recorder, make_spec
Recorder().run(make_spec(epochs=2), DataPaths(Path(sys.argv[1])))
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_final_save_cut_between_its_renames_is_finished(tmp_path, redis_server,
                                                           redis_client, prefix):
    from tests.unit.test_engine import Recorder, make_spec
    from tests.unit.test_lora_lock import tiny_paths

    settings = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    paths = tiny_paths(settings.home)
    folder = paths.loras / "tiny-lora"
    Recorder().run(make_spec(epochs=1), paths)  # the LoRA as it was: 6 steps
    old = {n: digest(folder / n) for n in FILES}
    assert json.loads((folder / "training_log.json").read_text())["current_steps"] == 6

    child = subprocess.run([sys.executable, "-c", CHILD, str(paths.home)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                           text=True, timeout=240)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    # The new set, as the process left it: one file in place, the others in a hidden folder.
    staged = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(".")]
    assert len(staged) == 1, staged
    new = {p.name: digest(p) for p in staged[0].iterdir() if p.name in FILES}
    moved = [n for n in FILES if n not in new]
    assert len(moved) == 1, (moved, sorted(new))
    new.update({n: digest(folder / n) for n in moved})
    # (The config may be byte for byte the old one: same rank, same modules.)
    assert new["adapter_model.safetensors"] != old["adapter_model.safetensors"]
    assert new["training_log.json"] != old["training_log.json"]

    store = JobStore(redis_client, prefix)
    job = store.create("train", {"lora_name": "tiny-lora"})
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RUNNING, "r")
    assert requeue_after_crash(settings, job, "w1", "the process died") == "retrying"

    assert {n: digest(folder / n) for n in FILES} == new  # the whole new set, nothing old
    assert json.loads((folder / "training_log.json").read_text())["current_steps"] == 12
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
