"""The CLI's user commands over real HTTP: the real dashboard app served on a loopback port,
a real Redis behind it, and `lorafleet` run as a user would (`status`, `logs`, `--url`)."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from dispatcher.cli import main
from dispatcher.cli.client import JOBS_PAGE_SIZE, ApiError, Client
from dispatcher.host.embedded import free_port
from dispatcher.jobs.events import EventLog
from dispatcher.jobs.states import JobState
from dispatcher.jobs.store import JobStore
from dispatcher.settings import Settings
from tests.appclient import serve_dashboard
from tests.clock import many_jobs

N_JOBS = 520  # more than the API's default page (200) and more than one page of the client


@pytest.fixture
def url(tmp_path, redis_server, prefix, monkeypatch):
    """The dashboard, served over HTTP on a free loopback port for this test; the CLI runs as
    the OS user who owns its data folder (LORAFLEET_HOME and PORT set: it reads the token)."""
    s = Settings(home=tmp_path / "home", redis_url=redis_server, prefix=prefix)
    s.paths.ensure()
    yield from serve_dashboard(s, monkeypatch)


@pytest.fixture
def jobs(redis_client, prefix):
    """520 jobs, one a second, newest first: every 4th is ada's, every 10th has succeeded."""
    return many_jobs(redis_client, prefix, N_JOBS)


def cli(*args: str, env: dict[str, str | None] | None = None):
    # LORAFLEET_URL unset unless a test sets it, so only the --url under test picks the dashboard.
    return CliRunner().invoke(main, list(args), env={"LORAFLEET_URL": None, **(env or {})})


def listed(output: str) -> list[str]:
    return [j["id"] for j in json.loads(output)]


def test_status_lists_every_job_past_the_first_page(url, jobs):
    _, newest = jobs
    assert N_JOBS > JOBS_PAGE_SIZE
    res = cli("status", "--json", "--url", url)
    assert res.exit_code == 0, res.output
    assert listed(res.stdout) == newest
    table = cli("status", "--url", url).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "STATE", "OWNER"]
    assert [line.split()[0] for line in table[1:]] == newest


def test_status_filters_by_owner_and_state_on_the_dashboard(url, jobs):
    store, newest = jobs
    owner = {j: store.get(j)["owner"] for j in newest}
    state = {j: store.get(j)["state"] for j in newest}
    res = cli("status", "--json", "--owner", "ada", "--url", url)
    assert res.exit_code == 0, res.output
    assert listed(res.stdout) == [j for j in newest if owner[j] == "ada"]
    assert len(listed(res.stdout)) == N_JOBS // 4
    res = cli("status", "--json", "--owner", "ada", "--state", "succeeded", "--url", url)
    assert listed(res.stdout) == [j for j in newest
                                  if owner[j] == "ada" and state[j] == "succeeded"]
    # Comma-separated lists, as the API takes them.
    res = cli("status", "--json", "--state", "queued,succeeded", "--owner", "bo,ada",
              "--url", url)
    assert listed(res.stdout) == newest
    res = cli("status", "--json", "--owner", "nobody", "--url", url)
    assert res.exit_code == 0 and json.loads(res.stdout) == []


def test_status_refuses_an_unknown_state_or_filters_with_a_job(url, jobs):
    res = cli("status", "--state", "done", "--url", url)
    assert res.exit_code == 2 and res.stdout == ""
    assert "--state" in res.stderr and "done: use queued, assigned, running" in res.stderr
    res = cli("status", jobs[1][0], "--owner", "ada", "--url", url)
    assert res.exit_code == 2 and "give them without a JOB" in res.stderr


def test_client_pages_through_a_filtered_list(url, jobs):
    store, newest = jobs
    ada = [j for j in newest if store.get(j)["owner"] == "ada"]
    client = Client(url)
    # 130 matches in pages of 50: three requests, the last one short.
    assert [j["id"] for j in client.jobs(owner="ada", page_size=50)] == ada
    page = client.jobs_page(limit=50, offset=100, owner="ada")
    assert page["total"] == len(ada) and [j["id"] for j in page["jobs"]] == ada[100:]
    assert [j["id"] for j in client.jobs(page_size=1000)] == newest


def test_jobs_leaving_the_filter_while_the_list_is_read_shift_nothing_out(url, jobs):
    """Reading queued jobs page by page while some on the first page are cancelled: the next
    page starts after the last job read, so none of the still-queued ones is skipped (an offset
    would have moved past three of them)."""
    store, newest = jobs
    queued = [j for j in newest if store.get(j)["state"] == "queued"]
    client = Client(url)
    first = client.jobs_page(limit=50, state="queued")["jobs"]
    assert [j["id"] for j in first] == queued[:50]
    for job_id in queued[10:13]:
        store.cancel(job_id, "changed my mind")
    second = client.jobs_page(limit=50, state="queued", before=first[-1]["id"])["jobs"]
    assert [j["id"] for j in second] == queued[50:100]
    by_offset = client.jobs_page(limit=50, offset=50, state="queued")["jobs"]
    assert [j["id"] for j in by_offset] == queued[53:103]  # what offsets would have done
    with pytest.raises(ApiError, match="before: there is no job nosuchjob0000") as refused:
        client.jobs_page(limit=5, before="nosuchjob0000", state="queued")
    assert refused.value.status == 400


def test_url_before_or_after_the_command(url, jobs):
    _, newest = jobs
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["--url", url, "status", "--json"],          # before the command
                 ["status", "--json", "--url", url],          # after it, as before
                 ["--url", dead, "status", "--json", "--url", url]):  # the command's own wins
        res = cli(*args)
        assert res.exit_code == 0, (args, res.output)
        assert listed(res.stdout) == newest, args
    res = cli("--url", url, "status", "--url", dead)
    assert res.exit_code == 2 and f"cannot reach the dashboard at {dead}/api/v1" in res.stderr
    # Without any --url, $LORAFLEET_URL; a --url before the command beats it.
    res = cli("status", "--json", env={"LORAFLEET_URL": url})
    assert res.exit_code == 0 and listed(res.stdout) == newest
    res = cli("--url", dead, "status", env={"LORAFLEET_URL": url})
    assert res.exit_code == 2 and dead in res.stderr


def test_logs_reads_the_history_list(url, redis_client, prefix):
    store = JobStore(redis_client, prefix)
    events = EventLog(redis_client, prefix)
    job = store.create("train", {"lora_name": "x"}, "local")
    store.transition(job, JobState.ASSIGNED, "placed", worker="w0")
    store.transition(job, JobState.RUNNING, "started")
    for step in (1, 2):
        events.append(job, "train", step=step, total_steps=2, loss=2.0 - step / 4)
    events.append(job, "log", line="saving the LoRA")
    store.transition(job, JobState.SUCCEEDED, "done")
    res = cli("--url", url, "logs", job)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "state: queued (submitted)", "state: assigned (placed)", "state: running (started)",
        "step 1/2 loss 1.7500", "step 2/2 loss 1.5000", "saving the LoRA",
        "state: succeeded (done)"]


def test_visible_cards_reads_cuda_visible_devices_as_cuda_does():
    from dispatcher.host.gpus import visible_cards

    cards = {0: "GPU-aaaa-1111", 1: "GPU-bbbb-2222", 2: "GPU-bbbc-3333"}
    assert visible_cards(cards, None) == [0, 1, 2]
    assert visible_cards(cards, "") == [] and visible_cards(cards, " ") == []
    assert visible_cards(cards, "2,0") == [2, 0]
    assert visible_cards(cards, "GPU-bbbb-2222,GPU-aaaa") == [1, 0]
    # An ambiguous prefix or a missing card ends the list there, as CUDA does.
    assert visible_cards(cards, "0,GPU-bbb,1") == [0]
    assert visible_cards(cards, "1,7,2") == [1]
    assert visible_cards({}, "0") == []


def test_the_cli_offers_the_queues_priorities_in_rank_order():
    from dispatcher.cli.common import PRIORITIES
    from dispatcher.jobs.store import PRIORITIES as RANKS

    assert list(PRIORITIES) == sorted(RANKS, key=RANKS.__getitem__)


# data files through the dashboard ------------------------------------------------------------


def test_data_upload_list_show_and_copy_a_format(url, tmp_path):
    from formats import SHIPPED_DIR

    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Count", "output": "1 2"}]
    good = tmp_path / "greetings.json"
    good.write_text(json.dumps(rows))
    res = cli("data", "upload", str(good), "--url", url)
    assert res.exit_code == 0, res.output
    assert res.stdout == "saved datasets/greetings.json (dataset, 2 rows)\n"
    # The same name again needs --overwrite; nothing changes without it.
    res = cli("data", "upload", str(good), "--url", url)
    assert res.exit_code == 2 and "already exists" in res.stderr and res.stdout == ""
    assert cli("data", "upload", str(good), "--overwrite", "--url", url).stdout.startswith(
        "replaced datasets/greetings.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": ["x"], "output": "y"}]')
    res = cli("data", "upload", str(bad), "--url", url)
    assert res.exit_code == 2 and "row 2: key 'instruction' is a list" in res.stderr

    res = cli("data", "show-format", "alpaca-format", "--json", "--url", url)
    assert res.exit_code == 0, res.output
    shipped = json.loads((SHIPPED_DIR / "alpaca-format.json").read_text())
    assert json.loads(res.stdout) == shipped
    assert list(json.loads(res.stdout)) == list(shipped)  # the order rows are matched in

    res = cli("data", "copy-format", "alpaca-format", "my-alpaca", "--url", url)
    assert res.exit_code == 0, res.output
    assert res.stdout == "copied alpaca-format to formats/my-alpaca.json\n"
    res = cli("data", "copy-format", "alpaca-format", "my-alpaca", "--url", url)
    assert res.exit_code == 2 and "already exists" in res.stderr
    res = cli("data", "copy-format", "alpaca-format", "../evil", "--url", url)
    assert res.exit_code == 2 and "name" in res.stderr

    res = cli("data", "list", "--url", url)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(ln.split()[:3] == ["greetings.json", "2", "rows"] for ln in lines)
    assert any(ln.split()[:2] == ["my-alpaca", "user"] for ln in lines)
    assert any(ln.split()[:2] == ["alpaca-format", "shipped"] for ln in lines)
    assert "bad.json" not in res.stdout
    res = cli("data", "show-format", "my-alpaca", "--url", url)
    assert res.stdout.startswith("my-alpaca (user: my-alpaca.json)\n")
    assert "[instruction,output]" in res.stdout


def test_an_http_proxy_in_the_environment_never_gets_this_machines_dashboard(url, monkeypatch):
    """On a proxied machine (http_proxy set, no no_proxy), the CLI still talks straight to the
    loopback dashboard: the proxy would otherwise get the request and the data folder's token."""
    with socket.socket() as dead:  # a proxy that is not there: any use fails
        dead.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(name, proxy)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        assert Client(url).workers() == []


class _FlakyProxy:
    """A reverse proxy in front of the dashboard, as a user's nginx would be: while `bad` is
    set it answers every request 502 (its upstream is restarting), else it passes the request
    on and streams the answer back as it comes."""

    def __init__(self, upstream: str):
        import http.server
        import threading

        import requests

        proxy = self
        self.bad = True
        self.refused = 0
        self.streams: list = []  # the connections it is streaming an answer on

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if proxy.bad:
                    proxy.refused += 1
                    body = b"<html>502 Bad Gateway</html>"
                    self.send_response(502)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                keep = ("authorization", "accept", "last-event-id")
                with requests.get(upstream + self.path, stream=True, timeout=30,
                                  headers={k: v for k, v in self.headers.items()
                                           if k.lower() in keep}) as up:
                    self.send_response(up.status_code)
                    self.send_header("Content-Type", up.headers.get("Content-Type", ""))
                    self.end_headers()
                    proxy.streams.append(self.connection)
                    try:
                        for chunk in up.iter_content(chunk_size=None):
                            self.wfile.write(chunk)
                            self.wfile.flush()
                    except OSError:  # cut by drop()
                        pass

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def drop(self) -> None:
        """Cut every answer it is streaming (the upstream went away mid-answer)."""
        import socket

        for conn in self.streams:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.streams.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _until(what, seconds: float = 10) -> None:
    """Wait up to `seconds` for `what()` to hold, then assert it."""
    import time

    deadline = time.monotonic() + seconds
    while not what() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert what()


def test_follow_waits_out_a_proxys_5xx(url, redis_client, prefix, tmp_path):
    """review15 M1: a 502 from a proxy in front of a restarting dashboard is "down" for
    FOLLOW_PATIENCE_S, as a refused connection is, not the end of following the job."""

    store, job, proxy, got, failed, follower = _follow_through_proxy(
        url, redis_client, prefix, tmp_path, total_steps=2)
    try:
        _until(lambda: proxy.refused >= 3)
        assert follower.is_alive() and not failed
        proxy.bad = False
        store.events.append(job, "train", step=2, total_steps=2, loss=0.5)
        store.transition(job, JobState.SUCCEEDED, "finished", expect_worker="w1")
        follower.join(30)
    finally:
        proxy.close()
    assert not follower.is_alive() and not failed, failed
    assert [e["step"] for e in got if e["type"] == "train"] == [1, 2]
    assert [e["state"] for e in got if e["type"] == "state"][-1] == "succeeded"


def test_follow_gives_each_outage_its_own_patience(url, redis_client, prefix, tmp_path,
                                                  monkeypatch):
    """A second outage, later than the patience after the first, is waited out too: the
    patience counts from when the dashboard went this time, not from the first time."""
    import time

    from dispatcher.cli import client as client_module

    monkeypatch.setattr(client_module, "FOLLOW_PATIENCE_S", 2.0)
    store, job, proxy, got, failed, follower = _follow_through_proxy(
        url, redis_client, prefix, tmp_path, total_steps=3)

    try:
        _until(lambda: proxy.refused >= 2)  # the first outage
        proxy.bad = False
        _until(lambda: proxy.streams)
        store.events.append(job, "train", step=2, total_steps=3, loss=0.7)
        time.sleep(3)  # longer than the patience since the first outage began
        proxy.bad = True  # the second outage: the open stream is cut, reconnects get 502
        refused = proxy.refused
        proxy.drop()
        _until(lambda: proxy.refused >= refused + 2)
        assert follower.is_alive() and not failed, failed
        proxy.bad = False
        store.events.append(job, "train", step=3, total_steps=3, loss=0.5)
        store.transition(job, JobState.SUCCEEDED, "finished", expect_worker="w1")
        follower.join(30)
    finally:
        proxy.close()
    assert not follower.is_alive() and not failed, failed
    assert [e["step"] for e in got if e["type"] == "train"] == [1, 2, 3]

def test_the_state_after_following_waits_out_an_outage_too(url, redis_client, prefix,
                                                           tmp_path):
    """`submit --wait` asks the job's state once more when its stream ended without a state
    event: that question, too, waits out a proxy's 502 (Client.job_patiently), where a plain
    `job` would end the command with an error; a job that does not exist is said at once."""
    import threading

    from dispatcher.access.dashtoken import read_token

    store = JobStore(redis_client, prefix)
    job = store.create("train", {"lora_name": "asked"}, "local")
    proxy = _FlakyProxy(url)
    client = Client(proxy.url, token=read_token(tmp_path / "home"))
    got: list = []
    asker = threading.Thread(target=lambda: got.append(client.job_patiently(job)), daemon=True)
    try:
        asker.start()
        _until(lambda: proxy.refused >= 3)
        assert asker.is_alive() and not got
        proxy.bad = False
        asker.join(10)
        assert got and got[0]["state"] == "queued"
        with pytest.raises(ApiError) as e:
            client.job_patiently("nosuchjob")
        assert e.value.status == 404
    finally:
        proxy.close()


def test_a_dashboard_that_never_answers_is_waited_out_then_named(monkeypatch):
    """A dashboard that takes the connection and never answers (stuck) is an outage to wait
    out, like one that refuses it: job_patiently keeps asking for FOLLOW_PATIENCE_S, then
    ends with a message naming it, not a traceback (review15c L3)."""
    import threading
    import time

    from dispatcher.cli import client as client_module

    monkeypatch.setattr(client_module, "FOLLOW_PATIENCE_S", 2.0)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        held: list = []

        def accept() -> None:
            while True:
                try:
                    held.append(srv.accept()[0])  # never answers
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        client = Client(f"http://127.0.0.1:{srv.getsockname()[1]}", token="t", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ApiError) as e:
            client.job_patiently("j1")
        assert time.monotonic() - started >= 2.0 and len(held) >= 2
        assert e.value.status == 0 and "did not answer within 0.5 s" in str(e.value)
        for conn in held:
            conn.close()


def _follow_through_proxy(url, redis_client, prefix, tmp_path, total_steps: int):
    """A running job with its first step, and a thread following it through a _FlakyProxy
    (answering 502 until told otherwise): (store, job, proxy, events got, errors, thread)."""
    import threading

    from dispatcher.access.dashtoken import read_token

    store = JobStore(redis_client, prefix)
    job = store.create("train", {"lora_name": "followed"}, "local")
    store.transition(job, JobState.ASSIGNED, "a", worker="w1", attempt=1)
    store.transition(job, JobState.RUNNING, "r")
    store.events.append(job, "train", step=1, total_steps=total_steps, loss=1.0)
    proxy = _FlakyProxy(url)
    got: list[dict] = []
    failed: list[BaseException] = []

    def follow() -> None:
        try:
            got.extend(Client(proxy.url, token=read_token(tmp_path / "home")).follow(job))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            failed.append(e)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    return store, job, proxy, got, failed, follower
