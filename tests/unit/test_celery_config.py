"""The Celery settings that make long GPU jobs safe (see dispatcher/jobs/celery_app.py's docstring).

Each line here guards a failure that is slow and costly to see on a real fleet: a second card
re-running a job Redis re-delivered, a worker holding a job another idle card could start, or a
worker's main process keeping a CUDA context after a job."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dispatcher.jobs.celery_app import VISIBILITY_TIMEOUT_S, make_celery
from dispatcher.jobs.fleet import worker_queue
from dispatcher.settings import Settings
from gpuworker.worker import celery_worker_argv


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_app_acknowledges_late_prefetches_one_and_tracks_starts(tmp_path):
    conf = make_celery(Settings(home=tmp_path, redis_url="redis://127.0.0.1:1/0",
                                prefix="lf-test")).conf
    assert conf.task_acks_late is True and conf.task_track_started is True
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    # Longer than any training run, so Redis never hands a running job to a second card.
    assert conf.broker_transport_options["visibility_timeout"] == VISIBILITY_TIMEOUT_S
    assert VISIBILITY_TIMEOUT_S >= 7 * 24 * 3600
    # Two fleets on one Redis (or the tests) never see each other's messages.
    assert conf.broker_transport_options["global_keyprefix"] == "lf-test:celery:"
    assert conf.accept_content == ["json"]


def test_each_worker_takes_one_job_at_a_time_from_its_own_queue():
    argv = celery_worker_argv("gpu3")
    assert argv[0] == "worker"
    assert _option(argv, "--queues") == worker_queue("gpu3")
    assert _option(argv, "--concurrency") == "1"
    assert _option(argv, "--prefetch-multiplier") == "1"
    # A fresh child per job: the process that trained (and initialised CUDA) ends with its job.
    assert _option(argv, "--max-tasks-per-child") == "1"
    assert _option(argv, "--pool") == "prefork"
    assert _option(argv, "--hostname") == "gpu3@%h"


def test_preloading_imports_the_libraries_and_can_be_turned_off(monkeypatch):
    import importlib.util
    import sys

    import torch

    from gpuworker.worker import preload_libraries

    monkeypatch.setenv("LORAFLEET_PRELOAD", "0")
    assert preload_libraries() is None
    monkeypatch.delenv("LORAFLEET_PRELOAD")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "0")
    assert preload_libraries() >= 0
    assert "transformers" in sys.modules and "gpuworker.engine" in sys.modules
    # peft too, on a CPU worker without bitsandbytes (peft would import it, and it touches CUDA);
    # asked in a fresh process, as this one may have imported peft already.
    code = ("import sys; from gpuworker.worker import preload_libraries; "
            "assert 'peft' not in sys.modules; preload_libraries(cpu=True); "
            "print('peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2]).stdout.split()
    assert out[-1] == str(importlib.util.find_spec("bitsandbytes") is None)
    # NVML-based checks only while importing: the setting the worker was started with stays.
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"
    # A library that initialised CUDA while being imported stops the worker: its forked job
    # processes could not use the GPU.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="LORAFLEET_PRELOAD=0"):
        preload_libraries()
