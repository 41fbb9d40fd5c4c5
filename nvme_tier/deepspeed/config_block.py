"""Reading nvme_tier's block out of a live engine's DeepSpeed config."""

from __future__ import annotations

from typing import Any


def engine_config_dict(engine: Any) -> dict:
    """The engine's DeepSpeed config as given (DeepSpeed keeps unknown top-level keys); {} if none."""
    params = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if isinstance(params, dict):
        return params
    cfg = getattr(engine, "config", None)
    return cfg if isinstance(cfg, dict) else {}


def engine_config_block(engine: Any, key: str) -> Any:
    """The raw top-level ``key`` of the engine's DeepSpeed config (None when absent)."""
    return engine_config_dict(engine).get(key)
