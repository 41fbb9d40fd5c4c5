"""The host copies of the cpu/pinned_cpu tiers: reserved against the host budget, made, kept, reused.

A pinned copy outlives its offload: after the reload it is *parked* (kept for the next offload of
the same buffer, page-locking already paid) until the process's host budget needs the room. A
new pinned copy is made while the offload runs: three stages one piece apart -- fault pages in
(many threads), register them with CUDA (one thread), copy into them (the copy stream) -- so the
first offload costs about the slowest stage instead of their sum.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import torch

from .buffers import Placed, StateBuffer
from .device_copies import DeviceCopier
from .errors import HostBudgetError
from .host_budget import BudgetTransaction, HostMemoryBudget
from .pinned_memory import HUGE_PAGE, PinnedHostMemory
from .types import Tier
from .units import round_up

log = logging.getLogger("nvme_tier")


@dataclass(eq=False)
class HostCopy:
    """One buffer's host copy, reserved against the process's host budget before anything moves.

    ``memory`` is the pinned copy kept from an earlier cycle (reused, already page-locked), or
    None until the offload makes it.
    """

    buffer: StateBuffer
    tier: Tier
    memory: PinnedHostMemory | None = None


class HostCopies:
    """One engine's host copies; pinned ones kept for reuse, within the host budget."""

    # The pieces a new pinned copy is made in: small enough that the stages overlap well, large
    # enough that a piece's cudaHostRegister call overhead stays ~1 % of its cost.
    lock_piece_bytes = 512 << 20

    def __init__(self, copier: DeviceCopier, budget: HostMemoryBudget):
        self._copier = copier
        self._budget = budget
        # Pinned copies by buffer name: in use while their state is offloaded, parked (evictable by
        # the budget) while it is resident.
        self._pinned: dict[str, PinnedHostMemory] = {}
        self._lock = threading.Lock()
        self._prealloc: threading.Thread | None = None
        self._prealloc_stop = threading.Event()

    @property
    def pinned_bytes(self) -> int:
        """This engine's page-locked copies, kept or in use (benchmarks and soak tests watch it)."""
        with self._lock:
            return sum(m.nbytes for m in self._pinned.values() if m.tensor is not None)

    def preallocate(self, buffers: list[StateBuffer]) -> None:
        """Allocate the page-locked host copies of ``buffers`` on a background thread (``preallocate``).

        Page-locking tens of GB takes seconds; done at attach it overlaps with training, at the
        price of holding that RAM from attach on (without CUDA: plain memory, faulted in). Only
        within the host budget, and only when RAM is plentiful.
        """
        if self._prealloc is not None:
            return
        with self._lock:
            wanted = [(b.name, b.nbytes) for b in buffers if b.name not in self._pinned and b.nbytes]
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
                with self._lock:
                    self._pinned[name] = mem
                self._budget.park(mem)

        self._prealloc = threading.Thread(target=run, name="nvme_tier-prealloc", daemon=True)
        self._prealloc.start()

    def settle_preallocation(self) -> None:
        """Wait for the background pre-allocation (call before planning under the budget's lock)."""
        if self._prealloc is not None:
            self._prealloc.join()

    def claim(self, items: list[tuple[StateBuffer, Tier]], budget: BudgetTransaction) -> list[HostCopy]:
        """Reserve the host copies of the cpu/pinned_cpu ``items`` in ``budget``; reuses kept pinned copies.

        ``budget`` is the transaction the placement read ``available`` from, so every reservation
        fits; if one does not, the transaction undoes the others (and kept copies are kept again).
        """
        copies: list[HostCopy] = []
        try:
            for buf, tier in items:
                copy = HostCopy(buf, tier)
                if tier is Tier.pinned_cpu:
                    with self._lock:
                        kept = self._pinned.pop(buf.name, None)
                    if kept is not None and kept.nbytes == buf.nbytes and budget.unpark(kept):
                        copy.memory = kept
                    elif kept is not None:
                        budget.discard(kept)
                if copy.memory is None and not budget.reserve(buf.nbytes):
                    raise HostBudgetError(
                        f"the host budget cannot hold {buf.name} ({buf.nbytes} B) it had room for a moment ago"
                    )
                copies.append(copy)
        except BaseException:
            with self._lock:  # the transaction parks them again
                self._pinned.update((c.buffer.name, c.memory) for c in copies if c.memory is not None)
            raise
        return copies

    def unclaim(self, copies: list[HostCopy]) -> None:
        """Undo ``claim`` (nothing was copied): kept copies park again, reservations return."""
        for copy in copies:
            if copy.memory is not None and copy.memory.tensor is not None and copy.memory.fully_locked:
                with self._lock:
                    self._pinned[copy.buffer.name] = copy.memory
                self._budget.park(copy.memory)
            else:
                if copy.memory is not None:
                    copy.memory.free()
                self._budget.release(copy.buffer.nbytes)

    def copy_pinned(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue a copy to/from a pinned copy piece by piece: no single DMA spans two registrations."""
        step = round_up(self.lock_piece_bytes, HUGE_PAGE)  # the boundaries PinnedHostMemory pieces use
        for a in range(0, dst.numel(), step):
            self._copier.copy_async(dst[a : a + step], src[a : a + step])

    def copy_to_host(self, copies: list[HostCopy]) -> list[Placed]:
        """Queue every host copy; make new pinned copies piece by piece, ahead of their DMA.

        Kept copies go first: their DMA runs while the first new piece is made. Then, one piece
        apart, a helper faults piece i+2 in while another registers piece i+1 and the copy stream
        copies piece i.
        """
        placed: list[Placed] = []
        fresh: list[HostCopy] = []
        for copy in copies:
            if copy.tier is Tier.cpu:
                host = torch.empty(copy.buffer.nbytes, dtype=torch.uint8)
                self._copier.copy_async(host, copy.buffer.view)
                placed.append(Placed(copy.buffer, copy.tier, host))
            elif copy.memory is not None:
                self.copy_pinned(copy.memory.tensor, copy.buffer.view)
                placed.append(Placed(copy.buffer, copy.tier, copy.memory.tensor))
            else:
                fresh.append(copy)
        if not fresh:
            return placed
        for copy in fresh:  # reserved virtual memory only: nothing is touched yet
            copy.memory = PinnedHostMemory(copy.buffer.nbytes, piece_bytes=self.lock_piece_bytes)
        threads = max(c.memory.threads for c in fresh)
        with (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nvme_tier-pin") as faulters,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier-fault") as faulting,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier-lock") as registering,
        ):
            jobs: list[tuple[HostCopy, int, list[Future]]] = []
            for copy in fresh:
                memory = copy.memory
                ready = memory.fully_locked  # small buffers with CUDA: torch's pinned allocator
                for i in range(len(memory.pieces)):
                    if ready:
                        jobs.append((copy, i, []))
                        continue
                    faulted = faulting.submit(memory.populate_piece, i, faulters)
                    locked = registering.submit(_after, faulted, memory.register_piece, i)
                    jobs.append((copy, i, [faulted, locked]))
            try:
                for copy, i, stages in jobs:
                    for stage in stages:
                        stage.result()
                    a, b = copy.memory.pieces[i]
                    self._copier.copy_async(copy.memory.tensor[a:b], copy.buffer.view[a:b])
            except BaseException:
                for _, _, stages in jobs:
                    for stage in stages:
                        stage.cancel()
                raise
        placed.extend(Placed(copy.buffer, copy.tier, copy.memory.tensor) for copy in fresh)
        return placed

    def keep(self, copies: list[HostCopy]) -> None:
        """Pinned copies now hold states: ours (in use) until their reload parks them."""
        with self._lock:
            self._pinned.update((c.buffer.name, c.memory) for c in copies if c.memory is not None)

    def hand_back(self, placed: list[Placed]) -> None:
        """The states are on the device again: cpu copies go back to the budget, pinned ones are
        parked (kept for the next offload, unless the budget needs them first)."""
        for p in placed:
            if p.tier is Tier.cpu:
                p.host = None
                self._budget.release(p.buffer.nbytes)
            elif p.tier is Tier.pinned_cpu:
                p.host = None
                with self._lock:
                    kept = self._pinned.get(p.buffer.name)
                if kept is not None:
                    self._budget.park(kept)

    def release(self) -> None:
        """Free every kept pinned copy (their states are resident) and return it to the budget."""
        self._prealloc_stop.set()
        self.settle_preallocation()
        self._prealloc = None
        self._prealloc_stop.clear()
        with self._lock:
            kept, self._pinned = self._pinned, {}
        for mem in kept.values():
            if self._budget.unpark(mem) or mem.tensor is not None:  # parked, or in use (engine gone)
                mem.free()
                self._budget.release(mem.nbytes)


def _after(stage: Future, step, index: int) -> None:
    """Run ``step(index)`` once the previous stage of the same piece is done (its error, if any)."""
    stage.result()
    step(index)
