"""The storage backend interface: write named tensors to a private directory, read them back in place.

Every backend moves raw bytes (so bf16/fp16/bool are lossless), returns futures (I/O runs on the
backend's own worker thread), checksums each chunk with crc32c and commits a manifest last.
Subclasses declare their capabilities and file names and implement three small hooks;
nvme_tier.testing.conformance is the suite every backend passes.
"""

from __future__ import annotations

import abc
import ctypes
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import crc32c as crc32c_lib
import numpy as np
import torch

from ..config import OffloadStatesConfig
from ..errors import IntegrityError, TierIOError
from ..tensor_bytes import as_bytes
from .file_stamps import spread
from .manifest import MANIFEST_FILE, TensorRecord, WriterDirectory, check_name

log = logging.getLogger("nvme_tier")


@dataclass(frozen=True)
class Capabilities:
    """What a backend needs from the host and the path, and what it promises on disk.

    Selection decides from these alone, never from a class or its name (nvme_tier.storage.registry):
    each need is a check the host and the path must pass before ``auto`` takes the backend.
    """

    name: str  # its key in the registry
    alignment: int  # on-disk lengths and offsets are multiples of this many bytes
    # Runs on DeepSpeed's async_io op (``offload_states.aio``), one aio handle per staging slot: the
    # op must load, and the kernel's aio budget hold those handles.
    needs_libaio: bool
    # Bypasses the page cache: the path must take O_DIRECT, its device's logical block divide alignment.
    o_direct: bool
    # Its staging slots are page-locked (mlock'ed where CUDA does not pin them): they must fit ulimit -l.
    page_locked_staging: bool


def host_array(host_bytes: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU uint8 tensor that leaves the tensor's storage resizable.

    ``Tensor.numpy()`` permanently marks the storage non-resizable, and nvme_tier frees engine
    storages in place with ``resize_(0)``; so the view is built from the raw address instead.
    The caller keeps the tensor alive while the array is in use.
    """
    n = host_bytes.numel()
    if n == 0:
        return np.empty(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(host_bytes.data_ptr()))


def crc32c(host_bytes: torch.Tensor) -> int:
    """crc32c of a CPU uint8 tensor, computed with the GIL released (see ``crc32c_of_buffer``)."""
    return crc32c_of_buffer(host_array(host_bytes)) if host_bytes.numel() else 0


def crc32c_of_buffer(data: Any) -> int:
    """crc32c of any contiguous buffer (numpy array, mmap, bytes), hardware-accelerated.

    Always with the GIL released: backend workers checksum 128 MiB staging chunks while the
    caller's thread runs another model, and PyTorch takes the GIL back after every op, so a
    checksum that kept it (google-crc32c does, for anything but ``bytes`` of >= 1 MiB) would
    stall each of the caller's ops for the whole chunk (docs/design.md, "No GIL in the background").
    """
    return crc32c_lib.crc32c(data, gil_release_mode=1)


def chunk_ranges(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, nbytes)) for start in range(0, nbytes, chunk)]


class StorageBackend(abc.ABC):
    """Base of every backend. Constructors do no I/O; the directory is created on first write.

    A backend declares its ``capabilities``, names the file of each tensor (``file_name``) and
    implements three I/O hooks. Its constructor takes ``(directory, *, checksum, staging_budget_bytes)``
    (and keywords of its own): ``from_config``, how the registry opens it, passes those.
    """

    capabilities: ClassVar[Capabilities]

    def __init__(self, directory: WriterDirectory, *, checksum: bool = True):
        self.directory = directory
        self.checksum = checksum
        self._records: dict[str, TensorRecord] = {}
        # (nbytes, dtype, shape) of the newest write queued per name but not finished yet, so that a
        # read_into queued behind it is checked against, and reads, what that write stores.
        self._queued: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._samples: dict[str, tuple[tuple[int, int], ...]] = {}  # per file, noted by the last write

    # -- the public, future-returning API ------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor, fingerprint: str | None = None) -> Future[TensorRecord]:
        """Write ``tensor``'s bytes under ``name`` (replacing an older version) asynchronously.

        ``fingerprint`` (the caller's, of exactly these bytes) is kept in the record.
        """
        check_name(name)
        src = as_bytes(tensor)
        meta = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        queued = (src.numel(), *meta)
        with self._lock:
            self._queued[name] = queued
        try:
            return self._submit(lambda: self._write_job(name, src, meta, fingerprint, queued))
        except BaseException:
            self._forget_queued(name, queued)
            raise

    def read_into(self, name: str, out: torch.Tensor) -> Future[None]:
        """Read ``name`` into the preallocated ``out`` (same byte size), asynchronously.

        Jobs run in order, so a read queued right behind a write of ``name`` reads what that write
        stores (its size is what ``out`` is checked against).
        """
        with self._lock:
            expected = self._queued.get(name)
        if expected is None:
            record = self.record(name)
            expected = (record.nbytes, record.dtype, record.shape)
        dst = as_bytes(out)
        _check_size(name, dst, *expected)

        def job() -> None:
            record = self.record(name)  # now: after every write queued before this read
            _check_size(name, dst, record.nbytes, record.dtype, record.shape)
            self._read_job(record, dst)

        return self._submit(job)

    def delete(self, name: str) -> None:
        """Remove ``name``'s files once queued I/O on them is done."""
        self._submit(lambda: self._delete_job(name)).result()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def record(self, name: str) -> TensorRecord:
        with self._lock:
            try:
                return self._records[name]
            except KeyError:
                raise KeyError(f"no stored tensor named {name!r} in {self.directory.path}") from None

    def stored_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._records.values())

    def commit(self) -> None:
        """Write the manifest (last, atomically) after every queued write has finished."""
        self._submit(lambda: self.directory.commit_manifest(dict(self._records))).result()

    def verify_manifest(self) -> None:
        """Check that the committed manifest on disk is ours and matches what we wrote."""
        on_disk = self.directory.load_manifest()
        with self._lock:
            mine = dict(self._records)
        for name, rec in mine.items():
            if on_disk.get(name) != rec:
                path = self.directory.file_path(MANIFEST_FILE)
                data = self.directory.file_path(rec.file) if rec.file else name
                raise IntegrityError(f"{path}: the entry for {data} does not match what was written", path)

    def holds_written_bytes(self, record: TensorRecord) -> bool:
        """Whether ``record``'s files still hold exactly what was written: each one nvme_tier's own
        file, as stamped right after the write (same inode, size, mtime, ctime), and its sampled
        pages as written. False for a record without stamps (an older manifest): write it again.

        Cost: an ``lstat`` per file and a few page reads (benchmarks/skip_check_cost.py).
        """
        if record.stamps is None or not record.file:
            return False
        try:
            change = self.directory.first_change(record.stamps)
            if change is None and self._samples_hold(record):
                return True
        except OSError as exc:
            change = str(exc)
        log.warning(
            "nvme_tier: %s no longer holds what was written (%s); writing it again",
            self.directory.file_path(record.file),
            change or "a sampled page differs",
        )
        return False

    def release(self) -> None:
        """Wait for queued I/O, free staging memory and delete every file this writer owns."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._release_resources()
        with self._lock:
            self._records.clear()
            self._queued.clear()
        self.directory.remove()

    # -- what every backend declares -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: OffloadStatesConfig, directory: WriterDirectory, **knobs: Any) -> Self:
        """A backend writing into ``directory`` with the config's knobs, doing no I/O: how the
        registry opens it. A backend with a block of its own in the config passes it in ``knobs``."""
        return cls(
            directory, checksum=config.checksum, staging_budget_bytes=config.staging_budget_bytes, **knobs
        )

    @abc.abstractmethod
    def file_name(self, name: str) -> str:
        """The file (or directory) under the writer directory that holds ``name``'s bytes."""

    @classmethod
    def staging_slots(cls, config: OffloadStatesConfig) -> tuple[int, int]:
        """(count, bytes each) of the staging slots a backend built from ``config`` holds at once;
        selection sizes the page-locked memory and aio handles it needs from them. By default one
        slot of the whole staging budget, the most a backend may hold."""
        return 1, config.staging_budget_bytes

    # -- hooks for subclasses --------------------------------------------------------------------
    @abc.abstractmethod
    def _write_bytes(self, name: str, src: torch.Tensor) -> tuple[str, int, list[int] | None]:
        """Write ``src`` (flat uint8, any device); return (file, chunk_bytes, crcs)."""

    @abc.abstractmethod
    def _read_bytes(self, record: TensorRecord, dst: torch.Tensor) -> None:
        """Fill ``dst`` (flat uint8, any device) from ``record``, verifying checksums."""

    @abc.abstractmethod
    def _remove(self, record: TensorRecord) -> None:
        """Delete ``record``'s files."""

    def _reuses_file(self, old: TensorRecord, nbytes: int) -> bool:
        """True when the next ``_write_bytes`` overwrites ``old``'s file in place (kept, not removed)."""
        return False

    def _release_resources(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Free pinned buffers and handles (subclasses override)."""

    def _data_files(self, file: str, chunk_bytes: int, nbytes: int) -> list[str]:
        """The files (relative to the directory) holding a tensor written to ``file``: stamped."""
        return [file]

    def _note_samples(self, file: str, samples: list[tuple[int, int]], nbytes: int) -> None:
        """Keep some of a write's (offset, crc32c) page samples for its record (a spread of them)."""
        self._samples[file] = spread(samples, nbytes)

    def _samples_hold(self, record: TensorRecord) -> bool:
        """Whether the pages sampled at write still read back as written (hook; True: none sampled)."""
        return True

    # -- internals -------------------------------------------------------------------------------
    def _submit(self, fn: Callable):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)
        return self._executor.submit(on_callers_device(fn))

    def _forget_queued(self, name: str, queued: tuple | None) -> None:
        with self._lock:
            if queued is None or self._queued.get(name) is queued:
                self._queued.pop(name, None)

    def _write_job(
        self,
        name: str,
        src: torch.Tensor,
        meta: tuple[str, tuple[int, ...]],
        fingerprint: str | None = None,
        queued: tuple | None = None,
    ) -> TensorRecord:
        try:
            return self._write_job_inner(name, src, meta, fingerprint)
        finally:
            self._forget_queued(name, queued)

    def _write_job_inner(
        self, name: str, src: torch.Tensor, meta: tuple[str, tuple[int, ...]], fingerprint: str | None
    ) -> TensorRecord:
        self.directory.create()
        with self._lock:
            old = self._records.pop(name, None)
        if old is not None and not self._reuses_file(old, src.numel()):
            self._remove(old)
        try:
            stamps = samples = None
            if src.numel() == 0:
                file, chunk, crcs = "", 0, [] if self.checksum else None
            else:
                self._samples.pop(self.file_name(name), None)
                file, chunk, crcs = self._write_bytes(name, src)
                stamps = self.directory.stamps(self._data_files(file, chunk, src.numel()))
                samples = self._samples.pop(file, None)
        except OSError as exc:
            self._remove(TensorRecord(name, self.file_name(name), 0, "", (), 0))
            if isinstance(exc, TierIOError):
                raise
            path = exc.filename or self.directory.path
            raise TierIOError(f"writing {path} failed: {exc.strerror or exc}", path, exc.errno) from exc
        crc = tuple(crcs) if crcs is not None else None
        record = TensorRecord(name, file, src.numel(), *meta, chunk, crc, fingerprint, stamps, samples)
        with self._lock:
            self._records[name] = record
        return record

    def _read_job(self, record: TensorRecord, dst: torch.Tensor) -> None:
        if not record.nbytes:
            return
        try:
            self._read_bytes(record, dst)
        except OSError as exc:
            if isinstance(exc, TierIOError):
                raise
            path = exc.filename or self.directory.file_path(record.file)
            raise TierIOError(f"reading {path} failed: {exc.strerror or exc}", path, exc.errno) from exc

    def _delete_job(self, name: str) -> None:
        with self._lock:
            self._queued.pop(name, None)
            rec = self._records.pop(name, None)
        if rec is not None and rec.file:
            self._remove(rec)

    def _check_crc(self, record: TensorRecord, index: int, host: torch.Tensor) -> None:
        if record.crc32c is None or not self.checksum:
            return
        if crc32c(host) != record.crc32c[index]:
            path = self.directory.file_path(record.file)
            raise IntegrityError(f"checksum mismatch in {path} (chunk {index})", path)


def _check_size(name: str, dst: torch.Tensor, nbytes: int, dtype: str, shape: tuple[int, ...]) -> None:
    if dst.numel() != nbytes:
        raise ValueError(
            f"read_into({name!r}): destination holds {dst.numel()} bytes, the stored tensor "
            f"{nbytes} ({dtype}{list(shape)})"
        )


def on_callers_device(fn: Callable) -> Callable:
    """Run ``fn`` on the caller's CUDA device and current stream (worker threads start on device 0
    and its default stream): the copies it queues wait for that stream, not the default one, which
    may be busy meanwhile with the caller's other work (stream_order.py)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    device = torch.cuda.current_device() if cuda else None
    stream = torch.cuda.current_stream(device) if cuda else None

    def run():
        if device is None:
            return fn()
        torch.cuda.set_device(device)
        with torch.cuda.stream(stream):
            return fn()

    return run
