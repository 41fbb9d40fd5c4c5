"""The offload planner: (config, call arguments, the engine's buffers, facts, what is on disk) -> a
frozen plan of where every buffer goes, which host memory it takes, which NVMe bytes it adds.

Pure: no engine, no I/O, no device work. What it needs of the world is gathered before it runs (the
buffers and their facts, the host budget's ``available``, ``StoredFile`` per name on disk) and the
fingerprints of the live bytes are handed to ``OffloadPlan.skipping`` once taken; the executor
(tiers.py) then does exactly what the plan says.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

from .buffers import StateBuffer, cut
from .config import OffloadStatesConfig
from .policy import HOST_TIERS, EngineFacts, Placement, decide
from .types import StateKind, Tier


@dataclass(frozen=True)
class StoredFile:
    """What an earlier offload left on disk under one name, as far as planning needs it."""

    nbytes: int
    fingerprint: str | None  # of the bytes written (None: not taken)
    present: bool  # its data file exists


@dataclass(frozen=True)
class OffloadItem:
    """One buffer (or part of one) that leaves the device, and how."""

    buffer: StateBuffer
    tier: Tier
    fingerprint: str | None = None  # of the live bytes, recorded with the write
    skip: bool = False  # nvme: its file already holds exactly these bytes, nothing is written


@dataclass(frozen=True)
class OffloadPlan:
    """Every buffer's move, decided before anything moves; ``stored`` is what it was decided against."""

    placement: Placement
    items: tuple[OffloadItem, ...] = ()
    stored: Mapping[str, StoredFile] = field(default_factory=dict)

    @property
    def host_items(self) -> list[tuple[StateBuffer, Tier]]:
        return [(i.buffer, i.tier) for i in self.items if i.tier in HOST_TIERS]

    @property
    def nvme_items(self) -> list[OffloadItem]:
        return [i for i in self.items if i.tier is Tier.nvme]

    def _kept(self, item: OffloadItem) -> StoredFile | None:
        """The file of ``item``'s name from an earlier offload, if one of its size is on disk."""
        stored = self.stored.get(item.buffer.name)
        return (
            stored if stored is not None and stored.present and stored.nbytes == item.buffer.nbytes else None
        )

    @property
    def new_files(self) -> list[OffloadItem]:
        """NVMe items without a file of their size on disk: only these need free space (a kept file
        is rewritten in place, or skipped)."""
        return [i for i in self.nvme_items if self._kept(i) is None]

    @property
    def new_file_bytes(self) -> int:
        return sum(i.buffer.nbytes for i in self.new_files)

    @property
    def replaced_bytes(self) -> int:
        """Bytes of this writer's files that the new files replace (rewritten or deleted first)."""
        return sum(self.stored[i.buffer.name].nbytes for i in self.new_files if i.buffer.name in self.stored)

    def skip_candidates(self, fingerprints: Mapping[str, str], rewrite_all: bool) -> list[str]:
        """NVMe items whose kept file was written from bytes of the live fingerprint: skipped if the
        file still holds what was written (the caller asks the disk, ``holds_written_bytes``)."""
        if rewrite_all:
            return []
        out = []
        for item in self.nvme_items:
            kept, live = self._kept(item), fingerprints.get(item.buffer.name)
            if kept is not None and live is not None and kept.fingerprint == live:
                out.append(item.buffer.name)
        return out

    def skipping(self, fingerprints: Mapping[str, str], unchanged: Collection[str]) -> OffloadPlan:
        """This plan with the live ``fingerprints`` recorded and the ``unchanged`` files skipped."""
        items = tuple(
            replace(i, fingerprint=fingerprints.get(i.buffer.name), skip=i.buffer.name in unchanged)
            if i.tier is Tier.nvme
            else i
            for i in self.items
        )
        return replace(self, items=items)


def plan_offload(
    config: OffloadStatesConfig,
    buffers: Mapping[StateKind, list[StateBuffer]],
    facts: EngineFacts | None,
    stored: Mapping[str, StoredFile],
    include: Iterable[object] | str | Enum | None = None,
    device: object | None = None,
    pin_memory: bool | None = None,
) -> OffloadPlan:
    """Place every state of ``buffers`` (``policy.decide``) and cut it into items, one per buffer or
    per byte range of a split buffer; those staying on the device are left out."""
    placement = decide(
        config, list(buffers), include=include, device=device, pin_memory=pin_memory, facts=facts
    )
    items = tuple(
        OffloadItem(buf, tier)
        for kind in placement.tiers
        for buf, tier in cut(buffers[kind], placement.items(kind, [b.nbytes for b in buffers[kind]]))
        if tier is not Tier.device
    )
    return OffloadPlan(placement, items, stored)


__all__ = ["OffloadItem", "OffloadPlan", "StoredFile", "plan_offload"]
