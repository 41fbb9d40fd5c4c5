"""Device calls through DeepSpeed's accelerator (CUDA, ROCm, CPU...), and the engine's rank."""

from __future__ import annotations

from typing import Any

import torch


def synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.is_available():
        acc.synchronize()


def empty_cache() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.is_available():
        acc.empty_cache()


def accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def accelerator_name() -> str:
    """The device kind DeepSpeed picked: ``cuda``, ``cpu``..."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def accelerator_facts() -> tuple[str, str, int]:
    """(device kind, communication backend, device count: 0 on the CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name, comm = acc.device_name(), acc.communication_backend_name()
    return name, comm, acc.device_count() if name != "cpu" else 0


def rank_of(engine: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
