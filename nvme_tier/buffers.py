"""``StateBuffer``: one storage of an engine state, as the DeepSpeed glue finds it and the tiers move it;
``Placed``: where one of them went.

It stands below both: ``deepspeed/locators.py`` makes them from an engine's tensors, ``tiers.py``
frees, copies and restores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .types import StateKind, Tier


@dataclass(eq=False)
class StateBuffer:
    """One storage holding (part of) a state, addressed as a flat uint8 view over all of it."""

    kind: StateKind
    name: str
    view: torch.Tensor
    # Content fingerprint of the bytes being offloaded (taken when skip_unchanged is on); a write
    # records it, so a later offload can tell whether the file still holds the live bytes.
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.nbytes = self.view.numel()
        self.device = self.view.device

    @classmethod
    def of(cls, kind: StateKind, name: str, tensor: torch.Tensor) -> StateBuffer:
        storage = tensor.untyped_storage()
        return cls(kind, name, torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage))

    @property
    def resizable(self) -> bool:
        """False for page-locked host storages: they cannot be freed in place."""
        return self.view.untyped_storage().resizable()

    @property
    def is_freed(self) -> bool:
        return self.view.untyped_storage().nbytes() == 0

    def free(self) -> None:
        """Release the memory for every view of this storage at once."""
        self.view.untyped_storage().resize_(0)

    def restore(self) -> None:
        """Re-grow the same storage (contents undefined until filled): every view is valid again."""
        self.view.untyped_storage().resize_(self.nbytes)


@dataclass(eq=False)
class Placed:
    """Where one buffer went: a host copy, a stored record, or nowhere (discarded)."""

    buffer: StateBuffer
    tier: Tier
    host: torch.Tensor | None = None
    spilled: bool = False  # on nvme only because its host copy did not fit the host budget
