"""`python -m dispatcher`: run the scheduler loop (what `lorafleet dispatcher` starts)."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

from dispatcher.access.owners import Owners
from dispatcher.jobs.celery_app import (
    RUN_JOB_TASK,
    RUN_PACK_TASK,
    make_celery,
    run_job_args,
    run_pack_args,
)
from dispatcher.jobs.fleet import Fleet, worker_queue
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.claims import RELEASE_EVERY_S, backfill, release_unused
from dispatcher.schedule.scheduler import Dispatcher
from dispatcher.settings import RedisCredentialsError, Settings, connect

log = logging.getLogger("lorafleet.dispatcher")


class FleetDispatcher(Dispatcher):
    """The scheduler's loop plus the care of LoRA name claims (dispatcher/schedule/claims.py): a
    back-fill of owners once, and every RELEASE_EVERY_S a release of names no job will use."""

    def __init__(self, *args: Any, loras: Path, **kw: Any):
        super().__init__(*args, **kw)
        self.owners = Owners(self.r, self.store.p)
        self.loras = loras
        self._last_release = -math.inf

    def tick(self) -> list[tuple[str, str]]:
        assigned = super().tick()
        now = time.monotonic()
        if now - self._last_release >= RELEASE_EVERY_S:
            self._last_release = now
            try:
                for rel in release_unused(self.owners, self.store, self.loras,
                                          pending=self.pending.read):
                    log.info("released %s: its jobs ended without making the folder", rel)
            except Exception:  # the claims' care must never stop the scheduling
                log.exception("releasing unused LoRA names failed")
        return assigned

    def backfill(self) -> None:
        try:
            done = backfill(self.owners, self.store, self.loras)
        except Exception:
            log.exception("back-filling owners from the job records failed")
            return
        if done is not None:
            log.info("owners back-filled from the job records: %d LoRA folders, %d names of "
                     "waiting jobs", done["folders"], done["waiting"])


def run_dispatcher(settings: Settings, interval: float = 0.5) -> None:
    r = connect(settings)
    store = JobStore(r, settings.prefix)
    fleet = Fleet(r, settings.prefix, timeout=settings.worker_timeout)
    celery = make_celery(settings)

    def send(job_id: str, worker: dict, attempt: int) -> None:
        celery.send_task(RUN_JOB_TASK, args=run_job_args(job_id, worker, attempt),
                         queue=worker_queue(worker["name"]))

    def send_pack(label: str, attempts: dict[str, int], worker: dict) -> None:
        celery.send_task(RUN_PACK_TASK, args=run_pack_args(label, attempts, worker),
                         queue=worker_queue(worker["name"]))

    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    dispatcher = FleetDispatcher(store, fleet, send, loras=settings.paths.loras,
                                 send_pack=send_pack)
    dispatcher.backfill()  # once per prefix, before any job is placed
    dispatcher.run(interval, should_stop=lambda: stopping["flag"])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dispatcher %(message)s")
    try:
        run_dispatcher(Settings.from_env())
    except RedisCredentialsError as e:
        raise SystemExit(f"lorafleet dispatcher: {e}") from None


if __name__ == "__main__":
    main()
