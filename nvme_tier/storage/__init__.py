"""Backend registry and ``auto`` selection.

``auto`` picks aio when DeepSpeed's async_io op is compatible *and* the path supports O_DIRECT
(tmpfs does not), else zarr, with one warning that says why and how to get aio.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile

from ..config import OffloadStatesConfig
from ..deepspeed.ops import INSTALL_HINT, aio_compatible
from ..errors import BackendUnavailableError, ConfigError
from .aio import PAGE, AioBackend, staging_plan
from .aio_handles import (
    AIO_MAX_NR_HINT,
    MEMLOCK_HINT,
    aio_budget_shortfall,
    idle_handle_count,
    memlock_shortfall,
)
from .base import Capabilities, StorageBackend
from .manifest import OwnerInfo, TensorRecord, WriterDirectory
from .stale_writers import clean_writers, scan_writers
from .zarr_store import ZarrBackend

log = logging.getLogger("nvme_tier")

BACKENDS: dict[str, type[StorageBackend]] = {"aio": AioBackend, "zarr": ZarrBackend}
_warned: set[str] = set()

__all__ = [
    "check_block_alignment",
    "logical_block_size",
    "BACKENDS",
    "AioBackend",
    "Capabilities",
    "OwnerInfo",
    "StorageBackend",
    "TensorRecord",
    "WriterDirectory",
    "ZarrBackend",
    "clean_writers",
    "open_backend",
    "scan_writers",
    "select_backend",
    "supports_o_direct",
]


def supports_o_direct(path: str) -> bool:
    """Probe by opening a scratch file with O_DIRECT (tmpfs and some FUSE mounts refuse)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ntier-odirect-", dir=path)
    except OSError as exc:  # ENAMETOOLONG near PATH_MAX, EACCES, EROFS...
        raise ConfigError(
            f"offload_states.path {path!r}: cannot create a file in it ({exc.strerror})"
        ) from None
    os.close(fd)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise ConfigError(f"offload_states.path {path!r}: O_DIRECT probe failed ({exc.strerror})") from None
    else:
        os.close(fd)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def logical_block_size(path: str) -> int | None:
    """The logical block size of the block device ``path`` lives on (None: not a block device).

    /sys/dev/block/<maj:min> of a partition has no queue/; its parent disk's does.
    """
    try:
        dev = os.stat(path).st_dev
        node = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    except OSError:
        return None
    for candidate in (node, os.path.dirname(node)):
        queue = os.path.join(candidate, "queue", "logical_block_size")
        with contextlib.suppress(OSError, ValueError), open(queue, encoding="ascii") as fh:
            return int(fh.read())
    return None


def check_block_alignment(path: str, config: OffloadStatesConfig) -> None:
    """ConfigError when the device under ``path`` cannot take aio's O_DIRECT requests.

    Each request is ``aio.block_size`` long (its pieces are multiples of 4096) at 4096-aligned
    offsets; a device whose logical block does not divide both refuses every one of them with
    EINVAL, an error DeepSpeed's op drops: the offload would write nothing.
    """
    block = logical_block_size(path)
    if block is None:
        return
    if config.aio.block_size % block or PAGE % block:
        raise ConfigError(
            f"offload_states.aio.block_size {config.aio.block_size} is not a multiple of the logical "
            f"block size ({block} B) of the device under {path!r}; use a multiple of "
            f"{max(block, PAGE)}"
        )


def select_backend(name: str, path: str, config: OffloadStatesConfig | None = None) -> tuple[str, str]:
    """Resolve ``auto``/``aio``/``zarr`` for ``path``; returns (backend name, reason).

    ``config`` (its staging budget and aio knobs) sizes the page-locked ring aio would need.
    """
    if name not in ("auto", *BACKENDS):
        raise ConfigError(f"offload_states.backend: unknown backend {name!r} (allowed: auto, aio, zarr)")
    if name == "zarr":
        return "zarr", "requested"
    config = config or OffloadStatesConfig()
    slots, chunk = staging_plan(config.staging_budget_bytes, config.aio)
    ok, why = aio_compatible()
    shortfall = memlock_shortfall(slots * chunk) if ok else None
    # Handles idle in this process are reused (shared by its engines); only new ones need events.
    no_events = aio_budget_shortfall(slots - idle_handle_count(config.aio), config.aio) if ok else None
    direct = ok and not shortfall and not no_events and supports_o_direct(path)
    if name == "aio":
        if not ok:
            raise BackendUnavailableError(f"offload_states.backend 'aio': {why}; {INSTALL_HINT}")
        if shortfall:
            raise BackendUnavailableError(
                f"offload_states.backend 'aio': {shortfall}; {MEMLOCK_HINT}, or use backend 'zarr'"
            )
        if no_events:
            raise BackendUnavailableError(f"offload_states.backend 'aio': {no_events}; {AIO_MAX_NR_HINT}")
        if not direct:
            raise ConfigError(
                f"offload_states.backend 'aio': {path!r} does not support O_DIRECT (tmpfs?); "
                "put path on a real disk, or use backend 'auto'/'zarr'"
            )
        check_block_alignment(path, config)
        return "aio", "requested"
    if ok and direct:
        check_block_alignment(path, config)
        return "aio", "async_io compatible and O_DIRECT supported"
    if not ok:
        reason, hint = why, INSTALL_HINT
    elif shortfall:
        reason, hint = shortfall, MEMLOCK_HINT
    elif no_events:
        reason, hint = no_events, AIO_MAX_NR_HINT
    else:
        reason = f"{path!r} does not support O_DIRECT"
        hint = "put offload_states.path on a real disk (not tmpfs) for aio"
    if reason not in _warned:
        _warned.add(reason)
        log.warning("nvme_tier: backend 'auto' falls back to zarr: %s. To use aio: %s", reason, hint)
    return "zarr", reason


def open_backend(config: OffloadStatesConfig, directory: WriterDirectory, name: str) -> StorageBackend:
    """Construct (no I/O) the backend ``name`` for ``directory`` from the config's knobs."""
    common = {"checksum": config.checksum, "staging_budget_bytes": config.staging_budget_bytes}
    if name == "aio":
        return AioBackend(directory, settings=config.aio, **common)
    return ZarrBackend(directory, settings=config.zarr, **common)
