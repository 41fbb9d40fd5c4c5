"""Measuring helpers shared by the packaged benchmarks (and benchmarks/measure.py): peak RSS, cold
reads, device-synchronised timing, and the machine a result was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Callable

import psutil
import torch

from nvme_tier.deepspeed.version import installed_version


# -- measurement helpers ---------------------------------------------------------------------------
class MemorySampler:
    """Peak RSS over a block: a sampling thread (every ``interval`` s) plus the kernel's VmHWM."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.proc = psutil.Process()
        self.baseline = 0
        self.peak = 0
        self.hwm_resettable = _reset_hwm()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self.hwm_resettable = _reset_hwm()
        self.baseline = self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        if self.hwm_resettable:
            self.peak = max(self.peak, _vm_hwm())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def drop_page_cache() -> bool:
    """sync, then drop clean page cache; needs root (CAP_SYS_ADMIN). True when it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1")
        return True
    except OSError:
        return False


def sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync_device()
    t0 = time.perf_counter()
    fn()
    sync_device()
    return time.perf_counter() - t0


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def machine_info(path: str, aio_ok: bool, aio_why: str) -> dict:
    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "host_memory_bytes": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "path_filesystem": fs_type(path),
        "aio_usable": aio_ok,
        "aio_reason": aio_why,
    }
    try:
        info["deepspeed"] = installed_version()
    except Exception as exc:  # pragma: no cover
        info["deepspeed"] = f"unavailable ({exc})"
    return info


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def fs_type(path: str) -> str:
    best, fstype = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            mnt = parts[1]
            if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best):
                best, fstype = mnt, parts[2]
    return fstype
