"""The chaos run: a fleet as users start it, three users' jobs, and something killed every few
seconds; then the queue drains and every invariant is counted.

    python -m tests.chaos.run --minutes 30 --jobs 200 --seed 1 --report chaos.json

The fleet: the embedded Redis server (started as `lorafleet up` starts it: password, append-only
file), two dispatchers, the dashboard and three CPU workers, each its own process from the data
folder, with accounts for three users. The users submit through the dashboard's API, as the CLI
does: training jobs with checkpoints, evaluation and generation jobs, and a sweep with early
stopping whose trials train in packs. A driver kills, on a schedule drawn from the seed
(`kill_schedule`: one kill every 5-15 s, the first five one of each kind; a worker kill aimed
at a job past its first checkpoint, a dashboard or Redis kill at a connected follower, each
waiting 15 s at most), one of: a worker's
training child (-9; its worker starts another), a worker's main process (-9, alone: its child
is orphaned as after a crash; the worker is started again under its name), a dispatcher (-9),
the dashboard (-9), Redis (-9, then started again from its append-only file); each is started
again 1-3 s later. Then the queue drains and `check` counts:

  accepted        every job the API accepted exists and ended exactly once in a final state
                  (a job still not ended when the drain's time is up is one, and the report is
                  written all the same); every other job in the store is explained: a
                  duplicate (made while a submission of the same user, kind and name was
                  retried: the API has no idempotency key, so a retry after a lost answer makes
                  the job again; counted, `duplicate_jobs`) or made by an accepted sweep
  api             no 5xx answer from the dashboard's API to a user or a follower but its
                  honest refusal while Redis is away (503 with its JSON `{"error":
                  REDIS_DOWN}`, counted); a 500 under chaos is a bug. Also a submission the
                  dashboard did not answer for 300 s, or a dashboard that did not come back
                  after the kills
  overlap         no job was trained by two processes at once. The evidence is not what the
                  attempt fence lets through: all through the run `ProcessWatch` samples which
                  process holds which job (each training process names itself in its worker's
                  heartbeat when it starts a job) and, from /proc, whether it is alive, using
                  the CPU or holding a file open under loras/. Two live processes holding one
                  job, the older (or same) attempt's still working while the other holds it,
                  is a violation. Besides: every training event must carry its attempt, and
                  one attempt's training events may not interleave in time with another's
  curve           every succeeded training job has its total_steps, and its recorded curve
                  (training_log.json) is steps 1..total_steps, no gap, no repeat, and its
                  final loss equals an uninterrupted run's with the same settings (computed
                  here, in-process, afterwards); not for a LoRA a duplicate job also trained
  folders         every succeeded job's LoRA folder is complete (tests/lorafolders.py
                  LORA_FILES: adapter, its config, training_parameters.json,
                  training_prompt.json, training_log.json) and loads with peft exactly: the
                  loaded model's adapter weights are the saved tensors, key for key (peft only
                  warns about a key the file lacks, and ignores one the model lacks); every
                  adapter anywhere parses; in no LoRA folder a staging folder (the engine's
                  STAGING_PREFIXES, `.old-checkpoint-*`), a temporary file or an incomplete
                  checkpoint-<step>/ is left (tests/lorafolders.py)
  order           each attempt's training events are in step order
  sse             followers, each running the CLI's own `Client.follow` (what `lorafleet
                  submit --wait` and `logs -f` run) through the dashboard's and Redis's
                  restarts, neither gave up nor missed their job's end (follow returned, after
                  the job's final state), and received every event of the job's stream, in
                  order, once
  fair_share      the user with 2 jobs had both started, and before the 100-job user's backlog

A seed makes the kill schedule (times, kinds, restart delays, target picks) and the workload
repeatable: each has its own random generator, drawn before or apart from the run, so how the
run goes cannot shift them. What each kill finds (which worker is training) still depends on
timing.
"""

from __future__ import annotations

import json
import math
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
from urllib.parse import urlsplit

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
    schedule: list[str] = field(default_factory=list)  # the kill schedule drawn from the seed

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "kills": dict(self.kills), "counts": self.counts,
                "violations": {k: v for k, v in self.violations.items()},
                "violation_counts": {k: len(v) for k, v in self.violations.items()},
                "seconds": self.seconds, "schedule": self.schedule}


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


def _wait_for(pred: Any, timeout: float, every: float = 0.1) -> Any:
    """`pred()` once it is true, or its last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(every)


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


KINDS = ("worker_child", "worker_main", "dispatcher", "dashboard", "redis")


@dataclass(frozen=True)
class Kill:
    """One kill of the schedule."""

    at: float             # seconds after the kill phase starts
    kind: str             # one of KINDS
    restart_after: float  # seconds before what was killed is started again
    pick: float           # in [0, 1): which target, mapped onto the candidates at the time


# The kinds of kill that break the SSE followers' streams.
FOLLOWER_KINDS = ("dashboard", "redis")


def kill_schedule(plan: Plan) -> list[Kill]:
    """The kill phase's schedule, from the seed alone: a kill every kill_every seconds (random
    in the range) until `minutes` are over; the first len(KINDS) kills are one of each kind (so
    even the short run kills every part of the fleet): first the dashboard and Redis, while
    followers still follow the first jobs, then the other three, each group in a seeded order;
    the rest random. Times, kinds, restart delays and target picks each come from their own
    generator."""
    times = random.Random(f"{plan.seed}:kill times")
    kinds = random.Random(f"{plan.seed}:kill kinds")
    delays = random.Random(f"{plan.seed}:restart delays")
    picks = random.Random(f"{plan.seed}:targets")
    first, rest = list(FOLLOWER_KINDS), [k for k in KINDS if k not in FOLLOWER_KINDS]
    kinds.shuffle(first)
    kinds.shuffle(rest)
    first += rest
    out: list[Kill] = []
    at = 0.0
    while True:
        at += times.uniform(*plan.kill_every)
        if at > plan.minutes * 60:
            return out
        kind = first[len(out)] if len(out) < len(first) else kinds.choice(KINDS)
        out.append(Kill(round(at, 3), kind, round(delays.uniform(1.0, 3.0), 3),
                        picks.random()))


def pick_from(items: list[str], u: float) -> str:
    """The item `u` (in [0, 1)) falls on: one draw, whatever the list's length."""
    return items[min(int(u * len(items)), len(items) - 1)]


class Killer(threading.Thread):
    """Kill one part of the fleet with -9 at each time of the schedule and start it again
    after the kill's restart delay. A kill is aimed: one of a worker waits (AIM_S at most,
    and never past the kill phase's end) for a worker whose job has saved a checkpoint, one of
    the dashboard or Redis for an SSE follower to be connected, so that it interrupts what it
    is meant to."""

    KINDS = KINDS
    AIM_S = 15.0

    def __init__(self, fleet: ChaosFleet, schedule: list[Kill], report: Report,
                 following: Any = lambda: False, phase_s: float = 120.0):
        super().__init__(daemon=True, name="killer")
        self.fleet, self.schedule, self.report = fleet, schedule, report
        self.following = following  # () -> whether some follower is connected
        self.phase_s = phase_s
        self.end = time.monotonic() + phase_s
        self.log: list[str] = []

    def _aim_s(self) -> float:
        return max(0.0, min(self.AIM_S, self.end - time.monotonic()))

    def run(self) -> None:
        t0 = time.monotonic()
        self.end = t0 + self.phase_s
        for kill in self.schedule:
            time.sleep(max(0.0, t0 + kill.at - time.monotonic()))
            if kill.kind in FOLLOWER_KINDS:
                _wait_for(self.following, self._aim_s())
            try:
                what = getattr(self, kill.kind)(kill)
            except Exception as e:  # noqa: BLE001 - a kill that could not happen is logged
                what = f"failed: {e}"
            self.log.append(f"{time.time():.1f} {kill.kind}: {what}")
            if what and not what.startswith(("failed", "nothing")):
                self.report.kills[kill.kind] += 1

    def _worker(self, kill: Kill) -> tuple[str, bool]:
        """A worker whose job has saved a checkpoint if one has within AIM_S (a kill should
        interrupt a job that can resume), else one with a training process; and whether it
        was training."""
        names = [f"worker-{w}" for w in ChaosFleet.WORKERS]
        training = _wait_for(lambda: [n for n in names if self._training(n)],
                             self._aim_s()) or []
        kids = {n: self.fleet.children(n) for n in names}
        busy = [n for n in training if kids[n]]
        name = pick_from(busy or [n for n in names if kids[n]] or names, kill.pick)
        if busy:
            self.report.counts["worker_kills_while_training"] = (
                self.report.counts.get("worker_kills_while_training", 0) + 1)
        return name, bool(busy)

    def _training(self, name: str) -> bool:
        """Whether a job of the worker (its `job`, or a pack's `jobs`) has a checkpoint in its
        LoRA folder to resume from. (Its step alone said too little: a pack's trials report
        steps before any of them has saved one, and a short run whose kills all hit such a
        pack had nothing to resume.)"""
        import redis

        r = redis.Redis.from_url(self.fleet.redis_url, decode_responses=True,
                                 socket_timeout=2)
        try:
            beat = r.hmget(f"{self.fleet.prefix}:worker:{name.removeprefix('worker-')}",
                           "job", "jobs")
            jobs = {j for field in beat for j in str(field or "").split(",") if j}
            for job in jobs:
                spec = json.loads(r.hget(f"{self.fleet.prefix}:job:{job}", "spec") or "{}")
                folder = self.fleet.settings.paths.loras / str(spec.get("lora_name") or "-")
                if folder.is_dir() and any(p.name.startswith("checkpoint-")
                                           for p in folder.iterdir()):
                    return True
            return False
        except (redis.RedisError, ValueError, OSError):
            return False
        finally:
            r.close()

    def worker_child(self, kill: Kill) -> str:
        name, busy = self._worker(kill)
        kids = self.fleet.children(name)
        if not kids:
            return f"nothing: {name} has no child"
        os.kill(kids[0], signal.SIGKILL)
        return f"{name} child {kids[0]}" + (" (training)" if busy else " (idle)")

    def worker_main(self, kill: Kill) -> str:
        name, busy = self._worker(kill)
        return self._kill_and_restart(name, kill, group=False) + (
            " (training)" if busy else " (idle)")

    def dispatcher(self, kill: Kill) -> str:
        name = pick_from([f"dispatcher-{d}" for d in ChaosFleet.DISPATCHERS], kill.pick)
        return self._kill_and_restart(name, kill)

    def dashboard(self, kill: Kill) -> str:
        return self._kill_and_restart("dashboard", kill)

    def redis(self, kill: Kill) -> str:
        self.fleet.redis.kill()
        self.fleet.redis.wait()
        time.sleep(kill.restart_after)
        self.fleet.restart_redis()
        return f"redis pid {self.fleet.redis.pid} (restarted from its append-only file)"

    def _kill_and_restart(self, name: str, kill: Kill, group: bool = True) -> str:
        p = self.fleet.procs[name]
        # The main process alone (its training child lives on, orphaned) or its whole group.
        if group:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        time.sleep(kill.restart_after)
        self.fleet.start(name)
        return f"{name} pid {p.pid}"


# ------------------------------------------------------------------------------ the watcher


@dataclass(frozen=True)
class ProcStat:
    start: int  # start time, clock ticks after boot: with the pid, names one process
    ppid: int
    cpu: int    # user + system time so far, clock ticks


def proc_stat(pid: int) -> ProcStat | None:
    """What /proc says of `pid`, or None when there is no such process (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
    f = raw[raw.rindex(")") + 2:].split()
    if f[0] in ("Z", "X"):
        return None
    return ProcStat(start=int(f[19]), ppid=int(f[1]), cpu=int(f[11]) + int(f[12]))


def open_under(pid: int, folder: Path) -> bool:
    """Whether `pid` has a file open under `folder` (a LoRA being written)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    prefix = str(folder) + os.sep
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Hold:
    """One process seen holding one job at one sample."""

    proc: tuple[int, int]  # (pid, start time): a reused pid is another process
    job: str
    attempt: int           # the job's attempt when the process claimed it
    cpu: int               # the process's CPU time so far, clock ticks
    writing: bool          # it had a file open under loras/


@dataclass
class Claim:
    worker: str
    parent: int            # the worker's main process when the claim was seen
    jobs: dict[str, int]   # job id -> attempt


class ProcessWatch(threading.Thread):
    """Which process holds which job, sampled every `every` seconds all through the run, from
    evidence the attempt fence does not filter: a training process names itself in its
    worker's heartbeat when it starts a job (`job_pid`, and a pack's trials in `jobs`), before
    it trains; /proc says whether that process still lives, how much CPU it has used and
    whether it has a file open under loras/. A hold ends when the process dies, or when it is
    still its worker's child and the heartbeat names it no more (it finished); an orphan (its
    worker's main process killed) holds its job for as long as it lives. `check_overlap` reads
    the samples."""

    def __init__(self, fleet: ChaosFleet, every: float = 0.25):
        super().__init__(daemon=True, name="process-watch")
        self.fleet, self.every = fleet, every
        self.samples: list[tuple[float, list[Hold]]] = []
        self.claims: dict[tuple[int, int], Claim] = {}
        self.orphans: set[tuple[int, int]] = set()  # claimed processes seen orphaned
        self.seen: set[tuple[int, int]] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        import redis

        r = redis.Redis.from_url(self.fleet.redis_url, decode_responses=True,
                                 socket_timeout=2, socket_connect_timeout=2)
        try:
            while not self._halt.is_set():
                self.sample(self._heartbeats(r), lambda jobs: self._attempts(r, jobs))
                self._halt.wait(self.every)
        finally:
            r.close()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(10)

    def _heartbeats(self, r: Any) -> dict[str, tuple[int, list[str]]] | None:
        """{worker: (pid of its job's process, the job ids it holds)}; None while Redis is
        down."""
        import redis

        pipe = r.pipeline(transaction=False)
        for w in ChaosFleet.WORKERS:
            pipe.hmget(f"{self.fleet.prefix}:worker:{w}", "job_pid", "job", "jobs", "pack")
        try:
            rows = pipe.execute()
        except redis.RedisError:
            return None
        out = {}
        for w, (pid, job, jobs, pack) in zip(ChaosFleet.WORKERS, rows, strict=True):
            ids = (jobs or "").split(",") if pack else [job or ""]
            out[w] = (int(pid) if (pid or "").isdigit() else 0, [j for j in ids if j])
        return out

    def _attempts(self, r: Any, jobs: list[str]) -> dict[str, int] | None:
        import redis

        try:
            raw = [r.hget(f"{self.fleet.prefix}:job:{j}", "attempt") for j in jobs]
        except redis.RedisError:
            return None
        return {j: int(float(a or 1)) for j, a in zip(jobs, raw, strict=True)}

    def sample(self, beats: dict[str, tuple[int, list[str]]] | None, attempts: Any,
               stat: Any = proc_stat, writing: Any = None) -> None:
        """One sample: update the claims from the heartbeats (None: Redis is down, keep them),
        then record every live claimed process's holds."""
        writing = writing or (lambda pid: open_under(pid, self.fleet.settings.paths.loras))
        t = time.time()
        if beats is not None:
            for w, (pid, jobs) in beats.items():
                st = stat(pid) if pid and jobs else None
                if st is None:
                    continue
                key = (pid, st.start)
                claim = self.claims.get(key)
                if claim is None or set(claim.jobs) != set(jobs):
                    known = attempts(jobs)
                    if known is not None:
                        self.claims[key] = Claim(w, st.ppid, known)
            for key, c in list(self.claims.items()):
                st = stat(key[0])
                named = beats.get(c.worker, (0, []))[0] == key[0]
                if st is not None and st.ppid == c.parent and not named:
                    del self.claims[key]  # finished: still its worker's child, named no more
        holds = []
        for key, c in list(self.claims.items()):
            st = stat(key[0])
            if st is None or st.start != key[1]:
                del self.claims[key]
                continue
            self.seen.add(key)
            if st.ppid != c.parent:
                self.orphans.add(key)
            busy = writing(key[0])
            holds += [Hold(key, job, a, st.cpu, busy) for job, a in c.jobs.items()]
        self.samples.append((t, holds))


# CPU time (clock ticks, usually 10 ms) a process must use between two samples to count as
# working: an orphan that stopped at the fence and waits to exit uses none.
WORKING_TICKS = 3


def check_overlap(samples: list[tuple[float, list[Hold]]], v: dict[str, list[str]],
                  working_ticks: int = WORKING_TICKS) -> None:
    """Two live processes held one job in two samples running, and between them the one of
    the older (or the same) attempt worked: used CPU or had a file open under loras/. Each
    pair of processes is reported once, with how many samples showed it."""
    found: dict[tuple[str, tuple[int, int], tuple[int, int]], list[Any]] = {}
    prev: dict[tuple[tuple[int, int], str], Hold] = {}
    for t, holds in samples:
        now = {(h.proc, h.job): h for h in holds}
        by_job: dict[str, list[Hold]] = defaultdict(list)
        for h in holds:
            if (h.proc, h.job) in prev:  # held at the previous sample too
                by_job[h.job].append(h)
        for job, hs in by_job.items():
            for p in hs:
                before = prev[(p.proc, job)]
                if p.cpu - before.cpu < working_ticks and not p.writing:
                    continue
                for q in hs:
                    if q.proc != p.proc and q.attempt >= p.attempt:
                        f = found.setdefault((job, p.proc, q.proc), [t, 0, p, q])
                        f[1] += 1
        prev = now
    for (job, _, _), (t, n, p, q) in found.items():
        v["overlap"].append(
            f"{job}: process {p.proc[0]} (attempt {p.attempt}) still worked at "
            f"{t:.2f} while process {q.proc[0]} (attempt {q.attempt}) held the job "
            f"({n} sample{'s' if n != 1 else ''})")


# ------------------------------------------------------------------------------- the workload


def train_spec(name: str, plan: Plan) -> dict[str, Any]:
    return {"lora_name": name, "base_model": "tiny", "dataset": "tiny", "format": "alpaca-format",
            "lora_rank": 4, "lora_alpha": 8, "micro_batch_size": 2, "batch_size": 4,
            "epochs": plan.epochs, "learning_rate": "1e-3", "cutoff_len": 64, "overlap_len": 32,
            "warmup_steps": 0, "lr_scheduler_type": "linear", "save_steps": 2,
            "lora_dropout": 0.05}


def server_error(status: int, body: Any) -> str | None:
    """What is wrong with a 5xx answer of the dashboard's API (`body`: its JSON, or its text),
    or None for the one honest refusal under chaos: 503 with `{"error": REDIS_DOWN}`, what
    the dashboard answers while its Redis is away (dashboard/app.py). A 500, or any other
    5xx, is an error of the dashboard's own."""
    from dashboard.app import REDIS_DOWN

    message = body.get("error") if isinstance(body, dict) else body
    if status == 503 and message == REDIS_DOWN:
        return None
    return f"HTTP {status}: {str(message)[:200]}"


class ApiAnswers:
    """Every 5xx answer the users' and the followers' clients got, from a response hook on
    their sessions (`watch`), sorted by `server_error`: refusals while Redis was away are
    counted, anything else is kept as a violation. The users retry either, as a user would;
    `Client.follow` waits either out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.redis_down = 0           # 503s with the dashboard's Redis-away message
        self.errors: list[str] = []   # every other 5xx: "METHOD path: HTTP status: message"

    def watch(self, session: requests.Session) -> requests.Session:
        session.hooks["response"].append(self.hook)
        return session

    def hook(self, resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        if resp.status_code < 500:
            return
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        why = server_error(resp.status_code, body)
        path = urlsplit(resp.url).path
        with self.lock:
            if why is None:
                self.redis_down += 1
            else:
                self.errors.append(f"{resp.request.method} {path}: {why}")


@dataclass
class Submission:
    """One submission as a user made it, with its tries until the dashboard answered."""

    user: str
    kind: str               # train, evaluate, generate, or sweep
    name: str               # the job's name as the store records it (job_name); "" for a sweep
    sent: float             # the first try (time.time())
    answered: float = 0.0   # the answer (0: never answered)
    tries: int = 0
    id: str = ""            # the job (or sweep) the answer named


class Users:
    """The three users, each submitting through the API with their own token; a submission
    is retried until the dashboard answers it (an answer is the only proof of acceptance):
    when it did not answer, a 429, or a 5xx (sorted by `ApiAnswers`: a 500 is a violation,
    retried all the same, as a user would)."""

    def __init__(self, fleet: ChaosFleet, answers: ApiAnswers):
        from dispatcher.cli.client import Client

        self.clients = {u: Client(fleet.url, token=t, timeout=10) for u, t in fleet.tokens.items()}
        self.answers = answers
        for client in self.clients.values():
            answers.watch(client.session)
        self.accepted: dict[str, dict[str, Any]] = {}  # job id -> {user, kind, at}
        self.submissions: list[Submission] = []
        self.sweeps: list[str] = []
        self.retried = 0  # tries after the first, of every submission
        self.cy_submitted_at = 0.0  # when cy queued two jobs behind ana's backlog
        self.cy_jobs: list[str] = []

    def _retry(self, call: Any, sub: Submission) -> Any:
        from dispatcher.cli.client import ApiError

        self.submissions.append(sub)
        deadline = time.monotonic() + 300
        while True:
            sub.tries += 1
            try:
                out = call()
                sub.answered = time.time()
                return out
            except ApiError as e:
                # 0: no answer (the dashboard is down, or went while answering); 429: too
                # busy; 5xx: recorded by ApiAnswers.
                if e.status and e.status < 500 and e.status != 429:
                    raise
            except requests.RequestException:
                pass  # a read timeout: the answer was lost, the job may have been made
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dashboard did not answer a submission of {sub.user} "
                                   f"({sub.kind} {sub.name}) for 300 s ({sub.tries} tries)")
            self.retried += 1
            time.sleep(0.5)

    def submit(self, user: str, spec: dict[str, Any], kind: str = "train") -> str:
        from dispatcher.jobs.record import job_name

        sub = Submission(user, kind, job_name(kind, spec), time.time())
        job = self._retry(lambda: self.clients[user].submit(spec, kind=kind), sub)
        sub.id = job
        self.accepted[job] = {"user": user, "kind": kind, "at": time.time()}
        return job

    def sweep(self, user: str, definition: dict[str, Any]) -> str:
        sub = Submission(user, "sweep", "", time.time())
        res = self._retry(lambda: self.clients[user].create_sweep(definition), sub)
        sub.id = res["id"]
        self.sweeps.append(res["id"])
        for t in res.get("trials", []):
            if t.get("job"):
                self.accepted[t["job"]] = {"user": user, "kind": "train", "at": time.time(),
                                           "sweep": res["id"]}
        return res["id"]


class _StreamSession(requests.Session):
    """A follower's HTTP session: it tells the follower when an event stream opens (answered
    200) and when it closes, so reconnects are counted and the killer can aim at a connected
    follower. Nothing else changes: `Client.follow` does its own requests through it."""

    def __init__(self, opened: Any, closed: Any):
        super().__init__()
        self.trust_env = False  # as Client's own session for a dashboard on this machine
        self._opened, self._closed = opened, closed

    def get(self, url: str | bytes, **kw: Any) -> requests.Response:
        resp = super().get(url, **kw)
        if kw.get("stream") and resp.status_code == 200:
            self._opened()
            close = resp.close

            def close_and_tell() -> None:  # `with resp:` ends in resp.close()
                self._closed()
                close()

            resp.close = close_and_tell  # type: ignore[method-assign]
        return resp


class Follower(threading.Thread):
    """A user following one job live through the dashboard with the CLI's own code:
    `Client.follow` (dispatcher/cli/client.py), what `lorafleet submit --wait` and `lorafleet
    logs -f` run. Through the dashboard's restarts and Redis's it must keep following (it
    reconnects with Last-Event-ID) and return once the job has ended. Records every event id
    it received, the last state it was told of, how many streams it opened, and how it
    ended: returned (`done`) or gave up (`error`)."""

    def __init__(self, url: str, token: str, job: str, answers: ApiAnswers | None = None):
        from dispatcher.cli.client import Client

        super().__init__(daemon=True, name=f"follow-{job}")
        self.job = job
        self.client = Client(url, token=token, timeout=10)
        self.client.session = _StreamSession(self._opened, self._closed)
        if answers is not None:
            answers.watch(self.client.session)
        self.ids: list[str] = []
        self.last_state = ""     # the last state event received
        self.connections = 0     # streams opened (answered 200)
        self.streaming = False   # a stream is open now
        self.done = False        # Client.follow returned
        self.error = ""          # what it raised, if it gave up

    def _opened(self) -> None:
        self.connections += 1
        self.streaming = True

    def _closed(self) -> None:
        self.streaming = False

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    def run(self) -> None:
        try:
            for ev in self.client.follow(self.job):
                if ev.get("id"):
                    self.ids.append(ev["id"])
                if ev.get("type") == "state" and ev.get("state"):
                    self.last_state = ev["state"]
            self.done = True
        except Exception as e:  # noqa: BLE001 - giving up, for any reason, is the finding
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.streaming = False


# --------------------------------------------------------------------------------- the run


def run(plan: Plan, home: Path, log: Any = print) -> Report:
    report = Report(plan=plan.__dict__ | {"kill_every": list(plan.kill_every)})
    schedule = kill_schedule(plan)
    report.schedule = [f"{k.at:.1f} {k.kind}" for k in schedule]
    fleet = ChaosFleet(home)
    t0 = time.monotonic()
    watch = ProcessWatch(fleet)
    try:
        fleet.start_all()
        answers = ApiAnswers()
        users = Users(fleet, answers)
        followers: list[Follower] = []
        killer = Killer(fleet, schedule, report,
                        following=lambda: any(f.streaming for f in list(followers)),
                        phase_s=plan.minutes * 60)
        watch.start()
        killer.start()
        try:
            _workload(fleet, users, plan, random.Random(f"{plan.seed}:workload"), followers,
                      log)
        except TimeoutError as e:  # a submission never answered: the rest is still checked
            report.violations["api"].append(f"the workload stopped: {e}")
            log(f"the workload stopped: {e}")
        killer.join()
        report.seconds["chaos"] = round(time.monotonic() - t0, 1)
        log(f"chaos over after {report.seconds['chaos']} s: kills {dict(report.kills)}; "
            "draining the queue")
        unfinished = _drain(fleet, plan, report.violations)
        report.seconds["drain"] = round(time.monotonic() - t0 - report.seconds["chaos"], 1)
        if unfinished:
            # Not a stop: the jobs that did not end are violations (`accepted`, in `check`),
            # and everything else is checked and reported as usual.
            log(f"the drain's {plan.drain_s:g} s are over with {len(unfinished)} job(s) not "
                "ended; checking all the same")
        report.counts["jobs_not_ended_after_drain"] = len(unfinished or [])
        # Each follower's Client.follow returns once its job has ended: 60 s for all of them.
        joined_by = time.monotonic() + 60
        for f in followers:
            f.join(max(0.0, joined_by - time.monotonic()))
        watch.stop()
        check(fleet, users, followers, report, plan, watch)
        report.counts["submissions_retried"] = users.retried
        report.counts["api_refusals_redis_down"] = answers.redis_down
        report.counts["api_server_errors"] = len(answers.errors)
        if answers.errors:
            report.violations["api"].extend(answers.errors)
        (home / "kills.log").write_text("\n".join(killer.log))
    finally:
        watch.stop()
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
            f = Follower(fleet.url, fleet.tokens["ana"], job, users.answers)
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
            f = Follower(fleet.url, fleet.tokens["ana"], job, users.answers)
            f.start()
            followers.append(f)
        if n % 4 == 0:
            users.submit("bo", {"base_model": "tiny", "text_file": "story", "stride": 32,
                                "max_length": 64}, kind="evaluate")
        if n % 4 == 2:
            users.submit("cy", {"base_model": "tiny", "prompt": f"Hello {n}",
                                "max_new_tokens": 8, "seed": n}, kind="generate")
    log(f"{len(users.accepted)} jobs accepted ({users.retried} submissions retried)")


def _drain(fleet: ChaosFleet, plan: Plan, v: dict[str, list[str]]) -> list[str] | None:
    """Wait until every job has ended, plan.drain_s at most; the ids of those that had not
    (None: Redis could not tell). A drain that runs out of time does not stop the run: the
    checks count what did not end."""
    import redis

    from dispatcher.jobs.store import JobStore

    unfinished: list[str] | None = None

    def all_done() -> bool:
        nonlocal unfinished
        r = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
        try:
            jobs = JobStore(r, fleet.prefix).list(limit=100000)
        finally:
            r.close()
        unfinished = [j["id"] for j in jobs if j["state"] not in TERMINAL]
        return not unfinished

    # Every part of the fleet is up again for the drain (a restart may still be pending).
    if not _wait_for(lambda: _ok(fleet.url + "/healthz"), 60, every=0.5):
        v["api"].append("the dashboard did not answer /healthz within 60 s after the kills")
    try:
        wait_until(all_done, plan.drain_s, "every job to end")
    except TimeoutError:
        pass
    return unfinished


# --------------------------------------------------------------------------------- invariants


def check(fleet: ChaosFleet, users: Users, followers: list[Follower], report: Report,
          plan: Plan, watch: ProcessWatch | None = None) -> None:
    import redis

    from dispatcher.jobs.store import JobStore

    r = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    store = JobStore(r, fleet.prefix)
    v = report.violations
    jobs = store.list(limit=100000)
    by_id = {j["id"]: j for j in jobs}
    histories = {j: store.history(j) for j in set(by_id) | set(users.accepted)}
    report.counts.update(jobs=len(jobs), accepted=len(users.accepted),
                         states=dict(Counter(j["state"] for j in jobs)))
    _check_accepted(users.accepted, by_id, histories, v)
    duplicates = _check_unaccepted(by_id, users.accepted, users.sweeps, users.submissions, v)
    report.counts["duplicate_jobs"] = len(duplicates)
    # A LoRA a duplicate also trained was trained twice (the second run continued the first's
    # weights): its curve and final loss are not an uninterrupted run's, by the workload's
    # doing, so they are not compared.
    twice = {by_id[d]["spec"].get("lora_name") for d in duplicates
             if by_id[d].get("kind") == "train"}
    report.counts["loras_trained_twice"] = len(twice)
    resumed = 0
    for j in jobs:
        events = [e for _, e in store.events.history(j["id"])]
        _check_attempts(j, events, v)
        if j.get("kind") == "train" and j["state"] == "succeeded":
            resumed += bool((j.get("result") or {}).get("resumed_from"))
            if j["spec"].get("lora_name") not in twice:
                _check_curve(j, fleet.settings.paths.loras, v)
    report.counts["resumed_jobs"] = resumed
    report.counts["attempts_over_1"] = sum(1 for j in jobs if int(j.get("attempt") or 0) > 1)
    report.counts["packed_trials"] = sum(1 for j in jobs if j.get("pack"))
    if watch is not None:
        check_overlap(watch.samples, v)
        report.counts["watch_samples"] = len(watch.samples)
        report.counts["training_processes_watched"] = len(watch.seen)
        report.counts["orphans_watched"] = len(watch.orphans)
    _check_final_losses([j for j in jobs if j["spec"].get("lora_name") not in twice], fleet,
                        plan, v, report)
    _check_folders(jobs, fleet, v, report)
    _check_follow_ends({f.job: FollowEnd(f.done, f.error, f.last_state) for f in followers},
                       {f.job: by_id.get(f.job, {}).get("state", "gone") for f in followers},
                       v)
    _check_sse({f.job: f.ids for f in followers if f.done},
               {f.job: [eid for eid, _ in store.events.history(f.job)] for f in followers}, v)
    report.counts["sse_followers"] = len(followers)
    report.counts["sse_events"] = sum(len(f.ids) for f in followers)
    report.counts["sse_reconnects"] = sum(f.reconnects for f in followers)

    def first_run(job_id: str) -> float | None:
        return next((float(h["time"]) for h in histories.get(job_id, [])
                     if h["state"] == "running"), None)

    ana = [j for j, a in users.accepted.items() if a["user"] == "ana" and not a.get("sweep")]
    report.counts["cy_jobs_started"] = sum(first_run(j) is not None for j in users.cy_jobs)
    _check_fair_share(users.cy_jobs, users.cy_submitted_at, ana, first_run, v)
    r.close()


def _check_accepted(accepted: Any, by_id: dict[str, dict[str, Any]],
                    histories: dict[str, list[dict[str, Any]]], v: dict[str, list[str]]) -> None:
    """Every accepted job exists and ended exactly once (one final state in its history)."""
    for job_id in accepted:
        if job_id not in by_id:
            v["accepted"].append(f"{job_id}: accepted, then gone")
    for job_id, j in by_id.items():
        ends = [h for h in histories.get(job_id, []) if h["state"] in TERMINAL]
        if j["state"] not in TERMINAL:
            v["accepted"].append(f"{job_id}: never ended ({j['state']} when checked, "
                                 f"{len(ends)} final states)")
        elif len(ends) != 1:
            v["accepted"].append(f"{job_id}: {j['state']}, {len(ends)} final states")


# How far a job's `created` (the dashboard's clock) may lie outside a submission's tries (this
# test's clock) and still be one of them: the same machine's clock, so only rounding.
CLOCK_SLACK_S = 1.0


def _check_unaccepted(by_id: dict[str, dict[str, Any]], accepted: Any, sweeps: list[str],
                      submissions: list[Submission], v: dict[str, list[str]]) -> list[str]:
    """Every job in the store that no answer named is explained, or a violation. Made by an
    accepted sweep (its perplexity jobs: `sweep_eval`), or a duplicate: made while a
    submission of the same user, kind and name was tried more than once, so one try that
    was not answered made it (the API takes no idempotency key: a retry after a lost answer
    makes the job again, as it would for a CLI user who runs the command again). A job of a
    sweep (a trial) is matched against the sweep's submission. Returns the duplicates."""
    duplicates = []
    for job_id, j in by_id.items():
        if job_id in accepted or (j.get("sweep_eval") and j["sweep_eval"] in sweeps):
            continue
        kind, name = ("sweep", "") if j.get("sweep") else (j.get("kind"), j.get("name", ""))
        made = float(j.get("created") or 0)
        if any(s.tries > 1 and s.user == j.get("owner") and s.kind == kind and s.name == name
               and s.sent - CLOCK_SLACK_S <= made <= (s.answered or math.inf) + CLOCK_SLACK_S
               for s in submissions):
            duplicates.append(job_id)
        else:
            v["accepted"].append(f"{job_id}: in the store ({kind} {name!r} of "
                                 f"{j.get('owner')}), but no answer named it and no submission "
                                 "like it was being retried when it was made")
    return duplicates


def _check_attempts(job: dict[str, Any], events: list[dict[str, Any]],
                    v: dict[str, list[str]]) -> None:
    spans: dict[int, list[float]] = {}
    steps: dict[int, list[int]] = defaultdict(list)
    unmarked = 0
    for e in events:
        if e.get("type") != "train":
            continue
        if "attempt" not in e:
            unmarked += 1
            continue
        a = int(e["attempt"])
        t = float(e["time"])
        lo, hi = spans.get(a, [t, t])
        spans[a] = [min(lo, t), max(hi, t)]
        steps[a].append(int(e["step"]))
    if unmarked:
        v["overlap"].append(f"{job['id']}: {unmarked} training event(s) without an attempt")
    for a, s in steps.items():
        if any(y <= x for x, y in zip(s, s[1:], strict=False)):
            v["order"].append(f"{job['id']} attempt {a}: steps {s}")
    ordered = sorted(spans.items())
    for (a, (_, end)), (b, (start, _)) in zip(ordered, ordered[1:], strict=False):
        if start < end:
            v["overlap"].append(f"{job['id']}: attempt {b} trained from {start:.2f} while "
                                f"attempt {a} trained until {end:.2f}")


def _check_curve(job: dict[str, Any], loras: Path, v: dict[str, list[str]]) -> None:
    """A succeeded training job says how many steps it trained, and its LoRA's
    training_log.json records exactly steps 1..that many."""
    total = (job.get("result") or {}).get("total_steps")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        v["curve"].append(f"{job['id']}: succeeded without total_steps ({total!r})")
        return
    try:
        log = json.loads((loras / job["spec"]["lora_name"] / "training_log.json").read_text())
    except (OSError, ValueError) as e:
        v["curve"].append(f"{job['id']}: no readable training_log.json ({e})")
        return
    history = log.get("loss_history") if isinstance(log, dict) else None
    if not history:
        v["curve"].append(f"{job['id']}: training_log.json has no loss_history")
        return
    steps = [h.get("step") if isinstance(h, dict) else None for h in history]
    if steps != list(range(1, total + 1)):
        v["curve"].append(f"{job['id']}: recorded steps {steps[:5]}...{steps[-5:]} "
                          f"({len(steps)}), not 1..{total}")


@dataclass(frozen=True)
class FollowEnd:
    """How a follower's Client.follow ended."""

    done: bool        # it returned
    error: str        # what it raised, if it gave up
    last_state: str   # the last state event it received


def _check_follow_ends(ends: dict[str, FollowEnd], states: dict[str, str],
                       v: dict[str, list[str]]) -> None:
    """Each follower's Client.follow saw its job's end: it did not give up, it had returned
    when the checks ran, and the last state it was told of is the job's final state. (A
    follower of a job that never ended is not one more violation: the job is, `accepted`.)"""
    for job, end in ends.items():
        state = states.get(job, "gone")
        if end.error:
            v["sse"].append(f"{job}: Client.follow gave up ({end.error}); the job {state}")
        elif not end.done:
            if state in TERMINAL:
                v["sse"].append(f"{job}: Client.follow had not returned when the checks ran; "
                                f"the job {state}")
        elif end.last_state != state or state not in TERMINAL:
            v["sse"].append(f"{job}: Client.follow returned after state "
                            f"{end.last_state or 'none'!r}; the job {state}")


def _check_sse(received: dict[str, list[str]], streams: dict[str, list[str]],
               v: dict[str, list[str]]) -> None:
    """Each follower got its job's whole stream, in order, once."""
    for job, ids in received.items():
        stream = streams.get(job, [])
        if ids != stream:
            first = next((i for i, (a, b) in enumerate(zip(ids, stream, strict=False))
                          if a != b), min(len(ids), len(stream)))
            v["sse"].append(f"{job}: received {len(ids)} events, the stream has "
                            f"{len(stream)} (first difference at {first})")


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
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests.lorafolders import incomplete_lora

    loras = fleet.settings.paths.loras
    base = AutoModelForCausalLM.from_pretrained(fleet.settings.paths.models / "tiny")
    loaded = 0
    for j in jobs:
        if j.get("kind") != "train" or j["state"] != "succeeded":
            continue
        folder = loras / j["spec"]["lora_name"]
        why = incomplete_lora(folder) or adapter_load_problem(base, folder)
        if why is None:
            loaded += 1
            continue
        v["folders"].append(f"{j['id']}: loras/{folder.name}: {why}")
        # A load that failed part-way may have left the shared base model changed.
        base = AutoModelForCausalLM.from_pretrained(fleet.settings.paths.models / "tiny")
    report.counts["loras_loaded"] = loaded
    # Every adapter file anywhere parses, with its config beside it.
    for weights in loras.rglob("adapter_model.safetensors"):
        try:
            with safe_open(str(weights), "pt") as f:
                list(f.keys())
            json.loads((weights.parent / "adapter_config.json").read_text())
        except Exception as e:  # noqa: BLE001
            v["folders"].append(f"{weights.relative_to(loras)}: half-written ({e})")
    _check_leftovers(loras, v)


def adapter_load_problem(base: Any, folder: Path) -> str | None:
    """Why peft does not load `folder`'s adapter onto `base` exactly, or None. It must load,
    and the loaded model's adapter weights must be the saved tensors, key for key: a key
    the file has and the model does not take, a weight of the model's adapter the file
    lacks (peft's `from_pretrained` only warns of it and leaves it at its initial value), or
    a value that differs, is a problem. `base` is left as it was (the adapter unloaded)."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        saved = load_file(str(folder / "adapter_model.safetensors"))
        model = PeftModel.from_pretrained(base, folder)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return f"does not load with peft: {type(e).__name__}: {e}"
    try:
        got = get_peft_model_state_dict(model, save_embedding_layers=False)
    finally:
        model.unload()
    ignored = sorted(set(saved) - set(got))
    lacking = sorted(set(got) - set(saved))
    differ = sorted(k for k in set(saved) & set(got)
                    if not torch.equal(saved[k], got[k].detach().to("cpu", saved[k].dtype)))
    problems = [f"{what}: {keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                for what, keys in (("saved weights peft did not load", ignored),
                                   ("adapter weights the file lacks", lacking),
                                   ("weights loaded with other values", differ)) if keys]
    return "; ".join(problems) or None


def _check_leftovers(loras: Path, v: dict[str, list[str]]) -> None:
    """Nothing a killed save left in any LoRA folder (tests/lorafolders.py): no staging
    folder, no `.old-checkpoint-*`, no temporary file, no incomplete checkpoint."""
    from tests.lorafolders import leftovers

    for folder in sorted(p for p in loras.iterdir() if p.is_dir() and not p.is_symlink()):
        for line in leftovers(folder):
            v["folders"].append(f"loras/{folder.name}/{line}")
    stray = sorted(str(p.relative_to(loras)) for p in loras.glob("*.tmp"))
    if stray:
        v["folders"].append(f"temporary files left in loras/: {stray[:10]}")


def _check_fair_share(cy_jobs: list[str], cy_submitted_at: float, ana_jobs: list[str],
                      first_run: Any, v: dict[str, list[str]],
                      workers: int = len(ChaosFleet.WORKERS)) -> None:
    """cy's two jobs, queued behind ana's backlog, both started, and before ana's queued jobs
    did: at most one of ana's jobs per worker started between cy's submission and each cy
    job's start (those already being handed out)."""
    ana_starts = [t for t in (first_run(j) for j in ana_jobs) if t is not None]
    for job in cy_jobs:
        started = first_run(job)
        if started is None:
            v["fair_share"].append(f"{job}: cy's job never started")
            continue
        ahead = sum(1 for t in ana_starts if cy_submitted_at < t < started)
        if ahead > workers:
            v["fair_share"].append(f"{job}: {ahead} of ana's jobs started after cy's submission "
                                   "and before it")
