"""A tensor's bytes as a flat uint8 view: what the backends write and the fingerprints hash."""

from __future__ import annotations

import torch


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, any device), without copying."""
    if not tensor.is_contiguous():
        raise ValueError("nvme_tier takes contiguous tensors only; call .contiguous() first")
    flat = tensor.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
