"""zarr v3 fallback backend: chunked uint8 arrays in a local store; needs no libaio.

Bytes are stored as uint8, so bf16/fp16 round-trip losslessly. Compression is off by default
(optimizer states are high-entropy floats); ``codec`` turns zstd or blosc on. I/O runs on the
backend's worker thread; zarr writes the chunks of each slice concurrently.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..config import ZarrSettings
from ..errors import BackendUnavailableError, IntegrityError, TierIOError
from .base import Capabilities, StorageBackend, chunk_ranges, crc32c, host_array
from .manifest import TensorRecord, WriterDirectory
from .staging import DeviceCopier, HostBuffer, round_up, staging_pool

MiB = 1 << 20


def _zarr():
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - zarr is a hard dependency
        raise BackendUnavailableError("the 'zarr' backend needs zarr>=3: pip install 'zarr>=3'") from exc
    return zarr


class ZarrBackend(StorageBackend):
    """One zarr array per tensor under the writer directory (a zarr v3 LocalStore)."""

    capabilities = Capabilities(name="zarr", alignment=1, needs_libaio=False, o_direct=False)

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
        self._staging_bytes = 0

    @staticmethod
    def file_name(name: str) -> str:
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
        size = round_up(self.slice_bytes, 4096)  # one size per backend config: idle buffers get reused
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
            path = exc.filename or self.directory.file_path(file)
            raise TierIOError(f"cannot create {path}: {exc.strerror}", path, exc.errno) from None
        crcs: list[int] | None = [] if self.checksum else None
        chunk = array.chunks[0]
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
                raise TierIOError(
                    f"writing {target} failed: {exc.strerror or exc}", target, exc.errno
                ) from None

    def _restrict_permissions(self, file: str) -> None:
        """zarr creates 0755/0644 entries (umask); make them 0700/0600 like every file we own."""
        for dirpath, _dirs, files in os.walk(self.directory.file_path(file)):
            os.chmod(dirpath, 0o700)
            for f in files:
                _chmod_regular(os.path.join(dirpath, f), 0o600)
        # The implicit root group's metadata, written by the first create_array.
        _chmod_regular(os.path.join(self.directory.path, "zarr.json"), 0o600)

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

    def _remove(self, record: TensorRecord) -> None:
        if not record.file:
            return
        import shutil

        path = self.directory.file_path(record.file)
        if os.path.islink(path):  # planted where our array was: remove the link, not its target
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)

    def _release_resources(self) -> None:
        staging_pool().leave(self)
        self._store = None


def _chmod_regular(path: str, mode: int) -> None:
    """chmod a regular file; never through a symlink."""
    if os.path.isfile(path) and not os.path.islink(path):
        os.chmod(path, mode)
