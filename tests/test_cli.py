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
from nvme_tier.errors import ConfigError
from nvme_tier.storage.manifest import OwnerInfo, WriterDirectory, scan_writers

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m nvme_tier ARGS`` from the repository root, as a user would type it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
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
    assert "would be created" in checks["path"]["detail"]
    assert checks["deepspeed"]["level"] == "ok"
    assert checks["backend 'auto'"]["detail"].split()[0] in ("aio", "zarr")

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["check", "--path", str(a_file)]) == 1
    assert "[FAIL] path" in capsys.readouterr().out


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


def test_memlock_warning_names_the_fix(monkeypatch):
    from nvme_tier import checks

    monkeypatch.setattr(checks.resource, "getrlimit", lambda _r: (64 << 10, 64 << 10))
    monkeypatch.setattr(checks, "_has_cap_ipc_lock", lambda: False)
    (found,) = checks.check_memlock(512 << 20, cuda=False)
    assert found.level == checks.WARN and "64.00 KiB" in found.detail and "ulimit -l" in found.hint
    (found,) = checks.check_memlock(32 << 10, cuda=False)
    assert found.level == checks.OK
    (found,) = checks.check_memlock(512 << 20, cuda=True)
    assert found.level == checks.OK


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
@pytest.mark.skipif(
    not cli.BENCH_SCRIPT.is_file(), reason="benchmarks/swap_bandwidth.py not in this checkout"
)
def test_bench_subprocess(tmp_path):
    proc = run_cli(
        "bench", "--size-gb", "0.002", "--methods", "zarr_backend", "pinned_copy",
        "--scratch-root", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "zarr_backend" in proc.stdout and "pinned_copy" in proc.stdout
    assert os.listdir(tmp_path) == []  # the temporary scratch directory is gone


def test_bench_missing_script_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="ships with the source checkout"):
        cli.load_bench(tmp_path / "swap_bandwidth.py")


# -- docs-config and the parser ------------------------------------------------------------------
def test_docs_config_subprocess():
    proc = run_cli("docs-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == cli.render_config_reference()


def test_docs_config_check_detects_drift(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n")
    assert cli.main(["docs-config", "--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["check", "status", "clean", "demo", "docs-config"])
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
