"""The engine's speed levers are exact: on the CPU in fp32, a run with a lever on gives the losses
recorded from today's engine (tests/unit/test_engine_seams.py's RECORDED), and each lever's
pieces equal the plain computation they replace, gradients included."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gpuworker.engine import levers
from gpuworker.engine.boundary import config_from_spec
from gpuworker.engine.config import Levers
from gpuworker.engine.report import Report
from gpuworker.engine.train import run_training
from tests.unit.test_engine import Recorder, make_spec, paths, tiny_model_dir  # noqa: F401
from tests.unit.test_engine_seams import RECORDED


def run_with(paths, rec: Recorder, changes: dict[str, Any], **lever_names: Any  # noqa: F811
             ) -> dict[str, Any]:
    cfg = config_from_spec(make_spec(**changes), paths, Levers(**lever_names))
    return run_training(cfg, Report(rec.progress, rec.should_stop, rec.lines.append),
                        device="cpu")


def test_chunked_linear_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (10,))
    plain = F.cross_entropy(hidden @ weight.t(), target, reduction="sum")
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    for chunk in (3, 10, 64):  # chunks that split the rows unevenly, exactly, not at all
        fused = levers.chunked_linear_loss_sum(hidden, weight, target, chunk=chunk)
        g_fused = torch.autograd.grad(fused, (hidden, weight))
        assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
        for a, b in zip(g_fused, g_plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_the_fused_loss_trains_to_the_recorded_losses(paths, case):  # noqa: F811
    """The whole run with loss=fused (on the CPU: the chunked implementation, logits only at the
    label positions) against the losses recorded from today's engine: every step, the final
    loss and the evaluation losses within 1e-5, relative."""
    changes, losses, final, evals = RECORDED[case]
    rec = Recorder()
    result = run_with(paths, rec, changes, loss="fused")
    assert [e["loss"] for e in rec.of("train")] == pytest.approx(losses, rel=1e-5)
    assert result["final_loss"] == pytest.approx(final, rel=1e-5)
    assert [e["eval_loss"] for e in rec.of("eval")] == pytest.approx(evals, rel=1e-5)
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log["speed"]["loss"] == "fused (chunked)"
    assert log["speed"]["batching"] == "pad"


def test_a_kernel_hook_that_does_not_apply_is_skipped_with_its_reason(paths):  # noqa: F811
    """Liger's kernels on the CPU: the run trains as without them (the recorded losses, bit for
    bit), the log says why they were skipped, and training_log.json records it."""
    changes, losses, final, _ = RECORDED["dropout"]
    rec = Recorder()
    result = run_with(paths, rec, changes, prepare=("liger_kernels",))
    assert [e["loss"] for e in rec.of("train")] == losses and result["final_loss"] == final
    assert any("liger_kernels skipped: Liger's kernels need a CUDA GPU" in line
               for line in rec.lines)
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log["speed"]["prepare"] == {"liger_kernels": "skipped: Liger's kernels need a CUDA GPU"}
    assert log["speed"]["loss"] == "fp32_logits"


def test_the_fused_loss_falls_back_where_the_logits_are_more_than_a_product(
        paths, tiny_model_dir):  # noqa: F811
    """A model that scales its logits (here: a config that says so) cannot use the fused loss:
    the run uses fp32_logits and says why."""
    cfg_file = paths.models / "tiny" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    rec = Recorder()
    run_with(paths, rec, {}, loss="fused")
    assert any("loss fused does not apply" in line and "final_logit_softcapping" in line
               for line in rec.lines)
    log = json.loads((paths.loras / "tiny-lora" / "training_log.json").read_text())
    assert log["speed"]["loss"].startswith("fp32_logits (fused skipped:")
