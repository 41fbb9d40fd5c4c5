"""Content fingerprints of state buffers, computed where the bytes live (on the GPU for device states).

Why: ``skip_unchanged`` keeps a state's file after a reload and skips rewriting it on the next
offload when the state did not change. "Did not change" must hold whatever wrote the state: a
reference model synced under ``GatheredParameters(modifier_rank=0)``, an EMA update, ``p.data.copy_``,
``load_state_dict``... A counter bumped by backward/step misses all of those and hands back stale
bytes. So every offload fingerprints the current bytes and skips a write only when the fingerprint
equals the one recorded when the file was written.

What it must detect: any change of any byte, including a swap of two elements or any change that
keeps the sum of the buffer; accidental collisions must be negligible. crc32c (already used to verify
files) would need a device-to-host copy of every byte, which is exactly the cost skipping avoids; it
is also only 32 bits. This hash reads each byte once, on the device, with torch ops only.

How: the bytes are read as int32 words ``w_i`` (a zero-padded word holds the 1-3 trailing bytes) and
each of two independent lanes sums ``w_i * m_i`` modulo 2**64 (int64 wraparound), where the
multiplier of word ``i`` at (row ``r``, column ``c``) of a ``ROW_WORDS``-wide layout is
``col[c] * row[r]``, both odd splitmix64 hashes of the index (small tables, kept per device: one
``ROW_WORDS`` long whatever the buffer size, one entry per row). A change confined to one word
changes every lane (an odd multiplier times a nonzero difference below 2**33 is never 0 mod 2**64);
changes of several words collide in one lane with probability about 2**-33 (the difference's
factor of two is at most 2**31), in both about 2**-66. The byte length is mixed into the result.

Cost: one multiply and one sum kernel over each chunk (the int64 product of a chunk, 4x its bytes,
is the only large temporary); ``benchmarks/fingerprint_cost.py`` measures it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .tensor_bytes import as_bytes

ROW_WORDS = 1 << 16  # columns of the layout: the column multiplier table is 2 x 512 KiB
# Bytes hashed per pass (temporaries stay below 4 x this). On a GPU large passes amortize the kernel
# launches; on a CPU a pass whose int64 product stays in cache ran 4x faster than a 32 MiB one.
CHUNK_BYTES = {"cuda": 32 << 20, "cpu": 4 << 20}
LANES = 2
_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_SEED_STRIDE = 1 << 48  # keeps the lanes' (and rows' vs columns') index ranges apart


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores (same bits)."""
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(index: torch.Tensor) -> torch.Tensor:
    """splitmix64 of each int64 index, with int64 wraparound (bit-identical on every device)."""
    z = index + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def _odd_multipliers(first: int, count: int, kind: int, device: torch.device) -> torch.Tensor:
    """``[LANES, count]`` odd multipliers: hashes of indices ``first..first+count-1``.

    ``kind`` 0 makes the column multipliers, 1 the row ones; every (lane, kind) has its own seed.
    Built on the device (no host-to-device copy, which would wait for queued kernels).
    """
    index = torch.arange(first, first + count, dtype=torch.int64, device=device)
    seed = (torch.arange(LANES, dtype=torch.int64, device=device) * 2 + kind) * _SEED_STRIDE
    return _splitmix64(index.unsqueeze(0) + seed.unsqueeze(1)) | 1


@functools.lru_cache(maxsize=8)
def _column_multipliers(device: torch.device) -> torch.Tensor:
    return _odd_multipliers(0, ROW_WORDS, 0, device)


_row_tables: dict[torch.device, torch.Tensor] = {}


def _row_multipliers(count: int, device: torch.device) -> torch.Tensor:
    """``[LANES, count]`` row multipliers: a prefix of a per-device table grown on demand
    (16 B a row, 64 KiB for each GiB hashed), so a buffer costs no hashing of its own."""
    table = _row_tables.get(device)
    if table is None or table.shape[1] < count:
        grown = max(count, 1024, 2 * table.shape[1] if table is not None else 0)
        table = _row_tables[device] = _odd_multipliers(0, grown, 1, device)
    return table[:, :count]


def _lanes(data: torch.Tensor, chunk_bytes: int | None) -> torch.Tensor:
    """The ``LANES`` int64 sums of one flat uint8 tensor, left on its device.

    Per chunk of whole rows, two kernels: the broadcast multiply of every lane and the reduction of
    each row into ``row_sums``.
    """
    device, nbytes = data.device, data.numel()
    row_bytes = ROW_WORDS * 4
    full_rows, tail = divmod(nbytes, row_bytes)
    cols = _column_multipliers(device).unsqueeze(0)  # [1, LANES, ROW_WORDS]
    row_sums = torch.empty(full_rows + (tail > 0), LANES, dtype=torch.int64, device=device)
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    rows_per_chunk = max(1, chunk_bytes // row_bytes)
    for first in range(0, full_rows, rows_per_chunk):
        rows = min(rows_per_chunk, full_rows - first)
        chunk = data[first * row_bytes : (first + rows) * row_bytes]
        if chunk.storage_offset() % 4:  # an unaligned view cannot be read as int32 in place
            chunk = chunk.clone()
        words = chunk.view(torch.int32).view(rows, 1, ROW_WORDS)
        torch.sum(words * cols, dim=2, out=row_sums[first : first + rows])
    if tail:  # the last, partial row: its words, the trailing 1-3 bytes zero-padded to a word
        n = -(-tail // 4)
        last = torch.zeros(n * 4, dtype=torch.uint8, device=device)
        last[:tail] = data[full_rows * row_bytes :]
        torch.sum(last.view(torch.int32).view(1, 1, n) * cols[..., :n], dim=2, out=row_sums[full_rows:])
    return (row_sums * _row_multipliers(row_sums.shape[0], device).T).sum(dim=0)


def _mix(value: int) -> int:
    """splitmix64 on Python ints (the finalizer of a fingerprint)."""
    z = (value + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    return z ^ (z >> 31)


def fingerprints(tensors: Sequence[torch.Tensor], chunk_bytes: int | None = None) -> list[str]:
    """The fingerprint of each tensor's bytes (32 hex digits), with one device synchronization.

    Each is computed on the tensor's own device; equal bytes give equal fingerprints on any device
    and with any ``chunk_bytes`` (default: ``CHUNK_BYTES`` of the device type).
    Callers must keep the tensors unchanged until this returns.
    """
    flats = [as_bytes(t) for t in tensors]
    on_device = [_lanes(f, chunk_bytes) for f in flats]  # every kernel queued before the first wait
    out = []
    for flat, lanes in zip(flats, on_device, strict=True):
        length = _mix(flat.numel())
        words = [
            _mix(((v & _MASK) + length + lane * _GOLDEN) & _MASK) for lane, v in enumerate(lanes.tolist())
        ]  # 16 B to the host
        out.append("".join(f"{w:016x}" for w in words))
    return out


def fingerprint(tensor: torch.Tensor, chunk_bytes: int | None = None) -> str:
    """The fingerprint of one tensor's bytes; see ``fingerprints``."""
    return fingerprints([tensor], chunk_bytes)[0]
