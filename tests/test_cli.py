"""The command line: every command once as a user runs it (a subprocess), variants in-process.

The demo runs for real (two ZeRO-3 engines, zarr backend, every reload compared byte for byte).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvme_tier import cli
from nvme_tier.storage.manifest import OwnerInfo, WriterDirectory
from nvme_tier.storage.stale_writers import scan_writers

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m nvme_tier ARGS`` from the repository root, as a user would type it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)  # the demo must set its own rendezvous defaults
    return subprocess.run(
        [sys.executable, "-m", "nvme_tier", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_writer(root: Path, *, stale: bool, committed: bool, payload: int = 0, label: str = "") -> Path:
    """A writer directory as an engine leaves it; ``stale`` fakes a dead (recycled-pid) owner."""
    owner = OwnerInfo.current(rank=1 if stale else 0, label=label)
    if stale:
        owner = dataclasses.replace(owner, pid_start=1.0)  # our pid, another process's start time
    d = WriterDirectory(str(root), owner)
    d.create()
    if payload:
        fd = d.open("optim_states.0.bin", write=True)
        os.write(fd, b"\x01" * payload)
        os.close(fd)
    if committed:
        d.commit_manifest({})
    if stale:
        d._close_fds()  # a dead writer's flock went with its process
    return Path(d.path)


@pytest.fixture
def writers(tmp_path) -> tuple[Path, Path, Path]:
    root = tmp_path / "offload"
    stale = make_writer(root, stale=True, committed=True, payload=3000, label="Actor")
    live = make_writer(root, stale=False, committed=False, label="Critic")
    return root, stale, live


# -- demo ----------------------------------------------------------------------------------------
def test_demo_is_bit_exact_and_cleans_up(tmp_path):
    path = tmp_path / "demo"
    proc = run_cli(
        "demo", "--path", str(path), "--backend", "zarr", "--steps", "1", "--rounds", "2",
        "--width", "128", "--depth", "1", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "backend zarr" in out
    assert out.count(", bit-exact") == 5 and "MISMATCH" not in out
    assert "OK: all 5 reloads bit-exact" in out
    assert "optim_states            nvme" in out  # the status table
    assert "GB/s" in out
    assert "built successfully" not in out  # DeepSpeed's shm_comm print, cached or not
    assert list(scan_writers(str(path))) == []  # released at the end


def test_demo_bad_arguments_exit_2():
    proc = run_cli("demo", "--steps", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "nvme-tier demo: error: --steps and --rounds must be at least 1"
    )


# -- check ---------------------------------------------------------------------------------------
def test_check_subprocess(tmp_path):
    proc = run_cli("check", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("deepspeed", "libaio / async_io", "pinned memory (ulimit -l)", "O_DIRECT", "free space"):
        assert name in proc.stdout
    assert "backend 'auto'" in proc.stdout


def test_check_json_and_failures(tmp_path, capsys):
    assert cli.main(["check", "--json", "--path", str(tmp_path / "not yet")]) == 0
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert "does not exist yet: attach creates it" in checks["path"]["detail"]
    assert not (tmp_path / "not yet").exists()  # made for the probes as attach would, then removed
    assert checks["deepspeed"]["level"] == "ok"
    assert checks["backend 'auto'"]["detail"].split()[0] in ("aio", "zarr")

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["check", "--path", str(a_file)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] path" in out
    assert "fix: point the path at a directory" in out.split("[FAIL] path", 1)[1]


@pytest.mark.parametrize(
    ("where", "culprit"),
    [
        ("missing/parent/leaf", "does not exist"),  # attach creates only the last level
        ("/proc/nvme_tier_x", "/proc/nvme_tier_x"),  # a FAIL row, not a usage error
    ],
)
def test_check_fails_where_attach_refuses_with_a_fix(tmp_path, capsys, where, culprit):
    path = where if where.startswith("/") else str(tmp_path / where)
    assert cli.main(["check", "--path", path]) == 1
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("[FAIL]")]
    assert row.split()[1] == "path" and culprit in row, out
    assert out.splitlines()[out.splitlines().index(row) + 1].strip().startswith("fix: "), out
    assert not (tmp_path / "missing").exists()


def test_check_config_without_a_path_for_nvme_fails(tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"offload_states": {"device": "nvme"}}))
    assert cli.main(["check", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] offload_states" in out and "offload_states.path is required" in out
    assert "fix: set offload_states.path" in out


def test_check_names_a_misspelled_block(tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"offload_state": {"path": str(tmp_path)}}))
    assert cli.main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no 'offload_states' block" in err and "'offload_state'" in err


@pytest.mark.parametrize("command", ["check", "status"])
def test_json_output_is_only_json_whatever_deepspeed_logs(tmp_path, command):
    """DeepSpeed's accelerator warning goes to stdout through its logger at the first get_accelerator()."""
    args = (
        ["check", "--json", "--path", str(tmp_path)]
        if command == "check"
        else ["status", "--json", str(tmp_path)]
    )
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    json.loads(proc.stdout)  # nothing else on stdout


def test_demo_path_follows_attach_rule(tmp_path, capsys):
    """demo --path creates only the last level, as attach does (a missing parent is a typo)."""
    target = tmp_path / "no" / "such" / "dir"
    assert cli.main(["demo", "--path", str(target), "--backend", "zarr"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_check_config_block(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"offload_states": {"path": str(tmp_path), "backend": "zarr"}}))
    assert cli.main(["check", "--config", str(good)]) == 0
    assert "backend 'zarr'" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"offload_states": {"path": str(tmp_path), "bakend": "zarr"}}))
    assert cli.main(["check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1  # one line, naming the key
    assert "offload_states.bakend: unknown key" in err


def test_every_warn_and_fail_row_has_a_fix():
    """quickstart promises a `fix:` line under every [WARN]/[FAIL]: each such Check(...) has a hint."""
    import ast

    tree = ast.parse((REPO / "nvme_tier" / "checks.py").read_text())
    rows = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", "") == "Check"
        and len(node.args) >= 2
        and getattr(node.args[1], "id", "") in ("WARN", "FAIL")
    ]
    assert len(rows) >= 10
    for row in rows:
        assert len(row.args) + len(row.keywords) >= 4, f"checks.py line {row.lineno}: no fix"


SHM = Path("/dev/shm")


@pytest.mark.skipif(
    not (SHM.is_dir() and os.access(SHM, os.W_OK)), reason="no writable /dev/shm (tmpfs) here"
)
def test_check_warns_when_the_path_is_ram(tmp_path):
    """tmpfs takes O_DIRECT on new kernels; the report must still say it is RAM, not a disk."""
    proc = run_cli("check", "--path", str(SHM / f"nvme_tier_check_{os.getpid()}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # a warning, not a failure
    line = next(x for x in proc.stdout.splitlines() if " filesystem " in x)
    assert line.startswith("[WARN]") and "tmpfs at /dev/shm" in line and "RAM, not a disk" in line
    assert "all checks passed" not in proc.stdout


def test_check_names_filesystem_and_block_device(tmp_path, capsys):
    from nvme_tier.mounts import block_device_of, mount_of

    assert cli.main(["check", "--json", "--path", str(tmp_path)]) == 0
    found = {c["name"]: c for c in json.loads(capsys.readouterr().out)}["filesystem"]
    mount = mount_of(str(tmp_path))
    assert f"{mount.fs_type} at {mount.mount_point}" in found["detail"]
    device = block_device_of(str(tmp_path))
    if device is not None:
        assert device.device in found["detail"]


@pytest.mark.parametrize(
    "fs_type, level",
    [("tmpfs", "warn"), ("ramfs", "warn"), ("overlay", "warn"), ("nfs4", "warn"), ("xfs", "ok")],
)
def test_check_filesystem_verdict_by_type(monkeypatch, tmp_path, fs_type, level):
    from nvme_tier import checks, mounts

    monkeypatch.setattr(mounts, "mount_of", lambda _p: mounts.MountInfo("/x", fs_type, "src"))
    (found,) = checks.check_filesystem(str(tmp_path))
    assert found.level == level and found.detail.startswith(f"{fs_type} at /x (source src)")
    assert (level == "ok") == (found.hint == "")


def test_mountinfo_parsing_unescapes_and_takes_the_innermost_mount(monkeypatch, tmp_path):
    from nvme_tier import mounts

    inner = tmp_path / "with space"
    inner.mkdir()
    text = "\n".join(
        [
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
            f"30 27 0:27 / {str(inner).replace(' ', chr(92) + '040')} rw shared:1 - tmpfs tmpfs rw",
            "31 27 0:28 / /elsewhere rw - xfs /dev/nvme0n1 rw",
        ]
    )
    monkeypatch.setattr(mounts, "_read_mountinfo", lambda: text)
    assert mounts.mount_of(str(inner / "not yet" / "deeper")) == mounts.MountInfo(
        str(inner), "tmpfs", "tmpfs"
    )
    assert mounts.mount_of(str(tmp_path)).fs_type == "ext4"
    assert mounts.is_ram_backed("tmpfs") and not mounts.is_ram_backed("ext4")


def test_memlock_warning_names_the_fix(monkeypatch):
    from nvme_tier import checks
    from nvme_tier.storage import aio_handles

    monkeypatch.setattr(checks.resource, "getrlimit", lambda _r: (64 << 10, 64 << 10))
    monkeypatch.setattr(aio_handles, "has_cap_ipc_lock", lambda: False)
    (found,) = checks.check_memlock(512 << 20, cuda=False)
    assert found.level == checks.WARN and "64.00 KiB" in found.detail and "ulimit -l" in found.hint
    (found,) = checks.check_memlock(32 << 10, cuda=False)
    assert found.level == checks.OK
    (found,) = checks.check_memlock(512 << 20, cuda=True)
    assert found.level == checks.OK


# -- build-ops -----------------------------------------------------------------------------------
def test_build_ops_list_names_each_op_and_builds_nothing(tmp_path):
    cache = tmp_path / "torch_extensions"
    proc = run_cli("build-ops", "--list", env={"TORCH_EXTENSIONS_DIR": str(cache)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"JIT builds cached in {cache}" in proc.stdout
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.startswith("  ")}
    assert "fused_adam" in rows and all("not built" in r or "skipped" in r for r in rows.values()), rows
    assert not cache.exists() or not any(cache.rglob("*.so"))  # nothing compiled
    assert "building DeepSpeed" not in proc.stderr


def test_build_ops_builds_or_finds_the_op_and_times_it():
    """fused_adam: cached after the suite's first engine (a first run here compiles it, minutes)."""
    proc = run_cli("build-ops", "--ops", "fused_adam", timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if line.strip().startswith("fused_adam")]
    verdict, seconds = row.split()[1], float(row.split()[2])
    assert verdict in ("built", "cached", "prebuilt") and seconds >= 0
    assert ("building DeepSpeed fused_adam" in proc.stderr) == (verdict == "built")


def test_build_ops_config_picks_the_optimizer_op(tmp_path):
    cfg = tmp_path / "ds.json"
    offload = {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    cfg.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": offload}))
    proc = run_cli("build-ops", "--list", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu_adam" in proc.stdout and "fused_adam" not in proc.stdout and "async_io" not in proc.stdout


# A torch JIT build killed mid-compile: FileBaton's lock file stays, and no process holds it.
KILLED_BUILD = """
import os, signal, sys
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
os.kill(os.getpid(), signal.SIGKILL)
"""


def leftover_lock(extensions: Path, op: str) -> Path:
    lock = extensions / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", KILLED_BUILD, str(lock)], timeout=120, check=False)
    assert lock.exists()
    return lock


def test_leftover_build_lock_is_named_and_fixed_never_waited_for(tmp_path):
    """torch would wait for the lock forever (fused_adam is not built in this empty cache, so
    nothing compiles either way): build-ops and check name it, build-ops --fix removes it."""
    extensions = tmp_path / "torch_extensions"
    lock = leftover_lock(extensions, "fused_adam")
    env = {"TORCH_EXTENSIONS_DIR": str(extensions)}

    proc = run_cli("build-ops", "--ops", "fused_adam", env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"leftover build lock {lock}" in proc.stdout and "build-ops --fix" in proc.stdout
    assert "FAILED" in proc.stdout and str(lock) in proc.stdout.split("FAILED", 1)[1]

    proc = run_cli("check", env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if "build lock" in line]
    assert row.startswith("[FAIL]") and str(lock) in row
    assert "build-ops --fix" in proc.stdout

    proc = run_cli("build-ops", "--list", "--fix", env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"removed leftover build lock {lock}" in proc.stdout and not lock.exists()


def test_a_live_build_lock_is_not_left_over(tmp_path):
    from torch.utils.file_baton import FileBaton

    from nvme_tier.deepspeed.build_watch import leftover_locks, lock_holders

    lock = tmp_path / "async_io" / "lock"
    lock.parent.mkdir()
    baton = FileBaton(str(lock))
    assert baton.try_acquire()
    try:
        assert lock_holders(str(lock)) == [os.getpid()]
        assert leftover_locks(str(tmp_path)) == []
    finally:
        baton.release()


def test_build_ops_says_it_is_still_building(monkeypatch, capsys):
    """A compile prints nothing for minutes: build-ops prints the elapsed time every PROGRESS_EVERY_S."""
    import time

    from nvme_tier.deepspeed import ops

    class SlowBuilder:
        name = "fused_adam"
        _loaded_ops: dict = {}

        def load(self, verbose=False):
            time.sleep(1.0)

    monkeypatch.setattr(ops, "PROGRESS_EVERY_S", 0.2)
    monkeypatch.setattr(ops, "builder_of", lambda name: SlowBuilder())
    monkeypatch.setattr(ops, "op_state", lambda builder: ops.CACHED)
    assert cli.main(["build-ops", "--ops", "fused_adam"]) == 0
    ticks = [line for line in capsys.readouterr().out.splitlines() if "still building" in line]
    assert len(ticks) >= 3 and ticks[0].split()[0] == "fused_adam", ticks
    assert ticks[0].split()[-2] == "0"  # "0 s": whole seconds elapsed


# -- status / clean ------------------------------------------------------------------------------
def test_status_subprocess(writers):
    root, stale, live = writers
    proc = run_cli("status", str(root))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("ntier-")}
    assert set(lines) == {stale.name, live.name}
    assert (
        " stale " in lines[stale.name] and "Actor" in lines[stale.name] and lines[stale.name].endswith("yes")
    )
    assert " live " in lines[live.name] and "Critic" in lines[live.name] and lines[live.name].endswith("no")
    assert f"nvme-tier clean {root}" in proc.stdout


def test_status_json_empty_and_missing(writers, tmp_path, capsys):
    root, stale, _live = writers
    assert cli.main(["status", "--json", str(root)]) == 0
    rows = {r["dir"]: r for r in json.loads(capsys.readouterr().out)["writers"]}
    assert rows[stale.name]["state"] == "stale" and rows[stale.name]["committed"] is True
    assert rows[stale.name]["bytes"] >= 3000 and rows[stale.name]["rank"] == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["status", str(empty)]) == 0
    assert "no nvme_tier writer directories" in capsys.readouterr().out

    assert cli.main(["status", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_clean_subprocess_removes_only_stale(writers):
    root, stale, live = writers
    proc = run_cli("clean", str(root))
    assert proc.returncode == 0, proc.stderr
    assert f"removed {stale.name} (stale" in proc.stdout
    assert not stale.exists() and live.exists()


def test_clean_dry_run_and_all(writers, capsys):
    root, stale, live = writers
    assert cli.main(["clean", "--dry-run", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"would remove {stale.name}" in out and live.name not in out
    assert stale.exists() and live.exists()

    assert cli.main(["clean", "--all", str(root)]) == 0
    captured = capsys.readouterr()
    assert "removed 2 writer dirs" in captured.out and "live writers" in captured.err
    assert not stale.exists() and not live.exists()


# -- bench ---------------------------------------------------------------------------------------
def test_bench_subprocess(tmp_path):
    proc = run_cli(
        "bench", "--size-gb", "0.002", "--methods", "zarr_backend", "pinned_copy",
        env={"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "zarr_backend" in proc.stdout and "pinned_copy" in proc.stdout
    assert os.listdir(tmp_path) == []  # the temporary scratch directory is gone


def test_bench_help_shows_defaults_not_required(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nvme-tier bench")
    assert "required" not in out
    assert "--size-gb SIZE_GB" in out and "default 0.25" in out and "temporary directory" in out


def test_bench_help_explains_every_column(capsys):
    from nvme_tier.bench.swap_bandwidth import HEADER

    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for column in HEADER:
        assert f"  {column}  " in out or f"  {column}:" in out, column
    docs = (REPO / "docs" / "performance.md").read_text()
    for column in HEADER:
        assert f"`{column}`" in docs, column


def test_bench_times_rounds_after_an_untimed_warm_up(tmp_path, monkeypatch, capsys):
    """Set-up (staging, handles, first file allocation) and one warm-up round run before the timed
    rounds; their time is reported apart (setup_s)."""
    from nvme_tier.bench import swap_bandwidth, swap_methods

    writes = []
    real_write = swap_methods.PinnedCopy.write
    monkeypatch.setattr(swap_methods.PinnedCopy, "write", lambda self: (writes.append(1), real_write(self)))
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--size-gb", "0.002", "--methods", "pinned_copy", "--repeats", "1",
                     "--path", str(tmp_path / "scratch"), "--json", str(out)]) == 0  # fmt: skip
    method = json.loads(out.read_text())["methods"]["pinned_copy"]
    assert len(method["write_s"]) == 1 and len(writes) == 2
    assert method["setup_s"] > 0
    assert "setup s" in capsys.readouterr().out
    assert swap_bandwidth.HEADER[-1] == "ok"


def test_bench_script_is_a_thin_wrapper_around_the_package():
    """benchmarks/swap_bandwidth.py runs the packaged module (one copy of the code)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "swap_bandwidth.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--size-gb" in proc.stdout
    assert len((REPO / "benchmarks" / "swap_bandwidth.py").read_text().splitlines()) < 40


# -- docs-config and the parser ------------------------------------------------------------------
def test_docs_config_subprocess():
    proc = run_cli("docs-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == cli.render_config_reference()


def test_docs_config_check_detects_drift(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(cli.render_config_reference() + "a hand edit\n")
    assert cli.main(["docs-config", "--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().out


def test_docs_config_check_never_advises_overwriting_another_file(capsys):
    """``--check README.md`` used to advise ``docs-config > README.md``, which destroys the README."""
    readme = REPO / "README.md"
    before = readme.read_text()
    assert cli.main(["docs-config", "--check", str(readme)]) == 2
    captured = capsys.readouterr()
    assert "> " not in captured.out + captured.err
    assert "not a generated configuration reference" in captured.err
    assert readme.read_text() == before


@pytest.mark.parametrize("command", ["check", "build-ops", "status", "clean", "demo", "docs-config"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: nvme-tier" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["frobnicate"], ["status"], ["check", "--bogus"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2, argv
    capsys.readouterr()


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'nvme-tier = "nvme_tier.cli:main"' in text


def test_packaging_keeps_an_installed_torch_and_states_the_python_zarr_needs():
    """A lower bound only (pip's only-if-needed strategy keeps any torch >= it); zarr 3 needs 3.11."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert [s.operator for s in reqs["torch"].specifier] == [">="]
    assert not reqs["torch"].url and not reqs["torch"].marker
    assert any(s.operator == ">=" and s.version.startswith("3") for s in reqs["zarr"].specifier)
    assert project["requires-python"] == ">=3.11"
