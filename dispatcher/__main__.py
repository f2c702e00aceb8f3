"""`python -m dispatcher`: run the scheduler loop (what `lorafleet dispatcher` starts)."""

from __future__ import annotations

import logging
import signal

from dispatcher.celery_app import RUN_JOB_TASK, make_celery
from dispatcher.fleet import Fleet, worker_queue
from dispatcher.scheduler import Dispatcher
from dispatcher.settings import RedisCredentialsError, Settings, connect
from dispatcher.store import JobStore


def run_dispatcher(settings: Settings, interval: float = 0.5) -> None:
    r = connect(settings)
    store = JobStore(r, settings.prefix)
    fleet = Fleet(r, settings.prefix, timeout=settings.worker_timeout)
    celery = make_celery(settings)

    def send(job_id: str, worker: dict) -> None:
        celery.send_task(RUN_JOB_TASK, args=[job_id, worker["name"]],
                         queue=worker_queue(worker["name"]))

    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Dispatcher(store, fleet, send).run(interval, should_stop=lambda: stopping["flag"])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dispatcher %(message)s")
    try:
        run_dispatcher(Settings.from_env())
    except RedisCredentialsError as e:
        raise SystemExit(f"lorafleet dispatcher: {e}") from None


if __name__ == "__main__":
    main()
