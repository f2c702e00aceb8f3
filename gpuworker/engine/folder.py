"""Taking a run's LoRA folder: its lock (gpuworker.folderlock), held from before the run reads
anything in the folder until its final save is done.

What a run builds on is read from the folder: the adapter it continues (its rank, its steps,
its weights) or the checkpoint it resumes from. So the lock is taken, and what a process that
died left half-saved is tidied (gpuworker.checkpoints.clear_staging: a final save it had made
is finished, a checkpoint it was replacing is put back), before any of that is read: the run
builds on the folder as the earlier process left it complete, never on half of a save.

Finding the lock held, the run waits for the holder to let go, asking at every poll whether it
should stop (which is also its fence: a run that is no longer its job's raises there). Asked
to stop, it gives up the wait and touches nothing (`take_folder` returns None). How long it
waits depends on the holder, as the lock file names it:

    an earlier run of this job   EARLIER_RUN_WAIT_S: fenced out, it stops at its next step or
                                 once the save it is in is done
    the worker clearing          CLEARING_WAIT_S: what a dead process left (a large staging
                                 folder takes a while to remove)
    any other                    OTHER_HOLDER_WAIT_S: another job's process, whose job was
                                 taken from it (the dispatcher does not start a second job on
                                 a LoRA that one is training), or a holder not yet named

A holder that did not let go in time gives FolderBusy, which the worker turns into a re-queue.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dispatcher.access.links import inside
from gpuworker.checkpoints import clear_staging
from gpuworker.diskspace import disk_full, says_full, space_of
from gpuworker.engine.config import EngineConfig
from gpuworker.engine.report import Report
from gpuworker.errors import EngineError, FolderBusy
from gpuworker.folderlock import FolderLock, holder_of, me, try_lock

EARLIER_RUN_WAIT_S = 300.0
CLEARING_WAIT_S = 60.0
OTHER_HOLDER_WAIT_S = 30.0
LOCK_POLL_S = 0.5


class HeldFolder:
    """A run's LoRA folder while the run holds its lock; `release` gives it up (again: nothing)."""

    def __init__(self, path: Path, lock: FolderLock, made: bool):
        self.path = path
        self.lock = lock
        # The run made the folder (it was not there): a run that ends without writing into it
        # leaves no empty folder behind.
        self.made = made

    def release(self) -> None:
        self.lock.release()
        if self.made:
            self.made = False
            with contextlib.suppress(OSError):  # not empty (or gone): it stays as it is
                self.path.rmdir()


def check_not_link(cfg: EngineConfig) -> None:
    """loras/<lora_name> must be a folder inside the data folder: writing through a link would
    write (and move files aside, and clear) wherever it leads."""
    lora_dir = cfg.lora_dir
    if lora_dir.is_symlink() or not inside(lora_dir, cfg.loras_dir):
        raise EngineError(f"loras/{cfg.lora_name} is a link, not a folder: the job does not "
                          "write through it (choose another lora_name, or replace the link)")


def take_folder(cfg: EngineConfig, report: Report,
                while_waiting: Callable[[], None] | None = None) -> HeldFolder | None:
    """The run's LoRA folder (made if missing) with its lock held and what a process that died
    left half-saved tidied (each thing done is logged). None: a stop was asked for while the run
    waited for the lock; the folder was not touched. `while_waiting` is called at every poll
    of the wait (a pack answers its other trials' stops there).

    Raises FolderBusy when the holder did not let go in time, EngineError for a folder that is
    a link (checked again once the lock is held: a link put in its place meanwhile)."""
    lora_dir = cfg.lora_dir
    check_not_link(cfg)
    started = time.monotonic()
    made, said = False, ""
    while True:
        try:
            try:
                lora_dir.mkdir(parents=True)
                made = True
            except FileExistsError:
                pass
            lock = try_lock(lora_dir, me(job=cfg.job_id))
        except FileNotFoundError:  # removed meanwhile by a run that had made it, left empty
            continue
        except OSError as e:
            if not says_full(e):
                raise
            raise disk_full(f"loras/{cfg.lora_name}/", "taking the LoRA folder's lock",
                            space_of(lora_dir)) from e
        if lock is not None:
            break
        holder = holder_of(lora_dir)
        kind, patience = _holder_kind(cfg, holder)
        if time.monotonic() - started > patience:
            raise FolderBusy(_busy_message(cfg, holder, kind, patience))
        if kind != said:
            said = kind
            report.log(f"{_held_by(cfg, holder, kind)}; waiting for it to let go")
        if report.should_stop():
            return None
        if while_waiting is not None:
            while_waiting()
        time.sleep(LOCK_POLL_S)
    held = HeldFolder(lora_dir, lock, made)
    try:
        check_not_link(cfg)
        for line in clear_staging(lora_dir).lines():
            report.log(line)
    except BaseException:
        held.release()
        raise
    return held


def _holder_kind(cfg: EngineConfig, holder: dict[str, Any]) -> tuple[str, float]:
    if holder.get("doing") == "clearing":  # (the worker's clear after this job's dead run too)
        return "clearing", CLEARING_WAIT_S
    if cfg.job_id and holder.get("job") == cfg.job_id:
        return "earlier run", EARLIER_RUN_WAIT_S
    return "other", OTHER_HOLDER_WAIT_S


def _held_by(cfg: EngineConfig, holder: dict[str, Any], kind: str) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if kind == "earlier run":
        return f"loras/{cfg.lora_name} is still held by an earlier run of this job ({who})"
    if kind == "clearing":
        return (f"loras/{cfg.lora_name} is being cleared of what an interrupted process left "
                f"half-saved ({who})")
    job = f" ({holder['job']})" if holder.get("job") else ""
    return f"loras/{cfg.lora_name} is being trained by another job{job}, {who}"


def _busy_message(cfg: EngineConfig, holder: dict[str, Any], kind: str,
                  patience: float) -> str:
    then = ("" if kind != "other" else
            ": two jobs cannot write one LoRA folder at once")
    return f"{_held_by(cfg, holder, kind)}, which did not let go within {patience:g} s{then}"
