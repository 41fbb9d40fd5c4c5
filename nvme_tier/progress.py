"""A tqdm bar for transfers that take over a second; silent when not a tty or disabled."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator


class Progress:
    """Counts bytes; opens a bar lazily once a task has run for ``delay_s``."""

    def __init__(self, enabled: bool = True, delay_s: float = 1.0):
        self.enabled = enabled and sys.stderr.isatty()
        self.delay_s = delay_s
        self._bar = None
        self._task: tuple[str, int, float] | None = None
        self._done = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def task(self, what: str, total: int) -> Iterator[None]:
        with self._lock:
            self._task, self._done = (what, total, time.monotonic()), 0
        try:
            yield
        finally:
            with self._lock:
                if self._bar is not None:
                    self._bar.close()
                self._bar, self._task = None, None

    def advance(self, nbytes: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._task is None:
                return
            self._done += nbytes
            what, total, started = self._task
            if self._bar is None and time.monotonic() - started >= self.delay_s:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total, desc=f"nvme_tier {what}", unit="B", unit_scale=True, leave=False
                )
                self._bar.update(self._done)
            elif self._bar is not None:
                self._bar.update(nbytes)
