"""``StateBuffer``: one storage of an engine state, as the DeepSpeed glue finds it and the tiers move it;
``BufferPart``: a byte range of one, when a plan splits it between tiers; ``Placed``: where one went.

It stands below both: ``deepspeed/locators.py`` makes them from an engine's tensors, ``tiers.py``
frees, copies and restores them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .types import PlanItem, StateKind, Tier


@dataclass(eq=False)
class StateBuffer:
    """One storage holding (part of) a state, addressed as a flat uint8 view over all of it."""

    kind: StateKind
    name: str
    view: torch.Tensor
    # Module parameters viewing this storage (ZeRO-1/2: views into the flat buffer), which user code
    # reads directly; while it is freed each holds a stand-in (see ``free``).
    aliases: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        self.nbytes = self.view.numel()
        self.device = self.view.device

    @classmethod
    def of(
        cls, kind: StateKind, name: str, tensor: torch.Tensor, aliases: tuple[torch.Tensor, ...] = ()
    ) -> StateBuffer:
        storage = tensor.untyped_storage()
        view = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
        return cls(kind, name, view, aliases=aliases)

    @property
    def resizable(self) -> bool:
        """False for page-locked host storages: they cannot be freed in place."""
        return self.view.untyped_storage().resizable()

    @property
    def is_freed(self) -> bool:
        return self.view.untyped_storage().nbytes() == 0

    def free(self) -> None:
        """Release the memory for every view of this storage at once.

        A view at a non-zero offset into a freed storage points at unmapped memory: reading it
        segfaults (a CUDA illegal address on a GPU). So the parameters among the views first get
        an empty stand-in, as a ZeRO-3 parameter outside a gather (``show_host_copy``: its bytes).
        """
        for param in self.aliases:
            _RESIDENT_VIEWS.setdefault(param, param.data)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.view.untyped_storage().resize_(0)

    def restore(self) -> None:
        """Re-grow the same storage (contents undefined until filled): every view is valid again."""
        self.view.untyped_storage().resize_(self.nbytes)
        for param in self.aliases:
            view = _RESIDENT_VIEWS.pop(param, None)
            if view is not None:
                param.data = view

    def show_host_copy(self, host: torch.Tensor | None) -> None:
        """While freed, point the parameters at their bytes in ``host``, a complete copy of this
        storage (as upstream's offload does): direct reads then return the right bytes."""
        if host is None or not self.is_freed or host.numel() != self.nbytes:
            return
        for param in self.aliases:
            view = _RESIDENT_VIEWS.get(param)
            if view is None:
                continue
            size = view.element_size()
            offset = host.storage_offset() + view.storage_offset() * size  # bytes: host is uint8
            if offset % size == 0:
                stand_in = torch.empty(0, dtype=view.dtype, device=host.device)
                param.data = stand_in.set_(host.untyped_storage(), offset // size, view.size(), view.stride())


# Parameters holding a stand-in -> the view they hold while their storage is resident.
_RESIDENT_VIEWS = WeakIdKeyDictionary()


def resident_tensor(param: torch.Tensor) -> torch.Tensor:
    """What ``param`` holds while its storage is resident (the locators look through stand-ins)."""
    return _RESIDENT_VIEWS.get(param, param)


class _SharedStorage:
    """The parts of one storage: it is freed once every part is released, re-grown whole by the first restored.

    A part's range cannot be freed alone (the storage is one allocation), and must not be freed
    while another part's bytes are still being copied or written.
    """

    def __init__(self, whole: StateBuffer):
        self.whole = whole
        self.held: set[int] = set()
        self.lock = threading.Lock()


@dataclass(eq=False, kw_only=True)
class BufferPart(StateBuffer):
    """A byte range of a buffer, moved to one tier while the rest of it goes to another."""

    shared: _SharedStorage = field(repr=False)

    def free(self) -> None:
        """Release this part; the storage is freed when the last part of it is."""
        with self.shared.lock:
            self.shared.held.discard(id(self))
            if not self.shared.held and not self.is_freed:
                StateBuffer.free(self.shared.whole)

    def restore(self) -> None:
        with self.shared.lock:
            self.shared.held.add(id(self))
            if self.is_freed:
                StateBuffer.restore(self.shared.whole)


def cut(buffers: list[StateBuffer], items: Iterable[PlanItem]) -> list[tuple[StateBuffer, Tier]]:
    """Each plan item's buffer with its tier: the buffer itself when the item covers it whole,
    else a ``BufferPart`` per item (named ``<buffer>.part<k>``: a stable file and host-copy name)."""
    out: list[tuple[StateBuffer, Tier]] = []
    for index, group in groupby(items, key=lambda item: item.buffer):
        whole, ranges = buffers[index], list(group)
        if len(ranges) == 1 and (ranges[0].start, ranges[0].stop) == (0, whole.nbytes):
            out.append((whole, ranges[0].tier))
            continue
        bounds = [0] + [i.stop for i in ranges]
        if [i.start for i in ranges] != bounds[:-1] or bounds[-1] != whole.nbytes:
            raise ValueError(f"plan items {ranges} do not cover {whole.name} ({whole.nbytes} B) exactly once")
        shared = _SharedStorage(whole)
        for k, item in enumerate(ranges):
            part = BufferPart(
                whole.kind, f"{whole.name}.part{k}", whole.view[item.start : item.stop], shared=shared
            )
            shared.held.add(id(part))
            out.append((part, item.tier))
    return out


@dataclass(eq=False)
class Placed:
    """Where one buffer went: a host copy, a stored record, or nowhere (discarded)."""

    buffer: StateBuffer
    tier: Tier
    host: torch.Tensor | None = None
    spilled: bool = False  # on nvme only because its host copy did not fit the host budget
