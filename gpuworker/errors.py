"""The one exception the engine raises for problems a user can fix.

Outside the engine package (whose __init__ imports torch), so the worker can tell an engine
error without torch, e.g. in the failure handler of a job whose imports failed.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """A training job that cannot run or went wrong, with a message meant for the user.

    The worker records `str(error)` as the job's failure reason as it is, so the message names
    the setting or file to change and never needs a traceback to be understood.
    """


class LeverSkipped(Exception):
    """A speed lever that does not apply to this run (no CUDA, an architecture it does not
    know, a library missing): the run goes on without it, and the reason is logged and
    recorded (gpuworker.engine.levers)."""


class DiskFull(EngineError):
    """A write to the data folder failed for want of space (gpuworker.diskspace): the message
    names the folder and what was being written, and what of the earlier work stays."""


class FolderBusy(EngineError):
    """The job's LoRA folder stayed locked (gpuworker.folderlock) by a process that lets go of
    it by itself: an earlier run of the same job that was fenced out, the worker clearing what a
    dead process left, another job's process whose job was taken away from it. Not the job's
    fault and nothing of the folder was touched: the worker puts the job back in the queue
    without counting an attempt (gpuworker.tasks.record_failure), up to a limit."""
