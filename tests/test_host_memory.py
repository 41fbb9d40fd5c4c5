"""Host memory: nothing taken at attach, one budget and one staging pool per process, spill to nvme.

Engine tests run several real engines in one process (with Adam and without an optimizer) under a
host budget below their combined host copies; each gets a fresh process budget and staging pool
(the ``fresh_budget`` fixture) so engines left by other tests do not count.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import budget_of_its_own, make_engine, params_of, requires_aio, snapshot, train

import nvme_tier
from nvme_tier import errors, pinned_memory
from nvme_tier.buffers import StateBuffer
from nvme_tier.config import OffloadStatesConfig
from nvme_tier.device_copies import DeviceCopier
from nvme_tier.errors import ConfigError
from nvme_tier.host_budget import HostMemoryBudget
from nvme_tier.host_copies import HostCopies
from nvme_tier.plan import OffloadItem, OffloadPlan
from nvme_tier.policy import EngineFacts, Placement, decide
from nvme_tier.storage.staging import SharedStagingPool
from nvme_tier.tiers import TierMover
from nvme_tier.types import StateKind, Tier
from nvme_tier.units import MiB

HOST_TIERS = ("cpu", "pinned_cpu")
SCRATCH = "contiguous_grad_buffer"


@pytest.fixture
def fresh_budget():
    with budget_of_its_own() as (budget, engines):
        yield budget, nvme_tier.default_runtime().staging, engines


# -- the pure parts ----------------------------------------------------------------------------------
def test_policy_spills_what_does_not_fit_in_priority_order():
    cfg = OffloadStatesConfig.parse({"path": "/tmp/x", "device": "cpu"})
    sizes = {
        StateKind.optim_states: 800,
        StateKind.hp_params: 400,
        StateKind.lp_params: 200,
        StateKind.lp_grads: 200,
    }
    p = decide(cfg, list(sizes), facts=EngineFacts(sizes, 700))
    # lp_params (200) and hp_params (400) keep their host copies; lp_grads (200 > 100 left) and optim spill
    assert p.spilled == {StateKind.lp_grads, StateKind.optim_states}
    assert p.tiers[StateKind.lp_grads] is Tier.nvme and p.tiers[StateKind.hp_params] is Tier.pinned_cpu
    assert decide(cfg, list(sizes), facts=EngineFacts(sizes, None)).spilled == frozenset()
    with pytest.raises(ConfigError, match="host_budget_mb.*path"):
        decide(OffloadStatesConfig.parse({"device": "cpu"}), list(sizes), facts=EngineFacts(sizes, 700))


class Entry:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.freed = False

    def free(self) -> None:
        self.freed = True


def test_budget_evicts_parked_copies_lru_before_refusing():
    budget = HostMemoryBudget()
    owner = Entry(0)
    budget.register(owner, 100, 0)
    old, new = Entry(40), Entry(40)
    for e in (old, new):
        assert budget.reserve(e.nbytes)
        budget.park(e)
    assert budget.available() == 100
    assert budget.reserve(50)  # 80 reserved + 50 > 100: the least recently parked goes
    assert old.freed and not new.freed and budget.reserved == 90
    assert not budget.unpark(old) and budget.unpark(new)
    assert not budget.reserve(20)  # nothing parked is left: refused, nothing changed
    assert budget.reserved == 90
    other = Entry(0)
    budget.register(other, 60, 0)  # two budgets in one process: the smallest applies
    assert budget.limit == 60
    budget.unregister(other)
    assert budget.limit == 100


class Slot:
    def __init__(self, nbytes: int):
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8)
        self.freed = False

    def free(self) -> None:
        self.freed = True


def test_staging_pool_is_shared_fair_and_cannot_deadlock():
    budget = HostMemoryBudget()
    owner = Entry(0)
    budget.register(owner, 8 * MiB, 4 * MiB)
    pool = SharedStagingPool(budget, wait_seconds=30)
    made: list[Slot] = []
    order: list[int] = []
    holding = threading.Lock()

    def make() -> Slot:
        made.append(Slot(MiB))
        return made[-1]

    def user(i: int) -> None:
        for _ in range(5):
            with pool.checkout(owner, "k", 4, MiB, make) as slots:
                assert holding.acquire(blocking=False), "two users held the whole pool at once"
                order.append(i)
                for s in slots:
                    s.buffer.fill_(i)
                time.sleep(0.01)
                assert all(bool((s.buffer == i).all()) for s in slots)
                holding.release()

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert sorted(order) == sorted(list(range(4)) * 5)
    assert len(made) == 4 and pool.allocated_bytes == 4 * MiB == budget.reserved  # reused, charged
    user_obj = Entry(0)
    with pool.checkout(user_obj, "other", 2, 2 * MiB, lambda: Slot(2 * MiB)):
        assert all(s.freed for s in made)  # idle slots of another kind made room within capacity
    pool.leave(user_obj)
    pool.leave(owner)
    assert pool.allocated_bytes == 0 and budget.reserved == 0


def test_staging_pool_serves_a_waiting_read_before_waiting_writes():
    """A read is on the caller's critical path (a reload someone will wait for); a write is the
    background half of an offload: when slots free up, the read goes first."""
    budget = HostMemoryBudget()
    owner = Entry(0)
    budget.register(owner, 8 * MiB, 4 * MiB)
    pool = SharedStagingPool(budget, wait_seconds=30)
    served: list[str] = []
    release_first = threading.Event()
    queued = threading.Semaphore(0)

    def first() -> None:
        with pool.checkout(owner, "k", 4, MiB, lambda: Slot(MiB)):
            queued.release()
            release_first.wait(30)

    def user(name: str, reading: bool) -> None:
        queued.release()
        with pool.checkout(owner, "k", 4, MiB, lambda: Slot(MiB), reading=reading):
            served.append(name)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    queued.acquire(timeout=30)
    for name, reading in (("write-1", False), ("write-2", False), ("read-1", True), ("read-2", True)):
        t = threading.Thread(target=user, args=(name, reading))
        t.start()
        threads.append(t)
        queued.acquire(timeout=30)
        time.sleep(0.05)  # queued (waiting on the pool's condition) before the next one arrives
    release_first.set()
    for t in threads:
        t.join(60)
    assert served == ["read-1", "read-2", "write-1", "write-2"]
    pool.leave(owner)


def test_staging_the_host_budget_cannot_hold_is_a_host_budget_error():
    """Found mid-offload, when a backend asks for staging: the budget's error, not a config error."""
    budget = HostMemoryBudget()
    owner = Entry(0)
    budget.register(owner, 2 * MiB, 4 * MiB)  # several engines: the smallest limit, the largest staging
    pool = SharedStagingPool(budget, wait_seconds=1)
    checkout = pool.checkout(owner, "k", 4, MiB, lambda: Slot(MiB))
    with pytest.raises(errors.HostBudgetError, match="host_budget_mb") as err, checkout:
        pass
    assert not isinstance(err.value, ConfigError) and budget.reserved == 0


def test_staging_held_by_another_engine_past_the_wait_is_a_host_budget_error():
    """Out of staging because another engine holds it: the budget's error (not an I/O error)."""
    budget = HostMemoryBudget()
    owner = Entry(0)
    budget.register(owner, 8 * MiB, 4 * MiB)
    pool = SharedStagingPool(budget, wait_seconds=0.2)
    held = pool.checkout(owner, "k", 4, MiB, lambda: Slot(MiB))
    refused = pytest.raises(errors.HostBudgetError, match="staging buffers other engines hold")
    with held, refused as err, pool.checkout(Entry(0), "k", 4, MiB, lambda: Slot(MiB)):
        pass
    assert not isinstance(err.value, OSError)
    pool.leave(owner)


def test_host_copy_the_budget_refuses_at_claim_is_a_host_budget_error():
    """claim reserves what the placement was told fits: a refusal is the budget's error, not an I/O error."""
    budget = HostMemoryBudget()
    owner = Entry(0)
    budget.register(owner, MiB, 0)
    copies = HostCopies(DeviceCopier(), budget)
    small = StateBuffer.of(StateKind.lp_params, "lp_params.0", torch.zeros(MiB // 2, dtype=torch.uint8))
    large = StateBuffer.of(StateKind.hp_params, "hp_params.0", torch.zeros(2 * MiB, dtype=torch.uint8))
    with pytest.raises(errors.HostBudgetError, match="hp_params.0") as err, budget.transaction() as txn:
        copies.claim([(small, Tier.cpu), (large, Tier.cpu)], txn)
    assert not isinstance(err.value, OSError) and budget.reserved == 0  # the small one's returned


def test_first_pinned_offload_makes_pieces_while_copying(fresh_budget, monkeypatch):
    """The chunked path: new host copies are faulted in and registered piece by piece, in order,
    each stage on its own helper thread, while earlier pieces are copied."""
    budget, _pool, _ = fresh_budget
    monkeypatch.setattr(HostCopies, "lock_piece_bytes", 2 * MiB)
    monkeypatch.setattr(
        pinned_memory, "REGISTER_MIN_BYTES", 0
    )  # CUDA: register this small copy piecewise too
    src = torch.arange(5 * MiB + 123, dtype=torch.int64).to(torch.uint8)
    buf = StateBuffer.of(StateKind.hp_params, "hp_params.0", src)
    expected = src.clone()
    mover = TierMover(lambda: None, budget)
    plan = OffloadPlan(
        Placement({StateKind.hp_params: Tier.pinned_cpu}), (OffloadItem(buf, Tier.pinned_cpu),)
    )
    with budget.transaction() as txn:
        copies = mover.claim(plan, txn)
    assert budget.reserved == buf.nbytes and copies[0].memory is None
    stages: list[tuple[str, int, str]] = []
    for stage in ("populate_piece", "register_piece"):
        real = getattr(pinned_memory.PinnedHostMemory, stage)

        def spy(self, index, *pool, real=real, stage=stage):
            stages.append((stage, index, threading.current_thread().name))
            return real(self, index, *pool)

        monkeypatch.setattr(pinned_memory.PinnedHostMemory, stage, spy)
    job = mover.start_offload(plan, copies)
    placed, stats = mover.finish_offload(job, free_as_written=False)
    assert len(copies[0].memory.pieces) == 3 and copies[0].memory.fully_locked
    for stage, thread in (("populate_piece", "nvme_tier-fault"), ("register_piece", "nvme_tier-lock")):
        assert [i for s, i, _ in stages if s == stage] == [0, 1, 2]
        assert all(name.startswith(thread) for s, _, name in stages if s == stage)
    order = [(stage, i) for stage, i, _ in stages]
    assert all(order.index(("populate_piece", i)) < order.index(("register_piece", i)) for i in range(3))
    assert buf.is_freed and stats.bytes_to_host == buf.nbytes
    assert torch.equal(placed[0].host, expected)
    with mover.reloaded(mover.start_reload(placed, order_callers=True), keep_files=False):
        pass
    assert torch.equal(buf.view, expected)
    assert budget.parked == buf.nbytes  # kept for reuse, evictable
    with budget.transaction() as txn:
        again = mover.claim(plan, txn)
    assert again[0].memory is not None and budget.parked == 0  # the kept copy is reused
    mover.unclaim(again)
    mover.release()
    assert budget.reserved == 0


# -- engines -----------------------------------------------------------------------------------------
def engine_host_bytes(engine) -> int:
    status = nvme_tier.offload_status(engine).values()
    return sum(n for e in status for tier, n in e.bytes_by_tier.items() if tier in HOST_TIERS)


def make_engines(count: int, path, backend: str, budget_mb: int, engines: list) -> list:
    """Mixed: even ones train with Adam, odd ones have no optimizer (reference/reward models)."""
    out = []
    for i in range(count):
        optimizer = "Adam" if i % 2 == 0 else None
        engine = make_engine(
            3, path, optimizer=optimizer, width=1024, seed=i, backend=backend,
            host_budget_mb=budget_mb, staging_budget_mb=2,
        )  # fmt: skip
        nvme_tier.attach(engine)
        engines.append(engine)
        out.append(engine)
    return out


def steps(engine, seed: int) -> list[float]:
    """Adam engines train; engines without an optimizer only run forward (as a reference model)."""
    if _has_optimizer(engine):
        return train(engine, 2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, generator=g).to(engine.device, next(engine.module.parameters()).dtype)
    with torch.no_grad():
        return [engine(x).float().pow(2).mean().item()]


def _has_optimizer(engine) -> bool:
    from nvme_tier.deepspeed.locators import _zero_optimizer

    return _zero_optimizer(engine) is not None


def assert_within_budget(
    engines: list, budget: HostMemoryBudget, pool: SharedStagingPool, limit: int
) -> None:
    held = sum(engine_host_bytes(e) for e in engines) + pool.allocated_bytes
    assert held <= limit, f"host copies + staging {held} B exceed the budget {limit} B"
    assert budget.reserved <= limit


@pytest.mark.parametrize("count,budget_mb", [(2, 6), (4, 12)])
@pytest.mark.parametrize("backend", ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])])
def test_engines_share_one_budget_and_spill_to_nvme(count, budget_mb, backend, offload_dir, fresh_budget):
    budget, pool, made = fresh_budget
    limit = budget_mb * MiB
    engines = make_engines(count, offload_dir, backend, budget_mb, made)
    assert budget.reserved == 0 and pool.allocated_bytes == 0  # attach takes no host memory
    losses = [steps(e, seed=1) for e in engines]
    before = [snapshot(e) for e in engines]
    wanted = 0
    for engine in engines:  # offload all in turn (RLHF: one model computes while the others wait)
        wanted += sum(e.bytes for e in nvme_tier.offload_status(engine).values() if e.state != SCRATCH)
        engine.offload_states()
        assert_within_budget(engines, budget, pool, limit)
    status = [nvme_tier.offload_status(e) for e in engines]
    spilled = [s for st in status for s in st.values() if s.spilled]
    assert spilled and all(s.tier == "nvme" and s["tier"] == "nvme" and s.bytes > 0 for s in spilled)
    assert any(s.tier in HOST_TIERS for st in status for s in st.values())
    assert wanted - sum(s.bytes_by_tier.get("nvme", 0) for st in status for s in st.values()) <= limit
    for engine, snap in zip(engines, before, strict=True):
        engine.reload_states()
        after = snapshot(engine)
        for name, data in snap.items():
            if not name.startswith(SCRATCH):
                assert torch.equal(data, after[name]), f"{name} changed across offload/reload"
    for i, engine in enumerate(engines):
        losses[i] += steps(engine, seed=2)
    # Second cycle, every engine at once (non-blocking): kept copies are reused or evicted for others.
    for engine in engines:
        engine.offload_states(non_blocking=True)
    for engine in engines:
        nvme_tier.wait(engine)
        assert_within_budget(engines, budget, pool, limit)
    for engine in engines:
        engine.reload_states(non_blocking=True)
    for i, engine in enumerate(engines):
        nvme_tier.wait(engine)
        losses[i] += steps(engine, seed=3)
    weights = [params_of(e) if _has_optimizer(e) else [] for e in engines]
    for engine in engines:
        nvme_tier.detach(engine)
    made.clear()
    assert budget.reserved == 0 and pool.allocated_bytes == 0

    # Never-offloaded twins, afterwards, stepped in the same interleaved order: DeepSpeed engines
    # whose steps interleave differ from lone ones even without offload, but reproducibly.
    twins = [
        make_engine(3, None, optimizer="Adam" if i % 2 == 0 else None, width=1024, seed=i)
        for i in range(count)
    ]
    twin_losses = [steps(t, seed=1) for t in twins]
    for seed in (2, 3):
        for i, twin in enumerate(twins):
            twin_losses[i] += steps(twin, seed=seed)
    assert twin_losses == losses
    for i, twin in enumerate(twins):
        for a, b in zip(weights[i], params_of(twin) if weights[i] else [], strict=True):
            assert torch.equal(a, b)


def test_kept_copies_are_evicted_for_another_engine_before_it_spills(offload_dir, fresh_budget):
    budget, _pool, made = fresh_budget
    a, b = (
        make_engine(
            3, offload_dir, width=1024, seed=s, backend="zarr", host_budget_mb=14, staging_budget_mb=2
        )
        for s in (0, 1)
    )
    made += [a, b]
    for engine in (a, b):
        nvme_tier.attach(engine)
        train(engine, 1)
    a.offload_states()
    a.reload_states()
    kept = budget.parked
    # a's pinned copies, kept for its next offload, and the idle staging of the shared pool
    assert kept > 0 and budget.reserved == kept + _pool.allocated_bytes
    b.offload_states()  # room only if a's kept copies go: they are evicted, nothing of b spills
    assert not any(e.spilled for e in nvme_tier.offload_status(b).values())
    assert budget.parked < kept and budget.reserved <= 14 * MiB  # only as much as b needed
    before = snapshot(a)
    a.offload_states()  # now b holds the room: a spills what does not fit
    assert any(e.spilled for e in nvme_tier.offload_status(a).values())
    assert budget.reserved <= 14 * MiB
    a.reload_states()
    after = snapshot(a)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(SCRATCH))
    b.reload_states()
