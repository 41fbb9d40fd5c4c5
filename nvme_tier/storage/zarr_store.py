"""zarr v3 fallback backend: chunked uint8 arrays in a local store; needs no libaio.

Bytes are stored as uint8, so bf16/fp16 round-trip losslessly. Compression is off by default
(optimizer states are high-entropy floats); ``codec`` turns zstd or blosc on. I/O runs on the
backend's worker thread; zarr writes the chunks of each slice concurrently.
"""

from __future__ import annotations

import os

import torch

from ..config import ZarrSettings
from ..errors import BackendUnavailableError, IntegrityError, TierIOError
from .base import Capabilities, StorageBackend, chunk_ranges, crc32c, host_array
from .manifest import TensorRecord, WriterDirectory
from .staging import DeviceCopier, round_up

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
        self.chunk_bytes = self.settings.chunk_mb * MiB
        # A slice of several chunks is handed to zarr at once so it can write them concurrently;
        # its host copy (device sources only) stays within the staging budget.
        per_slice = max(1, min(self.settings.concurrency, staging_budget_bytes // self.chunk_bytes))
        self.slice_bytes = per_slice * self.chunk_bytes
        self._copier = DeviceCopier()
        self._store = None
        self._host: torch.Tensor | None = None

    @staticmethod
    def file_name(name: str) -> str:
        return f"{name}.zarr"

    @property
    def pinned_bytes(self) -> int:
        return self._host.numel() if self._host is not None else 0

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

    def _host_slice(self, nbytes: int) -> torch.Tensor:
        """A reusable host buffer for device sources (pinned when CUDA is present)."""
        size = round_up(min(nbytes, self.slice_bytes), 4096)
        if self._host is None or self._host.numel() < size:
            self._host = None
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self._host

    def _write_bytes(self, name: str, src: torch.Tensor) -> tuple[str, int, list[int] | None]:
        zarr = _zarr()
        file = self.file_name(name)
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
        for a, b in chunk_ranges(nbytes, self.slice_bytes):
            if src.is_cuda:
                host = self._host_slice(nbytes)[: b - a]
                self._copier.copy(host, src[a:b])
            else:
                host = src[a:b]
            if crcs is not None:
                crcs.extend(crc32c(host[x:y]) for x, y in chunk_ranges(b - a, chunk))
            array[a:b] = host_array(host)
        self._restrict_permissions(file)
        return file, chunk, crcs

    def _restrict_permissions(self, file: str) -> None:
        for dirpath, dirs, files in os.walk(self.directory.file_path(file)):
            os.chmod(dirpath, 0o700)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o600)

    def _read_bytes(self, record: TensorRecord, dst: torch.Tensor) -> None:
        zarr = _zarr()
        root = self.directory.file_path(record.file)
        try:
            array = zarr.open_array(self._get_store(), path=record.file, mode="r")
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise IntegrityError(f"missing or unreadable zarr array: {root} ({exc})", root) from None
        if array.shape != (record.nbytes,) or array.chunks != (record.chunk_bytes,):
            raise IntegrityError(f"{root}: shape {array.shape} does not match the manifest", root)
        ranges = chunk_ranges(record.nbytes, record.chunk_bytes)
        for i in range(len(ranges)):
            chunk_file = os.path.join(root, "c", str(i))
            if not os.path.isfile(chunk_file) or os.path.islink(chunk_file):
                raise IntegrityError(f"missing file: {chunk_file}", chunk_file)
        per_slice = max(1, self.slice_bytes // record.chunk_bytes)
        for first in range(0, len(ranges), per_slice):
            last = min(first + per_slice, len(ranges)) - 1
            a, b = ranges[first][0], ranges[last][1]
            try:
                data = array[a:b]
            except Exception as exc:  # zarr raises codec errors on truncated chunks
                raise IntegrityError(f"cannot decode {root}[{a}:{b}] ({exc})", root) from None
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
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)

    def _release_resources(self) -> None:
        self._host = None
        self._store = None
