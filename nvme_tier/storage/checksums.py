"""crc32c of host bytes with the GIL released, and how a byte range splits into chunks.

What the chunk pipeline checksums each staged chunk with, the write verification and the
skip-unchanged check compare sampled pages with, and snapshot.py hashes with: defined once.
"""

from __future__ import annotations

import ctypes
from typing import Any

import crc32c as crc32c_lib
import numpy as np
import torch

from ..units import PAGE


def host_array(host_bytes: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU uint8 tensor that leaves the tensor's storage resizable.

    ``Tensor.numpy()`` permanently marks the storage non-resizable, and nvme_tier frees engine
    storages in place with ``resize_(0)``; so the view is built from the raw address instead.
    The caller keeps the tensor alive while the array is in use.
    """
    n = host_bytes.numel()
    if n == 0:
        return np.empty(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(host_bytes.data_ptr()))


def crc32c(host_bytes: torch.Tensor) -> int:
    """crc32c of a CPU uint8 tensor, computed with the GIL released (see ``crc32c_of_buffer``)."""
    return crc32c_of_buffer(host_array(host_bytes)) if host_bytes.numel() else 0


def crc32c_of_buffer(data: Any) -> int:
    """crc32c of any contiguous buffer (numpy array, mmap, bytes), hardware-accelerated.

    Always with the GIL released: backend workers checksum 128 MiB staging chunks while the
    caller's thread runs another model, and PyTorch takes the GIL back after every op, so a
    checksum that kept it (google-crc32c does, for anything but ``bytes`` of >= 1 MiB) would
    stall each of the caller's ops for the whole chunk (docs/design.md, "No GIL in the background").
    """
    return crc32c_lib.crc32c(data, gil_release_mode=1)


ZERO_PAGE_CRC = crc32c_of_buffer(bytes(PAGE))  # what a page never written reads back as


def chunk_ranges(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each ``chunk``-byte piece of ``nbytes`` (the last one may be shorter)."""
    return [(start, min(start + chunk, nbytes)) for start in range(0, nbytes, chunk)]
