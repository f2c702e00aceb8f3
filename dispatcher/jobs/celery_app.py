"""The Celery application, configured for long GPU jobs from the same Settings as everything else.

Why these settings:
- one task at a time per worker and a prefetch of one: a worker never holds a second job that
  another idle card could have started;
- late acknowledgement with a visibility timeout longer than any training run: Redis never
  re-delivers a running job to a second card while the first still trains it;
- a queue per worker (see dispatcher.jobs.fleet.worker_queue): the dispatcher decides placement,
  Celery only delivers;
- started state tracked, so Celery's own view agrees with the job record.
The dispatcher sends tasks by name; only gpuworker defines them, so the dispatcher and the
dashboard never import torch.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from dispatcher.settings import Settings

# One job (args: job id, worker, attempt).
RUN_JOB_TASK = "lorafleet.run_job"
# A sweep's pack: its trials trained together over one base model (args: label, job ids, worker,
# {job id: attempt}).
RUN_PACK_TASK = "lorafleet.run_pack"
# The heartbeat field of a worker whose tasks take the attempt they were sent for ("1").
TAKES_ATTEMPT = "task_attempt"
# A week: longer than any training run lorafleet is meant for.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def make_celery(settings: Settings) -> Celery:
    url = settings.effective_redis_url()
    app = Celery("lorafleet", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=False,  # a lost worker's job is re-queued by the dispatcher
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_track_started=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_expires=7 * 24 * 3600,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S,
                                  "global_keyprefix": f"{settings.prefix}:celery:"},
        result_backend_transport_options={"global_keyprefix": f"{settings.prefix}:celery:"},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue=f"lorafleet.default.{settings.prefix}",
    )
    return app


# A task carries the attempt it was sent for: every write of the run, and the worker's crash
# handler that settles a task which ended without an outcome, is fenced on it, so a task of an
# earlier attempt (one that died late, or a message that turned up late) cannot settle or start
# the job's next attempt on the same worker name. A worker of a version before this does not
# say TAKES_ATTEMPT and its task would refuse the extra argument (failing the job): it is sent
# the messages it knows, which it runs on the attempt the record holds when it starts.


def takes_attempt(worker: dict[str, Any]) -> bool:
    return str(worker.get(TAKES_ATTEMPT) or "") == "1"


def run_job_args(job_id: str, worker: dict[str, Any], attempt: int) -> list[Any]:
    """The arguments of RUN_JOB_TASK that runs attempt `attempt` of `job_id` on `worker`."""
    args: list[Any] = [job_id, worker["name"]]
    return [*args, attempt] if takes_attempt(worker) else args


def run_pack_args(label: str, attempts: dict[str, int], worker: dict[str, Any]) -> list[Any]:
    """The arguments of RUN_PACK_TASK that trains the jobs of `attempts` (job id: the attempt
    each was assigned, in pack order) together on `worker`."""
    args: list[Any] = [label, list(attempts), worker["name"]]
    return [*args, dict(attempts)] if takes_attempt(worker) else args
