"""The executor: runs an offload plan (plan.py) and the reload back, all-or-nothing.

It moves state buffers (buffers.py): one tensor storage each, freed and restored in place, so
every view of it keeps its identity and the engine's own bookkeeping needs no re-pointing.

Offload order: queue every copy and write, wait, verify, commit the manifest, then free device
memory; a failure before that removes what this call wrote, every state stays where it was. A
non-blocking offload frees earlier, never before the bytes are safe: host tiers and discard at
return, each NVMe buffer once its write completed; a later failure restores the freed first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch

from .buffers import Placed, StateBuffer
from .device_copies import DeviceCopier
from .errors import TierIOError
from .fingerprint import fingerprints
from .host_budget import BudgetTransaction, HostMemoryBudget
from .host_copies import HostCopies, HostCopy
from .interrupts import DeferredInterrupt
from .jobs import OffloadJob, ReloadJob, TransferStats
from .plan import OffloadPlan, StoredFile
from .storage.base import StorageBackend
from .stream_order import SubmitStream
from .types import Tier

log = logging.getLogger("nvme_tier")


class TierMover:
    """Executes offload plans and reloads: the one owner of this engine's backend (opened at its first
    use) and host copies (reserved against ``budget``)."""

    def __init__(
        self,
        backend: Callable[[], StorageBackend],
        budget: HostMemoryBudget,
        progress: Callable[[int], None] | None = None,
    ):
        self._backend_factory = backend
        self._backend: StorageBackend | None = None
        self._copier = DeviceCopier()
        self._submit = SubmitStream()
        self.host = HostCopies(self._copier, budget)
        self._progress = progress

    @property
    def backend(self) -> StorageBackend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

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

    @property
    def location(self) -> str | None:
        """Where the NVMe tier's files are (None before the backend is opened)."""
        return self._backend.directory.path if self._backend is not None else None

    # -- what planning needs ---------------------------------------------------------------------
    def stored(self) -> dict[str, StoredFile]:
        """What earlier offloads left on disk, by name (nothing before the backend is opened)."""
        if self._backend is None:
            return {}
        backend, out = self._backend, {}
        for name in backend.names():
            record = backend.record(name)
            present = bool(record.file) and os.path.exists(backend.directory.file_path(record.file))
            out[name] = StoredFile(record.nbytes, record.fingerprint, present)
        return out

    def preallocate(self, buffers: list[StateBuffer]) -> None:
        self.host.preallocate(buffers)

    def settle_preallocation(self) -> None:
        """Let a background pre-allocation finish (its copies parked) before the budget is read."""
        self.host.settle_preallocation()

    def claim(self, plan: OffloadPlan, budget: BudgetTransaction) -> list[HostCopy]:
        """Reserve the plan's host copies in the transaction its placement was decided in."""
        return self.host.claim(plan.host_items, budget)

    def unclaim(self, copies: list[HostCopy]) -> None:
        """Undo ``claim``: the offload stopped before anything was copied."""
        self.host.unclaim(copies)

    def skip_unchanged(self, plan: OffloadPlan, rewrite_all: bool) -> OffloadPlan:
        """The plan with the live bytes' fingerprints, skipping each file that still holds them.

        Taken on the bytes' device before any write is queued: the engine is quiesced and its
        compute refused until the offload ends, so each record gets the fingerprint of exactly the
        bytes its file holds. Without one (no device memory for the fingerprint's temporaries) a
        state is written, never skipped. A kept file counts only while it is the one written, as
        written (``holds_written_bytes``): truncated, edited or replaced since, it is written again
        (skipping it would free the only good copy).
        """
        nvme = [i.buffer for i in plan.nvme_items]
        try:
            prints = dict(zip((b.name for b in nvme), fingerprints([b.view for b in nvme]), strict=True))
        except torch.cuda.OutOfMemoryError as exc:
            log.warning("nvme_tier: no memory to fingerprint the states, rewriting them all: %s", exc)
            return plan
        candidates = plan.skip_candidates(prints, rewrite_all)
        if candidates:
            backend = self.backend
            candidates = [n for n in candidates if backend.holds_written_bytes(backend.record(n))]
        return plan.skipping(prints, candidates)

    # -- offload ---------------------------------------------------------------------------------
    def start_offload(self, plan: OffloadPlan, host_copies: list[HostCopy]) -> OffloadJob:
        """Queue every move: NVMe writes on the backend's thread, host copies on the copy stream.

        ``host_copies`` (from ``claim``) are the plan's cpu/pinned_cpu copies. Nothing is freed
        here. If queuing anything fails, what was queued is waited for and undone and the error
        raised: the states stay where they were.
        """
        job = OffloadJob(host_copies=host_copies)
        try:
            for item in plan.nvme_items:
                buf = item.buffer
                placed = Placed(buf, Tier.nvme)
                if item.skip:
                    job.stats.bytes_skipped += buf.nbytes
                else:
                    with self._submit.apart_from_caller():
                        write = self.backend.write(buf.name, buf.view, fingerprint=item.fingerprint)
                    job.writes.append((placed, write))
                job.placed.append(placed)
            # Back to back on the copy stream; into pageable memory ('cpu') CUDA returns only
            # once the copy is done, as upstream's pin_memory=False path does.
            to_host = self.host.copy_to_host(host_copies)
            job.stats.bytes_to_host += sum(p.buffer.nbytes for p in to_host)
            job.placed.extend(to_host)
            job.placed.extend(Placed(i.buffer, i.tier) for i in plan.items if i.tier is Tier.discard)
            for p in job.placed:
                p.spilled = p.buffer.kind in plan.placement.spilled
            job.copies = self._copier.mark()
        except BaseException as exc:
            self.abandon(job)
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
            for p in self._completed(job.writes):
                stats.bytes_written += p.buffer.nbytes
                if free_as_written:
                    p.buffer.free()
            if job.writes:
                self.backend.commit()
        except BaseException as exc:
            freed = [p for p in job.placed if p.buffer.is_freed]
            try:
                restored = self._restore_freed(freed)
            except BaseException as restore_exc:
                raise self._strand(job, freed, exc) from restore_exc
            self.abandon(job)
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

    def _completed(self, moves: list[tuple[Placed, Future]]) -> Iterator[Placed]:
        """Once the host copies are done, each NVMe write's or read's buffer as it completes, in order."""
        self._copier.synchronize()
        for p, fut in moves:
            fut.result()
            if self._progress:
                self._progress(p.buffer.nbytes)
            yield p

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
        path = self.location or "host memory"
        with contextlib.suppress(Exception):
            if self._backend is not None:
                self._backend.commit()
        return TierIOError(
            f"offload failed ({cause}) and restoring the {len(freed)} buffers it had already freed "
            f"failed too; their bytes are kept in {path}: call reload_states() to bring them back",
            path,
            getattr(cause, "errno", None),
        )

    def abandon(self, job: OffloadJob) -> None:
        """Undo a job whose buffers are all resident: wait for its I/O, remove its files, give its
        host copies back."""
        with contextlib.suppress(Exception):
            self._copier.synchronize()  # no DMA may still target a host copy being dropped
        for _, fut in job.writes:  # let every write finish before its file is removed
            with contextlib.suppress(BaseException):
                fut.result()
        self._undo_writes([p.buffer.name for p, _ in job.writes])
        for p in job.placed:
            p.host = None
        self.host.unclaim(job.host_copies)

    def _typed(self, exc: BaseException) -> BaseException:
        """An OSError becomes a ``TierIOError`` naming the path; everything else stays as it is."""
        if isinstance(exc, (TierIOError, KeyboardInterrupt)) or not isinstance(exc, OSError):
            return exc
        path = exc.filename or self.location or "?"
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

    @contextlib.contextmanager
    def reloaded(self, job: ReloadJob, keep_files: bool) -> Iterator[TransferStats]:
        """Wait for every byte, then run the ``with`` body (the caller's "resident" bookkeeping) and
        hand the host copies back, Ctrl-C held; on any failure before that, free them again and raise.

        An interrupt lands either before the body (all freed again, still offloaded) or after it
        (all back, recorded as such), never between. ``keep_files``: leave the NVMe files for the
        next offload to skip (``skip_unchanged``), else remove them once every state is back.
        """
        stats = job.stats
        try:
            for p in self._completed(job.reads):
                stats.bytes_read += p.buffer.nbytes
        except BaseException:
            self._free_again(job)
            raise
        with DeferredInterrupt():
            try:
                yield stats
            except BaseException:
                self._free_again(job)
                raise
            self.host.hand_back(job.placed)
        if not keep_files:
            # Every state is back: a file that cannot be removed is a leftover, not a failed reload.
            self._undo_writes([p.buffer.name for p in job.placed if p.tier is Tier.nvme])
        stats.seconds = time.perf_counter() - job.started

    def drop_host_copies(self, placed: list[Placed]) -> None:
        """The states are on the device again (or given up): their host copies go back to the budget."""
        self.host.hand_back(placed)

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


__all__ = ["TierMover"]
