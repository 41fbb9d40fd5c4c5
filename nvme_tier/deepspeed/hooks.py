"""Hooking an engine: route offload_states/reload_states to nvme_tier, guard compute and weight reads."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .accessors import GuardStates, StateAccessGuards

# -- hooking the engine -----------------------------------------------------------------------------
GUARDED_METHODS = ("backward", "step", "save_checkpoint", "load_checkpoint", "eval_batch", "train_batch")
MUTATING_METHODS = frozenset({"backward", "step", "load_checkpoint", "train_batch"})
# Read the weights only: allowed while just the optimizer states are away (guard_weights).
WEIGHT_READING_METHODS = ("save_16bit_model",)


def install_hooks(
    engine: Any,
    guard: Callable[[str], None],
    mutated: Callable[[], None],
    offload: Callable[..., None],
    reload: Callable[..., None],
    guard_weights: Callable[[str], None],
    guard_states: GuardStates,
) -> Callable[[], None]:
    """Route offload_states/reload_states to nvme_tier and guard compute; returns the undo.

    DeepSpeed's ``safe_*`` accessors and ``state_dict()`` of the module and the optimizer go
    through ``guard_states`` (accessors.py), re-installed at each offload.

    ZeRO-3 parameters' own ``all_gather`` (what ``GatheredParameters`` and user code call, outside
    forward) and ``save_16bit_model`` go through ``guard_weights`` first: right after a non-blocking reload the partitions
    are still being filled on nvme_tier's thread, and gathering them then read freed memory
    (a segfault on the CPU accelerator) and lost any edit made under ``modifier_rank``.

    The ZeRO optimizer's own ``offload_states``/``reload_states`` are routed too: RLHF trainers
    (OpenRLHF's ``offload_deepspeed_states`` and the projects vendoring it) call
    ``engine.optimizer.offload_states(...)`` and reload through the engine, and an upstream
    method running unseen would leave the controller believing every state is on the device.
    The optimizer has them on ZeRO-3 (0.16.9+) and ZeRO-1/2 (0.17.6+); BF16_Optimizer has none.
    """
    originals: dict[str, Any] = {}
    opt = getattr(engine, "optimizer", None)
    opt_routed = [n for n in ("offload_states", "reload_states") if callable(getattr(opt, n, None))]
    opt_originals = {name: opt.__dict__.get(name) for name in opt_routed}

    def wrap(name: str, check: Callable[[str], None] = guard):
        method = getattr(engine, name)

        @functools.wraps(method)
        def guarded(*args, **kwargs):
            check(name)
            try:
                return method(*args, **kwargs)
            finally:
                if name in MUTATING_METHODS:
                    mutated()

        return guarded

    for name in GUARDED_METHODS:
        if hasattr(engine, name):
            originals[name] = engine.__dict__.get(name)
            object.__setattr__(engine, name, wrap(name))
    for name in WEIGHT_READING_METHODS:
        if hasattr(engine, name):
            originals[name] = engine.__dict__.get(name)
            object.__setattr__(engine, name, wrap(name, guard_weights))
    access_guards = StateAccessGuards(engine, guard_states)

    @functools.wraps(offload)
    def guarded_offload(*args, **kwargs):
        access_guards.refresh()  # DeepSpeed re-links its parameters' accessors on load_state_dict
        return offload(*args, **kwargs)

    for name, fn in (("offload_states", guarded_offload), ("reload_states", reload)):
        originals[name] = engine.__dict__.get(name)
        object.__setattr__(engine, name, fn)
        if name in opt_routed:
            object.__setattr__(opt, name, fn)

    gathers: list[tuple[torch.Tensor, Any]] = []
    for param in engine.module.parameters():
        gather = param.__dict__.get("all_gather")  # ZeRO-3 partitioned parameters only
        if callable(gather):
            gathers.append((param, gather))
            param.all_gather = _guarded_gather(gather, guard_weights)

    # A forward pre-hook on the module covers engine(x) and engine.module(x) alike.
    handle = engine.module.register_forward_pre_hook(lambda _m, _a: guard("forward"))
    handle_engine = engine.register_forward_pre_hook(lambda _m, _a: guard("forward"))

    # The undo closure is held by the controller: it must not keep the engine alive.
    engine_ref = weakref.ref(engine)
    opt_ref = weakref.ref(opt) if opt_routed else None

    def undo() -> None:
        handle.remove()
        handle_engine.remove()
        eng = engine_ref()
        if eng is not None:
            _restore(eng, originals)
        optimizer = opt_ref() if opt_ref is not None else None
        if optimizer is not None:
            _restore(optimizer, opt_originals)
        for param, gather in gathers:
            param.all_gather = gather
        access_guards.remove()

    return undo


def _guarded_gather(gather: Callable[..., Any], guard_weights: Callable[[str], None]) -> Callable[..., Any]:
    @functools.wraps(gather)
    def guarded(*args, **kwargs):
        guard_weights("all_gather() of ZeRO-3 parameters (GatheredParameters)")
        return gather(*args, **kwargs)

    return guarded


def _restore(obj: Any, originals: dict[str, Any]) -> None:
    """Put back what ``install_hooks`` replaced: the instance attribute, or none (the class's)."""
    for name, orig in originals.items():
        if orig is None:
            obj.__dict__.pop(name, None)
        else:
            object.__setattr__(obj, name, orig)
