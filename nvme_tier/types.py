"""The shared vocabulary: which states exist, which tiers hold them, what a status entry says.

Every other module speaks in these names, so the config, the policy, the engine glue and the CLI
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum


class StateKind(str, Enum):
    """An engine state, named exactly as DeepSpeed's ``OffloadStateTypeEnum`` values."""

    optim_states = "optim_states"
    hp_params = "hp_params"
    lp_params = "lp_params"
    lp_grads = "lp_grads"
    contiguous_grad_buffer = "contiguous_grad_buffer"

    @property
    def holds_data(self) -> bool:
        """False only for scratch buffers whose contents are rebuilt on every step."""
        return self is not StateKind.contiguous_grad_buffer


class Tier(str, Enum):
    """Where a state lives while the engine is offloaded."""

    device = "device"  # not moved
    cpu = "cpu"  # pageable host memory, freed on reload
    pinned_cpu = "pinned_cpu"  # page-locked host memory (fast DMA), kept for reuse
    nvme = "nvme"  # files written through a storage backend
    discard = "discard"  # memory freed, contents not kept (rebuilt on reload)

    @property
    def frees_device(self) -> bool:
        return self is not Tier.device


class OffloadPhase(str, Enum):
    """Lifecycle of one engine's states, as the guards see it."""

    resident = "resident"
    offloading = "offloading"  # a non-blocking offload is still running
    offloaded = "offloaded"
    reloading = "reloading"  # a non-blocking reload (prefetch) is still running
    failed = "failed"  # a reload failed verification; states stay freed and the error says why


@dataclass(frozen=True)
class PlanItem:
    """Bytes ``[start, stop)`` of a state's buffer number ``buffer`` and the tier that holds them.

    A state split between host memory and NVMe is a few of these: whole buffers, and at most one
    buffer cut in two (its prefix in a host copy, its suffix in a file of its own).
    """

    buffer: int
    start: int
    stop: int
    tier: Tier

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StateStatus:
    """One row of ``offload_status``: supports both ``entry.tier`` and ``entry["tier"]``."""

    state: str
    tier: str
    bytes: int
    location: str
    tensors: int
    device_bytes_freed: int
    # resident / offloading / offloaded / reloading / failed: where this state's move stands
    phase: str = OffloadPhase.resident.value
    bytes_in_flight: int = 0  # bytes of a non-blocking offload not yet known safe elsewhere
    spilled: bool = False  # (partly) on nvme because the process's host budget could not hold its host copy
    # bytes per tier ({"pinned_cpu": ..., "nvme": ...} for a state split between them, whose
    # ``tier`` is "nvme": its reload needs the disk)
    bytes_by_tier: Mapping[str, int] = field(default_factory=dict)

    def __getitem__(self, key: str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def keys(self):
        return (
            "state",
            "tier",
            "bytes",
            "location",
            "tensors",
            "device_bytes_freed",
            "phase",
            "bytes_in_flight",
            "spilled",
            "bytes_by_tier",
        )

    def as_dict(self) -> dict:
        return {k: self[k] for k in self.keys()}
