"""The chaos run: a fleet as users start it, three users' jobs, and something killed every few
seconds; then the queue drains and every invariant is counted.

    python -m tests.chaos.run --minutes 30 --jobs 200 --seed 1 --report chaos.json

The fleet: the embedded Redis server (started as `lorafleet up` starts it: password, append-only
file), two dispatchers, the dashboard and three CPU workers, each its own process from the data
folder, with accounts for three users. The users submit through the dashboard's API, as the CLI
does: training jobs with checkpoints, evaluation and generation jobs, and a sweep with early
stopping whose trials train in packs. A seeded driver kills, every 5-15 s, one of: a worker's
training child (-9; its worker starts another), a worker's main process (-9, alone: its child
is orphaned as after a crash; the worker is started again under its name), a dispatcher (-9),
the dashboard (-9), Redis (-9, then started again from its append-only file); each is started
again 1-3 s later. Then the queue drains and `check` counts:

  accepted        every job the API accepted exists and ended exactly once in a final state
  overlap         no job was trained by two processes at once: each event carries its attempt,
                  and one attempt's training events never interleave in time with another's
  curve           every succeeded training job's recorded curve (training_log.json) is steps
                  1..N, no gap, no repeat, and its final loss equals an uninterrupted run's
                  with the same settings (computed here, in-process, afterwards)
  folders         every succeeded job's LoRA folder is complete and loads with peft; no LoRA
                  or checkpoint folder anywhere is half-written, no temporary file is left
  order           each attempt's training events are in step order
  sse             followers connected through the dashboard (reconnecting with Last-Event-ID
                  across its restarts) received every event of their job's stream, in order
  fair_share      the user with 2 jobs had them started before the 100-job user's backlog
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")
USERS = ("ana", "bo", "cy")  # ana queues most jobs, bo the sweep and some, cy two jobs late


@dataclass
class Plan:
    """What a run does (a seed makes it repeatable)."""

    seed: int = 0
    jobs: int = 40            # training jobs in all (plus evaluations, generations, a sweep)
    minutes: float = 2.0      # how long things are killed; then the queue drains
    epochs: int = 2           # per training job: 24 rows, micro batch 2, batch 4 -> 6 per epoch
    kill_every: tuple[float, float] = (5.0, 15.0)
    drain_s: float = 900.0
    followers: int = 4        # SSE clients, each on one training job


@dataclass
class Report:
    plan: dict[str, Any]
    kills: Counter = field(default_factory=Counter)
    counts: dict[str, int] = field(default_factory=dict)
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "kills": dict(self.kills), "counts": self.counts,
                "violations": {k: v for k, v in self.violations.items()},
                "violation_counts": {k: len(v) for k, v in self.violations.items()},
                "seconds": self.seconds}


# --------------------------------------------------------------------------------- the fleet


class ChaosFleet:
    """The fleet's processes, each startable and killable by name."""

    WORKERS = ("w1", "w2", "w3")
    DISPATCHERS = ("d1", "d2")

    def __init__(self, home: Path):
        from dispatcher.access.accounts import Accounts
        from dispatcher.host.embedded import free_port, start_server
        from tests.tiny import make_tiny_model, write_tiny_dataset, write_tiny_raw_text

        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.redis_dir = home / "redis"
        self.redis_port = free_port()
        self.redis_password = secrets.token_urlsafe(16)
        self.redis = start_server(self.redis_dir, self.redis_port, password=self.redis_password,
                                  log_file=home / "redis.log")
        self.redis_url = f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"
        self.port = free_port()
        self.prefix = f"chaos{time.monotonic_ns()}"
        self.env = dict(os.environ)
        self.env.update({
            "LORAFLEET_HOME": str(home), "LORAFLEET_REDIS_URL": self.redis_url,
            "LORAFLEET_PREFIX": self.prefix, "LORAFLEET_PORT": str(self.port),
            "LORAFLEET_HEARTBEAT": "0.5", "LORAFLEET_WORKER_TIMEOUT": "6",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "XDG_CONFIG_HOME": str(home / ".config"),
        })
        from dispatcher.settings import Settings

        self.settings = Settings.from_env(self.env)
        self.settings.paths.ensure()
        paths = self.settings.paths
        make_tiny_model(paths.models / "tiny")
        write_tiny_dataset(paths.datasets / "tiny.json")
        write_tiny_raw_text(paths.datasets / "story.txt")
        accounts = Accounts(home)
        accounts.add("admin", secrets.token_urlsafe(12), role="admin")  # someone manages them
        self.tokens: dict[str, str] = {}
        for user in USERS:
            accounts.add(user, secrets.token_urlsafe(12), role="member")
            self.tokens[user] = accounts.new_token(user, label="chaos")
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self, name: str) -> list[str]:
        if name.startswith("worker-"):
            return ["-m", "gpuworker.worker", "--name", name.removeprefix("worker-")]
        if name.startswith("dispatcher-"):
            return ["-m", "dispatcher"]
        return ["-m", "dashboard"]

    def names(self) -> list[str]:
        return ([f"dispatcher-{d}" for d in self.DISPATCHERS]
                + [f"worker-{w}" for w in self.WORKERS] + ["dashboard"])

    def start(self, name: str) -> None:
        log = open(self.home / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, *self.argv(name)], env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_all(self) -> None:
        for name in self.names():
            self.start(name)
        wait_until(lambda: _ok(self.url + "/healthz"), 60, "the dashboard")

    def restart_redis(self) -> None:
        from dispatcher.host.embedded import start_server

        self.redis = start_server(self.redis_dir, self.redis_port, password=self.redis_password,
                                  log_file=self.home / "redis.log")

    def children(self, name: str) -> list[int]:
        p = self.procs.get(name)
        if p is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True,
                             text=True)
        return [int(x) for x in out.stdout.split()]

    def stop(self) -> None:
        from dispatcher.host.embedded import stop_server

        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        # Orphans of killed worker processes (their own session) are gone by now or killed here.
        for pid in _descendants_of_home(self.home):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_server(self.redis)


def _descendants_of_home(home: Path) -> list[int]:
    """Processes whose environment names this data folder (orphaned training children)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"LORAFLEET_HOME={home}".encode() in env:
            found.append(int(proc.name))
    return found


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except Exception:  # noqa: BLE001 - Redis or the dashboard may be down for a moment
            v = None
        if v:
            return v
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


# --------------------------------------------------------------------------------- the killer


class Killer(threading.Thread):
    """Every kill_every seconds (random in the range), kill one part of the fleet with -9 and
    start it again 1-3 s later."""

    KINDS = ("worker_child", "worker_main", "dispatcher", "dashboard", "redis")

    def __init__(self, fleet: ChaosFleet, rng: random.Random, plan: Plan, report: Report):
        super().__init__(daemon=True, name="killer")
        self.fleet, self.rng, self.plan, self.report = fleet, rng, plan, report
        self.stop_at = time.monotonic() + plan.minutes * 60
        self.log: list[str] = []

    def run(self) -> None:
        while True:
            wait = self.rng.uniform(*self.plan.kill_every)
            if time.monotonic() + wait > self.stop_at:
                return
            time.sleep(wait)
            kind = self.rng.choice(self.KINDS)
            try:
                what = getattr(self, kind)()
            except Exception as e:  # noqa: BLE001 - a kill that could not happen is logged
                what = f"failed: {e}"
            self.log.append(f"{time.time():.1f} {kind}: {what}")
            if what and not what.startswith(("failed", "nothing")):
                self.report.kills[kind] += 1

    def _later(self) -> float:
        return self.rng.uniform(1.0, 3.0)

    def _worker(self) -> str:
        """A worker, one that is training if any is (a kill should interrupt something)."""
        names = [f"worker-{w}" for w in ChaosFleet.WORKERS]
        busy = [n for n in names if self.fleet.children(n) and self._training(n)]
        return self.rng.choice(busy or names)

    def _training(self, name: str) -> bool:
        import redis

        r = redis.Redis.from_url(self.fleet.redis_url, decode_responses=True,
                                 socket_timeout=2)
        try:
            return bool(r.hget(f"{self.fleet.prefix}:worker:{name.removeprefix('worker-')}",
                               "job"))
        except redis.RedisError:
            return False
        finally:
            r.close()

    def worker_child(self) -> str:
        name = self._worker()
        kids = self.fleet.children(name)
        if not kids:
            return f"nothing: {name} has no child"
        os.kill(kids[0], signal.SIGKILL)
        return f"{name} child {kids[0]}"

    def worker_main(self) -> str:
        return self._kill_and_restart(self._worker(), group=False)

    def dispatcher(self) -> str:
        return self._kill_and_restart(f"dispatcher-{self.rng.choice(ChaosFleet.DISPATCHERS)}")

    def dashboard(self) -> str:
        return self._kill_and_restart("dashboard")

    def redis(self) -> str:
        self.fleet.redis.kill()
        self.fleet.redis.wait()
        time.sleep(self._later())
        self.fleet.restart_redis()
        return f"redis pid {self.fleet.redis.pid} (restarted from its append-only file)"

    def _kill_and_restart(self, name: str, group: bool = True) -> str:
        p = self.fleet.procs[name]
        # The main process alone (its training child lives on, orphaned) or its whole group.
        if group:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        time.sleep(self._later())
        self.fleet.start(name)
        return f"{name} pid {p.pid}"


# ------------------------------------------------------------------------------- the workload


def train_spec(name: str, plan: Plan) -> dict[str, Any]:
    return {"lora_name": name, "base_model": "tiny", "dataset": "tiny", "format": "alpaca-format",
            "lora_rank": 4, "lora_alpha": 8, "micro_batch_size": 2, "batch_size": 4,
            "epochs": plan.epochs, "learning_rate": "1e-3", "cutoff_len": 64, "overlap_len": 32,
            "warmup_steps": 0, "lr_scheduler_type": "linear", "save_steps": 2,
            "lora_dropout": 0.05}


class Users:
    """The three users, each submitting through the API with their own token; a submission
    is retried until the dashboard answers it (an answer is the only proof of acceptance)."""

    def __init__(self, fleet: ChaosFleet):
        from dispatcher.cli.client import Client

        self.clients = {u: Client(fleet.url, token=t, timeout=10) for u, t in fleet.tokens.items()}
        self.accepted: dict[str, dict[str, Any]] = {}  # job id -> {user, kind, at}
        self.sweeps: list[str] = []
        self.unanswered = 0
        self.cy_submitted_at = 0.0  # when cy queued two jobs behind ana's backlog
        self.cy_jobs: list[str] = []

    def _retry(self, call: Any) -> Any:
        from dispatcher.cli.client import ApiError

        deadline = time.monotonic() + 300
        while True:
            try:
                return call()
            except ApiError as e:
                if e.status and e.status < 500 and e.status != 429:
                    raise
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the dashboard did not answer for 300 s")
            self.unanswered += 1
            time.sleep(0.5)

    def submit(self, user: str, spec: dict[str, Any], kind: str = "train") -> str:
        job = self._retry(lambda: self.clients[user].submit(spec, kind=kind))
        self.accepted[job] = {"user": user, "kind": kind, "at": time.time()}
        return job

    def sweep(self, user: str, definition: dict[str, Any]) -> str:
        res = self._retry(lambda: self.clients[user].create_sweep(definition))
        self.sweeps.append(res["id"])
        for t in res.get("trials", []):
            if t.get("job"):
                self.accepted[t["job"]] = {"user": user, "kind": "train", "at": time.time(),
                                           "sweep": res["id"]}
        return res["id"]


class Follower(threading.Thread):
    """An SSE client of one job through the dashboard, as the Job page is: it reconnects with
    Last-Event-ID whenever the stream breaks, and records every event id it received."""

    def __init__(self, url: str, token: str, job: str):
        super().__init__(daemon=True, name=f"sse-{job}")
        self.url, self.token, self.job = url, token, job
        self.ids: list[str] = []
        self.done = False

    def run(self) -> None:
        from dispatcher.cli.client import _parse_sse

        last = None
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {self.token}"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                with requests.get(f"{self.url}/api/v1/jobs/{self.job}/events", headers=headers,
                                  stream=True, timeout=(5, 30)) as resp:
                    if resp.status_code != 200:
                        time.sleep(0.5)
                        continue
                    for eid, name, _ in _parse_sse(resp.iter_lines(decode_unicode=True)):
                        if name == "end":
                            self.done = True
                            return
                        if eid:
                            self.ids.append(eid)
                            last = eid
            except requests.RequestException:
                pass
            time.sleep(0.5)


# --------------------------------------------------------------------------------- the run


def run(plan: Plan, home: Path, log: Any = print) -> Report:
    rng = random.Random(plan.seed)
    report = Report(plan=plan.__dict__ | {"kill_every": list(plan.kill_every)})
    fleet = ChaosFleet(home)
    t0 = time.monotonic()
    try:
        fleet.start_all()
        users = Users(fleet)
        killer = Killer(fleet, rng, plan, report)
        followers: list[Follower] = []
        killer.start()
        _workload(fleet, users, plan, rng, followers, log)
        killer.join()
        report.seconds["chaos"] = round(time.monotonic() - t0, 1)
        log(f"chaos over after {report.seconds['chaos']} s: kills {dict(report.kills)}; "
            "draining the queue")
        _drain(fleet, users, plan)
        report.seconds["drain"] = round(time.monotonic() - t0 - report.seconds["chaos"], 1)
        for f in followers:
            f.join(60)
        check(fleet, users, followers, report, plan)
        report.counts["submissions_retried"] = users.unanswered
        (home / "kills.log").write_text("\n".join(killer.log))
    finally:
        fleet.stop()
    report.seconds["total"] = round(time.monotonic() - t0, 1)
    return report


def _workload(fleet: ChaosFleet, users: Users, plan: Plan, rng: random.Random,
              followers: list[Follower], log: Any) -> None:
    """Jobs arrive over the first two thirds of the kill phase, so that kills find training
    under way: half of ana's training jobs at once (a backlog), then cy's two jobs behind it,
    bo's sweep, and in waves the rest of ana's, bo's jobs, evaluations and generations."""
    n_ana = max(4, int(plan.jobs * 0.7))
    n_bo = max(1, plan.jobs - n_ana - 2)
    first = n_ana // 2
    for i in range(first):
        job = users.submit("ana", train_spec(f"ana-{i}", plan))
        if len(followers) < plan.followers and i % 3 == 0:
            f = Follower(fleet.url, fleet.tokens["ana"], job)
            f.start()
            followers.append(f)
    users.cy_submitted_at = time.time()
    users.cy_jobs = [users.submit("cy", train_spec(f"cy-{i}", plan)) for i in range(2)]
    users.sweep("bo", {
        "name": "chaos-sweep", "base": train_spec("bo-sweep", plan),
        "parameters": {"lora_rank": [2, 4, 8], "optimizer": ["adamw_torch", "sgd"]},
        "early_stopping": {"policy": "asha", "rungs": [4], "reduction_factor": 2},
        "pack": "auto", "pack_size": 3})
    rest = [("ana", i) for i in range(first, n_ana)] + [("bo", i) for i in range(n_bo)]
    rng.shuffle(rest)
    pause = plan.minutes * 60 * 2 / 3 / max(1, len(rest))
    for n, (user, i) in enumerate(rest):
        time.sleep(rng.uniform(0.5, 1.5) * pause)
        job = users.submit(user, train_spec(f"{user}-{i}", plan))
        if user == "ana" and len(followers) < plan.followers:
            f = Follower(fleet.url, fleet.tokens["ana"], job)
            f.start()
            followers.append(f)
        if n % 4 == 0:
            users.submit("bo", {"base_model": "tiny", "text_file": "story", "stride": 32,
                                "max_length": 64}, kind="evaluate")
        if n % 4 == 2:
            users.submit("cy", {"base_model": "tiny", "prompt": f"Hello {n}",
                                "max_new_tokens": 8, "seed": n}, kind="generate")
    log(f"{len(users.accepted)} jobs accepted ({users.unanswered} submissions retried)")


def _drain(fleet: ChaosFleet, users: Users, plan: Plan) -> None:
    from dispatcher.jobs.store import JobStore

    def all_done() -> bool:
        import redis

        r = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
        try:
            store = JobStore(r, fleet.prefix)
            return all(j["state"] in TERMINAL for j in store.list(limit=100000))
        finally:
            r.close()

    # Every part of the fleet is up again for the drain (a restart may still be pending).
    wait_until(lambda: _ok(fleet.url + "/healthz"), 60, "the dashboard after the chaos")
    wait_until(all_done, plan.drain_s, "every job to end")


# --------------------------------------------------------------------------------- invariants


def check(fleet: ChaosFleet, users: Users, followers: list[Follower], report: Report,
          plan: Plan) -> None:
    import redis

    from dispatcher.jobs.store import JobNotFound, JobStore

    r = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    store = JobStore(r, fleet.prefix)
    v = report.violations
    jobs = store.list(limit=100000)
    by_id = {j["id"]: j for j in jobs}
    report.counts.update(jobs=len(jobs), accepted=len(users.accepted),
                         states=dict(Counter(j["state"] for j in jobs)))
    # accepted: every accepted job exists and ended exactly once.
    for job_id in users.accepted:
        try:
            store.get(job_id)
        except JobNotFound:
            v["accepted"].append(f"{job_id}: accepted, then gone")
    for j in jobs:
        ends = [h for h in store.history(j["id"]) if h["state"] in TERMINAL]
        if j["state"] not in TERMINAL or len(ends) != 1:
            v["accepted"].append(f"{j['id']}: {j['state']}, {len(ends)} final states")
    resumed = 0
    for j in jobs:
        events = [e for _, e in store.events.history(j["id"])]
        _check_attempts(j, events, v)
        if j.get("kind") == "train" and j["state"] == "succeeded":
            resumed += bool((j.get("result") or {}).get("resumed_from"))
            _check_curve(j, fleet, v)
    report.counts["resumed_jobs"] = resumed
    report.counts["attempts_over_1"] = sum(1 for j in jobs if int(j.get("attempt") or 0) > 1)
    _check_final_losses(jobs, fleet, plan, v, report)
    _check_folders(jobs, fleet, v, report)
    # sse: each follower got its job's whole stream, in order, once.
    for f in followers:
        stream = [eid for eid, _ in store.events.history(f.job)]
        if f.ids != stream:
            first = next((i for i, (a, b) in enumerate(zip(f.ids, stream, strict=False))
                          if a != b), min(len(f.ids), len(stream)))
            v["sse"].append(f"{f.job}: received {len(f.ids)} events, the stream has "
                            f"{len(stream)} (first difference at {first})")
    report.counts["sse_followers"] = len(followers)
    report.counts["sse_events"] = sum(len(f.ids) for f in followers)
    _check_fair_share(users, by_id, store, v)
    r.close()


def _check_attempts(job: dict[str, Any], events: list[dict[str, Any]],
                    v: dict[str, list[str]]) -> None:
    spans: dict[int, list[float]] = {}
    steps: dict[int, list[int]] = defaultdict(list)
    for e in events:
        if e.get("type") != "train" or "attempt" not in e:
            continue
        a = int(e["attempt"])
        t = float(e["time"])
        lo, hi = spans.get(a, [t, t])
        spans[a] = [min(lo, t), max(hi, t)]
        steps[a].append(int(e["step"]))
    for a, s in steps.items():
        if any(y <= x for x, y in zip(s, s[1:], strict=False)):
            v["order"].append(f"{job['id']} attempt {a}: steps {s}")
    ordered = sorted(spans.items())
    for (a, (_, end)), (b, (start, _)) in zip(ordered, ordered[1:], strict=False):
        if start < end:
            v["overlap"].append(f"{job['id']}: attempt {b} trained from {start:.2f} while "
                                f"attempt {a} trained until {end:.2f}")


def _check_curve(job: dict[str, Any], fleet: ChaosFleet, v: dict[str, list[str]]) -> None:
    folder = fleet.settings.paths.loras / job["spec"]["lora_name"]
    try:
        log = json.loads((folder / "training_log.json").read_text())
    except (OSError, ValueError) as e:
        v["curve"].append(f"{job['id']}: no readable training_log.json ({e})")
        return
    steps = [h["step"] for h in log.get("loss_history", [])]
    total = (job.get("result") or {}).get("total_steps")
    if steps != list(range(1, len(steps) + 1)) or (total and steps and steps[-1] != total):
        v["curve"].append(f"{job['id']}: recorded steps {steps[:5]}...{steps[-5:]} of {total}")


def _check_final_losses(jobs: list[dict[str, Any]], fleet: ChaosFleet, plan: Plan,
                        v: dict[str, list[str]], report: Report) -> None:
    """Every succeeded training job (not a sweep trial: those differ by their parameters)
    against one uninterrupted run of the same settings, trained here alone."""
    from dispatcher.jobs.specs import parse_train_spec
    from gpuworker.engine.boundary import train

    done = [j for j in jobs if j.get("kind") == "train" and j["state"] == "succeeded"
            and not j.get("sweep")]
    if not done:
        return
    spec = parse_train_spec(train_spec("chaos-reference", plan), fleet.settings.paths)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = train(spec, fleet.settings.paths, lambda ev: None, lambda: False, lambda s: None,
                   device="cpu")
    want = result["final_loss"]
    report.counts["final_loss_reference"] = want
    for j in done:
        got = (j.get("result") or {}).get("final_loss")
        if got is None or abs(got - want) > 1e-5 * max(1.0, abs(want)):
            v["curve"].append(f"{j['id']}: final loss {got} against an uninterrupted {want}"
                              + (" (resumed)" if (j.get("result") or {}).get("resumed_from")
                                 else ""))
    report.counts["final_losses_compared"] = len(done)


def _check_folders(jobs: list[dict[str, Any]], fleet: ChaosFleet, v: dict[str, list[str]],
                   report: Report) -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    loras = fleet.settings.paths.loras
    base = AutoModelForCausalLM.from_pretrained(fleet.settings.paths.models / "tiny")
    loaded = 0
    for j in jobs:
        if j.get("kind") != "train" or j["state"] != "succeeded":
            continue
        folder = loras / j["spec"]["lora_name"]
        try:
            PeftModel.from_pretrained(base, folder).unload()
            loaded += 1
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            v["folders"].append(f"{j['id']}: loras/{folder.name} does not load: {e}")
    report.counts["loras_loaded"] = loaded
    # Nothing anywhere half-written: every adapter file parses with its config beside it.
    for weights in loras.rglob("adapter_model.safetensors"):
        try:
            with safe_open(str(weights), "pt") as f:
                list(f.keys())
            json.loads((weights.parent / "adapter_config.json").read_text())
        except Exception as e:  # noqa: BLE001
            v["folders"].append(f"{weights.relative_to(loras)}: half-written ({e})")
    leftovers = [str(p.relative_to(loras)) for p in loras.rglob("*.tmp")]
    if leftovers:
        v["folders"].append(f"temporary files left: {leftovers[:10]}")


def _check_fair_share(users: Users, by_id: dict[str, dict[str, Any]], store: Any,
                      v: dict[str, list[str]]) -> None:
    """cy's two jobs, queued behind ana's backlog, started before ana's queued jobs did: at
    most one of ana's jobs per worker started between cy's submission and each cy job's
    start (those already being handed out)."""
    def first_run(job_id: str) -> float | None:
        for h in store.history(job_id):
            if h["state"] == "running":
                return float(h["time"])
        return None

    ana = [j for j, a in users.accepted.items() if a["user"] == "ana" and not a.get("sweep")]
    ana_starts = [t for t in (first_run(j) for j in ana) if t is not None]
    for job in users.cy_jobs:
        started = first_run(job)
        if started is None:
            continue
        ahead = sum(1 for t in ana_starts if users.cy_submitted_at < t < started)
        if ahead > len(ChaosFleet.WORKERS):
            v["fair_share"].append(f"{job}: {ahead} of ana's jobs started after cy's submission "
                                   "and before it")
