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
from ..errors import BackendUnavailableError, ConfigError
from .aio import INSTALL_HINT, MEMLOCK_HINT, AioBackend, aio_compatible, memlock_shortfall, staging_plan
from .base import Capabilities, StorageBackend
from .manifest import OwnerInfo, TensorRecord, WriterDirectory, clean_writers, scan_writers
from .zarr_store import ZarrBackend

log = logging.getLogger("nvme_tier")

BACKENDS: dict[str, type[StorageBackend]] = {"aio": AioBackend, "zarr": ZarrBackend}
_warned: set[str] = set()

__all__ = [
    "aio_compatible_reason",
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
    fd, probe = tempfile.mkstemp(prefix=".ntier-odirect-", dir=path)
    os.close(fd)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    else:
        os.close(fd)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


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
    direct = ok and not shortfall and supports_o_direct(path)
    if name == "aio":
        if not ok:
            raise BackendUnavailableError(f"offload_states.backend 'aio': {why}; {INSTALL_HINT}")
        if shortfall:
            raise BackendUnavailableError(
                f"offload_states.backend 'aio': {shortfall}; {MEMLOCK_HINT}, or use backend 'zarr'"
            )
        if not direct:
            raise ConfigError(
                f"offload_states.backend 'aio': {path!r} does not support O_DIRECT (tmpfs?); "
                "put path on a real disk, or use backend 'auto'/'zarr'"
            )
        return "aio", "requested"
    if ok and direct:
        return "aio", "async_io compatible and O_DIRECT supported"
    if not ok:
        reason, hint = why, INSTALL_HINT
    elif shortfall:
        reason, hint = shortfall, MEMLOCK_HINT
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


def aio_compatible_reason() -> tuple[bool, str]:
    """(usable, why) for the aio backend, without building the op."""
    return aio_compatible()
