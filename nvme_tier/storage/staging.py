"""A bounded, reusable pool of pinned host buffers for moving bytes between a device and a disk.

Two buffers (double buffering): while the disk writes buffer A, the device fills buffer B. The
pool is allocated lazily on first use, reused across calls, and freed only by ``release()``;
host memory never grows with the size of the state, only with the budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Allocator = Callable[[int], torch.Tensor]


def round_down(value: int, multiple: int) -> int:
    return value - value % multiple


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def default_pinned_allocator(nbytes: int) -> torch.Tensor:
    """Page-locked when an accelerator is present (fast DMA), page-aligned pageable otherwise."""
    if torch.cuda.is_available():
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return torch.empty(nbytes, dtype=torch.uint8)


class StagingPool:
    """``count`` buffers of ``budget // count`` bytes each (rounded down to ``alignment``)."""

    def __init__(
        self,
        budget_bytes: int,
        alignment: int = 4096,
        count: int = 2,
        allocator: Allocator = default_pinned_allocator,
        free: Callable[[torch.Tensor], None] | None = None,
    ):
        per_buffer = round_down(budget_bytes // count, alignment)
        if per_buffer <= 0:
            raise ValueError(f"staging budget {budget_bytes} B is below {count} x alignment {alignment} B")
        self.buffer_bytes = per_buffer
        self.count = count
        self._allocator = allocator
        self._free = free
        self._buffers: list[torch.Tensor] = []

    @property
    def buffers(self) -> list[torch.Tensor]:
        if not self._buffers:
            self._buffers = [self._allocator(self.buffer_bytes) for _ in range(self.count)]
        return self._buffers

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers)

    def release(self) -> None:
        if self._free is not None:
            for buf in self._buffers:
                self._free(buf)
        self._buffers = []


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
        cuda = dst.device if dst.is_cuda else (src.device if src.is_cuda else None)
        if cuda is None:
            dst.copy_(src)
            return
        stream = self._side_stream(cuda)
        stream.wait_stream(torch.cuda.current_stream(cuda))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()
