"""Reading nvme_tier's block out of a live engine's DeepSpeed config."""

from __future__ import annotations

from typing import Any


def engine_config_block(engine: Any, key: str) -> Any:
    """The raw top-level ``key`` of the engine's DeepSpeed config (DeepSpeed keeps unknown keys)."""
    params = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if isinstance(params, dict) and key in params:
        return params[key]
    cfg = getattr(engine, "config", None)
    return cfg.get(key) if isinstance(cfg, dict) else None
