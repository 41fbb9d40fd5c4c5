"""One engine's place on disk, opened from (config, rank, label): the path checked, the backend
chosen and constructed, stale writers' leftovers cleaned, the free space counted.

The controller asks it two things: "open the backend" (lazily, at the first NVMe write) and "is
there room for these bytes" (before anything moves); attach checks the path early (``check_path_at_attach``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable

from ..config import OffloadStatesConfig
from ..deepspeed.aio_binding import aio_wait_keeps_gil
from ..deepspeed.version import installed_version
from ..errors import ConfigError, TierIOError
from ..mounts import NOT_A_DISK, log_storage_once, mount_of, storage_kind
from ..units import MiB, human_bytes
from .base import StorageBackend
from .manifest import OwnerInfo, WriterDirectory, ensure_root
from .registry import StoreRegistry
from .stale_writers import clean_writers

log = logging.getLogger("nvme_tier")
FREE_SPACE_MARGIN = 64 * MiB


def _path_of(config: OffloadStatesConfig) -> str:
    return config.required_path("the 'nvme' tier keeps its files there")


def check_path_at_attach(config: OffloadStatesConfig) -> None:
    """Refuse at attach what the first NVMe offload would refuse an hour into a run.

    A missing last level is created (0700); a missing parent is refused (a typo, not a new
    directory); a file, a read-only or someone else's directory are refused by ``ensure_root``.
    """
    path = _path_of(config)
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
    ensure_root(path)
    log_storage_once(path, log)


ENDURANCE_ADVICE = (
    "nvme_tier: offloads write every changed state to %s (filesystem %s); sustained offloading "
    "wears consumer SSDs (rated write endurance, TBW): prefer datacenter SSDs. Unchanged states "
    "are not rewritten (skip_unchanged). Said once per filesystem for this user (marker: %s)."
)
_warned_here: set[str] = set()  # where the marker cannot be written: once per process instead


def _marker_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "nvme_tier", "endurance_advice_given")


def warn_write_endurance_once(path: str) -> None:
    """The SSD-wear advice once per filesystem (mount) and user, not in every process: a marker
    file per filesystem under the user's cache directory. RAM filesystems get the tmpfs warning."""
    mount = mount_of(path)
    if storage_kind(mount.fs_type) in NOT_A_DISK:
        return
    key = f"{mount.source} at {mount.mount_point}"
    marker = os.path.join(_marker_dir(), hashlib.sha256(key.encode()).hexdigest()[:24])
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        if key in _warned_here:
            return
        _warned_here.add(key)
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
    log.warning(ENDURANCE_ADVICE, path, key, marker)


class StorageSite:
    """Where one engine's NVMe-tier files go, and with which backend."""

    def __init__(
        self,
        config: OffloadStatesConfig,
        rank: int,
        label: Callable[[], str],
        registry: StoreRegistry,
    ):
        self.config = config
        self.registry = registry
        self.rank = rank
        self._label = label  # the engine's model class, read when the directory is made
        self.backend_name: str | None = None

    @property
    def path(self) -> str:
        return _path_of(self.config)

    def choose_backend(self) -> str:
        """``auto``/``aio``/``zarr`` resolved for this path, once (the O_DIRECT probe needs the directory)."""
        if self.backend_name is None:
            path = self.path
            ensure_root(path)
            self.backend_name, why = self.registry.select(self.config.backend, path, self.config)
            # Visible at Python's default level (nvme_tier adds no log handler, as libraries should
            # not), once per engine; other ranks say it at INFO (a fallback warns on its own).
            level = logging.WARNING if self.rank == 0 else logging.INFO
            log.log(
                level,
                "nvme_tier: rank %d uses backend %s at %s (%s)",
                self.rank,
                self.backend_name,
                path,
                why,
            )
            if self.backend_name == "aio" and aio_wait_keeps_gil():
                log.warning(
                    "nvme_tier: DeepSpeed %s keeps the GIL while aio requests run: a non-blocking "
                    "offload or reload stalls every other Python thread meanwhile; DeepSpeed >= 0.18.4 "
                    "(or backend 'zarr') lets compute overlap the transfers",
                    installed_version(),
                )
        return self.backend_name

    def open(self) -> StorageBackend:
        """The backend over this process's own writer directory (no I/O until the first write)."""
        name = self.choose_backend()
        warn_write_endurance_once(self.path)
        clean_writers(self.path)  # stale leftovers of killed processes (never a live writer's files)
        directory = WriterDirectory(self.path, OwnerInfo.current(rank=self.rank, label=self._label()))
        return self.registry.open(self.config, directory, name)

    def check_free_space(self, needed: int, replaced: int) -> None:
        """Refuse before anything moves when ``needed`` bytes cannot fit; ``replaced``: bytes of
        this writer's own files the offload rewrites or deletes first (their space counts)."""
        path = self.path
        ensure_root(path)
        usage = shutil.disk_usage(path)
        if usage.total == 0:  # ramfs and some FUSE mounts report no capacity: nothing to check
            return
        free = usage.free + replaced
        if free < needed + FREE_SPACE_MARGIN:
            raise TierIOError(
                f"not enough free space on {path!r}: the offload needs {human_bytes(needed)} "
                f"(+{human_bytes(FREE_SPACE_MARGIN)} margin), {human_bytes(free)} free "
                f"(counting {human_bytes(replaced)} of this writer's own files it replaces)",
                path,
                28,  # ENOSPC
            )
