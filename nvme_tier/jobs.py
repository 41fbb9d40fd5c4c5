"""The records of one offload or one reload as the executor (tiers.py) runs it: what was queued,
what is still in flight, what it moved and how fast; the controller keeps the job in flight to
report on it (``offload_status``) and to finish it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .buffers import Placed
from .host_copies import HostCopy
from .types import StateKind


@dataclass
class TransferStats:
    bytes_written: int = 0
    bytes_skipped: int = 0
    bytes_to_host: int = 0
    bytes_read: int = 0
    bytes_from_host: int = 0
    seconds: float = 0.0

    def offload_line(self, moved: int, backend: str | None) -> str:
        return (
            f"offloaded {moved / 1e9:.3f} GB ({self.bytes_written / 1e9:.3f} GB to {backend or '-'}, "
            f"{self.bytes_skipped / 1e9:.3f} GB unchanged on disk, {self.bytes_to_host / 1e9:.3f} GB to host) "
            f"in {self.seconds:.2f} s"
        )

    def reload_line(self) -> str:
        return (
            f"reloaded {self.bytes_read / 1e9:.3f} GB from nvme and {self.bytes_from_host / 1e9:.3f} GB "
            f"from host in {self.seconds:.2f} s"
        )


@dataclass(eq=False)
class OffloadJob:
    """One offload from its start (every move queued) to its end (every byte safe elsewhere)."""

    placed: list[Placed] = field(default_factory=list)
    writes: list[tuple[Placed, Future]] = field(default_factory=list)  # NVMe writes, in order
    copies: torch.cuda.Event | None = None  # after the last host copy; None: copies are done
    stats: TransferStats = field(default_factory=TransferStats)
    started: float = field(default_factory=time.perf_counter)
    stranded: list[Placed] = field(default_factory=list)  # freed, and restoring them failed
    host_copies: list[HostCopy] = field(default_factory=list)  # reserved by HostCopies.claim
    safe: bool = False  # every byte is elsewhere (manifest committed): only the frees are left

    def bytes_in_flight(self) -> dict[StateKind, int]:
        """Bytes per state not yet known safe elsewhere (a copy or a write still running)."""
        copying = self.copies is not None and not self.copies.query()
        out: dict[StateKind, int] = {}
        pending = [p for p, fut in self.writes if not fut.done()]
        pending += [p for p in self.placed if p.host is not None and copying]
        for p in pending:
            out[p.buffer.kind] = out.get(p.buffer.kind, 0) + p.buffer.nbytes
        return out


@dataclass(eq=False)
class ReloadJob:
    """One reload from its start (every buffer restored, every move back queued) to its hand-over."""

    placed: list[Placed]
    reads: list[tuple[Placed, Future]] = field(default_factory=list)  # NVMe reads, in order
    stats: TransferStats = field(default_factory=TransferStats)
    started: float = field(default_factory=time.perf_counter)


__all__ = ["OffloadJob", "ReloadJob", "TransferStats"]
