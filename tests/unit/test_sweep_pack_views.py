"""What users see of packs (a sweep's trials trained together on one card): the sweep's results
grouped by pack, the Sweep, Job and Fleet pages, the New sweep form's pack settings and the CLI's
`sweeps ID` and `status JOB`. The packs are formed by the real dispatcher over a real Redis
(its `send_pack` records what it would hand to Celery); pages come from the real app."""

from __future__ import annotations

import html as htmllib
import re

import pytest
from click.testing import CliRunner

from dashboard.app import create_app
from dispatcher.cli import main
from dispatcher.jobs.fleet import Fleet
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.schedule.scheduler import Dispatcher
from dispatcher.schedule.sweeps import SweepStore, parse_sweep, trial_rows
from dispatcher.schedule.sweeps.results import trial_packs
from tests.appclient import client_for, serve_dashboard
from tests.clock import Clock
from tests.datafolder import small_data_folder
from tests.unit.test_dashboard_pages import Elements

BASE = {"lora_name": "pk", "base_model": "tiny", "dataset": "d", "format": "alpaca-format"}
# Four trials that may share a base (they differ only in their own LoRA's settings); two on
# workers at once, so the dispatcher forms two packs of two, one after the other.
DEF = {"name": "packed <sweep>", "base": BASE,
       "parameters": {"lora_rank": [8, 16], "learning_rate": ["1e-4", "3e-4"]},
       "max_concurrent": 2}
NAMES = ["pk-r8-lr1e-4", "pk-r8-lr3e-4", "pk-r16-lr1e-4", "pk-r16-lr3e-4"]
# A worker name is whatever its heartbeat says: the pages must escape it.
WORKER = "gpu<0>&"


@pytest.fixture
def settings(tmp_path, redis_server, prefix):
    return small_data_folder(tmp_path / "home", redis_server, prefix)


@pytest.fixture
def client(settings):
    return client_for(create_app({"LORAFLEET_SETTINGS": settings, "TESTING": True}))


class Packed:
    """A sweep of DEF whose first two trials the dispatcher placed as pack 1 on WORKER, which
    then trained them and took the other two as pack 2 (still training); `alone` is a trial of
    another sweep with packs off."""

    def __init__(self, settings, redis_client, prefix):
        self.clock = Clock()
        self.store = JobStore(redis_client, prefix, clock=self.clock)
        self.fleet = Fleet(redis_client, prefix, timeout=10, clock=self.clock)
        self.sent: list[tuple[str, list[str], str]] = []
        self.dispatcher = Dispatcher(
            self.store, self.fleet, lambda job, w, attempt: None, clock=self.clock,
            send_pack=lambda label, attempts, w: self.sent.append(
                (label, list(attempts), w["name"])))
        self.sweeps = SweepStore(self.store)
        self.sid = self.sweeps.create(parse_sweep(DEF, settings.paths), owner="ada")
        self.ids = [t["job"] for t in self.sweeps.get(self.sid)["trials"]]
        self.fleet.heartbeat(WORKER, device="cpu", packs="1", state="idle")
        self.dispatcher.tick()
        self.first = list(self.sent[0][1])
        for j in self.first:
            self.store.transition(j, JobState.RUNNING, "r")
            self.store.transition(j, JobState.SUCCEEDED, "done")
        self.clock.t += 1
        self.dispatcher.tick()
        self.second = list(self.sent[1][1])
        self.store.transition(self.second[0], JobState.RUNNING, "r")

    def name(self, job_id: str) -> str:
        return self.store.get(job_id)["name"]


@pytest.fixture
def packed(settings, redis_client, prefix):
    return Packed(settings, redis_client, prefix)


def text(html: str) -> str:
    """A page's text as a reader sees it: tags out, entities decoded, spaces collapsed."""
    return re.sub(r"\s+", " ", htmllib.unescape(re.sub(r"<[^>]+>", "", html)))


# grouping (pure) -------------------------------------------------------------------------------
def row(job_id, name, pack, state="running", worker="w1"):
    return {"id": job_id, "name": name, "pack": pack, "state": state, "worker": worker}


def test_rows_group_by_pack_in_number_order_with_the_worker_and_whether_it_trains():
    rows = [row("j1", "a", "10", "succeeded", "w2"), row("j2", "b", "2", "queued", ""),
            row("j3", "c", None), row("j4", "d", "2", "succeeded", "w1"),
            row("j5", "e", "10", "running", "w2"), row("j6", "f", "", "running"),
            row("j7", "g", "2", "failed", "w1")]
    assert trial_packs(rows) == [
        {"pack": "2", "worker": "w1", "trials": ["b", "d", "g"], "jobs": ["j2", "j4", "j7"],
         "running": False},
        {"pack": "10", "worker": "w2", "trials": ["a", "e"], "jobs": ["j1", "j5"],
         "running": True},
    ]
    assert trial_packs([row("j1", "a", None), row("j2", "b", "")]) == []
    assert trial_packs([]) == []
    # Assigned (not yet running) holds the card too.
    assert trial_packs([row("j1", "a", "1", "assigned")])[0]["running"] is True


# results and the API, from the dispatcher's real packs ------------------------------------------
def test_the_dispatchers_packs_are_the_sweeps_packs(packed):
    p = packed
    assert [label for label, _, _ in p.sent] == [f"{p.sid}:1", f"{p.sid}:2"]
    assert {w for _, _, w in p.sent} == {WORKER}
    assert len(p.first) == len(p.second) == 2 and sorted(p.first + p.second) == sorted(p.ids)
    rows = trial_rows(p.sweeps, p.sweeps.get(p.sid))
    assert {r["id"]: r["pack"] for r in rows} == {**{j: "1" for j in p.first},
                                                 **{j: "2" for j in p.second}}
    assert {r["worker"] for r in rows} == {WORKER}
    in_order = [j for j in p.ids]  # trial order: each pack lists its trials in it

    def pack(number, members, running):
        ids = [j for j in in_order if j in members]
        return {"pack": number, "worker": WORKER, "trials": [p.name(j) for j in ids],
                "jobs": ids, "running": running}

    assert trial_packs(rows) == [pack("1", p.first, False), pack("2", p.second, True)]


def test_the_api_gives_each_row_its_pack_and_the_sweep_its_packs_and_settings(client, packed):
    p = packed
    d = client.get(f"/api/v1/sweeps/{p.sid}").get_json()
    assert d["pack"] == "auto" and d["pack_size"] == 0
    assert [(pk["pack"], sorted(pk["jobs"]), pk["running"]) for pk in d["packs"]] == [
        ("1", sorted(p.first), False), ("2", sorted(p.second), True)]
    assert {r["id"]: r["pack"] for r in d["rows"]} == {**{j: "1" for j in p.first},
                                                      **{j: "2" for j in p.second}}
    listed = client.get("/api/v1/sweeps").get_json()["sweeps"]
    assert [(s["id"], s["pack"], s["pack_size"]) for s in listed] == [(p.sid, "auto", 0)]


def test_a_sweep_with_packs_off_has_no_packs_and_says_so(client, store, settings):
    sid = SweepStore(store).create(parse_sweep({**DEF, "pack": "off"}, settings.paths), "ada")
    d = client.get(f"/api/v1/sweeps/{sid}").get_json()
    assert (d["pack"], d["packs"]) == ("off", []) and {r["pack"] for r in d["rows"]} == {None}
    html = client.get(f"/sweeps/{sid}").get_data(as_text=True)
    page = Elements(html)
    assert "pack: off" in text(html)
    assert "hidden" in page.find("section", data_testid="sweep-packs")[0]
    assert not page.find("th", data_sort="pack")  # no pack column where nothing packs


# pages ----------------------------------------------------------------------------------------
def test_the_sweep_page_lists_its_packs_and_settings(client, packed):
    p = packed
    html = client.get(f"/sweeps/{p.sid}").get_data(as_text=True)
    page = Elements(html)
    shown = text(html)
    assert "pack: auto (size: as the card fits)" in shown
    assert "packed &lt;sweep&gt;" in html and "gpu&lt;0&gt;&amp;" in html
    assert WORKER not in html  # nowhere unescaped
    section = page.find("section", data_testid="sweep-packs")
    assert section and "hidden" not in section[0]
    items = page.find("li", data_testid="sweep-pack")
    assert [(i["data-pack"], i["data-running"]) for i in items] == [("1", "no"), ("2", "yes")]
    for number, members in (("1", p.first), ("2", p.second)):
        names = ", ".join(p.name(j) for j in p.ids if j in members)
        assert f"pack {number}: 2 trials on {WORKER} — {names}" in shown
        for j in members:
            assert page.find("a", href=f"/jobs/{j}")
    assert "(training)" in shown.split("pack 2:")[1].split("Loss curves")[0]
    assert "(training)" not in shown.split("pack 1:")[1].split("pack 2:")[0]
    assert page.find("th", data_sort="pack")  # the trials table's pack column


def test_the_sweep_page_says_a_pack_size(client, store, settings):
    sid = SweepStore(store).create(parse_sweep({**DEF, "pack_size": 3}, settings.paths), "ada")
    html = client.get(f"/sweeps/{sid}").get_data(as_text=True)
    assert "pack: auto (size: 3)" in text(html)
    # Before any pack is formed: the column is there, the (empty) packs section hidden.
    page = Elements(html)
    assert page.find("th", data_sort="pack")
    assert "hidden" in page.find("section", data_testid="sweep-packs")[0]


def test_a_trials_job_page_names_the_trials_it_trained_with(client, packed):
    p = packed
    me, mate = p.second
    html = client.get(f"/jobs/{me}").get_data(as_text=True)
    page = Elements(html)
    assert f"trial of sweep {p.sid} · pack 2: trained together with {p.name(mate)}" in text(html)
    assert page.find("a", href=f"/sweeps/{p.sid}") and page.find("a", href=f"/jobs/{mate}")
    assert not page.find("a", href=f"/jobs/{p.first[0]}")  # pack 1 is not this trial's
    rec = client.get(f"/api/v1/jobs/{me}").get_json()
    assert rec["pack_mates"] == [{"id": mate, "name": p.name(mate), "state": "assigned"}]
    # A trial placed alone later shows its sweep, no pack.
    p.store.transition(mate, JobState.RETRYING, "worker lost")
    p.store.transition(mate, JobState.ASSIGNED, "alone", worker="w9", pack="", pack_jobs="")
    html = client.get(f"/jobs/{mate}").get_data(as_text=True)
    assert f"trial of sweep {p.sid}" in text(html) and "trained together" not in html
    assert "hidden" in Elements(html).find("span", data_testid="job-pack")[0]
    assert client.get(f"/api/v1/jobs/{mate}").get_json()["pack_mates"] == []


def test_a_job_outside_sweeps_shows_neither(client, store):
    job = store.create("train", {**BASE, "lora_name": "solo"}, "ada")
    html = client.get(f"/jobs/{job}").get_data(as_text=True)
    assert "trial of sweep" not in html and not Elements(html).find(data_testid="job-pack")


def test_the_fleet_page_shows_the_pack_a_card_trains(client, packed):
    p = packed
    p.fleet.heartbeat(WORKER, device="cpu", packs="1", state="busy", job=p.second[0],
                      jobs=",".join(p.second), pack=f"{p.sid}:2")
    p.fleet.heartbeat("gpu1", device="cuda:1", packs="1", state="busy", job=p.first[0], jobs="", pack="")
    html = client.get("/fleet").get_data(as_text=True)
    page = Elements(html)
    names = ", ".join(p.name(j) for j in p.second)
    assert f"pack 2 of sweep {p.sid}: 2 trials ({names})" in text(html)
    assert len(page.find("span", data_testid="worker-pack")) == 1
    assert page.find("a", href=f"/sweeps/{p.sid}")
    for j in p.second:
        assert page.find("a", href=f"/jobs/{j}")
    # A card with one job still shows that job.
    assert re.search(rf'<a href="/jobs/{p.first[0]}">{p.name(p.first[0])}</a>', html)
    workers = {w["name"]: w for w in client.get("/api/v1/workers").get_json()["workers"]}
    assert workers[WORKER]["pack_number"] == "2" and workers[WORKER]["pack_sweep"] == p.sid
    assert workers[WORKER]["pack_trials"] == [{"id": j, "name": p.name(j)} for j in p.second]
    assert "pack_trials" not in workers["gpu1"]


# the New sweep form -----------------------------------------------------------------------------
def test_the_new_sweep_form_offers_pack_settings_where_the_api_refuses_them(client):
    html = client.get("/sweeps/new").get_data(as_text=True)
    page = Elements(html)
    select = re.search(r'<select id="s-pack" name="s-pack">(.*?)</select>', html).group(1)
    assert re.findall(r'<option value="(\w+)"', select) == ["auto", "off"]
    assert 'value="auto" selected' in select  # packs on, as a definition without `pack`
    size = page.find("input", name="s-pack_size")
    assert size and size[0]["value"] == "0" and size[0]["max"] == "8"
    bad = client.post("/api/v1/sweeps?dry_run=1", json={**DEF, "pack": "sometimes",
                                                        "pack_size": 9})
    assert bad.status_code == 400
    errors = {e["field"]: e["message"] for e in bad.get_json()["errors"]}
    assert errors == {"pack": "must be auto or off, got 'sometimes'",
                      "pack_size": "must be a whole number from 0 to 8, got 9"}
    # Each refused field has its box on the form (sweep_new.js shows a message in it).
    for field in errors:
        assert page.find("div", data_testid=f"error-{field}"), field
    ok = client.post("/api/v1/sweeps?dry_run=1", json={**DEF, "pack": "auto", "pack_size": 2})
    assert ok.status_code == 200 and (ok.get_json()["pack"], ok.get_json()["pack_size"]) == (
        "auto", 2)


# the CLI --------------------------------------------------------------------------------------
@pytest.fixture
def url(settings, monkeypatch):
    """The dashboard served over HTTP on a free loopback port; the CLI runs as the OS user who
    owns its data folder (it reads the token), as in test_cli_client.py."""
    yield from serve_dashboard(settings, monkeypatch)


def cli(url: str, *args: str):
    res = CliRunner().invoke(main, [*args, "--url", url], env={"LORAFLEET_URL": None})
    assert res.exit_code == 0, res.output
    return res.output


def test_cli_sweeps_prints_the_packs(url, packed):
    p = packed
    out = cli(url, "sweeps", p.sid).splitlines()
    first = ", ".join(p.name(j) for j in p.ids if j in p.first)
    second = ", ".join(p.name(j) for j in p.ids if j in p.second)
    assert out[1:4] == ["pack: auto (size: as the card fits)",
                        f"pack 1: 2 trials on {WORKER}: {first}",
                        f"pack 2: 2 trials on {WORKER}: {second} (training)"]
    assert out[4].split() == ["JOB", "STATE", "LOSS", "EVAL", "PPL", "PACK", "TRIAL"]
    packs = {line.split()[0]: line.split()[-2] for line in out[5:]}
    assert packs == {**{j: "1" for j in p.first}, **{j: "2" for j in p.second}}


def test_cli_status_names_the_trials_a_trial_trained_with(url, packed):
    p = packed
    a, b = p.first
    out = cli(url, "status", a)
    assert f"sweep: {p.sid}\n" in out
    assert f"trained together with: {p.name(b)} ({b}) (pack 1)\n" in out
    alone = p.store.create("train", {**BASE, "lora_name": "solo"}, "ada")
    assert "trained together" not in cli(url, "status", alone)


def test_cli_sweeps_of_a_sweep_without_packs(url, store, settings):
    sid = SweepStore(store).create(parse_sweep({**DEF, "pack": "off"}, settings.paths), "ada")
    out = cli(url, "sweeps", sid).splitlines()
    assert out[1] == "pack: off" and out[2].startswith("JOB")
    assert {line.split()[-2] for line in out[3:]} == {"-"}
    assert sorted(line.split()[-1] for line in out[3:]) == sorted(NAMES)


def test_cli_sweeps_counts_cancelled_trials(url, store, settings):
    """A trial cancelled by its user is counted where the sweep's counts are printed: the
    sweep's first line and the list's CANC column (they had no word for it)."""
    sweeps = SweepStore(store)
    sid = sweeps.create(parse_sweep({**DEF, "pack": "off"}, settings.paths), "ada")
    store.cancel(sweeps.get(sid)["trials"][0]["job"])
    first = cli(url, "sweeps", sid).splitlines()[0]
    assert first.endswith("0 succeeded, 0 failed, 0 stopped early, 1 cancelled"), first
    listing = cli(url, "sweeps").splitlines()
    assert listing[0].split() == ["ID", "STATE", "TRIALS", "OK", "FAIL", "STOP", "CANC", "NAME"]
    row = next(line.split() for line in listing[1:] if line.startswith(sid))
    assert row[3:7] == ["0", "0", "0", "1"]
