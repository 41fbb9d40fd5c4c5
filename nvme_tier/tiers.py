"""Move a set of state buffers to their tiers and back, all-or-nothing.

A *state buffer* is one tensor storage (the unit memory is allocated in). Freeing the storage
frees it for every view that shares it (params that are views into a flat buffer, optimizer
fragments...), and restoring it in place brings every view back with its identity intact, so the
engine's own bookkeeping needs no re-pointing.

Offload order: queue every copy and write, wait, verify, commit the manifest, then free device
memory; a failure before that removes what this call wrote, every state stays where it was. A
non-blocking offload frees earlier, never before the bytes are safe: host tiers and discard at
return, each NVMe buffer once its write completed; a later failure restores the freed first.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .buffers import Placed, StateBuffer
from .device_copies import DeviceCopier
from .errors import TierIOError
from .host_budget import HostMemoryBudget, process_budget
from .host_copies import HostCopies, HostCopy
from .interrupts import DeferredInterrupt
from .storage.base import StorageBackend
from .stream_order import SubmitStream
from .types import StateKind, Tier

log = logging.getLogger("nvme_tier")


@dataclass
class TransferStats:
    bytes_written: int = 0
    bytes_skipped: int = 0
    bytes_to_host: int = 0
    bytes_read: int = 0
    bytes_from_host: int = 0
    seconds: float = 0.0

    def offload_line(self, moved: int, backend: str | None) -> str:
        return (
            f"offloaded {moved / 1e9:.3f} GB ({self.bytes_written / 1e9:.3f} GB to {backend or '-'}, "
            f"{self.bytes_skipped / 1e9:.3f} GB unchanged on disk, {self.bytes_to_host / 1e9:.3f} GB to host) "
            f"in {self.seconds:.2f} s"
        )

    def reload_line(self) -> str:
        return (
            f"reloaded {self.bytes_read / 1e9:.3f} GB from nvme and {self.bytes_from_host / 1e9:.3f} GB "
            f"from host in {self.seconds:.2f} s"
        )


@dataclass(eq=False)
class OffloadJob:
    """One offload from its start (every move queued) to its end (every byte safe elsewhere)."""

    placed: list[Placed] = field(default_factory=list)
    writes: list[tuple[Placed, Future]] = field(default_factory=list)  # NVMe writes, in order
    copies: torch.cuda.Event | None = None  # after the last host copy; None: copies are done
    stats: TransferStats = field(default_factory=TransferStats)
    started: float = field(default_factory=time.perf_counter)
    stranded: list[Placed] = field(default_factory=list)  # freed, and restoring them failed
    host_copies: list[HostCopy] = field(default_factory=list)  # reserved by HostCopies.claim
    safe: bool = False  # every byte is elsewhere (manifest committed): only the frees are left

    def bytes_in_flight(self) -> dict[StateKind, int]:
        """Bytes per state not yet known safe elsewhere (a copy or a write still running)."""
        copying = self.copies is not None and not self.copies.query()
        out: dict[StateKind, int] = {}
        pending = [p for p, fut in self.writes if not fut.done()]
        pending += [p for p in self.placed if p.host is not None and copying]
        for p in pending:
            out[p.buffer.kind] = out.get(p.buffer.kind, 0) + p.buffer.nbytes
        return out


@dataclass(eq=False)
class ReloadJob:
    """One reload from its start (every buffer restored, every move back queued) to its hand-over."""

    placed: list[Placed]
    reads: list[tuple[Placed, Future]] = field(default_factory=list)  # NVMe reads, in order
    stats: TransferStats = field(default_factory=TransferStats)
    started: float = field(default_factory=time.perf_counter)


class TierMover:
    """Executes placements: NVMe writes and reads through the backend, host copies through ``host``."""

    def __init__(
        self,
        backend: Callable[[], StorageBackend],
        progress: Callable | None = None,
        budget: HostMemoryBudget | None = None,
    ):
        self._backend_factory = backend
        self._backend: StorageBackend | None = None
        self._copier = DeviceCopier()
        self._submit = SubmitStream()
        self.host = HostCopies(self._copier, budget or process_budget())
        self._progress = progress

    @property
    def backend(self) -> StorageBackend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    @property
    def has_backend(self) -> bool:
        return self._backend is not None

    def wrap_backend(self, wrap: Callable[[StorageBackend], StorageBackend]) -> Callable[[], None]:
        """Serve ``wrap(backend)`` for the open backend and any opened later (fault injection:
        nvme_tier.testing.faults). Returns the undo, which serves the real backend again."""
        factory, wrapped = self._backend_factory, []  # (wrapper, real) pairs

        def open_wrapped(real: StorageBackend) -> StorageBackend:
            wrapped.append((wrap(real), real))
            return wrapped[-1][0]

        self._backend_factory = lambda: open_wrapped(factory())
        if self._backend is not None:
            self._backend = open_wrapped(self._backend)

        def undo() -> None:
            self._backend_factory = factory
            self._backend = next((real for w, real in wrapped if w is self._backend), self._backend)

        return undo

    def start_offload(
        self,
        items: list[tuple[StateBuffer, Tier]],
        unchanged: Callable[[StateBuffer], bool],
        host_copies: list[HostCopy],
    ) -> OffloadJob:
        """Queue every move: NVMe writes on the backend's thread, host copies on the copy stream.

        ``host_copies`` (from ``HostCopies.claim``) are the cpu/pinned_cpu items' host copies. Nothing is
        freed here. If queuing anything fails, what was queued is waited for and undone and the
        error raised: the states stay where they were.
        """
        job = OffloadJob(host_copies=host_copies)
        try:
            for buf, tier in items:
                if tier is Tier.nvme:
                    placed = Placed(buf, tier)
                    if unchanged(buf):
                        job.stats.bytes_skipped += buf.nbytes
                    else:
                        with self._submit.apart_from_caller():
                            write = self.backend.write(buf.name, buf.view, fingerprint=buf.fingerprint)
                        job.writes.append((placed, write))
                    job.placed.append(placed)
            # Back to back on the copy stream; into pageable memory ('cpu') CUDA returns only
            # once the copy is done, as upstream's pin_memory=False path does.
            to_host = self.host.copy_to_host(host_copies)
            job.stats.bytes_to_host += sum(p.buffer.nbytes for p in to_host)
            job.placed.extend(to_host)
            job.placed.extend(Placed(buf, tier) for buf, tier in items if tier is Tier.discard)
            job.copies = self._copier.mark()
        except BaseException as exc:
            self._abandon(job)
            self.host.unclaim(host_copies)
            typed = self._typed(exc)
            if typed is exc:
                raise
            raise typed from exc
        return job

    def release_queued(self, job: OffloadJob) -> None:
        """Free now what needs nothing more than the queued copies (the non-blocking return).

        Host-tier and discarded buffers are freed at once: the allocator reuses their memory only
        after the copy stream has read it (stream-ordered, as upstream's non-blocking offload).
        NVMe buffers whose file is already current are freed too; the others wait for their write.
        """
        writing = {id(p) for p, _ in job.writes}
        for p in job.placed:
            if id(p) in writing:
                continue
            if p.host is not None:
                self._copier.free_after_copies(p.buffer.view)
            p.buffer.free()

    def finish_offload(self, job: OffloadJob, free_as_written: bool) -> tuple[list[Placed], TransferStats]:
        """Wait until every byte is safe elsewhere, commit the manifest, free what is left.

        ``free_as_written``: free each NVMe buffer as soon as its own write has completed (and
        not before: bytes merely staged are not safe). If a later write fails, the buffers freed
        so far are restored first (NVMe ones read back from their complete files, host ones from
        their host copies, scratch zeroed), then every file of this call is removed and the error
        raised: the states are where they were before the offload.
        """
        stats = job.stats
        try:
            self._copier.synchronize()
            for p, fut in job.writes:
                fut.result()
                stats.bytes_written += p.buffer.nbytes
                if free_as_written:
                    p.buffer.free()
                if self._progress:
                    self._progress(p.buffer.nbytes)
            if job.writes:
                self.backend.commit()
        except BaseException as exc:
            freed = [p for p in job.placed if p.buffer.is_freed]
            try:
                restored = self._restore_freed(freed)
            except BaseException as restore_exc:
                raise self._strand(job, freed, exc) from restore_exc
            self._abandon(job)
            self.host.unclaim(job.host_copies)
            typed = self._typed(exc)
            if restored and isinstance(typed, TierIOError):
                typed = TierIOError(
                    f"{typed}; nothing was lost: the {restored} buffers freed as their writes "
                    "completed were read back and every state is where it was",
                    typed.filename,
                    typed.errno,
                )
            if typed is exc:
                raise
            raise typed from exc
        # Everything is safely elsewhere: now (and only now) release the rest of device memory,
        # Ctrl-C held so the controller's record (made before any free) stays the truth.
        job.safe = True
        self.host.keep(job.host_copies)
        with DeferredInterrupt():
            for p in job.placed:
                if not p.buffer.is_freed:
                    p.buffer.free()
                p.buffer.show_host_copy(p.host)  # complete now: parameters may read it meanwhile
        stats.seconds = time.perf_counter() - job.started
        return job.placed, stats

    def _restore_freed(self, freed: list[Placed]) -> int:
        """Bring back the buffers this offload already freed, with their old bytes; how many.

        NVMe buffers are freed only once their write completed, and unchanged ones only while
        their file is current, so each freed one has a complete file to be read back from.
        """
        reads: list[Future] = []
        with contextlib.suppress(Exception):
            self._copier.synchronize()  # host copies complete before they are copied back
        for p in freed:
            p.buffer.restore()
            if p.host is not None:
                self._copier.copy_async(p.buffer.view, p.host)
            elif p.tier is Tier.nvme:
                with self._submit.apart_from_caller():
                    reads.append(self.backend.read_into(p.buffer.name, p.buffer.view))
            else:  # scratch: its contents are rebuilt every step, as after any reload
                p.buffer.view.zero_()
        self._copier.synchronize()
        for fut in reads:
            fut.result()
        return len(freed)

    def _strand(self, job: OffloadJob, freed: list[Placed], cause: BaseException) -> TierIOError:
        """Restoring failed too (e.g. device memory taken meanwhile): keep what was freed away.

        Its bytes stay in their files (the manifest is committed so a reload verifies them) and
        host copies; ``job.stranded`` tells the controller which states a reload brings back.
        """
        for p in freed:
            if not p.buffer.is_freed:
                p.buffer.free()
        job.stranded = freed
        self.host.keep(job.host_copies)
        path = self._backend.directory.path if self._backend else "host memory"
        with contextlib.suppress(Exception):
            if self._backend is not None:
                self._backend.commit()
        return TierIOError(
            f"offload failed ({cause}) and restoring the {len(freed)} buffers it had already freed "
            f"failed too; their bytes are kept in {path}: call reload_states() to bring them back",
            path,
            getattr(cause, "errno", None),
        )

    def _abandon(self, job: OffloadJob) -> None:
        """Undo a job whose buffers are all resident: wait for its I/O, remove its files."""
        with contextlib.suppress(Exception):
            self._copier.synchronize()  # no DMA may still target a host copy being dropped
        for _, fut in job.writes:  # let every write finish before its file is removed
            with contextlib.suppress(BaseException):
                fut.result()
        self._undo_writes([p.buffer.name for p, _ in job.writes])
        for p in job.placed:
            p.host = None

    def _typed(self, exc: BaseException) -> BaseException:
        """An OSError becomes a ``TierIOError`` naming the path; everything else stays as it is."""
        if isinstance(exc, (TierIOError, KeyboardInterrupt)) or not isinstance(exc, OSError):
            return exc
        path = exc.filename or (self._backend.directory.path if self._backend else "?")
        return TierIOError(f"offload to {path} failed: {exc}; nothing was freed", path, exc.errno)

    def _undo_writes(self, names: list[str]) -> None:
        if not names or self._backend is None:
            return
        for name in names:
            try:
                self._backend.delete(name)
            except Exception as exc:  # keep the original error (if any); report the leftover
                log.warning("nvme_tier: could not remove the file of %s: %s", name, exc)

    def start_reload(self, placed: list[Placed], order_callers: bool) -> ReloadJob:
        """Restore every buffer, queue every move back: NVMe reads on the backend's thread (submitted
        apart from the caller's stream), host copies on the copy stream (``order_callers``: the
        caller's stream waits for those, as upstream's). On failure all is freed again and raised."""
        job = ReloadJob(placed)
        try:
            if any(p.tier is Tier.nvme for p in placed) and self.backend.names():
                self.backend.verify_manifest()
            for p in placed:
                if p.tier is Tier.nvme:
                    p.buffer.restore()
                    with self._submit.apart_from_caller():  # after the restore: its memory's last users
                        job.reads.append((p, self.backend.read_into(p.buffer.name, p.buffer.view)))
            for p in placed:
                if p.tier is not Tier.nvme:
                    p.buffer.restore()
                if p.host is not None:
                    if p.tier is Tier.pinned_cpu:
                        self.host.copy_pinned(p.buffer.view, p.host)
                    else:
                        self._copier.copy_async(p.buffer.view, p.host)
                    job.stats.bytes_from_host += p.buffer.nbytes
                elif p.tier is Tier.discard:
                    p.buffer.view.zero_()
            if order_callers:
                self._copier.order_before_callers()
        except BaseException:
            self._free_again(job)
            raise
        return job

    def finish_reload(self, job: ReloadJob, keep_files: bool, restored: Callable[[], None]) -> TransferStats:
        """Wait for every byte, then call ``restored``; on any failure free them again and raise.

        ``restored`` (the caller's "resident" bookkeeping) runs under a held Ctrl-C once every byte
        has arrived: an interrupt lands either before it (all freed again, still offloaded) or
        after it (all back, recorded as such), never between.
        """
        stats = job.stats
        handed_over = False
        try:
            self._copier.synchronize()
            for p, fut in job.reads:
                fut.result()
                stats.bytes_read += p.buffer.nbytes
                if self._progress:
                    self._progress(p.buffer.nbytes)
            with DeferredInterrupt():
                restored()
                handed_over = True
                self.host.hand_back(job.placed)
        except BaseException:
            if handed_over:  # a Ctrl-C held through the hand-over: every state is back and recorded
                raise
            self._free_again(job)
            raise
        if not keep_files:
            # Every state is back: a file that cannot be removed is a leftover, not a failed reload.
            self._undo_writes([p.buffer.name for p in job.placed if p.tier is Tier.nvme])
        stats.seconds = time.perf_counter() - job.started
        return stats

    def _free_again(self, job: ReloadJob) -> None:
        """A failed reload: wait for every queued copy and read, then free every buffer again."""
        with DeferredInterrupt():  # a second Ctrl-C must not cut the clean-up short
            with contextlib.suppress(Exception):
                self._copier.synchronize()
            for _, fut in job.reads:  # let every read finish before its memory is freed again
                with contextlib.suppress(Exception):
                    fut.result()
            for p in job.placed:
                p.buffer.free()

    def release(self) -> None:
        """Free kept pinned host copies; give staging back; delete this writer's files (states resident)."""
        self.host.release()
        if self._backend is not None:
            self._backend.release()
            self._backend = None


__all__ = ["OffloadJob", "ReloadJob", "TierMover", "TransferStats"]
