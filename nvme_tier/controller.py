"""One engine's offload lifecycle: validate, place, move, guard, reload, report.

It knows nothing of DeepSpeed's internals (engine.py does) nor of bytes on disk (storage/ and
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

from . import engine as ds
from .config import OffloadStatesConfig
from .errors import ConfigError, StatesOffloadedError, TierIOError
from .policy import Placement, decide
from .progress import Progress
from .status import build_status, human_bytes
from .storage import open_backend, select_backend
from .storage.base import on_callers_device
from .storage.manifest import OwnerInfo, WriterDirectory, clean_writers, ensure_root
from .tiers import Placed, StateBuffer, TierMover, TransferStats
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
        self.rank = ds.rank_of(engine)
        self.phase = OffloadPhase.resident
        self.version = 0  # bumped by every backward/step/load: "did the state change since?"
        self._written: dict[str, tuple[int, int]] = {}  # buffer name -> (version, nbytes) on disk
        self._placed: dict[StateKind, list[Placed]] = {}
        self._pending: Future | None = None
        self._pending_error: BaseException | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self.backend_name: str | None = None
        self.last_stats: dict[str, TransferStats] = {}
        self._progress = Progress(enabled=config.progress)
        self._mover = TierMover(self._open_backend, progress=self._progress.advance)
        self._undo_hooks = ds.install_hooks(
            engine, self.guard, self.mark_dirty, self.offload_states, self.reload_states
        )
        self._finalizer = weakref.finalize(engine, _release_in_owner, self._mover, os.getpid())
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

    def _preallocate(self) -> None:
        """Start page-locking the host copies this config's policy will need (background thread).

        Set NVME_TIER_PREALLOC=0 to allocate them at the first offload instead.
        """
        if os.environ.get("NVME_TIER_PREALLOC", "1") == "0":
            return
        try:
            placement, buffers = self.plan()
        except Exception as exc:  # the first offload reports any problem with the plan
            log.debug("nvme_tier: no pinned pre-allocation: %s", exc)
            return
        self._mover.preallocate(
            [b for kind, tier in placement.tiers.items() if tier is Tier.pinned_cpu for b in buffers[kind]]
        )

    # -- guards ----------------------------------------------------------------------------------
    def guard(self, what: str) -> None:
        """Called before forward/backward/step: wait for a prefetch, refuse while offloaded."""
        if self.phase is OffloadPhase.reloading:
            self.wait()
        if self.phase is not OffloadPhase.resident:
            away = ", ".join(k.value for k in self._placed) or "states"
            raise StatesOffloadedError(
                f"{what}() called while {away} are offloaded ({self.phase.value}); "
                "call engine.reload_states() first"
            )

    def mark_dirty(self) -> None:
        """Record that the states may have changed, so the next offload rewrites them."""
        self.version += 1

    # -- offload ---------------------------------------------------------------------------------
    def plan(
        self, include=None, device=None, pin_memory=None
    ) -> tuple[Placement, dict[StateKind, list[StateBuffer]]]:
        buffers = ds.discover_buffers(self.engine)
        present = [k for k, bufs in buffers.items() if bufs and k not in self._placed]
        placement = decide(self.config, present, include=include, device=device, pin_memory=pin_memory)
        host_is_device = ds.accelerator_device().type == "cpu"
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
        return Placement(tiers), buffers

    def offload_states(self, include=None, device=None, pin_memory=None, non_blocking=None) -> None:
        """Drop-in for ``engine.offload_states``; ``None`` arguments come from the config."""
        with self._lock:
            self._finish_pending()
            if self.phase is OffloadPhase.failed:
                raise StatesOffloadedError("a previous reload failed; see the error it raised")
            placement, buffers = self.plan(include, device, pin_memory)
            items = [(b, t) for k, t in placement.tiers.items() if t is not Tier.device for b in buffers[k]]
            if not items:
                log.info("nvme_tier: nothing to offload")
                return
            nvme = [b for b, t in items if t is Tier.nvme and not self._unchanged(b)]
            nvme_bytes = sum(b.nbytes for b in nvme)
            if nvme_bytes:
                self._resolve_backend()
                self._check_free_space(nvme_bytes, [b.name for b in nvme])
            ds.quiesce(self.engine)
            blocking = not (self.config.non_blocking if non_blocking is None else non_blocking)
            self.phase = OffloadPhase.offloading
            if blocking:
                self._run_offload(items)
            else:
                self._pending = self._pool().submit(on_callers_device(lambda: self._run_offload(items)))

    def _run_offload(self, items: list[tuple[StateBuffer, Tier]]) -> None:
        total = sum(b.nbytes for b, t in items if t is not Tier.discard)
        try:
            with self._progress.task("offload", total):
                placed, stats = self._mover.offload(items, self._unchanged)
        except BaseException:
            self.phase = OffloadPhase.resident if not self._placed else OffloadPhase.offloaded
            raise
        for p in placed:
            self._placed.setdefault(p.buffer.kind, []).append(p)
            if p.tier is Tier.nvme:
                self._written[p.buffer.name] = (self.version, p.buffer.nbytes)
        ds.empty_cache()
        self.phase = OffloadPhase.offloaded
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

    def _unchanged(self, buf: StateBuffer) -> bool:
        if not self.config.skip_unchanged or not self._mover.has_backend:
            return False
        if self._written.get(buf.name) != (self.version, buf.nbytes):
            return False
        return buf.name in self._mover.backend.names()

    # -- reload ----------------------------------------------------------------------------------
    def reload_states(self, non_blocking=None) -> None:
        """Drop-in for ``engine.reload_states``; non-blocking reloads are awaited before compute."""
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
                stats = self._mover.reload(placed, keep_files=self.config.skip_unchanged)
        except BaseException:
            self.phase = OffloadPhase.failed
            raise
        if not self.config.skip_unchanged:
            self._written.clear()
        self._placed.clear()
        self.phase = OffloadPhase.resident
        self.last_stats["reload"] = stats
        log.info(
            "nvme_tier: rank %d reloaded %.3f GB from nvme and %.3f GB from host in %.2f s",
            self.rank,
            stats.bytes_read / 1e9,
            stats.bytes_from_host / 1e9,
            stats.seconds,
        )

    # -- async plumbing --------------------------------------------------------------------------
    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier")
        return self._executor

    def _finish_pending(self) -> None:
        fut, self._pending = self._pending, None
        if fut is not None:
            fut.result()

    def wait(self) -> None:
        """Block until a non-blocking offload or reload has finished (re-raising its error)."""
        with self._lock:
            self._finish_pending()

    # -- reporting and teardown ------------------------------------------------------------------
    def status(self) -> dict[str, StateStatus]:
        with self._lock:
            placed = dict(self._placed)
            buffers = ds.discover_buffers(self.engine)
        directory = self._mover.backend.directory.path if self._mover.has_backend else self.config.path
        return build_status(buffers, placed, directory, str(ds.accelerator_device()))

    def release(self) -> None:
        """Delete this engine's files and free pinned host memory (states must be resident)."""
        with self._lock:
            self._finish_pending()
            if self._placed:
                raise StatesOffloadedError(
                    "release() while states are offloaded would lose them; reload first"
                )
            self._written.clear()
            self._mover.release()

    def detach(self) -> None:
        self.release()
        self._undo_hooks()
        self._finalizer.detach()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
