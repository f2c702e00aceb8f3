"""A CPU worker's load figures in its heartbeat (issue 11, point 19)."""

from __future__ import annotations

from gpuworker import telemetry
from gpuworker.telemetry import CardReport, CpuLoad, cpu_times


def test_cpu_use_between_heartbeats_and_the_load_average():
    busy, total = cpu_times()
    assert 0 <= busy <= total
    load = CpuLoad()
    sum(i * i for i in range(300000))  # some CPU time between the two readings
    f = load.fields()
    assert 0 <= f["util_pct"] <= 100 and f["load_avg"] >= 0 and f["load_note"] == ""
    f = CardReport(None).fields(busy=False)
    assert f["device"] == "cpu" and "util_pct" in f and f["load_avg"] is not None


def test_without_figures_the_heartbeat_says_why(monkeypatch):
    monkeypatch.setattr(telemetry, "cpu_times", lambda: None)
    monkeypatch.delattr(telemetry.os, "getloadavg")
    f = CpuLoad().fields()
    assert f == {"util_pct": None, "load_avg": None, "load_note":
                 "no CPU figures on this system (no /proc/stat, no load average)"}
