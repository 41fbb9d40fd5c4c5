"""zarr v3 fallback backend: chunked uint8 arrays in a local store; needs no libaio.

Bytes are stored as uint8, so bf16/fp16 round-trip losslessly. Compression is off by default
(optimizer states are high-entropy floats); ``codec`` turns zstd or blosc on.

Uncompressed arrays (the default) have their metadata written by zarr and their chunk files
(``<name>.zarr/c/<i>``, exactly what zarr's bytes codec stores: the raw chunk, the last one
zero-padded) written and read by nvme_tier itself: through a ring of page-aligned staging buffers,
several chunk files in flight on a thread pool, with O_DIRECT where the filesystem takes it. On a
2-core machine zarr's own path (page-cache copies, asyncio, a freshly allocated and filled output
array per read, a second copy into it) reached 0.24x / 0.40x of raw aio; see docs/performance.md.
Compressed arrays go through zarr's array API.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import torch

from ..config import OffloadStatesConfig, ZarrSettings
from ..device_copies import DeviceCopier
from ..errors import BackendUnavailableError, IntegrityError, TierIOError
from ..units import PAGE, MiB, round_up
from .base import Capabilities, StorageBackend, chunk_ranges, crc32c, host_array
from .chunk_files import chmod_regular, page_aligned, page_crc, read_file, write_file
from .manifest import TensorRecord, WriterDirectory
from .probes import supports_o_direct
from .staging import HostBuffer, staging_pool


def _settle_zarr_io() -> None:
    """Wait for zarr's I/O still running after a call of it failed: zarr runs a call's writes side
    by side (``asyncio.gather``) and the first failure returns while the others go on; one still
    running (an array's metadata) re-created the array's directory after its removal."""
    try:
        from zarr.core.sync import sync  # zarr's own event loop, where its I/O tasks run
    except ImportError:  # a zarr without it: nothing to wait for that we can reach
        return

    async def settle() -> None:
        running = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*running, return_exceptions=True)

    sync(settle())


def _zarr():
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - zarr is a hard dependency
        raise BackendUnavailableError("the 'zarr' backend needs zarr>=3: pip install 'zarr>=3'") from exc
    return zarr


class ZarrBackend(StorageBackend):
    """One zarr array per tensor under the writer directory (a zarr v3 LocalStore)."""

    capabilities = Capabilities(
        name="zarr", alignment=1, needs_libaio=False, o_direct=False, page_locked_staging=False
    )

    def __init__(
        self,
        directory: WriterDirectory,
        *,
        checksum: bool = True,
        settings: ZarrSettings | None = None,
        staging_budget_bytes: int = 512 << 20,
    ):
        super().__init__(directory, checksum=checksum)
        self.settings = settings or ZarrSettings()
        # A chunk never exceeds the staging budget: a device source's host copy holds whole chunks.
        self.chunk_bytes = max(1, min(self.settings.chunk_mb * MiB, staging_budget_bytes))
        # A slice of several chunks is handed to zarr at once so it can write them concurrently;
        # its host copy (device sources only) stays within the staging budget.
        per_slice = max(1, min(self.settings.concurrency, staging_budget_bytes // self.chunk_bytes))
        self.slice_bytes = per_slice * self.chunk_bytes
        self._copier = DeviceCopier()
        self._store = None
        self._staging_bytes = 0  # staging checked out of the shared pool per write (0 before the first)
        self._pool: ThreadPoolExecutor | None = None  # chunk files in flight
        self._direct: bool | None = None  # O_DIRECT accepted by the directory's filesystem

    @classmethod
    def from_config(cls, config: OffloadStatesConfig, directory: WriterDirectory) -> Self:
        return super().from_config(config, directory, settings=config.zarr)

    def file_name(self, name: str) -> str:
        return f"{name}.zarr"

    @property
    def pinned_bytes(self) -> int:
        """Staging bytes this backend checks out of the shared pool per write (0 before its first)."""
        return self._staging_bytes

    def _get_store(self):
        if self._store is None:
            zarr = _zarr()
            self._store = zarr.storage.LocalStore(self.directory.path)
        return self._store

    def _compressors(self):
        codec = self.settings.codec
        if codec == "none":
            return None
        from zarr.codecs import BloscCodec, ZstdCodec

        return ZstdCodec(level=1) if codec == "zstd" else BloscCodec(cname="lz4", clevel=1)

    @contextlib.contextmanager
    def _host_slice(self) -> Iterator[torch.Tensor]:
        """A host buffer for device sources from the process-wide staging pool (pinned with CUDA)."""
        size = round_up(self.slice_bytes, PAGE)  # one size per backend config: idle buffers get reused
        with staging_pool().checkout(self, ("zarr", size), 1, size, lambda: HostBuffer(size)) as (slot,):
            self._staging_bytes = size
            yield slot.buffer

    def _write_bytes(self, name: str, src: torch.Tensor) -> tuple[str, int, list[int] | None]:
        zarr = _zarr()
        file = self.file_name(name)
        target = self.directory.file_path(file)
        if os.path.islink(target):  # zarr's LocalStore would write through it
            raise TierIOError(f"refusing to follow a symlink: {target}", target, errno.ELOOP)
        nbytes = src.numel()
        try:
            array = zarr.create_array(
                store=self._get_store(),
                name=file,
                shape=(nbytes,),
                chunks=(min(self.chunk_bytes, nbytes),),
                dtype="uint8",
                compressors=self._compressors(),
                filters=None,
                fill_value=0,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
        except OSError as exc:
            _settle_zarr_io()
            path = exc.filename or self.directory.file_path(file)
            raise TierIOError(f"cannot create {path}: {exc.strerror}", path, exc.errno) from None
        chunk = array.chunks[0]
        if not array.compressors:
            crcs = self._write_chunk_files(target, src, chunk)
            self._restrict_permissions(file)
            return file, chunk, crcs
        crcs: list[int] | None = [] if self.checksum else None
        with self._host_slice() if src.is_cuda else contextlib.nullcontext() as staging:
            self._write_slices(src, array, chunk, target, crcs, staging)
        self._restrict_permissions(file)
        return file, chunk, crcs

    def _write_slices(
        self,
        src: torch.Tensor,
        array: Any,
        chunk: int,
        target: str,
        crcs: list[int] | None,
        staging: torch.Tensor | None,
    ) -> None:
        for a, b in chunk_ranges(src.numel(), self.slice_bytes):
            if staging is not None:
                host = staging[: b - a]
                self._copier.copy(host, src[a:b])
            else:
                host = src[a:b]
            if crcs is not None:
                crcs.extend(crc32c(host[x:y]) for x, y in chunk_ranges(b - a, chunk))
            try:
                array[a:b] = host_array(host)
            except OSError as exc:  # zarr reports no file name: name the array being written
                _settle_zarr_io()
                raise TierIOError(
                    f"writing {target} failed: {exc.strerror or exc}", target, exc.errno
                ) from None

    def _restrict_permissions(self, file: str) -> None:
        """zarr creates 0755/0644 entries (umask); make them 0700/0600 like every file we own."""
        for dirpath, _dirs, files in os.walk(self.directory.file_path(file)):
            os.chmod(dirpath, 0o700)
            for f in files:
                chmod_regular(os.path.join(dirpath, f), 0o600)
        # The implicit root group's metadata, written by the first create_array.
        chmod_regular(os.path.join(self.directory.path, "zarr.json"), 0o600)

    def _read_bytes(self, record: TensorRecord, dst: torch.Tensor) -> None:
        zarr = _zarr()
        root = self.directory.file_path(record.file)
        meta = os.path.join(root, "zarr.json")
        for entry in (root, meta, os.path.join(root, "c")):
            if os.path.islink(entry):
                raise TierIOError(f"refusing to follow a symlink: {entry}", entry, errno.ELOOP)
        if not os.path.isdir(root):
            raise IntegrityError(f"missing file: {root}", root, errno.ENOENT)
        try:
            array = zarr.open_array(self._get_store(), path=record.file, mode="r")
        except Exception as exc:  # any malformed metadata (bad JSON, not an object, bad codec...)
            raise IntegrityError(f"missing or unreadable zarr metadata: {meta} ({exc})", meta) from None
        if array.shape != (record.nbytes,) or array.chunks != (record.chunk_bytes,):
            raise IntegrityError(
                f"{meta}: shape {array.shape} / chunks {array.chunks} do not match the manifest "
                f"({record.nbytes},) / ({record.chunk_bytes},)",
                meta,
            )
        raw = not array.compressors  # uncompressed chunks are stored at exactly chunk_bytes
        ranges = chunk_ranges(record.nbytes, record.chunk_bytes)
        for i in range(len(ranges)):
            chunk_file = os.path.join(root, "c", str(i))
            if os.path.islink(chunk_file) or not os.path.isfile(chunk_file):
                raise IntegrityError(f"missing file: {chunk_file}", chunk_file)
            size = os.path.getsize(chunk_file)
            if raw and size != record.chunk_bytes:
                raise IntegrityError(
                    f"wrong size: {chunk_file} holds {size} bytes, the manifest {record.chunk_bytes}",
                    chunk_file,
                )
        if raw:
            self._read_chunk_files(root, record, dst)
            return
        per_slice = max(1, self.slice_bytes // record.chunk_bytes)
        for first in range(0, len(ranges), per_slice):
            last = min(first + per_slice, len(ranges)) - 1
            a, b = ranges[first][0], ranges[last][1]
            try:
                data = array[a:b]
            except Exception as exc:  # zarr raises codec errors on truncated chunks
                where = os.path.join(root, "c", str(first) if first == last else f"{{{first}..{last}}}")
                raise IntegrityError(f"cannot decode {where} ({exc})", where) from None
            host = torch.from_numpy(data)
            for i in range(first, last + 1):
                x, y = ranges[i]
                try:
                    self._check_crc(record, i, host[x - a : y - a])
                except IntegrityError as exc:
                    path = os.path.join(root, "c", str(i))
                    raise IntegrityError(f"checksum mismatch in {path}", path) from exc
            self._copier.copy(dst[a:b], host)

    def _data_files(self, file: str, chunk_bytes: int, nbytes: int) -> list[str]:
        """The array's metadata and every chunk file (stamped at write, checked before a skip)."""
        chunks = len(chunk_ranges(nbytes, chunk_bytes))
        return [f"{file}/zarr.json", *(f"{file}/c/{i}" for i in range(chunks))]

    def _samples_hold(self, record: TensorRecord) -> bool:
        """The first page of each sampled chunk file reads back as written (raw arrays only)."""
        root = self.directory.file_path(record.file)
        direct = self._use_direct(root, record.chunk_bytes)
        for offset, expected in record.samples or ():
            path = os.path.join(root, "c", str(offset // record.chunk_bytes))
            length = min(PAGE, record.chunk_bytes)
            if page_crc(path, offset % record.chunk_bytes, length, direct and length == PAGE) != expected:
                return False
        return True

    def _remove(self, record: TensorRecord) -> None:
        if not record.file:
            return
        import shutil

        path = self.directory.file_path(record.file)
        if os.path.islink(path):  # planted where our array was: remove the link, not its target
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)

    # -- raw chunk files ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _ring(self, chunk: int, reading: bool) -> Iterator[list[torch.Tensor]]:
        """Page-aligned staging, one buffer per chunk file in flight, from the process-wide pool
        (pinned when CUDA is present; charged to the host budget) for the duration of one file."""
        size = round_up(max(chunk, self.chunk_bytes), PAGE)
        count = max(1, self.slice_bytes // self.chunk_bytes)
        key = ("zarr-ring", size)
        make = lambda: HostBuffer(size + PAGE)  # noqa: E731
        with staging_pool().checkout(self, key, count, size + PAGE, make, reading=reading) as slots:
            self._staging_bytes = count * size  # (+ up to a page each for alignment, charged to the pool)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="nvme_tier-zarr")
            yield [page_aligned(slot.buffer, size) for slot in slots]

    def _use_direct(self, root: str, length: int) -> bool:
        """O_DIRECT for page-multiple lengths where the filesystem takes it (tmpfs does not)."""
        if length % PAGE:
            return False
        if self._direct is None:
            self._direct = supports_o_direct(root)
        return self._direct

    def _write_chunk_files(self, target: str, src: torch.Tensor, chunk: int) -> list[int] | None:
        """Each chunk staged (and checksummed) while the chunk files before it are written."""
        chunk_dir = os.path.join(target, "c")
        os.makedirs(chunk_dir, mode=0o700, exist_ok=True)
        if os.path.islink(chunk_dir):
            raise TierIOError(f"refusing to follow a symlink: {chunk_dir}", chunk_dir, errno.ELOOP)
        with self._ring(chunk, reading=False) as ring:
            return self._write_chunks_through(ring, chunk_dir, target, src, chunk)

    def _write_chunks_through(
        self, ring: list[torch.Tensor], chunk_dir: str, target: str, src: torch.Tensor, chunk: int
    ) -> list[int] | None:
        direct = self._use_direct(target, chunk)
        crcs: list[int] | None = [] if self.checksum else None
        samples: list[tuple[int, int]] = []
        inflight: list[Future | None] = [None] * len(ring)
        try:
            for i, (a, b) in enumerate(chunk_ranges(src.numel(), chunk)):
                slot = i % len(ring)
                if inflight[slot] is not None:
                    inflight[slot].result()
                buf = ring[slot][:chunk]
                self._copier.copy(buf[: b - a], src[a:b])
                if b - a < chunk:  # zarr stores the last chunk whole, padded with the fill value
                    buf[b - a :].zero_()
                if crcs is not None:
                    crcs.append(crc32c(buf[: b - a]))
                samples.append((a, crc32c(buf[: min(PAGE, chunk)])))  # checked before a skip
                path = os.path.join(chunk_dir, str(i))
                inflight[slot] = self._pool.submit(write_file, path, buf, direct)
        finally:
            errors = [f.exception() for f in inflight if f is not None]
        error = next((e for e in errors if e is not None), None)
        if isinstance(error, OSError):
            path = error.filename or target
            raise TierIOError(f"writing {path} failed: {error.strerror or error}", path, error.errno)
        if error is not None:
            raise error
        self._note_samples(os.path.basename(target), samples, src.numel())
        return crcs

    def _read_chunk_files(self, root: str, record: TensorRecord, dst: torch.Tensor) -> None:
        """Several chunk files read ahead into staging; each verified, then copied to ``dst``."""
        with self._ring(record.chunk_bytes, reading=True) as ring:
            self._read_chunks_through(ring, root, record, dst)

    def _read_chunks_through(
        self, ring: list[torch.Tensor], root: str, record: TensorRecord, dst: torch.Tensor
    ) -> None:
        chunk = record.chunk_bytes
        direct = self._use_direct(root, chunk)
        ranges = chunk_ranges(record.nbytes, chunk)
        inflight: list[Future | None] = [None] * len(ring)

        def submit(i: int) -> None:
            path = os.path.join(root, "c", str(i))
            inflight[i % len(ring)] = self._pool.submit(read_file, path, ring[i % len(ring)][:chunk], direct)

        try:
            for i in range(min(len(ring), len(ranges))):
                submit(i)
            for i, (a, b) in enumerate(ranges):
                slot = i % len(ring)
                inflight[slot].result()
                host = ring[slot][: b - a]
                try:
                    self._check_crc(record, i, host)
                except IntegrityError as exc:
                    path = os.path.join(root, "c", str(i))
                    raise IntegrityError(f"checksum mismatch in {path}", path) from exc
                self._copier.copy(dst[a:b], host)
                if i + len(ring) < len(ranges):
                    submit(i + len(ring))
        finally:
            for f in inflight:
                if f is not None:
                    f.exception()  # never reuse or free a buffer a read still fills

    def _release_resources(self) -> None:
        staging_pool().leave(self)
        self._store = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
