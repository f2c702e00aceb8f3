"""A GPU worker process: one Celery worker pinned to one card, with a heartbeat thread.

`lorafleet worker --gpus all` starts one of these per card (`python -m gpuworker.worker
--gpu N`) with CUDA_VISIBLE_DEVICES set to that card, or a single CPU worker. The main process
reports the card through NVML and never initialises CUDA; the Celery child that runs the task
is the only process that does, and it is replaced after each job so a crashed or out-of-memory
run cannot leave memory behind. The heartbeat thread also kills that child when its job does
not answer a stop request in time (gpuworker.watchdog).

Because every job gets a fresh child, the main process imports the training libraries (torch,
transformers and the engine; not peft, whose import initialises CUDA) once at start-up, so each
forked child starts with them already imported instead of spending seconds on it inside the
job's time (:func:`preload_libraries`; ``LORAFLEET_PRELOAD=0`` turns it off).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import logging
import os
import socket
import threading
import time

from dispatcher.jobs.celery_app import TAKES_ATTEMPT, make_celery
from dispatcher.jobs.fleet import Fleet, worker_queue
from dispatcher.jobs.states import WorkerState
from dispatcher.jobs.store import JobStore
from dispatcher.settings import (
    WORKER_MEMORY_ENV,
    RedisCredentialsError,
    Settings,
    connect,
    env_set,
    preload_enabled,
)
from gpuworker.tasks import register_tasks, requeue_after_crash
from gpuworker.telemetry import CardReport
from gpuworker.watchdog import StopWatchdog

log = logging.getLogger("lorafleet.worker")


def worker_name(gpu: int | None, host: str | None = None) -> str:
    host = host or socket.gethostname()
    return f"{host}-gpu{gpu}" if gpu is not None else f"{host}-cpu"


def start_heartbeat(settings: Settings, name: str, gpu: int | None,
                    stop: threading.Event, memory_mb: int | None = None) -> threading.Thread:
    """Send this worker's heartbeat every few seconds until `stop` is set, and kill the job's
    process when it does not answer a stop request in time (gpuworker.watchdog)."""
    host = socket.gethostname()
    pid = os.getpid()
    card = CardReport(gpu, memory_mb, root_pid=pid)

    def beat() -> None:
        r = connect(settings)
        fleet = Fleet(r, settings.prefix, settings.worker_timeout)
        watchdog = StopWatchdog(JobStore(r, settings.prefix), fleet, name,
                                settings.stop_grace_s, settings.paths.loras)
        first = True
        while not stop.is_set():
            try:
                busy = not first and bool(r.hget(fleet.key(name), "job"))
                # packs: this worker runs a sweep's pack of trials as one task (gpuworker.packs);
                # TAKES_ATTEMPT: its tasks take the attempt they were sent for
                fields = {"host": host, "queue": worker_queue(name), "pid": pid, "packs": "1",
                          TAKES_ATTEMPT: "1", **card.fields(busy)}
                if first:
                    # job/state are owned by the task while it runs; set them only at start.
                    fields.update(state=WorkerState.IDLE.value, job="", jobs="", pack="",
                                  job_pid="",
                                  started=fleet.clock())
                    first = False
                fleet.heartbeat(name, **fields)
            except Exception:
                log.exception("heartbeat failed")
            try:
                watchdog.check()
            except Exception:
                log.exception("stop watchdog failed")
            stop.wait(settings.heartbeat_interval)
        try:
            fleet.remove(name)
        except Exception:  # the worker is going anyway; the dispatcher sees its heartbeat stop
            log.warning("could not remove %s from the fleet", name, exc_info=True)

    t = threading.Thread(target=beat, name="heartbeat", daemon=True)
    t.start()
    return t


def release_orphans(settings: Settings, name: str) -> None:
    """A worker that starts runs nothing yet: a job still assigned to its name belonged to an
    earlier process of the same name (restarted before the dispatcher saw its heartbeats stop)
    and would otherwise stay `running` forever. Put such jobs back in the queue."""
    try:
        r = connect(settings)
        try:
            # First the name is `starting` (not alive) until this process's first heartbeat:
            # the dispatcher must not take the earlier process's last heartbeat for this
            # one's and assign the job straight back while this process still imports.
            Fleet(r, settings.prefix, settings.worker_timeout).restarting(name)
            mine = [j["id"] for j in JobStore(r, settings.prefix).active()
                    if j.get("worker") == name]
            for job_id in mine:
                requeue_after_crash(settings, job_id, name,
                                    f"worker {name} restarted while the job was on it",
                                    mark_idle=False)
        finally:
            r.close()
    except Exception:
        log.exception("could not check for orphaned jobs")


def preload_libraries(cpu: bool = False) -> float | None:
    """Import what every job imports, in this (parent) process, without initialising CUDA.

    A forked child inherits the imported modules, so a job no longer spends the first seconds
    of its time importing torch and transformers' model and tokenizer classes (7 s on a fresh
    GPU machine, measured in docs/BENCHMARKS.md). What would touch the GPU is left to the
    child: peft where bitsandbytes is installed, because importing peft then imports
    bitsandbytes, which initialises CUDA (seen on an H200: after ``import peft``,
    ``torch.cuda.is_initialized()`` is true; a CPU worker without bitsandbytes preloads peft), and every
    ``torch.cuda`` call. While importing, torch's availability checks go through NVML
    (``PYTORCH_NVML_BASED_CUDA_CHECK``), which leaves the CUDA driver alone, in case a library
    asks. Afterwards both torch and the driver itself must still be uninitialised: a forked
    child cannot use a CUDA its parent initialised, so the worker stops with a message rather
    than fail every job. Returns the seconds spent, or None when ``LORAFLEET_PRELOAD=0`` turns
    it off or torch is not installed (jobs then fail with their own message, as before).
    """
    if not preload_enabled():
        return None
    started = time.monotonic()
    try:
        with env_set(NVML_CHECK, "1"):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

            import gpuworker.engine  # noqa: F401
    except ImportError as e:
        log.warning("not preloading the training libraries: %s", e)
        return None
    if cpu and importlib.util.find_spec("bitsandbytes") is None:
        # A CPU worker without bitsandbytes: peft leaves CUDA alone, so jobs skip its import
        # too (1.7 s of CPU each on a 2-core machine).
        try:
            with env_set(NVML_CHECK, "1"):
                import peft  # noqa: F401
        except ImportError as e:
            log.warning("not preloading peft: %s", e)
    if torch.cuda.is_initialized() or cuda_driver_initialised():
        raise RuntimeError("preloading the training libraries initialised CUDA, which the job "
                           "processes forked from this one could not use; start the worker "
                           "with LORAFLEET_PRELOAD=0")
    return time.monotonic() - started


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def cuda_driver_initialised() -> bool:
    """Whether this process has initialised the CUDA driver (``cuInit``), asked without
    initialising it: ``cuDeviceGetCount`` answers CUDA_ERROR_NOT_INITIALIZED until then.
    False where there is no driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuDeviceGetCount(ctypes.byref(count)) == 0


def run_worker(settings: Settings, gpu: int | None, name: str | None = None,
               loglevel: str = "INFO", memory_mb: int | None = None) -> None:
    name = name or worker_name(gpu)
    # First of all: a job an earlier process of this name left behind goes back to the queue at
    # once, not only after the import below (seconds, longer on a busy machine), when the
    # dispatcher may already have taken the name for a lost worker.
    release_orphans(settings, name)
    if memory_mb is not None:
        os.environ[WORKER_MEMORY_ENV] = str(memory_mb)
    else:
        os.environ.pop(WORKER_MEMORY_ENV, None)
    # Before the first heartbeat, so the dispatcher sends nothing to a worker still importing.
    spent = preload_libraries(cpu=gpu is None)
    if spent is not None:
        log.info(
            "training libraries imported in %.1f s (CUDA untouched); jobs start from them", spent)
    celery = make_celery(settings)
    register_tasks(celery, settings)
    stop = threading.Event()
    start_heartbeat(settings, name, gpu, stop, memory_mb)
    try:
        celery.worker_main(celery_worker_argv(name, loglevel))
    finally:
        stop.set()


def celery_worker_argv(name: str, loglevel: str = "INFO") -> list[str]:
    """The Celery worker's command line: its own queue, one job at a time, a prefetch of one,
    and a fresh pool child for every job (the child that imported torch and touched CUDA exits
    with its job, so the worker's main process never holds a CUDA context or leaked memory)."""
    return [
        "worker", "--queues", worker_queue(name), "--concurrency", "1",
        "--pool", "prefork", "--prefetch-multiplier", "1", "--max-tasks-per-child", "1",
        "--hostname", f"{name}@%h", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gpuworker.worker")
    ap.add_argument("--gpu", type=int, default=None, help="physical card index (omit for CPU)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--loglevel", default="INFO")
    ap.add_argument("--memory-mb", type=int, default=None,
                    help="advertise at most this much memory (MB); the scheduler gates on it")
    args = ap.parse_args(argv)
    if args.memory_mb is not None and args.memory_mb <= 0:
        ap.error(f"--memory-mb must be a positive number of MB, not {args.memory_mb}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        run_worker(Settings.from_env(), args.gpu, args.name, args.loglevel, args.memory_mb)
    except RedisCredentialsError as e:
        raise SystemExit(f"lorafleet worker: {e}") from None


if __name__ == "__main__":
    main()
