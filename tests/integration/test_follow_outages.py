"""Following a job (`lorafleet logs -f`, `submit --wait`: Client.follow) through the outages
of a running fleet (review15 M1): its Redis server stopped and started again, then its
dashboard killed and started again, while a real worker trains the job. The follower waits
each out (FOLLOW_PATIENCE_S) and receives every event once, in order, to the job's end."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from dispatcher.cli.client import FOLLOW_PATIENCE_S, Client
from tests.faultkit import SLOW, TERMINAL, OwnRedis, last_step, make_fleet, submit

pytestmark = pytest.mark.integration


def test_follow_waits_out_a_redis_restart_and_a_dashboard_restart(tmp_path):
    assert FOLLOW_PATIENCE_S >= 30  # the outages below are well inside it
    redis = OwnRedis(tmp_path)
    f = None
    try:
        f = make_fleet(redis.url, tmp_path / "home", workers=("a",), dashboard=True)
        job = submit(f, lora_name="followed", epochs=160, **SLOW)
        got: list[dict] = []
        failed: list[BaseException] = []

        def follow() -> None:
            try:
                for event in Client(f.url, token=f.token).follow(job):
                    got.append(event)
            except BaseException as e:  # noqa: BLE001 - handed to the test
                failed.append(e)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        f.wait_for(lambda: len([e for e in got if e.get("type") == "train"]) >= 3, 60,
                   "the follower to see the job train")

        assert f.store.get(job)["state"] == "running"
        redis.stop()  # Redis away (shorter than the worker timeout: the job goes on)
        time.sleep(3)
        assert follower.is_alive() and not failed, failed
        redis.start()
        seen = len(got)
        f.wait_for(lambda: len(got) > seen + 3, 60, "events after Redis came back")

        assert f.store.get(job)["state"] == "running"  # (the outage is under the follower)
        f.kill("dashboard", signal.SIGKILL)
        time.sleep(2)
        assert follower.is_alive() and not failed, failed
        f.start_dashboard()
        seen = len(got)
        f.wait_for(lambda: len(got) > seen + 3, 60, "events after the dashboard came back")

        rec = f.wait_for_state(job, TERMINAL, 240)
        assert rec["state"] == "succeeded", rec.get("reason")
        follower.join(60)
        assert not follower.is_alive() and not failed, failed
        steps = [e["step"] for e in got if e.get("type") == "train"]
        assert steps == list(range(1, rec["total_steps"] + 1))  # each once, in order
        assert [e["state"] for e in got if e.get("type") == "state"][-1] == "succeeded"
        assert last_step(f, job) == rec["total_steps"]
    finally:
        if f is not None:
            f.stop()
        redis.stop()
