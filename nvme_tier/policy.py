"""Pure placement policy: (config, call arguments, engine facts) -> {state: tier}.

No torch, no I/O: the whole decision is unit-testable with plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from .config import OffloadStatesConfig
from .errors import ConfigError
from .types import StateKind, Tier

# The default for device="nvme": the big optimizer state goes to disk, master weights stay one
# fast PCIe hop away, scratch reduce buffers are dropped and rebuilt.
NVME_DEFAULT: Mapping[StateKind, Tier] = {
    StateKind.optim_states: Tier.nvme,
    StateKind.hp_params: Tier.pinned_cpu,
    StateKind.lp_params: Tier.pinned_cpu,
    StateKind.lp_grads: Tier.pinned_cpu,
    StateKind.contiguous_grad_buffer: Tier.discard,
}

# device="cpu": the full CPU path, nothing on disk.
CPU_DEFAULT: Mapping[StateKind, Tier] = {
    StateKind.optim_states: Tier.pinned_cpu,
    StateKind.hp_params: Tier.pinned_cpu,
    StateKind.lp_params: Tier.pinned_cpu,
    StateKind.lp_grads: Tier.pinned_cpu,
    StateKind.contiguous_grad_buffer: Tier.discard,
}


# Which host-tier states keep their host copy first when the host budget cannot hold them all:
# the weights the next forward needs, then what the next step needs; the big optimizer state spills first.
HOST_PRIORITY: tuple[StateKind, ...] = (
    StateKind.lp_params,
    StateKind.hp_params,
    StateKind.lp_grads,
    StateKind.optim_states,
    StateKind.contiguous_grad_buffer,
)
HOST_TIERS = (Tier.cpu, Tier.pinned_cpu)


@dataclass(frozen=True)
class EngineFacts:
    """What the controller knows about the engine and the process when it decides.

    ``state_bytes``: host bytes each state's host copy would take. ``host_available``: bytes the
    process's host budget can still give (None: unlimited). ``on_host``: states that already live
    in host RAM (ZeRO-Offload) on an engine whose device is not the host: a host tier gains them
    nothing, they stay. ``fixed``: per state, a buffer that cannot be freed in place (page-locked
    host storage), which no tier that frees device memory can take.
    """

    state_bytes: Mapping[StateKind, int] = field(default_factory=dict)
    host_available: int | None = None
    on_host: frozenset[StateKind] = frozenset()
    fixed: Mapping[StateKind, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """The decided tier of every state (states not moved map to ``Tier.device``).

    ``spilled``: states placed on nvme only because their host copies did not fit the host budget.
    """

    tiers: Mapping[StateKind, Tier]
    spilled: frozenset[StateKind] = frozenset()

    def states_on(self, tier: Tier) -> list[StateKind]:
        return [s for s, t in self.tiers.items() if t is tier]

    @property
    def uses_nvme(self) -> bool:
        return Tier.nvme in self.tiers.values()


def _as_state(value: object) -> StateKind:
    raw = getattr(value, "value", value)
    try:
        return StateKind(raw)
    except ValueError:
        allowed = ", ".join(s.value for s in StateKind)
        raise ConfigError(f"include: unknown state {raw!r} (allowed: {allowed})") from None


def _as_states(include: object) -> set[StateKind]:
    """``include`` as a set of states; one state (a string or an enum) counts as a list of one.

    Upstream types it as a list, but a bare "optim_states" is an obvious request: iterating the
    string would fail on its first character ("unknown state 'o'").
    """
    if isinstance(include, (str, Enum)):
        return {_as_state(include)}
    try:
        values = iter(include)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(
            f"include: expected a state or a list of states, got {type(include).__name__} {include!r}"
        ) from None
    return {_as_state(s) for s in values}


def require_bool(argument: str, value: object) -> bool:
    """A flag argument must be a real bool: ``non_blocking="no"`` is truthy, so it would mean True."""
    if not isinstance(value, bool):
        raise ConfigError(f"{argument} must be True or False, got {value!r}")
    return value


def _as_device(value: object) -> str:
    raw = getattr(value, "value", value)
    if raw in ("nvme", "cpu", "none"):
        return str(raw)
    raise ConfigError(f"device: unknown offload device {raw!r} (allowed: nvme, cpu, none)")


def decide(
    config: OffloadStatesConfig,
    present: Iterable[StateKind],
    include: Iterable[object] | str | Enum | None = None,
    device: object | None = None,
    pin_memory: bool | None = None,
    facts: EngineFacts | None = None,
) -> Placement:
    """Choose a tier per present state.

    ``include``/``device``/``pin_memory`` are the upstream ``offload_states`` arguments; ``None``
    means "from the config". With ``honor_call_device`` (the default, upstream semantics) an
    explicit ``device=cpu`` wins over NVMe overrides in the config, so asking for the CPU path
    never touches the disk, and an explicit ``pin_memory`` wins over the config's. Without it the
    config's placement decides whatever device the call names, because every existing caller
    passes upstream's default ``device=cpu``; only ``device=none`` (move nothing) still counts,
    and pinning needs both sides to allow it (``pin_memory=True`` is upstream's default too).
    With ``facts``, states already in host RAM stay where they are instead of taking a host tier,
    host-tier states whose copies do not fit ``facts.host_available`` (kept in ``HOST_PRIORITY``
    order) spill to nvme, and a state with a buffer that cannot be freed is refused any tier that
    frees device memory.
    """
    if pin_memory is not None:
        require_bool("pin_memory", pin_memory)
    if config.honor_call_device:
        pin = config.pin_memory if pin_memory is None else pin_memory
    else:
        pin = config.pin_memory and (pin_memory is None or pin_memory)
        if device is not None and _as_device(device) != "none":
            device = None
    dev = _as_device(device) if device is not None else config.device
    wanted = _as_states(include) if include is not None else None
    if wanted is None and config.include is not None:
        wanted = set(config.include)
    present = list(present)
    if dev == "none":
        return Placement({s: Tier.device for s in present})

    base = NVME_DEFAULT if dev == "nvme" else CPU_DEFAULT
    tiers: dict[StateKind, Tier] = {}
    for state in present:
        tier = config.policy.get(state, base[state])
        if device is not None and dev == "cpu" and tier is Tier.nvme:
            tier = base[state]
        if wanted is not None and state not in wanted:
            tier = Tier.device
        if tier is Tier.pinned_cpu and not pin:
            tier = Tier.cpu
        if tier is Tier.discard and state.holds_data:
            raise ConfigError(f"policy.{state.value}: 'discard' would lose data")
        if facts is not None and state in facts.on_host and tier in HOST_TIERS:
            tier = Tier.device
        if facts is not None and state in facts.fixed and tier.frees_device:
            raise ConfigError(
                f"policy.{state.value}: {facts.fixed[state]} lives in page-locked host memory, which cannot "
                f'be freed in place; keep it where it is with policy {{"{state.value}": "device"}}'
            )
        tiers[state] = tier
    spilled = _spill(tiers, facts) if facts is not None else frozenset()
    if spilled and not config.path:
        names = ", ".join(s.value for s in sorted(spilled, key=HOST_PRIORITY.index))
        need = sum(facts.state_bytes.get(s, 0) for s in spilled) if facts else 0
        raise ConfigError(
            f"offload_states.host_budget_mb: {names} ({need} B) do not fit the host budget "
            f"({facts.host_available if facts else 0} B left) and would spill to nvme, but "
            "offload_states.path is not set; set path or raise host_budget_mb"
        )
    placement = Placement(tiers, spilled)
    if placement.uses_nvme:
        config.required_path(
            ", ".join(s.value for s in placement.states_on(Tier.nvme)) + " placed on the 'nvme' tier"
        )
    return placement


def _spill(tiers: dict[StateKind, Tier], facts: EngineFacts) -> frozenset[StateKind]:
    """Move host-tier states that do not fit ``facts.host_available`` to nvme (in place); return them."""
    if facts.host_available is None:
        return frozenset()
    left = facts.host_available
    spilled = set()
    for state in sorted((s for s, t in tiers.items() if t in HOST_TIERS), key=HOST_PRIORITY.index):
        need = facts.state_bytes.get(state, 0)
        if need <= left:
            left -= need
        else:
            tiers[state] = Tier.nvme
            spilled.add(state)
    return frozenset(spilled)
