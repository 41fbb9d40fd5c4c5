"""NVMe backend on DeepSpeed's async_io op (libaio, O_DIRECT) with double-buffered pinned staging.

Alignment: O_DIRECT needs buffer addresses, lengths and file offsets aligned. DeepSpeed splits a
request across ``intra_op_parallelism`` threads, so every on-disk length is padded to
``intra_op_parallelism * 4096`` bytes; the tail of the last chunk is zero-padded in staging and
the manifest keeps the true size. Space is reserved with ``posix_fallocate`` before the first
byte moves, because the async_io op does not report ENOSPC itself.
"""

from __future__ import annotations

import functools
import os

import torch

from ..config import AioSettings
from ..errors import BackendUnavailableError, IntegrityError, TierIOError
from .base import Capabilities, StorageBackend, chunk_ranges, crc32c
from .manifest import TensorRecord, WriterDirectory
from .staging import DeviceCopier, StagingPool, round_up

INSTALL_HINT = (
    "the 'aio' backend needs libaio and DeepSpeed's async_io op: run `apt-get install -y libaio-dev` "
    "(or `yum install libaio-devel`), then `ds_report` should show async_io [OKAY]; or use backend 'zarr'"
)
PAGE = 4096


@functools.lru_cache(maxsize=1)
def aio_compatible() -> tuple[bool, str]:
    """(usable, reason) without building anything."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as exc:  # pragma: no cover - deepspeed is a hard dependency
        return False, f"cannot import DeepSpeed's AsyncIOBuilder ({exc})"
    try:
        ok = AsyncIOBuilder().is_compatible(verbose=False)
    except Exception as exc:
        return False, f"async_io compatibility check failed ({exc})"
    return (True, "async_io op is compatible") if ok else (False, "libaio is not installed")


@functools.lru_cache(maxsize=1)
def load_aio_op():
    """Build (first time: minutes, then cached in ~/.cache/torch_extensions) and load async_io."""
    ok, why = aio_compatible()
    if not ok:
        raise BackendUnavailableError(f"{why}; {INSTALL_HINT}")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    try:
        return AsyncIOBuilder().load(verbose=False)
    except Exception as exc:
        raise BackendUnavailableError(
            f"building DeepSpeed's async_io op failed ({exc}); {INSTALL_HINT}"
        ) from exc


class AioBackend(StorageBackend):
    """One file per tensor, written and read in staging-sized chunks by one aio handle."""

    capabilities = Capabilities(name="aio", alignment=PAGE, needs_libaio=True, o_direct=True)

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
        self._handle = None
        self._pool: StagingPool | None = None
        self._copier = DeviceCopier()

    @staticmethod
    def file_name(name: str) -> str:
        return f"{name}.bin"

    # -- lazily built resources (on the worker thread) -------------------------------------------
    def _get_handle(self):
        if self._handle is None:
            op = load_aio_op()
            s = self.settings
            self._handle = op.aio_handle(
                s.block_size, s.queue_depth, s.single_submit, s.overlap_events, s.intra_op_parallelism
            )
        return self._handle

    def _get_pool(self) -> StagingPool:
        if self._pool is None:
            handle = self._get_handle()
            if torch.cuda.is_available():
                pool = StagingPool(self.staging_budget_bytes, self.alignment)
            else:  # no CUDA pinning here: the op's own page-locked, aligned allocation
                example = torch.empty(0, dtype=torch.uint8)
                pool = StagingPool(
                    self.staging_budget_bytes,
                    self.alignment,
                    allocator=lambda n: handle.new_cpu_locked_tensor(n, example),
                    free=handle.free_cpu_locked_tensor,
                )
            self._pool = pool
        return self._pool

    @property
    def pinned_bytes(self) -> int:
        return self._pool.allocated_bytes if self._pool else 0

    def _release_resources(self) -> None:
        if self._pool is not None:
            self._pool.release()
            self._pool = None
        self._handle = None

    def _wait_one(self, path: str) -> None:
        done = self._handle.wait()
        if done != 1:
            raise TierIOError(f"async I/O on {path} completed {done} of 1 requests", path)

    # -- hooks -----------------------------------------------------------------------------------
    def _write_bytes(self, name: str, src: torch.Tensor) -> tuple[str, int, list[int] | None]:
        handle = self._get_handle()
        pool = self._get_pool()
        bufs, chunk = pool.buffers, pool.buffer_bytes
        file = self.file_name(name)
        path = self.directory.file_path(file)
        nbytes = src.numel()
        crcs: list[int] | None = [] if self.checksum else None
        fd = self.directory.open(file, write=True, direct=True)
        try:
            try:
                os.posix_fallocate(fd, 0, round_up(nbytes, self.alignment))
            except OSError as exc:
                raise TierIOError(
                    f"cannot reserve {round_up(nbytes, self.alignment)} bytes for {path}: {exc.strerror}",
                    path,
                    exc.errno,
                ) from None
            in_flight = False
            for i, (a, b) in enumerate(chunk_ranges(nbytes, chunk)):
                buf, length = bufs[i % 2], b - a
                padded = round_up(length, self.alignment)
                self._copier.copy(buf[:length], src[a:b])
                if padded > length:
                    buf[length:padded].zero_()
                if crcs is not None:
                    crcs.append(crc32c(buf[:length]))
                if in_flight:
                    self._wait_one(path)
                if handle.async_pwrite(buf[:padded], fd, a) != 0:
                    raise TierIOError(f"async write to {path} was refused", path)
                in_flight = True
            if in_flight:
                self._wait_one(path)
            if os.fstat(fd).st_size < nbytes:
                raise TierIOError(f"short write to {path}", path)
        finally:
            os.close(fd)
        return file, chunk, crcs

    def _read_bytes(self, record: TensorRecord, dst: torch.Tensor) -> None:
        handle = self._get_handle()
        pool = self._get_pool()
        bufs = pool.buffers
        if record.chunk_bytes > pool.buffer_bytes:
            # Written with a larger budget: read with the chunking it was checksummed with.
            raise TierIOError(
                f"{record.file} was written in {record.chunk_bytes} B chunks, larger than this staging "
                f"buffer ({pool.buffer_bytes} B); raise staging_budget_mb",
            )
        path = self.directory.file_path(record.file)
        fd = self.directory.open(record.file, write=False, direct=True)
        try:
            size = os.fstat(fd).st_size
            if size < round_up(record.nbytes, self.alignment):
                raise IntegrityError(f"truncated file: {path} ({size} of {record.nbytes} bytes)", path)
            ranges = chunk_ranges(record.nbytes, record.chunk_bytes)

            def submit(i: int) -> None:
                a, b = ranges[i]
                # The op has no fd overload for reads; the name is inside our 0700 directory and
                # was just opened with O_NOFOLLOW above, so it is the regular file we wrote.
                if handle.async_pread(bufs[i % 2][: round_up(b - a, self.alignment)], path, a) != 0:
                    raise TierIOError(f"async read of {path} was refused", path)

            submit(0)
            for i, (a, b) in enumerate(ranges):
                self._wait_one(path)
                if i + 1 < len(ranges):
                    submit(i + 1)
                host = bufs[i % 2][: b - a]
                try:
                    self._check_crc(record, i, host)
                except IntegrityError:
                    if i + 1 < len(ranges):
                        self._wait_one(path)
                    raise
                self._copier.copy(dst[a:b], host)
        finally:
            os.close(fd)

    def _remove(self, record: TensorRecord) -> None:
        if record.file:
            self.directory.remove_file(record.file)
