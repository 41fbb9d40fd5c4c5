"""Pure placement policy: (config, call arguments, engine facts) -> {state: tier}, and for a state
split between host memory and NVMe, the byte ranges each tier holds.

No torch, no I/O: the whole decision is unit-testable with plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .config import OffloadStatesConfig
from .errors import ConfigError
from .types import PlanItem, StateKind, Tier

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

# Where a buffer may be cut between its host part and its NVMe part: a multiple of every backend's
# on-disk alignment (4 KiB for O_DIRECT) and of the aio default request (block_size), so both parts
# are whole requests; the host part of a state lands within this of what the budget leaves it.
SPLIT_ALIGN = 1 << 20


@dataclass(frozen=True)
class EngineFacts:
    """What the controller knows about the engine and the process when it decides.

    ``state_bytes``: host bytes each state's host copy would take. ``host_available``: bytes the
    process's host budget can still give (None: unlimited). ``on_host``: states that already live
    in host RAM (ZeRO-Offload) on an engine whose device is not the host: a host tier gains them
    nothing, they stay. ``fixed``: per state, a buffer that cannot be freed in place (page-locked
    host storage), which no tier that frees device memory can take. ``buffer_bytes``: per state,
    the sizes of its buffers in order, where a split may cut (absent: one buffer).
    """

    state_bytes: Mapping[StateKind, int] = field(default_factory=dict)
    host_available: int | None = None
    on_host: frozenset[StateKind] = frozenset()
    fixed: Mapping[StateKind, str] = field(default_factory=dict)
    buffer_bytes: Mapping[StateKind, tuple[int, ...]] = field(default_factory=dict)

    def buffers_of(self, state: StateKind) -> tuple[int, ...]:
        return tuple(self.buffer_bytes.get(state, (self.state_bytes.get(state, 0),)))


@dataclass(frozen=True)
class Placement:
    """The decided tier of every state (states not moved map to ``Tier.device``).

    ``split``: states whose bytes are partly in host memory and partly on nvme, as byte ranges of
    their buffers (their ``tiers`` entry is nvme: some of their bytes go to disk). ``spilled``:
    states placed (partly) on nvme only because their host copies did not fit the host budget.
    ``overflow``: device 'auto', whose host budget sends what it cannot hold to nvme.
    """

    tiers: Mapping[StateKind, Tier]
    spilled: frozenset[StateKind] = frozenset()
    split: Mapping[StateKind, tuple[PlanItem, ...]] = field(default_factory=dict)
    overflow: bool = False

    def states_on(self, tier: Tier) -> list[StateKind]:
        return [s for s, t in self.tiers.items() if t is tier]

    @property
    def uses_nvme(self) -> bool:
        return self.overflow or Tier.nvme in self.tiers.values()

    def items(self, state: StateKind, buffer_bytes: Sequence[int]) -> tuple[PlanItem, ...]:
        """Where each byte of ``state`` goes: its split ranges, else each buffer whole on its tier."""
        if state in self.split:
            return self.split[state]
        return tuple(PlanItem(i, 0, n, self.tiers[state]) for i, n in enumerate(buffer_bytes))


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
    if raw in ("nvme", "cpu", "none"):  # upstream's OffloadDeviceEnum: a call cannot ask for 'auto'
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
    ``nvme_ratio`` states keep the rest of their bytes on their host tier. With ``facts``, states
    already in host RAM stay where they are instead of taking a host tier, host-tier states fill
    ``facts.host_available`` in ``HOST_PRIORITY`` order and what does not fit goes to nvme (the
    state crossing the budget split between them), and a state with a buffer that cannot be freed
    is refused any tier that frees device memory.
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
    if dev == "auto":
        config.required_path("device 'auto' writes what does not fit the host budget to nvme")

    base = NVME_DEFAULT if dev == "nvme" else CPU_DEFAULT
    ratios = {} if device is not None and dev == "cpu" else dict(config.nvme_ratio)
    tiers: dict[StateKind, Tier] = {}
    for state in present:
        tier = config.policy.get(state, base[state])
        if device is not None and dev == "cpu" and tier is Tier.nvme:
            tier = base[state]
        if state in ratios and tier not in HOST_TIERS:
            tier = Tier.pinned_cpu  # the host part's tier (a policy may make it cpu)
        if wanted is not None and state not in wanted:
            tier = Tier.device
        if tier is Tier.pinned_cpu and not pin:
            tier = Tier.cpu
        if tier is Tier.discard and state.holds_data:
            raise ConfigError(f"policy.{state.value}: 'discard' would lose data")
        if facts is not None and state in facts.on_host and tier in HOST_TIERS:
            tier = Tier.device  # already in host RAM (ZeRO-Offload): nvme_ratio does not apply either
        if facts is not None and state in facts.fixed and tier.frees_device:
            raise ConfigError(
                f"policy.{state.value}: {facts.fixed[state]} lives in page-locked host memory, which cannot "
                f'be freed in place; keep it where it is with policy {{"{state.value}": "device"}}'
            )
        tiers[state] = tier
    host_wanted = {s: 1.0 - ratios.get(s, 0.0) for s, t in tiers.items() if t in HOST_TIERS}
    if facts is not None:
        spilled, split = _fill_host(tiers, host_wanted, facts)
    else:  # no sizes: only whether a ratio puts anything on disk
        spilled, split = frozenset(), {}
        tiers.update((s, Tier.nvme) for s, share in host_wanted.items() if share < 1.0)
    if spilled and not config.path:
        names = ", ".join(s.value for s in sorted(spilled, key=HOST_PRIORITY.index))
        need = sum(facts.state_bytes.get(s, 0) for s in spilled) if facts else 0
        raise ConfigError(
            f"offload_states.host_budget_mb: {names} ({need} B) do not fit the host budget "
            f"({facts.host_available if facts else 0} B left) and would spill to nvme, but "
            "offload_states.path is not set; set path or raise host_budget_mb"
        )
    placement = Placement(tiers, spilled, split, overflow=dev == "auto")
    if placement.uses_nvme:
        config.required_path(
            ", ".join(s.value for s in placement.states_on(Tier.nvme)) + " placed on the 'nvme' tier"
        )
    return placement


def _fill_host(
    tiers: dict[StateKind, Tier], host_wanted: Mapping[StateKind, float], facts: EngineFacts
) -> tuple[frozenset[StateKind], dict[StateKind, tuple[PlanItem, ...]]]:
    """Fill ``facts.host_available`` with the host-tier states, in ``HOST_PRIORITY`` order.

    ``host_wanted``: per state, the share of its bytes it asks to keep on its host tier (1 unless
    an nvme_ratio says less). What the budget cannot hold goes to nvme, the state crossing the
    budget split between them (in place in ``tiers``). Returns the states the budget moved
    (partly) to nvme and every split state's byte ranges.
    """
    left = facts.host_available
    spilled, split = set(), {}
    for state in sorted(host_wanted, key=HOST_PRIORITY.index):
        sizes = facts.buffers_of(state)
        want = int(sum(sizes) * host_wanted[state])
        if left is not None and want > left:
            want = left
            spilled.add(state)
        items = _host_prefix(sizes, want, tiers[state])
        host = sum(i.nbytes for i in items if i.tier is tiers[state])
        if left is not None:
            left -= host
        if host < sum(sizes):
            if host:
                split[state] = items
            tiers[state] = Tier.nvme
    return frozenset(spilled), split


def _host_prefix(sizes: Sequence[int], host_bytes: int, host_tier: Tier) -> tuple[PlanItem, ...]:
    """The first ``host_bytes`` of the buffers on ``host_tier`` (whole buffers, then one cut at a
    ``SPLIT_ALIGN`` boundary), the rest on nvme."""
    items, left = [], host_bytes
    for index, size in enumerate(sizes):
        at = size if size <= left else left - left % SPLIT_ALIGN
        left = left - at if at == size else 0
        if at:
            items.append(PlanItem(index, 0, at, host_tier))
        if at < size:
            items.append(PlanItem(index, at, size, Tier.nvme))
    return tuple(items)
