"""Move a set of state buffers to their tiers and back, all-or-nothing.

A *state buffer* is one tensor storage (the unit memory is allocated in). Freeing the storage
frees it for every view that shares it (params that are views into a flat buffer, optimizer
fragments...), and restoring it in place brings every view back with its identity intact, so the
engine's own bookkeeping needs no re-pointing.

Offload order: copy/write everything, wait, verify, commit the manifest, and only then free
device memory. Any failure before that point removes what this call wrote and leaves every
state where it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import psutil
import torch

from .errors import IntegrityError, TierIOError
from .storage.base import StorageBackend
from .storage.staging import DeviceCopier, PinnedHostMemory
from .types import StateKind, Tier

log = logging.getLogger("nvme_tier")


@dataclass(eq=False)
class StateBuffer:
    """One storage holding (part of) a state, addressed as a flat uint8 view over all of it."""

    kind: StateKind
    name: str
    view: torch.Tensor
    # Content fingerprint of the bytes being offloaded (taken when skip_unchanged is on); a write
    # records it, so a later offload can tell whether the file still holds the live bytes.
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.nbytes = self.view.numel()
        self.device = self.view.device

    @classmethod
    def of(cls, kind: StateKind, name: str, tensor: torch.Tensor) -> StateBuffer:
        storage = tensor.untyped_storage()
        return cls(kind, name, torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage))

    @property
    def resizable(self) -> bool:
        """False for page-locked host storages: they cannot be freed in place."""
        return self.view.untyped_storage().resizable()

    @property
    def is_freed(self) -> bool:
        return self.view.untyped_storage().nbytes() == 0

    def free(self) -> None:
        """Release the memory for every view of this storage at once."""
        self.view.untyped_storage().resize_(0)

    def restore(self) -> None:
        """Re-grow the same storage (contents undefined until filled): every view is valid again."""
        self.view.untyped_storage().resize_(self.nbytes)


@dataclass(eq=False)
class Placed:
    """Where one buffer went: a host copy, a stored record, or nowhere (discarded)."""

    buffer: StateBuffer
    tier: Tier
    host: torch.Tensor | None = None


@dataclass
class TransferStats:
    bytes_written: int = 0
    bytes_skipped: int = 0
    bytes_to_host: int = 0
    bytes_read: int = 0
    bytes_from_host: int = 0
    seconds: float = 0.0


class TierMover:
    """Executes placements. Keeps page-locked host copies for reuse across cycles."""

    def __init__(self, backend: Callable[[], StorageBackend], progress: Callable | None = None):
        self._backend_factory = backend
        self._backend: StorageBackend | None = None
        self._pinned_cache: dict[str, PinnedHostMemory] = {}
        self._cache_lock = threading.Lock()
        self._prealloc: threading.Thread | None = None
        self._prealloc_stop = threading.Event()
        self._copier = DeviceCopier()
        self._progress = progress

    @property
    def backend(self) -> StorageBackend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    @property
    def has_backend(self) -> bool:
        return self._backend is not None

    @property
    def pinned_bytes(self) -> int:
        with self._cache_lock:
            cache = sum(m.nbytes for m in self._pinned_cache.values())
        return cache + (getattr(self._backend, "pinned_bytes", 0) if self._backend else 0)

    def preallocate(self, buffers: list[StateBuffer]) -> None:
        """Allocate the page-locked host copies of ``buffers`` on a background thread.

        Page-locking tens of GB takes seconds (page faults, pinning); done at attach it overlaps
        with training, so the first offload to pinned_cpu costs what later ones do. Only with
        CUDA (elsewhere host copies are plain memory), and only when RAM is plentiful.
        """
        if not torch.cuda.is_available() or self._prealloc is not None:
            return
        with self._cache_lock:
            wanted = [(b.name, b.nbytes) for b in buffers if b.name not in self._pinned_cache and b.nbytes]
        total = sum(n for _, n in wanted)
        if not total or total > psutil.virtual_memory().available // 2:
            return

        def run() -> None:
            for name, nbytes in wanted:
                if self._prealloc_stop.is_set():
                    return
                try:  # half the cores: leave the others to the training that runs meanwhile
                    mem = PinnedHostMemory(nbytes, threads=max(1, (os.cpu_count() or 2) // 2))
                except Exception as exc:  # the first offload allocates (and reports) instead
                    log.info("nvme_tier: background pinned allocation stopped: %s", exc)
                    return
                with self._cache_lock:
                    if name not in self._pinned_cache:
                        self._pinned_cache[name], mem = mem, None
                if mem is not None:
                    mem.free()

        self._prealloc = threading.Thread(target=run, name="nvme_tier-prealloc", daemon=True)
        self._prealloc.start()

    def _join_prealloc(self) -> None:
        if self._prealloc is not None:
            self._prealloc.join()

    def _host_buffer(self, buf: StateBuffer, pinned: bool) -> torch.Tensor:
        if not pinned:
            return torch.empty(buf.nbytes, dtype=torch.uint8)
        self._join_prealloc()
        with self._cache_lock:
            cached = self._pinned_cache.get(buf.name)
        if cached is None or cached.nbytes != buf.nbytes:
            if cached is not None:
                cached.free()
            cached = PinnedHostMemory(buf.nbytes)
            with self._cache_lock:
                self._pinned_cache[buf.name] = cached
        return cached.tensor

    def offload(
        self, items: list[tuple[StateBuffer, Tier]], unchanged: Callable[[StateBuffer], bool]
    ) -> tuple[list[Placed], TransferStats]:
        stats = TransferStats()
        start = time.perf_counter()
        placed: list[Placed] = []
        written: list[str] = []
        futures: list[tuple[StateBuffer, Future]] = []
        try:
            for buf, tier in items:
                if tier is Tier.nvme:
                    if unchanged(buf):
                        stats.bytes_skipped += buf.nbytes
                    else:
                        futures.append(
                            (buf, self.backend.write(buf.name, buf.view, fingerprint=buf.fingerprint))
                        )
                        written.append(buf.name)
                    placed.append(Placed(buf, tier))
            for buf, tier in items:
                if tier in (Tier.cpu, Tier.pinned_cpu):
                    host = self._host_buffer(buf, pinned=tier is Tier.pinned_cpu)
                    self._copier.copy_async(host, buf.view)  # back to back: no gap between copies
                    stats.bytes_to_host += buf.nbytes
                    placed.append(Placed(buf, tier, host))
                elif tier is Tier.discard:
                    placed.append(Placed(buf, tier))
            self._copier.synchronize()
            for buf, fut in futures:
                fut.result()
                stats.bytes_written += buf.nbytes
                if self._progress:
                    self._progress(buf.nbytes)
            if futures:
                self.backend.commit()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._copier.synchronize()  # no DMA may still target a host copy being dropped
            self._undo_writes(written)
            for p in placed:
                p.host = None
            if isinstance(exc, (TierIOError, KeyboardInterrupt)):
                raise
            if isinstance(exc, OSError):
                path = exc.filename or (self._backend.directory.path if self._backend else "?")
                raise TierIOError(
                    f"offload to {path} failed: {exc}; nothing was freed", path, exc.errno
                ) from exc
            raise
        # Everything is safely elsewhere: now (and only now) release device memory.
        for p in placed:
            p.buffer.free()
        stats.seconds = time.perf_counter() - start
        return placed, stats

    def _undo_writes(self, names: list[str]) -> None:
        if not names or self._backend is None:
            return
        for name in names:
            try:
                self._backend.delete(name)
            except Exception as exc:  # keep the original error (if any); report the leftover
                log.warning("nvme_tier: could not remove the file of %s: %s", name, exc)

    def reload(self, placed: list[Placed], keep_files: bool) -> TransferStats:
        """Restore every buffer; on a verification failure free them again and raise."""
        stats = TransferStats()
        start = time.perf_counter()
        futures: list[tuple[Placed, Future]] = []
        try:
            for p in placed:
                if p.tier is Tier.nvme:
                    p.buffer.restore()
                    futures.append((p, self.backend.read_into(p.buffer.name, p.buffer.view)))
            # Host copies back to back on the side stream; each device allocation (restore) overlaps
            # the copy queued before it.
            for p in placed:
                if p.tier is not Tier.nvme:
                    p.buffer.restore()
                if p.host is not None:
                    self._copier.copy_async(p.buffer.view, p.host)
                    stats.bytes_from_host += p.buffer.nbytes
                elif p.tier is Tier.discard:
                    p.buffer.view.zero_()
            self._copier.synchronize()
            for p, fut in futures:
                fut.result()
                stats.bytes_read += p.buffer.nbytes
                if self._progress:
                    self._progress(p.buffer.nbytes)
        except BaseException:
            with contextlib.suppress(Exception):
                self._copier.synchronize()
            for _, fut in futures:  # let every read finish before its memory is freed again
                with contextlib.suppress(Exception):
                    fut.result()
            for p in placed:
                p.buffer.free()
            raise
        for p in placed:
            if p.tier is Tier.cpu:
                p.host = None
        if not keep_files:
            # Every state is back: a file that cannot be removed is a leftover, not a failed reload.
            self._undo_writes([p.buffer.name for p in placed if p.tier is Tier.nvme])
        stats.seconds = time.perf_counter() - start
        return stats

    def verify_on_disk(self) -> None:
        if self._backend is not None and self._backend.names():
            self._backend.verify_manifest()

    def release(self) -> None:
        """Free pinned host copies and staging; delete this writer's files."""
        self._prealloc_stop.set()
        self._join_prealloc()
        self._prealloc = None
        self._prealloc_stop.clear()
        with self._cache_lock:
            cache, self._pinned_cache = self._pinned_cache, {}
        for mem in cache.values():
            mem.free()
        if self._backend is not None:
            self._backend.release()
            self._backend = None


__all__ = ["IntegrityError", "Placed", "StateBuffer", "TierMover", "TransferStats"]
