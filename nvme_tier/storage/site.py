"""One engine's place on disk, opened from (config, rank, label): the path checked, the backend
chosen and constructed, stale writers' leftovers cleaned, the free space counted.

The controller asks it two things: "open the backend" (lazily, at the first NVMe write) and "is
there room for these bytes" (before anything moves); attach checks the path early (``check_path_at_attach``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

from ..config import OffloadStatesConfig
from ..errors import ConfigError, TierIOError
from ..mounts import log_storage_once
from ..status import human_bytes
from .base import StorageBackend
from .manifest import OwnerInfo, WriterDirectory, ensure_root
from .registry import open_backend, select_backend
from .stale_writers import clean_writers

log = logging.getLogger("nvme_tier")
FREE_SPACE_MARGIN = 64 << 20


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


class StorageSite:
    """Where one engine's NVMe-tier files go, and with which backend."""

    def __init__(self, config: OffloadStatesConfig, rank: int, label: Callable[[], str]):
        self.config = config
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
            self.backend_name, why = select_backend(self.config.backend, path, self.config)
            log.info("nvme_tier: rank %d uses backend %s (%s)", self.rank, self.backend_name, why)
        return self.backend_name

    def open(self) -> StorageBackend:
        """The backend over this process's own writer directory (no I/O until the first write)."""
        name = self.choose_backend()
        clean_writers(self.path)  # stale leftovers of killed processes (never a live writer's files)
        directory = WriterDirectory(self.path, OwnerInfo.current(rank=self.rank, label=self._label()))
        return open_backend(self.config, directory, name)

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
