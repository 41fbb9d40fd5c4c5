"""The call path real trainers use: the ZeRO optimizer's own offload_states/reload_states.

OpenRLHF 0.11.2 (``openrlhf/utils/deepspeed/deepspeed_utils.py``: ``offload_deepspeed_states`` /
``reload_deepspeed_states``), and the many RLHF projects vendoring it, offload through
``engine.optimizer.offload_states(...)`` with an explicit ``device=cpu``, call
``engine.empty_partition_cache()``, and reload through ``engine.reload_states(non_blocking=True)``.
With nvme_tier attached every mix of the two entry points must go through the same controller,
come back bit-exact and train on exactly like a never-offloaded twin (run afterwards).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum
from helpers import (
    assert_same_states,
    files_under,
    make_engine,
    optimizer_states_freed,
    params_of,
    snapshot,
    train,
)

import nvme_tier
from nvme_tier.config import OffloadStatesConfig
from nvme_tier.policy import decide
from nvme_tier.types import StateKind, Tier

OPENRLHF_INCLUDE = [
    OffloadStateTypeEnum.optim_states,
    OffloadStateTypeEnum.contiguous_grad_buffer,
    OffloadStateTypeEnum.hp_params,
    OffloadStateTypeEnum.lp_grads,
]


def openrlhf_offload(engine) -> None:
    """``offload_deepspeed_states`` of OpenRLHF 0.11.2, line for line (torch.cuda -> accelerator)."""
    engine.optimizer.offload_states(
        include=OPENRLHF_INCLUDE, device=OffloadDeviceEnum.cpu, pin_memory=True, non_blocking=True
    )
    engine.empty_partition_cache()
    get_accelerator().empty_cache()
    dist.barrier()
    get_accelerator().synchronize()


def openrlhf_reload(engine) -> None:
    """``reload_deepspeed_states`` of OpenRLHF 0.11.2."""
    engine.reload_states(non_blocking=True)
    get_accelerator().empty_cache()
    dist.barrier()
    get_accelerator().synchronize()


def engine_offload(engine) -> None:
    engine.offload_states(non_blocking=True)
    engine.empty_partition_cache()


def optimizer_reload(engine) -> None:
    engine.optimizer.reload_states(non_blocking=True)


def cycle_and_twin(engine_kwargs: dict, offload, reload, expect: dict[str, str], path) -> None:
    """Train, offload/reload through the given entry points twice, then compare with a twin."""
    engine = make_engine(**engine_kwargs)
    nvme_tier.attach(engine)
    losses = train(engine, 2)
    before = snapshot(engine)

    offload(engine)
    nvme_tier.wait(engine)
    status = nvme_tier.offload_status(engine)
    for state, tier in expect.items():
        assert status[state].tier == tier, (state, status[state])
    assert optimizer_states_freed(engine), "the optimizer states were not freed"
    if expect["optim_states"] == "nvme":
        assert files_under(path) >= status["optim_states"].bytes
    else:
        assert files_under(path) == 0, "device=cpu must not touch the disk"
    with pytest.raises(nvme_tier.StatesOffloadedError, match="reload_states"):
        train(engine, 1)
    reload(engine)
    # A non-blocking reload runs on a worker thread: only guarded calls (forward, backward, step...)
    # wait for it, so a snapshot of the raw buffers waits explicitly.
    nvme_tier.wait(engine)
    assert_same_states(before, snapshot(engine))
    assert all(e.tier == "device" for e in nvme_tier.offload_status(engine).values())

    losses += train(engine, 2, seed=2)
    offload(engine)  # again right after training: ZeRO-3 params were in flight
    reload(engine)
    losses += train(engine, 2, seed=3)
    weights = params_of(engine)
    nvme_tier.detach(engine)

    twin = make_engine(**{**engine_kwargs, "path": None})
    twin_losses = train(twin, 2) + train(twin, 2, seed=2) + train(twin, 2, seed=3)
    assert losses == twin_losses
    for a, b in zip(weights, params_of(twin), strict=True):
        assert torch.equal(a, b)


# With device=cpu honored the OpenRLHF include goes to host memory; lp_params is not included.
CPU_EXPECT = {"optim_states": "pinned_cpu", "hp_params": "pinned_cpu", "lp_params": "device"}
# honor_call_device=false: the config's (default nvme) placement decides.
NVME_EXPECT = {"optim_states": "nvme", "hp_params": "pinned_cpu", "lp_params": "device"}


def _zero12_has_offload_states() -> bool:
    """DeepSpeed 0.16.x gave only the ZeRO-3 optimizer offload_states/reload_states."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return hasattr(DeepSpeedZeroOptimizer, "offload_states")


STAGES = [
    pytest.param(
        2,
        marks=pytest.mark.skipif(
            not _zero12_has_offload_states(),
            reason="this DeepSpeed's ZeRO-1/2 optimizer has no offload_states",
        ),
    ),
    3,
]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("honor", [True, False], ids=["honor_device", "config_decides"])
def test_openrlhf_sequence(stage, honor, offload_dir):
    kwargs = {"stage": stage, "path": offload_dir, "backend": "zarr", "honor_call_device": honor}
    expect = CPU_EXPECT if honor else NVME_EXPECT
    cycle_and_twin(kwargs, openrlhf_offload, openrlhf_reload, expect, offload_dir)


@pytest.mark.parametrize("stage", STAGES)
def test_engine_offload_optimizer_reload(stage, offload_dir):
    expect = {"optim_states": "nvme", "hp_params": "pinned_cpu", "lp_params": "pinned_cpu"}
    kwargs = {"stage": stage, "path": offload_dir, "backend": "zarr"}
    cycle_and_twin(kwargs, engine_offload, optimizer_reload, expect, offload_dir)


@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_offload_optimizer_reload_blocking(stage, offload_dir):
    def offload(engine):
        engine.optimizer.offload_states(include=OPENRLHF_INCLUDE, device=OffloadDeviceEnum.cpu)

    kwargs = {"stage": stage, "path": offload_dir, "backend": "zarr"}
    cycle_and_twin(kwargs, offload, lambda e: e.optimizer.reload_states(), CPU_EXPECT, offload_dir)


@pytest.mark.parametrize("stage", STAGES)
def test_one_controller_for_both_entry_points(stage, offload_dir):
    """Offload through one entry point, the other sees it: status, no double offload, one reload."""
    engine = make_engine(stage, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.optimizer.offload_states(include=OPENRLHF_INCLUDE, device=OffloadDeviceEnum.cpu)
    assert nvme_tier.offload_status(engine)["optim_states"].tier == "pinned_cpu"
    engine.offload_states()  # the rest (lp_params) through the engine
    assert nvme_tier.offload_status(engine)["lp_params"].tier == "pinned_cpu"
    engine.optimizer.reload_states()
    assert all(e.tier == "device" for e in nvme_tier.offload_status(engine).values())
    engine.reload_states()  # nothing offloaded: a no-op
    train(engine, 1)


@pytest.mark.parametrize("stage", STAGES)
def test_detach_restores_the_optimizers_methods(stage, offload_dir):
    engine = make_engine(stage, offload_dir, backend="zarr")
    opt = engine.optimizer
    upstream = {name: type(opt).__dict__.get(name) for name in ("offload_states", "reload_states")}
    assert all(upstream.values()), "DeepSpeed's ZeRO optimizer has offload_states/reload_states"
    nvme_tier.attach(engine)
    assert "offload_states" in opt.__dict__ and "reload_states" in opt.__dict__
    train(engine, 1)
    opt.offload_states(include=[OffloadStateTypeEnum.optim_states], device=OffloadDeviceEnum.cpu)
    opt.reload_states()
    nvme_tier.detach(engine)
    assert "offload_states" not in opt.__dict__ and "reload_states" not in opt.__dict__
    for name, fn in upstream.items():
        assert getattr(opt, name).__func__ is fn
    train(engine, 1)


def test_empty_partition_cache_while_everything_is_offloaded(offload_dir):
    """ZeRO-3, every state (lp_params too) away: empty_partition_cache neither raises nor breaks."""
    kwargs = {"stage": 3, "path": offload_dir, "backend": "zarr"}
    expect = {"optim_states": "nvme", "hp_params": "pinned_cpu", "lp_params": "pinned_cpu"}

    def offload(engine):
        engine.offload_states()
        engine.empty_partition_cache()
        engine.empty_partition_cache()

    cycle_and_twin(kwargs, offload, lambda e: e.reload_states(), expect, offload_dir)


# -- the rule itself (pure) ---------------------------------------------------------------------
ALL = list(StateKind)


def test_honor_call_device_default_is_upstream():
    cfg = OffloadStatesConfig.parse({"path": "/tmp/nvme"})
    assert cfg.honor_call_device is True
    placement = decide(cfg, ALL, device=OffloadDeviceEnum.cpu)
    assert placement.tiers[StateKind.optim_states] is Tier.pinned_cpu
    assert not placement.uses_nvme


def test_config_decides_over_an_explicit_cpu_device():
    cfg = OffloadStatesConfig.parse({"path": "/tmp/nvme", "honor_call_device": False})
    placement = decide(cfg, ALL, device=OffloadDeviceEnum.cpu, pin_memory=True)
    assert placement.tiers == decide(cfg, ALL).tiers
    assert placement.tiers[StateKind.optim_states] is Tier.nvme
    # include keeps its meaning; device=none still moves nothing
    only = decide(cfg, ALL, include=[OffloadStateTypeEnum.hp_params], device=OffloadDeviceEnum.cpu)
    assert [s for s, t in only.tiers.items() if t is not Tier.device] == [StateKind.hp_params]
    assert not decide(cfg, ALL, device=OffloadDeviceEnum.none).states_on(Tier.nvme)


def test_pin_memory_when_the_config_decides():
    """Either side may refuse page-locking: pin_memory=False (call) or pin_memory: false (config)."""
    cfg = OffloadStatesConfig.parse({"path": "/tmp/nvme", "honor_call_device": False})
    assert decide(cfg, ALL, pin_memory=False).tiers[StateKind.hp_params] is Tier.cpu
    unpinned = cfg.model_copy(update={"pin_memory": False})
    assert (
        decide(unpinned, ALL, device=OffloadDeviceEnum.cpu, pin_memory=True).tiers[StateKind.hp_params]
        is Tier.cpu
    )
    honored = OffloadStatesConfig.parse({"path": "/tmp/nvme", "pin_memory": False})
    assert (
        decide(honored, ALL, device=OffloadDeviceEnum.cpu, pin_memory=True).tiers[StateKind.hp_params]
        is Tier.pinned_cpu
    )
