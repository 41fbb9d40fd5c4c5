"""The store registry: which block stores exist, in ``auto``'s preference order, and how one is chosen.

Selection decides from each store's declared ``Capabilities``, never from its name: ``auto`` walks
the registry and takes the first store whose needs this host and path meet (aio when DeepSpeed's
async_io op is compatible *and* the path supports O_DIRECT, else zarr), with one warning that says
why and how to get the preferred one. Naming a store turns its first unmet need into an error.
Third-party stores are registered (``register``) or found through the entry point group
``nvme_tier.backends`` (each entry point names a ``BlockStore`` subclass), and named in the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points

from ..config import OffloadStatesConfig
from ..deepspeed.ops import INSTALL_HINT, aio_compatible
from ..errors import BackendUnavailableError, ConfigError, NvmeTierError
from ..host_budget import HostMemoryBudget
from .aio import AioStore
from .aio_handles import (
    AIO_MAX_NR_HINT,
    MEMLOCK_HINT,
    AioHandlePool,
    aio_budget_shortfall,
    memlock_shortfall,
)
from .base import StorageBackend
from .blocks import BlockStore, Capabilities
from .manifest import WriterDirectory
from .probes import logical_block_size, supports_o_direct
from .staging import SharedStagingPool
from .zarr_store import ZarrStore

log = logging.getLogger("nvme_tier")
ENTRY_POINT_GROUP = "nvme_tier.backends"


@dataclass(frozen=True)
class Unmet:
    """A need of a store that this host or path does not meet."""

    reason: str  # what is missing: auto's fallback warning and returned reason
    hint: str  # how to meet it: auto's fallback warning
    error: NvmeTierError  # raised when the store was asked for by name


class StoreRegistry:
    """Block stores by name, in ``auto``'s preference order (zarr needs nothing, so it is last).

    ``handles`` (the aio handle pool) is asked how many handles a new aio store can reuse; the
    stores it opens share ``staging`` and ``handles`` (nvme_tier.runtime passes the process's).
    """

    def __init__(
        self,
        stores: Iterable[type[BlockStore]] = (AioStore, ZarrStore),
        *,
        entry_point_group: str | None = ENTRY_POINT_GROUP,
        staging: SharedStagingPool | None = None,
        handles: AioHandlePool | None = None,
    ):
        self._stores = {cls.capabilities.name: cls for cls in stores}
        self._group = entry_point_group
        # Without them (a registry of its own, as in tests) it makes its own, shared with nothing.
        self.staging = staging if staging is not None else SharedStagingPool(HostMemoryBudget())
        self.handles = handles if handles is not None else AioHandlePool(self.staging)
        self._warned: set[str] = set()  # auto's fallback reasons already said

    def names(self) -> list[str]:
        self._load_entry_points()
        return list(self._stores)

    def store_class(self, name: str) -> type[BlockStore]:
        self.check_name(name)
        return self._stores[name]

    def register(self, cls: type[BlockStore], *, before: str | None = None) -> None:
        """Register ``cls`` under ``cls.capabilities.name``, ahead of the store ``before`` in
        ``auto``'s preference order (None: last). Registering a name again moves it."""
        self._load_entry_points()
        entries = [(name, known) for name, known in self._stores.items() if name != cls.capabilities.name]
        names = [name for name, _ in entries]
        if before is not None and before not in names:
            raise ConfigError(f"register_backend: no backend {before!r} to register {cls.__name__} before")
        entries.insert(
            names.index(before) if before is not None else len(entries), (cls.capabilities.name, cls)
        )
        self._stores = dict(entries)

    def check_name(self, name: str) -> None:
        """ConfigError naming the config key and every known name unless ``name`` is one."""
        known = ["auto", *self.names()]
        if name not in known:
            allowed = ", ".join(repr(n) for n in known[:-1]) + f" or {known[-1]!r}"
            raise ConfigError(
                f"offload_states.backend: unknown backend {name!r} (allowed: {allowed}; a third-party "
                f"store is registered with nvme_tier.register_backend or the entry point "
                f"group '{ENTRY_POINT_GROUP}')"
            )

    def select(self, name: str, path: str, config: OffloadStatesConfig | None = None) -> tuple[str, str]:
        """Resolve ``auto`` or a registered store's name for ``path``; returns (name, reason).

        ``config`` (its staging budget and aio knobs) sizes the staging a store would page-lock.
        """
        self.check_name(name)
        config = config or OffloadStatesConfig()
        if name != "auto":
            unmet = self.first_unmet(self._stores[name], path, config)
            if unmet is not None:
                raise unmet.error
            check_block_alignment(self._stores[name].capabilities, path, config)
            return name, "requested"
        refused: list[tuple[str, Unmet]] = []
        for candidate, cls in self._stores.items():
            unmet = self.first_unmet(cls, path, config)
            if unmet is not None:
                refused.append((candidate, unmet))
                continue
            check_block_alignment(cls.capabilities, path, config)
            if not refused:
                return candidate, met_needs(cls.capabilities)
            preferred, first = refused[0]
            if first.reason not in self._warned:
                self._warned.add(first.reason)
                log.warning(
                    "nvme_tier: backend 'auto' falls back to %s: %s. To use %s: %s",
                    candidate,
                    first.reason,
                    preferred,
                    first.hint,
                )
            return candidate, first.reason
        raise refused[0][1].error  # no registered store can run here: the preferred one's error

    def open(self, config: OffloadStatesConfig, directory: WriterDirectory, name: str) -> StorageBackend:
        """The registered store ``name`` for ``directory``, built (no I/O) from the config's knobs."""
        cls = self.store_class(name)
        knobs = {"settings": getattr(config, cls.settings_key)} if cls.settings_key else {}
        if cls.capabilities.needs_libaio:
            knobs["handles"] = self.handles  # a store on the aio op takes its handles from the pool
        store = cls(
            directory, staging_budget_bytes=config.staging_budget_bytes, staging=self.staging, **knobs
        )
        return StorageBackend(store, checksum=config.checksum)

    def first_unmet(self, cls: type[BlockStore], path: str, config: OffloadStatesConfig) -> Unmet | None:
        """The first of ``cls``'s declared needs that this host or ``path`` does not meet, or None."""
        caps, what = cls.capabilities, f"offload_states.backend {cls.capabilities.name!r}"
        if caps.needs_libaio:
            ok, why = aio_compatible()
            if not ok:
                return Unmet(why, INSTALL_HINT, BackendUnavailableError(f"{what}: {why}; {INSTALL_HINT}"))
        settings = getattr(config, cls.settings_key) if cls.settings_key else None
        slots, slot_bytes = cls.staging_slots(config.staging_budget_bytes, settings)
        shortfall = memlock_shortfall(slots * slot_bytes) if caps.page_locked_staging else None
        if shortfall:
            others = self.without(lambda c: c.page_locked_staging)
            error = BackendUnavailableError(f"{what}: {shortfall}; {MEMLOCK_HINT}, or use backend {others}")
            return Unmet(shortfall, MEMLOCK_HINT, error)
        if caps.needs_libaio:
            # Handles idle in this process are reused (shared by its engines); only new ones need events.
            handles = self.handles
            no_events = aio_budget_shortfall(slots - handles.idle_count(config.aio), config.aio)
            if no_events:
                error = BackendUnavailableError(f"{what}: {no_events}; {AIO_MAX_NR_HINT}")
                return Unmet(no_events, AIO_MAX_NR_HINT, error)
        if caps.o_direct and not supports_o_direct(path):
            error = ConfigError(
                f"{what}: {path!r} does not support O_DIRECT (tmpfs?); put path on a real disk, or use "
                f"backend 'auto'/{self.without(lambda c: c.o_direct)}"
            )
            hint = f"put offload_states.path on a real disk (not tmpfs) for {caps.name}"
            return Unmet(f"{path!r} does not support O_DIRECT", hint, error)
        return None

    def without(self, need: Callable[[Capabilities], bool]) -> str:
        """The registered stores that lack ``need`` (a predicate on capabilities): 'zarr'/..."""
        return "/".join(repr(name) for name, cls in self._stores.items() if not need(cls.capabilities))

    def _load_entry_points(self) -> None:
        """Register, once, the stores the entry point group names (after those known already)."""
        group, self._group = self._group, None
        if group is None:
            return
        for entry in entry_points(group=group):
            try:
                cls = entry.load()
            except Exception as exc:  # a broken plugin must not break nvme_tier: it is just not there
                log.warning(
                    "nvme_tier: cannot load storage backend %r (%s): %s", entry.name, entry.value, exc
                )
                continue
            if (
                isinstance(cls, type)
                and issubclass(cls, BlockStore)
                and cls.capabilities.name not in self._stores
            ):
                self._stores[cls.capabilities.name] = cls


def met_needs(caps: Capabilities) -> str:
    """How ``auto`` says why it took the first store it tried."""
    met = [
        text
        for need, text in ((caps.needs_libaio, "async_io compatible"), (caps.o_direct, "O_DIRECT supported"))
        if need
    ]
    return " and ".join(met) or "it needs nothing of this host"


def check_block_alignment(caps: Capabilities, path: str, config: OffloadStatesConfig) -> None:
    """ConfigError when the device under ``path`` cannot take the store's O_DIRECT requests.

    An O_DIRECT request's length and offset must be multiples of the device's logical block. A
    store's are multiples of its declared alignment; the async_io op's are also ``aio.block_size``
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
