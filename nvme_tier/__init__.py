"""nvme_tier: NVMe and pinned-CPU tiers for DeepSpeed's ``offload_states``/``reload_states``.

engine, *_ = deepspeed.initialize(model=m, config=cfg, model_parameters=m.parameters())
nvme_tier.attach(engine)          # reads cfg["offload_states"]
engine.offload_states()           # optimizer states -> NVMe, master weights -> pinned CPU
engine.reload_states()
nvme_tier.offload_status(engine)  # {"optim_states": entry(tier=..., bytes=...), ...}
"""

from __future__ import annotations

from .api import (
    attach,
    controller_of,
    detach,
    format_status,
    initialize,
    mark_dirty,
    offload_status,
    release,
    wait,
)
from .config import OffloadStatesConfig
from .errors import (
    BackendUnavailableError,
    ConfigError,
    HostBudgetError,
    IntegrityError,
    NvmeTierError,
    StatesOffloadedError,
    TierIOError,
    UnsupportedEngineError,
)
from .runtime import Runtime, default_runtime, isolated_runtime, register_backend
from .types import OffloadPhase, StateKind, StateStatus, Tier

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "HostBudgetError",
    "IntegrityError",
    "NvmeTierError",
    "OffloadPhase",
    "OffloadStatesConfig",
    "Runtime",
    "StateKind",
    "StateStatus",
    "StatesOffloadedError",
    "Tier",
    "TierIOError",
    "UnsupportedEngineError",
    "attach",
    "controller_of",
    "default_runtime",
    "detach",
    "format_status",
    "initialize",
    "isolated_runtime",
    "mark_dirty",
    "offload_status",
    "register_backend",
    "release",
    "wait",
]
