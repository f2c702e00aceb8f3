"""Regional compilation (the `compile` preparation hook) is exact on the CPU. A file of its own:
compiling takes most of a minute on two cores, and the test files run side by side."""

from __future__ import annotations

import pytest

from tests.unit.test_engine import Recorder, paths, tiny_model_dir  # noqa: F401
from tests.unit.test_engine_seams import RECORDED
from tests.unit.test_engine_speed import run_with


def test_compiled_layers_train_to_the_recorded_losses(paths):  # noqa: F811
    """Regional compilation (each decoder layer through torch.compile) changes no number the
    run reports: the recorded losses within 1e-5 (on the CPU, inductor's C++ code), and the
    compiled code is cached in the data folder."""
    changes, losses, final, evals = RECORDED["raw"]  # chunks of one length: one compilation
    rec = Recorder()
    result = run_with(paths, rec, changes, prepare=("compile",), compile_on_cpu=True)
    assert [e["loss"] for e in rec.of("train")] == pytest.approx(losses, rel=1e-5)
    assert result["final_loss"] == pytest.approx(final, rel=1e-5)
    assert [e["eval_loss"] for e in rec.of("eval")] == pytest.approx(evals, rel=1e-5)
    assert result["speed"]["prepare"] == {"compile": "on"}
    assert any((paths.home / "cache" / "torch-compile").iterdir())


def test_compiling_is_skipped_on_the_cpu_unless_asked(paths):  # noqa: F811
    changes, losses, _, _ = RECORDED["raw"]
    rec = Recorder()
    result = run_with(paths, rec, changes, prepare=("compile",))
    assert [e["loss"] for e in rec.of("train")] == losses
    assert result["speed"]["prepare"] == {
        "compile": "skipped: compiling pays on a GPU; on the CPU it takes longer than it saves"}
    assert not (paths.home / "cache" / "torch-compile").exists()
