"""The backend registry: which backends exist, in ``auto``'s preference order, and how one is chosen.

Selection decides from each backend's declared ``Capabilities``, never from its name: ``auto`` walks
the registry and takes the first backend whose needs this host and path meet (aio when DeepSpeed's
async_io op is compatible *and* the path supports O_DIRECT, else zarr), with one warning that says
why and how to get the preferred one. Naming a backend turns its first unmet need into an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..config import OffloadStatesConfig
from ..deepspeed.ops import INSTALL_HINT, aio_compatible
from ..errors import BackendUnavailableError, ConfigError, NvmeTierError
from .aio import AioBackend
from .aio_handles import (
    AIO_MAX_NR_HINT,
    MEMLOCK_HINT,
    aio_budget_shortfall,
    idle_handle_count,
    memlock_shortfall,
)
from .base import Capabilities, StorageBackend
from .manifest import WriterDirectory
from .probes import logical_block_size, supports_o_direct
from .zarr_store import ZarrBackend

log = logging.getLogger("nvme_tier")

# Preference order: ``auto`` takes the first whose needs are met; zarr needs nothing, so it is last.
BACKENDS: dict[str, type[StorageBackend]] = {cls.capabilities.name: cls for cls in (AioBackend, ZarrBackend)}
_warned: set[str] = set()


@dataclass(frozen=True)
class Unmet:
    """A need of a backend that this host or path does not meet."""

    reason: str  # what is missing: auto's fallback warning and returned reason
    hint: str  # how to meet it: auto's fallback warning
    error: NvmeTierError  # raised when the backend was asked for by name


def register_backend(cls: type[StorageBackend], *, before: str | None = None) -> None:
    """Register ``cls`` under ``cls.capabilities.name``, ahead of the backend ``before`` in ``auto``'s
    preference order (None: last). Registering a name again moves it."""
    entries = [(name, known) for name, known in BACKENDS.items() if name != cls.capabilities.name]
    names = [name for name, _ in entries]
    if before is not None and before not in names:
        raise ConfigError(f"register_backend: no backend {before!r} to register {cls.__name__} before")
    entries.insert(names.index(before) if before is not None else len(entries), (cls.capabilities.name, cls))
    BACKENDS.clear()
    BACKENDS.update(entries)


def select_backend(name: str, path: str, config: OffloadStatesConfig | None = None) -> tuple[str, str]:
    """Resolve ``auto`` or a registered backend's name for ``path``; returns (backend name, reason).

    ``config`` (its staging budget and aio knobs) sizes the staging a backend would page-lock.
    """
    if name not in ("auto", *BACKENDS):
        allowed = ", ".join(["auto", *BACKENDS])
        raise ConfigError(f"offload_states.backend: unknown backend {name!r} (allowed: {allowed})")
    config = config or OffloadStatesConfig()
    if name != "auto":
        unmet = first_unmet(BACKENDS[name], path, config)
        if unmet is not None:
            raise unmet.error
        check_block_alignment(BACKENDS[name].capabilities, path, config)
        return name, "requested"
    refused: list[tuple[str, Unmet]] = []
    for candidate, cls in BACKENDS.items():
        unmet = first_unmet(cls, path, config)
        if unmet is not None:
            refused.append((candidate, unmet))
            continue
        check_block_alignment(cls.capabilities, path, config)
        if not refused:
            return candidate, met_needs(cls.capabilities)
        preferred, first = refused[0]
        if first.reason not in _warned:
            _warned.add(first.reason)
            log.warning(
                "nvme_tier: backend 'auto' falls back to %s: %s. To use %s: %s",
                candidate,
                first.reason,
                preferred,
                first.hint,
            )
        return candidate, first.reason
    raise refused[0][1].error  # no registered backend can run here: the preferred one's error


def open_backend(config: OffloadStatesConfig, directory: WriterDirectory, name: str) -> StorageBackend:
    """Construct (no I/O) the registered backend ``name`` for ``directory`` from the config's knobs."""
    return BACKENDS[name].from_config(config, directory)


def first_unmet(cls: type[StorageBackend], path: str, config: OffloadStatesConfig) -> Unmet | None:
    """The first of ``cls``'s declared needs that this host or ``path`` does not meet, or None."""
    caps, what = cls.capabilities, f"offload_states.backend {cls.capabilities.name!r}"
    if caps.needs_libaio:
        ok, why = aio_compatible()
        if not ok:
            return Unmet(why, INSTALL_HINT, BackendUnavailableError(f"{what}: {why}; {INSTALL_HINT}"))
    slots, slot_bytes = cls.staging_slots(config)
    shortfall = memlock_shortfall(slots * slot_bytes) if caps.page_locked_staging else None
    if shortfall:
        others = backends_without(lambda c: c.page_locked_staging)
        error = BackendUnavailableError(f"{what}: {shortfall}; {MEMLOCK_HINT}, or use backend {others}")
        return Unmet(shortfall, MEMLOCK_HINT, error)
    if caps.needs_libaio:
        # Handles idle in this process are reused (shared by its engines); only new ones need events.
        no_events = aio_budget_shortfall(slots - idle_handle_count(config.aio), config.aio)
        if no_events:
            error = BackendUnavailableError(f"{what}: {no_events}; {AIO_MAX_NR_HINT}")
            return Unmet(no_events, AIO_MAX_NR_HINT, error)
    if caps.o_direct and not supports_o_direct(path):
        error = ConfigError(
            f"{what}: {path!r} does not support O_DIRECT (tmpfs?); put path on a real disk, or use "
            f"backend 'auto'/{backends_without(lambda c: c.o_direct)}"
        )
        hint = f"put offload_states.path on a real disk (not tmpfs) for {caps.name}"
        return Unmet(f"{path!r} does not support O_DIRECT", hint, error)
    return None


def met_needs(caps: Capabilities) -> str:
    """How ``auto`` says why it took the first backend it tried."""
    met = [
        text
        for need, text in ((caps.needs_libaio, "async_io compatible"), (caps.o_direct, "O_DIRECT supported"))
        if need
    ]
    return " and ".join(met) or "it needs nothing of this host"


def backends_without(need: Callable[[Capabilities], bool]) -> str:
    """The registered backends that lack ``need`` (a predicate on capabilities): 'zarr'/..."""
    return "/".join(repr(name) for name, cls in BACKENDS.items() if not need(cls.capabilities))


def check_block_alignment(caps: Capabilities, path: str, config: OffloadStatesConfig) -> None:
    """ConfigError when the device under ``path`` cannot take the backend's O_DIRECT requests.

    An O_DIRECT request's length and offset must be multiples of the device's logical block. A
    backend's are multiples of its declared alignment; the async_io op's are also ``aio.block_size``
    long. A device whose logical block does not divide them refuses every request with EINVAL, an
    error DeepSpeed's op drops: the offload would write nothing.
    """
    block = logical_block_size(path) if caps.o_direct else None
    if block is None:
        return
    if caps.needs_libaio and (config.aio.block_size % block or caps.alignment % block):
        raise ConfigError(
            f"offload_states.aio.block_size {config.aio.block_size} is not a multiple of the logical "
            f"block size ({block} B) of the device under {path!r}; use a multiple of "
            f"{max(block, caps.alignment)}"
        )
    if caps.alignment % block:
        raise ConfigError(
            f"offload_states.backend {caps.name!r} writes in {caps.alignment} B units, not a multiple "
            f"of the logical block size ({block} B) of the device under {path!r}; put path on another device"
        )
