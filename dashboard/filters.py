"""Jinja filters shared by the pages (the JavaScript formats live values the same way)."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask


def fmt_duration(seconds: Any) -> str:
    """ETA as h:mm:ss (or m:ss); an empty string when unknown."""
    try:
        s = int(round(float(seconds)))
    except (TypeError, ValueError):
        return ""
    if s < 0:
        return ""
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def fmt_time(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def fmt_loss(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return ""


def fmt_mb(value: Any) -> str:
    try:
        mb = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def progress_pct(step: Any, total: Any) -> float:
    try:
        s, t = float(step), float(total)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, min(100.0, 100.0 * s / t)) if t > 0 else 0.0


def fmt_speed(speed: Any) -> str:
    """A training run's speed settings as it used them (training_log.json's "speed"), in one
    line: "loss fused (Liger kernel) · batching pack · liger_kernels on · ..."."""
    if not isinstance(speed, dict):
        return ""
    parts = []
    for key in ("loss", "batching"):
        if speed.get(key):
            parts.append(f"{key} {speed[key]}")
    prepare = speed.get("prepare")
    for hook, outcome in (prepare.items() if isinstance(prepare, dict) else ()):
        parts.append(f"{hook} {outcome}")
    if speed.get("upcast") is not None:
        parts.append("fp32 norms " + ("on" if speed["upcast"] else "off"))
    if speed.get("checkpointing"):
        parts.append(f"checkpointing {speed['checkpointing']}")
    return " · ".join(str(p) for p in parts)


def register(app: Flask) -> None:
    app.add_template_filter(fmt_duration, "duration")
    app.add_template_filter(fmt_time, "when")
    app.add_template_filter(fmt_loss, "loss")
    app.add_template_filter(fmt_mb, "mb")
    app.add_template_filter(fmt_speed, "speed")
    app.add_template_global(progress_pct, "progress_pct")
