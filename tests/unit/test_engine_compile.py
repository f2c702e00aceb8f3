"""Regional compilation (the `compile` preparation hook) is exact on the CPU. A file of its own:
compiling takes most of a minute on two cores, and the test files run side by side."""

from __future__ import annotations

import re

import pytest

from tests.unit.test_engine import Recorder, paths, tiny_model_dir  # noqa: F401
from tests.unit.test_engine_seams import RECORDED, assert_recorded
from tests.unit.test_engine_speed import run_with


def test_compiled_layers_train_to_the_recorded_losses(paths):  # noqa: F811
    """Regional compilation (each decoder layer through torch.compile, LoRA dropout recomputed
    inside it) changes no number the run reports: on raw text with dropout 0.1, the losses of
    the same run uncompiled within 1e-5 (on the CPU, inductor's C++ code; dropout draws the
    same masks from torch's generator), and the compiled code is cached in the data folder."""
    changes, _, _, _ = RECORDED["raw"]  # chunks of one length: one compilation
    changes = {**changes, "lora_dropout": 0.1}
    plain, compiled = Recorder(), Recorder()
    expected = run_with(paths, plain, changes)
    result = run_with(paths, compiled, {**changes, "lora_name": "compiled"}, prepare=("compile",),
                      gpu_levers_on_cpu=True, cuda_graphs=True)
    assert [e["loss"] for e in compiled.of("train")] == pytest.approx(
        [e["loss"] for e in plain.of("train")], rel=1e-5)
    assert result["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-5)
    # torch compiled the layers (a layer that failed would have run uncompiled, silently but
    # for this count): the training graphs with and without gradient into the first layer.
    graphs = re.fullmatch(r"on \((\d+) compiled graphs\)", result["speed"]["prepare"]["compile"])
    assert graphs and int(graphs[1]) >= 2, result["speed"]
    assert any((paths.home / "cache" / "torch-compile").iterdir())
    # The job's setting asks for CUDA graphs too: on the CPU the run says why there are none.
    assert result["speed"]["cuda_graphs"] == "off: they need a CUDA GPU"


def test_compiling_is_skipped_on_the_cpu_unless_asked(paths):  # noqa: F811
    rec = Recorder()
    result = run_with(paths, rec, RECORDED["raw"][0], prepare=("compile",),
                      gpu_levers_on_cpu=False)
    assert_recorded("raw", rec, result)
    assert result["speed"]["prepare"] == {
        "compile": "skipped: compiling pays on a GPU; on the CPU it takes longer than it saves"}
    assert not (paths.home / "cache" / "torch-compile").exists()
