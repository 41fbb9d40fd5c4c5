"""Measuring helpers shared by the packaged benchmarks and the scripts in benchmarks/ (through
benchmarks/measure.py), one of each: peak RSS (``RssSampler``), cold reads, device-synchronised
timing, and the machine a result was measured on (``machine_info``). GB = 1e9 bytes."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from nvme_tier.deepspeed.version import installed_version
from nvme_tier.tables import format_rows

GB = 1e9
PROC = psutil.Process()


# -- host memory ------------------------------------------------------------------------------------
def rss() -> int:
    """This process's resident set size, bytes."""
    return PROC.memory_info().rss


class RssSampler:
    """Peak RSS while a block runs, sampled every ``interval`` s in a thread.

    ``baseline`` (default: RSS at entry) is what ``added`` is measured from. ``extra``, if set, is
    another byte count sampled alongside (``extra_peak``), e.g. pinned bytes. ``kernel_hwm`` also
    resets the kernel's peak-RSS counter (VmHWM) at entry and folds it in at exit, so a spike
    shorter than the interval still counts (Linux >= 4.0; ``hwm_resettable`` says if it worked).
    """

    def __init__(
        self,
        interval: float = 0.002,
        baseline: int | None = None,
        extra: Callable[[], int] | None = None,
        kernel_hwm: bool = False,
    ):
        self.interval = interval
        self.baseline = baseline
        self.extra = extra
        self.kernel_hwm = kernel_hwm
        self.hwm_resettable = False
        self.peak = 0
        self.extra_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        if self.kernel_hwm:
            self.hwm_resettable = _reset_hwm()
        if self.baseline is None:
            self.baseline = rss()
        self.peak = max(self.baseline, rss())
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            if self.extra is not None:
                with contextlib.suppress(Exception):
                    self.extra_peak = max(self.extra_peak, self.extra())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss())
        if self.hwm_resettable:
            self.peak = max(self.peak, _vm_hwm())

    @property
    def added(self) -> int:
        """Peak minus baseline (negative when the block freed more than it took)."""
        return self.peak - (self.baseline or 0)

    @property
    def delta(self) -> int:
        """``added``, never below 0."""
        return max(0, self.added)


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
    return _write_control("/proc/self/clear_refs", "5")


def _write_control(path: str, value: str) -> bool:
    """Write a kernel control file; False where the kernel or our privileges refuse it."""
    try:
        with open(path, "w") as fh:
            fh.write(value)
        return True
    except OSError:
        return False


# -- clocks and caches -----------------------------------------------------------------------------
def drop_page_cache() -> bool:
    """sync, then drop clean page cache; needs root (CAP_SYS_ADMIN). True when it worked."""
    os.sync()
    return _write_control("/proc/sys/vm/drop_caches", "1")


def sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_caller_stream() -> None:
    """Wait for the work queued on the caller's stream only: what the caller's own later work
    waits for (nvme_tier copies on a stream of its own, which a device-wide sync waits for too)."""
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


def timed(fn: Callable[[], object], sync: Callable[[], None] = sync_device) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def methods_table(methods: dict[str, dict], header: list[str], cells: Callable[[str, dict], list]) -> str:
    """A benchmark's methods as a table (``cells`` makes a measured method's row), then a line for
    each skipped one."""
    rows = [cells(name, m) for name, m in methods.items() if "skipped" not in m]
    skipped = [f"{name}: skipped: {m['skipped']}" for name, m in methods.items() if "skipped" in m]
    return "\n".join([format_rows(header, rows), *skipped])


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# -- the machine -----------------------------------------------------------------------------------
def machine_info(path: str | None = None) -> dict[str, Any]:
    """Host, software versions, the GPU and, for ``path``, its disk and filesystem (GB = 1e9 bytes)."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "host": platform.node(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "host_mem_total_GB": round(psutil.virtual_memory().total / GB, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
    }
    try:
        info["deepspeed"] = installed_version()
    except Exception as exc:  # the benchmark may not need it
        info["deepspeed"] = f"unavailable ({exc})"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_mem_GB"] = round(props.total_memory / GB, 1)
    if path is not None:
        info["disk"] = disk_info(path)
    return info


def disk_info(path: str) -> dict[str, Any]:
    """Size, free space, filesystem and ``df -T`` line of the disk holding ``path`` (what is readable)."""
    disk: dict[str, Any] = {"path": path}
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(path)
        disk.update(total_GB=round(usage.total / GB, 1), free_GB=round(usage.free / GB, 1))
    disk["filesystem"] = fs_type(path)
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, timeout=10).stdout
        disk["df"] = out.strip().splitlines()[-1]
    return disk


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
