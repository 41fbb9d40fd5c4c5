"""Snapshots of an engine's states, to check that an offload/reload cycle gave every byte back.

One way to take them for the demo, the tests and the benchmarks: exact copies (``copy_states``,
on the device for speed or on the host to spare device memory) or, for states too large to copy,
crc32c digests read through one host buffer (``digest_states``). Both quiesce the engine first,
as ``offload_states`` does, so they see the buffers an offload would move. The scratch
``contiguous_grad_buffer`` (rebuilt every step, discarded by offloads) is left out unless asked.
"""

from __future__ import annotations

from typing import Any

import torch

from .buffers import StateBuffer
from .deepspeed.locators import discover_buffers, quiesce
from .storage.checksums import crc32c

DIGEST_CHUNK_BYTES = 64 << 20  # the one host buffer a digest reads through


def state_buffers(engine: Any, scratch: bool = False) -> dict[str, StateBuffer]:
    """The engine's state buffers by name, after quiescing it (``scratch``: with the grad buffer)."""
    quiesce(engine)
    return {
        b.name: b
        for kind, bufs in discover_buffers(engine).items()
        if scratch or kind.holds_data
        for b in bufs
    }


def copy_states(
    engine: Any, device: torch.device | str | None = None, scratch: bool = False
) -> dict[str, torch.Tensor]:
    """Byte copies of every state buffer by name, on ``device`` (None: where each buffer lives)."""
    return {
        name: b.view.to(device if device is not None else b.device, copy=True)
        for name, b in state_buffers(engine, scratch).items()
    }


def digest_states(engine: Any, scratch: bool = False) -> dict[str, list[int]]:
    """crc32c of each 64 MiB chunk of every state buffer: no copy of the whole state is made."""
    buffers = state_buffers(engine, scratch)
    pin = any(b.device.type == "cuda" for b in buffers.values())
    host = torch.empty(DIGEST_CHUNK_BYTES, dtype=torch.uint8, pin_memory=pin)
    digests: dict[str, list[int]] = {}
    for name, b in buffers.items():
        crcs = []
        for start in range(0, b.nbytes, DIGEST_CHUNK_BYTES):
            n = min(DIGEST_CHUNK_BYTES, b.nbytes - start)
            host[:n].copy_(b.view[start : start + n])
            crcs.append(crc32c(host[:n]))
        digests[name] = crcs
    return digests


def differing_states(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of the states whose bytes differ between two ``copy_states``, or that only one has."""
    missing = sorted(set(before) ^ set(after))
    return missing + [n for n in before if n in after and not torch.equal(before[n], after[n])]
