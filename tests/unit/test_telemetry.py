"""The pure part of a worker's card report: memory held outside lorafleet, the memory cap,
and the process tree that tells the worker's own processes from others (real /proc)."""

from __future__ import annotations

import os
import subprocess
import sys

from gpuworker.telemetry import (
    IDLE_BASELINE_MB,
    GpuProcess,
    OutsideUse,
    cap_memory,
    outside_use,
    parent_pid,
    process_tree,
)

OWN = {100, 101}  # the worker's main process and its training child


def test_pids_in_this_namespace_other_processes_are_summed():
    procs = [GpuProcess(101, 9000), GpuProcess(555, 3000), GpuProcess(777, 1200)]
    got = outside_use(procs, OWN, visible_pids={101, 555, 777}, used_mb=13300, busy=True)
    assert got == OutsideUse(4200, (555, 777), "processes")
    assert got.fields() == {"outside_mb": 4200, "outside_pids": "555,777",
                            "outside_how": "processes"}


def test_only_the_worker_on_the_card_is_nothing_outside():
    procs = [GpuProcess(101, 9000)]
    assert outside_use(procs, OWN, {101}, used_mb=9300, busy=True) == OutsideUse()
    assert OutsideUse().fields() == {"outside_mb": 0, "outside_pids": "", "outside_how": ""}


def test_idle_card_with_a_stranger():
    procs = [GpuProcess(555, 30000)]
    assert outside_use(procs, OWN, {555}, used_mb=30400, busy=False) == \
        OutsideUse(30000, (555,), "processes")


def test_idle_card_in_a_container_uses_memory_above_the_baseline():
    # NVML lists host pids that do not exist here: which is ours cannot be told, but an idle
    # worker holds nothing, so what is used above the baseline is someone else's.
    procs = [GpuProcess(48213, 20000)]
    got = outside_use(procs, OWN, visible_pids=set(), used_mb=20600, busy=False)
    assert got == OutsideUse(max(20000, 20600 - IDLE_BASELINE_MB), (48213,), "idle memory")
    # NVML lists nothing at all (another container's processes are hidden): the same rule.
    got = outside_use([], OWN, set(), used_mb=IDLE_BASELINE_MB + 8000, busy=False)
    assert got == OutsideUse(8000, (), "idle memory")
    # Used memory within the baseline is the driver's, not a process's (an idle H200 with no
    # process on it reported 618 MB used).
    assert outside_use([], OWN, set(), used_mb=IDLE_BASELINE_MB, busy=False) == OutsideUse()
    assert outside_use([], OWN, set(), used_mb=618, busy=False) == OutsideUse()


def test_busy_worker_in_a_container_keeps_the_last_idle_figure():
    last = OutsideUse(8000, (48213,), "idle memory")
    # Host pids: the worker's own child is among them but cannot be recognised.
    procs = [GpuProcess(48213, 8000), GpuProcess(48990, 9000)]
    assert outside_use(procs, OWN, set(), used_mb=17600, busy=True, last=last) == last
    # Visible pids but the worker's own child is missing from the list (a pid namespace
    # NVML does not see into): not trusted either.
    assert outside_use([GpuProcess(7, 100)], OWN, {7}, used_mb=9700, busy=True,
                       last=last) == last
    assert outside_use(procs, OWN, set(), used_mb=17600, busy=True) == OutsideUse()


def test_unknown_per_process_memory_falls_back_to_idle_memory():
    procs = [GpuProcess(555, None)]
    assert outside_use(procs, OWN, {555}, used_mb=IDLE_BASELINE_MB + 4000, busy=False) == \
        OutsideUse(4000, (555,), "idle memory")
    last = OutsideUse(4000, (555,), "idle memory")
    assert outside_use(procs + [GpuProcess(101, 900)], OWN, {555, 101}, used_mb=IDLE_BASELINE_MB + 4900,
                       busy=True, last=last) == last


def test_idle_used_memory_beyond_the_listed_processes_counts():
    # One stranger is visible (1000 MB) but the card has 6000 MB more in use than the
    # baseline: processes this namespace cannot list hold the rest.
    got = outside_use([GpuProcess(555, 1000)], OWN, {555}, used_mb=IDLE_BASELINE_MB + 6000, busy=False)
    assert got == OutsideUse(6000, (555,), "idle memory")


def test_cap_memory():
    card = {"mem_total_mb": 81559, "mem_free_mb": 51000, "outside_mb": 30000}
    assert cap_memory(card, None) == {**card, "mem_usable_mb": 51559}
    assert cap_memory(card, 40000) == {"mem_total_mb": 40000, "mem_free_mb": 40000,
                                       "outside_mb": 30000, "mem_limit_mb": 40000,
                                       "mem_usable_mb": 40000}
    # A cap above what is left beside the outside process: what is left.
    assert cap_memory(card, 60000)["mem_usable_mb"] == 51559
    cpu = {"device": "cpu", "mem_total_mb": 64000, "mem_free_mb": 30000}
    assert cap_memory(cpu, 2000) == {"device": "cpu", "mem_total_mb": 2000, "mem_free_mb": 2000,
                                     "mem_limit_mb": 2000, "mem_usable_mb": 2000}


def test_process_tree_holds_children_and_grandchildren_only():
    # A child that starts a grandchild; both are this process's tree, the parent is not.
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys; "
                              "p = subprocess.Popen([sys.executable, '-c', "
                              "'import time; time.sleep(30)']); print(p.pid, flush=True); "
                              "p.wait()"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        tree = process_tree(os.getpid())
        assert {os.getpid(), child.pid, grandchild} <= tree
        assert os.getppid() not in tree
        assert parent_pid(grandchild) == child.pid
        assert parent_pid(child.pid) == os.getpid()
        assert process_tree(grandchild) == {grandchild}
    finally:
        os.kill(grandchild, 9)
        child.wait(10)
    assert parent_pid(grandchild) is None  # gone
