"""Resuming a run from its checkpoints: a stopped or lost run, resumed, is the uninterrupted one.

The runs here use 10 samples, micro-batches of 2 and 3 micro-batches per optimizer step over
2.6 epochs: 13 micro-batches, 5 steps [0 1 2] [3 4 | 5] [6 7 8] [9 | 10 11] [12], where | is an
epoch boundary. Steps 2 and 4 span two epochs and step 5 is short, so a resume must find its
place in the data by arithmetic, not by the start of an epoch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from dispatcher.jobs.specs import TrainSpec
from dispatcher.settings import DataPaths
from gpuworker.engine import EngineError, train
from gpuworker.engine.resume import (
    CHECKPOINT_FILES,
    latest_checkpoint,
    load_optimizer_state_by_name,
    own_latest_checkpoint,
)
from tests.tiny import tiny_rows, write_tiny_dataset
from tests.unit.test_engine import (  # noqa: F401
    ALPACA,
    lora_weights,
    make_spec,
    paths,
    tiny_model_dir,
)

TOL = 1e-5


class WorkerLost(Exception):
    """Stands for the worker process dying in the middle of a run."""


class Run:
    """One call of `train`, recording what it reports. `stop_after`: should_stop() turns true
    after that many steps of this call; `lost_at`: the step whose progress event 'kills' it."""

    def __init__(self, stop_after: int | None = None, lost_at: int | None = None,
                 device: str = "cpu"):
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.stop_after, self.lost_at, self.device = stop_after, lost_at, device

    def progress(self, event: dict[str, Any]) -> None:
        json.dumps(event, allow_nan=False)
        self.events.append(event)
        if event["type"] == "train" and event["step"] == self.lost_at:
            raise WorkerLost

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "train"]

    def __call__(self, spec: TrainSpec, paths: DataPaths,  # noqa: F811
                 resume_from: str | None = None) -> dict[str, Any]:
        return train(spec, paths, self.progress, self.should_stop, self.lines.append,
                     device=self.device, resume_from=resume_from)


def spanning_spec(**kw: Any) -> TrainSpec:
    base: dict[str, Any] = dict(dataset="ten.json", micro_batch_size=2, batch_size=6,
                                epochs=2.6, lora_dropout=0.1, warmup_steps=1)
    base.update(kw)
    return make_spec(**base)


@pytest.fixture
def ten(paths):  # noqa: F811
    write_tiny_dataset(paths.datasets / "ten.json", n=10)
    return paths


@dataclass
class Whole:
    """The uninterrupted run of spanning_spec() that resumed ones must reproduce."""

    steps: list[dict[str, Any]]
    result: dict[str, Any]
    weights: dict[str, torch.Tensor]
    log: dict[str, Any]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_model_dir) -> Whole:  # noqa: F811
    home = DataPaths(tmp_path_factory.mktemp("whole") / "home")
    home.ensure()
    shutil.copytree(tiny_model_dir, home.models / "tiny")
    write_tiny_dataset(home.datasets / "ten.json", n=10)
    (home.formats / "alpaca-test.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    run = Run()
    result = run(spanning_spec(), home)
    assert [e["step"] for e in run.steps] == [1, 2, 3, 4, 5]
    lora_dir = home.loras / "tiny-lora"
    return Whole(run.steps, result, lora_weights(lora_dir),
                 json.loads((lora_dir / "training_log.json").read_text()))


def assert_same_run(parts: list[Run], whole: Whole, lora_dir: Path) -> None:
    got = [e for part in parts for e in part.steps]
    assert [e["step"] for e in got] == [1, 2, 3, 4, 5]  # none repeated or missing
    for g, w in zip(got, whole.steps, strict=True):
        assert g["total_steps"] == w["total_steps"]
        assert g["epoch"] == w["epoch"] and g["learning_rate"] == pytest.approx(w["learning_rate"])
        assert g["loss"] == pytest.approx(w["loss"], abs=TOL), g["step"]
    mine = lora_weights(lora_dir)
    assert mine.keys() == whole.weights.keys()
    for k, want in whole.weights.items():
        torch.testing.assert_close(mine[k], want, atol=TOL, rtol=0)
    log = json.loads((lora_dir / "training_log.json").read_text())
    assert [h["step"] for h in log["loss_history"]] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in log["loss_history"]] == pytest.approx(
        [h["loss"] for h in whole.log["loss_history"]], abs=TOL)
    assert log["current_steps"] == 5 and log["stopped"] is False


def test_stop_between_checkpoints_then_resume_latest_is_the_uninterrupted_run(ten, whole):
    spec = spanning_spec(lora_name="parted", save_steps=2)
    first = Run(stop_after=3)
    stopped = first(spec, ten)
    assert stopped["stopped"] is True and stopped["steps"] == 3
    lora_dir = ten.loras / "parted"
    # checkpoint-2 by save_steps, checkpoint-3 because the user stopped there.
    assert sorted(p.name for p in lora_dir.iterdir() if p.is_dir()) == [
        "checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(lora_dir) == lora_dir / "checkpoint-3"
    ckpt_log = json.loads((lora_dir / "checkpoint-3" / "training_log.json").read_text())
    assert ckpt_log["stopped"] is True and ckpt_log["current_steps"] == 3

    second = Run()
    result = second(spec, ten, resume_from="latest")
    assert [e["step"] for e in second.steps] == [4, 5]  # step 4 spans epochs 2 and 3
    assert_same_run([first, second], whole, lora_dir)
    assert result["resumed_from"] == "checkpoint-3" and whole.result["resumed_from"] is None
    assert result["steps"] == result["total_steps"] == 5 and result["stopped"] is False
    assert result["final_loss"] == pytest.approx(whole.result["final_loss"], abs=TOL)
    # Speed and ETA come from the resumed part's own steps.
    assert all(e["tokens_per_s"] > 0 for e in second.steps) and second.steps[-1]["eta_s"] == 0
    assert second.steps[0]["eta_s"] > 0
    assert any("Resuming" in line and "checkpoint-3" in line for line in second.lines)
    assert not any(p.name.startswith("backup-") for p in lora_dir.iterdir())


def test_a_lost_worker_resumes_from_a_named_checkpoint_mid_epoch(ten, whole):
    spec = spanning_spec(save_steps=1)
    first = Run(lost_at=2)
    with pytest.raises(WorkerLost):
        first(spec, ten)
    lora_dir = ten.loras / "tiny-lora"
    assert not (lora_dir / "adapter_model.safetensors").exists()  # died before the end
    assert latest_checkpoint(lora_dir) == lora_dir / "checkpoint-1"

    second = Run()
    second(spec, ten, resume_from="checkpoint-1")  # step 2 starts in epoch 1, ends in 2
    # Step 2's event went out before the worker died; its work is lost and done again.
    first.events = [e for e in first.events if e.get("step") == 1]
    assert_same_run([first, second], whole, lora_dir)


def test_without_the_rng_state_dropout_would_differ(ten, whole, monkeypatch):
    """The checks above can fail: skip restoring the RNG and the resumed losses move."""
    spec = spanning_spec()
    Run(stop_after=2)(spec, ten)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    torch.manual_seed(12345)
    second = Run()
    second(spec, ten, resume_from="latest")
    assert [e["step"] for e in second.steps] == [3, 4, 5]
    assert any(abs(a["loss"] - b["loss"]) > 1e-4
               for a, b in zip(second.steps, whole.steps[2:], strict=True))


def test_latest_without_a_checkpoint_starts_from_scratch_and_says_so(ten):
    run = Run(stop_after=1)
    result = run(spanning_spec(), ten, resume_from="latest")
    assert [e["step"] for e in run.steps] == [1]
    assert result["resumed_from"] is None
    assert any("No checkpoint to resume from" in line for line in run.lines)


def test_missing_or_misnamed_checkpoints_are_engine_errors(ten):
    Run(stop_after=1)(spanning_spec(), ten)
    with pytest.raises(EngineError, match="'checkpoint-7' was not found.*checkpoint-1"):
        Run()(spanning_spec(), ten, resume_from="checkpoint-7")
    with pytest.raises(EngineError, match="'step-1' must be 'latest' or"):
        Run()(spanning_spec(), ten, resume_from="step-1")
    (ten.loras / "tiny-lora" / "checkpoint-1" / "training_state.pt").unlink()
    with pytest.raises(EngineError, match="'checkpoint-1'.*incomplete.*training_state.pt"):
        Run()(spanning_spec(), ten, resume_from="checkpoint-1")


def test_changed_run_settings_are_refused_naming_each(ten):
    Run(stop_after=2)(spanning_spec(), ten)
    lora_dir = ten.loras / "tiny-lora"
    listing = sorted(p.name for p in lora_dir.rglob("*"))
    with pytest.raises(EngineError) as err:
        Run()(spanning_spec(lora_rank=4, seed=3, learning_rate="0.01"), ten, resume_from="latest")
    message = str(err.value)
    assert "checkpoint-2" in message and "lora_rank 8 -> 4" in message and "seed 0 -> 3" in message
    assert "learning_rate" not in message  # 1e-2 and 0.01 are the same rate
    assert sorted(p.name for p in lora_dir.rglob("*")) == listing
    # Settings around the steps may change: evaluation, save_steps, stop_at_loss.
    run = Run()
    run(spanning_spec(save_steps=1, eval_dataset="heldout.json", eval_steps=2), ten,
        resume_from="latest")
    assert [e["step"] for e in run.steps] == [3, 4, 5]


def test_changed_training_data_is_refused(ten):
    Run(stop_after=1)(spanning_spec(), ten)
    rows = tiny_rows(10)
    rows[4]["output"] = "Something else entirely."
    (ten.datasets / "ten.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(EngineError, match="training data changed.*10 samples then, 10 now"):
        Run()(spanning_spec(), ten, resume_from="latest")


def test_a_new_run_moves_the_earlier_runs_checkpoints_into_its_backup(ten):
    Run(stop_after=3)(spanning_spec(save_steps=2), ten)
    lora_dir = ten.loras / "tiny-lora"
    run = Run(stop_after=1)
    run(spanning_spec(), ten)  # continues the LoRA: a new run, numbered from step 1
    backup = next(p for p in lora_dir.iterdir() if p.name.startswith("backup-"))
    assert sorted(p.name for p in backup.iterdir() if p.is_dir()) == [
        "checkpoint-2", "checkpoint-3"]
    # Only the new run's own checkpoint is left to resume from.
    assert latest_checkpoint(lora_dir) == lora_dir / "checkpoint-1"


# --------------------------------------------------------------------------- pure helpers


def test_latest_checkpoint_is_the_highest_complete_one(tmp_path):
    def make(name: str, complete: bool = True) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        files = ["adapter_model.safetensors", "adapter_config.json", "training_state.pt",
                 "training_state.json"]
        for f in files if complete else files[:2]:
            (folder / f).write_text("x")
        return folder

    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    make("checkpoint-9")
    ten_ = make("checkpoint-10")  # numerically, not alphabetically, after 9
    make("checkpoint-30", complete=False)
    make(".checkpoint-40-tmp")  # a checkpoint being written
    make("checkpoint-x")
    make("backup-20240101-000000")
    (tmp_path / "checkpoint-50").write_text("a file, not a folder")
    assert latest_checkpoint(tmp_path) == ten_


def test_optimizer_state_is_matched_by_parameter_name_not_position():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    saved_opt = torch.optim.AdamW([a, b], lr=0.1)
    (a.sum() * 2 + b.sum() * 5).backward()
    saved_opt.step()
    sd = saved_opt.state_dict()

    # The same parameters in a rebuilt model, listed the other way round.
    b2, a2 = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([b2, a2], lr=0.1)
    load_optimizer_state_by_name(opt, ["b", "a"], sd, ["a", "b"])
    assert torch.equal(opt.state[a2]["exp_avg"], saved_opt.state[a]["exp_avg"])
    assert torch.equal(opt.state[b2]["exp_avg"], saved_opt.state[b]["exp_avg"])
    with pytest.raises(EngineError, match="other LoRA parameters"):
        load_optimizer_state_by_name(opt, ["b", "c"], sd, ["a", "b"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_resume_on_the_gpu_restores_the_loss_scale_and_the_cuda_rng(ten):
    whole_run = Run(device="cuda")
    whole_run(spanning_spec(lora_name="g-whole", precision="fp16"), ten)
    spec = spanning_spec(precision="fp16", save_steps=2)
    first, second = Run(stop_after=3, device="cuda"), Run(device="cuda")
    first(spec, ten)
    state = torch.load(ten.loras / "tiny-lora" / "checkpoint-3" / "training_state.pt",
                       weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["rng_cuda"] is not None
    second(spec, ten, resume_from="latest")
    got = first.steps + second.steps
    assert [e["step"] for e in got] == [1, 2, 3, 4, 5]
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in whole_run.steps],
                                                     abs=1e-4)
    mine, theirs = lora_weights(ten.loras / "tiny-lora"), lora_weights(ten.loras / "g-whole")
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-4, rtol=0)


def test_a_jobs_own_latest_checkpoint_among_other_jobs_and_older_ones(tmp_path):
    """What a re-queued job resumes by itself (OWN_LATEST): the latest checkpoint naming the
    job; checkpoints from before they named a job count as its own only where none names one
    (next to named ones they are another job's)."""

    def checkpoint(folder: Path, step: int, job: str | None) -> None:
        ck = folder / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            (ck / name).write_text("x")
        (ck / "training_state.json").write_text(
            json.dumps({"step": step, **({"job": job} if job else {})}))

    mixed = tmp_path / "mixed"
    checkpoint(mixed, 2, "job-b")
    checkpoint(mixed, 3, None)
    checkpoint(mixed, 5, "job-a")
    checkpoint(mixed, 7, "job-a")
    assert own_latest_checkpoint(mixed, "job-a").name == "checkpoint-7"
    assert own_latest_checkpoint(mixed, "job-b").name == "checkpoint-2"
    assert own_latest_checkpoint(mixed, "job-c") is None
    (mixed / "checkpoint-7" / "training_state.pt").unlink()  # incomplete: not resumed
    assert own_latest_checkpoint(mixed, "job-a").name == "checkpoint-5"

    older = tmp_path / "older"
    checkpoint(older, 3, None)
    checkpoint(older, 6, None)
    assert own_latest_checkpoint(older, "job-c").name == "checkpoint-6"
