"""The stream a non-blocking transfer's I/O threads queue their device copies on.

Those threads queue each chunk's copy as it arrives, long after the call that started the transfer
returned. Queued behind the caller's stream as it is *then*, a reload's copies would wait for
whatever the caller queued meanwhile (another model's generation); so each engine submits from a
stream of its own that waited for the caller's stream once, when the transfer was started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class SubmitStream:
    """One engine's own stream to submit I/O from, apart from the caller's.

    One engine's, not the process's: shared, engine A's reload copies (queued as they arrive) would
    wait behind engine B's later ``wait_stream`` of a caller's stream busy with other work.
    """

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}

    @contextlib.contextmanager
    def apart_from_caller(self) -> Iterator[None]:
        """Submit I/O whose device copies must never wait on the caller's stream after this point."""
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            yield
            return
        index = torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        stream.wait_stream(torch.cuda.current_stream(index))
        with torch.cuda.stream(stream):
            yield
