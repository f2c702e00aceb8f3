"""Hypothesis strategies for hostile requests, and the route table: for every rule and method of
the dashboard's url_map, the query names and the body its view reads.

A request is drawn step by step (`draw_request`): who sends it (a token, a browser session with a
right, missing, wrong or another session's CSRF token, nobody, a wrong token), the method, the
path parameters (real ids and names of the seeded fleet, or path tricks), the query, the body
(a JSON object of the view's own keys with odd values, any JSON value, truncated or deeply
nested JSON, binary, a form, a multipart upload, nothing) and extra headers.

`ROUTES` must name every route of the app: tests/fuzz/test_routes.py fails for a route that has
no entry here (a new route is fuzzed from the day it is added) and for an entry no route has.
"""

from __future__ import annotations

import dataclasses
import io
import json
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from dispatcher.access.limits import DEFAULTS as LIMIT_NAMES
from dispatcher.jobs.specs import SPEC_CLASSES, upper_bound
from dispatcher.jobs.store import KINDS, PRIORITIES
from dispatcher.schedule.sweeps.plan import EARLY_KEYS, EVAL_KEYS, TOP_KEYS
from tests.fuzz.harness import IDENTITIES, Fleet, Req

# -- values -------------------------------------------------------------------------------------
ODD_STRINGS = (
    "", " ", "\x00", "a\x00b", "\u202e", "\ufeff", "\ud800", "x\udfffy", "💥", "é", "e\u0301",
    "null", "None", "true", "NaN", "-1", "0", "1e309", "0x10", "  7  ", "<script>alert(1)</script>",
    "{{7*7}}", "%s%n", "' OR 1=1 --", "\r\n", "\t", "=cmd|' /C calc'!A0", "x" * 300,
    "é" * 200, "\U0010ffff", "\x7f", "a" * 65, "ana ", "Ana", "*", "bo,cy",
)
PATH_TRICKS = (
    "..", "../..", "../.dashboard_token", "../../etc/passwd", "/etc/passwd", "/", ".",
    "./d.json", "d.json/..", "d.json\x00.txt", "datasets/../../x", "..\\..\\x", "C:\\Windows",
    "~", "~/.ssh/id_rsa", "outside.json", "outside.txt", "outside-dir",
    "outside-dir/secret.json", "token-format", "outside-format", "escape", "escape/secret.txt",
    "inside.json", "books", "books/a.txt", "books/../d.json", ".secret_key", ".redis_password",
    "accounts.json", "%2e%2e%2f", "..%2f", "a" * 256, "a/" * 200, "d.json ", " d.json",
    "D.JSON", "d", "CON", "d.json/", "//etc", "\\\\server\\share", "by-hand", "half",
    "leak", "cy-lora/leak", "cy-lora/../..", "\x00", "%00",
)
BIG_NUMBERS = (0, -1, 1, 2, 7, 2**31, 2**32, 2**63, 2**64 + 1, 10**30, -(10**30), 1e308,
               -1e308, 1e-308, 1.5, -0.0, 0.5, 1e-4, float("nan"), float("inf"), float("-inf"))
HUGE_TEXT = "x" * 300_000


def odd_text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(ODD_STRINGS + PATH_TRICKS),
        st.text(st.characters(categories=["Cs", "Co", "Cc", "Zs", "Mn", "Cf"]), max_size=8),
        st.just(HUGE_TEXT),
    )


def json_scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(BIG_NUMBERS),
                     st.floats(), odd_text())


def json_values() -> st.SearchStrategy[Any]:
    return st.recursive(json_scalars(),
                        lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(odd_text(20), inner, max_size=4),
                        max_leaves=12)


def numbers_as_text() -> st.SearchStrategy[str]:
    return st.one_of(st.integers().map(str), st.sampled_from(BIG_NUMBERS).map(str),
                     st.sampled_from(("1e-4", "3e-4", " 4 ", "4.0", "four", "", "١٢", "0b1")))


# -- names of the seeded fleet ------------------------------------------------------------------
def names(fleet: Fleet, what: str) -> list[str]:
    """Real names of the fleet's `what` (so a request reaches past the first check)."""
    return {
        "base_model": ["tiny", "escape"],
        "dataset": ["d.json", "d", "rows.jsonl", "inside.json", "outside.json", "bo-data.json",
                    "cy-data.json"],
        "format": ["alpaca-format", "my-format", "cy-format", "outside-format", "token-format",
                   "chatml-format", "vicuna-format"],
        "text": ["notes.txt", "notes", "books", "cy-notes.txt", "outside.txt", "outside-dir"],
        "lora": sorted(fleet.loras) + ["by-hand", "half", "escape"],
        "user": [*fleet.users, "nobody", "ANA", "bo "],
        "job": sorted(fleet.jobs.values()),
        "sweep": sorted(fleet.sweeps.values()),
        "row": sorted(fleet.eval_rows.values()),
    }[what]


def once(fleet: Fleet, key: Any, make: Any) -> Any:
    """The strategy `make()` builds, built once per fleet (drawing is cheap, building is not)."""
    if key not in fleet.strategies:
        fleet.strategies[key] = make()
    return fleet.strategies[key]


def name_or_trick(fleet: Fleet, what: str) -> st.SearchStrategy[str]:
    return once(fleet, ("name", what), lambda: st.one_of(
        st.sampled_from(names(fleet, what)), st.sampled_from(PATH_TRICKS), odd_text()))


FIELD_NAMES = {  # spec field -> the fleet names it takes
    "base_model": "base_model", "dataset": "dataset", "eval_dataset": "dataset",
    "format": "format", "raw_text_file": "text", "text_file": "text", "lora": "lora",
    "lora_name": "lora",
}


def field_value(fleet: Fleet, kind: str, name: str) -> st.SearchStrategy[Any]:
    """A value for spec field `name`: a good one of its type, its bounds, or anything."""
    f = {x.name: x for x in dataclasses.fields(SPEC_CLASSES[kind])}.get(name)
    good: list[st.SearchStrategy[Any]] = []
    if name in FIELD_NAMES:
        good.append(name_or_trick(fleet, FIELD_NAMES[name]))
    if name == "loras":
        good.append(st.lists(name_or_trick(fleet, "lora"), max_size=3))
    if name == "target_modules":
        good.append(st.lists(st.sampled_from(("q_proj", "v_proj", "k_proj", "o_proj", "all",
                                              "gate_proj", "nope")), max_size=4))
    if f is not None:
        choices = f.metadata.get("choices")
        if choices:
            good.append(st.sampled_from(list(choices)))
        most = upper_bound(kind, name)
        if most is not None:
            good.append(st.sampled_from([0, 1, most, most + 1, -1, int(most) * 10]))
        typ = str(f.type)
        if typ == "int":
            good.append(st.integers(-3, 70))
        elif typ == "float":
            good.append(st.floats(-1, 2) | numbers_as_text())
        elif typ == "bool":
            good.append(st.sampled_from((True, False, "true", "yes", 1, 0, "off")))
    return st.one_of(*good, json_values()) if good else json_values()


def base_spec(fleet: Fleet, kind: str, suffix: str) -> dict[str, Any]:
    return {"train": {"lora_name": f"fz-{suffix}", "base_model": "tiny", "dataset": "d.json",
                      "format": "alpaca-format", "epochs": 1},
            "evaluate": {"base_model": "tiny", "text_file": "notes.txt"},
            "generate": {"base_model": "tiny", "prompt": "hello"}}[kind]


def mutated(data: Any, fleet: Fleet, obj: dict[str, Any], keys: list[str],
            value_for: Any, max_changes: int = 4) -> dict[str, Any]:
    """`obj` with a few keys set to drawn values, removed, or added (unknown keys too)."""
    obj = dict(obj)
    for _ in range(data.draw(st.integers(0, max_changes), label="changes")):
        key = data.draw(st.one_of(st.sampled_from(keys), odd_text(20)), label="key")
        if data.draw(st.integers(0, 5)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = data.draw(value_for(key), label=f"value of {key!r}")
    return obj


def spec_body(data: Any, fleet: Fleet, envelope: bool = True) -> Any:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    suffix = data.draw(st.sampled_from(("a", "b", "c", "cy-lora", "bo-queued")), label="suffix")
    spec = base_spec(fleet, kind, suffix)
    keys = [f.name for f in dataclasses.fields(SPEC_CLASSES[kind])]
    spec = mutated(data, fleet, spec, keys, lambda k: field_value(fleet, kind, k))
    if suffix in ("cy-lora", "bo-queued") and kind == "train":
        spec["lora_name"] = suffix  # someone's LoRA
    if not envelope or data.draw(st.integers(0, 4)) == 0:
        return spec  # a bare spec (a training job)
    env = {"kind": kind, "spec": spec,
           "priority": data.draw(st.sampled_from(list(PRIORITIES)) | json_values(), label="priority")}
    return mutated(data, fleet, env, ["kind", "spec", "owner", "priority"],
                   lambda k: st.sampled_from(list(KINDS) + list(fleet.users)) | json_values(),
                   max_changes=2)


def sweep_body(data: Any, fleet: Fleet) -> Any:
    base = base_spec(fleet, "train", data.draw(st.sampled_from(("sw1", "sw2", "cy-sw"))))
    keys = [f.name for f in dataclasses.fields(SPEC_CLASSES["train"])]
    base = mutated(data, fleet, base, keys, lambda k: field_value(fleet, "train", k), 2)
    param = st.sampled_from(keys + ["nope"])
    values = st.one_of(
        st.lists(json_scalars(), max_size=5),
        st.fixed_dictionaries({}, optional={"min": json_scalars(), "max": json_scalars(),
                                            "step": json_scalars(), "log": json_scalars(),
                                            "count": json_scalars(), "values": json_values()}),
        json_values())
    sweep = {"name": "fz-sweep", "base": base, "parameters": {"lora_rank": [4, 8]},
             "method": "grid"}

    def value_for(key: str) -> st.SearchStrategy[Any]:
        if key == "parameters":
            return st.dictionaries(param, values, max_size=3) | json_values()
        if key == "early_stopping":
            return st.fixed_dictionaries({}, optional={k: json_values() for k in EARLY_KEYS}) \
                | st.just({"policy": "asha", "rungs": [1, 2], "reduction_factor": 2})
        if key == "evaluate":
            return st.fixed_dictionaries({}, optional={k: json_values() for k in EVAL_KEYS}) \
                | st.just({"text_file": "notes.txt"})
        if key == "method":
            return st.sampled_from(("grid", "random")) | json_values()
        if key == "base_job":
            return name_or_trick(fleet, "job")
        if key == "owner":
            return st.sampled_from(list(fleet.users)) | json_values()
        if key == "pack":
            return st.sampled_from(("auto", "off")) | json_values()
        return st.integers(-2, 20) | json_values()

    return mutated(data, fleet, sweep, list(TOP_KEYS), value_for)


def keyed(spec: dict[str, Any]) -> Any:
    """A body of the view's own keys: each drawn from its strategy, some left out, some added."""
    def make(data: Any, fleet: Fleet) -> Any:
        out = {}
        for key, strat in spec.items():
            if data.draw(st.integers(0, 4), label=f"leave out {key}") != 0:
                out[key] = data.draw(strat(fleet), label=key)
        if data.draw(st.integers(0, 5)) == 0:
            out[data.draw(odd_text(20), label="extra key")] = data.draw(json_values())
        return out
    return make


def _users(fleet: Fleet) -> st.SearchStrategy[Any]:
    return name_or_trick(fleet, "user") | json_values()


BODIES: dict[str, Any] = {
    "spec": lambda data, fleet: spec_body(data, fleet),
    "estimate": lambda data, fleet: spec_body(data, fleet),
    "sweep": sweep_body,
    "priority": keyed({"priority": lambda f: st.sampled_from(list(PRIORITIES)) | json_values()}),
    "comment": keyed({"comment": lambda f: odd_text() | json_values()}),
    "copy_format": keyed({
        "from": lambda f: name_or_trick(f, "format") | json_values(),
        "name": lambda f: name_or_trick(f, "format") | st.sampled_from(("new-format", "x")),
        "overwrite": lambda f: st.sampled_from((True, False, "1", "no", 1, None)),
        "source": lambda f: st.sampled_from(("user", "shipped", "")) | json_values()}),
    "limit": keyed({
        "name": lambda f: st.sampled_from(sorted(LIMIT_NAMES)) | json_values(),
        "value": lambda f: st.sampled_from((None, 0, 1, 5, -1, 10**12, "3", 2.5)) | json_values(),
        "user": _users}),
    "add_user": keyed({
        "name": lambda f: name_or_trick(f, "user") | st.sampled_from(("dee", "e", "fz-user")),
        "role": lambda f: st.sampled_from(("admin", "member", "root")) | json_values(),
        "password": lambda f: st.sampled_from(("short", "long enough password 1")) | odd_text()}),
    "role": keyed({"role": lambda f: st.sampled_from(("admin", "member", "")) | json_values()}),
    "label": keyed({"label": lambda f: odd_text() | json_values()}),
    "none": keyed({}),
}


# -- the route table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RouteFuzz:
    """How to fuzz one route: the query names its view reads, its body (a BODIES key, or
    "upload"/"login"/"token"/"logout" forms), and whether it streams (SSE)."""

    args: tuple[str, ...] = ()
    body: str = "none"


PREVIEW_ARGS = ("model", "base_model", "dataset", "format", "raw_text_file", "cutoff_len",
                "overlap_len", "newline_favor_len", "min_chars", "limit", "hard_cut_string",
                "add_eos_token", "train_only_after")

ROUTES: dict[tuple[str, str], RouteFuzz] = {
    ("GET", "/"): RouteFuzz(("page", "state", "owner")),
    ("GET", "/jobs"): RouteFuzz(("page", "state", "owner")),
    ("GET", "/jobs/new"): RouteFuzz(("from", "from_lora")),
    ("GET", "/jobs/<job_id>"): RouteFuzz(),
    ("GET", "/fleet"): RouteFuzz(),
    ("GET", "/datasets"): RouteFuzz(),
    ("GET", "/evaluations"): RouteFuzz(("from",)),
    ("GET", "/generate"): RouteFuzz(("from", "base_model", "lora")),
    ("GET", "/sweeps"): RouteFuzz(),
    ("GET", "/sweeps/new"): RouteFuzz(("from",)),
    ("GET", "/sweeps/<sweep_id>"): RouteFuzz(),
    ("GET", "/users"): RouteFuzz(),
    ("GET", "/login"): RouteFuzz(("next",)),
    ("POST", "/login"): RouteFuzz(body="login"),
    ("POST", "/logout"): RouteFuzz(body="logout"),
    ("POST", "/token"): RouteFuzz(body="token"),
    ("GET", "/healthz"): RouteFuzz(),
    ("GET", "/static/<path:filename>"): RouteFuzz(),
    ("GET", "/api/v1/me"): RouteFuzz(),
    ("GET", "/api/v1/choices"): RouteFuzz(),
    ("GET", "/api/v1/spec/defaults"): RouteFuzz(),
    ("GET", "/api/v1/workers"): RouteFuzz(),
    ("POST", "/api/v1/jobs"): RouteFuzz(("priority",), "spec"),
    ("GET", "/api/v1/jobs"): RouteFuzz(("limit", "offset", "state", "owner", "before")),
    ("GET", "/api/v1/jobs/<job_id>"): RouteFuzz(),
    ("POST", "/api/v1/jobs/<job_id>/cancel"): RouteFuzz(),
    ("POST", "/api/v1/jobs/<job_id>/priority"): RouteFuzz(body="priority"),
    ("GET", "/api/v1/jobs/<job_id>/events"): RouteFuzz(("after", "format")),
    ("GET", "/api/v1/jobs/<job_id>/lora.zip"): RouteFuzz(("checkpoints",)),
    ("GET", "/api/v1/live"): RouteFuzz(("types",)),
    ("POST", "/api/v1/estimate"): RouteFuzz(body="estimate"),
    ("GET", "/api/v1/loras/<name>"): RouteFuzz(("always_override", "hint")),
    ("GET", "/api/v1/loras/<name>/parameters"): RouteFuzz(),
    ("GET", "/api/v1/limits"): RouteFuzz(),
    ("POST", "/api/v1/limits"): RouteFuzz(body="limit"),
    ("GET", "/api/v1/datasets"): RouteFuzz(),
    ("POST", "/api/v1/datasets"): RouteFuzz(body="upload"),
    ("GET", "/api/v1/datasets/preview"): RouteFuzz(PREVIEW_ARGS),
    ("GET", "/api/v1/formats/<path:name>"): RouteFuzz(("source",)),
    ("POST", "/api/v1/formats/copy"): RouteFuzz(body="copy_format"),
    ("GET", "/api/v1/evaluations"): RouteFuzz(),
    ("POST", "/api/v1/evaluations/<row_id>"): RouteFuzz(body="comment"),
    ("GET", "/api/v1/sweeps"): RouteFuzz(),
    ("POST", "/api/v1/sweeps"): RouteFuzz(("dry_run",), "sweep"),
    ("POST", "/api/v1/sweeps/preview"): RouteFuzz(body="sweep"),
    ("GET", "/api/v1/sweeps/<sweep_id>"): RouteFuzz(("curves",)),
    ("POST", "/api/v1/sweeps/<sweep_id>/cancel"): RouteFuzz(),
    ("GET", "/api/v1/sweeps/<sweep_id>/trials.csv"): RouteFuzz(),
    ("GET", "/api/v1/users"): RouteFuzz(),
    ("POST", "/api/v1/users"): RouteFuzz(body="add_user"),
    ("POST", "/api/v1/users/<name>/remove"): RouteFuzz(),
    ("POST", "/api/v1/users/<name>/role"): RouteFuzz(body="role"),
    ("POST", "/api/v1/users/<name>/token"): RouteFuzz(body="label"),
    ("POST", "/api/v1/users/<name>/token/revoke"): RouteFuzz(),
    ("POST", "/api/v1/users/<name>/unlock"): RouteFuzz(),
}


def app_routes(app: Any) -> list[tuple[str, str]]:
    """Every (method, rule) the app answers, HEAD and OPTIONS left out (Flask adds them)."""
    return sorted({(m, r.rule) for r in app.url_map.iter_rules()
                   for m in r.methods - {"HEAD", "OPTIONS"}})


# -- path parameters, queries, headers ----------------------------------------------------------
STATIC_FILES = ("app.css", "common.js", "vendor/uPlot.min.css", "favicon.svg")


def path_value(data: Any, fleet: Fleet, rule: str, param: str) -> str:
    if param == "job_id":
        pool = names(fleet, "job") + ["0" * 12, "s" + "0" * 11] + names(fleet, "sweep")
    elif param == "sweep_id":
        pool = names(fleet, "sweep") + names(fleet, "job") + ["s" + "0" * 11]
    elif param == "row_id":
        pool = names(fleet, "row") + ["0" * 10]
    elif param == "filename":
        pool = list(STATIC_FILES) + ["../app.py", "../../dispatcher/settings.py", "vendor/.."]
    elif rule.startswith("/api/v1/formats/"):
        pool = names(fleet, "format")
    elif rule.startswith("/api/v1/loras/"):
        pool = names(fleet, "lora")
    else:
        pool = names(fleet, "user")
    return data.draw(once(fleet, ("path", rule, param), lambda: st.sampled_from(pool)
                          | st.sampled_from(PATH_TRICKS) | odd_text()), label=param)


def wire_text(value: str) -> str:
    """`value` as it can travel in UTF-8 (a lone surrogate has no UTF-8 form: U+FFFD)."""
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def quoted(value: str, safe: str = "") -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe=safe)


def arg_value(data: Any, fleet: Fleet, name: str) -> str:
    return data.draw(once(fleet, ("arg", name), lambda: _arg_strategy(fleet, name)),
                     label=f"?{name}")


def _arg_strategy(fleet: Fleet, name: str) -> st.SearchStrategy[str]:
    good = {
        "state": st.sampled_from(("queued", "running", "succeeded,failed", "nope", ",")),
        "owner": name_or_trick(fleet, "user"),
        "before": name_or_trick(fleet, "job"),
        "from": name_or_trick(fleet, "job"),
        "from_lora": name_or_trick(fleet, "lora"),
        "lora": name_or_trick(fleet, "lora"),
        "base_model": name_or_trick(fleet, "base_model"),
        "model": name_or_trick(fleet, "base_model"),
        "dataset": name_or_trick(fleet, "dataset"),
        "format": name_or_trick(fleet, "format") | st.just("json"),
        "raw_text_file": name_or_trick(fleet, "text"),
        "source": st.sampled_from(("user", "shipped", "both")),
        "types": st.sampled_from(("state,train", "x", ",,,")),
        "after": st.sampled_from(("0", "0-0", "1-1", "$", "+", "-", "99999999999999-0")),
        "next": st.sampled_from(("/jobs", "//evil.example/", "https://evil.example/",
                                 "/\t/evil.example", "\\\\evil", "/jobs?x=1", "javascript:x")),
        "priority": st.sampled_from(list(PRIORITIES)),
        "token": st.sampled_from(("x" * 43, "")) | st.just(fleet.dashboard_token),
    }.get(name, st.nothing())
    return good | numbers_as_text() | odd_text()


def query(data: Any, fleet: Fleet, args: tuple[str, ...]) -> bytes:
    if data.draw(st.integers(0, 19)) == 0:  # a query no form makes
        return data.draw(st.sampled_from((b"%zz&&=&a=%00", b"a=%ff%fe", b"&" * 500,
                                          b"token=%00", b"a" * 10000 + b"=1")), label="raw query")
    pairs = []
    for name in args:
        if data.draw(st.integers(0, 2), label=f"send ?{name}") != 0:
            pairs.append((name, arg_value(data, fleet, name)))
    if data.draw(st.integers(0, 4)) == 0:
        extra = data.draw(st.sampled_from(("token", "next", "x", "limit", "format")) |
                          odd_text(10), label="extra arg")
        pairs.append((extra, arg_value(data, fleet, extra)))
    return "&".join(f"{quoted(k)}={quoted(v)}" for k, v in pairs).encode()


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    exclude_characters="\x7f"), max_size=60)
HEADERS = {
    "Accept": st.sampled_from(("application/json", "text/html", "*/*", "")) | HEADER_TEXT,
    "X-CSRF-Token": HEADER_TEXT,
    "X-Lorafleet-User": st.sampled_from(("local", "bo", "cy", "ana", "", " ", "a" * 70,
                                         "bo cy", "../x")) | HEADER_TEXT,
    "Last-Event-ID": st.sampled_from(("0-0", "1-0", "abc", "-1")) | HEADER_TEXT,
    "X-Forwarded-For": st.sampled_from(("1.2.3.4", "evil", "1.2.3.4, 5.6.7.8")) | HEADER_TEXT,
    "X-Forwarded-Proto": st.sampled_from(("https", "gopher")),
    "Authorization": st.sampled_from(("", "Bearer", "Bearer ", "bearer  lf_x", "Basic YTpi",
                                      "Bearer lf_" + "A" * 43, "Bearer " + "x" * 5000))
    | HEADER_TEXT,
    "Cookie": st.sampled_from(("lorafleet_session=x", "lorafleet_session=", "a=b; c")) |
    HEADER_TEXT.map(lambda v: "lorafleet_session=" + v.replace(";", "")),
    "Range": st.just("bytes=0-10"),
    "If-None-Match": st.just("*"),
    "Origin": st.sampled_from(("http://evil.example", "null")),
    "X-Requested-With": st.just("XMLHttpRequest"),
}
HOSTS = ("localhost", "localhost", "localhost", "127.0.0.1", "localhost:8765", "[::1]",
         "evil.example", "127.0.0.1.nip.io", "LOCALHOST")
ADDRESSES = ("127.0.0.1", "127.0.0.1", "10.0.0.7", "::1", "not-an-address")
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


def headers(data: Any) -> list[tuple[str, str]]:
    out = []
    for _ in range(data.draw(st.integers(0, 3), label="headers")):
        name = data.draw(st.sampled_from(sorted(HEADERS)) | st.text(
            string.ascii_letters + "-", min_size=1, max_size=20), label="header")
        value = data.draw(HEADERS.get(name, HEADER_TEXT), label=name)
        if "\r" in value or "\n" in value:
            continue
        out.append((name, value))
    return out


# -- bodies -------------------------------------------------------------------------------------
def raw_json(data: Any, obj: Any) -> bytes:
    """Bytes that a JSON parser meets badly: `obj` cut short, nested too deep, not UTF-8, ..."""
    text = json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")
    choice = data.draw(st.integers(0, 9), label="raw json")
    if choice == 0:
        return text[: data.draw(st.integers(0, max(0, len(text) - 1)), label="cut at")]
    if choice == 1:
        depth = data.draw(st.sampled_from((100, 1000, 5000, 100_000)), label="depth")
        return b"[" * depth + b"]" * depth
    if choice == 2:
        depth = data.draw(st.sampled_from((1000, 50_000)), label="depth")
        return b'{"spec":' * depth + b"1" + b"}" * depth
    if choice == 3:
        return b"\xef\xbb\xbf" + text
    if choice == 4:
        return text.replace(b'"', b"\xff", 1)
    if choice == 5:
        return b'{"epochs": NaN, "lora_rank": Infinity, "kind": "train", "kind": "evaluate"}'
    if choice == 6:
        return b'{"epochs": 1' + b"0" * 5000 + b"}"
    if choice == 7:
        return data.draw(st.binary(max_size=300), label="binary")
    if choice == 8:
        return text.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    return b" " * 1000 + text


CONTENT_TYPES = ("application/json", "application/json", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data",
                 "multipart/form-data; boundary=x", "application/json; charset=utf-16", None)


@dataclass(frozen=True)
class Upload:
    """A multipart upload as sent: the body and its Content-Type, and the file in it."""

    body: bytes
    content_type: str
    content: bytes
    filename: str | None  # None: no file part was sent


def upload_body(data: Any, fleet: Fleet) -> tuple[bytes, str]:
    """A multipart upload's body and Content-Type (see `upload`)."""
    up = upload(data, fleet)
    return up.body, up.content_type


def upload(data: Any, fleet: Fleet, names: tuple[str, ...] = (),
           kinds: tuple[str, ...] = ()) -> Upload:
    """A multipart upload: a file of random bytes or a (broken) data file, odd names and kinds
    (`names`, `kinds`: the file names and kinds to draw from, instead of any)."""
    # (hypothesis's simplest draw is the first choice of each: a good file, sent as `file`)
    rows = [{"instruction": "hi", "output": "yo"}]
    if data.draw(st.integers(0, 5), label="broken json file") == 5:
        content = raw_json(data, rows)
    else:
        content = data.draw(st.one_of(
            st.just(json.dumps(rows).encode()),
            st.binary(max_size=400),
            st.just(json.dumps({"instruction,output": "%instruction% %output%"}).encode()),
            st.just(b"some raw text\n"),
            json_values().map(lambda v: json.dumps(v, allow_nan=True).encode(
                "utf-8", "surrogatepass")),
            st.just(b"\xef\xbb\xbf" + json.dumps(rows).encode()),
            st.just(b"\xff\xfe" + "[]".encode("utf-16-le")),
            st.just(b"\n".join(json.dumps(r).encode() for r in rows * 3)),
            st.just(b""), st.just(b"   \n\t "),
        ), label="file content")
    pick = data.draw(st.integers(0, 9), label="file name from")
    if names:
        filename = data.draw(st.sampled_from(names), label="file name")
    elif pick <= 5:  # a new name (most uploads): what is checked is the content
        n = data.draw(st.integers(0, 10**6), label="n")
        filename = f"fz-{n}" + data.draw(st.sampled_from((".json", ".jsonl", ".txt",
                                                          "-format.json")), label="ext")
    else:
        filename = data.draw(st.one_of(
            st.sampled_from(("fz.json", "fz.jsonl", "fz.txt", "fz-format.json",
                             "fz_format.json", "d.json", "bo-data.json", "cy-data.json",
                             "cy-format.json", "cy-notes.txt", "alpaca-format.json",
                             "outside.json", "inside.json", "books", "fz.JSON", "fz",
                             ".hidden.json", "fz.exe")),
            st.sampled_from(PATH_TRICKS), odd_text(30)), label="file name")
    filename = wire_text(filename)
    form = MultiDict()
    sent = None
    if data.draw(st.integers(0, 9), label="no file") != 9:
        field_name = "file" if data.draw(st.integers(0, 9), label="field name") != 9 else "notfile"
        sent = filename if field_name == "file" else None
        form.add(field_name, FileStorage(io.BytesIO(content), filename=filename,
                                         name=field_name,
                                         content_type="application/octet-stream"))
    some = st.sampled_from(("", "auto", "dataset", "format", "raw_text", "DATASET", "model"))
    kind = st.sampled_from(kinds) if kinds else st.one_of(some, some, some, odd_text(10))
    for key, strat in (("kind", kind),
                       ("overwrite", st.sampled_from(("1", "true", "on", "0", "", "yes ")))):
        if data.draw(st.integers(0, 2), label=f"send {key}") != 0:
            form.add(key, wire_text(data.draw(strat, label=key)))
    boundary, body = encode_multipart(form)
    return Upload(body, f"multipart/form-data; boundary={boundary}", content, sent)


def form_body(data: Any, fleet: Fleet, kind: str) -> dict[str, str]:
    """The fields of the login, token or logout form (a browser's CSRF token goes in the
    X-CSRF-Token header, which harness.send adds)."""
    fields: dict[str, st.SearchStrategy[str]] = {
        "login": {"username": st.sampled_from((*fleet.users, "nobody", "")) | odd_text(),
                  "password": st.sampled_from(("correct horse battery", "wrong", "")) | odd_text(),
                  "next": st.sampled_from(("/jobs", "//evil.example", "https://evil.example",
                                           "/\t/evil.example", "/sweeps?x=1")) | odd_text()},
        "token": {"token": st.sampled_from((fleet.dashboard_token, "", "x" * 43)) | odd_text(),
                  "next": st.sampled_from(("/fleet", "//evil.example", "http://x")) | odd_text()},
        "logout": {},
    }[kind]
    out = {}
    for key, strat in fields.items():
        if data.draw(st.integers(0, 5), label=f"send {key}") != 0:
            out[key] = data.draw(strat, label=key)
    return out


def body_for(data: Any, fleet: Fleet, fuzz: RouteFuzz, method: str) -> tuple[bytes | None, str | None]:
    """The request's body and Content-Type."""
    if method in ("GET", "HEAD", "OPTIONS") and data.draw(st.integers(0, 9)) != 0:
        return None, None
    if fuzz.body == "upload" and data.draw(st.integers(0, 5)) != 0:
        return upload_body(data, fleet)
    if fuzz.body in ("login", "token", "logout"):
        pairs = form_body(data, fleet, fuzz.body)
        if data.draw(st.integers(0, 5)) != 0:
            enc = "&".join(f"{quoted(k)}={quoted(v)}" for k, v in pairs.items())
            return enc.encode(), "application/x-www-form-urlencoded"
    make = BODIES.get(fuzz.body, BODIES["none"])
    obj = make(data, fleet)
    how = data.draw(st.sampled_from(("keyed",) * 6 + ("any", "raw", "form", "empty")),
                    label="body as")
    if how == "keyed":
        return (json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass"),
                data.draw(st.sampled_from(CONTENT_TYPES[:2] + ("application/json",)),
                          label="content type"))
    if how == "any":
        return (json.dumps(data.draw(json_values(), label="any json"), allow_nan=True)
                .encode("utf-8", "surrogatepass"), "application/json")
    if how == "raw":
        return raw_json(data, obj), data.draw(st.sampled_from(CONTENT_TYPES), label="type")
    if how == "form":
        pairs = [(str(k), str(v)) for k, v in (obj.items() if isinstance(obj, dict) else [])]
        return ("&".join(f"{quoted(k)}={quoted(v)}" for k, v in pairs).encode(),
                "application/x-www-form-urlencoded")
    return b"", data.draw(st.sampled_from(CONTENT_TYPES), label="type")


# -- a whole request ----------------------------------------------------------------------------
def draw_request(data: Any, fleet: Fleet, method: str, rule: str) -> Req:
    fuzz = ROUTES[(method, rule)]
    if data.draw(st.integers(0, 14), label="other method") == 0:
        method = data.draw(st.sampled_from(METHODS), label="method")
    path = rule
    for part in rule.split("<")[1:]:
        spec = part.split(">")[0]
        param = spec.split(":")[-1]
        value = path_value(data, fleet, rule, param)
        path = path.replace(f"<{spec}>", quoted(value, safe="/" if spec.startswith("path:")
                                                else "") or "x", 1)
    who = data.draw(st.sampled_from(("token",) * 5 + ("browser",) * 3 + IDENTITIES[2:]),
                    label="who")
    user = data.draw(st.sampled_from(fleet.users), label="user")
    csrf = data.draw(st.sampled_from(("right",) * 3 + ("missing", "wrong", "other")),
                     label="csrf")
    body, ctype = body_for(data, fleet, fuzz, method)
    return Req(method=method, path=path, query=query(data, fleet, fuzz.args),
               headers=headers(data), body=body, content_type=ctype, who=who, user=user,
               csrf=csrf, host=data.draw(st.sampled_from(HOSTS), label="host"),
               remote_addr=data.draw(st.sampled_from(ADDRESSES), label="address"))
