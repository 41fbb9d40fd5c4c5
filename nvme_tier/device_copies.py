"""Copies between device tensors and host memory on a side stream.

Host copies (tiers.py, host_copies.py) and the storage backends' staging both move bytes this
way, so it sits below both.
"""

from __future__ import annotations

import torch


class DeviceCopier:
    """Copies between (device) tensors and host staging on a side stream, then waits for it.

    On CPU it is a plain copy. On CUDA it keeps the compute stream free and makes the wait
    explicit, so a staging buffer is never reused while a DMA still reads or writes it.
    """

    def __init__(self) -> None:
        self._stream = None

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copy_async(dst, src)
        self.synchronize()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue the copy on the side stream; ``synchronize()`` before touching or freeing either side."""
        cuda = dst.device if dst.is_cuda else (src.device if src.is_cuda else None)
        if cuda is None:
            dst.copy_(src)
            return
        stream = self._side_stream(cuda)
        stream.wait_stream(torch.cuda.current_stream(cuda))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def order_before_callers(self) -> None:
        """Make the caller's current stream wait for every copy queued so far (no host wait)."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    def mark(self) -> torch.cuda.Event | None:
        """An event after every copy queued so far (None: nothing is asynchronous, all are done)."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def free_after_copies(self, tensor: torch.Tensor) -> None:
        """Let ``tensor``'s storage be freed now, its memory reused only after the queued copies.

        The caching allocator then holds the block back from any stream until this side stream
        has passed the point reached now, so a copy still reading it never sees another tensor's
        bytes. (Copying on the compute stream instead would order the reuse without this, but
        would make another engine's compute wait behind the copies.)
        """
        if self._stream is not None and tensor.is_cuda:
            tensor.record_stream(self._stream)
