"""One engine's offload lifecycle: validate, place, move, guard, reload, report.

It knows nothing of DeepSpeed's internals (deepspeed/ does) nor of bytes on disk (storage/ and
tiers.py do); it sequences them and owns the state machine the guards consult.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .buffers import StateBuffer
from .config import OffloadStatesConfig
from .deepspeed.accelerator import accelerator_device, empty_cache, rank_of
from .deepspeed.hooks import install_hooks
from .deepspeed.locators import discover_buffers, quiesce
from .errors import ConfigError, StatesOffloadedError, TierIOError
from .fingerprint import fingerprints
from .host_budget import process_budget
from .interrupts import DeferredInterrupt
from .mounts import log_storage_once
from .policy import EngineFacts, Placement, decide, require_bool
from .progress import Progress
from .status import build_status, human_bytes
from .storage import open_backend, select_backend
from .storage.base import on_callers_device
from .storage.manifest import OwnerInfo, TensorRecord, WriterDirectory, ensure_root
from .storage.stale_writers import clean_writers
from .tiers import OffloadJob, Placed, TierMover, TransferStats
from .types import OffloadPhase, StateKind, StateStatus, Tier

log = logging.getLogger("nvme_tier")
_FREE_SPACE_MARGIN = 64 << 20


def _release_in_owner(mover: TierMover, owner_pid: int) -> None:
    """The engine's finalizer. A child forked after attach runs it too, at its own exit: there it
    must neither delete the parent's files nor touch the parent's I/O threads (absent in a child)."""
    if os.getpid() == owner_pid:
        mover.release()


class OffloadController:
    """Attached to one engine; reached through ``engine.offload_states``/``reload_states``."""

    def __init__(self, engine: Any, config: OffloadStatesConfig):
        self._engine_ref = weakref.ref(engine)
        self.config = config
        self.rank = rank_of(engine)
        self.phase = OffloadPhase.resident
        self._rewrite_all = False  # set by mark_dirty: the next offload skips nothing
        self._placed: dict[StateKind, list[Placed]] = {}
        self._pending: Future | None = None
        self._in_flight: OffloadJob | None = None  # an offload started and not yet finished
        self._failure: BaseException | None = None  # why the last reload failed (phase failed)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._status_lock = threading.Lock()  # what status() reads, changed by the worker thread
        self.backend_name: str | None = None
        self.last_stats: dict[str, TransferStats] = {}
        self._progress = Progress(enabled=config.progress)
        self._budget = process_budget()
        self._check_budget()
        self._budget.register(
            self, config.host_budget_bytes, config.staging_budget_bytes if config.path else 0
        )
        self._mover = TierMover(self._open_backend, progress=self._progress.advance, budget=self._budget)
        self._undo_hooks = install_hooks(
            engine, self.guard, self.mark_dirty, self.offload_states, self.reload_states, self.guard_weights
        )
        self._finalizer = weakref.finalize(engine, _release_in_owner, self._mover, os.getpid())
        if config.preallocate:
            self._preallocate()

    # -- engine access ---------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        eng = self._engine_ref()
        if eng is None:
            raise RuntimeError("the engine this nvme_tier controller was attached to is gone")
        return eng

    # -- backend ---------------------------------------------------------------------------------
    def _resolve_backend(self) -> str:
        if self.backend_name is None:
            path = self._require_path()
            ensure_root(path)  # the O_DIRECT probe needs the directory; bad paths fail typed here
            self.backend_name, why = select_backend(self.config.backend, path, self.config)
            log.info("nvme_tier: rank %d uses backend %s (%s)", self.rank, self.backend_name, why)
        return self.backend_name

    def _open_backend(self):
        path = self._require_path()
        name = self._resolve_backend()
        clean_writers(path)  # stale leftovers of killed processes (never a live writer's files)
        label = f"{type(self.engine.module).__name__}"
        directory = WriterDirectory(path, OwnerInfo.current(rank=self.rank, label=label))
        return open_backend(self.config, directory, name)

    def _require_path(self) -> str:
        path = self.config.path
        if not path:
            raise ConfigError("offload_states.path is required for the 'nvme' tier")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"offload_states.path {path!r} is not a directory")
        return path

    @staticmethod
    def check_path(engine: Any, config: OffloadStatesConfig) -> None:
        """Refuse at attach what the first NVMe offload would refuse an hour into a run.

        Only when the policy puts something on nvme for this engine: an engine with master
        weights (hp_params) has an optimizer, whose states appear at its first step. A missing
        last level is created (0700); a missing parent is refused (a typo, not a new directory).
        """
        buffers = discover_buffers(engine)
        present = [k for k, bufs in buffers.items() if bufs]
        if buffers.get(StateKind.hp_params) and StateKind.optim_states not in present:
            present.append(StateKind.optim_states)
        if not decide(config, present).uses_nvme:  # ConfigError when nvme is used without a path
            return
        path = config.path
        nearest, missing = path, []
        while not os.path.exists(nearest):  # False also below a file (ENOTDIR)
            missing.append(nearest)
            nearest = os.path.dirname(nearest)
        if not os.path.isdir(nearest):
            where = "is a file" if nearest == path else f"lies under a file: {nearest!r} is a file"
            raise ConfigError(f"offload_states.path {path!r} {where}, not a directory")
        if len(missing) > 1:
            raise ConfigError(
                f"offload_states.path {path!r}: its parent {os.path.dirname(path)!r} does not exist "
                f"(nearest existing directory: {nearest!r}); nvme_tier creates only the last level"
            )
        ensure_root(path)  # creates the last level (0700); refuses a read-only or unwritable directory
        log_storage_once(path, log)

    def _check_free_space(self, needed: int, names: list[str]) -> None:
        """Refuse before anything moves when ``needed`` bytes cannot fit. The files this writer
        already holds for ``names`` are rewritten in place or deleted first: their space counts."""
        path = self._require_path()
        ensure_root(path)  # ConfigError for a file, a file as parent, a read-only or unwritable dir
        usage = shutil.disk_usage(path)
        if usage.total == 0:  # ramfs and some FUSE mounts report no capacity: nothing to check
            return
        reclaimed = 0
        if self._mover.has_backend:
            backend = self._mover.backend
            stored = set(backend.names())
            reclaimed = sum(backend.record(name).nbytes for name in names if name in stored)
        free = usage.free + reclaimed
        if free < needed + _FREE_SPACE_MARGIN:
            raise TierIOError(
                f"not enough free space on {path!r}: the offload needs {human_bytes(needed)} "
                f"(+{human_bytes(_FREE_SPACE_MARGIN)} margin), {human_bytes(free)} free "
                f"(counting {human_bytes(reclaimed)} of this writer's own files it replaces)",
                path,
                28,  # ENOSPC
            )

    def _check_budget(self) -> None:
        """At attach: a host budget this engine's own host copies exceed needs a path to spill to."""
        limit = self.config.host_budget_bytes
        if limit is None or self.config.path:
            return
        buffers = discover_buffers(self.engine)
        present = [k for k, bufs in buffers.items() if bufs]
        facts = EngineFacts(self._host_bytes(buffers, present), limit)
        decide(self.config, present, facts=facts)  # raises ConfigError naming host_budget_mb and path

    def _preallocate(self) -> None:
        """Start page-locking the host copies this config's policy will need (``preallocate``)."""
        try:
            placement, buffers = self.plan()
        except Exception as exc:  # the first offload reports any problem with the plan
            log.debug("nvme_tier: no pinned pre-allocation: %s", exc)
            return
        self._mover.host.preallocate(
            [b for kind, tier in placement.tiers.items() if tier is Tier.pinned_cpu for b in buffers[kind]]
        )

    # -- guards ----------------------------------------------------------------------------------
    def guard(self, what: str) -> None:
        """Called before forward/backward/step: wait for a prefetch, refuse while offloaded.

        After a failed reload, ``load_checkpoint`` is the way out and is let through (see
        ``_discard_failed_copy``); everything else is refused with that advice.
        """
        if self.phase is OffloadPhase.reloading:
            self.wait()
        if self.phase is OffloadPhase.failed:
            if what == "load_checkpoint":
                self._discard_failed_copy()
                return
            raise StatesOffloadedError(self._after_failure(f"{what}()"))
        if self.phase is not OffloadPhase.resident:
            away = ", ".join(k.value for k in self._placed) or "states"
            raise StatesOffloadedError(
                f"{what}() called while {away} are offloaded ({self.phase.value}); "
                "call engine.reload_states() first"
            )

    def guard_weights(self, what: str) -> None:
        """Called before DeepSpeed gathers the weights outside forward (``GatheredParameters``).

        Only the weights matter here: OpenRLHF gathers them to broadcast to vLLM while the
        optimizer states are offloaded, which must keep working. Weights being reloaded (or
        offloaded) by a non-blocking call are waited for; weights that are away are refused.
        """
        if StateKind.lp_params not in self._placed:
            return
        self.wait()
        if self.phase is OffloadPhase.failed:
            raise StatesOffloadedError(self._after_failure(what))
        if StateKind.lp_params in self._placed:
            raise StatesOffloadedError(
                f"{what} called while lp_params are offloaded ({self.phase.value}); "
                "call engine.reload_states() first"
            )

    def _after_failure(self, refused: str) -> str:
        """What to do once a reload failed: "reload first" cannot help when the disk copy is bad."""
        with self._lock:
            away = ", ".join(k.value for k in self._placed) or "the offloaded states"
            why = f"{type(self._failure).__name__}: {self._failure}" if self._failure else "see its error"
        return (
            f"{refused} refused: the last reload_states() failed ({why}), so the offloaded copy of "
            f"{away} is unusable and these states are not on the device. Restore them from a checkpoint "
            "with engine.load_checkpoint(...) (allowed now), then call nvme_tier.release(engine) to delete "
            "the unusable files. Only if the error was transient (an I/O error, not an IntegrityError) "
            "may engine.reload_states() be retried instead."
        )

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
                self._mover.host.hand_back(placed)  # their reservations go back to the budget
                self._placed.clear()
                self._failure = None
                self.phase = OffloadPhase.resident
            self.mark_dirty()

    def mark_dirty(self) -> None:
        """Make the next offload rewrite every state, whatever the fingerprints say.

        A hint, never what keeps skipping correct: that is the fingerprint of the live bytes
        (``_unchanged``). backward/step/load_checkpoint call it too; their states changed anyway.
        """
        self._rewrite_all = True

    # -- offload ---------------------------------------------------------------------------------
    @staticmethod
    def _host_bytes(
        buffers: dict[StateKind, list[StateBuffer]], present: list[StateKind]
    ) -> dict[StateKind, int]:
        """Host bytes each state's host copy would take (0 for states already in host RAM)."""
        host_is_device = accelerator_device().type == "cpu"
        return {
            kind: 0
            if not host_is_device and all(b.device.type == "cpu" for b in buffers[kind])
            else sum(b.nbytes for b in buffers[kind])
            for kind in present
        }

    def plan(
        self, include=None, device=None, pin_memory=None, budgeted: bool = False
    ) -> tuple[Placement, dict[StateKind, list[StateBuffer]]]:
        """Decide each state's tier; ``budgeted`` spills against the host budget (hold its lock)."""
        buffers = discover_buffers(self.engine)
        present = [k for k, bufs in buffers.items() if bufs and k not in self._placed]
        facts = (
            EngineFacts(self._host_bytes(buffers, present), self._budget.available()) if budgeted else None
        )
        placement = decide(
            self.config, present, include=include, device=device, pin_memory=pin_memory, facts=facts
        )
        host_is_device = accelerator_device().type == "cpu"
        tiers = dict(placement.tiers)
        for kind in present:
            # States that already live in host RAM (ZeRO-Offload) gain nothing from a host tier.
            already_on_host = all(b.device.type == "cpu" for b in buffers[kind])
            if tiers[kind] in (Tier.cpu, Tier.pinned_cpu) and not host_is_device and already_on_host:
                tiers[kind] = Tier.device
        for kind, tier in tiers.items():
            stuck = [b for b in buffers[kind] if tier.frees_device and not b.resizable]
            if stuck:
                raise ConfigError(
                    f"policy.{kind.value}: {stuck[0].name} lives in page-locked host memory, which cannot be "
                    f'freed in place; keep it where it is with policy {{"{kind.value}": "device"}}'
                )
        return Placement(tiers, placement.spilled), buffers

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
            self._finish_pending()
            if self.phase is OffloadPhase.failed:
                raise StatesOffloadedError(self._after_failure("offload_states()"))
            self._mover.host.settle_preallocation()
            with self._budget.lock:  # no other engine reserves between these facts and this claim
                placement, buffers = self.plan(include, device, pin_memory, budgeted=True)
                items = [
                    (b, t) for k, t in placement.tiers.items() if t is not Tier.device for b in buffers[k]
                ]
                if not items:
                    log.info("nvme_tier: nothing to offload")
                    return
                host_copies = self._mover.host.claim(items)
            blocking = not (self.config.non_blocking if non_blocking is None else non_blocking)
            try:
                # A file of the same size is rewritten in place (or skipped): only new files need space.
                nvme = [b for b, t in items if t is Tier.nvme and self._stored(b) is None]
                nvme_bytes = sum(b.nbytes for b in nvme)
                if nvme_bytes:
                    self._resolve_backend()
                    self._check_free_space(nvme_bytes, [b.name for b in nvme])
                quiesce(self.engine)
                self.phase = OffloadPhase.offloading
                if self.config.skip_unchanged:
                    self._take_fingerprints([b for b, t in items if t is Tier.nvme])
            except BaseException:
                self._mover.host.unclaim(host_copies)
                self.phase = OffloadPhase.resident if not self._placed else OffloadPhase.offloaded
                raise
            try:
                job = self._mover.start_offload(items, self._unchanged, host_copies)
            except BaseException:
                self.phase = OffloadPhase.resident if not self._placed else OffloadPhase.offloaded
                raise
            for p in job.placed:
                p.spilled = p.buffer.kind in placement.spilled
            # Where each buffer goes is recorded before any of them is freed, Ctrl-C held: whatever
            # stops the frees (an interrupt, an error), no freed state is left undescribed.
            with DeferredInterrupt(), self._status_lock:
                self._in_flight = job
                self._record_offloaded(job.placed)
                if not blocking:
                    self._mover.release_queued(job)
            if blocking:
                self._run_offload(job, free_as_written=False)
            else:
                self._pending = self._pool().submit(
                    on_callers_device(lambda: self._run_offload(job, free_as_written=True))
                )

    def _run_offload(self, job: OffloadJob, free_as_written: bool) -> None:
        total = sum(p.buffer.nbytes for p, _ in job.writes)
        try:
            with self._progress.task("offload", total):
                placed, stats = self._mover.finish_offload(job, free_as_written)
        except BaseException:
            with self._status_lock:
                self._in_flight = None
                # Once every byte is safe elsewhere the offload stands (a reload restores it all,
                # freed or not). Before that, buffers still (or again) resident are forgotten and
                # freed ones stay recorded (restoring them failed): a reload brings those back.
                if not job.safe:
                    self._forget_resident(job.placed)
                self.phase = OffloadPhase.offloaded if self._placed else OffloadPhase.resident
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
        log.info(
            "nvme_tier: rank %d offloaded %.3f GB (%.3f GB to %s, %.3f GB unchanged on disk, %.3f GB to host) in %.2f s",
            self.rank,
            sum(p.buffer.nbytes for p in placed) / 1e9,
            stats.bytes_written / 1e9,
            self.backend_name or "-",
            stats.bytes_skipped / 1e9,
            stats.bytes_to_host / 1e9,
            stats.seconds,
        )

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

    def _take_fingerprints(self, buffers: list[StateBuffer]) -> None:
        """Fingerprint the bytes about to be written, on their device, before any write is queued.

        The engine is quiesced and its compute refused until the offload ends, so each record gets
        the fingerprint of exactly the bytes its file holds. Without one (no device memory for
        the fingerprint's temporaries) a state is written, never skipped.
        """
        try:
            prints = fingerprints([b.view for b in buffers])
        except torch.cuda.OutOfMemoryError as exc:
            log.warning("nvme_tier: no memory to fingerprint the states, rewriting them all: %s", exc)
            return
        for buf, print_ in zip(buffers, prints, strict=True):
            buf.fingerprint = print_

    def _stored(self, buf: StateBuffer) -> TensorRecord | None:
        """The record of ``buf``'s file from an earlier offload, if a file of its size is on disk."""
        if not self._mover.has_backend:
            return None
        backend = self._mover.backend
        try:
            record = backend.record(buf.name)
        except KeyError:
            return None
        on_disk = bool(record.file) and os.path.exists(backend.directory.file_path(record.file))
        return record if on_disk and record.nbytes == buf.nbytes else None

    def _unchanged(self, buf: StateBuffer) -> bool:
        """Whether ``buf``'s file holds exactly its live bytes: their fingerprints are equal.

        Nothing else counts (no version counter): any write path (``GatheredParameters``, EMA,
        ``copy_``, ``load_state_dict``...) changes the fingerprint of what it wrote.
        """
        if buf.fingerprint is None or self._rewrite_all:
            return False
        record = self._stored(buf)
        return record is not None and record.fingerprint == buf.fingerprint

    # -- reload ----------------------------------------------------------------------------------
    def reload_states(self, non_blocking=None) -> None:
        """Drop-in for ``engine.reload_states``; non-blocking reloads are awaited before compute."""
        if non_blocking is not None:
            require_bool("non_blocking", non_blocking)
        with self._lock:
            self._finish_pending()
            if self.phase is OffloadPhase.resident or not self._placed:
                self.phase = OffloadPhase.resident
                return
            blocking = not (self.config.non_blocking if non_blocking is None else non_blocking)
            self.phase = OffloadPhase.reloading
            if blocking:
                self._run_reload()
            else:
                self._pending = self._pool().submit(on_callers_device(self._run_reload))

    def _run_reload(self) -> None:
        placed = [p for ps in self._placed.values() for p in ps]
        try:
            if any(p.tier is Tier.nvme for p in placed):
                self._mover.verify_on_disk()
            total = sum(p.buffer.nbytes for p in placed if p.tier is not Tier.discard)
            with self._progress.task("reload", total):
                stats = self._mover.reload(
                    placed, keep_files=self.config.skip_unchanged, restored=self._record_reloaded
                )
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
        self.last_stats["reload"] = stats
        log.info(
            "nvme_tier: rank %d reloaded %.3f GB from nvme and %.3f GB from host in %.2f s",
            self.rank,
            stats.bytes_read / 1e9,
            stats.bytes_from_host / 1e9,
            stats.seconds,
        )

    def _record_reloaded(self) -> None:
        """Every state is back; called by the mover (Ctrl-C held) before it drops host copies."""
        with self._status_lock:
            self._placed.clear()
            self._failure = None
            self.phase = OffloadPhase.resident

    # -- async plumbing --------------------------------------------------------------------------
    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier")
        return self._executor

    def _finish_pending(self) -> None:
        """Wait for the background operation; forget it only once it has ended.

        A Ctrl-C while waiting leaves it pending (it runs on), so the next call waits again
        instead of starting an operation beside it.
        """
        fut = self._pending
        if fut is None:
            return
        try:
            fut.result()
        finally:
            if fut.done():
                self._pending = None

    def wait(self) -> None:
        """Block until a non-blocking offload or reload has finished (re-raising its error)."""
        with self._lock:
            self._finish_pending()

    # -- reporting and teardown ------------------------------------------------------------------
    def status(self) -> dict[str, StateStatus]:
        """Where each state is; during a non-blocking offload also the bytes still in flight."""
        with self._status_lock:  # not self._lock: a caller waiting for the offload holds that
            job, phase = self._in_flight, self.phase
            placed = {k: list(ps) for k, ps in self._placed.items()}
            in_flight = job.bytes_in_flight() if job is not None else {}
            buffers = discover_buffers(self.engine)
        directory = self._mover.backend.directory.path if self._mover.has_backend else self.config.path
        return build_status(buffers, placed, directory, str(accelerator_device()), phase, in_flight)

    def release(self) -> None:
        """Delete this engine's files and free pinned host memory (states must be resident)."""
        with self._lock:
            self._finish_pending()
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
            self._finish_pending()
            self._refuse_while_offloaded("detach()", "nvme_tier.detach(engine)")
            self.release()
            self._budget.unregister(self)
            self._undo_hooks()
            self._finalizer.detach()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
