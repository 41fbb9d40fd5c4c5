"""Hold Ctrl-C across the few steps that must happen together or not at all.

Freeing device memory and recording where its bytes went are two steps; a KeyboardInterrupt
between them leaves a freed state that nothing describes (status says "device", reload_states()
does nothing). Inside ``DeferredInterrupt`` a SIGINT is only noted; it is delivered when the block
ends, so the engine is then in a state the controller knows.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

log = logging.getLogger("nvme_tier")


class DeferredInterrupt:
    """``with DeferredInterrupt(): ...`` delivers a SIGINT that arrives inside the block after it.

    Only the main thread runs Python signal handlers, so elsewhere (a non-blocking offload's
    worker) nothing can interrupt the block and this does nothing. A handler that is not a Python
    callable (SIG_IGN, SIG_DFL) is left alone: there is nothing to defer. Nesting is harmless: the
    outermost block delivers.
    """

    _holding = False  # main thread only, like the handler itself

    def __init__(self) -> None:
        self._previous: signal.Handlers | object | None = None
        self._received: tuple[int, FrameType | None] | None = None
        self._installed = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self._received is None:
            self._received = (signum, frame)

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is not threading.main_thread() or DeferredInterrupt._holding:
            return self
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._note)
        DeferredInterrupt._holding = self._installed = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._installed:
            return
        signal.signal(signal.SIGINT, self._previous)
        DeferredInterrupt._holding = self._installed = False
        if self._received is None:
            return
        if exc_type is not None:  # the block's own error is already on its way up and stops the caller
            log.info(
                "nvme_tier: Ctrl-C arrived while %s was raised; the error stands for both", exc_type.__name__
            )
            return
        self._previous(*self._received)  # Python's default handler raises KeyboardInterrupt here
