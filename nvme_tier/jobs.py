"""One offload or one reload as it runs: the executor's record of it (tiers.py: what was queued,
what is still in flight, what it moved and how fast), and the engine's worker thread a non-blocking
one finishes on (``BackgroundOperation``), which the controller waits for before its next call.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .buffers import Placed
from .host_copies import HostCopy
from .storage.base import on_callers_device
from .types import StateKind

log = logging.getLogger("nvme_tier")
_LIVE: weakref.WeakSet[BackgroundOperation] = weakref.WeakSet()  # for the exit hook below


@dataclass
class TransferStats:
    bytes_written: int = 0
    bytes_skipped: int = 0
    bytes_to_host: int = 0
    bytes_read: int = 0
    bytes_from_host: int = 0
    seconds: float = 0.0

    def offload_line(self, moved: int, backend: str | None) -> str:
        return (
            f"offloaded {moved / 1e9:.3f} GB ({self.bytes_written / 1e9:.3f} GB to {backend or '-'}, "
            f"{self.bytes_skipped / 1e9:.3f} GB unchanged on disk, {self.bytes_to_host / 1e9:.3f} GB to host) "
            f"in {self.seconds:.2f} s"
        )

    def reload_line(self) -> str:
        return (
            f"reloaded {self.bytes_read / 1e9:.3f} GB from nvme and {self.bytes_from_host / 1e9:.3f} GB "
            f"from host in {self.seconds:.2f} s"
        )


@dataclass(eq=False)
class OffloadJob:
    """One offload from its start (every move queued) to its end (every byte safe elsewhere)."""

    placed: list[Placed] = field(default_factory=list)
    writes: list[tuple[Placed, Future]] = field(default_factory=list)  # NVMe writes, in order
    copies: torch.cuda.Event | None = None  # after the last host copy; None: copies are done
    stats: TransferStats = field(default_factory=TransferStats)
    started: float = field(default_factory=time.perf_counter)
    stranded: list[Placed] = field(default_factory=list)  # freed, and restoring them failed
    host_copies: list[HostCopy] = field(default_factory=list)  # reserved by HostCopies.claim
    safe: bool = False  # every byte is elsewhere (manifest committed): only the frees are left

    def bytes_in_flight(self) -> dict[StateKind, int]:
        """Bytes per state not yet known safe elsewhere (a copy or a write still running)."""
        copying = self.copies is not None and not self.copies.query()
        out: dict[StateKind, int] = {}
        pending = [p for p, fut in self.writes if not fut.done()]
        pending += [p for p in self.placed if p.host is not None and copying]
        for p in pending:
            out[p.buffer.kind] = out.get(p.buffer.kind, 0) + p.buffer.nbytes
        return out


@dataclass(eq=False)
class ReloadJob:
    """One reload from its start (every buffer restored, every move back queued) to its hand-over."""

    placed: list[Placed]
    reads: list[tuple[Placed, Future]] = field(default_factory=list)  # NVMe reads, in order
    stats: TransferStats = field(default_factory=TransferStats)
    started: float = field(default_factory=time.perf_counter)


class BackgroundOperation:
    """At most one non-blocking operation at a time, on one worker thread bound to the caller's
    device; the next call waits for it (and gets its error) before doing anything."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        _LIVE.add(self)

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier")
        return self._executor

    def start(self, operation: Callable[[], None]) -> None:
        """Run ``operation`` on the worker (call ``finish`` first: nothing may be pending)."""
        self._pending = self._worker().submit(on_callers_device(operation))

    def start_reads(self, finish: Callable[[], None], device: torch.device) -> None:
        """Finish a non-blocking reload's NVMe reads: on the worker where a device has streams of
        its own (the CPU stays free), here on the CPU accelerator (no stream orders a direct read
        after them there, so the call waits: docs/design.md, "Non-blocking reloads")."""
        if device.type == "cuda":
            self.start(finish)
        else:
            self._run_here(finish)

    def _run_here(self, operation: Callable[[], None]) -> None:
        """Run ``operation`` now, its error kept for ``finish`` as if it had run on the worker."""
        done: Future = Future()
        try:
            operation()
        except Exception as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        self._pending = done

    @property
    def pending(self) -> bool:
        """An operation started and not yet finished (or its error not yet raised by ``finish``)."""
        return self._pending is not None

    def finish(self) -> None:
        """Wait for the pending operation, re-raising its error; forget it only once it has ended.

        A Ctrl-C while waiting leaves it pending (it runs on), so the next call waits again
        instead of starting an operation beside it.
        """
        fut = self._pending
        if fut is None:
            return
        try:
            fut.result()
        finally:
            if fut.done():
                self._pending = None

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _finish_all_at_exit() -> None:
    """The interpreter is exiting (``sys.exit``, the end of the script) while a non-blocking
    operation runs: let it finish first. Python stops every thread pool from taking work at exit,
    and the operation still has I/O to queue (its writes, the manifest, or its undo); cut off
    half-way it failed with "cannot schedule new futures after shutdown"."""
    for op in list(_LIVE):
        fut = op._pending
        if fut is None or fut.done():
            continue
        log.warning(
            "nvme_tier: exiting while a non-blocking offload or reload is in flight; finishing it first "
            "(call nvme_tier.wait(engine) before exiting to wait for it yourself)"
        )
        error = fut.exception()
        if error is not None:
            log.warning("nvme_tier: the operation in flight at exit failed: %s", error)


# Runs before concurrent.futures' own exit hook (threading runs them in reverse order of
# registration; concurrent.futures.thread registered its hook when imported above), which would
# refuse the operation's remaining I/O.
threading._register_atexit(_finish_all_at_exit)


__all__ = ["BackgroundOperation", "OffloadJob", "ReloadJob", "TransferStats"]
