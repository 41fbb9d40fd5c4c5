"""Process-wide state in one object: the host budget, the staging pool, the aio handles, the stores.

The engines of a process share these: one budget for host copies and staging, staging slots and
idle aio handles reused from engine to engine, the stores a config may name. ``attach`` takes them
from the default runtime; ``isolated_runtime()`` puts fresh ones in its place for a block (a test, a
benchmark's round), so nothing reaches into module globals. Everything below this module gets its
piece as an argument (the budget-as-a-parameter of torchsnapshot's scheduler; kvikio's
``defaults`` with a context manager).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from .host_budget import HostMemoryBudget
from .storage.aio_handles import AioHandlePool
from .storage.blocks import BlockStore
from .storage.registry import StoreRegistry
from .storage.staging import SharedStagingPool


@dataclass(frozen=True)
class Runtime:
    budget: HostMemoryBudget
    staging: SharedStagingPool  # charged to ``budget``
    aio_handles: AioHandlePool
    stores: StoreRegistry  # builds stores over ``staging`` and ``aio_handles``

    @classmethod
    def fresh(cls) -> Runtime:
        """New, empty state: the shipped stores and the entry point group's, nothing held."""
        budget = HostMemoryBudget()
        staging = SharedStagingPool(budget)
        handles = AioHandlePool(staging)
        return cls(budget, staging, handles, StoreRegistry(staging=staging, handles=handles))


_CURRENT: list[Runtime] = []  # the default runtime, made at first use; isolated_runtime swaps it


def default_runtime() -> Runtime:
    """The runtime ``attach`` (and ``check``, ``demo``, ``register_backend``) use."""
    if not _CURRENT:
        _CURRENT.append(Runtime.fresh())
    return _CURRENT[-1]


@contextlib.contextmanager
def isolated_runtime() -> Iterator[Runtime]:
    """A fresh runtime as the default for the block; the previous one is back after it."""
    runtime = Runtime.fresh()
    _CURRENT.append(runtime)
    try:
        yield runtime
    finally:
        _CURRENT.remove(runtime)


def register_backend(cls: type[BlockStore], *, before: str | None = None) -> None:
    """Register a third-party store in the default runtime (see ``StoreRegistry.register``); it can
    then be named in ``offload_states.backend``. (Packages can instead declare it in the entry point
    group ``nvme_tier.backends``, which every runtime reads.)"""
    default_runtime().stores.register(cls, before=before)
