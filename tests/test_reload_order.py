"""A non-blocking reload is ordered before the caller's later work, as upstream's stream-ordered one.

The NVMe reads finish on nvme_tier's threads. Read right after ``reload_states(non_blocking=True)``
(OpenRLHF's ``reload_deepspeed_states``), 74-86 % of the optimizer-state elements were still
unread, and an edit made then was overwritten by the read. On a GPU the caller's stream now waits
for the reads (the CPU stays free); on the CPU accelerator, where no stream can order them, the
reads of NVMe-placed states finish before the call returns.
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


@pytest.mark.parametrize("stage", STAGES)
def test_states_read_and_edited_right_after_openrlhf_reload(stage, offload_dir):
    engine = make_engine(stage, offload_dir, backend="zarr", honor_call_device=False)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    states = optimizer_states(engine)
    before = [t.clone() for t in states]
    p = engine.module.l2.weight
    moment = safe_get_full_optimizer_state(p, "exp_avg").clone()
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
    states[0].copy_(before[0])
    openrlhf_offload(engine)
    slow = SlowReads(controller)
    openrlhf_reload(engine)
    assert torch.equal(safe_get_full_optimizer_state(p, "exp_avg"), moment)  # through the accessor
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
def test_gpu_caller_stream_waits_for_nvme_reads_cpu_stays_free(offload_dir):
    """The call returns while the reads are still held back; a kernel queued after it, .cpu() and
    .item() see the reloaded bytes; no nvme_tier.wait."""
    engine = make_engine(2, offload_dir, backend="zarr", width=512)
    controller = nvme_tier.attach(engine)
    train(engine, 2)
    states = optimizer_states(engine)
    before = [t.clone() for t in states]
    engine.offload_states()
    engine.reload_states()  # warm-up: backend, staging, the gate's flag
    engine.offload_states()
    t = time.perf_counter()
    engine.reload_states(non_blocking=True)
    plain = time.perf_counter() - t
    nvme_tier.wait(engine)
    engine.offload_states()
    slow = SlowReads(controller, delay=2.0)
    t = time.perf_counter()
    engine.reload_states(non_blocking=True)
    returned = time.perf_counter() - t
    copies = [s.clone() for s in states]  # kernels on the current stream, queued behind the reads
    sums = [s.double().sum() for s in states]
    assert controller.phase is OffloadPhase.reloading, "the reads had finished: nothing was ordered"
    assert returned < 1.0 and returned < plain + 0.5, (returned, plain)  # the CPU was not blocked
    for a, b, total in zip(before, copies, sums, strict=True):
        assert torch.equal(a, b.cpu())
        assert total.item() == a.double().sum().item()
    slow.remove()
    train(engine, 1)
    nvme_tier.detach(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_one_engine_offloads_while_another_reloads_on_the_same_stream(tmp_path):
    """Engine A's non-blocking reload gates the stream; engine B's offload queued behind it on that
    stream waits for A, and A's reads (queued chunk by chunk on A's own submit stream) never wait
    for B: both finish (a submit stream shared by the engines deadlocked here)."""
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
