"""Host first, disk for the rest (issue 24), the pure parts: the planner that splits a state between
host memory and NVMe, the config that asks for it, the parts of one storage, the ``auto`` budget.

No engine here: plain sizes in, a placement out.
"""

from __future__ import annotations

import pytest
import torch

from nvme_tier.buffers import StateBuffer, cut
from nvme_tier.config import OffloadStatesConfig
from nvme_tier.errors import ConfigError
from nvme_tier.host_budget import AUTO_SHARE, auto_limit, local_ranks
from nvme_tier.policy import CPU_DEFAULT, SPLIT_ALIGN, EngineFacts, decide
from nvme_tier.types import PlanItem, StateKind, Tier
from nvme_tier.units import MiB

OPTIM, HP, LP, GRADS, SCRATCH = (
    StateKind.optim_states,
    StateKind.hp_params,
    StateKind.lp_params,
    StateKind.lp_grads,
    StateKind.contiguous_grad_buffer,
)
HOST = (Tier.cpu, Tier.pinned_cpu)
BUFFERS = {LP: (2 * MiB,), HP: (4 * MiB,), GRADS: (2 * MiB,), OPTIM: (4 * MiB, 4 * MiB)}


def cfg(**kw) -> OffloadStatesConfig:
    kw.setdefault("path", "/tmp/nvme")
    return OffloadStatesConfig.parse(kw)


def facts(available: int | None, buffers=BUFFERS) -> EngineFacts:
    return EngineFacts({s: sum(b) for s, b in buffers.items()}, available, buffer_bytes=buffers)


def on(placement, tiers, buffers=BUFFERS) -> int:
    return sum(i.nbytes for s in buffers for i in placement.items(s, buffers[s]) if i.tier in tiers)


def test_budget_fills_the_host_and_splits_the_state_that_crosses_it():
    budget = 10 * MiB + MiB // 2  # lp, hp, grads (8 MiB) fit; optim_states gets the 2.5 MiB left
    p = decide(cfg(device="cpu"), list(BUFFERS), facts=facts(budget))
    assert p.items(OPTIM, BUFFERS[OPTIM]) == (
        PlanItem(0, 0, 2 * MiB, Tier.pinned_cpu),  # rounded down to SPLIT_ALIGN
        PlanItem(0, 2 * MiB, 4 * MiB, Tier.nvme),
        PlanItem(1, 0, 4 * MiB, Tier.nvme),
    )
    assert p.spilled == {OPTIM} and p.uses_nvme and p.tiers[OPTIM] is Tier.nvme
    assert budget - SPLIT_ALIGN < on(p, HOST) <= budget  # filled to within one unit per state
    assert on(p, (Tier.nvme,)) == sum(map(sum, BUFFERS.values())) - on(p, HOST)
    # unlimited: everything on the host, nothing spilled or split
    free = decide(cfg(device="cpu"), list(BUFFERS), facts=facts(None))
    assert not free.spilled and not free.split and on(free, (Tier.nvme,)) == 0


def test_a_state_the_budget_crosses_inside_a_later_buffer_keeps_its_first_buffers_whole():
    p = decide(cfg(device="cpu"), list(BUFFERS), facts=facts(8 * MiB + 5 * MiB))
    assert p.items(OPTIM, BUFFERS[OPTIM]) == (
        PlanItem(0, 0, 4 * MiB, Tier.pinned_cpu),
        PlanItem(1, 0, MiB, Tier.pinned_cpu),
        PlanItem(1, MiB, 4 * MiB, Tier.nvme),
    )


def test_a_budget_below_one_unit_moves_the_whole_state():
    p = decide(cfg(device="cpu"), list(BUFFERS), facts=facts(8 * MiB + MiB // 2))
    assert p.tiers[OPTIM] is Tier.nvme and OPTIM not in p.split and p.spilled == {OPTIM}


def test_nvme_ratio_splits_a_state_like_zero_offload_plus_plus():
    c = cfg(nvme_ratio={"optim_states": 0.25})
    p = decide(c, list(BUFFERS), facts=facts(None))
    assert p.items(OPTIM, BUFFERS[OPTIM]) == (
        PlanItem(0, 0, 4 * MiB, Tier.pinned_cpu),
        PlanItem(1, 0, 2 * MiB, Tier.pinned_cpu),
        PlanItem(1, 2 * MiB, 4 * MiB, Tier.nvme),
    )
    assert not p.spilled  # the config placed it so, not the budget
    assert p.tiers[HP] is Tier.pinned_cpu  # the rest of the nvme default is unchanged
    assert decide(c, list(BUFFERS)).uses_nvme  # without sizes (attach checks) too
    # the budget shrinks the host part further, and then the state counts as spilled
    tight = decide(c, list(BUFFERS), facts=facts(8 * MiB + 3 * MiB))
    assert on(tight, HOST) == 8 * MiB + 3 * MiB and tight.spilled == {OPTIM}
    # policy names the host part's tier; pin_memory=False makes it pageable
    pageable = decide(
        cfg(nvme_ratio={"optim_states": 0.5}, policy={"optim_states": "cpu"}), [OPTIM], facts=facts(None)
    )
    assert {i.tier for i in pageable.split[OPTIM]} == {Tier.cpu, Tier.nvme}
    unpinned = decide(c, [OPTIM], pin_memory=False, facts=facts(None))
    assert {i.tier for i in unpinned.split[OPTIM]} == {Tier.cpu, Tier.nvme}
    # ratio 0 keeps it all on the host, 1 all on disk; an explicit device=cpu call never touches the disk
    assert (
        decide(cfg(nvme_ratio={"optim_states": 0}), [OPTIM], facts=facts(None)).tiers[OPTIM]
        is Tier.pinned_cpu
    )
    assert decide(cfg(nvme_ratio={"optim_states": 1}), [OPTIM], facts=facts(None)).tiers[OPTIM] is Tier.nvme
    assert not decide(c, list(BUFFERS), device="cpu", facts=facts(None)).uses_nvme


@pytest.mark.parametrize(
    "block,culprit,why",
    [
        (
            {"nvme_ratio": {"optim_states": 1.5}},
            "offload_states.nvme_ratio.optim_states",
            "less than or equal to 1",
        ),
        ({"nvme_ratio": {"optim_states": -0.1}}, "offload_states.nvme_ratio.optim_states", "greater than"),
        ({"nvme_ratio": {"optim_states": "half"}}, "offload_states.nvme_ratio.optim_states", "number"),
        ({"nvme_ratio": {"moments": 0.5}}, "offload_states.nvme_ratio.moments", "optim_states"),
        ({"nvme_ratio": {"contiguous_grad_buffer": 0.5}}, "nvme_ratio.contiguous_grad_buffer", "rebuilt"),
        ({"nvme_ratio": [0.5]}, "offload_states.nvme_ratio", "dictionary"),
        (
            {"nvme_ratio": {"optim_states": 0.5}, "policy": {"optim_states": "nvme"}},
            "nvme_ratio.optim_states",
            "policy.optim_states",
        ),
        ({"device": "automatic"}, "offload_states.device", "'auto'"),
    ],
)
def test_bad_split_config_names_the_key(block, culprit, why):
    with pytest.raises(ConfigError) as err:
        OffloadStatesConfig.parse(block)
    assert culprit in str(err.value) and why in str(err.value), str(err.value)


def test_auto_is_host_first_and_needs_a_path():
    with pytest.raises(ConfigError, match="offload_states.path is required.*auto"):
        decide(cfg(device="auto", path=None), list(StateKind))
    p = decide(cfg(device="auto"), list(StateKind))
    assert dict(p.tiers) == dict(CPU_DEFAULT) and p.uses_nvme  # host first; nvme for what does not fit
    assert p.tiers[SCRATCH] is Tier.discard
    budgeted = decide(cfg(device="auto"), list(BUFFERS), facts=facts(12 * MiB))
    assert on(budgeted, HOST) == 12 * MiB and budgeted.spilled == {OPTIM}


def test_auto_budget_is_a_share_of_available_memory_per_local_rank(monkeypatch):
    assert AUTO_SHARE == 0.5
    assert auto_limit(available=64 << 30, ranks=4) == 8 << 30
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert local_ranks() == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # DeepSpeed's launcher
    assert local_ranks() == 2
    monkeypatch.setenv("LOCAL_SIZE", "zero")
    assert local_ranks() == 1


def test_parts_of_one_storage_free_it_together_and_restore_it_whole():
    whole = StateBuffer.of(OPTIM, "optim_states.0", torch.arange(64, dtype=torch.uint8))
    expected = whole.view.clone()
    pairs = cut([whole], (PlanItem(0, 0, 16, Tier.pinned_cpu), PlanItem(0, 16, 64, Tier.nvme)))
    (head, t_head), (tail, t_tail) = pairs
    assert (t_head, t_tail) == (Tier.pinned_cpu, Tier.nvme)
    assert (head.nbytes, tail.nbytes) == (16, 48) and head.name != tail.name != whole.name
    copies = head.view.clone(), tail.view.clone()
    head.free()
    assert not head.is_freed and tail.view.sum() == expected[16:].sum()  # the tail's bytes still live
    tail.free()
    assert head.is_freed and tail.is_freed and whole.is_freed
    tail.restore()
    assert whole.view.untyped_storage().nbytes() == 64
    head.restore()  # already whole: nothing to re-grow
    head.view.copy_(copies[0])
    tail.view.copy_(copies[1])
    assert torch.equal(whole.view, expected)
    # a buffer whose one item covers it whole is the buffer itself
    assert cut([whole], (PlanItem(0, 0, 64, Tier.nvme),)) == [(whole, Tier.nvme)]
    with pytest.raises(ValueError, match="cover"):
        cut([whole], (PlanItem(0, 0, 16, Tier.pinned_cpu), PlanItem(0, 32, 64, Tier.nvme)))


def test_check_says_what_the_auto_budget_came_to(tmp_path, capsys, monkeypatch):
    import json

    from nvme_tier import cli

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"offload_states": {"device": "auto", "path": str(tmp_path)}}))
    cli.main(["check", "--json", "--config", str(config)])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    detail = checks["host budget"]["detail"]
    assert "device 'auto': 50% of" in detail and "available at attach / 4 local ranks" in detail, detail
