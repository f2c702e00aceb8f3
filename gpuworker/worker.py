"""A GPU worker process: one Celery worker pinned to one card, with a heartbeat thread.

`lorafleet worker --gpus all` starts one of these per card (`python -m gpuworker.worker
--gpu N`) with CUDA_VISIBLE_DEVICES set to that card, or a single CPU worker. The main process
never imports torch: it reports the card through NVML; the Celery child that runs the task is
the only process that initialises CUDA, and it is replaced after each job so a crashed or
out-of-memory run cannot leave memory behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading

from dispatcher.celery_app import make_celery
from dispatcher.fleet import Fleet, worker_queue
from dispatcher.settings import Settings, connect
from gpuworker.tasks import register_tasks
from gpuworker.telemetry import card_info


def worker_name(gpu: int | None, host: str | None = None) -> str:
    host = host or socket.gethostname()
    return f"{host}-gpu{gpu}" if gpu is not None else f"{host}-cpu"


def start_heartbeat(settings: Settings, name: str, gpu: int | None,
                    stop: threading.Event) -> threading.Thread:
    """Send this worker's heartbeat every few seconds until `stop` is set."""
    host = socket.gethostname()
    pid = os.getpid()

    def beat() -> None:
        r = connect(settings)
        fleet = Fleet(r, settings.prefix, settings.worker_timeout)
        first = True
        release_orphans(settings, name)
        while not stop.is_set():
            try:
                fields = {"host": host, "queue": worker_queue(name), "pid": pid,
                          **card_info(gpu)}
                if first:
                    # job/state are owned by the task while it runs; set them only at start.
                    fields.update(state="idle", job="", started=fleet.clock())
                    first = False
                fleet.heartbeat(name, **fields)
            except Exception:
                logging.getLogger("lorafleet.worker").exception("heartbeat failed")
            stop.wait(settings.heartbeat_interval)
        try:
            fleet.remove(name)
        except Exception:
            pass

    t = threading.Thread(target=beat, name="heartbeat", daemon=True)
    t.start()
    return t


def release_orphans(settings: Settings, name: str) -> None:
    """A worker that starts runs nothing yet: a job still assigned to its name belonged to an
    earlier process of the same name (restarted before the dispatcher saw its heartbeats stop)
    and would otherwise stay `running` forever. Put such jobs back in the queue."""
    from dispatcher.store import JobStore
    from gpuworker.tasks import requeue_after_crash

    try:
        r = connect(settings)
        try:
            mine = [j["id"] for j in JobStore(r, settings.prefix).active()
                    if j.get("worker") == name]
        finally:
            r.close()
        for job_id in mine:
            requeue_after_crash(settings, job_id, name,
                                f"worker {name} restarted while the job was on it")
    except Exception:
        logging.getLogger("lorafleet.worker").exception("could not check for orphaned jobs")


def run_worker(settings: Settings, gpu: int | None, name: str | None = None,
               loglevel: str = "INFO") -> None:
    name = name or worker_name(gpu)
    celery = make_celery(settings)
    register_tasks(celery, settings)
    stop = threading.Event()
    start_heartbeat(settings, name, gpu, stop)
    try:
        celery.worker_main([
            "worker", "--queues", worker_queue(name), "--concurrency", "1",
            "--pool", "prefork", "--prefetch-multiplier", "1", "--max-tasks-per-child", "1",
            "--hostname", f"{name}@%h", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ])
    finally:
        stop.set()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gpuworker.worker")
    ap.add_argument("--gpu", type=int, default=None, help="physical card index (omit for CPU)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--loglevel", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_worker(Settings.from_env(), args.gpu, args.name, args.loglevel)


if __name__ == "__main__":
    main()
