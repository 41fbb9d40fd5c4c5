"""What this engine's writer holds on disk, as the offload needs to know it: which files still hold
exactly the live bytes (``skip_unchanged``), and how many bytes a rewrite replaces."""

from __future__ import annotations

import logging
import os

import torch

from .buffers import StateBuffer
from .fingerprint import fingerprints
from .storage.manifest import TensorRecord
from .tiers import TierMover

log = logging.getLogger("nvme_tier")


class StoredFiles:
    """The files of one engine's writer directory, seen through its mover's backend."""

    def __init__(self, mover: TierMover):
        self._mover = mover
        self.rewrite_all = False  # set by mark_dirty: the next offload skips nothing

    def take_fingerprints(self, buffers: list[StateBuffer]) -> None:
        """Fingerprint the bytes about to be written, on their device, before any write is queued.

        The engine is quiesced and its compute refused until the offload ends, so each record gets
        the fingerprint of exactly the bytes its file holds. Without one (no device memory for
        the fingerprint's temporaries) a state is written, never skipped.
        """
        try:
            prints = fingerprints([b.view for b in buffers])
        except torch.cuda.OutOfMemoryError as exc:
            log.warning("nvme_tier: no memory to fingerprint the states, rewriting them all: %s", exc)
            return
        for buf, print_ in zip(buffers, prints, strict=True):
            buf.fingerprint = print_

    def record_of(self, buf: StateBuffer) -> TensorRecord | None:
        """The record of ``buf``'s file from an earlier offload, if a file of its size is on disk."""
        if not self._mover.has_backend:
            return None
        backend = self._mover.backend
        try:
            record = backend.record(buf.name)
        except KeyError:
            return None
        on_disk = bool(record.file) and os.path.exists(backend.directory.file_path(record.file))
        return record if on_disk and record.nbytes == buf.nbytes else None

    def unchanged(self, buf: StateBuffer) -> bool:
        """Whether ``buf``'s file holds exactly its live bytes: their fingerprints are equal, and
        the file is still the one written, as written (``holds_written_bytes``).

        Nothing else counts (no version counter): any write path (``GatheredParameters``, EMA,
        ``copy_``, ``load_state_dict``...) changes the fingerprint of what it wrote.
        """
        if buf.fingerprint is None or self.rewrite_all:
            return False
        record = self.record_of(buf)
        if record is None or record.fingerprint != buf.fingerprint:
            return False
        # The file must still hold those bytes: truncated, edited or replaced since, it is written
        # again (skipping it would free the only good copy).
        return self._mover.backend.holds_written_bytes(record)

    def bytes_of(self, names: list[str]) -> int:
        """Bytes of this writer's files for ``names``: rewritten in place or deleted first."""
        if not self._mover.has_backend:
            return 0
        backend = self._mover.backend
        stored = set(backend.names())
        return sum(backend.record(name).nbytes for name in names if name in stored)
