"""One engine's background operation: the non-blocking offload or reload running now, if any.

At most one runs at a time, on one worker thread bound to the caller's device; the next call
waits for it (and gets its error) before doing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .storage.base import on_callers_device


class BackgroundOperation:
    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier")
        return self._executor

    def start(self, operation: Callable[[], None]) -> None:
        """Run ``operation`` on the worker (call ``finish`` first: nothing may be pending)."""
        self._pending = self._worker().submit(on_callers_device(operation))

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
