"""Named tensors over a block store: records, checksums, the manifest, verification and skip checks.

``StorageBackend`` is what the core uses: it writes a tensor's raw bytes (so bf16/fp16/bool are
lossless) through the chunk pipeline into any ``BlockStore`` (blocks.py), returns futures (I/O
runs on its own worker thread, in order), checksums each chunk with crc32c, keeps a record per
name (size, dtype, shape, checksums, file stamps, sampled pages) and commits the manifest last.
Stores know none of this: they move bytes by key.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import IntegrityError, TierIOError
from ..tensor_bytes import as_bytes
from ..units import PAGE
from .blocks import BlockStore, Capabilities
from .checksums import ZERO_PAGE_CRC
from .file_stamps import spread
from .manifest import MANIFEST_FILE, TensorRecord, WriterDirectory, check_name
from .pipeline import ChunkPipeline, Samples

log = logging.getLogger("nvme_tier")


class StorageBackend:
    """Named tensors in one writer directory, over ``store``. Constructing it does no I/O."""

    def __init__(self, store: BlockStore, *, checksum: bool = True):
        self.store = store
        self.checksum = checksum
        self.pipeline = ChunkPipeline(checksum)
        self._records: dict[str, TensorRecord] = {}
        # (nbytes, dtype, shape) of the newest write queued per name but not finished yet, so that a
        # read_into queued behind it is checked against, and reads, what that write stores.
        self._queued: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def directory(self) -> WriterDirectory:
        return self.store.directory

    @property
    def capabilities(self) -> Capabilities:
        return self.store.capabilities

    @property
    def pinned_bytes(self) -> int:
        """Staging bytes the store checks out of the shared pool per file (0 before its first I/O)."""
        return self.store.pinned_bytes

    def file_name(self, name: str) -> str:
        """The file (or directory) under the writer directory that holds ``name``'s bytes."""
        return self.store.key(name)

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
        """Wait for queued I/O, give staging back and delete every file this writer owns."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.store.close()
        with self._lock:
            self._records.clear()
            self._queued.clear()
        self.directory.remove()

    # -- the jobs, on the worker thread, in order ------------------------------------------------
    def _submit(self, fn: Callable):
        if self._executor is None:
            prefix = f"nvme_tier-{self.capabilities.name}"
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=prefix)
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
        fingerprint: str | None,
        queued: tuple,
    ) -> TensorRecord:
        try:
            return self._write_record(name, src, meta, fingerprint)
        finally:
            self._forget_queued(name, queued)

    def _write_record(
        self, name: str, src: torch.Tensor, meta: tuple[str, tuple[int, ...]], fingerprint: str | None
    ) -> TensorRecord:
        self.directory.create()
        with self._lock:
            old = self._records.pop(name, None)
        reuse = self._reusable(old, src.numel()) if old is not None else None
        if old is not None and reuse is None and old.file:
            self.store.delete(old.file)
        key = self.store.key(name)
        try:
            stamps = samples = None
            if src.numel() == 0:
                file, chunk, crcs = "", 0, [] if self.checksum else None
            else:
                file, chunk = key, self.store.chunk_for(src.numel())
                crcs, sampled = self._write_bytes(key, src, chunk, reuse)
                stamps = self.directory.stamps(self.store.files(key, chunk, src.numel()))
                samples = spread(sampled, src.numel())  # re-read before a skip (_samples_hold)
        except OSError as exc:
            self.store.delete(key)
            if isinstance(exc, TierIOError):
                raise
            path = exc.filename or self.directory.path
            raise TierIOError(f"writing {path} failed: {exc.strerror or exc}", path, exc.errno) from exc
        crc = tuple(crcs) if crcs is not None else None
        record = TensorRecord(name, file, src.numel(), *meta, chunk, crc, fingerprint, stamps, samples)
        with self._lock:
            self._records[name] = record
        return record

    def _write_bytes(
        self, key: str, src: torch.Tensor, chunk: int, reuse: tuple[int, int] | None
    ) -> tuple[list[int] | None, Samples]:
        """Write ``src`` (flat uint8, any device) as object ``key``; (crcs, sampled pages)."""
        with (
            self.store.slots(chunk, reading=False) as slots,
            self.store.open_write(key, src.numel(), chunk, reuse) as file,
        ):
            crcs, samples = self.pipeline.write(slots, file, src, chunk)
            file.finish(src.numel())
        if self.capabilities.drops_write_errors:
            self._verify_written(key, chunk, samples)
        return crcs, samples

    def _verify_written(self, key: str, chunk: int, samples: Samples) -> None:
        """Prove the writes reached the file where the store's engine may drop per-request errors
        (DeepSpeed's op reports every request done regardless): the sampled pages, read back from
        the device, must hold what was staged. Cost: a few 4 KiB reads per chunk."""
        got = self.store.page_crcs(key, chunk, [offset for offset, _ in samples])
        bad = [(offset, crc) for (offset, expected), crc in zip(samples, got, strict=True) if crc != expected]
        if not bad:
            return
        path = self.directory.file_path(key)
        offset, crc = bad[0]
        found = {None: "cannot be read back", ZERO_PAGE_CRC: "read back as zeros (never written)"}
        raise TierIOError(
            f"{path}: the {self.capabilities.name} store reported the write done, but "
            f"{len(bad)} of {len(samples)} sampled {PAGE} B pages do not hold what was written; "
            f"the first, at offset {offset}, {found.get(crc, 'holds other bytes')} "
            f"({self.store.dropped_writes})",
            path,
            errno.EIO,
        )

    def _reusable(self, old: TensorRecord, nbytes: int) -> tuple[int, int] | None:
        """(st_dev, st_ino) of ``old``'s file when the store may rewrite it in place: exactly the
        stored size, and still the file written: nvme_tier's own (regular, one link, our uid), same
        inode, unchanged since (its stamp). Anything else is replaced by a new file, never written
        through."""
        if not self.capabilities.rewrite_in_place or not old.file or old.file != self.store.key(old.name):
            return None
        if not old.stamps or len(old.stamps) != 1 or old.stamps[0].size != self.store.stored_size(nbytes):
            return None
        try:
            if self.directory.first_change(old.stamps) is not None:
                return None
        except OSError:
            return None
        return old.stamps[0].dev, old.stamps[0].ino

    def _samples_hold(self, record: TensorRecord) -> bool:
        """Whether the pages sampled at write still read back as written (True: none sampled)."""
        if not record.samples:
            return True
        got = self.store.page_crcs(record.file, record.chunk_bytes, [offset for offset, _ in record.samples])
        return all(crc == expected for (_, expected), crc in zip(record.samples, got, strict=True))

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

    def _read_bytes(self, record: TensorRecord, dst: torch.Tensor) -> None:
        """Fill ``dst`` (flat uint8, any device) from ``record``'s object, verifying checksums."""
        chunk = record.chunk_bytes
        with (
            self.store.slots(chunk, reading=True) as slots,
            self.store.open_read(record.file, record.nbytes, chunk) as file,
        ):
            self.pipeline.read(slots, file, dst, chunk, record.crc32c)

    def _delete_job(self, name: str) -> None:
        with self._lock:
            self._queued.pop(name, None)
            rec = self._records.pop(name, None)
        if rec is not None and rec.file:
            self.store.delete(rec.file)


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
