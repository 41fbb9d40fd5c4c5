"""The block-store interface: bytes by key in one writer directory, moved in chunk requests.

A store names the object that holds each tensor (``key``), opens it for a write or a read (a
``BlockFile`` that takes whole-chunk requests at byte offsets, each on one of the store's staging
``slots``), reads sampled pages back, deletes objects and lists them. It knows nothing of tensors,
records, checksums or the manifest: ``StorageBackend`` (base.py) keeps those over any store, and
the chunk pipeline (pipeline.py) moves the bytes. A store is built from plain arguments (its
directory, its staging budget, its own settings) and declares what it needs in ``capabilities``;
nvme_tier.testing.conformance is the suite a store passes.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self

import torch

from ..host_budget import HostMemoryBudget
from ..units import PAGE, MiB
from .chunk_files import page_crc
from .manifest import WriterDirectory
from .staging import MakeSlot, SharedStagingPool


@dataclass(frozen=True)
class Capabilities:
    """What a store needs from the host and the path, and what it promises on disk.

    Selection decides from these alone, never from a class or its name (nvme_tier.storage.registry):
    each need is a check the host and the path must pass before ``auto`` takes the store.
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
    # Rewrites an unchanged object of the same stored size in place (``open_write(reuse=...)``):
    # its blocks stay allocated instead of being freed and allocated again.
    rewrite_in_place: bool = False
    # Its engine may report a failed request done: the pages sampled at write are read back.
    drops_write_errors: bool = False


class Slot(Protocol):
    """One staging buffer and the request in flight on it (at most one)."""

    buffer: torch.Tensor

    def wait(self) -> None:
        """Wait for the request in flight, if any; raise its error."""

    def drain(self) -> None:
        """After an error: let the request in flight finish before its buffer or file goes away."""


class FutureSlot:
    """A staging buffer whose request is a future (engines that run requests on a thread pool)."""

    __slots__ = ("buffer", "pending")

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.pending: Future | None = None

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def drain(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.exception()  # waits; the error was (or will be) reported by wait()


class BlockFile(abc.ABC):
    """One stored object open for a write or a read: whole-chunk requests at byte offsets.

    A request moves ``padded(length)`` bytes of its slot's buffer (zero-padded past the chunk's
    ``length``); ``slot.wait()`` waits for it. Used as a context manager that closes it.
    """

    def __init__(self, path: str):
        self.path = path  # what errors name

    @abc.abstractmethod
    def padded(self, length: int) -> int:
        """The bytes a request for a chunk of ``length`` bytes moves (its on-disk length)."""

    @abc.abstractmethod
    def pwrite(self, slot: Any, view: torch.Tensor, index: int, offset: int) -> None:
        """Queue writing ``view`` (the head of ``slot.buffer``) as chunk ``index`` at ``offset``."""

    @abc.abstractmethod
    def pread(self, slot: Any, view: torch.Tensor, index: int, offset: int) -> None:
        """Queue reading chunk ``index`` at ``offset`` into ``view`` (the head of ``slot.buffer``)."""

    def sample_offsets(self, padded: int) -> list[int]:
        """Where in a request of ``padded`` bytes a page is sampled (read back before a skip)."""
        return [0]

    def chunk_path(self, index: int) -> str:
        """The file that holds chunk ``index`` (what a checksum error names)."""
        return self.path

    def finish(self, nbytes: int) -> None:  # noqa: B027 - nothing to check by default
        """After a write's last request completed: check what the engine cannot report."""

    def close(self) -> None:  # noqa: B027 - nothing held by default
        """Free what the open holds (fds); after every request completed or drained."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockStore(abc.ABC):
    """Bytes by key under one writer directory. Constructors do no I/O.

    A store declares ``capabilities`` and ``suffix`` (``key(name)`` is ``name + suffix``) and
    implements ``chunk_for``, ``slots``, ``open_write``, ``open_read`` and ``delete``; ``files``,
    ``page_crcs``, ``staging_slots`` and ``close`` have defaults for a one-file-per-key store.
    A store with a block of knobs in the config names it in ``settings_key`` and takes it as
    ``settings=``.
    """

    capabilities: ClassVar[Capabilities]
    suffix: ClassVar[str]
    settings_key: ClassVar[str | None] = None
    # Why a store that ``drops_write_errors`` may report a write done that did not happen.
    dropped_writes: ClassVar[str] = "its engine may report a failed request done"

    def __init__(
        self,
        directory: WriterDirectory,
        *,
        staging_budget_bytes: int = 512 * MiB,
        staging: SharedStagingPool | None = None,
    ):
        self.directory = directory
        self.staging_budget_bytes = staging_budget_bytes
        # Built alone (a test, a benchmark), a store has a pool of its own, shared with nothing.
        self.staging = staging if staging is not None else SharedStagingPool(HostMemoryBudget())
        self.pinned_bytes = 0  # staging checked out per object (0 before the first I/O)

    @classmethod
    def staging_slots(cls, staging_budget_bytes: int, settings: Any = None) -> tuple[int, int]:
        """(count, bytes each) of the staging slots a store with this budget holds at once;
        selection sizes the page-locked memory and aio handles it needs from them. By default
        one slot of the whole budget, the most a store may hold."""
        return 1, staging_budget_bytes

    def key(self, name: str) -> str:
        """The file (or directory) under the writer directory that holds ``name``'s bytes."""
        return f"{name}{self.suffix}"

    def keys(self) -> list[str]:
        """The objects this store holds on disk now."""
        try:
            entries = os.listdir(self.directory.path)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if e.endswith(self.suffix))

    @abc.abstractmethod
    def chunk_for(self, nbytes: int) -> int:
        """The chunk size a new object of ``nbytes`` is written in."""

    @abc.abstractmethod
    def slots(self, chunk_bytes: int, reading: bool) -> contextlib.AbstractContextManager[list[Any]]:
        """Staging slots for one object's chunks of ``chunk_bytes`` (checked out of ``staging``;
        ``reading`` queues the request ahead of waiting writes)."""

    @abc.abstractmethod
    def open_write(
        self, key: str, nbytes: int, chunk_bytes: int, reuse: tuple[int, int] | None = None
    ) -> BlockFile:
        """A new object ``key`` (whatever was there is replaced, never written through), or with
        ``reuse`` (st_dev, st_ino) the kept one, rewritten in place if it still is that file."""

    @abc.abstractmethod
    def open_read(self, key: str, nbytes: int, chunk_bytes: int) -> BlockFile:
        """Object ``key`` for reading; IntegrityError when it is missing or shorter than written."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove object ``key`` (a symlink planted in its place is removed, not followed)."""

    def stored_size(self, nbytes: int) -> int:
        """Bytes an object of ``nbytes`` holds on disk (an in-place rewrite needs the same)."""
        return nbytes

    def files(self, key: str, chunk_bytes: int, nbytes: int) -> list[str]:
        """The files (relative to the directory) that hold object ``key``: stamped at write."""
        return [key]

    def page_crcs(self, key: str, chunk_bytes: int, offsets: list[int]) -> list[int | None]:
        """crc32c of the page at each offset of object ``key``, read from the device where the
        store bypasses the page cache (None: unreadable or short)."""
        path = self.directory.file_path(key)
        size = os.stat(path, follow_symlinks=False).st_size
        direct = self.capabilities.o_direct
        lengths = [max(1, min(PAGE, size - offset)) for offset in offsets]  # a page, or the file's tail
        return [page_crc(path, off, n, direct and n == PAGE) for off, n in zip(offsets, lengths, strict=True)]

    def close(self) -> None:
        """Give staging (and handles) back; the store may be used again after."""
        self.staging.leave(self)

    @contextlib.contextmanager
    def checked_out(
        self, key: Hashable, count: int, slot_bytes: int, make: MakeSlot, reading: bool
    ) -> Iterator[list]:
        """``count`` slots of ``slot_bytes`` from ``staging`` for one object (``pinned_bytes`` noted)."""
        with self.staging.checkout(self, key, count, slot_bytes, make, reading=reading) as slots:
            self.pinned_bytes = sum(slot.buffer.numel() for slot in slots)
            yield slots
