"""What a worker says about its card in each heartbeat, read without initialising CUDA.

NVML (nvidia-ml-py) reads name, memory, utilisation and temperature of a card from outside the
CUDA context, so the worker's main process can report while its child trains. Without NVML
(no driver, a CPU worker) the host's memory is reported instead.
"""

from __future__ import annotations

import os
import platform


def _nvml_card(index: int) -> dict | None:
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        info = {
            "card": name.decode() if isinstance(name, bytes) else name,
            "mem_total_mb": round(mem.total / 2**20),
            "mem_free_mb": round(mem.free / 2**20),
        }
        try:
            info["util_pct"] = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            info["temp_c"] = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        except pynvml.NVMLError:
            pass
        return info
    except Exception:  # NVML present but no usable driver
        return None


def count_gpus() -> int:
    """Cards visible to NVML (0 without a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def _host_memory() -> tuple[int, int]:
    total = free = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                if k == "MemTotal":
                    total = int(v.split()[0]) // 1024
                elif k == "MemAvailable":
                    free = int(v.split()[0]) // 1024
    except OSError:
        pass
    return total, free


def card_info(gpu_index: int | None) -> dict:
    """Heartbeat fields for this worker's device."""
    if gpu_index is not None:
        info = _nvml_card(gpu_index)
        if info is not None:
            return {"device": f"cuda:{gpu_index}", "gpu_index": gpu_index, **info}
    total, free = _host_memory()
    cpu = platform.processor() or platform.machine()
    return {"device": "cpu", "gpu_index": "", "card": f"CPU ({os.cpu_count()} cores, {cpu})",
            "mem_total_mb": total, "mem_free_mb": free}
