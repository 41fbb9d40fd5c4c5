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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import torch

from .errors import IntegrityError, TierIOError
from .host_budget import HostMemoryBudget, process_budget
from .storage.base import StorageBackend
from .storage.staging import HUGE_PAGE, DeviceCopier, PinnedHostMemory, round_up, staging_pool
from .types import StateKind, Tier

log = logging.getLogger("nvme_tier")


@dataclass(eq=False)
class StateBuffer:
    """One storage holding (part of) a state, addressed as a flat uint8 view over all of it."""

    kind: StateKind
    name: str
    view: torch.Tensor

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
    spilled: bool = False  # on nvme only because its host copy did not fit the host budget


@dataclass(eq=False)
class HostCopy:
    """One buffer's host copy, reserved against the process's host budget before anything moves.

    ``memory`` is the pinned copy kept from an earlier cycle (reused, already page-locked), or
    None until the offload makes it.
    """

    buffer: StateBuffer
    tier: Tier
    memory: PinnedHostMemory | None = None


@dataclass
class TransferStats:
    bytes_written: int = 0
    bytes_skipped: int = 0
    bytes_to_host: int = 0
    bytes_read: int = 0
    bytes_from_host: int = 0
    seconds: float = 0.0


class TierMover:
    """Executes placements. Keeps page-locked host copies for reuse, within the host budget."""

    # Pieces the first pinned_cpu offload page-locks on a helper thread while the previous piece's
    # copy runs (a piece's cudaHostRegister is ~1 % of its populate time at this size).
    lock_piece_bytes = 512 << 20

    def __init__(
        self,
        backend: Callable[[], StorageBackend],
        progress: Callable | None = None,
        budget: HostMemoryBudget | None = None,
    ):
        self._backend_factory = backend
        self._backend: StorageBackend | None = None
        self._budget = budget or process_budget()
        # Pinned copies by buffer name: in use while their state is offloaded, parked (evictable by
        # the budget) while it is resident.
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
        """This engine's pinned copies (kept or in use) plus the process's staging pool."""
        with self._cache_lock:
            cache = sum(m.nbytes for m in self._pinned_cache.values() if m.tensor is not None)
        return cache + staging_pool().allocated_bytes

    def preallocate(self, buffers: list[StateBuffer]) -> None:
        """Allocate the page-locked host copies of ``buffers`` on a background thread (``preallocate``).

        Page-locking tens of GB takes seconds; done at attach it overlaps with training, at the
        price of holding that RAM from attach on (without CUDA: plain memory, faulted in). Only
        within the host budget, and only when RAM is plentiful.
        """
        if self._prealloc is not None:
            return
        with self._cache_lock:
            wanted = [(b.name, b.nbytes) for b in buffers if b.name not in self._pinned_cache and b.nbytes]
        total = sum(n for _, n in wanted)
        if not total or total > psutil.virtual_memory().available // 2:
            return

        def run() -> None:
            for name, nbytes in wanted:
                if self._prealloc_stop.is_set() or not self._budget.reserve(nbytes):
                    return
                try:  # half the cores: leave the others to the training that runs meanwhile
                    mem = PinnedHostMemory(nbytes, threads=max(1, (os.cpu_count() or 2) // 2))
                except Exception as exc:  # the first offload allocates (and reports) instead
                    self._budget.release(nbytes)
                    log.info("nvme_tier: background pinned allocation stopped: %s", exc)
                    return
                with self._cache_lock:
                    self._pinned_cache[name] = mem
                self._budget.park(mem)

        self._prealloc = threading.Thread(target=run, name="nvme_tier-prealloc", daemon=True)
        self._prealloc.start()

    def settle_preallocation(self) -> None:
        """Wait for the background pre-allocation (call before planning under the budget's lock)."""
        if self._prealloc is not None:
            self._prealloc.join()

    def claim_host(self, items: list[tuple[StateBuffer, Tier]]) -> list[HostCopy]:
        """Reserve the host copies of the cpu/pinned_cpu ``items``; reuses kept pinned copies.

        Called under the budget's lock right after the placement was decided against
        ``budget.available()``, so every reservation fits.
        """
        copies: list[HostCopy] = []
        try:
            for buf, tier in items:
                if tier not in (Tier.cpu, Tier.pinned_cpu):
                    continue
                copy = HostCopy(buf, tier)
                if tier is Tier.pinned_cpu:
                    with self._cache_lock:
                        kept = self._pinned_cache.pop(buf.name, None)
                    if kept is not None and kept.nbytes == buf.nbytes and self._budget.unpark(kept):
                        copy.memory = kept
                    elif kept is not None:
                        self._budget.discard(kept)
                if copy.memory is None and not self._budget.reserve(buf.nbytes):
                    raise TierIOError(
                        f"the host budget cannot hold {buf.name} ({buf.nbytes} B) it had room for a moment ago"
                    )
                copies.append(copy)
        except BaseException:
            self.unclaim_host(copies)
            raise
        return copies

    def unclaim_host(self, copies: list[HostCopy]) -> None:
        """Undo ``claim_host`` (nothing was copied): kept copies park again, reservations return."""
        for copy in copies:
            if copy.memory is not None and copy.memory.tensor is not None and copy.memory.fully_locked:
                with self._cache_lock:
                    self._pinned_cache[copy.buffer.name] = copy.memory
                self._budget.park(copy.memory)
            else:
                if copy.memory is not None:
                    copy.memory.free()
                self._budget.release(copy.buffer.nbytes)

    def _copy_pinned(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue a copy to/from a pinned copy piece by piece: no single DMA spans two registrations."""
        step = round_up(self.lock_piece_bytes, HUGE_PAGE)  # the boundaries PinnedHostMemory pieces use
        for a in range(0, dst.numel(), step):
            self._copier.copy_async(dst[a : a + step], src[a : a + step])

    def _copy_to_host(self, copies: list[HostCopy]) -> list[Placed]:
        """Queue every host copy; page-lock new pinned copies piece by piece, ahead of their DMA.

        A helper thread faults in (and registers) piece i+1 while piece i is copied, so the first
        offload costs about the page-locking alone instead of page-locking plus copying. Kept copies
        go first: their DMA runs while the first new piece is being locked.
        """
        placed: list[Placed] = []
        fresh: list[HostCopy] = []
        for copy in copies:
            if copy.tier is Tier.cpu:
                host = torch.empty(copy.buffer.nbytes, dtype=torch.uint8)
                self._copier.copy_async(host, copy.buffer.view)
                placed.append(Placed(copy.buffer, copy.tier, host))
            elif copy.memory is not None:
                self._copy_pinned(copy.memory.tensor, copy.buffer.view)
                placed.append(Placed(copy.buffer, copy.tier, copy.memory.tensor))
            else:
                fresh.append(copy)
        if not fresh:
            return placed
        for copy in fresh:  # reserved virtual memory only: nothing is touched yet
            copy.memory = PinnedHostMemory(copy.buffer.nbytes, piece_bytes=self.lock_piece_bytes)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier-lock") as helper:
            jobs: list[tuple[HostCopy, int, Future | None]] = []
            for copy in fresh:
                ready = copy.memory.fully_locked  # small buffers with CUDA: torch's pinned allocator
                for i in range(len(copy.memory.pieces)):
                    jobs.append((copy, i, None if ready else helper.submit(copy.memory.lock_piece, i)))
            try:
                for copy, i, fut in jobs:
                    if fut is not None:
                        fut.result()
                    a, b = copy.memory.pieces[i]
                    self._copier.copy_async(copy.memory.tensor[a:b], copy.buffer.view[a:b])
            except BaseException:
                for _, _, fut in jobs:
                    if fut is not None:
                        fut.cancel()
                raise
        placed.extend(Placed(copy.buffer, copy.tier, copy.memory.tensor) for copy in fresh)
        return placed

    def offload(
        self,
        items: list[tuple[StateBuffer, Tier]],
        unchanged: Callable[[StateBuffer], bool],
        host_copies: list[HostCopy],
    ) -> tuple[list[Placed], TransferStats]:
        """Move ``items``; ``host_copies`` (from ``claim_host``) are their cpu/pinned_cpu copies."""
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
                        futures.append((buf, self.backend.write(buf.name, buf.view)))
                        written.append(buf.name)
                    placed.append(Placed(buf, tier))
            to_host = self._copy_to_host(host_copies)  # back to back: no gap between copies
            stats.bytes_to_host += sum(p.buffer.nbytes for p in to_host)
            placed.extend(to_host)
            for buf, tier in items:
                if tier is Tier.discard:
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
            self.unclaim_host(host_copies)
            if isinstance(exc, (TierIOError, KeyboardInterrupt)):
                raise
            if isinstance(exc, OSError):
                path = exc.filename or (self._backend.directory.path if self._backend else "?")
                raise TierIOError(
                    f"offload to {path} failed: {exc}; nothing was freed", path, exc.errno
                ) from exc
            raise
        # Everything is safely elsewhere: now (and only now) release device memory.
        with self._cache_lock:  # pinned copies stay ours (in use) until their reload parks them
            self._pinned_cache.update((c.buffer.name, c.memory) for c in host_copies if c.memory is not None)
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
                    if p.tier is Tier.pinned_cpu:
                        self._copy_pinned(p.buffer.view, p.host)
                    else:
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
                self._budget.release(p.buffer.nbytes)
            elif p.tier is Tier.pinned_cpu:
                p.host = None
                with self._cache_lock:
                    kept = self._pinned_cache.get(p.buffer.name)
                if kept is not None:  # kept for the next offload, unless the budget needs it first
                    self._budget.park(kept)
        if not keep_files:
            # Every state is back: a file that cannot be removed is a leftover, not a failed reload.
            self._undo_writes([p.buffer.name for p in placed if p.tier is Tier.nvme])
        stats.seconds = time.perf_counter() - start
        return stats

    def verify_on_disk(self) -> None:
        if self._backend is not None and self._backend.names():
            self._backend.verify_manifest()

    def release(self) -> None:
        """Free kept pinned host copies; give staging back; delete this writer's files (states resident)."""
        self._prealloc_stop.set()
        self.settle_preallocation()
        self._prealloc = None
        self._prealloc_stop.clear()
        with self._cache_lock:
            cache, self._pinned_cache = self._pinned_cache, {}
        for mem in cache.values():
            if self._budget.unpark(mem) or mem.tensor is not None:  # parked, or in use (engine gone)
                mem.free()
                self._budget.release(mem.nbytes)
        if self._backend is not None:
            self._backend.release()
            self._backend = None


__all__ = ["HostCopy", "IntegrityError", "Placed", "StateBuffer", "TierMover", "TransferStats"]
