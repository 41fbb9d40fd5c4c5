"""Reading or writing states outside compute while they are offloaded: a clear error or the right bytes.

A freed storage leaves every view into it pointing at unmapped memory: DeepSpeed's ``safe_*``
accessors (ZeRO-1/2 fragments at an offset into it) and ``out.copy_(module.weight)`` (a ZeRO-1/2
parameter is such a view) killed the process with SIGSEGV, and a ``state_dict()`` taken then was
saved as a file that cannot be loaded. Each access runs in a child process, so a segfault fails the
test instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from deepspeed.utils import safe_get_full_fp32_param
from helpers import make_engine, train

import nvme_tier

TESTS = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    from helpers import make_engine, train
    import deepspeed.utils as du
    import nvme_tier

    engine = make_engine({stage}, {path!r}, backend="zarr", **{offload!r})
    nvme_tier.attach(engine)
    train(engine, 2)
    p = engine.module.l2.weight
    weight = p.detach().clone()
    full = {{"fp32": du.safe_get_full_fp32_param(p).clone(),
             "exp_avg": du.safe_get_full_optimizer_state(p, "exp_avg").clone()}}
    engine.offload_states()

    def copy_out():
        out = torch.empty_like(weight)
        out.copy_(p)
        return out

    accesses = {{
        "safe_get_full_fp32_param": lambda: du.safe_get_full_fp32_param(p),
        "safe_get_full_optimizer_state": lambda: du.safe_get_full_optimizer_state(p, "exp_avg"),
        "safe_set_full_fp32_param": lambda: du.safe_set_full_fp32_param(p, full["fp32"]),
        "safe_set_full_optimizer_state": lambda: du.safe_set_full_optimizer_state(p, full["exp_avg"], "exp_avg"),
        "module.state_dict": lambda: engine.module.state_dict(),
        "engine.module_state_dict": lambda: engine.module_state_dict(),
        "optimizer.state_dict": lambda: engine.optimizer.state_dict(),
        "inner optimizer.state_dict": lambda: engine.optimizer.optimizer.state_dict(),
        "out.copy_(weight)": copy_out,
    }}
    for name, access in accesses.items():
        try:
            value = access()
            same = torch.equal(value, weight) if name == "out.copy_(weight)" else None
            print(json.dumps({{"access": name, "returned": True, "same": same}}), flush=True)
        except Exception as exc:
            print(json.dumps({{"access": name, "error": type(exc).__name__, "message": str(exc)}}), flush=True)
    engine.reload_states()
    if {stage} != 3:  # a ZeRO-3 parameter is an empty placeholder outside a gather
        assert torch.equal(p.detach(), weight), "the weights after reload"
    assert torch.equal(du.safe_get_full_fp32_param(p), full["fp32"])
    assert torch.equal(du.safe_get_full_optimizer_state(p, "exp_avg"), full["exp_avg"])
    print(json.dumps({{"access": "after reload", "returned": True}}), flush=True)
    """
)

ACCESSES = [
    "safe_get_full_fp32_param",
    "safe_get_full_optimizer_state",
    "safe_set_full_fp32_param",
    "safe_set_full_optimizer_state",
    "module.state_dict",
    "engine.module_state_dict",
    "optimizer.state_dict",
    "inner optimizer.state_dict",
    "out.copy_(weight)",
    "after reload",
]


def child(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; its own rendezvous port (this process may hold ours)."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def run_child(stage: int, path, offload: dict) -> dict[str, dict]:
    proc = child(CHILD.format(tests=TESTS, stage=stage, path=str(path), offload=offload))
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"access"'):
            entry = json.loads(line)
            results[entry["access"]] = entry
    assert proc.returncode == 0, (
        f"the child died (rc {proc.returncode}) after {list(results)}:\n{proc.stderr[-3000:]}"
    )
    return results


def refused(entry: dict) -> bool:
    return entry.get("error") == "StatesOffloadedError" and "reload_states" in entry["message"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_access_while_offloaded_is_refused_or_right(stage, offload_dir):
    """Default policy: lp_params in pinned host memory, hp_params too, optimizer states on NVMe."""
    results = run_child(stage, offload_dir, {})
    assert list(results) == ACCESSES
    for name in ACCESSES[:8]:
        assert refused(results[name]), (name, results[name])
    copy = results["out.copy_(weight)"]
    if stage == 3:  # a partitioned parameter outside a gather is an empty placeholder, as upstream
        assert copy.get("returned") or copy.get("error") == "RuntimeError", copy
    else:  # a view of its host copy: the right bytes, as upstream (its lp_params are on the CPU)
        assert copy == {"access": "out.copy_(weight)", "returned": True, "same": True}


@pytest.mark.parametrize("stage", [1, 2])
def test_weights_on_nvme_leave_an_empty_stand_in(stage, offload_dir):
    """No host copy to read: each parameter holds an empty tensor meanwhile (never freed memory)."""
    results = run_child(stage, offload_dir, {"policy": {"lp_params": "nvme"}})
    assert list(results) == ACCESSES
    for name in ACCESSES[:8]:
        assert refused(results[name]), (name, results[name])
    assert results["out.copy_(weight)"]["error"] == "RuntimeError"  # a shape mismatch, no segfault


@pytest.mark.parametrize("stage", [2, 3])
def test_detach_removes_the_access_guards(stage, offload_dir):
    engine = make_engine(stage, offload_dir, backend="zarr")
    train(engine, 1)  # DeepSpeed sets some attributes at its first step (0.16.9: ipg_index)
    params = list(engine.module.parameters())
    before = {
        "module_hooks": dict(engine.module._state_dict_pre_hooks),
        "inner_hooks": dict(engine.optimizer.optimizer._optimizer_state_dict_pre_hooks),
        "optimizer": dict(engine.optimizer.__dict__),
        "params": [dict(p.__dict__) for p in params],
    }
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.offload_states()
    engine.reload_states()
    nvme_tier.detach(engine)
    assert dict(engine.module._state_dict_pre_hooks) == before["module_hooks"]
    assert dict(engine.optimizer.optimizer._optimizer_state_dict_pre_hooks) == before["inner_hooks"]
    assert engine.optimizer.__dict__.keys() == before["optimizer"].keys()
    assert all(engine.optimizer.__dict__[k] is v for k, v in before["optimizer"].items() if callable(v))
    for p, attrs in zip(params, before["params"], strict=True):
        assert {k: v for k, v in p.__dict__.items() if callable(v)} == {
            k: v for k, v in attrs.items() if callable(v)
        }
    train(engine, 1)
    assert safe_get_full_fp32_param(params[0]) is not None


RELINKED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import pytest
    from helpers import make_engine, train
    from deepspeed.utils import safe_get_full_optimizer_state
    import nvme_tier

    engine = make_engine(2, {path!r}, backend="zarr")
    nvme_tier.attach(engine)
    train(engine, 1)
    engine.optimizer._link_all_hp_params()  # what load_state_dict does
    engine.optimizer._hp_optimizer_states_linked = False  # linked again at the next step
    train(engine, 1)
    p = engine.module.l1.weight
    engine.offload_states()
    with pytest.raises(nvme_tier.StatesOffloadedError, match="reload_states"):
        safe_get_full_optimizer_state(p, "exp_avg")
    engine.reload_states()
    assert safe_get_full_optimizer_state(p, "exp_avg").isfinite().all()
    nvme_tier.detach(engine)
    """
)


def test_accessors_guarded_again_after_deepspeed_relinks(offload_dir):
    """load_state_dict re-binds each ZeRO-1/2 parameter's accessors: the next offload guards them."""
    proc = child(RELINKED.format(tests=TESTS, path=str(offload_dir)))
    assert proc.returncode == 0, proc.stderr[-3000:]
