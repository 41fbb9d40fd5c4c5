"""The chunk pipeline: one object's bytes between a tensor (any device) and a store's staging slots.

Written once for every store: while the engine works on the requests of one or more slots, the
CPU/DMA fills (write) or drains (read) the next slot and checksums it, so the disk never idles
between requests and only one chunk of copy + crc32c work is left un-overlapped at the start of
a write or the end of a read. What differs between stores is the ``BlockFile`` (how a request is
submitted: DeepSpeed's aio handle, a thread pool of pread/pwrite, zarr's codec) and its slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..device_copies import DeviceCopier
from ..errors import IntegrityError
from ..units import PAGE
from .blocks import BlockFile, Slot
from .checksums import chunk_ranges, crc32c

Samples = list[tuple[int, int]]  # (offset in the object, crc32c of the page there)


class ChunkPipeline:
    """Moves chunks through staging slots, checksumming each (crc32c, GIL released)."""

    def __init__(self, checksum: bool = True):
        self.checksum = checksum
        self.copier = DeviceCopier()

    def write(
        self, slots: Sequence[Slot], file: BlockFile, src: torch.Tensor, chunk: int
    ) -> tuple[list[int] | None, Samples]:
        """Write ``src`` (flat uint8) in ``chunk``-byte requests; returns (crcs, sampled pages)."""
        crcs: list[int] | None = [] if self.checksum else None
        samples: Samples = []
        try:
            for i, (a, b) in enumerate(chunk_ranges(src.numel(), chunk)):
                slot = slots[i % len(slots)]
                slot.wait()
                buf, length = slot.buffer, b - a
                padded = file.padded(length)
                self.copier.copy(buf[:length], src[a:b])
                if padded > length:
                    buf[length:padded].zero_()
                if crcs is not None:
                    crcs.append(crc32c(buf[:length]))
                samples += [
                    (a + off, crc32c(buf[off : off + min(PAGE, padded)]))
                    for off in file.sample_offsets(padded)
                ]
                file.pwrite(slot, buf[:padded], i, a)
            for slot in slots:
                slot.wait()
        finally:
            for slot in slots:
                slot.drain()
        return crcs, samples

    def read(
        self,
        slots: Sequence[Slot],
        file: BlockFile,
        dst: torch.Tensor,
        chunk: int,
        crcs: tuple[int, ...] | None,
    ) -> None:
        """Fill ``dst`` (flat uint8) from ``chunk``-byte requests read ahead into every slot, each
        verified against ``crcs`` (when checksumming) before it is copied out."""
        ranges = chunk_ranges(dst.numel(), chunk)
        check = crcs is not None and self.checksum

        def submit(i: int) -> None:
            a, b = ranges[i]
            slot = slots[i % len(slots)]
            file.pread(slot, slot.buffer[: file.padded(b - a)], i, a)

        try:
            for i in range(min(len(slots), len(ranges))):
                submit(i)
            for i, (a, b) in enumerate(ranges):
                slot = slots[i % len(slots)]
                slot.wait()
                host = slot.buffer[: b - a]
                if check and crc32c(host) != crcs[i]:
                    path = file.chunk_path(i)
                    raise IntegrityError(f"checksum mismatch in {path} (chunk {i})", path)
                self.copier.copy(dst[a:b], host)
                if i + len(slots) < len(ranges):
                    submit(i + len(slots))
        finally:
            for slot in slots:
                slot.drain()
