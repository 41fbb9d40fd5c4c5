"""Environment checks behind ``nvme-tier check``: will nvme_tier run well on this machine and path?

Like DeepSpeed's ``ds_report``, but about what the NVMe tier needs: a supported DeepSpeed, libaio
and the async_io op, a path on a filesystem that takes O_DIRECT, free space, and a page-locked
memory limit (``ulimit -l``) large enough for the staging buffers. Each check says what it found
and, when something is off, the one command or setting that fixes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .config import CONFIG_KEY, OffloadStatesConfig
from .errors import NvmeTierError
from .units import human_bytes

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
LOW_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, the verdict, what was found, how to fix it."""

    name: str
    level: str
    detail: str
    hint: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# -- software ------------------------------------------------------------------------------------
def check_versions() -> Iterator[Check]:
    import torch

    from . import __version__

    yield Check("nvme_tier", INFO, __version__)
    yield Check("python", INFO, platform.python_version())
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"
    yield Check("torch", INFO, f"{torch.__version__}{cuda}")
    from .deepspeed.version import SUPPORTED_DEEPSPEED, check_deepspeed_version, installed_version

    try:
        ds_version = installed_version()
    except ImportError as exc:
        yield Check("deepspeed", FAIL, f"not importable ({exc})", "pip install 'deepspeed>=0.16.9,<0.20'")
        return
    from .errors import UnsupportedEngineError

    try:
        check_deepspeed_version(ds_version)
        yield Check("deepspeed", OK, f"{ds_version} (supported: {','.join(SUPPORTED_DEEPSPEED)})")
    except UnsupportedEngineError as exc:
        yield Check("deepspeed", FAIL, ds_version, str(exc))
    for mod in ("zarr", "pydantic"):
        try:
            version = __import__(mod).__version__
        except ImportError as exc:
            yield Check(mod, FAIL, f"not importable ({exc})", f"pip install {mod}")
        else:
            yield Check(mod, OK, version)


def check_accelerator() -> Iterator[Check]:
    try:
        from .deepspeed.accelerator import accelerator_facts

        name, comm, count = accelerator_facts()
    except Exception as exc:  # a broken accelerator setup is worth reporting, not crashing on
        yield Check(
            "accelerator",
            WARN,
            f"DeepSpeed could not pick an accelerator ({exc})",
            "run ds_report; set DS_ACCELERATOR (cuda, cpu, ...) if it guesses wrong",
        )
        return
    where = f"{count} x {name}" if count else name
    yield Check("accelerator", INFO, f"{where} (communication backend {comm})")


def check_ops(aio_usable: bool) -> Iterator[Check]:
    """Which DeepSpeed JIT ops the demo's kind of run needs and whether they are built yet."""
    from .deepspeed.ops import CACHED, LOADED, PREBUILT, builder_of, extensions_dir, op_state, ops_for_config

    states = {}
    for op in ops_for_config(None, aio_usable):
        builder = builder_of(op.name)
        states[op.name] = op_state(builder) if builder is not None else "unavailable"
    shown = ", ".join(f"{name} {state}" for name, state in states.items())
    missing = [name for name, state in states.items() if state not in (PREBUILT, CACHED, LOADED)]
    if missing:
        yield Check(
            "DeepSpeed ops",
            INFO,
            f"{shown}: the first run compiles them: minutes (async_io took 9 min on a busy 2-core machine; see "
            f"docs/troubleshooting.md), cached in {extensions_dir()}",
            "build them now: nvme-tier build-ops (or --config your_ds_config.json)",
        )
    else:
        yield Check("DeepSpeed ops", OK, f"{shown} ({extensions_dir()})")


def check_aio() -> Iterator[Check]:
    from .deepspeed.ops import INSTALL_HINT, aio_compatible

    ok, why = aio_compatible()
    if not ok:
        yield Check("libaio / async_io", WARN, f"{why}: backend 'auto' uses zarr", INSTALL_HINT)
        return
    yield Check("libaio / async_io", OK, why)


def check_memlock(staging_budget_bytes: int, cuda: bool | None = None) -> Iterator[Check]:
    """RLIMIT_MEMLOCK caps mlock()ed memory unless the process holds CAP_IPC_LOCK.

    Without CUDA, the aio backend's staging buffers come from DeepSpeed's mlock allocator, which
    aborts the whole process (a C assert, no Python exception) when the limit is too low. CUDA
    pinned memory (cudaHostAlloc) is not bound by this limit.
    """
    from .storage.aio_handles import memlock_limit

    name = "pinned memory (ulimit -l)"
    soft, lifted_by = memlock_limit(cuda)
    shown = "unlimited" if soft == resource.RLIM_INFINITY else human_bytes(soft)
    need = human_bytes(staging_budget_bytes)
    if lifted_by == "unlimited":
        yield Check(name, OK, shown)
    elif lifted_by == "CAP_IPC_LOCK":
        yield Check(name, OK, f"{shown}, but CAP_IPC_LOCK lifts the limit")
    elif lifted_by == "CUDA":
        yield Check(name, OK, f"{shown}; CUDA pinned memory (cudaHostAlloc) is not bound by it")
    elif soft < staging_budget_bytes:
        yield Check(
            name,
            WARN,
            f"{shown}: below the staging budget ({need}); the aio backend's mlock()ed staging "
            "buffers would fail and DeepSpeed aborts the process",
            "raise it: `ulimit -l unlimited` (needs the hard limit), `memlock unlimited` in "
            "/etc/security/limits.conf, or `docker run --ulimit memlock=-1`; or lower "
            "staging_budget_mb, or use backend 'zarr'",
        )
    else:
        yield Check(name, OK, f"{shown} (staging budget {need})")


# -- the offload path ----------------------------------------------------------------------------
NO_PATH_FIX = "set offload_states.path to a directory on a local NVMe filesystem (or pass --path DIR)"


def _path_fix(path: str) -> str:
    """The one thing to do about a path attach refuses, judged from what is on disk."""
    nearest, missing = path, 0
    while not os.path.lexists(nearest):
        nearest, missing = os.path.dirname(nearest), missing + 1
    if not os.path.isdir(nearest):
        return "point the path at a directory, or at a new name inside an existing directory"
    if missing > 1:
        return f"create its parent first (mkdir -p {os.path.dirname(path)}) or correct a typo in the path"
    return (
        "use a directory this user owns and can write, on a read-write local filesystem "
        "(e.g. mkdir -m 700 /local_nvme/$USER/nvme_tier)"
    )


@contextlib.contextmanager
def _nvme_tier_logs_quiet() -> Iterator[None]:
    """The report says what nvme_tier's attach-time log lines would (tmpfs, backend fallback)."""
    logger = logging.getLogger("nvme_tier")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_filesystem(path: str) -> Iterator[Check]:
    """Name the filesystem and block device under ``path``; warn when it is not a disk.

    tmpfs accepts O_DIRECT on recent kernels, so the O_DIRECT probe alone would call RAM fine.
    """
    from . import mounts

    kind, where = mounts.describe_storage(path)
    if kind in mounts.NOT_A_DISK:
        yield Check("filesystem", WARN, f"{where}: {mounts.NOT_A_DISK[kind]}", mounts.NOT_A_DISK_HINT)
    else:
        yield Check("filesystem", OK, where)


def _probe_directory(path: str, config: OffloadStatesConfig) -> list[Check]:
    from .mounts import mount_of
    from .runtime import default_runtime
    from .storage import supports_o_direct

    checks = list(check_filesystem(path))
    mount = mount_of(path)
    if supports_o_direct(path):
        checks.append(Check("O_DIRECT", OK, f"supported ({mount.fs_type} mounted at {mount.mount_point})"))
    else:
        checks.append(
            Check(
                "O_DIRECT",
                WARN,
                f"refused by {mount.fs_type} at {mount.mount_point} (tmpfs and some FUSE/overlay mounts do this)",
                "put the path on a local NVMe filesystem (ext4, xfs) for the aio backend; zarr works anywhere",
            )
        )
    usage = shutil.disk_usage(path)
    free = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"
    if usage.free < LOW_FREE_BYTES:
        checks.append(Check("free space", WARN, free, "offloads need room for every state placed on nvme"))
    else:
        checks.append(Check("free space", OK, free))
    backend = config.backend
    try:
        with _nvme_tier_logs_quiet():  # select warns once when auto falls back
            name, why = default_runtime().stores.select(backend, path, config)
        checks.append(Check(f"backend '{backend}'", OK, f"{name} ({why})"))
    except NvmeTierError as exc:
        hint = "use backend 'zarr' (any filesystem, no libaio), or fix what the message names"
        checks.append(Check(f"backend '{backend}'", FAIL, one_line(str(exc)), hint))
    return checks


def check_offload_config(
    config: OffloadStatesConfig, path_given: bool, source: str | None, block_absent: bool = False
) -> list[Check]:
    """attach's own checks (``api.check_placement``) as report rows, then probes of the directory.

    An engine is assumed to hold every state (one with an optimizer, as in training); the path is
    also checked when given on the command line, whatever the policy. A missing last level is
    created, as attach does, for the probes, and removed again.
    """
    from .api import check_placement
    from .policy import decide
    from .storage.site import check_path_at_attach
    from .types import StateKind

    every_state = list(StateKind)
    path = config.path
    created = bool(path) and not os.path.lexists(path)
    try:
        try:
            with _nvme_tier_logs_quiet():  # the rows below say what attach would log (tmpfs)
                check_placement(config, every_state)
                uses_nvme = decide(config, every_state).uses_nvme
                if path and path_given and not uses_nvme:
                    check_path_at_attach(config)
        except NvmeTierError as exc:
            absent = f" (no '{CONFIG_KEY}' block in {source}: the defaults apply)" if block_absent else ""
            if path:
                return [Check("path", FAIL, one_line(str(exc)) + absent, _path_fix(path))]
            return [Check("offload_states", FAIL, one_line(str(exc)) + absent, NO_PATH_FIX)]
        if not path:
            return [Check("path", INFO, "no path given: pass --path DIR to check an offload directory")]
        if not (uses_nvme or path_given):
            return [Check("path", INFO, f"{path}: not used (this policy puts no state on nvme)")]
        shown = f"{path} (does not exist yet: attach creates it, mode 0700)" if created else path
        return [Check("path", OK, shown), *_probe_directory(path, config)]
    finally:
        if created:  # this call made it (probe files and all): leave the disk as it was
            shutil.rmtree(path, ignore_errors=True)


def check_host_budget(config: OffloadStatesConfig) -> Iterator[Check]:
    """What the host copies may take, as attach would set it (device 'auto': computed from free memory)."""
    from .host_budget import resolve_limit

    limit, source = resolve_limit(config.host_budget_bytes, config.device == "auto")
    if limit is None and config.device == "cpu":
        hint = "host copies may take all of RAM: set host_budget_mb, or device 'auto' (needs path)"
        yield Check("host budget", INFO, source, hint)
    else:
        yield Check("host budget", OK if limit is not None else INFO, source)


def check_build_locks() -> Iterator[Check]:
    """torch's JIT build lock left by a killed build: every later load of that op waits forever."""
    from .deepspeed.build_watch import FIX_COMMAND, leftover_locks
    from .deepspeed.ops import extensions_dir

    for lock in leftover_locks(extensions_dir()):
        yield Check("build lock", FAIL, f"{lock} is left over: no live process holds it", FIX_COMMAND)


def run_checks(
    path: str | None = None,
    config: OffloadStatesConfig | None = None,
    source: str | None = None,
    block_absent: bool = False,
) -> list[Check]:
    """Every check, in report order. ``config`` (from ``source``, a config file) supplies the
    staging budget, backend and policy; ``path`` replaces its path."""
    from .deepspeed.ops import aio_compatible

    config = config or OffloadStatesConfig()
    if path:
        config = OffloadStatesConfig.parse({**config.model_dump(exclude_defaults=True), "path": path})
    checks = [
        *check_versions(),
        *check_accelerator(),
        *check_aio(),
        *check_ops(aio_usable=aio_compatible()[0]),
        *check_build_locks(),
        *check_memlock(config.staging_budget_bytes),
        *check_host_budget(config),
    ]
    if source is None and not path:
        checks.append(Check("path", INFO, "no path given: pass --path DIR to check an offload directory"))
    else:
        checks += check_offload_config(config, bool(path), source, block_absent)
    return checks


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def format_report(checks: list[Check]) -> str:
    marks = {OK: "[ OK ]", INFO: "[INFO]", WARN: "[WARN]", FAIL: "[FAIL]"}
    width = max(len(c.name) for c in checks)
    lines = ["nvme_tier environment report", "-" * 28]
    for c in checks:
        lines.append(f"{marks[c.level]} {c.name.ljust(width)}  {c.detail}")
        if c.hint:
            lines.append(f"       {' ' * width}  fix: {c.hint}")
    fails = sum(c.level == FAIL for c in checks)
    warns = sum(c.level == WARN for c in checks)
    lines.append("-" * 28)
    lines.append(f"{fails} failed, {warns} warnings" if fails or warns else "all checks passed")
    return "\n".join(lines)
