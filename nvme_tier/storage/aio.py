"""NVMe backend on DeepSpeed's async_io op (libaio, O_DIRECT) with pinned staging slots from the shared pool.

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
from typing import Self

import torch

from ..config import AioSettings, OffloadStatesConfig
from ..deepspeed import aio_binding  # the op's calls differ by DeepSpeed version; settled per request
from ..device_copies import DeviceCopier
from ..errors import BackendUnavailableError, IntegrityError, TierIOError
from ..units import PAGE, round_down, round_up
from . import aio_handles
from .base import Capabilities, StorageBackend, chunk_ranges, crc32c, crc32c_of_buffer
from .file_stamps import is_private_file
from .manifest import TensorRecord, WriterDirectory
from .staging import staging_pool


def staging_plan(staging_budget_bytes: int, settings: AioSettings) -> tuple[int, int]:
    """(slots, bytes per slot) of the pinned staging that ``staging_budget_bytes`` buys."""
    alignment = settings.intra_op_parallelism * PAGE
    count = min(AioBackend.max_slots, max(2, staging_budget_bytes // AioBackend.max_chunk_bytes))
    chunk = round_down(min(staging_budget_bytes // count, AioBackend.max_chunk_bytes), alignment)
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

    __slots__ = ("buffer", "handle", "locked_by_handle", "pending", "settings")

    def __init__(self, handle, buffer: torch.Tensor, settings: AioSettings):
        self.handle = handle
        self.buffer = buffer
        self.settings = settings
        self.locked_by_handle = False
        self.pending = False

    def free(self) -> None:
        """Free the buffer (through its handle when the handle made it); the handle goes idle."""
        self.drain()
        if self.locked_by_handle:
            self.handle.free_cpu_locked_tensor(self.buffer)
        aio_handles.give_back_handle(self.settings, self.handle)
        self.handle = None  # not kept idle: destroyed now (its threads joined, its aio contexts freed)

    def wait(self, path: str) -> None:
        self.pending = False
        done = aio_binding.aio_wait(self.handle)  # never handle.wait(): DeepSpeed <0.18.4 deadlocks
        if done != 1:
            raise TierIOError(f"async I/O on {path} completed {done} of 1 requests", path)

    def drain(self) -> None:
        """After an error: let an in-flight request finish before its buffer or fd go away."""
        if self.pending:
            self.pending = False
            with contextlib.suppress(Exception):
                aio_binding.aio_wait(self.handle)


class AioBackend(StorageBackend):
    """One file per tensor, moved in chunks through pinned buffers, one aio handle each.

    The staging budget is split into ``slots`` buffers of at most ``max_chunk_bytes``: while the
    disk works on one or more chunks, the CPU/DMA fills (write) or drains (read) the next, so the
    disk never idles between requests, and only one chunk of copy + crc32c work is left
    un-overlapped at the start of a write or the end of a read. The buffers are checked out of the
    process-wide staging pool for one file's write or read and given back, so the engines of a
    process share them instead of each keeping its own.
    """

    capabilities = Capabilities(
        name="aio", alignment=PAGE, needs_libaio=True, o_direct=True, page_locked_staging=True
    )
    # 4 x 128 MiB (the default 512 MiB budget): on an H100 VM's virtio ext4 disk, 128 MiB chunks
    # rewrote 2.26-2.52 GB/s and read 1.49-1.60 vs 1.92-2.29 and 1.30-1.44 with 16 MiB (more bytes
    # in flight); the un-overlapped first copy + crc32c of a file grows to ~10 ms (docs/performance.md).
    max_chunk_bytes = 128 << 20
    min_chunk_bytes = 16 << 20
    max_slots = 4
    # Rewriting a name whose file has the same padded size overwrites that file in place. Deleting
    # it and writing a new one halved the rewrite bandwidth on the H100 VM's ext4 (mounted with
    # ``discard``: unlinking 4 GB took 1.2 s, and fresh blocks are allocated again; see
    # docs/performance.md).
    rewrite_in_place = True

    def __init__(
        self,
        directory: WriterDirectory,
        *,
        checksum: bool = True,
        settings: AioSettings | None = None,
        staging_budget_bytes: int = 512 << 20,
    ):
        super().__init__(directory, checksum=checksum)
        self.settings = settings or AioSettings()
        self.alignment = self.settings.intra_op_parallelism * PAGE
        self.staging_budget_bytes = staging_budget_bytes
        self.slot_count, self.chunk_bytes = staging_plan(staging_budget_bytes, self.settings)
        self._staging_bytes = 0
        self._copier = DeviceCopier()
        # files kept for an in-place rewrite by the next write: (st_dev, st_ino) recorded at write
        self._rewrite: dict[str, tuple[int, int]] = {}

    @classmethod
    def from_config(cls, config: OffloadStatesConfig, directory: WriterDirectory) -> Self:
        return super().from_config(config, directory, settings=config.aio)

    @classmethod
    def staging_slots(cls, config: OffloadStatesConfig) -> tuple[int, int]:
        return staging_plan(config.staging_budget_bytes, config.aio)

    def file_name(self, name: str) -> str:
        return f"{name}.bin"

    # -- staging slots: checked out of the process-wide pool for one file's write or read ----------
    @contextlib.contextmanager
    def _checked_out_slots(self, reading: bool) -> Iterator[list[_Slot]]:
        key = ("aio", aio_handles.handle_key(self.settings), self.chunk_bytes)
        aio_handles.use_handles(self.settings, self)
        pool = staging_pool()
        with pool.checkout(
            self, key, self.slot_count, self.chunk_bytes, self._new_slot, reading=reading
        ) as slots:
            self._staging_bytes = sum(slot.buffer.numel() for slot in slots)
            yield slots

    def _new_slot(self) -> _Slot:
        """A handle and a buffer it can DMA from without a bounce copy (kept together in the pool)."""
        shortfall = aio_handles.memlock_shortfall(self.slot_count * self.chunk_bytes)
        if shortfall:  # refuse in Python: past the limit DeepSpeed's allocator aborts the process
            raise BackendUnavailableError(f"aio backend: {shortfall}; {aio_handles.MEMLOCK_HINT}")
        handle = aio_handles.take_handle(self.settings)
        if torch.cuda.is_available():
            # torch's pinned allocator (cudaHostAlloc), not PinnedHostMemory: O_DIRECT from
            # registered huge-page memory ran ~35 % slower here (docs/performance.md).
            return _Slot(
                handle, torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True), self.settings
            )
        # no CUDA pinning here: the op's own page-locked, page-aligned allocation
        slot = _Slot(
            handle,
            handle.new_cpu_locked_tensor(self.chunk_bytes, torch.empty(0, dtype=torch.uint8)),
            self.settings,
        )
        slot.locked_by_handle = True
        return slot

    @property
    def pinned_bytes(self) -> int:
        """Staging bytes this backend checks out of the shared pool per file (0 before its first I/O)."""
        return self._staging_bytes

    def _release_resources(self) -> None:
        staging_pool().leave(self)
        aio_handles.stop_using_handles(self.settings, self)

    # -- hooks -----------------------------------------------------------------------------------
    def _write_bytes(self, name: str, src: torch.Tensor) -> tuple[str, int, list[int] | None]:
        with self._checked_out_slots(reading=False) as slots:
            return self._write_chunks(slots, name, src)

    def _write_chunks(
        self, slots: list[_Slot], name: str, src: torch.Tensor
    ) -> tuple[str, int, list[int] | None]:
        chunk = self._chunk_for(src.numel())
        file = self.file_name(name)
        path = self.directory.file_path(file)
        nbytes = src.numel()
        crcs: list[int] | None = [] if self.checksum else None
        samples: list[tuple[int, int]] = []  # (file offset, crc32c of the page written there)
        identity = self._rewrite.pop(file, None)
        fd = self._open_for_rewrite(file, identity) if identity is not None else None
        if fd is None:  # a new file of our own: never truncating or writing through what is there
            fd = self.directory.open(file, write=True, direct=True, exclusive=True)
        # The whole file's space is reserved on a helper thread while the first chunk is staged and
        # checksummed, and before its bytes move. (Reserving chunk by chunk instead, behind the
        # writes, was slower: ext4's fallocate waits for the inode's in-flight direct I/O.)
        reservation = aio_handles.reserver().submit(_reserve, fd, path, round_up(nbytes, self.alignment))
        op_path = self.directory.op_path(file)
        try:
            for i, (a, b) in enumerate(chunk_ranges(nbytes, chunk)):
                slot = slots[i % len(slots)]
                if slot.pending:
                    slot.wait(path)
                buf, length = slot.buffer, b - a
                padded = round_up(length, self.alignment)
                self._copier.copy(buf[:length], src[a:b])
                if padded > length:
                    buf[length:padded].zero_()
                if crcs is not None:
                    crcs.append(crc32c(buf[:length]))
                samples += self._sample_pages(buf, a, padded)
                if i == 0:
                    reservation.result()
                if aio_binding.aio_async_pwrite(slot.handle, buf[:padded], fd, op_path, a) != 0:
                    raise TierIOError(f"async write to {path} was refused", path)
                slot.pending = True
            for slot in slots:
                if slot.pending:
                    slot.wait(path)
            self._verify_written(file, fd, nbytes, samples)
            self._note_samples(file, samples, nbytes)  # re-read before a skip (_samples_hold)
        finally:
            for slot in slots:
                slot.drain()
            futures.wait([reservation])  # it uses fd
            os.close(fd)
        return file, chunk, crcs

    def _sample_pages(self, buf: torch.Tensor, file_offset: int, padded: int) -> list[tuple[int, int]]:
        """crc32c of the first page of each op thread's piece of a request, and of its last page.

        The op splits a request into ``intra_op_parallelism`` equal pieces (one per thread and
        aio context), each written in ``block_size`` requests: a failure of one thread's requests
        or of every request past some offset shows in these pages.
        """
        piece = padded // self.settings.intra_op_parallelism
        offsets = {*range(0, padded, max(piece, PAGE)), padded - PAGE}
        return [(file_offset + off, crc32c(buf[off : off + PAGE])) for off in sorted(offsets)]

    def _verify_written(self, file: str, fd: int, nbytes: int, samples: list[tuple[int, int]]) -> None:
        """Prove the writes reached the file: DeepSpeed's op drops per-request errors (EINVAL for
        a misaligned request, EIO from the device) and reports every request done regardless.

        Checks the file's size, then reads the sampled pages back with O_DIRECT (from the device,
        not the page cache) and compares their crc32c with what was staged. Cost: one 4 KiB read
        per op thread per chunk plus one, i.e. 9 reads (36 KiB) per chunk of up to 128 MiB with
        the default 8 threads, about 1 ms per chunk on an NVMe drive.
        """
        path = self.directory.file_path(file)
        size = os.fstat(fd).st_size
        if size < round_up(nbytes, self.alignment):
            raise TierIOError(f"{path} holds {size} of {nbytes} bytes after the write", path, errno.EIO)
        check = self.directory.open(file, write=False, direct=True)
        page = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT needs
        try:
            for offset, expected in samples:
                try:
                    got = os.preadv(check, [page], offset)
                except OSError as exc:
                    raise TierIOError(
                        f"reading back {path} at offset {offset} failed: {exc.strerror}", path, exc.errno
                    ) from None
                if got != PAGE or crc32c_of_buffer(page) != expected:
                    raise TierIOError(
                        f"{path}: the async_io op reported the write done, but the {PAGE} B at offset "
                        f"{offset} do not hold what was written (the op drops per-request errors: a "
                        "device I/O error, see dmesg, or an O_DIRECT length or offset the device "
                        "refuses, see aio.block_size)",
                        path,
                        errno.EIO,
                    )
        finally:
            page.close()
            os.close(check)

    def _read_bytes(self, record: TensorRecord, dst: torch.Tensor) -> None:
        with self._checked_out_slots(reading=True) as slots:
            self._read_chunks(slots, record, dst)

    def _read_chunks(self, slots: list[_Slot], record: TensorRecord, dst: torch.Tensor) -> None:
        if record.chunk_bytes > self.chunk_bytes:
            # Written with a larger budget: read with the chunking it was checksummed with.
            raise TierIOError(
                f"{record.file} was written in {record.chunk_bytes} B chunks, larger than this staging "
                f"buffer ({self.chunk_bytes} B); raise staging_budget_mb",
            )
        path = self.directory.file_path(record.file)
        fd = self.directory.open(record.file, write=False, direct=True)
        op_path = self.directory.op_path(record.file)
        try:
            size = os.fstat(fd).st_size
            if size < round_up(record.nbytes, self.alignment):
                raise IntegrityError(f"truncated file: {path} ({size} of {record.nbytes} bytes)", path)
            ranges = chunk_ranges(record.nbytes, record.chunk_bytes)

            def submit(i: int) -> None:
                a, b = ranges[i]
                slot = slots[i % len(slots)]
                # The op has no fd overload for reads: it opens op_path, which resolves through
                # our directory's fd, to the regular file just opened with O_NOFOLLOW above.
                if (
                    aio_binding.aio_async_pread(
                        slot.handle, slot.buffer[: round_up(b - a, self.alignment)], op_path, a
                    )
                    != 0
                ):
                    raise TierIOError(f"async read of {path} was refused", path)
                slot.pending = True

            for i in range(min(len(slots), len(ranges))):
                submit(i)
            for i, (a, b) in enumerate(ranges):
                slot = slots[i % len(slots)]
                slot.wait(path)
                host = slot.buffer[: b - a]
                self._check_crc(record, i, host)
                self._copier.copy(dst[a:b], host)
                if i + len(slots) < len(ranges):
                    submit(i + len(slots))
        finally:
            for slot in slots:
                slot.drain()
            os.close(fd)

    def _chunk_for(self, nbytes: int) -> int:
        """Large chunks for large tensors; at least 2 per slot for smaller ones (keeps them pipelined)."""
        want = round_up(-(-nbytes // (2 * self.slot_count)), self.alignment)
        return min(self.chunk_bytes, max(want, self.min_chunk_bytes))

    def _reuses_file(self, old: TensorRecord, nbytes: int) -> bool:
        """Keep ``old``'s file for an in-place rewrite when it is exactly the padded size and still
        the file written: nvme_tier's own (regular, one link, our uid), same inode, unchanged since
        (its stamp). Anything else is replaced by a new file, never written through."""
        if not self.rewrite_in_place or not old.file or old.file != self.file_name(old.name):
            return False
        if not old.stamps or len(old.stamps) != 1 or old.stamps[0].size != round_up(nbytes, self.alignment):
            return False
        try:
            if self.directory.first_change(old.stamps) is not None:
                return False
        except OSError:
            return False
        self._rewrite[old.file] = (old.stamps[0].dev, old.stamps[0].ino)
        return True

    def _open_for_rewrite(self, file: str, identity: tuple[int, int]) -> int | None:
        """O_DIRECT without O_CREAT/O_TRUNC: the blocks stay allocated. None (write a new file) when
        the file opened is not the one ``_reuses_file`` checked: fstat of the fd itself, so a file
        swapped in between the check and the open is never written through."""
        try:
            fd = self.directory.open(file, write=True, direct=True, create=False)
        except TierIOError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                return None
            raise
        st = os.fstat(fd)
        if is_private_file(st) and (st.st_dev, st.st_ino) == identity:
            return fd
        os.close(fd)
        return None

    def _samples_hold(self, record: TensorRecord) -> bool:
        """The pages sampled at write read back (O_DIRECT, from the device) as written."""
        if not record.samples:
            return True
        fd = self.directory.open(record.file, write=False, direct=True)
        try:
            self._verify_written(record.file, fd, record.nbytes, list(record.samples))
        except TierIOError:
            return False
        finally:
            os.close(fd)
        return True

    def _remove(self, record: TensorRecord) -> None:
        self._rewrite.pop(record.file, None)
        if record.file:
            self.directory.remove_file(record.file)
