"""The placement policy is pure: plain values in, a placement out."""

import pytest

from nvme_tier.config import OffloadStatesConfig
from nvme_tier.errors import ConfigError
from nvme_tier.policy import CPU_DEFAULT, NVME_DEFAULT, decide
from nvme_tier.types import StateKind, Tier

ALL = list(StateKind)


def cfg(**kw) -> OffloadStatesConfig:
    kw.setdefault("path", "/tmp/nvme")
    return OffloadStatesConfig.parse(kw)


def test_nvme_default():
    p = decide(cfg(), ALL)
    assert dict(p.tiers) == dict(NVME_DEFAULT)
    assert p.tiers[StateKind.optim_states] is Tier.nvme
    assert p.tiers[StateKind.hp_params] is Tier.pinned_cpu
    assert p.tiers[StateKind.contiguous_grad_buffer] is Tier.discard


def test_cpu_device_is_full_cpu_path():
    p = decide(cfg(device="cpu", path=None), ALL)
    assert dict(p.tiers) == dict(CPU_DEFAULT)
    assert not p.uses_nvme


def test_overrides_apply_per_state():
    p = decide(cfg(policy={"hp_params": "nvme", "lp_params": "cpu"}), ALL)
    assert p.tiers[StateKind.hp_params] is Tier.nvme
    assert p.tiers[StateKind.lp_params] is Tier.cpu
    assert p.tiers[StateKind.optim_states] is Tier.nvme


def test_include_limits_moved_states_and_accepts_upstream_enum():
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    p = decide(cfg(), ALL, include=[OffloadStateTypeEnum.optim_states])
    assert p.tiers[StateKind.optim_states] is Tier.nvme
    assert all(t is Tier.device for s, t in p.tiers.items() if s is not StateKind.optim_states)


def test_explicit_cpu_device_never_touches_disk():
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    p = decide(cfg(policy={"hp_params": "nvme"}), ALL, device=OffloadDeviceEnum.cpu)
    assert not p.uses_nvme


def test_explicit_nvme_device_over_cpu_config_needs_path():
    with pytest.raises(ConfigError, match="path is required"):
        decide(cfg(device="cpu", path=None), ALL, device="nvme")


def test_pin_memory_false_downgrades_pinned():
    p = decide(cfg(), ALL, pin_memory=False)
    assert p.tiers[StateKind.hp_params] is Tier.cpu


def test_device_none_moves_nothing():
    p = decide(cfg(), ALL, device="none")
    assert set(p.tiers.values()) == {Tier.device}


def test_unknown_include_and_device_are_named():
    with pytest.raises(ConfigError, match="bogus"):
        decide(cfg(), ALL, include=["bogus"])
    with pytest.raises(ConfigError, match="tape"):
        decide(cfg(), ALL, device="tape")


def test_nvme_without_path_is_refused():
    with pytest.raises(ConfigError, match="optim_states"):
        decide(OffloadStatesConfig.parse({}), ALL)


@pytest.mark.parametrize("state", [s for s in StateKind if s.holds_data])
def test_discard_refused_for_data_states(state):
    with pytest.raises(ConfigError, match=state.value):
        cfg(policy={state.value: "discard"})


def test_only_present_states_are_placed():
    p = decide(cfg(), [StateKind.lp_params])
    assert list(p.tiers) == [StateKind.lp_params]
