"""The measuring tools every benchmark shares: clocks, host memory, the machine, tables, JSON.

One of each: ``RssSampler`` (peak RSS of a block, sampled in a thread, optionally the kernel's
VmHWM), ``machine_info``, ``format_table``, ``launch_env`` (single-process torch.distributed
rendezvous), ``timed``/``sync_device``/``drop_page_cache``/``fsync_tree``, ``write_json``.
GB = 1e9 bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:  # a script in benchmarks/ imports the nvme_tier of this checkout
    sys.path.insert(0, ROOT)

# One copy of these, in the package (nvme-tier bench uses them too); re-exported for the scripts.
from nvme_tier.bench.common import (  # noqa: E402, F401  (after the path is set; re-exports)
    _reset_hwm,
    _vm_hwm,
    cpu_model,
    drop_page_cache,
    fs_type,
    sync_device,
    timed,
)

GB = 1e9
MiB = 1 << 20
PROC = psutil.Process()


# -- numbers ---------------------------------------------------------------------------------------
def gbps(nbytes: float, seconds: float | None) -> float | None:
    """GB/s, 3 decimals; None when there is no time to divide by."""
    return round(nbytes / seconds / GB, 3) if seconds else None


def rnd(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


# -- clocks and caches -----------------------------------------------------------------------------
def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` (what a page-cache writer owes before its data is on disk)."""
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# -- host memory -----------------------------------------------------------------------------------
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


# -- the machine -----------------------------------------------------------------------------------
def machine_info(path: str | None = None) -> dict[str, Any]:
    """Host, software versions, the GPU and, for ``path``, its disk and filesystem."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "host": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "host_mem_total_GB": round(psutil.virtual_memory().total / GB, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # the benchmark may not need it
        info["deepspeed"] = f"unavailable ({exc})"
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_mem_GB"] = round(p.total_memory / GB, 1)
    if path is not None:
        with contextlib.suppress(Exception):
            u = shutil.disk_usage(path)
            info["disk"] = {
                "path": path,
                "total_GB": round(u.total / GB, 1),
                "free_GB": round(u.free / GB, 1),
                "filesystem": fs_type(path),
            }
            out = subprocess.run(["df", "-T", path], capture_output=True, text=True, timeout=10).stdout
            info["disk"]["df"] = out.strip().splitlines()[-1]
    return info


# -- launching, reporting --------------------------------------------------------------------------
def launch_env() -> None:
    """Set the torch.distributed rendezvous variables of a single process (those not set already)."""
    from nvme_tier.demo import default_launch_env

    os.environ.update(default_launch_env())


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, a rule under the header; floats with 3 significant decimals."""

    def cell(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else ("-" if x is None else str(x))

    cells = [list(header)] + [[cell(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (a cut-off run keeps the previous complete file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
        fh.write("\n")
    os.replace(tmp, path)
