"""A small client for the dashboard's REST API: what the user commands of the CLI use.

A remote user needs the dashboard's URL and, where the dashboard has accounts, an API token
($LORAFLEET_TOKEN, made with `lorafleet user token NAME`), never Redis credentials. With no
LORAFLEET_TOKEN, the OS user who runs a single-user fleet needs nothing: the client reads the
dashboard token that belongs to the URL (dispatcher/access/dashtoken.py) and sends it to that URL only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import requests

from dispatcher.jobs.states import TERMINAL_VALUES
from dispatcher.settings import api_token

# Jobs asked for per request when listing them all (the API allows up to 1000).
JOBS_PAGE_SIZE = 500


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str, errors: list[dict[str, str]] | None = None):
        self.status = status
        self.errors = errors or []
        super().__init__(message)


def _is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    from dispatcher.access.accounts import is_loopback

    return is_loopback(urlsplit(url).hostname or "")


class ListenerNotOurs(ApiError):
    """Another OS user's socket listens where the data folder's dashboard token would go."""


class Client:
    def __init__(self, url: str, timeout: float = 30.0, token: str | None = None):
        self.url = url
        self.base = url.rstrip("/") + "/api/v1"
        self.timeout = timeout
        self.session = requests.Session()
        if _is_loopback_url(url):
            # This machine's dashboard: never through an http_proxy of the environment, which
            # would take the request (and its token) elsewhere; the listener check below is
            # about the socket at this address.
            self.session.trust_env = False
        self.token_source = "argument" if token else ""
        if not token and api_token():
            token, self.token_source = api_token(), "LORAFLEET_TOKEN"
        if not token:
            from dispatcher.access.dashtoken import token_for

            token = token_for(url)
            self.token_source = "dashboard token" if token else ""
        # A token the user gave (argument, LORAFLEET_TOKEN) goes where the user pointed it. The
        # data folder's own token goes only to this OS user's listener, checked before every
        # request (see _auth), not once: the dashboard may restart during `submit --wait` or
        # `logs -f`, and another account may take its port meanwhile.
        self.token = token or ""

    def _auth(self) -> dict[str, str]:
        """The Authorization header for the next request ({} when there is no token)."""
        if not self.token:
            return {}
        if self.token_source == "dashboard token":
            from dispatcher.access.dashtoken import listener_is_mine

            if not listener_is_mine(self.url):
                self.token, self.token_source = "", ""  # never again from this client
                raise ListenerNotOurs(0, f"another OS user's program now listens at {self.url} "
                                         "(the dashboard stopped and its port was taken): the "
                                         "data folder's dashboard token was not sent. Restart "
                                         "the fleet with `lorafleet up` (on a free port if need "
                                         "be: LORAFLEET_PORT) and run the command again")
        return {"Authorization": f"Bearer {self.token}"}

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        headers = {**kw.pop("headers", {}), **self._auth()}
        try:
            resp = self.session.request(method, self.base + path, timeout=self.timeout,
                                        headers=headers, **kw)
        except requests.ConnectionError as e:
            raise ApiError(0, f"cannot reach the dashboard at {self.base}: is `lorafleet up` "
                              "running there? (set --url or LORAFLEET_URL)") from e
        except requests.Timeout as e:  # connected, and no answer in time (a stuck dashboard)
            maybe = ("" if method == "GET" else ": it may have done it all the same; look (e.g. "
                     "`lorafleet status`, `lorafleet sweeps`) before asking again")
            raise ApiError(0, f"the dashboard at {self.base} did not answer within "
                              f"{self.timeout:g} s{maybe}") from e
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:300]}
        if resp.status_code >= 400:
            errors = body.get("errors") if isinstance(body, dict) else None
            msg = body.get("error") if isinstance(body, dict) else None
            if resp.status_code == 401:
                msg = f"{msg or 'not logged in'}\n{self._token_hint()}"
            raise ApiError(resp.status_code, msg or f"HTTP {resp.status_code}", errors)
        return body

    def _token_hint(self) -> str:
        if self.token_source == "LORAFLEET_TOKEN":
            return "LORAFLEET_TOKEN was sent and refused: is it a current token of this dashboard?"
        if self.token_source == "dashboard token":
            return ("the data folder's dashboard token was sent and refused: with accounts, set "
                    "LORAFLEET_TOKEN to a token made with `lorafleet user token NAME`")
        return ("no token was found for this URL: run the command as the OS user who started "
                "the fleet (from its data folder, or with LORAFLEET_HOME set to it), or set "
                "LORAFLEET_TOKEN (with accounts: `lorafleet user token NAME`)")

    # data files -----------------------------------------------------------------------------
    def data_files(self) -> dict[str, Any]:
        """The data folder's datasets, format files (own and shipped) and raw texts."""
        return self._call("GET", "/datasets")

    def upload(self, path: str, kind: str = "", overwrite: bool = False) -> dict[str, Any]:
        """Upload a dataset, format file or raw text; the dashboard checks it in full first.
        `kind` is guessed from the name when empty."""
        with open(path, "rb") as handle:
            return self._call("POST", "/datasets",
                              files={"file": (os.path.basename(path), handle)},
                              data={"kind": kind, "overwrite": "yes" if overwrite else "no"})

    def format_file(self, name: str, source: str = "") -> dict[str, Any]:
        """A format file's listing entry with its `templates`."""
        return self._call("GET", f"/formats/{name}", params={"source": source} if source else None)

    def copy_format(self, source_name: str, new_name: str, overwrite: bool = False,
                    source: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"from": source_name, "name": new_name, "overwrite": overwrite}
        if source:
            body["source"] = source
        return self._call("POST", "/formats/copy", json=body)

    def submit(self, spec: dict[str, Any], kind: str = "train", priority: str = "normal",
               owner: str | None = None) -> str:
        body: dict[str, Any] = {"kind": kind, "spec": spec, "priority": priority}
        if owner:
            body["owner"] = owner
        return self._call("POST", "/jobs", json=body)["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}")

    def job_patiently(self, job_id: str) -> dict[str, Any]:
        """`job`, waiting out a dashboard that does not answer or answers 5xx (a restart, its
        Redis away) for FOLLOW_PATIENCE_S, as `follow` does; other refusals at once."""
        since = time.monotonic()
        while True:
            try:
                return self.job(job_id)
            except ListenerNotOurs:
                raise
            except ApiError as e:
                if not (e.status == 0 or e.status >= 500) or \
                        time.monotonic() - since > FOLLOW_PATIENCE_S:
                    raise
            time.sleep(0.5)

    def jobs_page(self, limit: int = JOBS_PAGE_SIZE, offset: int = 0, owner: str | None = None,
                  state: str | None = None, before: str | None = None) -> dict[str, Any]:
        """One page of the job list, newest first: {"jobs", "total", "limit", "offset"}.

        `owner` and `state` may be comma-separated lists; the dashboard filters before paging,
        so `total` counts every match. `before` (a job id) starts just after that job."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if before:
            params["before"] = before
        if owner:
            params["owner"] = owner
        if state:
            params["state"] = state
        return self._call("GET", "/jobs", params=params)

    def jobs(self, owner: str | None = None, state: str | None = None,
             page_size: int = JOBS_PAGE_SIZE) -> list[dict[str, Any]]:
        """Every job that matches, newest first, fetched a page at a time. Each page starts
        after the last job of the one before (not at an offset), so jobs submitted, or leaving
        the filter, while the list is read shift nothing out of it."""
        out: list[dict[str, Any]] = []
        before = None
        while True:
            page = self.jobs_page(page_size, 0, owner, state, before)
            out.extend(page["jobs"])
            if len(page["jobs"]) < page_size:
                return out
            before = page["jobs"][-1]["id"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def set_priority(self, job_id: str, level: str) -> dict[str, Any]:
        """A queued (or retrying) job's new priority; the answer has its queue position."""
        return self._call("POST", f"/jobs/{job_id}/priority", json={"priority": level})

    def lora_parameters(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/loras/{name}/parameters")["spec"]

    def lora_info(self, name: str, always_override: bool = False) -> dict[str, Any]:
        """What is under a LoRA name and the line to print before a job writes it."""
        return self._call("GET", f"/loras/{name}", params={
            "always_override": "1" if always_override else "0", "hint": "spec"})

    # sweeps (README, "Sweeps")
    def create_sweep(self, definition: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Queue a sweep ({id, count, trials, skipped}); with dry_run only the trial list."""
        return self._call("POST", "/sweeps", json=definition,
                          params={"dry_run": "1"} if dry_run else None)

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._call("GET", f"/sweeps/{sweep_id}")

    def sweeps(self) -> list[dict[str, Any]]:
        return self._call("GET", "/sweeps")["sweeps"]

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return self._call("POST", f"/sweeps/{sweep_id}/cancel")

    # per-user limits (README, "Limits")
    def limits(self) -> dict[str, Any]:
        """Your effective limits ({"user", "limits", "waiting"}); admins also get "settings"
        and "defaults"."""
        return self._call("GET", "/limits")

    def set_limit(self, name: str, value: int | None, user: str = "*") -> dict[str, Any]:
        """Set limit `name` for `user` ("*" = everyone); None unsets it. Admins only."""
        return self._call("POST", "/limits", json={"name": name, "value": value, "user": user})

    def workers(self) -> list[dict[str, Any]]:
        return self._call("GET", "/workers")["workers"]

    def history(self, job_id: str, after: str | None = None) -> list[dict[str, Any]]:
        """The job's stored events, oldest first (only those after stream id `after`)."""
        params = {"format": "json"}
        if after:
            params["after"] = after
        return self._call("GET", f"/jobs/{job_id}/events", params=params)

    def follow(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every event of the job, history first, then live until the job ends (SSE).

        A dashboard restarting (no answer), a dashboard whose Redis is away (its stream ends
        `interrupted`, its API answers 503) and a proxy's 5xx are waited out, reconnecting
        from the last event id, for FOLLOW_PATIENCE_S from the moment it went: "down", not
        the end of the job. Other refusals (404, 401, 429, another user's listener) end it."""
        last_id = None
        down_since: float | None = None

        def wait_out(what: str) -> None:
            nonlocal down_since
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > FOLLOW_PATIENCE_S:
                raise ApiError(0, f"{what} for more than {FOLLOW_PATIENCE_S:g} s while "
                                  f"following job {job_id}")
            time.sleep(0.5)

        while True:
            headers = {"Accept": "text/event-stream", **self._auth()}  # checked at each reconnect
            if last_id:
                headers["Last-Event-ID"] = last_id
            down = ""
            try:
                with self.session.get(f"{self.base}/jobs/{job_id}/events", headers=headers,
                                      stream=True, timeout=(10, 60)) as resp:
                    if resp.status_code == 404:
                        raise ApiError(404, f"no job {job_id}")
                    if resp.status_code == 429:  # the dashboard's cap on live views
                        raise ApiError(429, resp.json().get("error", "too many live views"))
                    if resp.status_code >= 500:
                        down = f"the dashboard at {self.base} answered HTTP {resp.status_code}"
                    else:
                        resp.raise_for_status()
                        for eid, name, data in _parse_sse(resp.iter_lines(decode_unicode=True)):
                            if name == "end":
                                return
                            if name == "interrupted":  # its Redis went: not an event of the job
                                down = f"the dashboard at {self.base} lost its Redis"
                                break
                            if eid:
                                last_id = eid
                            if data:
                                down_since = None  # back: a later outage gets its own patience
                                yield json.loads(data)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.ReadTimeout):
                down = f"lost the dashboard at {self.base}"
            if down:
                wait_out(down)
                continue
            try:
                state = self.job(job_id)["state"]
            except ListenerNotOurs:
                raise
            except ApiError as e:
                if e.status == 0 or e.status >= 500:
                    wait_out(f"the dashboard at {self.base} could not tell the job's state ({e})")
                    continue
                raise
            down_since = None
            if state in TERMINAL_VALUES and last_id:
                # The stream ended without an end marker: drain once more, then stop.
                yield from self.history(job_id, after=last_id)
                return


# How long `follow` waits for a dashboard it lost (a restart) before it gives up.
FOLLOW_PATIENCE_S = 120.0


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str | None, str]]:
    eid: str | None = None
    name: str | None = None
    data: list[str] = []
    for line in lines:
        if line is None:
            continue
        if line == "":
            if data or name:
                yield eid, name, "\n".join(data)
            eid, name, data = None, None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                eid = value
            elif field == "event":
                name = value
            elif field == "data":
                data.append(value)
