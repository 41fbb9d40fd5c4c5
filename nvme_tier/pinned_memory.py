"""Page-locked host memory of an exact size, made fast: faulted in by many threads, registered once.

The host copies of the cpu/pinned_cpu tiers live in it (host_copies.py). Making page-locked memory
is the slow part of a first offload (the kernel zeroes every new page, and in a VM the hypervisor
backs it on first touch), so a buffer can also be made piece by piece: faulting in and
registering are separate steps that a caller runs on different threads, one piece apart, while the
copies into earlier pieces run.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .units import PAGE, round_up

log = logging.getLogger("nvme_tier")

HUGE_PAGE = 2 << 20
# Below this, torch's pinned allocator is used as is (its power-of-two rounding costs little there).
REGISTER_MIN_BYTES = 64 << 20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in without writing it
_POPULATE_PIECE = 8 << 20


def default_threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


@contextlib.contextmanager
def _thread_pool(threads: int):
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nvme_tier-pin") as pool:
        yield pool


def _madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def ask_huge_pages(ptr: int, nbytes: int) -> None:
    """Ask for transparent huge pages over the whole range (fewer faults, fewer pages to pin).

    Once per buffer, before any piece is faulted in: each call changes the mapping's flags under
    the process's mm lock for writing, which waits for every fault and registration in flight.
    Best effort: THP may be off.
    """
    _madvise()(ptr, nbytes, _MADV_HUGEPAGE)


def populate(ptr: int, nbytes: int, threads: int, pool: ThreadPoolExecutor | None = None) -> None:
    """Fault ``[ptr, ptr + nbytes)`` in from several threads at once.

    Page faults (the kernel zeroing each page, and in a VM the hypervisor backing it on first
    touch) are what makes allocating page-locked memory slow: one thread manages a few GB/s.
    ``ptr`` is 2 MiB aligned and ``ask_huge_pages`` was called; each thread populates its share
    with MADV_POPULATE_WRITE, or memset where the kernel lacks it (ctypes releases the GIL for
    both). Populating piece after piece, pass one ``pool`` of ``threads`` workers for all of them:
    starting threads per piece maps their stacks under the mm lock for writing, stalling the
    registration running beside it (measured on the H100 machine: the first offload's faulting
    in took 2.7x as long).
    """
    madvise = _madvise()

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
    with (
        contextlib.nullcontext(pool)
        if pool is not None
        else _thread_pool(min(threads, len(ranges))) as workers
    ):
        for fut in [workers.submit(one, a, b) for a, b in ranges]:
            fut.result()


class PinnedHostMemory:
    """A host buffer of exactly ``nbytes``, page-locked when CUDA is present; ``.tensor`` is it.

    torch's pinned allocator rounds every request up to a power of two (a 6.4 GB state takes
    8.6 GB of page-locked RAM) and faults the pages in on one thread. Here the pages of a plain
    allocation are faulted in by ``threads`` threads and the exact range is then registered with
    ``cudaHostRegister`` (on a helper thread, so a failure cannot leave a stale CUDA error on the
    caller's thread). ``free()`` (or garbage collection) unregisters before the memory is returned:
    callers must not have a copy in flight then. Small buffers with CUDA use torch's allocator;
    without CUDA nothing is page-locked (plain memory, faulted in the same way).

    With ``piece_bytes`` the buffer is only reserved (untouched virtual memory): each piece is
    then faulted in by ``populate_piece(i)`` and registered by ``register_piece(i)``, in piece
    order, so a caller can fault piece i+1 in while piece i is registered and piece i-1 copied.
    """

    def __init__(self, nbytes: int, threads: int | None = None, piece_bytes: int | None = None):
        self.nbytes = nbytes
        self.registered = False
        self.seconds: dict[str, float] = {"populate": 0.0, "register": 0.0}
        self.threads = threads or default_threads()
        self._registered: list[int] = []  # addresses of the registered ranges
        cuda = torch.cuda.is_available()
        self._register = cuda and nbytes >= REGISTER_MIN_BYTES
        if cuda and not self._register:
            self._raw = self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.pieces: list[tuple[int, int]] = [(0, nbytes)]
            self._locked = len(self.pieces)
            return
        align = HUGE_PAGE if self._register else PAGE  # huge pages: fewer faults, fewer pages to pin
        raw = torch.empty(nbytes + align + PAGE, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % align
        self._raw, self._ptr = raw, raw.data_ptr() + offset
        self.tensor = raw[offset : offset + nbytes]
        step = round_up(piece_bytes or nbytes, HUGE_PAGE)
        self.pieces = [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)]
        self._locked = 0
        ask_huge_pages(self._ptr, round_up(nbytes, PAGE))
        if piece_bytes is None:
            with _thread_pool(1) as registering:  # a failure must not leave a CUDA error on our thread
                for index in range(len(self.pieces)):
                    self.populate_piece(index)
                    registering.submit(self.register_piece, index).result()
            if self._register and not self.registered:  # registering failed: torch's allocator instead
                self.free()
                self._raw = self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _span(self, index: int) -> tuple[int, int]:
        a, b = self.pieces[index]
        return a, min(round_up(b, PAGE), round_up(self.nbytes, PAGE)) - a

    def populate_piece(self, index: int, pool: ThreadPoolExecutor | None = None) -> None:
        """Fault piece ``index`` in (the kernel zeroes its pages) on ``threads`` threads, or ``pool``'s."""
        a, span = self._span(index)
        t0 = time.perf_counter()
        populate(self._ptr + a, span, self.threads, pool)
        self.seconds["populate"] += time.perf_counter() - t0

    def register_piece(self, index: int) -> None:
        """Register piece ``index`` with CUDA (after ``populate_piece``; pieces in order).

        Call it on a helper thread: a failed cudaHostRegister leaves a CUDA error on its thread.
        """
        a, span = self._span(index)
        t0 = time.perf_counter()
        if self._register:
            err = int(torch.cuda.cudart().cudaHostRegister(self._ptr + a, span, 0))
            if err == 0:
                self._registered.append(self._ptr + a)
                self.registered = True
            else:  # the piece stays pageable: copies into it are slower, not wrong
                log.warning("nvme_tier: cudaHostRegister of %d bytes failed (cudaError %d)", span, err)
        self.seconds["register"] += time.perf_counter() - t0
        self._locked += 1

    @property
    def fully_locked(self) -> bool:
        return self._locked == len(self.pieces)

    def free(self) -> None:
        """Unregister (when registered) and drop the memory."""
        ranges, self._registered = self._registered, []
        self.registered = False
        for ptr in ranges:
            err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
            if err != 0:  # never hand registered pages back to malloc: keep them for the process
                log.warning("nvme_tier: cudaHostUnregister failed (cudaError %d); keeping the buffer", err)
                _LEAKED.append(self._raw)
                break
        self.tensor = self._raw = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.free()


_LEAKED: list[torch.Tensor] = []
