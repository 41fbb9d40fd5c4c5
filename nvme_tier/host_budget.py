"""One host-memory budget per process, shared by every attached engine.

RLHF runs several engines in one process (actor, critic, reference, reward); per-engine host
copies would multiply into the very cost this project removes. So every byte of host memory
nvme_tier holds -- the host copies of the cpu/pinned_cpu tiers, pinned copies kept for reuse, and
the shared staging pool -- is reserved here first.

Semantics:
- The limit is the smallest ``host_budget_mb`` among the live attached engines (an engine with
  ``null`` adds no limit); with none set, memory is only counted.
- Staging is reserved ahead: the headroom up to the staging capacity (the largest
  ``staging_budget_mb`` of a live engine with a ``path``) is not available to host copies, so a
  spilled state can always be written.
- Pinned copies kept for reuse are *parked*: still reserved, but evicted (freed, least recently
  parked first) whenever a reservation would not fit otherwise.
- An engine with ``device: "auto"`` and no ``host_budget_mb`` sets ``AUTO_SHARE`` of the host's
  available memory at attach, divided among the local ranks (``resolve_limit``).

No torch here: entries only need ``nbytes`` and ``free()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

import psutil

from .units import human_bytes

log = logging.getLogger("nvme_tier")


class Evictable(Protocol):
    nbytes: int

    def free(self) -> None: ...


class HostMemoryBudget:
    """Thread-safe reservations against the process's host-memory limit."""

    def __init__(self) -> None:
        # Re-entrant: a transaction holds it while its reservations are made one by one.
        self._lock = threading.RLock()
        self._owners: weakref.WeakKeyDictionary[object, tuple[int | None, int]] = weakref.WeakKeyDictionary()
        self._reserved = 0
        self._staging_reserved = 0
        self._parked: OrderedDict[Evictable, None] = OrderedDict()  # an ordered set, LRU first

    # -- who sets the limit ----------------------------------------------------------------------
    def register(self, owner: object, limit_bytes: int | None, staging_bytes: int) -> None:
        """Count ``owner``'s configured limit and staging capacity while it is alive."""
        with self._lock:
            before = self.limit
            self._owners[owner] = (limit_bytes, staging_bytes)
            after = self.limit
        if before is not None and after != before:
            log.warning(
                "nvme_tier: engines of this process configure different host_budget_mb; "
                "the smallest (%d MiB) applies to all of them",
                (after or 0) >> 20,
            )

    def unregister(self, owner: object) -> None:
        with self._lock:
            self._owners.pop(owner, None)

    @property
    def limit(self) -> int | None:
        """The smallest configured limit of a live owner (None: unlimited)."""
        with self._lock:
            limits = [lim for lim, _ in self._owners.values() if lim is not None]
        return min(limits) if limits else None

    @property
    def staging_capacity(self) -> int:
        with self._lock:
            return max((staging for _, staging in self._owners.values()), default=0)

    # -- reservations ----------------------------------------------------------------------------
    @property
    def reserved(self) -> int:
        """Host bytes nvme_tier holds now (host copies, parked copies, staging)."""
        with self._lock:
            return self._reserved

    @property
    def parked(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._parked)

    def available(self) -> int | None:
        """Bytes a new host copy may still take (evicting parked copies), or None when unlimited."""
        with self._lock:
            limit = self.limit
            if limit is None:
                return None
            headroom = max(0, self.staging_capacity - self._staging_reserved)
            return max(0, limit - self._reserved + self.parked - headroom)

    def reserve(self, nbytes: int, staging: bool = False) -> bool:
        """Reserve ``nbytes`` (evicting parked copies as needed); False, changing nothing, if they cannot fit.

        Host copies leave the staging headroom alone; staging may use it.
        """
        with self._lock:
            limit = self.limit
            if limit is not None:
                headroom = 0 if staging else max(0, self.staging_capacity - self._staging_reserved)
                if nbytes > limit - self._reserved + self.parked - headroom:
                    return False
                while self._parked and nbytes > limit - self._reserved - headroom:
                    victim, _ = self._parked.popitem(last=False)
                    victim.free()
                    self._reserved -= victim.nbytes
            self._reserved += nbytes
            if staging:
                self._staging_reserved += nbytes
            return True

    def release(self, nbytes: int, staging: bool = False) -> None:
        with self._lock:
            self._reserved -= nbytes
            if staging:
                self._staging_reserved -= nbytes

    # -- copies kept for reuse -------------------------------------------------------------------
    def park(self, entry: Evictable) -> None:
        """``entry`` (reserved) is not in use now: it may be evicted to make room."""
        with self._lock:
            self._parked[entry] = None

    def unpark(self, entry: Evictable) -> bool:
        """Take ``entry`` back into use; False when it was evicted (freed, no longer reserved)."""
        with self._lock:
            return self._parked.pop(entry, False) is None

    def discard(self, entry: Evictable) -> None:
        """Free a parked ``entry`` and release its bytes (nothing to do when it was evicted)."""
        if self.unpark(entry):
            entry.free()
            self.release(entry.nbytes)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[BudgetTransaction]:
        """Reserve several things against one view of the budget: nothing else is reserved between
        reading ``available`` and the last ``reserve``. Kept when the block ends, every reservation
        and unpark undone when it raises."""
        with self._lock:
            txn = BudgetTransaction(self)
            try:
                yield txn
            except BaseException:
                txn.roll_back()
                raise


class BudgetTransaction:
    """The reservations of one ``HostMemoryBudget.transaction`` block, undone together on failure."""

    def __init__(self, budget: HostMemoryBudget) -> None:
        self._budget = budget
        self._reserved = 0
        self._unparked: list[Evictable] = []

    @property
    def available(self) -> int | None:
        """What a new host copy may still take now (None: unlimited); stays true until ``reserve``."""
        return self._budget.available()

    def reserve(self, nbytes: int) -> bool:
        """``HostMemoryBudget.reserve``, undone if the transaction fails."""
        if not self._budget.reserve(nbytes):
            return False
        self._reserved += nbytes
        return True

    def unpark(self, entry: Evictable) -> bool:
        """``HostMemoryBudget.unpark``, parked again if the transaction fails."""
        if not self._budget.unpark(entry):
            return False
        self._unparked.append(entry)
        return True

    def discard(self, entry: Evictable) -> None:
        """``HostMemoryBudget.discard`` (a parked copy of the wrong size): freed for good."""
        self._budget.discard(entry)

    def roll_back(self) -> None:
        self._budget.release(self._reserved)
        for entry in self._unparked:
            self._budget.park(entry)
        self._reserved, self._unparked = 0, []


# device "auto" without host_budget_mb: the share of the host's available memory (at attach) the
# host copies may take. Half leaves the other half to what shares the host and cannot be paged
# out from under page-locked memory -- the trainer's own heap and data loaders, an inference
# engine's CPU swap space, the page cache of checkpoints -- and is the same line below which
# ``preallocate`` page-locks at attach. On the measured RLHF node (128 GB, ~50 GB of states) it
# holds every state, so "auto" runs as fast as "cpu" there; where it does not, NVMe takes the rest.
AUTO_SHARE = 0.5


def local_ranks() -> int:
    """Processes of this job on this host: torchrun's LOCAL_WORLD_SIZE, DeepSpeed launcher's LOCAL_SIZE, else 1."""
    for variable in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        try:
            ranks = int(os.environ.get(variable, ""))
        except ValueError:
            continue
        if ranks > 0:
            return ranks
    return 1


def auto_limit(available: int, ranks: int) -> int:
    """One process's share: ``AUTO_SHARE`` of ``available`` bytes, divided among ``ranks`` processes."""
    return int(available * AUTO_SHARE) // max(1, ranks)


def resolve_limit(configured: int | None, auto: bool, held: int = 0) -> tuple[int | None, str]:
    """The limit an engine registers and the words that say where it came from.

    ``held``: bytes nvme_tier already holds in this process, available to it as much as free memory.
    """
    if configured is not None:
        return configured, f"{human_bytes(configured)} (host_budget_mb)"
    if not auto:
        return None, "unlimited (no host_budget_mb)"
    available, ranks = psutil.virtual_memory().available + held, local_ranks()
    limit = auto_limit(available, ranks)
    per = f" / {ranks} local ranks" if ranks > 1 else ""
    return (
        limit,
        f"{human_bytes(limit)} (device 'auto': {AUTO_SHARE:.0%} of {human_bytes(available)} available at attach{per})",
    )
