"""Start real lorafleet processes for integration and browser tests.

Each test module gets its own key prefix and data folder on the session's real Redis server, and
real `python -m dispatcher`, `python -m gpuworker.worker` and (when asked) `python -m dashboard`
processes, exactly as `lorafleet up` starts them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from dispatcher.host.embedded import free_port
from dispatcher.jobs.store import JobStore
from dispatcher.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class FleetProcs:
    def __init__(self, home: Path, redis_url: str, prefix: str):
        self.home = home
        self.redis_url = redis_url
        self.prefix = prefix
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        self.env.update({
            "LORAFLEET_HOME": str(home), "LORAFLEET_REDIS_URL": redis_url,
            "LORAFLEET_PREFIX": prefix, "LORAFLEET_PORT": str(self.port),
            "LORAFLEET_HEARTBEAT": "0.5", "LORAFLEET_WORKER_TIMEOUT": "6",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            # The dashboard records itself for the CLI here, not in the real ~/.config.
            "XDG_CONFIG_HOME": str(home / ".config"),
        })
        self.settings = Settings.from_env(self.env)
        self.settings.paths.ensure()
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.store = JobStore(self.r, prefix)
        # What tests use to talk to this fleet's dashboard over HTTP, as the CLI would: with
        # the data folder's dashboard token while it has no accounts (made now, as `lorafleet
        # up` makes it before it starts anything).
        import requests

        from dispatcher.access.dashtoken import dashboard_token

        dashboard_token(home)
        self.http = requests.Session()
        self.http.auth = _OwnerAuth(home)

    @property
    def token(self) -> str:
        """The data folder's dashboard token (single-user mode)."""
        from dispatcher.access.dashtoken import read_token

        return read_token(self.home)

    def printed_url(self, path: str = "/") -> str:
        """What `lorafleet up` prints (with `path`): opening it logs a browser in."""
        return f"{self.url}{path}{'&' if '?' in path else '?'}token={self.token}"

    def open_printed_url(self, page: Any, path: str = "/") -> None:
        """Log a Playwright page in as a user does: open the printed URL, which drops the
        token from the address bar."""
        page.goto(self.printed_url(path))
        page.wait_for_url(lambda u: "token=" not in u)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, *args], env=self.env, cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def start_dispatcher(self, name: str = "dispatcher") -> None:
        self.start(name, ["-m", "dispatcher"])

    def start_worker(self, name: str = "w1", *extra: str) -> None:
        """A worker process; `extra` are more arguments, e.g. "--memory-mb", "300"."""
        self.start(f"worker-{name}", ["-m", "gpuworker.worker", "--name", name, *extra])

    def start_dashboard(self) -> None:
        import requests

        self.start("dashboard", ["-m", "dashboard"])
        self.wait_for(lambda: _ok(requests, self.url + "/healthz"), 30, "dashboard")

    def start_fleet(self, worker: str = "w1") -> None:
        """The dispatcher, one worker named `worker` and the dashboard, up and heard from."""
        self.start_dispatcher()
        self.start_worker(worker)
        self.start_dashboard()
        self.wait_for_workers(1)

    def wait_for_workers(self, n: int = 1, timeout: float = 60) -> None:
        from dispatcher.jobs.fleet import Fleet

        fleet = Fleet(self.r, self.prefix, timeout=6)
        self.wait_for(lambda: len(fleet.alive()) >= n, timeout, f"{n} worker(s)")

    def wait_for(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited with {p.returncode} while waiting for "
                                         f"{what}:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                             + "\n".join(f"--- {n}\n{self.log(n)[-2000:]}" for n in self.procs))

    def wait_for_state(self, job_id: str, states: tuple[str, ...], timeout: float = 180) -> dict:
        def done():
            rec = self.store.get(job_id)
            return rec if rec["state"] in states else None

        return self.wait_for(done, timeout, f"job {job_id} to reach {states}")

    def children(self, name: str) -> list[int]:
        """Process ids of the direct children of process `name` (a worker's Celery pool)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.procs[name].pid)],
                             capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def log(self, name: str) -> str:
        p = self.home / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        self.r.close()


class _OwnerAuth:
    """requests auth: the dashboard token, unless the request names its own Authorization or
    the data folder has accounts (then tests log in or pass an API token)."""

    def __init__(self, home: Path):
        self.home = home

    def __call__(self, r: Any) -> Any:
        from dispatcher.access.accounts import Accounts
        from dispatcher.access.dashtoken import read_token

        if "Authorization" not in r.headers and not Accounts(self.home).has_users():
            r.headers["Authorization"] = f"Bearer {read_token(self.home)}"
        return r


def _ok(requests, url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def small_spec(**over: Any) -> dict[str, Any]:
    """A spec that trains the tiny model for a few optimizer steps in seconds on CPU."""
    spec = {
        "lora_name": "tiny-lora", "base_model": "tiny", "dataset": "tiny", "format": "alpaca-format",
        "lora_rank": 4, "lora_alpha": 8, "micro_batch_size": 2, "batch_size": 4, "epochs": 1,
        "learning_rate": "1e-3", "cutoff_len": 64, "overlap_len": 32, "warmup_steps": 0, "lr_scheduler_type": "linear",
    }
    spec.update(over)
    return spec


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def tiny_fleet(redis_url: str, home: Path, tag: str, rows: int = 24) -> FleetProcs:
    """A fleet (nothing started yet) whose data folder holds the tiny model as models/tiny and
    a `rows`-row dataset as datasets/tiny.json; `tag` starts its Redis key prefix."""
    from tests.tiny import make_tiny_model, write_tiny_dataset

    f = FleetProcs(home, redis_url, prefix=f"{tag}{time.monotonic_ns()}")
    make_tiny_model(f.settings.paths.models / "tiny")
    write_tiny_dataset(f.settings.paths.datasets / "tiny.json", n=rows)
    return f
