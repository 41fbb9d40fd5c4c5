"""What a caller may do right after a non-blocking reload (docs/design.md, "Non-blocking reloads").

The NVMe reads finish on nvme_tier's threads. Read right after ``reload_states(non_blocking=True)``
(OpenRLHF's ``reload_deepspeed_states``), 74-86 % of the optimizer-state elements were still
unread, and an edit made then was overwritten by the read. The engine's own use and DeepSpeed's
accessors wait for the reads everywhere; on the CPU accelerator the reads finish before the call
returns; on a GPU the call returns at once and the caller's own CUDA work (even a copy to pageable
memory, which blocks every thread's CUDA calls while it waits) never waits for the disk.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from deepspeed.utils import safe_get_full_optimizer_state
from helpers import make_engine, train
from test_real_clients import STAGES, openrlhf_offload, openrlhf_reload

import nvme_tier
from nvme_tier.types import OffloadPhase

READ_DELAY_S = 0.5


class SlowReads:
    """Wraps the real backend's reads: each waits ``delay`` seconds first (a slow disk)."""

    def __init__(self, controller, delay: float = READ_DELAY_S):
        self.started = threading.Event()
        mover = controller._mover
        backend = mover.backend
        real = backend._read_bytes

        def read_bytes(record, dst):
            self.started.set()
            time.sleep(delay)
            return real(record, dst)

        backend._read_bytes = read_bytes
        self.remove = lambda: backend.__dict__.pop("_read_bytes", None)


def optimizer_states(engine) -> list[torch.Tensor]:
    return [
        t
        for s in engine.optimizer.optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim()
    ]


@pytest.mark.xfail(
    torch.cuda.is_available(),
    strict=True,
    reason="on a GPU a raw read right after a non-blocking NVMe reload is not ordered after the reads "
    "(docs/design.md, Non-blocking reloads): call nvme_tier.wait first",
)
@pytest.mark.parametrize("stage", STAGES)
def test_states_read_and_edited_right_after_openrlhf_reload(stage, offload_dir):
    engine = make_engine(stage, offload_dir, backend="zarr", honor_call_device=False)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    states = optimizer_states(engine)
    before = [t.clone() for t in states]
    openrlhf_offload(engine)
    nvme_tier.wait(engine)
    assert nvme_tier.offload_status(engine)["optim_states"].tier == "nvme"
    slow = SlowReads(controller)
    openrlhf_reload(engine)
    seen = [t.clone() for t in states]  # directly, no nvme_tier.wait
    states[0].add_(1.0)  # an edit made right then must stay
    slow.remove()
    for a, b in zip(before, seen, strict=True):
        assert torch.equal(a, b), f"{(a != b).float().mean():.0%} of the elements not reloaded yet"
    nvme_tier.wait(engine)
    assert torch.equal(states[0], before[0] + 1.0), "the edit was overwritten by the reload"
    train(engine, 1)
    nvme_tier.detach(engine)


@pytest.mark.parametrize("stage", STAGES)
def test_accessor_right_after_openrlhf_reload_waits_for_the_reads(stage, offload_dir):
    engine = make_engine(stage, offload_dir, backend="zarr", honor_call_device=False)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    p = engine.module.l2.weight
    moment = safe_get_full_optimizer_state(p, "exp_avg").clone()
    openrlhf_offload(engine)
    nvme_tier.wait(engine)
    slow = SlowReads(controller)
    openrlhf_reload(engine)
    assert torch.equal(safe_get_full_optimizer_state(p, "exp_avg"), moment)
    slow.remove()
    train(engine, 1)
    nvme_tier.detach(engine)


def test_failed_non_blocking_reload_raises_at_the_next_call_on_cpu(offload_dir):
    """Finished in the call where no stream can order it, a failure still surfaces as before."""
    engine = make_engine(2, offload_dir, backend="zarr")
    controller = nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    backend = controller._mover.backend

    def broken(record, dst):
        raise OSError(5, "injected read error", record.file)

    backend._read_bytes = broken
    engine.reload_states(non_blocking=True)  # does not raise here, as on a GPU
    backend.__dict__.pop("_read_bytes")
    with pytest.raises(nvme_tier.TierIOError, match="injected"):
        train(engine, 1)
    assert controller.phase is OffloadPhase.failed
    engine.reload_states()  # transient: a retry brings the states back
    train(engine, 1)
    nvme_tier.detach(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_caller_work_right_after_a_non_blocking_reload_never_waits_for_the_disk(offload_dir):
    """The call returns while the reads are held back; the caller's own work then, down to copies
    to pageable memory (``.item()``, ``.cpu()``), finishes meanwhile: making the caller's stream
    wait for the reads deadlocked here (the waiting copy blocks the I/O threads' CUDA calls)."""
    engine = make_engine(2, offload_dir, backend="zarr", width=512)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    states = optimizer_states(engine)
    before = [t.clone() for t in states]
    engine.offload_states()
    slow = SlowReads(controller, delay=2.0)
    t = time.perf_counter()
    engine.reload_states(non_blocking=True)
    returned = time.perf_counter() - t
    seen: dict[str, object] = {}
    done = threading.Event()

    def caller_work() -> None:
        x = torch.arange(1 << 20, device="cuda", dtype=torch.float64)
        seen["item"] = x.sum().item()
        seen["cpu"] = x[:4].cpu()
        seen["phase"] = controller.phase
        done.set()

    threading.Thread(target=caller_work, daemon=True).start()
    assert done.wait(60), "the caller's copy to pageable memory waited for the NVMe reads"
    assert returned < 1.0, returned  # the CPU was not blocked
    assert seen["phase"] is OffloadPhase.reloading, "the reads had finished: nothing was tested"
    nvme_tier.wait(engine)
    for a, b in zip(before, states, strict=True):
        assert torch.equal(a, b)
    slow.remove()
    train(engine, 1)
    nvme_tier.detach(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_one_engine_offloads_while_another_reloads_on_the_same_stream(tmp_path):
    """Engine A's reads (queued chunk by chunk on A's own submit stream) and engine B's offload
    issued meanwhile on the caller's stream never wait for each other: both finish."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    a = make_engine(2, a_dir, backend="zarr", width=512)
    b = make_engine(2, b_dir, backend="zarr", width=512, seed=1)
    controller_a = nvme_tier.attach(a)
    nvme_tier.attach(b)
    train(a, 1)
    train(b, 1)
    a.offload_states()
    slow = SlowReads(controller_a, delay=1.0)
    a.reload_states(non_blocking=True)
    b.offload_states(non_blocking=True)
    done = threading.Event()

    def settle() -> None:
        nvme_tier.wait(a)
        nvme_tier.wait(b)
        torch.cuda.synchronize()
        done.set()

    threading.Thread(target=settle, daemon=True).start()
    assert done.wait(120), "engine A's reload and engine B's offload wait for each other"
    slow.remove()
    b.reload_states()
    train(a, 1)
    train(b, 1)
    nvme_tier.detach(a)
    nvme_tier.detach(b)
