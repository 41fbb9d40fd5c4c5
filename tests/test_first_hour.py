"""What a new user meets in the first hour: where the offload path really is, DeepSpeed's noise."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_engine, requires_aio, run_child, train

import nvme_tier
from nvme_tier import mounts
from nvme_tier.deepspeed import ops

# (file name, function) of every nvme_tier function: how DeepSpeed's log format names a code line.
NVME_TIER_FUNCTIONS = {
    (path.name, name)
    for path in Path(nvme_tier.__file__).parent.rglob("*.py")
    for name in re.findall(r"^\s*def (\w+)", path.read_text(), re.M)
}

SHM = Path("/dev/shm")
requires_shm = pytest.mark.skipif(
    not (SHM.is_dir() and os.access(SHM, os.W_OK)), reason="no writable /dev/shm (tmpfs) here"
)


@pytest.fixture
def shm_path():
    path = SHM / f"nvme_tier_test_{os.getpid()}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def attach_and_cycle_twice(engine) -> None:
    """Attach, train a step, then offload and reload twice: what a first hour's logs come from."""
    nvme_tier.attach(engine)
    train(engine, 1)
    for _ in range(2):
        engine.offload_states()
        engine.reload_states()


@requires_shm
def test_offload_path_on_tmpfs_is_logged_once(shm_path, monkeypatch, caplog):
    monkeypatch.setattr(mounts, "_described_paths", set())
    engines = [make_engine(2, shm_path, backend="zarr") for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="nvme_tier"):
        for engine in engines:
            attach_and_cycle_twice(engine)
            nvme_tier.release(engine)
    warned = [r.getMessage() for r in caplog.records if "RAM, not a disk" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "tmpfs at /dev/shm" in warned[0] and str(shm_path) in warned[0]


# -- DeepSpeed op builds ---------------------------------------------------------------------------
class FakeBuilder:
    """Stands in for a DeepSpeed OpBuilder: load() 'compiles' by writing the .so where torch would."""

    _loaded_ops: dict = {}

    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = root
        self.loads = 0

    def load(self, verbose: bool = False):
        self.loads += 1
        (self.root / self.name).mkdir(parents=True, exist_ok=True)
        (self.root / self.name / f"{self.name}.so").write_bytes(b"")
        return object()


def test_op_build_is_announced_only_when_it_compiles(tmp_path, monkeypatch, caplog):
    from nvme_tier.deepspeed import ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder = FakeBuilder("nvme_tier_fake_op", tmp_path)
    with caplog.at_level(logging.WARNING, logger="nvme_tier"):
        assert ops.op_state(builder) == ops.NOT_BUILT
        ops.load_op(builder)
        assert ops.op_state(builder) == ops.CACHED
        ops.load_op(builder)  # cached: silent
    lines = [r.getMessage() for r in caplog.records]
    assert builder.loads == 2
    assert len(lines) == 2, lines  # "building ..." and "built ... in N s", once
    assert lines[0].startswith("nvme_tier: building DeepSpeed nvme_tier_fake_op (one-time, minutes")
    assert str(tmp_path / "nvme_tier_fake_op") in lines[0] and "nvme-tier build-ops" in lines[0]
    assert lines[1].startswith("nvme_tier: built DeepSpeed nvme_tier_fake_op in ")


def test_ops_a_config_needs():
    from deepspeed.accelerator import get_accelerator

    from nvme_tier.deepspeed.ops import ops_for_config

    def names(cfg, aio=True):
        return [op.name for op in ops_for_config(cfg, aio) if op.name != "deepspeed_shm_comm"]

    nvme = {"offload_states": {"path": "/x"}}
    assert names(None) == ["fused_adam", "async_io"]  # the demo's
    assert names(None, aio=False) == ["fused_adam"]
    assert names({"optimizer": {"type": "AdamW"}, **nvme}) == ["fused_adam", "async_io"]
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert names({"optimizer": {"type": "Adam"}, **offload}) == ["cpu_adam"]
    assert names({"optimizer": {"type": "Adam", "params": {"torch_adam": True}}}) == []
    assert names({"offload_states": {"device": "cpu"}}) == []
    assert names({"offload_states": {"path": "/x", "backend": "zarr"}}) == []
    on_cpu = get_accelerator().device_name() == "cpu"
    assert any(op.name == "deepspeed_shm_comm" for op in ops_for_config({}, True)) == on_cpu


def test_deepspeed_endurance_warning_is_silenced(monkeypatch, caplog):
    """nvme_tier says the TBW advice itself (once per filesystem and user); DeepSpeed's copy, logged
    from inside the first aio write and attributed to nvme_tier's code line, stays quiet."""
    import deepspeed.utils

    from nvme_tier.deepspeed import ops

    monkeypatch.delattr(deepspeed.utils, ops._DS_WRITE_WARNING_MARKER, raising=False)
    with caplog.at_level(logging.WARNING):
        ops.silence_deepspeed_write_warning()
    assert caplog.records == []
    assert getattr(deepspeed.utils, ops._DS_WRITE_WARNING_MARKER) is True


def test_backend_line_per_engine_and_endurance_warning_once_per_user(tmp_path, monkeypatch, caplog):
    """At the default level (WARNING): which backend each engine uses, once; the SSD endurance
    advice once per filesystem for this user (a marker in the user's cache dir), not per process."""
    from nvme_tier.storage import site

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    engines = [make_engine(2, tmp_path / name, backend="zarr") for name in ("a", "b")]
    with caplog.at_level(logging.WARNING, logger="nvme_tier"):
        for engine in engines:
            attach_and_cycle_twice(engine)
        monkeypatch.setattr(site, "_warned_here", set())  # as a new process would start
        site.warn_write_endurance_once(str(tmp_path / "c"))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("uses backend zarr" in m for m in messages) == 2, messages
    assert sum("TBW" in m for m in messages) == 1, messages
    for engine in engines:
        nvme_tier.release(engine)


SCRIPT_ONE_AIO_OFFLOAD = """
import sys
sys.path.insert(0, {tests!r})
import nvme_tier
from helpers import make_engine, train
engine = make_engine(2, {path!r}, backend="aio")
nvme_tier.attach(engine)
train(engine, 1)
engine.offload_states()
engine.reload_states()
nvme_tier.release(engine)
print("done")
"""


@requires_aio
def test_no_deepspeed_warning_is_attributed_to_nvme_tier_code(tmp_path):
    """DeepSpeed logs its TBW advice from inside the first aio write; its logger names the nearest
    Python frame, nvme_tier's aio_async_pwrite (deepspeed/aio_binding.py). A fresh process: the
    advice is once per process."""
    script = SCRIPT_ONE_AIO_OFFLOAD.format(tests=str(Path(__file__).parent), path=str(tmp_path / "off"))
    # the TBW advice is once per user: a cache of its own (the built ops stay where they are: a
    # fresh XDG_CACHE_HOME alone made the child compile async_io again, minutes on 2 cores)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "TORCH_EXTENSIONS_DIR": ops.extensions_dir()}
    proc = run_child(script, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "done" in proc.stdout, out
    ds_lines = re.findall(r"^\[[^]]*\] \[\w+\] \[(\S+?\.py):\d+:(\w+)\].*$", out, re.M)
    ours = [line for line in ds_lines if line in NVME_TIER_FUNCTIONS]
    assert ours == [], ours
    assert out.count("TBW") == 1 and "nvme_tier: offloads write every changed state" in out


KILLED_BUILD = """
import os, signal, sys
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""

FIRST_AIO_LOAD = """
from nvme_tier.config import AioSettings
from nvme_tier.errors import BuildLockError
from nvme_tier import default_runtime
try:
    default_runtime().aio_handles.take(AioSettings())
except BuildLockError as exc:
    print("refused:", exc)
"""


@requires_aio
def test_first_aio_load_refuses_a_leftover_build_lock(tmp_path):
    """The first NVMe offload loads async_io (the handle pool's take -> load_aio_op); a killed build's lock
    (torch's FileBaton) would make it wait forever: a typed error names the file and the fix.
    Both op directories DeepSpeed's CPU builder loads hold one, so nothing compiles either way."""
    extensions = tmp_path / "torch_extensions"
    for op in ("pin_memory", "async_io"):
        (extensions / op).mkdir(parents=True)
        subprocess.run([sys.executable, "-c", KILLED_BUILD, str(extensions / op / "lock")], timeout=120)
    proc = run_child(FIRST_AIO_LOAD, timeout=120, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused:" in proc.stdout and str(extensions / "pin_memory" / "lock") in proc.stdout
    assert "nvme-tier build-ops --fix" in proc.stdout
