"""The chaos run's checks catch what they are for (no fleet: each check is handed evidence made
here, the process watch real processes), and a seed gives the same kill schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
import requests

from tests.chaos.harness import (
    KINDS,
    ApiAnswers,
    FollowEnd,
    Hold,
    Plan,
    ProcessWatch,
    ProcStat,
    Submission,
    _check_accepted,
    _check_attempts,
    _check_curve,
    _check_fair_share,
    _check_follow_ends,
    _check_leftovers,
    _check_sse,
    _check_unaccepted,
    adapter_load_problem,
    check_overlap,
    kill_schedule,
    pick_from,
    server_error,
)
from tests.lorafolders import CHECKPOINT_FILES, LORA_FILES, incomplete_lora


def violations() -> dict:
    return defaultdict(list)


def ev(attempt: int, step: int, t: float) -> dict:
    return {"type": "train", "attempt": attempt, "step": step, "time": t}


# -- overlap and order: the events ---------------------------------------------------------------
def test_two_attempts_training_at_once_and_steps_out_of_order_are_violations():
    v = violations()
    job = {"id": "j"}
    # Attempt 1 steps 1-4, killed; attempt 2 resumes from step 2 later: fine.
    _check_attempts(job, [ev(1, 1, 1.0), ev(1, 2, 2.0), ev(1, 3, 3.0), ev(1, 4, 4.0),
                          ev(2, 3, 9.0), ev(2, 4, 10.0)], v)
    assert dict(v) == {}
    # Attempt 1 (an orphaned process) still trained while attempt 2 had started.
    _check_attempts(job, [ev(1, 1, 1.0), ev(2, 1, 2.0), ev(1, 2, 3.0), ev(2, 2, 4.0)], v)
    assert len(v["overlap"]) == 1 and "attempt 2 trained from 2.00" in v["overlap"][0]
    _check_attempts(job, [ev(1, 1, 1.0), ev(1, 3, 2.0), ev(1, 2, 3.0)], v)
    assert v["order"] == ["j attempt 1: steps [1, 3, 2]"]


def test_a_training_event_without_its_attempt_is_a_violation():
    v = violations()
    _check_attempts({"id": "j"}, [ev(1, 1, 1.0), {"type": "train", "step": 2, "time": 2.0},
                                  {"type": "log", "line": "x", "time": 2.5}], v)
    assert v["overlap"] == ["j: 1 training event(s) without an attempt"]


# -- overlap: the processes ----------------------------------------------------------------------
P, Q = (101, 5000), (202, 6000)  # (pid, start time)


def hold(proc, attempt: int, cpu: int, writing: bool = False, job: str = "j") -> Hold:
    return Hold(proc, job, attempt, cpu, writing)


def test_an_older_attempts_process_working_while_a_newer_one_holds_the_job_is_an_overlap():
    v = violations()
    # P (attempt 1, its worker killed) goes on using the CPU after Q (attempt 2) took the job.
    check_overlap([(1.0, [hold(P, 1, 100)]),
                   (1.5, [hold(P, 1, 120), hold(Q, 2, 10)]),
                   (2.0, [hold(P, 1, 150), hold(Q, 2, 40)]),
                   (2.5, [hold(P, 1, 170), hold(Q, 2, 70)])], v)
    assert len(v["overlap"]) == 1, v
    assert v["overlap"][0].startswith("j: process 101 (attempt 1) still worked at 2.00 while "
                                      "process 202 (attempt 2) held the job (2 samples)")


def test_an_older_process_writing_the_lora_counts_even_without_cpu():
    v = violations()
    check_overlap([(1.0, [hold(P, 1, 100), hold(Q, 2, 10)]),
                   (1.5, [hold(P, 1, 100, writing=True), hold(Q, 2, 40)])], v)
    assert len(v["overlap"]) == 1 and "process 101 (attempt 1)" in v["overlap"][0]


def test_two_processes_of_the_same_attempt_working_at_once_is_an_overlap():
    v = violations()
    check_overlap([(1.0, [hold(P, 1, 100), hold(Q, 1, 10)]),
                   (1.5, [hold(P, 1, 130), hold(Q, 1, 40)])], v)
    assert v["overlap"], v


def test_no_overlap_when_the_older_process_idles_dies_first_or_holds_another_job():
    v = violations()
    # P stopped at the fence and waits to exit (no CPU, no file): not training.
    check_overlap([(1.0, [hold(P, 1, 100), hold(Q, 2, 10)]),
                   (1.5, [hold(P, 1, 101), hold(Q, 2, 40)]),
                   (2.0, [hold(Q, 2, 70)])], v)
    # P worked, then died before Q held the job.
    check_overlap([(1.0, [hold(P, 1, 100)]), (1.5, [hold(P, 1, 150)]),
                   (2.0, [hold(Q, 2, 10)]), (2.5, [hold(Q, 2, 60)])], v)
    # P works on another job while Q holds this one; Q (the newer) works while P idles.
    check_overlap([(1.0, [hold(P, 1, 100, job="k"), hold(Q, 2, 10)]),
                   (1.5, [hold(P, 1, 150, job="k"), hold(Q, 2, 60)])], v)
    # Q is seen holding the job for the first time: P's work before that is not an overlap.
    check_overlap([(1.0, [hold(P, 1, 100)]), (1.5, [hold(P, 1, 150), hold(Q, 2, 10)]),
                   (2.0, [hold(Q, 2, 60)])], v)
    assert dict(v) == {}


def fake_watch() -> ProcessWatch:
    return ProcessWatch(SimpleNamespace(settings=None, prefix="x", redis_url=""), every=0.3)


def test_the_watch_keeps_an_orphans_hold_and_ends_a_finished_ones():
    w = fake_watch()
    stats = {101: ProcStat(5000, 7, 100), 202: ProcStat(6000, 8, 10)}
    attempts = {"j": 1, "k": 1}

    def sample(beats):
        w.sample(beats, lambda jobs: {j: attempts[j] for j in jobs}, stat=stats.get,
                 writing=lambda pid: False)

    sample({"w1": (101, ["j"]), "w2": (0, [])})
    assert [h.proc for h in w.samples[-1][1]] == [P]
    # w1's main process is killed: 101 is orphaned (its parent changes), w1's heartbeat is
    # cleared by its next life, and the job goes to w2 at attempt 2. The orphan still holds.
    stats[101] = ProcStat(5000, 1, 130)
    attempts["j"] = 2
    sample({"w1": (0, []), "w2": (202, ["j"])})
    assert sorted((h.proc, h.attempt) for h in w.samples[-1][1]) == [(P, 1), (Q, 2)]
    assert w.orphans == {P}
    # Redis is down (no heartbeats): the holds stay as they were.
    stats[101] = ProcStat(5000, 1, 160)
    sample(None)
    assert len(w.samples[-1][1]) == 2
    # 202 finished: still w2's child, and w2's heartbeat names no process. 101 died.
    del stats[101]
    sample({"w1": (0, []), "w2": (0, [])})
    assert w.samples[-1][1] == [] and w.claims == {}
    # A pid that now names another process (another start time) is not the one that held.
    stats[303] = ProcStat(7000, 9, 0)
    sample({"w3": (303, ["k"])})
    stats[303] = ProcStat(7777, 9, 0)
    sample({"w3": (303, ["k"])})
    assert [h.proc for h in w.samples[-1][1]] == [(303, 7777)]


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.mark.timeout(60)
def test_the_watch_sees_a_real_orphan_still_computing_beside_the_jobs_next_process():
    """Real processes, as /proc shows them: a 'worker' whose two children hold jobs a and b;
    the worker is killed (-9) and its children are orphaned; one keeps computing, the other
    idles. Two new processes then hold a and b at attempt 2. Only a is an overlap."""
    busy, idle = "while True: pass", "import time; time.sleep(60)"
    worker = _spawn("import subprocess, sys, time\n"
                    f"a = subprocess.Popen([sys.executable, '-c', {busy!r}])\n"
                    f"b = subprocess.Popen([sys.executable, '-c', {idle!r}])\n"
                    "print(a.pid, b.pid, flush=True)\ntime.sleep(60)\n")
    orphans: list[int] = []
    nexts: list[subprocess.Popen] = []
    try:
        orphans = [int(x) for x in worker.stdout.readline().split()]
        w = fake_watch()
        attempts = {"a": 1, "b": 1}

        def sample(beats):
            w.sample(beats, lambda jobs: {j: attempts[j] for j in jobs},
                     writing=lambda pid: False)

        sample({"w1": (orphans[0], ["a"]), "w2": (orphans[1], ["b"])})
        worker.kill()
        worker.wait()
        nexts = [_spawn("import time; time.sleep(60)") for _ in range(2)]
        attempts.update(a=2, b=2)
        for _ in range(5):
            time.sleep(0.3)
            sample({"w1": (nexts[0].pid, ["a"]), "w2": (nexts[1].pid, ["b"])})
        assert {k[0] for k in w.orphans} == set(orphans)
        v = violations()
        check_overlap(w.samples, v)
        assert len(v["overlap"]) == 1, v
        assert v["overlap"][0].startswith(f"a: process {orphans[0]} (attempt 1) still worked")
    finally:
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (worker, *nexts):
            p.kill()
            p.wait()


# -- curve -----------------------------------------------------------------------------------------
def curve_job(tmp_path, total, history, name="l") -> dict:
    folder = tmp_path / name
    folder.mkdir()
    if history is not None:
        log = {} if history == "no key" else {"loss_history": [{"step": s, "loss": 1.0}
                                                                for s in history]}
        (folder / "training_log.json").write_text(json.dumps(log))
    result = {} if total is None else {"total_steps": total}
    return {"id": name, "spec": {"lora_name": name}, "result": result}


@pytest.mark.parametrize("total,history,why", [
    (18, [], "no loss_history"),
    (18, "no key", "no loss_history"),
    (None, [1, 2, 3, 4, 5], "without total_steps"),
    (0, [], "without total_steps"),
    (5, [1, 2, 4, 5], "not 1..5"),
    (5, [1, 2, 3, 3, 4, 5], "not 1..5"),
    (5, [1, 2, 3, 4], "not 1..5"),
    (5, [1, 2, 3, 4, 5, 6], "not 1..5"),
    (5, None, "no readable training_log.json"),
])
def test_a_succeeded_jobs_curve_must_be_steps_one_to_total(tmp_path, total, history, why):
    v = violations()
    _check_curve(curve_job(tmp_path, total, history), tmp_path, v)
    assert len(v["curve"]) == 1 and why in v["curve"][0], v


def test_a_whole_curve_passes(tmp_path):
    v = violations()
    _check_curve(curve_job(tmp_path, 5, [1, 2, 3, 4, 5]), tmp_path, v)
    assert dict(v) == {}


# -- accepted --------------------------------------------------------------------------------------
def h(state: str) -> dict:
    return {"state": state, "time": 1.0}


def test_an_accepted_job_gone_unfinished_or_ended_twice_is_a_violation():
    v = violations()
    by_id = {"ok": {"state": "succeeded"}, "stuck": {"state": "running"},
             "twice": {"state": "failed"}, "no end": {"state": "succeeded"}}
    histories = {"ok": [h("queued"), h("running"), h("succeeded")],
                 "stuck": [h("queued"), h("running")],
                 "twice": [h("running"), h("succeeded"), h("failed")],
                 "no end": [h("queued")]}
    _check_accepted(["ok", "stuck", "twice", "no end", "lost"], by_id, histories, v)
    assert sorted(v["accepted"]) == ["lost: accepted, then gone", "no end: succeeded, 0 final states",
                                     "stuck: never ended (running when checked, 0 final states)",
                                     "twice: failed, 2 final states"]
    v = violations()
    _check_accepted(["ok"], {"ok": by_id["ok"]}, histories, v)
    assert dict(v) == {}


def job(owner: str, kind: str, name: str, created: float, **fields) -> dict:
    return {"owner": owner, "kind": kind, "name": name, "created": created, "state": "succeeded",
            **fields}


def test_a_job_no_answer_named_is_a_duplicate_of_a_retried_submission_or_a_violation():
    subs = [Submission("ana", "train", "ana-1", sent=10.0, answered=14.0, tries=3, id="a1"),
            Submission("ana", "train", "ana-2", sent=20.0, answered=20.1, tries=1, id="a2"),
            Submission("bo", "sweep", "", sent=30.0, answered=35.0, tries=2, id="s1")]
    by_id = {
        "a1": job("ana", "train", "ana-1", 13.0),
        "a1-again": job("ana", "train", "ana-1", 11.0),   # the first try's, its answer lost
        "a2": job("ana", "train", "ana-2", 20.05),
        "a2-again": job("ana", "train", "ana-2", 20.05),  # answered at the first try: no retry
        "late": job("ana", "train", "ana-1", 40.0),       # long after the retried submission
        "other": job("cy", "train", "ana-1", 12.0),       # another user's
        "t1": job("bo", "train", "bo-sweep-r2", 31.0, sweep="s0"),  # a trial of a lost sweep
        "e1": job("bo", "evaluate", "perplexity: tiny", 50.0, sweep_eval="s1"),  # s1's own
    }
    accepted = {"a1": {}, "a2": {}}
    v = violations()
    assert _check_unaccepted(by_id, accepted, ["s1"], subs, v) == ["a1-again", "t1"]
    assert [line.split(":")[0] for line in v["accepted"]] == ["a2-again", "late", "other"]
    assert "no submission like it was being retried" in v["accepted"][0]
    v = violations()
    assert _check_unaccepted({"a1": by_id["a1"]}, accepted, [], subs, v) == []
    assert dict(v) == {}


# -- api -------------------------------------------------------------------------------------------
def test_only_the_dashboards_redis_down_503_is_an_honest_refusal():
    from dashboard.app import REDIS_DOWN

    assert server_error(503, {"error": REDIS_DOWN}) is None
    assert server_error(500, {"error": "internal error in the dashboard; see its log"}) == (
        "HTTP 500: internal error in the dashboard; see its log")
    assert server_error(503, {"error": "something else"}) == "HTTP 503: something else"
    assert server_error(503, "<html>busy</html>") == "HTTP 503: <html>busy</html>"
    assert server_error(502, {"error": REDIS_DOWN}).startswith("HTTP 502: cannot reach Redis")


def answer(status: int, body: bytes, method: str = "POST") -> requests.Response:
    resp = requests.Response()
    resp.status_code, resp._content = status, body
    resp.url = "http://127.0.0.1:1/api/v1/jobs?x=1"
    resp.request = requests.Request(method, resp.url).prepare()
    return resp


def test_api_answers_count_redis_down_refusals_and_keep_every_other_5xx():
    from dashboard.app import REDIS_DOWN

    answers = ApiAnswers()
    session = answers.watch(requests.Session())
    assert answers.hook in session.hooks["response"]
    for resp in (answer(201, b'{"id": "x"}'), answer(404, b'{"error": "no job"}'),
                 answer(503, json.dumps({"error": REDIS_DOWN}).encode()),
                 answer(500, b'{"error": "internal error"}'),
                 answer(502, b"Bad Gateway", method="GET")):
        answers.hook(resp)
    assert answers.redis_down == 1
    assert answers.errors == ["POST /api/v1/jobs: HTTP 500: internal error",
                              "GET /api/v1/jobs: HTTP 502: Bad Gateway"]


# -- sse -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("end,state,why", [
    (FollowEnd(False, "ApiError: the dashboard ... for more than 120 s", "running"), "succeeded",
     "j: Client.follow gave up (ApiError: the dashboard ... for more than 120 s); the job "
     "succeeded"),
    (FollowEnd(False, "", "running"), "succeeded",
     "j: Client.follow had not returned when the checks ran; the job succeeded"),
    (FollowEnd(True, "", "running"), "succeeded",
     "j: Client.follow returned after state 'running'; the job succeeded"),
    (FollowEnd(True, "", ""), "failed", "j: Client.follow returned after state 'none'; the job "
     "failed"),
    (FollowEnd(True, "", "running"), "running",
     "j: Client.follow returned after state 'running'; the job running"),
])
def test_a_follower_that_gave_up_or_missed_its_jobs_end_is_a_violation(end, state, why):
    v = violations()
    _check_follow_ends({"j": end}, {"j": state}, v)
    assert v["sse"] == [why]


def test_a_follower_that_saw_the_end_passes_and_one_of_a_job_that_never_ended_is_not_counted():
    v = violations()
    _check_follow_ends({"a": FollowEnd(True, "", "succeeded"), "b": FollowEnd(False, "", "")},
                       {"a": "succeeded", "b": "running"}, v)
    assert dict(v) == {}


@pytest.mark.parametrize("got,first", [
    (["1-0", "3-0"], 1),                # one missed
    (["1-0", "2-0", "2-0", "3-0"], 2),  # one twice (a reconnect from the wrong id)
    (["1-0", "3-0", "2-0"], 1),         # out of order
    (["1-0", "2-0"], 2),                # the end never came
])
def test_a_follower_that_missed_repeated_or_reordered_events_is_a_violation(got, first):
    v = violations()
    _check_sse({"j": got}, {"j": ["1-0", "2-0", "3-0"]}, v)
    assert v["sse"] == [f"j: received {len(got)} events, the stream has 3 "
                        f"(first difference at {first})"]


def test_a_follower_with_the_whole_stream_passes():
    v = violations()
    _check_sse({"j": ["1-0", "2-0"]}, {"j": ["1-0", "2-0"]}, v)
    assert dict(v) == {}


# -- fair share ------------------------------------------------------------------------------------
def test_cy_behind_anas_backlog_or_never_started_is_a_violation():
    starts = {"a1": 11.0, "a2": 12.0, "a3": 13.0, "a4": 14.0, "a0": 5.0, "cy1": 12.5,
              "cy2": 20.0}
    v = violations()
    # cy submits at 10: cy1 starts after two of ana's (handed out already: fine), cy2 after 4.
    _check_fair_share(["cy1", "cy2"], 10.0, ["a0", "a1", "a2", "a3", "a4", "a5"], starts.get,
                      v, workers=3)
    assert v["fair_share"] == ["cy2: 4 of ana's jobs started after cy's submission and before it"]
    v = violations()
    _check_fair_share(["cy1", "cy3"], 10.0, ["a1"], starts.get, v, workers=3)
    assert v["fair_share"] == ["cy3: cy's job never started"]
    v = violations()
    _check_fair_share(["cy1"], 10.0, ["a0", "a1", "a2"], starts.get, v, workers=3)
    assert dict(v) == {}


# -- folders ---------------------------------------------------------------------------------------
def complete_checkpoint(folder) -> None:
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (folder / name).write_bytes(b"x")


@pytest.mark.parametrize("make,why", [
    # a kill during torch.save: the staging folder with a truncated state
    (lambda d: ((d / ".checkpoint-14-abc").mkdir(),
                (d / ".checkpoint-14-abc" / "training_state.pt").write_bytes(b"\x80")),
     ".checkpoint-14-abc: staging left"),
    (lambda d: (d / ".saving-abc").mkdir(), ".saving-abc: staging left"),
    # a kill between renaming the old checkpoint away and the new one into place
    (lambda d: complete_checkpoint(d / ".old-checkpoint-12"), ".old-checkpoint-12: staging left"),
    (lambda d: (d / ".0123abcd.tmp").write_text("{"), ".0123abcd.tmp: temporary file left"),
    (lambda d: (complete_checkpoint(d / "checkpoint-4"),
                (d / "checkpoint-4" / "training_state.pt").unlink()),
     "checkpoint-4: incomplete checkpoint (missing ['training_state.pt'], extra [])"),
    (lambda d: (complete_checkpoint(d / "checkpoint-6"),
                (d / "checkpoint-6" / ".9f.tmp").write_text("")),
     "checkpoint-6: incomplete checkpoint (missing [], extra ['.9f.tmp'])"),
])
def test_what_a_killed_save_leaves_is_a_violation(tmp_path, make, why):
    lora = tmp_path / "ana-3"
    complete_checkpoint(lora / "checkpoint-2")
    (lora / "adapter_model.safetensors").write_bytes(b"x")
    v = violations()
    _check_leftovers(tmp_path, v)
    assert dict(v) == {}
    make(lora)
    _check_leftovers(tmp_path, v)
    assert v["folders"] and v["folders"][0] == f"loras/ana-3/{why}", v


def test_a_clean_lora_folder_with_a_lock_file_passes(tmp_path):
    lora = tmp_path / "ana-3"
    complete_checkpoint(lora / "checkpoint-2")
    complete_checkpoint(lora / "checkpoint-4")
    (lora / ".lock").write_text("")
    (lora / "backup-2026-01-01").mkdir()
    v = violations()
    _check_leftovers(tmp_path, v)
    assert dict(v) == {}


# -- the seed --------------------------------------------------------------------------------------
def test_a_seed_gives_the_same_kill_schedule_and_every_kind_comes_first():
    plan = Plan(seed=7, minutes=2.0)
    a, b = kill_schedule(plan), kill_schedule(Plan(seed=7, minutes=2.0))
    assert a == b and len(a) >= 8
    assert kill_schedule(Plan(seed=8, minutes=2.0)) != a
    assert sorted(k.kind for k in a[:len(KINDS)]) == sorted(KINDS)
    assert {k.kind for k in a[:2]} == {"dashboard", "redis"}  # while followers follow
    assert all(5.0 <= y.at - x.at <= 15.0 for x, y in zip(a, a[1:], strict=False))
    assert a[-1].at <= 120 and all(1.0 <= k.restart_after <= 3.0 for k in a)
    # The first kills of a longer run are the short run's: only where to stop differs.
    assert kill_schedule(Plan(seed=7, minutes=30.0))[:len(a)] == a


def test_a_target_is_one_draw_mapped_onto_the_list():
    assert [pick_from(["a", "b", "c"], u) for u in (0.0, 0.34, 0.67, 0.999)] == ["a", "b", "c",
                                                                                   "c"]
    assert pick_from(["x"], 0.99) == "x"


# -- a finished LoRA and peft ----------------------------------------------------------------------
def test_a_lora_folder_missing_a_file_or_with_a_broken_json_file_is_not_finished(tmp_path):
    for name in LORA_FILES:
        (tmp_path / name).write_text("{}")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".lock").write_text("")
    assert incomplete_lora(tmp_path) is None
    (tmp_path / "training_prompt.json").unlink()
    assert incomplete_lora(tmp_path) == "not a finished LoRA: missing ['training_prompt.json']"
    (tmp_path / "training_prompt.json").write_text("[1]")
    assert incomplete_lora(tmp_path) == ("not a finished LoRA: training_prompt.json is not a "
                                         "JSON object")


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """The tiny model and a LoRA saved from it, with weights that are not peft's initial ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_tiny_model

    home = tmp_path_factory.mktemp("adapter")
    make_tiny_model(home / "tiny")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(home / "tiny"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param)
    model.save_pretrained(home / "lora", save_embedding_layers=False)
    base = AutoModelForCausalLM.from_pretrained(home / "tiny")
    return base, home / "lora"


def _rewrite(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file(change(tensors), str(folder / "adapter_model.safetensors"))


def test_an_adapter_that_loads_exactly_passes_and_the_base_is_left_as_it_was(tiny_adapter):
    base, folder = tiny_adapter
    before = {k: v.clone() for k, v in base.state_dict().items()}
    assert adapter_load_problem(base, folder) is None
    after = base.state_dict()
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


@pytest.mark.parametrize("change,why", [
    # peft only warns of a key the file lacks, and leaves that weight at its initial value
    (lambda t: {k: v for k, v in t.items() if not k.endswith("layers.0.self_attn.q_proj"
                                                             ".lora_B.weight")},
     "adapter weights the file lacks: ['base_model.model.model.layers.0.self_attn.q_proj"
     ".lora_B.weight'] (1)"),
    # ... and ignores, without a word, a saved key the model has no place for
    (lambda t: {**t, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
                t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone()},
     "saved weights peft did not load: ['base_model.model.model.layers.0.mlp.up_proj"
     ".lora_A.weight'] (1)"),
])
def test_an_adapter_peft_loads_only_in_part_is_a_violation(tiny_adapter, tmp_path, change, why):
    import shutil

    base, saved = tiny_adapter
    folder = tmp_path / "lora"
    shutil.copytree(saved, folder)
    _rewrite(folder, change)
    assert adapter_load_problem(base, folder) == why
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert adapter_load_problem(base, folder).startswith("does not load with peft: ")
