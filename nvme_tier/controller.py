"""One engine's offload lifecycle: validate, place, move, guard, reload, report.

It knows nothing of DeepSpeed's internals (deepspeed/ does) nor of bytes on disk (storage/ and
tiers.py do); it sequences them and owns the state machine the guards consult.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from .buffers import Placed, StateBuffer
from .config import OffloadStatesConfig
from .deepspeed.accelerator import accelerator_device, empty_cache, rank_of
from .deepspeed.hooks import install_hooks
from .deepspeed.locators import discover_buffers, engine_facts, quiesce
from .errors import StatesOffloadedError, failed_reload_message, offloaded_message
from .host_budget import HostMemoryBudget, resolve_limit
from .interrupts import DeferredInterrupt
from .jobs import BackgroundOperation, OffloadJob, ReloadJob, TransferStats
from .plan import plan_offload
from .policy import require_bool
from .progress import Progress
from .runtime import Runtime
from .status import build_status
from .storage.site import StorageSite
from .tiers import TierMover
from .types import OffloadPhase, StateKind, StateStatus, Tier

log = logging.getLogger("nvme_tier")


def _release_in_owner(mover: TierMover, owner_pid: int) -> None:
    """The engine's finalizer. A child forked after attach runs it too, at its own exit: there it
    must neither delete the parent's files nor touch the parent's I/O threads (absent in a child)."""
    if os.getpid() == owner_pid:
        mover.release()


class OffloadController:
    """Attached to one engine; reached through ``engine.offload_states``/``reload_states``."""

    def __init__(self, engine: Any, config: OffloadStatesConfig, runtime: Runtime):
        self._engine_ref = weakref.ref(engine)
        self.config = config
        self.runtime = runtime  # the process-wide pieces it shares (budget, staging, aio handles)
        self.rank = rank_of(engine)
        self.phase = OffloadPhase.resident
        self._placed: dict[StateKind, list[Placed]] = {}
        self._in_flight: OffloadJob | None = None  # an offload started and not yet finished
        self._failure: BaseException | None = None  # why the last reload failed (phase failed)
        self._background = BackgroundOperation()
        self._lock = threading.RLock()
        self._status_lock = threading.Lock()  # what status() reads, changed by the worker thread
        self.site = StorageSite(config, self.rank, lambda: type(self.engine.module).__name__, runtime.stores)
        self.last_stats: dict[str, TransferStats] = {}
        self._progress = Progress(enabled=config.progress)
        self.host_limit, self.limit_source = resolve_limit(
            config.host_budget_bytes, config.device == "auto", self.budget.reserved
        )
        self.budget.register(self, self.host_limit, config.staging_budget_bytes if config.path else 0)
        self._mover = TierMover(self.site.open, self.budget, progress=self._progress.advance)
        self._rewrite_all = False  # set by mark_dirty: the next offload skips nothing
        guards = (self.guard, self.mark_dirty, self.offload_states, self.reload_states)
        self._undo_hooks = install_hooks(engine, *guards, self.guard_weights, self.guard_states)
        self._finalizer = weakref.finalize(engine, _release_in_owner, self._mover, os.getpid())
        if config.preallocate:
            self._preallocate()

    # -- engine access ---------------------------------------------------------------------------
    @property
    def budget(self) -> HostMemoryBudget:
        """The host budget this engine shares with the others of its runtime."""
        return self.runtime.budget

    @property
    def engine(self) -> Any:
        eng = self._engine_ref()
        if eng is None:
            raise RuntimeError("the engine this nvme_tier controller was attached to is gone")
        return eng

    def _preallocate(self) -> None:
        """Start page-locking the host copies this config's policy will need (``preallocate``)."""
        buffers = self._movable()
        try:
            placement = plan_offload(
                self.config, buffers, engine_facts(buffers, list(buffers), None), {}
            ).placement
        except Exception as exc:  # the first offload reports any problem with the plan
            log.debug("nvme_tier: no pinned pre-allocation: %s", exc)
            return
        self._mover.preallocate(
            [b for kind, tier in placement.tiers.items() if tier is Tier.pinned_cpu for b in buffers[kind]]
        )

    # -- guards ----------------------------------------------------------------------------------
    def guard(self, what: str) -> None:
        """Called before forward/backward/step: wait for a prefetch, refuse while offloaded.

        After a failed reload, ``load_checkpoint`` is the way out and is let through (see
        ``_discard_failed_copy``); everything else is refused with that advice.
        """
        if self._background.pending and self.phase in (OffloadPhase.reloading, OffloadPhase.failed):
            self.wait()  # a prefetch, or a failed one's own error first
        if self.phase is OffloadPhase.failed:
            if what == "load_checkpoint":
                self._discard_failed_copy()
                return
            raise StatesOffloadedError(self._after_failure(f"{what}()"))
        if self.phase is not OffloadPhase.resident:
            away = ", ".join(k.value for k in self._placed) or "states"
            raise StatesOffloadedError(offloaded_message(f"{what}()", away, self.phase.value))

    def guard_weights(self, what: str) -> None:
        """Before DeepSpeed gathers the weights outside forward (``GatheredParameters``): only they
        matter (OpenRLHF gathers them for vLLM while the optimizer states are offloaded)."""
        self.guard_states(what, frozenset({StateKind.lp_params}))

    def guard_states(self, what: str, needs: frozenset[StateKind]) -> None:
        """Called before states are read or written outside compute (DeepSpeed's ``safe_*``
        accessors, ``state_dict()``): those being moved by a non-blocking call are waited for,
        those that are away are refused (their storages are freed: reading one segfaults)."""
        if not any(kind in self._placed for kind in needs):
            return
        self.wait()
        if self.phase is OffloadPhase.failed:
            raise StatesOffloadedError(self._after_failure(what))
        away = [kind.value for kind in StateKind if kind in needs and kind in self._placed]
        if away:
            raise StatesOffloadedError(offloaded_message(what, ", ".join(away), self.phase.value))

    def _after_failure(self, refused: str) -> str:
        with self._lock:
            away = ", ".join(k.value for k in self._placed) or "the offloaded states"
            why = f"{type(self._failure).__name__}: {self._failure}" if self._failure else "see its error"
        return failed_reload_message(refused, away, why)

    def _discard_failed_copy(self) -> None:
        """Give every freed state zero-filled device memory for ``load_checkpoint`` to load into.

        The offloaded copy is no longer trusted (nor rewritten-over: the next offload writes
        everything anew). DeepSpeed's load_checkpoint returns ``(None, ...)`` without raising when
        it finds no checkpoint: check its return value, the zeros are not states.
        """
        with self._lock:
            log.warning(
                "nvme_tier: rank %d discards the offloaded copy of %s after a failed reload (%s); "
                "load_checkpoint fills the states",
                self.rank,
                ", ".join(k.value for k in self._placed),
                self._failure,
            )
            with DeferredInterrupt():
                placed = [p for ps in self._placed.values() for p in ps]
                for p in placed:
                    p.buffer.restore()
                    p.buffer.view.zero_()
                self._mover.drop_host_copies(placed)  # their reservations go back to the budget
                self._placed.clear()
                self._failure = None
                self.phase = OffloadPhase.resident
            self.mark_dirty()

    def mark_dirty(self) -> None:
        """Make the next offload rewrite every state, whatever the fingerprints say.

        A hint, never what keeps skipping correct: that is the fingerprint of the live bytes
        (``TierMover.skip_unchanged``). backward/step/load_checkpoint call it too; their states
        changed anyway.
        """
        self._rewrite_all = True

    # -- offload ---------------------------------------------------------------------------------
    def _movable(self) -> dict[StateKind, list[StateBuffer]]:
        """The engine's states that are on the device now (not offloaded already)."""
        return {
            k: bufs for k, bufs in discover_buffers(self.engine).items() if bufs and k not in self._placed
        }

    def offload_states(self, include=None, device=None, pin_memory=None, non_blocking=None) -> None:
        """Drop-in for ``engine.offload_states``; ``None`` arguments come from the config.

        Non-blocking, device memory is released as upstream releases it, never before the bytes
        are safe elsewhere: host tiers (cpu, pinned_cpu) and discarded scratch are freed when this
        returns, their copies ordered on the copy stream (memory reuse waits for them); each NVMe
        buffer is freed as soon as its own write has completed. If a later write fails, the
        buffers already freed are read back from their complete files (host ones from their
        host copies) before the error is raised, at the next call (``wait``, ``reload_states``,
        a guarded compute call), so a failed offload leaves every state where it was.
        """
        if non_blocking is not None:
            require_bool("non_blocking", non_blocking)
        with self._lock:
            self._background.finish()
            if self.phase is OffloadPhase.failed:
                raise StatesOffloadedError(self._after_failure("offload_states()"))
            self._mover.settle_preallocation()
            buffers, stored = self._movable(), self._mover.stored()
            with self.budget.transaction() as budget:  # no other engine reserves between plan and claim
                facts = engine_facts(buffers, list(buffers), budget.available)
                plan = plan_offload(self.config, buffers, facts, stored, include, device, pin_memory)
                if not plan.items:
                    log.info("nvme_tier: nothing to offload")
                    return
                host_copies = self._mover.claim(plan, budget)
            blocking = not (self.config.non_blocking if non_blocking is None else non_blocking)
            try:
                if plan.new_file_bytes:
                    self.site.choose_backend()
                    self.site.check_free_space(plan.new_file_bytes, plan.replaced_bytes)
                quiesce(self.engine)
                self.phase = OffloadPhase.offloading
                if self.config.skip_unchanged:
                    plan = self._mover.skip_unchanged(plan, self._rewrite_all)
            except BaseException:
                self._mover.unclaim(host_copies)
                self.phase = OffloadPhase.resident if not self._placed else OffloadPhase.offloaded
                raise
            try:
                job = self._mover.start_offload(plan, host_copies)
            except BaseException:
                self.phase = OffloadPhase.resident if not self._placed else OffloadPhase.offloaded
                raise
            # Where each buffer goes is recorded before any of them is freed, Ctrl-C held: whatever
            # stops the frees (an interrupt, an error), no freed state is left undescribed. A Ctrl-C
            # delivered as the hold ends finds the job owned: by the worker, or undone here.
            try:
                with DeferredInterrupt(), self._status_lock:
                    self._in_flight = job
                    self._record_offloaded(job.placed)
                    if not blocking:
                        self._mover.release_queued(job)
                        self._background.start(lambda: self._run_offload(job, free_as_written=True))
            except KeyboardInterrupt:
                if blocking:  # nothing is freed yet: undo it all
                    self._mover.abandon(job)
                    self._offload_failed(job)
                raise  # non-blocking: it stops the caller; the worker finishes the offload
            if blocking:
                self._run_offload(job, free_as_written=False)

    def _run_offload(self, job: OffloadJob, free_as_written: bool) -> None:
        total = sum(p.buffer.nbytes for p, _ in job.writes)
        try:
            with self._progress.task("offload", total):
                placed, stats = self._mover.finish_offload(job, free_as_written)
        except BaseException:
            self._offload_failed(job)
            raise
        with self._status_lock:
            self._rewrite_all = False
            self._in_flight = None
            self.phase = OffloadPhase.offloaded
        if not free_as_written:
            # Blocking: hand the freed memory back to the driver, as upstream does. Not from the
            # worker of a non-blocking offload: emptying the cache synchronizes the device and makes
            # the compute running meanwhile (another model's generation) re-allocate its blocks.
            empty_cache()
        self.last_stats["offload"] = stats
        moved = sum(p.buffer.nbytes for p in placed)
        log.info("nvme_tier: rank %d %s", self.rank, stats.offload_line(moved, self.site.backend_name))

    def _offload_failed(self, job: OffloadJob) -> None:
        with self._status_lock:
            self._in_flight = None
            # Once every byte is safe elsewhere the offload stands (a reload restores it all,
            # freed or not). Before that, buffers still (or again) resident are forgotten and
            # freed ones stay recorded (restoring them failed): a reload brings those back.
            if not job.safe:
                self._forget_resident(job.placed)
            self.phase = OffloadPhase.offloaded if self._placed else OffloadPhase.resident

    def _record_offloaded(self, placed: list[Placed]) -> None:
        """Where each buffer goes; recorded before the mover frees any of them."""
        for p in placed:
            self._placed.setdefault(p.buffer.kind, []).append(p)

    def _forget_resident(self, placed: list[Placed]) -> None:
        """Drop the records of a failed offload's buffers that are on the device after all."""
        resident = {id(p) for p in placed if not p.buffer.is_freed}
        for kind in list(self._placed):
            kept = [p for p in self._placed[kind] if id(p) not in resident]
            if kept:
                self._placed[kind] = kept
            else:
                del self._placed[kind]

    # -- reload ----------------------------------------------------------------------------------
    def reload_states(self, non_blocking=None) -> None:
        """Drop-in for ``engine.reload_states``; non-blocking, the engine's compute and DeepSpeed's
        accessors wait for it (docs/design.md, "Non-blocking reloads": on a GPU a direct read of a
        state tensor needs ``nvme_tier.wait`` first)."""
        if non_blocking is not None:
            require_bool("non_blocking", non_blocking)
        with self._lock:
            self._background.finish()
            if self.phase is OffloadPhase.resident or not self._placed:
                self.phase = OffloadPhase.resident
                return
            blocking = not (self.config.non_blocking if non_blocking is None else non_blocking)
            self.phase = OffloadPhase.reloading
            with self._reload_failures():
                placed = [p for ps in self._placed.values() for p in ps]
                job = self._mover.start_reload(placed, order_callers=not blocking)
            if blocking:
                self._finish_reload(job)
            elif not job.reads:  # host copies only: the caller's stream already waits for them
                self._background.start(lambda: self._finish_reload(job))
            else:  # NVMe reads: the engine's own use and its accessors wait for them (hooks)
                self._background.start_reads(lambda: self._finish_reload(job), accelerator_device())

    def _finish_reload(self, job: ReloadJob) -> None:
        """Wait for every byte, then record the states resident (Ctrl-C held through the hand-over)."""
        total = sum(p.buffer.nbytes for p in job.placed if p.tier is Tier.nvme)
        with (
            self._reload_failures(),
            self._progress.task("reload", total),
            self._mover.reloaded(job, keep_files=self.config.skip_unchanged) as stats,
        ):
            self._record_reloaded()
        self.last_stats["reload"] = stats
        log.info("nvme_tier: rank %d %s", self.rank, stats.reload_line())

    @contextlib.contextmanager
    def _reload_failures(self) -> Iterator[None]:
        """The phase after a reload that raised: offloaded when interrupted, failed when broken."""
        try:
            yield
        except KeyboardInterrupt:
            # Interrupted, not broken: the copies are intact and every state was freed again (or,
            # when the interrupt was held through the hand-over, is back and recorded resident).
            if self._placed:
                self.phase = OffloadPhase.offloaded
            raise
        except BaseException as exc:
            if self._placed:
                self.phase = OffloadPhase.failed
                self._failure = exc
            raise

    def _record_reloaded(self) -> None:
        """Every state is back; recorded (Ctrl-C held) before the mover drops the host copies."""
        with self._status_lock:
            self._placed.clear()
            self._failure = None
            self.phase = OffloadPhase.resident

    # -- background operation -------------------------------------------------------------------
    def wait(self) -> None:
        """Block until a non-blocking offload or reload has finished (re-raising its error)."""
        with self._lock:
            self._background.finish()

    # -- reporting and teardown ------------------------------------------------------------------
    def status(self) -> dict[str, StateStatus]:
        """Where each state is; during a non-blocking offload also the bytes still in flight."""
        with self._status_lock:  # not self._lock: a caller waiting for the offload holds that
            job, phase = self._in_flight, self.phase
            placed = {k: list(ps) for k, ps in self._placed.items()}
            in_flight = job.bytes_in_flight() if job is not None else {}
            buffers = discover_buffers(self.engine)
        directory = self._mover.location or self.config.path
        return build_status(buffers, placed, directory, str(accelerator_device()), phase, in_flight)

    def release(self) -> None:
        """Delete this engine's files and free pinned host memory (states must be resident)."""
        with self._lock:
            self._background.finish()
            self._refuse_while_offloaded("release()", "nvme_tier.release(engine)")
            self._mover.release()

    def _refuse_while_offloaded(self, refused: str, then: str) -> None:
        """Raise (changing nothing) when states are away: dropping their copies would lose them."""
        if self.phase is OffloadPhase.failed:
            raise StatesOffloadedError(self._after_failure(refused))
        if self._placed:
            away = ", ".join(k.value for k in self._placed)
            raise StatesOffloadedError(
                f"{refused} while {away} are offloaded would lose them; "
                f"call engine.reload_states() first, then {then}"
            )

    def detach(self) -> None:
        """Undo attach; refused, with nothing changed, while states are offloaded."""
        with self._lock:
            self._background.finish()
            self._refuse_while_offloaded("detach()", "nvme_tier.detach(engine)")
            self.release()
            self.budget.unregister(self)
            self._undo_hooks()
            self._finalizer.detach()
            self._background.shutdown()
