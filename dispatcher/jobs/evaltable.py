"""The perplexity results table in the data folder (`evals/evaluations.csv`).

One row per evaluation: the model, its LoRAs, the text, the perplexity, the window settings,
the date and an editable comment. Workers append rows, the dashboard edits comments; every
change holds an exclusive lock on a side file and replaces the table atomically, so readers never
see half a file and two writers never lose each other's rows.
"""

from __future__ import annotations

import csv
import fcntl
import io
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dispatcher.jobs.csvcells import cell, restore
from formats.files import atomic_write

COLUMNS = ("id", "date", "base_model", "loras", "text_file", "perplexity", "stride",
           "max_length", "tokens", "job", "comment")


def combination(base_model: str, loras: list[str], text_file: str, stride: int,
                max_length: int) -> tuple:
    """What makes two evaluations the same: running it again would give the same number."""
    return (base_model, tuple(sorted(loras)), text_file, int(stride), int(max_length))


class EvalTable:
    def __init__(self, path: Path):
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            out = []
            for r in csv.DictReader(f):
                row: dict[str, Any] = {k: restore(r.get(k) or "") for k in COLUMNS}
                row["loras"] = [x for x in row["loras"].split("|") if x]
                for k in ("perplexity",):
                    row[k] = float(row[k]) if row[k] else None
                for k in ("stride", "max_length", "tokens"):
                    row[k] = int(row[k]) if row[k] else None
                out.append(row)
            return out

    def _write(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            # Every cell guarded: comments, and file or model names, are the users' own text.
            w.writerow({k: cell(v) for k, v in {**r, "loras": "|".join(r.get("loras") or [])}
                        .items() if k in COLUMNS})
        atomic_write(self.path, buf.getvalue())  # an ordinary file's mode: the table is shared

    def find(self, base_model: str, loras: list[str], text_file: str, stride: int,
             max_length: int) -> dict[str, Any] | None:
        key = combination(base_model, loras, text_file, stride, max_length)
        for r in reversed(self.rows()):
            if combination(r["base_model"], r["loras"], r["text_file"], r["stride"] or 0,
                           r["max_length"] or 0) == key:
                return r
        return None

    def add(self, *, base_model: str, loras: list[str], text_file: str, perplexity: float,
            stride: int, max_length: int, tokens: int, job: str = "", comment: str = "",
            date: float | None = None) -> dict[str, Any]:
        row = {"id": uuid.uuid4().hex[:10],
               "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(date or time.time())),
               "base_model": base_model, "loras": list(loras), "text_file": text_file,
               "perplexity": f"{perplexity:.6f}", "stride": stride, "max_length": max_length,
               "tokens": tokens, "job": job, "comment": comment}
        with self._locked():
            rows = self.rows()
            rows.append(row)
            self._write(rows)
        return row

    def set_comment(self, row_id: str, comment: str) -> dict[str, Any]:
        if not any(r["id"] == row_id for r in self.rows()):
            raise KeyError(row_id)  # before the lock file: a refused edit writes nothing
        with self._locked():
            rows = self.rows()
            for r in rows:
                if r["id"] == row_id:
                    r["comment"] = comment
                    self._write(rows)
                    return r
        raise KeyError(row_id)


def settings_key(row: dict[str, Any]) -> tuple:
    """The text and window settings of a row: what two perplexities must share to compare."""
    return (row["base_model"], row["text_file"], int(row["stride"] or 0),
            int(row["max_length"] or 0))


def with_base(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with `base_perplexity` (the newest perplexity of its base model alone on the
    same text, stride and max_length; None when never measured) and `vs_base` (its change
    from that: negative = the LoRAs lower the perplexity). Rows of the base alone get None."""
    base: dict[tuple, float] = {}
    for r in rows:  # oldest first: the newest measurement wins
        if not r["loras"] and r["perplexity"] is not None:
            base[settings_key(r)] = r["perplexity"]
    out = []
    for r in rows:
        b = base.get(settings_key(r)) if r["loras"] else None
        delta = r["perplexity"] - b if b is not None and r["perplexity"] is not None else None
        out.append({**r, "base_perplexity": b, "vs_base": delta,
                    "vs_base_pct": 100 * delta / b if delta is not None and b else None})
    return out
