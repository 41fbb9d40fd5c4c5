"""The ready-to-use DeepSpeed configs in configs/: valid for DeepSpeed and for nvme_tier, as documented."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from nvme_tier.config import CONFIG_KEY, OffloadStatesConfig
from nvme_tier.errors import ConfigError
from nvme_tier.policy import decide
from nvme_tier.types import StateKind, Tier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXPECTED = {
    "nvme_default.json": (3, {"optim_states": "nvme", "hp_params": "pinned_cpu", "lp_params": "pinned_cpu"}),
    "cpu_full.json": (
        3,
        {"optim_states": "pinned_cpu", "hp_params": "pinned_cpu", "lp_params": "pinned_cpu"},
    ),
    "zero2_nvme.json": (2, {"optim_states": "nvme", "hp_params": "pinned_cpu"}),
    "custom_policy.json": (3, {"optim_states": "nvme", "hp_params": "nvme", "lp_params": "cpu"}),
    "zarr_only.json": (3, {"optim_states": "nvme", "hp_params": "pinned_cpu"}),
}


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def test_the_documented_set_is_there():
    assert sorted(p.name for p in CONFIGS.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_block_is_valid_and_places_as_named(name):
    stage, expect = EXPECTED[name]
    cfg = load(name)
    block = OffloadStatesConfig.parse(cfg[CONFIG_KEY])
    placement = decide(block, list(StateKind))
    for state, tier in expect.items():
        assert placement.tiers[StateKind(state)] is Tier(tier), (name, state)
    assert placement.tiers[StateKind.contiguous_grad_buffer] is Tier.discard
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["bf16"]["enabled"] is True
    if name == "zarr_only.json":
        assert block.backend == "zarr"
    if name == "cpu_full.json":
        assert not placement.uses_nvme and block.path is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_deepspeed_accepts_the_whole_file(name):
    """DeepSpeed's own validation (strict pydantic sections) passes; it keeps offload_states as is."""
    ds = DeepSpeedConfig(load(name))
    assert ds.zero_optimization_stage == EXPECTED[name][0]
    assert ds._param_dict[CONFIG_KEY] == load(name)[CONFIG_KEY]


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize(
    "where, key",
    [((), "pathh"), ((), "pin_memmory"), (("aio",), "queue_dept"), (("zarr",), "chunk_size")],
)
def test_unknown_keys_are_refused(name, where, key):
    block = copy.deepcopy(load(name)[CONFIG_KEY])
    target = block
    for part in where:
        target = target.setdefault(part, {})
    target[key] = 1
    with pytest.raises(ConfigError) as err:
        OffloadStatesConfig.parse(block)
    assert ".".join((CONFIG_KEY, *where, key)) + ": unknown key" in str(err.value)
