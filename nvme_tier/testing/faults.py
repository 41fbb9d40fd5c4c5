"""A storage backend wrapper that breaks on purpose: fail, fill the disk or hang at the k-th call.

Nothing is mocked: ``FaultInjectingBackend`` forwards every call to a REAL backend, which writes
real files. At the chosen call it instead

* fails the k-th ``write`` with the ``TierIOError`` a failing disk gives (after really writing the
  first half of the tensor, so there is a torn file to clean up), or
* fills the filesystem with a ballast file first, so the real write hits a real ``ENOSPC``, or
* writes half the tensor and never completes the future (a process to SIGKILL mid-write);
* fails the k-th ``read_into`` after the real read has overwritten the destination;
* fails ``commit`` (the manifest write) or every ``delete``, as the real calls raise ``OSError``.

One ``FaultPlan`` says what to break and counts the calls across every backend it wraps (a
controller opens a new backend after a release). The controller's mover installs it::

    plan = FaultPlan(fail_at=2, errno=errno.EIO)
    undo = nvme_tier.controller_of(engine)._mover.wrap_backend(plan.wrap)
    engine.offload_states()   # the 2nd tensor write fails
    undo()

Imports ``nvme_tier.storage`` only; nothing in ``nvme_tier`` imports this module.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import TierIOError
from ..storage.base import StorageBackend
from ..storage.manifest import MANIFEST_FILE, TensorRecord, check_name
from ..tensor_bytes import as_bytes

BALLAST = "ballast.fill"  # the file ``fill`` mode writes into the offload root


@dataclass
class FaultPlan:
    """What to break, and how often each call was reached. ``*_at`` count calls from 1."""

    fail_at: int | None = None  # the k-th write fails (``mode`` says how)
    errno: int = _errno.EIO
    partial: bool = True  # really write the first half of the tensor before failing
    mode: Literal["raise", "fill", "hang"] = "raise"
    fail_commit: bool = False  # the manifest commit raises (after every queued write finished)
    read_fail_at: int | None = None  # the k-th read raises ``errno`` after a real read
    remove_fails: bool = False  # deleting a stored tensor raises ``errno`` (its files stay)
    once: bool = True  # fire at the k-th call only; False: at every call from the k-th on
    writes: int = 0
    reads: int = 0
    fired: int = 0
    hanging: threading.Event = field(default_factory=threading.Event)  # set once a hang began

    def wrap(self, backend: StorageBackend) -> FaultInjectingBackend:
        """``backend`` with this plan's faults (the argument ``TierMover.wrap_backend`` takes)."""
        return FaultInjectingBackend(backend, self)

    def due(self, count: int, at: int | None) -> bool:
        """Fire at the ``at``-th call (``once``) or at every call from it on; counts ``fired``."""
        hit = at is not None and (count == at and not self.fired if self.once else count >= at)
        if hit:
            self.fired += 1
        return hit


class FaultInjectingBackend:
    """Forwards the ``StorageBackend`` API to ``inner`` and breaks where ``plan`` says.

    Anything else (``directory``, ``record``, ``release``, ``store``...) is ``inner``'s, unchanged.
    """

    def __init__(self, inner: StorageBackend, plan: FaultPlan):
        self.inner = inner
        self.plan = plan
        self._last: Future | None = None  # the newest future of ``inner``: all before it are done with it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # -- the faulty calls ------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor, fingerprint: str | None = None) -> Future[TensorRecord]:
        check_name(name)
        src = as_bytes(tensor)  # the caller's errors (bad name, non-contiguous) come first, as ever
        self.plan.writes += 1
        if not self.plan.due(self.plan.writes, self.plan.fail_at):
            return self._track(self.inner.write(name, tensor, fingerprint=fingerprint))
        path = self.directory.file_path(self.file_name(name))
        if self.plan.mode == "fill":
            self._drain()  # the writes queued before this one land before the disk is full
            self.directory.create()
            fill_filesystem(self.directory.root)
            return self._track(self.inner.write(name, tensor, fingerprint=fingerprint))  # a real ENOSPC
        torn = self._track(self.inner.write(name, src[: src.numel() // 2])) if self.plan.partial else None
        if self.plan.mode == "hang":
            return self._hang(torn, path)
        error = TierIOError(f"writing {path} failed: {os.strerror(self.plan.errno)}", path, self.plan.errno)
        return _then(torn, error)

    def read_into(self, name: str, out: torch.Tensor) -> Future[None]:
        done = self._track(self.inner.read_into(name, out))
        self.plan.reads += 1
        if not self.plan.due(self.plan.reads, self.plan.read_fail_at):
            return done

        def error() -> TierIOError:  # after the read: the record is known by then
            path = self.directory.file_path(self.inner.record(name).file)
            return TierIOError(
                f"reading {path} failed: {os.strerror(self.plan.errno)}", path, self.plan.errno
            )

        return _then(done, error)

    def commit(self) -> None:
        if self.plan.fail_commit and self.plan.due(self.plan.writes, self.plan.writes):
            self._drain()
            raise _os_error(self.plan.errno, self.directory.file_path(MANIFEST_FILE))
        self.inner.commit()

    def delete(self, name: str) -> None:
        if self.plan.remove_fails:
            self.plan.fired += 1
            raise _os_error(self.plan.errno, self.directory.file_path(self.inner.record(name).file))
        self.inner.delete(name)

    # -- internals -------------------------------------------------------------------------------
    def _track(self, future: Future) -> Future:
        self._last = future
        return future

    def _drain(self) -> None:
        """Wait until ``inner`` finished every job queued so far (its jobs run in order)."""
        if self._last is not None:
            with contextlib.suppress(Exception):
                self._last.result()

    def _hang(self, torn: Future | None, path: str) -> Future:
        """A future that never completes; announces the hang once the torn half is on disk."""

        def announce(_done: Future | None = None) -> None:
            print(f"HANGING {path}", flush=True)  # the line a test that SIGKILLs this process waits for
            self.plan.hanging.set()

        if torn is None:
            announce()
        else:
            torn.add_done_callback(announce)
        return Future()


def _then(first: Future | None, error: TierIOError | Callable[[], TierIOError]) -> Future:
    """A future that fails with ``error`` once ``first`` is done (at once without ``first``); an
    error of ``first`` itself wins."""
    out: Future = Future()

    def fail(done: Future | None = None) -> None:
        exc = done.exception() if done is not None else None
        out.set_exception(exc or (error() if callable(error) else error))

    if first is None:
        fail()
    else:
        first.add_done_callback(fail)
    return out


def _os_error(errno: int, path: str) -> OSError:
    return OSError(errno, os.strerror(errno), path)


def fill_filesystem(root: str) -> str:
    """Write zeros to ``root/ballast.fill`` until the filesystem is full (a real ENOSPC)."""
    path = os.path.join(root, BALLAST)
    block = b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno not in (_errno.ENOSPC, _errno.EFBIG):
                    raise
                block = block[: len(block) // 2]
                if not block:
                    break
    finally:
        os.close(fd)
    return path
