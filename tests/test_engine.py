"""Real DeepSpeed engines (CPU accelerator) offloading to real files and back.

Each test trains, offloads, checks status and freed memory, reloads, compares every state byte
for byte, trains on, cycles again, and finally compares losses and weights with a never-offloaded
twin that runs afterwards (interleaved engines are not bit-identical even without offload).
"""

from __future__ import annotations

import os

import pytest
import torch
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum
from helpers import (
    assert_same_states,
    files_under,
    make_engine,
    params_of,
    requires_aio,
    requires_fp16,
    snapshot,
    train,
)

import nvme_tier
from nvme_tier.types import StateKind


def optimizer_state_tensors(engine) -> list[torch.Tensor]:
    inner = engine.optimizer.optimizer
    return [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]


def run_cycle_and_twin(engine_kwargs: dict, offload_kwargs: dict, expect: dict[str, str], path) -> None:
    engine = make_engine(**engine_kwargs)
    nvme_tier.attach(engine)
    losses = train(engine, 2)
    before = snapshot(engine)

    engine.offload_states(**offload_kwargs)
    status = nvme_tier.offload_status(engine)
    for state, tier in expect.items():
        assert status[state].tier == tier and status[state]["tier"] == tier, (state, status[state])
        if tier != "device":
            assert status[state].bytes > 0
    if expect.get("optim_states") in ("nvme", "cpu", "pinned_cpu"):
        assert all(t.untyped_storage().nbytes() == 0 for t in optimizer_state_tensors(engine))
    if expect.get("optim_states") == "nvme":
        assert files_under(path) >= status["optim_states"].bytes
    with pytest.raises(nvme_tier.StatesOffloadedError, match="reload_states"):
        train(engine, 1)
    engine.offload_states(**offload_kwargs)  # a second offload is a no-op
    engine.reload_states()
    engine.reload_states()  # nothing offloaded: no-op
    assert_same_states(before, snapshot(engine))
    assert all(e.tier == "device" for e in nvme_tier.offload_status(engine).values())

    losses += train(engine, 2, seed=2)
    engine.offload_states(**offload_kwargs)  # the "param still in flight" case: train, offload again
    engine.reload_states()
    losses += train(engine, 2, seed=3)
    weights = params_of(engine)

    twin_kwargs = {**engine_kwargs, "path": None}
    twin = make_engine(**twin_kwargs)
    twin_losses = train(twin, 2) + train(twin, 2, seed=2) + train(twin, 2, seed=3)
    assert losses == twin_losses
    for a, b in zip(weights, params_of(twin), strict=True):
        assert torch.equal(a, b)
    nvme_tier.detach(engine)


NVME_EXPECT = {
    "optim_states": "nvme",
    "hp_params": "pinned_cpu",
    "lp_params": "pinned_cpu",
}


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("backend", ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])])
def test_nvme_default_policy(stage, backend, offload_dir):
    run_cycle_and_twin(
        {"stage": stage, "path": offload_dir, "backend": backend}, {}, NVME_EXPECT, offload_dir
    )


@pytest.mark.parametrize(
    "stage, dtype, optimizer",
    [
        pytest.param(1, "fp16", "AdamW", marks=requires_fp16),
        pytest.param(2, "fp16", "Adam", marks=requires_fp16),
        pytest.param(3, "fp16", "AdamW", marks=requires_fp16),
        (2, "bf16", "AdamW"),
    ],
)
def test_dtypes_and_optimizers(stage, dtype, optimizer, offload_dir):
    kwargs = {"stage": stage, "path": offload_dir, "backend": "zarr", "dtype": dtype, "optimizer": optimizer}
    run_cycle_and_twin(kwargs, {}, NVME_EXPECT, offload_dir)


@pytest.mark.parametrize("stage", [2, 3])
def test_full_cpu_path_from_config(stage, tmp_path):
    expect = {"optim_states": "pinned_cpu", "hp_params": "pinned_cpu", "lp_params": "pinned_cpu"}
    run_cycle_and_twin({"stage": stage, "device": "cpu"}, {}, expect, tmp_path)
    assert not os.listdir(tmp_path)


def test_upstream_arguments(offload_dir):
    """include/device/pin_memory keep their upstream meaning; device=nvme works instead of raising."""
    include = [OffloadStateTypeEnum.optim_states, OffloadStateTypeEnum.hp_params]
    expect = {"optim_states": "nvme", "hp_params": "cpu", "lp_params": "device", "lp_grads": "device"}
    run_cycle_and_twin(
        {"stage": 3, "path": offload_dir, "backend": "zarr", "device": "cpu"},
        {"include": include, "device": OffloadDeviceEnum.nvme, "pin_memory": False, "non_blocking": False},
        expect,
        offload_dir,
    )


def test_explicit_cpu_device_over_nvme_config(offload_dir):
    expect = {"optim_states": "pinned_cpu", "hp_params": "pinned_cpu"}
    run_cycle_and_twin(
        {"stage": 2, "path": offload_dir, "backend": "zarr"},
        {"device": OffloadDeviceEnum.cpu},
        expect,
        offload_dir,
    )


def test_custom_policy(offload_dir):
    policy = {"hp_params": "nvme", "lp_params": "cpu", "lp_grads": "device"}
    expect = {"optim_states": "nvme", "hp_params": "nvme", "lp_params": "cpu"}
    run_cycle_and_twin(
        {"stage": 3, "path": offload_dir, "backend": "zarr", "policy": policy}, {}, expect, offload_dir
    )


def test_initialize_attaches_from_config(offload_dir):
    import deepspeed  # noqa: F401
    from helpers import TinyNet, ds_config

    model = TinyNet()
    engine, *_ = nvme_tier.initialize(
        model=model, config=ds_config(3, offload_dir, backend="zarr"), model_parameters=model.parameters()
    )
    train(engine, 1)
    engine.offload_states()
    assert nvme_tier.offload_status(engine)[StateKind.optim_states.value].tier == "nvme"
    engine.reload_states()
    train(engine, 1)


def test_status_table_and_release(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    table = nvme_tier.format_status(engine)
    assert "optim_states" in table and "nvme" in table and "device memory freed" in table
    with pytest.raises(nvme_tier.StatesOffloadedError):
        nvme_tier.release(engine)
    engine.reload_states()
    nvme_tier.release(engine)
    assert files_under(offload_dir) == 0


def test_detach_restores_upstream_and_removes_files(offload_dir):
    engine = make_engine(2, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()  # files stay (skip_unchanged) for the next offload
    assert files_under(offload_dir) > 0
    nvme_tier.detach(engine)
    assert files_under(offload_dir) == 0
    assert "offload_states" not in engine.__dict__ and "step" not in engine.__dict__
    train(engine, 1)


def test_process_exit_removes_files(offload_dir):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import make_engine, train
        import nvme_tier
        engine = make_engine(3, {str(offload_dir)!r}, backend="zarr")
        nvme_tier.attach(engine)
        train(engine, 1)
        engine.offload_states()
        engine.reload_states()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # ours is bound by this process
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300, env=env)
    assert files_under(offload_dir) == 0
