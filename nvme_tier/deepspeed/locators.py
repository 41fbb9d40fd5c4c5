"""Which tensors hold each state of a live engine: one locator per optimizer wrapper, in a table.

A locator ``matches`` the engine's ZeRO optimizer wrapper (None: the engine has no real
optimizer) and ``locate``s its tensors per ``StateKind``; the first match answers. Each carries
the version shims its wrapper needs. ``discover_buffers`` groups what was located by storage, and
``quiesce`` finishes in-flight work before that memory is freed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..buffers import StateBuffer, resident_tensor
from ..errors import UnsupportedEngineError
from ..policy import EngineFacts
from ..types import StateKind
from .accelerator import accelerator_device, synchronize

Located = dict[StateKind, list[torch.Tensor]]


# -- which optimizer wrapper is this? ---------------------------------------------------------------
def zero_stage(engine: Any) -> int:
    fn = getattr(engine, "zero_optimization_stage", None)
    return int(fn()) if callable(fn) else 0


def _zero_optimizer(engine: Any) -> Any | None:
    """The ZeRO optimizer wrapper, or None for engines without a (real) optimizer."""
    opt = getattr(engine, "optimizer", None)
    if opt is None or type(opt).__name__ == "DeepSpeedZeRoOffload":  # ZeRO-3 inference engine
        return None
    inner = getattr(opt, "optimizer", opt)
    # ZeRO-0 bf16 without a client optimizer: DeepSpeed wraps a DummyOptim in BF16_Optimizer.
    if inner is None or type(inner).__name__ == "DummyOptim":
        return None
    return opt


def _inner_optimizer(opt: Any) -> Any:
    """The torch optimizer that owns ``.state`` (FusedAdam, DeepSpeedCPUAdam, torch Adam...)."""
    inner = getattr(opt, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "state") else opt


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for v in values:
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _optimizer_states(opt: Any) -> list[torch.Tensor]:
    """Adam moments etc. Reached through .state, never through param_groups, because ZeRO-3
    empties the inner optimizer's param_groups between steps."""
    inner = _inner_optimizer(opt)
    found: list[torch.Tensor] = []
    for state in list(getattr(inner, "state", {}).values()):
        found.extend(_tensors(state.values()))
    return found


# -- the locators -----------------------------------------------------------------------------------
def _locate_without_optimizer(engine: Any, _opt: None) -> Located:
    """Reference/reward models: only the parameters exist (ZeRO-3: the partitions)."""
    params = [resident_tensor(p) for p in engine.module.parameters()]
    lp = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p for p in params]
    if zero_stage(engine) == 3:
        lp += params
    return {StateKind.lp_params: lp}


def _locate_zero3(engine: Any, opt: Any) -> Located:
    params = [resident_tensor(p) for p in engine.module.parameters()]
    lp = getattr(opt, "lp_param_buffer", None)  # 0.16.9 and 0.19.x
    # Persistent (small) params stay gathered on the device between steps; the others hold
    # an empty placeholder then, which discovery skips.
    lp_params = ([lp] if torch.is_tensor(lp) else [p.ds_tensor for p in params]) + params
    grads = getattr(opt, "grad_partitions_flat_buffer", None)
    buckets = getattr(opt, "ipg_buckets", None)  # 0.17+: one bucket per comm dtype
    if isinstance(buckets, dict):
        grad_buffer = [b.buffer for b in buckets.values() if torch.is_tensor(b.buffer)]
    else:  # 0.16.x: a single name-mangled flat bucket
        flat = getattr(opt, "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer", None)
        grad_buffer = [flat] if torch.is_tensor(flat) else []
    return {
        StateKind.optim_states: _optimizer_states(opt),
        StateKind.hp_params: list(_tensors(opt.fp32_partitioned_groups_flat)),
        StateKind.lp_params: lp_params,
        StateKind.lp_grads: [grads] if torch.is_tensor(grads) else [],
        StateKind.contiguous_grad_buffer: grad_buffer,
    }


def _locate_zero12(engine: Any, opt: Any) -> Located:
    avg = getattr(opt, "averaged_gradients", {})
    buckets = getattr(opt, "ipg_buckets", None)  # 0.17+
    if isinstance(buckets, dict):
        grad_buffer = list(_tensors(b.buffer for b in buckets.values()))
    else:  # 0.16.x
        grad_buffer = list(_tensors(getattr(opt, "ipg_buffer", None) or []))
    return {
        StateKind.optim_states: _optimizer_states(opt),
        StateKind.hp_params: list(_tensors(opt.single_partition_of_fp32_groups)),
        StateKind.lp_params: list(_tensors(opt.bit16_groups_flat)),
        StateKind.lp_grads: list(_tensors(avg.values() if isinstance(avg, dict) else avg)),
        StateKind.contiguous_grad_buffer: grad_buffer,
    }


def _locate_bf16(engine: Any, opt: Any) -> Located:
    return {
        StateKind.optim_states: _optimizer_states(opt),
        StateKind.hp_params: list(_tensors(opt.fp32_groups_flat_partition)),
        StateKind.lp_params: list(_tensors(opt.bf16_groups_flat)),
        StateKind.lp_grads: list(_tensors(getattr(opt, "fp32_groups_gradients_flat", []))),
    }


@dataclass(frozen=True)
class StateLocator:
    """Finds the state tensors of engines whose optimizer wrapper it ``matches``."""

    name: str
    matches: Callable[[Any | None], bool]
    locate: Callable[[Any, Any | None], Located]


LOCATORS: tuple[StateLocator, ...] = (
    StateLocator("no optimizer", lambda opt: opt is None, _locate_without_optimizer),
    StateLocator("ZeRO-3", lambda opt: hasattr(opt, "fp32_partitioned_groups_flat"), _locate_zero3),
    StateLocator("ZeRO-1/2", lambda opt: hasattr(opt, "single_partition_of_fp32_groups"), _locate_zero12),
    # ZeRO-0 with bf16
    StateLocator("BF16_Optimizer", lambda opt: hasattr(opt, "fp32_groups_flat_partition"), _locate_bf16),
)


def _state_tensors(engine: Any) -> Located:
    """Every ``StateKind`` (empty where the engine has none) -> its tensors, by the first locator that matches."""
    opt = _zero_optimizer(engine)
    for locator in LOCATORS:
        if locator.matches(opt):
            found: Located = {k: [] for k in StateKind}
            found.update(locator.locate(engine, opt))
            return found
    raise UnsupportedEngineError(
        f"nvme_tier supports ZeRO stages 1-3 and engines without an optimizer; got {type(opt).__name__}"
    )


def _parameters_by_storage(engine: Any) -> dict[tuple[str, int], tuple[torch.Tensor, ...]]:
    """The module's parameters per resident storage they view (their stand-ins looked through)."""
    found: dict[tuple[str, int], list[torch.Tensor]] = {}
    for param in engine.module.parameters():
        resident = resident_tensor(param)
        storage = resident.untyped_storage()
        if storage.nbytes():
            found.setdefault((str(resident.device), storage.data_ptr()), []).append(param)
    return {key: tuple(params) for key, params in found.items()}


def discover_buffers(engine: Any) -> dict[StateKind, list[StateBuffer]]:
    """Group each state's tensors by storage; a storage claimed by two states goes to the first.

    Each buffer carries the module parameters viewing its storage (``StateBuffer.aliases``)."""
    seen: set[tuple[str, int]] = set()
    aliases = _parameters_by_storage(engine)
    out: dict[StateKind, list[StateBuffer]] = {}
    for kind, tensors in _state_tensors(engine).items():
        groups: dict[tuple[str, int], list[torch.Tensor]] = {}
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue
            key = (str(t.device), storage.data_ptr())
            if key in seen and key not in groups:
                continue
            seen.add(key)
            groups.setdefault(key, []).append(t)
        out[kind] = [
            StateBuffer.of(kind, f"{kind.value}.{i}", ts[0], aliases.get(key, ()))
            for i, (key, ts) in enumerate(groups.items())
        ]
    return out


def buffers_present(engine: Any) -> dict[StateKind, int]:
    """Bytes per state the engine currently holds (cheap: no copies)."""
    return {k: sum(b.nbytes for b in bufs) for k, bufs in discover_buffers(engine).items()}


def quiesce(engine: Any) -> None:
    """Finish in-flight work so no kernel touches memory we are about to free.

    ZeRO-3: release gathered/prefetched params first (DeepSpeed's own fix for "param still in
    flight", #6557), exactly as upstream offload_states does.
    """
    opt = getattr(engine, "optimizer", None)
    empty = getattr(opt, "empty_partition_cache", None)
    if callable(empty):
        empty()
    synchronize()


def engine_facts(
    buffers: dict[StateKind, list[StateBuffer]], present: Iterable[StateKind], host_available: int | None
) -> EngineFacts:
    """What ``policy.decide`` needs to know of these states: their sizes, which already live in host
    RAM (ZeRO-Offload) on an accelerator engine, which hold a storage that cannot be freed in place."""
    host_is_device = accelerator_device().type == "cpu"
    present = list(present)
    on_host = frozenset(
        k for k in present if not host_is_device and all(b.device.type == "cpu" for b in buffers[k])
    )
    fixed = {}
    for kind in present:
        stuck = next((b for b in buffers[kind] if not b.resizable), None)
        if stuck is not None:
            fixed[kind] = stuck.name
    sizes = {k: sum(b.nbytes for b in buffers[k]) for k in present}
    buffer_bytes = {k: tuple(b.nbytes for b in buffers[k]) for k in present}
    return EngineFacts(sizes, host_available, on_host, fixed, buffer_bytes)
