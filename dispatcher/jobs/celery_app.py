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

from celery import Celery

from dispatcher.settings import Settings

RUN_JOB_TASK = "lorafleet.run_job"
# A sweep's pack: its trials trained together over one base model (args: label, job ids, worker).
RUN_PACK_TASK = "lorafleet.run_pack"
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
