"""Host memory for moving bytes: the staging pool and its buffers.

Staging buffers come from one pool, shared by every engine's store and charged to a host budget
(host_budget.py): a store checks slots out for one file's write or read and returns them, so N
engines hold at most one staging budget, not N. A store takes its pool as an argument (the
process's default one is nvme_tier.runtime's).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol

import torch

from ..errors import HostBudgetError
from ..host_budget import HostMemoryBudget

# How long a backend waits for staging slots another engine holds (one file's write or read each).
STAGING_WAIT_SECONDS = 600.0


class StagingSlot(Protocol):
    buffer: torch.Tensor

    def free(self) -> None: ...


MakeSlot = Callable[[], StagingSlot]  # makes a new slot when none of its key is idle


class _Ticket:
    """One waiting request's place in the pool's queue."""

    __slots__ = ("reading",)

    def __init__(self, reading: bool):
        self.reading = reading


class SharedStagingPool:
    """Staging slots of every backend in the process, reused across engines and calls.

    Slots are grouped by ``key`` (a backend kind with its buffer size and handle settings: an aio
    buffer stays paired with the handle that allocated it). The pool's bytes stay within the
    staging capacity (the largest staging_budget_mb of a live engine, or the largest request):
    idle slots of other keys are freed to make room, else the request waits. Waiting reads are
    served before waiting writes (a reload is what a caller will wait for; a write is an offload's
    background half), each kind first come, first served; a request takes all its slots at once
    or none (no hold-and-wait, so engines offloading at the same time cannot deadlock).
    """

    def __init__(self, budget: HostMemoryBudget, wait_seconds: float = STAGING_WAIT_SECONDS):
        self._budget = budget
        self._wait_seconds = wait_seconds
        self._cond = threading.Condition()
        self._idle: dict[Hashable, list[tuple[StagingSlot, int]]] = {}
        self._queue: deque[_Ticket] = deque()
        self._allocated = 0
        self._checked_out = 0
        self._largest_request = 0
        self._users: weakref.WeakSet = weakref.WeakSet()

    @property
    def allocated_bytes(self) -> int:
        with self._cond:
            return self._allocated

    def idle_slots(self, match: Callable[[Hashable], bool]) -> int:
        """How many idle slots have a key ``match`` accepts (e.g. aio slots holding a reusable handle)."""
        with self._cond:
            return sum(len(slots) for key, slots in self._idle.items() if match(key))

    @contextlib.contextmanager
    def checkout(
        self,
        user: object,
        key: Hashable,
        count: int,
        slot_bytes: int,
        make: MakeSlot,
        *,
        reading: bool = False,
    ) -> Iterator[list[StagingSlot]]:
        """``count`` slots of ``slot_bytes`` for the duration of the block (made by ``make`` if none
        idle); ``reading`` queues the request ahead of waiting writes."""
        slots = self._acquire(user, key, count, slot_bytes, make, reading)
        try:
            yield slots
        finally:
            with self._cond:
                self._idle.setdefault(key, []).extend((s, slot_bytes) for s in slots)
                self._checked_out -= len(slots)
                self._cond.notify_all()

    def drop_idle(self, match: Callable[[Hashable], bool]) -> None:
        """Free the idle slots whose key ``match`` accepts (aio slots of settings no engine uses now)."""
        with self._cond:
            for key in [k for k in self._idle if match(k)]:
                self._free_idle(key)
            self._cond.notify_all()

    def leave(self, user: object) -> None:
        """``user`` (a backend) is released; the last one out frees the idle slots."""
        with self._cond:
            self._users.discard(user)
            if not self._users:
                for key in list(self._idle):
                    self._free_idle(key)
                if torch.cuda.is_available():  # torch keeps freed pinned blocks cached: return them
                    torch.cuda.synchronize()
                    with contextlib.suppress(AttributeError):
                        torch._C._host_emptyCache()

    def _acquire(
        self, user: object, key: Hashable, count: int, slot_bytes: int, make: MakeSlot, reading: bool
    ) -> list[StagingSlot]:
        ticket = _Ticket(reading)
        deadline = time.monotonic() + self._wait_seconds
        with self._cond:
            self._users.add(user)
            self._largest_request = max(self._largest_request, count * slot_bytes)
            self._enqueue(ticket)
            try:
                while True:
                    taken = self._take(key, count, slot_bytes) if self._queue[0] is ticket else None
                    if taken is not None:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise HostBudgetError(
                            f"waited {self._wait_seconds:.0f} s for staging buffers other engines hold; "
                            "the states stay where they were (retry, or give each engine's offloads turns)"
                        )
                    self._cond.wait(left)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
        missing = count - len(taken)
        made: list[StagingSlot] = []
        try:  # slow (page-locking): outside the lock, the bytes are already counted and reserved
            for _ in range(missing):
                made.append(make())
        except BaseException:
            with self._cond:
                for slot in made:
                    slot.free()
                self._idle.setdefault(key, []).extend((s, slot_bytes) for s in taken)
                self._allocated -= missing * slot_bytes
                self._checked_out -= count
                self._budget.release(missing * slot_bytes, staging=True)
                self._cond.notify_all()
            raise
        return taken + made

    def _enqueue(self, ticket: _Ticket) -> None:
        """A read goes behind the waiting reads, ahead of every waiting write."""
        if ticket.reading:
            writes = [i for i, t in enumerate(self._queue) if not t.reading]
            if writes:
                self._queue.insert(writes[0], ticket)
                return
        self._queue.append(ticket)

    def _take(self, key: Hashable, count: int, slot_bytes: int) -> list[StagingSlot] | None:
        """Under the lock: idle slots of ``key`` plus room (counted, reserved) for the rest, or None."""
        idle = self._idle.get(key, [])
        taken = [idle.pop()[0] for _ in range(min(count, len(idle)))]
        needed = (count - len(taken)) * slot_bytes
        capacity = max(self._budget.staging_capacity, self._largest_request)
        for other in [k for k in self._idle if k != key]:
            if self._allocated + needed <= capacity:
                break
            self._free_idle(other)
        if self._allocated + needed > capacity or not self._budget.reserve(needed, staging=True):
            idle.extend((s, slot_bytes) for s in taken)
            if self._checked_out == 0 and self._allocated + needed <= capacity:
                raise HostBudgetError(
                    f"offload_states.host_budget_mb leaves no room for {needed >> 20} MiB of staging "
                    "buffers; raise it or lower staging_budget_mb"
                )
            return None
        self._allocated += needed
        self._checked_out += count
        return taken

    def _free_idle(self, key: Hashable) -> None:
        for slot, nbytes in self._idle.pop(key, []):
            slot.free()
            self._allocated -= nbytes
            self._budget.release(nbytes, staging=True)


class HostBuffer:
    """A plain staging buffer (zarr's host slice): page-locked by torch when CUDA is present."""

    def __init__(self, nbytes: int):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())

    def free(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
