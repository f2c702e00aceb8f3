"""Trials trained together over one base (engine/pack.py, engine/train_pack.py), on the CPU in
fp32 with the tiny model: each trial of a pack trains exactly as it does alone."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import torch

from dispatcher.settings import DataPaths
from gpuworker.engine import levers
from gpuworker.engine.boundary import config_from_spec
from gpuworker.engine.report import Report
from gpuworker.engine.train import run_training
from gpuworker.engine.train_pack import PackMember, run_pack
from gpuworker.errors import EngineError
from tests.unit.test_engine import (  # noqa: F401
    LORA_FILES,
    Recorder,
    lora_weights,
    make_spec,
    paths,
    tiny_model_dir,
)

# Four trials that differ in everything a pack lets them differ in.
TRIALS = {
    "a": dict(lora_rank=8, lora_alpha=16, learning_rate="1e-2", lr_scheduler_type="linear",
              lora_dropout=0.1, target_modules=["q", "v"]),
    "b": dict(lora_rank=4, lora_alpha=4, learning_rate="3e-3", lr_scheduler_type="cosine",
              lora_dropout=0.0, target_modules=["all"], warmup_steps=2),
    "c": dict(lora_rank=16, lora_alpha=8, learning_rate="0", lr_scheduler_type="constant",
              lora_dropout=0.2, target_modules=["q", "k", "v", "o"]),
    "d": dict(lora_rank=2, lora_alpha=32, learning_rate="2e-2", lr_scheduler_type="constant",
              lora_dropout=0.05, target_modules=["q", "v"], optimizer="sgd"),
}
COMMON = dict(eval_dataset="heldout.json", eval_steps=2, epochs=2)


def _cfg(home: DataPaths, name: str, changes: dict[str, Any]) -> Any:
    return config_from_spec(make_spec(lora_name=name, **COMMON, **changes), home)


def alone(home: DataPaths, name: str, changes: dict[str, Any], rec: Recorder,
          resume_from: str | None = None) -> dict[str, Any]:
    return run_training(_cfg(home, name, changes),
                        Report(rec.progress, rec.should_stop, rec.lines.append), device="cpu",
                        resume_from=resume_from)


def together(home: DataPaths, trials: dict[str, dict[str, Any]],
             recs: dict[str, Recorder]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    members = [PackMember(_cfg(home, name, changes),
                          Report(recs[name].progress, recs[name].should_stop,
                                 recs[name].lines.append),
                          on_result=lambda r, name=name: results.__setitem__(name, r))
               for name, changes in trials.items()]
    run_pack(members, device="cpu")
    return results


def resumed_a_with_d(home: DataPaths, recs: dict[str, Recorder]) -> dict[str, Any]:
    """A pack of trial a, resumed from its latest checkpoint, and a new trial d."""
    results: dict[str, Any] = {}
    members = [PackMember(_cfg(home, n, TRIALS[n]),
                          Report(recs[n].progress, recs[n].should_stop, recs[n].lines.append),
                          on_result=lambda r, n=n: results.__setitem__(n, r),
                          resume_from="latest" if n == "a" else None) for n in ("a", "d")]
    run_pack(members, device="cpu")
    return results


def losses(rec: Recorder, kind: str = "train", key: str = "loss") -> list[float]:
    return [e[key] for e in rec.of(kind)]


def test_each_trial_of_a_pack_trains_as_it_does_alone(paths):  # noqa: F811
    recs = {n: Recorder() for n in TRIALS}
    results = together(paths, TRIALS, recs)
    assert set(results) == set(TRIALS)
    for name, changes in TRIALS.items():
        solo = Recorder()
        expected = alone(paths, f"solo-{name}", changes, solo)
        got = results[name]
        assert not isinstance(got, Exception), got
        assert len(losses(recs[name])) == expected["steps"] == 12
        assert losses(recs[name]) == pytest.approx(losses(solo), rel=1e-5), name
        assert losses(recs[name], "eval", "eval_loss") == pytest.approx(
            losses(solo, "eval", "eval_loss"), rel=1e-5), name
        assert got["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-5)
        assert got["trainable_params"] == expected["trainable_params"]
        assert got["total_params"] == expected["total_params"]
        # The LoRA folder is a run alone's: the same files, the same tensors by name, the
        # same adapter config (but for nothing), and the weights equal.
        folder, solo_folder = paths.loras / name, paths.loras / f"solo-{name}"
        assert {p.name for p in folder.iterdir()} == LORA_FILES
        w, w_solo = lora_weights(folder), lora_weights(solo_folder)
        assert w.keys() == w_solo.keys()
        for k in w:
            torch.testing.assert_close(w[k], w_solo[k], rtol=1e-5, atol=1e-7)
        assert json.loads((folder / "adapter_config.json").read_text()) == json.loads(
            (solo_folder / "adapter_config.json").read_text())
        log = json.loads((folder / "training_log.json").read_text())
        assert log["pack"] == list(TRIALS) and log["current_steps"] == 12
    # The trial with learning rate 0 kept its initial weights while the others learned.
    c = lora_weights(paths.loras / "c")
    assert all(not t.any() for k, t in c.items() if "lora_B" in k)
    assert any(t.abs().sum() > 0 for k, t in lora_weights(paths.loras / "a").items()
               if "lora_B" in k)


def checkpointed_cfg(home: DataPaths, name: str, changes: dict[str, Any]) -> Any:
    cfg = _cfg(home, name, changes)
    return replace(cfg, levers=replace(cfg.levers, prepare=("checkpointed",)))


def test_dropout_is_drawn_again_the_same_when_layers_are_recomputed(paths, monkeypatch):  # noqa: F811
    """With gradient checkpointing (each layer recomputed in backward), every lane draws in
    the recomputation the masks it drew in the forward pass: the losses stay the solo ones."""
    def checkpointed(model: Any, config: Any) -> Any:
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    monkeypatch.setitem(levers.PREPARE_HOOKS, "checkpointed", checkpointed)
    trials = {n: TRIALS[n] for n in ("a", "c", "d")}
    recs = {n: Recorder() for n in trials}
    results: dict[str, Any] = {}
    members = []
    for name, changes in trials.items():
        cfg = checkpointed_cfg(paths, name, changes)
        members.append(PackMember(cfg, Report(recs[name].progress, recs[name].should_stop,
                                              recs[name].lines.append),
                                  on_result=lambda r, name=name: results.__setitem__(name, r)))
    run_pack(members, device="cpu")
    assert any("Gradient checkpointing: 2 of 2 layers" in line for line in recs["a"].lines)
    for name, changes in trials.items():
        solo = Recorder()
        cfg = checkpointed_cfg(paths, f"solo-{name}", changes)
        run_training(cfg, Report(solo.progress, solo.should_stop, solo.lines.append),
                     device="cpu")
        assert losses(recs[name]) == pytest.approx(losses(solo), rel=1e-5), name


def test_lean_dropout_is_drawn_in_a_pack_as_alone(paths):  # noqa: F811
    """The lean dropout (part of `compile` on a GPU) moves a LoRA's dropout into its down
    projection; a pack's batched products draw each lane's dropout themselves, the same
    masks as the trial alone draws there."""
    def lean(home: DataPaths, name: str, changes: dict[str, Any]) -> Any:
        cfg = _cfg(home, name, changes)
        return replace(cfg, levers=replace(cfg.levers, prepare=("lean_dropout",)))

    trials = {n: TRIALS[n] for n in ("a", "b", "c")}
    recs = {n: Recorder() for n in trials}
    results: dict[str, Any] = {}
    run_pack([PackMember(lean(paths, name, changes),
                         Report(recs[name].progress, recs[name].should_stop,
                                recs[name].lines.append),
                         on_result=lambda r, name=name: results.__setitem__(name, r))
              for name, changes in trials.items()], device="cpu")
    for name, changes in trials.items():
        assert results[name]["speed"]["prepare"] == {"lean_dropout": "on"}
        solo, plain = Recorder(), Recorder()
        run_training(lean(paths, f"solo-{name}", changes),
                     Report(solo.progress, solo.should_stop, solo.lines.append), device="cpu")
        assert losses(recs[name]) == pytest.approx(losses(solo), rel=1e-5), name
        # The masks were drawn: not the run without dropout (where the LoRA learns at all).
        if changes["lora_dropout"] > 0 and float(changes["learning_rate"]) > 0:
            alone(paths, f"plain-{name}", {**changes, "lora_dropout": 0.0}, plain)
            assert losses(recs[name]) != pytest.approx(losses(plain), rel=1e-5), name


def test_a_stopped_trial_leaves_the_pack_and_resumes_alone_exactly(paths):  # noqa: F811
    trials = {n: TRIALS[n] for n in ("a", "b")}
    recs = {"a": Recorder(stop_after=5), "b": Recorder()}
    results = together(paths, trials, recs)
    assert results["a"]["stopped"] and results["a"]["steps"] == 5
    assert not results["b"]["stopped"] and results["b"]["steps"] == 12
    assert (paths.loras / "a" / "checkpoint-5").is_dir()
    # Resumed alone from the pack's checkpoint: the uninterrupted run's losses.
    rest = Recorder()
    alone(paths, "a", TRIALS["a"], rest, resume_from="latest")
    full = Recorder()
    alone(paths, "solo-a", TRIALS["a"], full)
    assert losses(recs["a"]) + losses(rest) == pytest.approx(losses(full), rel=1e-5)
    # The trial left in the pack (its rows now picked out of the stacks) trains as alone.
    solo_b = Recorder()
    alone(paths, "solo-b", TRIALS["b"], solo_b)
    assert losses(recs["b"]) == pytest.approx(losses(solo_b), rel=1e-5)


def test_a_scaling_not_a_power_of_two_in_bf16_is_peft_s_own(paths):  # noqa: F811
    """peft multiplies a LoRA's bf16 product by its scaling as a Python float (in fp32,
    rounded once); a pack does the same for every lane, also where alpha / rank is not exact
    in bf16 (16 / 12, 16 / 24): each trial's losses are its own alone, in bf16 on the CPU."""
    trials = {"x": dict(lora_rank=12, lora_alpha=16, learning_rate="1e-2", lora_dropout=0.1,
                        target_modules=["all"]),
              "y": dict(lora_rank=24, lora_alpha=16, learning_rate="3e-3", lora_dropout=0.0,
                        target_modules=["q", "v"])}
    bf16 = {n: {**c, "precision": "bf16"} for n, c in trials.items()}
    recs = {n: Recorder() for n in bf16}
    results = together(paths, bf16, recs)
    for name, changes in bf16.items():
        assert results[name]["precision"] == "bf16"
        solo = Recorder()
        alone(paths, f"solo-{name}", changes, solo)
        assert losses(recs[name]) == pytest.approx(losses(solo), rel=1e-6), name


def test_trials_end_on_their_own_and_a_refused_trial_does_not_stop_the_others(paths):  # noqa: F811
    trials = {"early": {**TRIALS["a"], "stop_at_loss": 100.0},
              "broken": {**TRIALS["b"], "target_modules": ["no_such_layer"]},
              "rest": TRIALS["d"]}
    recs = {n: Recorder() for n in trials}
    results = together(paths, trials, recs)
    assert results["early"]["steps"] == 1 and "stop_at_loss" in results["early"]["reason"]
    assert (paths.loras / "early" / "adapter_model.safetensors").is_file()
    assert isinstance(results["broken"], EngineError)
    assert results["rest"]["steps"] == 12


def test_one_trials_bookkeeping_or_name_clash_never_ends_the_others(paths):  # noqa: F811
    """A trial whose result cannot be recorded, or that names another's LoRA folder, ends
    alone; the rest of the pack trains to its end."""
    results: dict[str, Any] = {}
    recs = {n: Recorder() for n in ("x", "y", "z")}

    def broken(result: Any) -> None:
        raise RuntimeError("the job record is gone")

    def report(n: str) -> Report:
        return Report(recs[n].progress, recs[n].should_stop, recs[n].lines.append)

    members = [PackMember(_cfg(paths, "x", TRIALS["a"]), report("x"), broken),
               PackMember(_cfg(paths, "y", TRIALS["d"]), report("y"),
                          lambda r: results.__setitem__("y", r)),
               PackMember(_cfg(paths, "y", TRIALS["b"]), report("z"),
                          lambda r: results.__setitem__("z", r))]
    run_pack(members, device="cpu")
    assert results["y"]["steps"] == 12
    assert isinstance(results["z"], EngineError) and "own lora_name" in str(results["z"])
    assert any("Could not record this trial's result" in line for line in recs["x"].lines)
    assert (paths.loras / "x" / "adapter_model.safetensors").is_file()


def test_a_trial_whose_checkpoint_cannot_be_restored_ends_alone(paths, monkeypatch):  # noqa: F811
    """Resuming a pack: one trial's optimizer state does not load (here: injected); that trial
    ends with the error and the trial beside it trains to its end as alone."""
    from gpuworker.engine import loop

    together(paths, {"a": TRIALS["a"], "b": TRIALS["b"]},
             {"a": Recorder(stop_after=5), "b": Recorder()})
    real = loop._restore

    def refuse_a(resume, stepper, *a, **kw):
        if "loras/a/" in str(resume.folder).replace("\\", "/") + "/":
            raise EngineError("checkpoint-5's optimizer state does not fit (injected)")
        return real(resume, stepper, *a, **kw)

    monkeypatch.setattr(loop, "_restore", refuse_a)
    recs = {"a": Recorder(), "d": Recorder()}
    results = resumed_a_with_d(paths, recs)
    assert isinstance(results["a"], EngineError) and "injected" in str(results["a"])
    assert losses(recs["a"]) == []
    alone_d = Recorder()
    alone(paths, "solo-d", TRIALS["d"], alone_d)
    assert results["d"]["steps"] == 12
    assert losses(recs["d"]) == pytest.approx(losses(alone_d), rel=1e-5)


def test_a_trial_waiting_to_rejoin_the_pack_can_be_stopped(paths):  # noqa: F811
    """A trial resumed from step 5 waits while the pack trains steps 1-5 of a new trial; a stop
    asked for meanwhile is answered at once (not when the pack reaches step 6): it ends
    stopped at its checkpoint's step, its LoRA saved, and the other trial goes on."""
    together(paths, {"a": TRIALS["a"]}, {"a": Recorder(stop_after=5)})

    class StopOnSecondAsk(Recorder):  # the first ask is after the model loads
        asked = 0

        def should_stop(self) -> bool:
            self.asked += 1
            return self.asked >= 2

    recs = {"a": StopOnSecondAsk(), "d": Recorder()}
    results = resumed_a_with_d(paths, recs)
    assert results["a"]["stopped"] and results["a"]["steps"] == 5
    assert "while waiting to rejoin the pack at step 6" in results["a"]["reason"]
    assert losses(recs["a"]) == [] and (paths.loras / "a" / "adapter_model.safetensors").is_file()
    assert results["d"]["steps"] == 12 and not results["d"]["stopped"]


def test_a_compiled_pack_compiles_one_layer_for_all(paths, monkeypatch):  # noqa: F811
    """Regional compilation compiles a decoder layer once for all layers alike; a pack's
    layers must stay alike to it (nothing a layer's code reads may differ by layer): a model
    of 6 layers compiles as many graphs as one of 2. (torch's eager backend: the same
    tracing and guards, without generating code.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import LlamaForCausalLM

    original = torch.nn.Module.compile

    def eager(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("mode", None)
        return original(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager)
    tiny = LlamaForCausalLM.from_pretrained(paths.models / "tiny")
    six = tiny.config
    six.num_hidden_layers = 6
    torch.manual_seed(0)
    LlamaForCausalLM(six).save_pretrained(paths.models / "six")
    for f in (paths.models / "tiny").iterdir():  # the tokenizer's files
        if not (paths.models / "six" / f.name).exists():
            (paths.models / "six" / f.name).write_bytes(f.read_bytes())
    graphs = {}
    for model in ("tiny", "six"):
        torch._dynamo.reset()
        counters.clear()
        members = []
        for name in ("a", "b"):
            changes = {**TRIALS[name], "lora_dropout": 0.0, "base_model": model, "epochs": 1}
            cfg = config_from_spec(make_spec(lora_name=f"{model}-{name}", **changes), paths)
            cfg = replace(cfg, levers=replace(cfg.levers, prepare=("compile",),
                                              gpu_levers_on_cpu=True))
            members.append(PackMember(cfg, Report(lambda e: None, lambda: False, lambda s: None),
                                      on_result=lambda r: None))
        run_pack(members, device="cpu")
        graphs[model] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs["tiny"] > 0 and graphs["six"] == graphs["tiny"], graphs

