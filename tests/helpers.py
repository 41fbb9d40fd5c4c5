"""What tests share: tiny real DeepSpeed engines on the CPU accelerator, a train loop, snapshots.

Imported by tests (``from helpers import make_engine``) and by the child processes some tests
start (with ``tests/`` on ``sys.path``); conftest.py keeps only the fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

import nvme_tier
from nvme_tier.deepspeed.ops import aio_compatible
from nvme_tier.demo import set_launch_env
from nvme_tier.host_budget import HostMemoryBudget
from nvme_tier.snapshot import copy_states

set_launch_env()  # single-process rendezvous, a free port

AIO_OK, AIO_WHY = aio_compatible()
requires_aio = pytest.mark.skipif(
    not AIO_OK, reason=f"aio backend unavailable: {AIO_WHY} (apt-get install -y libaio-dev)"
)


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


# DeepSpeed's CPU accelerator has no fp16 where oneDNN lacks it (AMD EPYC, many Xeons): skip there,
# as DeepSpeed's own tests do. benchmarks/gpu_tests.sh sets NVME_TIER_REQUIRE_FP16=1 so that on
# the GPU machine a missing fp16 fails these tests instead of skipping them silently.
FP16_OK = _fp16_supported() or os.environ.get("NVME_TIER_REQUIRE_FP16") == "1"
requires_fp16 = pytest.mark.skipif(
    not FP16_OK, reason="fp16 is not supported by this DeepSpeed accelerator (get_accelerator())"
)


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.l1 = torch.nn.Linear(16, width)
        self.l2 = torch.nn.Linear(width, width)
        self.l3 = torch.nn.Linear(width, 4)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def ds_config(stage: int, path=None, dtype: str = "bf16", optimizer: str | None = "Adam", **offload) -> dict:
    cfg: dict = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 10000, "allgather_bucket_size": 10000},
        dtype: {"enabled": True},
    }
    if dtype == "fp16":
        cfg["fp16"].update({"initial_scale_power": 8, "loss_scale_window": 100})
    if optimizer:
        cfg["optimizer"] = {"type": optimizer, "params": {"lr": 1e-2}}
    block = {"progress": False, **offload}
    if path is not None:
        block["path"] = str(path)
    cfg["offload_states"] = block
    return cfg


def make_engine(
    stage: int,
    path=None,
    dtype: str = "bf16",
    optimizer: str | None = "Adam",
    width: int = 64,
    seed: int = 0,
    **offload,
):
    import deepspeed

    if dtype == "fp16" and not FP16_OK:  # a test that forgot @requires_fp16 skips rather than fails
        pytest.skip("fp16 is not supported by this DeepSpeed accelerator")
    torch.manual_seed(seed)
    model = TinyNet(width)
    cfg = ds_config(stage, path, dtype, optimizer, **offload)
    kwargs = {"model_parameters": model.parameters()} if optimizer else {}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, **kwargs)
    return engine


def input_dtype(engine) -> torch.dtype:
    return next(engine.module.parameters()).dtype


def train(engine, steps: int, seed: int = 1) -> list[float]:
    """A few deterministic steps; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 16, generator=g).to(engine.device, input_dtype(engine))
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def snapshot(engine) -> dict:
    """Byte copies of every state buffer, scratch included, keyed by name (quiesced first)."""
    return copy_states(engine, scratch=True)


SCRATCH = "contiguous_grad_buffer"


def assert_same_states(before: dict, after: dict) -> None:
    """Every state buffer but the scratch one (rebuilt each step) byte for byte as before."""
    for name, data in before.items():
        if name.startswith(SCRATCH):
            continue
        assert name in after, name
        assert torch.equal(data, after[name]), f"{name} changed across offload/reload"


def files_under(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def optimizer_states_freed(engine) -> bool:
    """Whether every optimizer-state tensor of the inner optimizer holds no storage (really offloaded)."""
    return all(
        t.untyped_storage().nbytes() == 0
        for s in engine.optimizer.optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim()
    )


def params_of(engine) -> list[torch.Tensor]:
    """Full fp32 master weights (ZeRO-aware), for twin comparisons."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(
    script: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -c script args`` with this checkout importable (``NVME_TIER_REPO`` names it), its
    own rendezvous (ours may hold the port) and ``env`` on top; output captured as text."""
    env = {**os.environ, "NVME_TIER_REPO": REPO, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def child_result(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a child printed last on a ``RESULT `` line; fails the test (with its output) without one."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@contextlib.contextmanager
def budget_of_its_own() -> Iterator[tuple[HostMemoryBudget, list]]:
    """A runtime of one test (its budget, staging and aio handle pools: engines and idle slots of
    other tests do not count); yields (budget, engines), and detaches the engines a test adds to
    that list."""
    with nvme_tier.isolated_runtime() as runtime:
        engines: list = []
        try:
            yield runtime.budget, engines
        finally:
            for engine in engines:
                with contextlib.suppress(nvme_tier.StatesOffloadedError):  # a failed test left it offloaded
                    nvme_tier.detach(engine)
