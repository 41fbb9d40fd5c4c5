"""The offload planner (plan.py), on plain buffers: no engine, no disk, no device work.

A plan says, before anything moves, where each buffer goes, which host bytes it reserves, which
NVMe bytes need free space, and (once fingerprints are in) which files are skipped.
"""

from __future__ import annotations

import pytest
import torch

from nvme_tier.buffers import BufferPart, StateBuffer
from nvme_tier.config import OffloadStatesConfig
from nvme_tier.host_budget import HostMemoryBudget
from nvme_tier.plan import OffloadPlan, StoredFile, plan_offload
from nvme_tier.policy import EngineFacts
from nvme_tier.types import StateKind, Tier
from nvme_tier.units import MiB

OPTIM, HP, SCRATCH = StateKind.optim_states, StateKind.hp_params, StateKind.contiguous_grad_buffer


def buffers(**sizes: tuple[int, ...]) -> dict[StateKind, list[StateBuffer]]:
    return {
        StateKind(kind): [
            StateBuffer.of(StateKind(kind), f"{kind}.{i}", torch.zeros(n, dtype=torch.uint8))
            for i, n in enumerate(ns)
        ]
        for kind, ns in sizes.items()
    }


def plan(bufs, available=None, stored=None, **config) -> OffloadPlan:
    cfg = OffloadStatesConfig.parse({"path": "/tmp/nvme", **config})
    facts = EngineFacts(
        {k: sum(b.nbytes for b in v) for k, v in bufs.items()},
        available,
        buffer_bytes={k: tuple(b.nbytes for b in v) for k, v in bufs.items()},
    )
    return plan_offload(cfg, bufs, facts, stored or {})


def test_every_buffer_that_leaves_the_device_is_an_item_with_its_tier():
    bufs = buffers(optim_states=(MiB, MiB), hp_params=(MiB,), contiguous_grad_buffer=(MiB,))
    p = plan(bufs, device="nvme")
    assert [(i.buffer.name, i.tier) for i in p.items] == [
        ("optim_states.0", Tier.nvme),
        ("optim_states.1", Tier.nvme),
        ("hp_params.0", Tier.pinned_cpu),
        ("contiguous_grad_buffer.0", Tier.discard),
    ]
    assert p.host_items == [(bufs[HP][0], Tier.pinned_cpu)]
    assert p.new_file_bytes == 2 * MiB and p.replaced_bytes == 0
    assert not any(i.skip for i in p.items)


def test_a_state_left_on_the_device_is_no_item():
    p = plan(buffers(optim_states=(MiB,), hp_params=(MiB,)), include=["optim_states"])
    assert [i.buffer.name for i in p.items] == ["optim_states.0"]


def test_the_budget_splits_a_buffer_into_parts_of_two_tiers():
    bufs = buffers(optim_states=(4 * MiB,))
    p = plan(bufs, available=MiB, device="cpu")
    host, disk = p.items
    assert isinstance(host.buffer, BufferPart) and host.tier is Tier.pinned_cpu and host.buffer.nbytes == MiB
    assert disk.tier is Tier.nvme and disk.buffer.nbytes == 3 * MiB and p.placement.spilled == {OPTIM}
    assert p.new_file_bytes == 3 * MiB


def test_only_new_files_need_free_space_and_replaced_files_count_as_free():
    bufs = buffers(optim_states=(MiB, MiB, MiB))
    stored = {
        "optim_states.0": StoredFile(MiB, "a", present=True),  # same size: rewritten in place
        "optim_states.1": StoredFile(2 * MiB, "b", present=True),  # other size: replaced
        "optim_states.2": StoredFile(MiB, "c", present=False),  # its data file is gone
    }
    p = plan(bufs, stored=stored, device="nvme")
    assert [i.buffer.name for i in p.new_files] == ["optim_states.1", "optim_states.2"]
    assert p.new_file_bytes == 2 * MiB and p.replaced_bytes == 3 * MiB


def test_a_file_is_skipped_only_with_the_live_fingerprint_and_when_the_disk_says_it_holds_them():
    bufs = buffers(optim_states=(MiB, MiB, MiB))
    stored = {f"optim_states.{i}": StoredFile(MiB, f"print{i}", present=True) for i in range(3)}
    p = plan(bufs, stored=stored, device="nvme")
    live = {"optim_states.0": "print0", "optim_states.1": "changed", "optim_states.2": "print2"}
    assert p.skip_candidates(live, rewrite_all=False) == ["optim_states.0", "optim_states.2"]
    assert p.skip_candidates(live, rewrite_all=True) == []
    skipped = p.skipping(live, ["optim_states.0"])  # optim_states.2's file was edited since
    assert [(i.skip, i.fingerprint) for i in skipped.items] == [
        (True, "print0"),
        (False, "changed"),
        (False, "print2"),
    ]
    assert not any(i.skip for i in p.items)  # frozen: the first plan is unchanged


class Kept:
    """A pinned copy kept for reuse (what the budget parks), or an engine that registers a limit."""

    def __init__(self, nbytes: int = 0):
        self.nbytes = nbytes

    def free(self) -> None:
        pass


def test_a_budget_transaction_keeps_its_reservations_or_returns_them_all():
    budget, owner, kept = HostMemoryBudget(), Kept(), Kept(2)
    budget.register(owner, 10, 0)
    with budget.transaction() as txn:
        assert txn.available == 10 and txn.reserve(4) and txn.available == 6
    assert budget.reserved == 4
    assert budget.reserve(2)
    budget.park(kept)
    with pytest.raises(MemoryError), budget.transaction() as txn:
        assert txn.unpark(kept) and txn.reserve(4) and not txn.reserve(1)
        raise MemoryError
    assert budget.reserved == 6 and budget.parked == 2  # the reservation returned, the copy parked again
