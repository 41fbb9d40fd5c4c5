"""A bounded, reusable pool of pinned host buffers for moving bytes between a device and a disk.

Two buffers (double buffering): while the disk writes buffer A, the device fills buffer B. The
pool is allocated lazily on first use, reused across calls, and freed only by ``release()``;
host memory never grows with the size of the state, only with the budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

Allocator = Callable[[int], torch.Tensor]
log = logging.getLogger("nvme_tier")

PAGE = 4096
HUGE_PAGE = 2 << 20
# Below this, torch's pinned allocator is used as is (its power-of-two rounding costs little there).
REGISTER_MIN_BYTES = 64 << 20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in without writing it
_POPULATE_PIECE = 8 << 20


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


def default_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


@contextlib.contextmanager
def _thread_pool(threads: int):
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nvme_tier-pin") as pool:
        yield pool


def populate(ptr: int, nbytes: int, threads: int) -> None:
    """Fault ``[ptr, ptr + nbytes)`` in from several threads at once.

    Page faults (the kernel zeroing each page, and in a VM the hypervisor backing it on first
    touch) are what makes allocating page-locked memory slow: one thread manages a few GB/s.
    ``ptr`` is 2 MiB aligned; transparent huge pages are asked for (fewer faults, fewer pages to
    pin), then each thread populates its share with MADV_POPULATE_WRITE, or memset where the
    kernel lacks it. ctypes releases the GIL for both calls.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise(ptr, nbytes, _MADV_HUGEPAGE)  # best effort: THP may be off

    def one(a: int, b: int) -> None:
        # Small pieces: each call holds the mm's lock, and a long hold stalls every mmap/munmap of
        # the process (thread stacks, large mallocs) for as long (seen: 270 ms stalls with 400 MB).
        for x in range(a, b, _POPULATE_PIECE):
            y = min(x + _POPULATE_PIECE, b)
            if madvise(ptr + x, y - x, _MADV_POPULATE_WRITE) != 0:
                ctypes.memset(ptr + x, 0, y - x)

    step = max(HUGE_PAGE, round_up(-(-nbytes // (threads * 4)), HUGE_PAGE))
    ranges = [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)]
    if threads <= 1 or len(ranges) == 1:
        for a, b in ranges:
            one(a, b)
        return
    with _thread_pool(min(threads, len(ranges))) as pool:
        for fut in [pool.submit(one, a, b) for a, b in ranges]:
            fut.result()


class PinnedHostMemory:
    """A host buffer of exactly ``nbytes``, page-locked when CUDA is present; ``.tensor`` is it.

    torch's pinned allocator rounds every request up to a power of two (a 6.4 GB state takes
    8.6 GB of page-locked RAM) and faults the pages in on one thread. Here the pages of a plain
    allocation are faulted in by ``threads`` threads and the exact range is then registered with
    ``cudaHostRegister`` (on a helper thread, so a failure cannot leave a stale CUDA error on the
    caller's thread); if registering fails, torch's pinned allocator is used instead. ``free()``
    (or garbage collection) unregisters before the memory is returned: callers must not have a
    copy in flight then. Small buffers, and every buffer without CUDA, use torch's allocator.
    """

    def __init__(self, nbytes: int, threads: int | None = None):
        self.nbytes = nbytes
        self.registered = False
        self.seconds: dict[str, float] = {}
        self._ptr = 0
        cuda = torch.cuda.is_available()
        if not cuda or nbytes < REGISTER_MIN_BYTES:
            self._raw = self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
            return
        threads = threads or default_threads()
        t0 = time.perf_counter()
        raw = torch.empty(nbytes + HUGE_PAGE + PAGE, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % HUGE_PAGE
        ptr, span = raw.data_ptr() + offset, round_up(nbytes, PAGE)
        populate(ptr, span, threads)
        t1 = time.perf_counter()
        cudart = torch.cuda.cudart()
        with _thread_pool(1) as pool:
            err = int(pool.submit(lambda: cudart.cudaHostRegister(ptr, span, 0)).result())
        t2 = time.perf_counter()
        self.seconds = {"populate": t1 - t0, "register": t2 - t1}
        if err != 0:
            log.warning(
                "nvme_tier: cudaHostRegister of %d bytes failed (cudaError %d); using torch's pinned allocator",
                span,
                err,
            )
            del raw
            self._raw = self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            return
        self._raw, self._ptr, self.registered = raw, ptr, True
        self.tensor = raw[offset : offset + nbytes]

    def free(self) -> None:
        """Unregister (when registered) and drop the memory."""
        if self.registered:
            self.registered = False
            err = int(torch.cuda.cudart().cudaHostUnregister(self._ptr))
            if err != 0:  # never hand registered pages back to malloc: keep them for the process
                log.warning("nvme_tier: cudaHostUnregister failed (cudaError %d); keeping the buffer", err)
                _LEAKED.append(self._raw)
        self.tensor = self._raw = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.free()


_LEAKED: list[torch.Tensor] = []
