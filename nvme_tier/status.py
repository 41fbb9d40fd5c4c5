"""``offload_status``: where each state is now, how many bytes, and a printable table."""

from __future__ import annotations

from .buffers import Placed, StateBuffer
from .tables import format_rows
from .types import OffloadPhase, StateKind, StateStatus, Tier
from .units import human_bytes


def build_status(
    buffers: dict[StateKind, list[StateBuffer]],
    placed: dict[StateKind, list[Placed]],
    nvme_dir: str | None,
    device: str,
    phase: OffloadPhase = OffloadPhase.resident,
    in_flight: dict[StateKind, int] | None = None,
) -> dict[str, StateStatus]:
    """``phase`` is the controller's, shown on the states it moves; ``in_flight`` bytes per state."""
    in_flight = in_flight or {}
    out: dict[str, StateStatus] = {}
    for kind in StateKind:
        moved = placed.get(kind, [])
        if moved:
            by_tier: dict[str, int] = {}
            for p in moved:
                by_tier[p.tier.value] = by_tier.get(p.tier.value, 0) + p.buffer.nbytes
            # A state split between host and disk reports nvme: its reload needs the disk.
            tier = Tier.nvme.value if Tier.nvme.value in by_tier else next(iter(by_tier))
            nbytes = sum(by_tier.values())
            where = " + ".join(
                _where(Tier(t), nvme_dir, device) + (f" {human_bytes(n)}" if len(by_tier) > 1 else "")
                for t, n in sorted(by_tier.items(), key=lambda item: list(Tier).index(Tier(item[0])))
            )
            spilled = any(p.spilled for p in moved)
            if spilled:
                where = f"{where} (spilled: host budget full)"
            # Only what is freed now: a non-blocking NVMe offload frees each buffer once written.
            freed = sum(p.buffer.nbytes for p in moved if p.buffer.is_freed)
            out[kind.value] = StateStatus(
                kind.value,
                tier,
                nbytes,
                where,
                len(moved),
                freed,
                phase.value,
                in_flight.get(kind, 0),
                spilled,
                by_tier,
            )
        else:
            bufs = [b for b in buffers.get(kind, []) if not b.is_freed]
            nbytes = sum(b.nbytes for b in bufs)
            where = ", ".join(sorted({str(b.device) for b in bufs})) or device
            out[kind.value] = StateStatus(
                kind.value, Tier.device.value, nbytes, where, len(bufs), 0, bytes_by_tier={"device": nbytes}
            )
    return out


def _where(tier: Tier, nvme_dir: str | None, device: str) -> str:
    return {
        Tier.nvme: nvme_dir or "?",
        Tier.pinned_cpu: "host (page-locked)",
        Tier.cpu: "host",
        Tier.discard: "freed (rebuilt on reload)",
    }.get(tier, device)


# The phase a table's header shows: the most pressing one of any state.
_HEADER_ORDER = [OffloadPhase.failed, OffloadPhase.offloading, OffloadPhase.reloading, OffloadPhase.offloaded]


def format_table(status: dict[str, StateStatus], footer: str = "") -> str:
    """A header line (phase, bytes in flight), then a fixed-width table, one row per state, plus
    totals (a split state's row names its bytes per tier), then ``footer`` (the host budget)."""
    phases = {e.phase for e in status.values()}
    phase = next((p.value for p in _HEADER_ORDER if p.value in phases), OffloadPhase.resident.value)
    header = f"phase: {phase}"
    in_flight = sum(e.bytes_in_flight for e in status.values())
    if in_flight or phase == OffloadPhase.offloading.value:
        header += f", {human_bytes(in_flight)} in flight"
    rows = [(e.state, e.tier, human_bytes(e.bytes), e.location) for e in status.values()]
    freed = sum(e.device_bytes_freed for e in status.values())
    rows.append(
        (
            "total",
            "",
            human_bytes(sum(e.bytes for e in status.values())),
            f"device memory freed: {human_bytes(freed)}",
        )
    )
    table = f"{header}\n{format_rows(('state', 'tier', 'bytes', 'where'), rows)}"
    return f"{table}\n{footer}" if footer else table
