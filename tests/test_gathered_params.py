"""ZeRO-3 weights gathered outside forward (``deepspeed.zero.GatheredParameters``) around offloads.

Upstream's non-blocking reload queues its copies on the stream before it returns, so gathering
(or editing under ``modifier_rank``) right after it sees the reloaded weights. nvme_tier fills the
partitions on its own thread: the gather must wait for that, not read freed memory (it segfaulted
on the CPU accelerator) nor have its edit overwritten by the reload landing after it.
"""

from __future__ import annotations

import time

import deepspeed
import pytest
import torch
from helpers import make_engine, train

import nvme_tier
from nvme_tier.testing.faults import FaultInjectingBackend, FaultPlan


class SlowReads(FaultInjectingBackend):
    """Each read starts late: the reload is surely still running when the caller goes on."""

    def read_into(self, name: str, out: torch.Tensor):
        time.sleep(0.3)
        return super().read_into(name, out)


def gathered(param: torch.nn.Parameter) -> torch.Tensor:
    with deepspeed.zero.GatheredParameters([param]):
        return param.data.clone()


def test_gather_and_edit_right_after_a_non_blocking_reload(offload_dir):
    engine = make_engine(3, offload_dir, backend="zarr", policy={"lp_params": "nvme"})
    nvme_tier.attach(engine)
    train(engine, 2)
    param = next(engine.module.parameters())
    before = gathered(param)
    engine.offload_states()
    nvme_tier.controller_of(engine)._mover.wrap_backend(lambda b: SlowReads(b, FaultPlan()))

    engine.reload_states(non_blocking=True)
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        seen = param.data.clone()
        param.data.add_(1.0)

    assert torch.equal(seen, before), "the gather read the weights before the reload had filled them"
    assert torch.equal(gathered(param), before + 1.0), "the reload overwrote the edit made after it"
    train(engine, 1)


def test_gather_refused_while_the_weights_are_offloaded(offload_dir):
    engine = make_engine(3, offload_dir, backend="zarr", policy={"lp_params": "nvme"})
    nvme_tier.attach(engine)
    train(engine, 1)
    param = next(engine.module.parameters())
    engine.offload_states(non_blocking=True)
    with pytest.raises(nvme_tier.StatesOffloadedError, match="lp_params are offloaded"):
        gathered(param)
    engine.reload_states()
    gathered(param)


def test_gather_while_only_the_optimizer_states_are_offloaded(offload_dir):
    """OpenRLHF broadcasts the gathered weights to vLLM while the optimizer states are away."""
    engine = make_engine(3, offload_dir, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    param = next(engine.module.parameters())
    before = gathered(param)
    engine.offload_states(include=["optim_states", "hp_params"])
    assert torch.equal(gathered(param), before)
    engine.reload_states()
    nvme_tier.detach(engine)
    assert "all_gather" in param.__dict__ and not hasattr(param.all_gather, "__wrapped__")


def saved_weights(engine, tmp_path, tag: str) -> dict:
    out = tmp_path / tag
    engine.save_16bit_model(str(out))
    return torch.load(out / "pytorch_model.bin")


def test_save_16bit_model_waits_for_or_refuses_offloaded_weights(offload_dir, tmp_path):
    """ZeRO-2 params are views of the flat lp buffer: saving them while it is freed or still
    being filled raised torch's "storage that is not resizable" (or read freed memory)."""
    engine = make_engine(2, offload_dir, backend="zarr", policy={"lp_params": "nvme"})
    nvme_tier.attach(engine)
    train(engine, 1)
    expected = saved_weights(engine, tmp_path, "resident")

    engine.offload_states(include=["optim_states"])  # OpenRLHF saves with the optimizer states away
    assert saved_weights(engine, tmp_path, "optim-away").keys() == expected.keys()
    engine.reload_states()

    engine.offload_states()
    with pytest.raises(nvme_tier.StatesOffloadedError, match="lp_params are offloaded"):
        engine.save_16bit_model(str(tmp_path / "refused"))
    nvme_tier.controller_of(engine)._mover.wrap_backend(lambda b: SlowReads(b, FaultPlan()))
    engine.reload_states(non_blocking=True)
    saved = saved_weights(engine, tmp_path, "after-reload")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
