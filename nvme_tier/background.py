"""One engine's background operation: the non-blocking offload or reload running now, if any.

At most one runs at a time, on one worker thread bound to the caller's device; the next call
waits for it (and gets its error) before doing anything.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .storage.base import on_callers_device

log = logging.getLogger("nvme_tier")
_LIVE: weakref.WeakSet[BackgroundOperation] = weakref.WeakSet()


class BackgroundOperation:
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
