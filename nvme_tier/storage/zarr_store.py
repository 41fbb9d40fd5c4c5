"""zarr v3 store: chunked uint8 arrays in a local store; needs no libaio.

Bytes are stored as uint8, so bf16/fp16 round-trip losslessly. Compression is off by default
(optimizer states are high-entropy floats); ``codec`` turns zstd or blosc on.

Uncompressed arrays (the default) have their metadata written by zarr and their chunk files
(``<name>.zarr/c/<i>``, exactly what zarr's bytes codec stores: the raw chunk, the last one
zero-padded) written and read by nvme_tier itself (``ChunkFiles``): several chunk files in flight
on a thread pool, with O_DIRECT where the filesystem takes it. On a 2-core machine zarr's own path
(page-cache copies, asyncio, a freshly allocated and filled output array per read, a second copy
into it) reached 0.24x / 0.40x of raw aio; see docs/performance.md. Compressed arrays go through
zarr's array API (``CodecChunks``), one chunk per request, on the same thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..config import ZarrSettings
from ..errors import BackendUnavailableError, IntegrityError, TierIOError
from ..units import PAGE, MiB, round_up
from .blocks import BlockFile, BlockStore, Capabilities, FutureSlot
from .checksums import chunk_ranges, host_array
from .chunk_files import chmod_regular, page_aligned, page_crc, read_file, write_file
from .manifest import WriterDirectory
from .probes import supports_o_direct
from .staging import HostBuffer


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


def _refuse_links(*paths: str) -> None:
    """zarr's LocalStore would write or read through a symlink planted at any of ``paths``."""
    for path in paths:
        if os.path.islink(path):
            raise TierIOError(f"refusing to follow a symlink: {path}", path, errno.ELOOP)


class ChunkFiles(BlockFile):
    """An uncompressed array's chunk files, each written whole (new file) or read on the thread pool."""

    def __init__(self, store: ZarrStore, root: str, chunk: int):
        super().__init__(root)
        self.store, self.chunk = store, chunk
        self.direct = store.use_direct(root, chunk)

    def padded(self, length: int) -> int:
        return self.chunk  # zarr stores the last chunk whole, padded with the fill value

    def chunk_path(self, index: int) -> str:
        return os.path.join(self.path, "c", str(index))

    def pwrite(self, slot: FutureSlot, view: torch.Tensor, index: int, offset: int) -> None:
        slot.pending = self.store.pool().submit(write_file, self.chunk_path(index), view, self.direct)

    def pread(self, slot: FutureSlot, view: torch.Tensor, index: int, offset: int) -> None:
        slot.pending = self.store.pool().submit(read_file, self.chunk_path(index), view, self.direct)

    def finish(self, nbytes: int) -> None:
        self.store.restrict_permissions(self.path)


class CodecChunks(ChunkFiles):
    """A compressed array's chunks, encoded and decoded by zarr (one chunk per request)."""

    def __init__(self, store: ZarrStore, root: str, chunk: int, array: Any):
        super().__init__(store, root, chunk)
        self.array = array

    def padded(self, length: int) -> int:
        return length

    def sample_offsets(self, padded: int) -> list[int]:
        return []  # the file holds encoded bytes: a page of the data cannot be found in it

    def pwrite(self, slot: FutureSlot, view: torch.Tensor, index: int, offset: int) -> None:
        slot.pending = self.store.pool().submit(self._encode, view, offset)

    def pread(self, slot: FutureSlot, view: torch.Tensor, index: int, offset: int) -> None:
        slot.pending = self.store.pool().submit(self._decode, view, index, offset)

    def _encode(self, view: torch.Tensor, offset: int) -> None:
        try:
            self.array[offset : offset + view.numel()] = host_array(view)
        except OSError as exc:  # zarr reports no file name: name the array being written
            _settle_zarr_io()
            raise TierIOError(
                f"writing {self.path} failed: {exc.strerror or exc}", self.path, exc.errno
            ) from None

    def _decode(self, view: torch.Tensor, index: int, offset: int) -> None:
        try:
            data = self.array[offset : offset + view.numel()]
        except Exception as exc:  # zarr raises codec errors on truncated chunks
            where = self.chunk_path(index)
            raise IntegrityError(f"cannot decode {where} ({exc})", where) from None
        view.copy_(torch.from_numpy(data))


class ZarrStore(BlockStore):
    """One zarr array per tensor under the writer directory (a zarr v3 LocalStore)."""

    capabilities = Capabilities(
        name="zarr", alignment=1, needs_libaio=False, o_direct=False, page_locked_staging=False
    )
    suffix = ".zarr"
    settings_key = "zarr"

    def __init__(self, directory: WriterDirectory, *, settings: ZarrSettings | None = None, **base: Any):
        """``base``: ``BlockStore``'s own arguments (``staging_budget_bytes``, ``staging``)."""
        super().__init__(directory, **base)
        self.settings = settings or ZarrSettings()
        # A chunk never exceeds the staging budget: staging holds whole chunks.
        self.chunk_bytes = max(1, min(self.settings.chunk_mb * MiB, self.staging_budget_bytes))
        # Chunks in flight at once (a staging slot each), within the staging budget.
        self.in_flight = max(1, min(self.settings.concurrency, self.staging_budget_bytes // self.chunk_bytes))
        self._store = None
        self._pool: ThreadPoolExecutor | None = None  # chunk requests in flight
        self._direct: bool | None = None  # O_DIRECT accepted by the directory's filesystem

    def chunk_for(self, nbytes: int) -> int:
        return min(self.chunk_bytes, nbytes)

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="nvme_tier-zarr")
        return self._pool

    @contextlib.contextmanager
    def slots(self, chunk_bytes: int, reading: bool) -> Iterator[list[FutureSlot]]:
        """Page-aligned staging, one buffer per chunk in flight, from the staging pool (pinned
        when CUDA is present; charged to the host budget) for the duration of one array."""
        size = round_up(max(chunk_bytes, self.chunk_bytes), PAGE)
        make = lambda: HostBuffer(size + PAGE)  # noqa: E731
        with self.checked_out(("zarr-ring", size), self.in_flight, size + PAGE, make, reading) as slots:
            self.pinned_bytes = self.in_flight * size  # (+ up to a page each for alignment, charged)
            yield [FutureSlot(page_aligned(slot.buffer, size)) for slot in slots]

    def use_direct(self, root: str, length: int) -> bool:
        """O_DIRECT for page-multiple lengths where the filesystem takes it (tmpfs does not)."""
        if length % PAGE:
            return False
        if self._direct is None:
            self._direct = supports_o_direct(root)
        return self._direct

    def _local_store(self):
        if self._store is None:
            self._store = _zarr().storage.LocalStore(self.directory.path)
        return self._store

    def _compressors(self):
        codec = self.settings.codec
        if codec == "none":
            return None
        from zarr.codecs import BloscCodec, ZstdCodec

        return ZstdCodec(level=1) if codec == "zstd" else BloscCodec(cname="lz4", clevel=1)

    def open_write(
        self, key: str, nbytes: int, chunk_bytes: int, reuse: tuple[int, int] | None = None
    ) -> ChunkFiles:
        root = self.directory.file_path(key)
        _refuse_links(root)
        try:
            array = _zarr().create_array(
                store=self._local_store(),
                name=key,
                shape=(nbytes,),
                chunks=(chunk_bytes,),
                dtype="uint8",
                compressors=self._compressors(),
                filters=None,
                fill_value=0,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
        except OSError as exc:
            _settle_zarr_io()
            path = exc.filename or root
            raise TierIOError(f"cannot create {path}: {exc.strerror}", path, exc.errno) from None
        if array.compressors:
            return CodecChunks(self, root, chunk_bytes, array)
        chunk_dir = os.path.join(root, "c")
        os.makedirs(chunk_dir, mode=0o700, exist_ok=True)
        _refuse_links(chunk_dir)
        return ChunkFiles(self, root, chunk_bytes)

    def restrict_permissions(self, root: str) -> None:
        """zarr creates 0755/0644 entries (umask); make them 0700/0600 like every file we own."""
        for dirpath, _dirs, files in os.walk(root):
            os.chmod(dirpath, 0o700)
            for f in files:
                chmod_regular(os.path.join(dirpath, f), 0o600)
        # The implicit root group's metadata, written by the first create_array.
        chmod_regular(os.path.join(self.directory.path, "zarr.json"), 0o600)

    def open_read(self, key: str, nbytes: int, chunk_bytes: int) -> ChunkFiles:
        root = self.directory.file_path(key)
        meta = os.path.join(root, "zarr.json")
        _refuse_links(root, meta, os.path.join(root, "c"))
        if not os.path.isdir(root):
            raise IntegrityError(f"missing file: {root}", root, errno.ENOENT)
        try:
            array = _zarr().open_array(self._local_store(), path=key, mode="r")
        except Exception as exc:  # any malformed metadata (bad JSON, not an object, bad codec...)
            raise IntegrityError(f"missing or unreadable zarr metadata: {meta} ({exc})", meta) from None
        if array.shape != (nbytes,) or array.chunks != (chunk_bytes,):
            raise IntegrityError(
                f"{meta}: shape {array.shape} / chunks {array.chunks} do not match the manifest "
                f"({nbytes},) / ({chunk_bytes},)",
                meta,
            )
        raw = not array.compressors  # uncompressed chunks are stored at exactly chunk_bytes
        for i in range(len(chunk_ranges(nbytes, chunk_bytes))):
            chunk_file = os.path.join(root, "c", str(i))
            if os.path.islink(chunk_file) or not os.path.isfile(chunk_file):
                raise IntegrityError(f"missing file: {chunk_file}", chunk_file)
            size = os.path.getsize(chunk_file)
            if raw and size != chunk_bytes:
                raise IntegrityError(
                    f"wrong size: {chunk_file} holds {size} bytes, the manifest {chunk_bytes}", chunk_file
                )
        return ChunkFiles(self, root, chunk_bytes) if raw else CodecChunks(self, root, chunk_bytes, array)

    def files(self, key: str, chunk_bytes: int, nbytes: int) -> list[str]:
        """The array's metadata and every chunk file (stamped at write, checked before a skip)."""
        chunks = len(chunk_ranges(nbytes, chunk_bytes))
        return [f"{key}/zarr.json", *(f"{key}/c/{i}" for i in range(chunks))]

    def page_crcs(self, key: str, chunk_bytes: int, offsets: list[int]) -> list[int | None]:
        """The first page of each sampled chunk file, as read back (raw arrays only)."""
        root = self.directory.file_path(key)
        direct = self.use_direct(root, chunk_bytes)
        length = min(PAGE, chunk_bytes)
        return [
            page_crc(
                os.path.join(root, "c", str(offset // chunk_bytes)),
                offset % chunk_bytes,
                length,
                direct and length == PAGE,
            )
            for offset in offsets
        ]

    def delete(self, key: str) -> None:
        path = self.directory.file_path(key)
        if os.path.islink(path):  # planted where our array was: remove the link, not its target
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        super().close()
        self._store = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
