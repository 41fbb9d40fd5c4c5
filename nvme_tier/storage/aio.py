"""NVMe store on DeepSpeed's async_io op (libaio, O_DIRECT) with pinned staging slots from the shared pool.

Alignment: O_DIRECT needs buffer addresses, lengths and file offsets aligned. DeepSpeed splits a
request across ``intra_op_parallelism`` threads, so every on-disk length is padded to
``intra_op_parallelism * 4096`` bytes; the tail of the last chunk is zero-padded in staging and
the manifest keeps the true size. Space is reserved with ``posix_fallocate`` before the first
byte moves, because the async_io op does not report ENOSPC itself.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import torch

from ..config import AioSettings
from ..deepspeed import aio_binding  # the op's calls differ by DeepSpeed version; settled per request
from ..errors import BackendUnavailableError, IntegrityError, TierIOError
from ..units import PAGE, MiB, round_down, round_up
from . import aio_handles  # handle_key read at each use: a test makes handles of other settings
from .aio_handles import MEMLOCK_HINT, AioHandlePool, memlock_shortfall
from .blocks import BlockFile, BlockStore, Capabilities
from .checksums import crc32c_of_buffer
from .file_stamps import is_private_file
from .manifest import WriterDirectory


def staging_plan(staging_budget_bytes: int, settings: AioSettings) -> tuple[int, int]:
    """(slots, bytes per slot) of the pinned staging that ``staging_budget_bytes`` buys."""
    alignment = settings.intra_op_parallelism * PAGE
    count = min(AioStore.max_slots, max(2, staging_budget_bytes // AioStore.max_chunk_bytes))
    chunk = round_down(min(staging_budget_bytes // count, AioStore.max_chunk_bytes), alignment)
    if chunk <= 0:
        raise ValueError(
            f"staging budget {staging_budget_bytes} B is below 2 x the aio alignment {alignment} B"
        )
    return count, chunk


def _reserve(fd: int, path: str, nbytes: int) -> None:
    """posix_fallocate ``nbytes`` of ``fd`` before any byte moves: the op does not report ENOSPC."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        raise TierIOError(
            f"cannot reserve {nbytes} bytes for {path}: {exc.strerror}", path, exc.errno
        ) from None


class _Slot:
    """One aio handle and the page-locked buffer it owns; at most one request in flight.

    ``aio_handle.wait()`` waits for *every* request of its handle, so keeping several requests in
    flight needs several handles. A buffer is allocated by its own handle: the op only skips its
    bounce-buffer copy for torch-pinned memory or memory its *own* pinned-tensor manager allocated.
    """

    __slots__ = ("buffer", "handle", "handle_key", "handles", "locked_by_handle", "path", "pending")

    def __init__(self, handle_key: tuple, handle, buffer: torch.Tensor, handles: AioHandlePool):
        self.handle_key = handle_key  # the settings it was made with: it goes back under them
        self.handle = handle
        self.buffer = buffer
        self.handles = handles
        self.locked_by_handle = False
        self.pending = False
        self.path = ""  # the file of the request in flight (what a wait error names)

    def free(self) -> None:
        """Free the buffer (through its handle when the handle made it); the handle goes idle."""
        self.drain()
        if self.locked_by_handle:
            self.handle.free_cpu_locked_tensor(self.buffer)
        self.handles.give_back(self.handle_key, self.handle)
        self.handle = None  # not kept idle: destroyed now (its threads joined, its aio contexts freed)

    def wait(self) -> None:
        if not self.pending:
            return
        self.pending = False
        done = aio_binding.aio_wait(self.handle)  # never handle.wait(): DeepSpeed <0.18.4 deadlocks
        if done != 1:
            raise TierIOError(f"async I/O on {self.path} completed {done} of 1 requests", self.path)

    def drain(self) -> None:
        """After an error: let an in-flight request finish before its buffer or fd go away."""
        if self.pending:
            self.pending = False
            with contextlib.suppress(Exception):
                aio_binding.aio_wait(self.handle)


class AioFile(BlockFile):
    """One ``<name>.bin`` open for the op's requests; a write's space is reserved first."""

    def __init__(self, store: AioStore, key: str, fd: int, reservation: futures.Future | None = None):
        super().__init__(store.directory.file_path(key))
        self.store = store
        self.fd = fd
        self.op_path = store.directory.op_path(key)
        self.reservation = reservation

    def padded(self, length: int) -> int:
        return round_up(length, self.store.alignment)

    def pwrite(self, slot: _Slot, view: torch.Tensor, index: int, offset: int) -> None:
        if self.reservation is not None:
            self.reservation.result()  # the whole file's space, reserved while chunk 0 was staged
        slot.path = self.path
        if aio_binding.aio_async_pwrite(slot.handle, view, self.fd, self.op_path, offset) != 0:
            raise TierIOError(f"async write to {self.path} was refused", self.path)
        slot.pending = True

    def pread(self, slot: _Slot, view: torch.Tensor, index: int, offset: int) -> None:
        # The op has no fd overload for reads: it opens op_path, which resolves through our
        # directory's fd, to the regular file just opened with O_NOFOLLOW (``open_read``).
        slot.path = self.path
        if aio_binding.aio_async_pread(slot.handle, view, self.op_path, offset) != 0:
            raise TierIOError(f"async read of {self.path} was refused", self.path)
        slot.pending = True

    def sample_offsets(self, padded: int) -> list[int]:
        """The first page of each op thread's piece of a request, and its last page.

        The op splits a request into ``intra_op_parallelism`` equal pieces (one per thread and
        aio context), each written in ``block_size`` requests: a failure of one thread's requests
        or of every request past some offset shows in these pages.
        """
        piece = padded // self.store.settings.intra_op_parallelism
        return sorted({*range(0, padded, max(piece, PAGE)), padded - PAGE})

    def finish(self, nbytes: int) -> None:
        size = os.fstat(self.fd).st_size
        if size < self.store.stored_size(nbytes):
            raise TierIOError(
                f"{self.path} holds {size} of {nbytes} bytes after the write", self.path, errno.EIO
            )

    def close(self) -> None:
        if self.reservation is not None:
            futures.wait([self.reservation])  # it uses fd
        os.close(self.fd)


class AioStore(BlockStore):
    """One file per tensor, moved in chunks through pinned buffers, one aio handle each.

    The staging budget is split into ``slot_count`` buffers of at most ``max_chunk_bytes``. The
    buffers are checked out of the staging pool for one file's write or read and given back, so
    the engines of a process share them instead of each keeping its own.
    """

    capabilities = Capabilities(
        name="aio",
        alignment=PAGE,
        needs_libaio=True,
        o_direct=True,
        page_locked_staging=True,
        rewrite_in_place=True,
        drops_write_errors=True,
    )
    suffix = ".bin"
    settings_key = "aio"
    # 4 x 128 MiB (the default 512 MiB budget): on an H100 VM's virtio ext4 disk, 128 MiB chunks
    # rewrote 2.26-2.52 GB/s and read 1.49-1.60 vs 1.92-2.29 and 1.30-1.44 with 16 MiB (more bytes
    # in flight); the un-overlapped first copy + crc32c of a file grows to ~10 ms (docs/performance.md).
    max_chunk_bytes = 128 * MiB
    min_chunk_bytes = 16 * MiB
    max_slots = 4
    dropped_writes = (
        "the op drops per-request errors: a device I/O error, see dmesg, or an O_DIRECT length or "
        "offset the device refuses, see aio.block_size"
    )

    def __init__(
        self,
        directory: WriterDirectory,
        *,
        settings: AioSettings | None = None,
        handles: AioHandlePool | None = None,
        **base: Any,
    ):
        """``base``: ``BlockStore``'s own arguments (``staging_budget_bytes``, ``staging``)."""
        super().__init__(directory, **base)
        self.settings = settings or AioSettings()
        self.handles = handles if handles is not None else AioHandlePool(self.staging)
        self.alignment = self.settings.intra_op_parallelism * PAGE
        self.slot_count, self.chunk_bytes = staging_plan(self.staging_budget_bytes, self.settings)

    @classmethod
    def staging_slots(cls, staging_budget_bytes: int, settings: AioSettings | None = None) -> tuple[int, int]:
        return staging_plan(staging_budget_bytes, settings or AioSettings())

    def chunk_for(self, nbytes: int) -> int:
        """Large chunks for large tensors; at least 2 per slot for smaller ones (keeps them pipelined)."""
        want = round_up(-(-nbytes // (2 * self.slot_count)), self.alignment)
        return min(self.chunk_bytes, max(want, self.min_chunk_bytes))

    def stored_size(self, nbytes: int) -> int:
        return round_up(nbytes, self.alignment)

    # -- staging slots: checked out of the shared pool for one file's write or read ---------------
    @contextlib.contextmanager
    def slots(self, chunk_bytes: int, reading: bool) -> Iterator[list[_Slot]]:
        if chunk_bytes > self.chunk_bytes:
            # Written with a larger budget: read with the chunking it was checksummed with.
            raise TierIOError(
                f"chunks of {chunk_bytes} B are larger than this staging buffer ({self.chunk_bytes} B); "
                "raise staging_budget_mb",
            )
        key = ("aio", aio_handles.handle_key(self.settings), self.chunk_bytes)
        self.handles.use(self.settings, self)
        with self.checked_out(key, self.slot_count, self.chunk_bytes, self._new_slot, reading) as slots:
            yield slots

    def _new_slot(self) -> _Slot:
        """A handle and a buffer it can DMA from without a bounce copy (kept together in the pool)."""
        shortfall = memlock_shortfall(self.slot_count * self.chunk_bytes)
        if shortfall:  # refuse in Python: past the limit DeepSpeed's allocator aborts the process
            raise BackendUnavailableError(f"aio backend: {shortfall}; {MEMLOCK_HINT}")
        handle_key, handle = self.handles.take(self.settings)
        if torch.cuda.is_available():
            # torch's pinned allocator (cudaHostAlloc), not PinnedHostMemory: O_DIRECT from
            # registered huge-page memory ran ~35 % slower here (docs/performance.md).
            buffer = torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True)
            return _Slot(handle_key, handle, buffer, self.handles)
        # no CUDA pinning here: the op's own page-locked, page-aligned allocation
        buffer = handle.new_cpu_locked_tensor(self.chunk_bytes, torch.empty(0, dtype=torch.uint8))
        slot = _Slot(handle_key, handle, buffer, self.handles)
        slot.locked_by_handle = True
        return slot

    def close(self) -> None:
        super().close()
        self.handles.stop_using(self.settings, self)

    # -- objects ---------------------------------------------------------------------------------
    def open_write(
        self, key: str, nbytes: int, chunk_bytes: int, reuse: tuple[int, int] | None = None
    ) -> AioFile:
        fd = self._open_for_rewrite(key, reuse) if reuse is not None else None
        if fd is None:  # a new file of our own: never truncating or writing through what is there
            fd = self.directory.open(key, write=True, direct=True, exclusive=True)
        # The whole file's space is reserved on a helper thread while the first chunk is staged and
        # checksummed, and before its bytes move. (Reserving chunk by chunk instead, behind the
        # writes, was slower: ext4's fallocate waits for the inode's in-flight direct I/O.)
        path = self.directory.file_path(key)
        reservation = self.handles.reserver().submit(_reserve, fd, path, self.stored_size(nbytes))
        return AioFile(self, key, fd, reservation)

    def open_read(self, key: str, nbytes: int, chunk_bytes: int) -> AioFile:
        fd = self.directory.open(key, write=False, direct=True)
        file = AioFile(self, key, fd)
        size = os.fstat(fd).st_size
        if size < self.stored_size(nbytes):
            file.close()
            raise IntegrityError(f"truncated file: {file.path} ({size} of {nbytes} bytes)", file.path)
        return file

    def _open_for_rewrite(self, key: str, identity: tuple[int, int]) -> int | None:
        """O_DIRECT without O_CREAT/O_TRUNC: the blocks stay allocated. None (write a new file) when
        the file opened is not the one kept (fstat of the fd itself, so a file swapped in between
        the caller's check and the open is never written through)."""
        try:
            fd = self.directory.open(key, write=True, direct=True, create=False)
        except TierIOError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                return None
            raise
        st = os.fstat(fd)
        if is_private_file(st) and (st.st_dev, st.st_ino) == identity:
            return fd
        os.close(fd)
        return None

    def page_crcs(self, key: str, chunk_bytes: int, offsets: list[int]) -> list[int | None]:
        """The sampled pages read back with O_DIRECT (from the device, not the page cache): one
        4 KiB read each, about 1 ms per 128 MiB chunk's 9 with the default 8 threads."""
        fd = self.directory.open(key, write=False, direct=True)
        page = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT needs
        try:
            return [self._page_crc(fd, page, key, offset) for offset in offsets]
        finally:
            page.close()
            os.close(fd)

    def _page_crc(self, fd: int, page: mmap.mmap, key: str, offset: int) -> int | None:
        try:
            got = os.preadv(fd, [page], offset)
        except OSError as exc:
            path = self.directory.file_path(key)
            raise TierIOError(
                f"reading back {path} at offset {offset} failed: {exc.strerror}", path, exc.errno
            ) from None
        return crc32c_of_buffer(page) if got == PAGE else None

    def delete(self, key: str) -> None:
        self.directory.remove_file(key)
