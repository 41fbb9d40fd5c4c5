"""Guards on state reads and writes outside compute: DeepSpeed's ``safe_*`` accessors, ``state_dict()``.

While a state is offloaded its storage is freed. DeepSpeed's accessors read views into it (ZeRO-1/2:
the ``_hp_mapping`` fragments, at an offset into freed memory: a segfault; ZeRO-3: a narrow of the
freed partition), and a ``state_dict()`` taken then holds empty storages (saved, it cannot be
loaded). Each is routed through ``guard_states(what, needs)`` first: it waits for a non-blocking
move of those states, and refuses (``StatesOffloadedError`` naming reload_states) while one is away.

The accessors are wrapped where every binding of ``deepspeed.utils.safe_*`` ends up, whenever the
caller imported it: the per-parameter methods ``link_hp_params`` binds (ZeRO-1/2, BF16_Optimizer)
and the ZeRO-3 optimizer's methods (``param._z3_optimizer``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any

from ..types import StateKind

GuardStates = Callable[[str, frozenset[StateKind]], None]

_LP = frozenset({StateKind.lp_params})
_HP = frozenset({StateKind.hp_params})
_OPTIM = frozenset({StateKind.optim_states})
_GRADS = frozenset({StateKind.lp_grads})
# method -> (states it touches, states it touches when given an ``optim_state_key``)
# ZeRO-1/2, BF16_Optimizer: a parameter's own methods; they also read the parameter (its shape).
PARAM_METHODS: dict[str, tuple[frozenset[StateKind], frozenset[StateKind]]] = {
    "get_full_hp_param": (_HP | _LP, _OPTIM | _LP),
    "set_full_hp_param": (_HP | _LP, _OPTIM | _LP),
    "get_full_hp_grad": (_GRADS | _LP, _GRADS | _LP),
    "set_full_hp_grad": (_GRADS | _LP, _GRADS | _LP),
}
# ZeRO-3: the optimizer's methods behind safe_{get,set}_{full,local}_*.
ZERO3_METHODS: dict[str, tuple[frozenset[StateKind], frozenset[StateKind]]] = {
    "get_full_hp_param": (_HP, _OPTIM),
    "set_full_hp_param": (_HP, _OPTIM),
    "get_local_fp32_param": (_HP, _OPTIM),
    "set_local_hp_param": (_HP, _OPTIM),
    **{
        name: (_GRADS, _GRADS)
        for name in (
            "get_fp32_grad_for_param",
            "set_fp32_grad_for_param",
            "get_local_fp32_grad_for_param",
            "set_local_grad_for_param",
            "update_fp32_grad_for_param_vectorized",
        )
    },
}
MODULE_STATE = frozenset({StateKind.lp_params})
OPTIMIZER_STATE = frozenset({StateKind.optim_states, StateKind.hp_params})


def _guarded(
    method: Callable[..., Any], what: str, needs: tuple[frozenset, frozenset], guard: GuardStates
) -> Callable[..., Any]:
    try:
        signature: inspect.Signature | None = inspect.signature(method)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        key = None
        if signature is not None:
            with contextlib.suppress(TypeError):  # bad arguments: the real call raises
                key = signature.bind_partial(*args, **kwargs).arguments.get("optim_state_key")
        guard(what, needs[1] if key is not None else needs[0])
        return method(*args, **kwargs)

    guarded.__nvme_tier_original__ = method
    return guarded


class StateAccessGuards:
    """Installs (again after DeepSpeed re-links its parameters) and removes the guards of one engine."""

    def __init__(self, engine: Any, guard: GuardStates):
        self._guard = guard
        self._wrapped: list[tuple[Any, str]] = []  # (object, attribute) holding one of our wrappers
        self._handles: list[Any] = []
        opt = getattr(engine, "optimizer", None)
        inner = getattr(opt, "optimizer", None)
        self._params = list(engine.module.parameters())
        self._handles.append(
            engine.module.register_state_dict_pre_hook(
                lambda *_: guard("state_dict() of the module", MODULE_STATE)
            )
        )
        if callable(getattr(inner, "register_state_dict_pre_hook", None)):  # the torch optimizer
            self._handles.append(
                inner.register_state_dict_pre_hook(
                    lambda *_: guard("state_dict() of the optimizer", OPTIMIZER_STATE)
                )
            )
        if opt is not None and callable(getattr(opt, "state_dict", None)):  # the ZeRO wrapper
            self._wrap(opt, "state_dict", "state_dict() of the optimizer", (OPTIMIZER_STATE, OPTIMIZER_STATE))
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for name, needs in ZERO3_METHODS.items():
                if callable(getattr(opt, name, None)):
                    self._wrap(opt, name, f"{name}() (deepspeed.utils.safe_* accessors)", needs)
        self.refresh()

    def refresh(self) -> None:
        """Guard parameter methods bound since (DeepSpeed re-links them on load_state_dict)."""
        for param in self._params:
            for name, needs in PARAM_METHODS.items():
                method = param.__dict__.get(name)
                if callable(method) and not hasattr(method, "__nvme_tier_original__"):
                    self._wrap(param, name, f"{name}() (deepspeed.utils.safe_* accessors)", needs)

    def _wrap(self, obj: Any, name: str, what: str, needs: tuple[frozenset, frozenset]) -> None:
        object.__setattr__(obj, name, _guarded(getattr(obj, name), what, needs, self._guard))
        self._wrapped.append((obj, name))

    def remove(self) -> None:
        """Put back every original; an attribute DeepSpeed has replaced since is left alone."""
        for handle in self._handles:
            handle.remove()
        for obj, name in self._wrapped:
            current = obj.__dict__.get(name)
            original = getattr(current, "__nvme_tier_original__", None)
            if original is None:
                continue
            if getattr(original, "__self__", None) is obj and getattr(type(obj), name, None) is not None:
                obj.__dict__.pop(name)  # a class method: the instance had none of its own
            else:
                object.__setattr__(obj, name, original)
        self._handles, self._wrapped = [], []
