"""DeepSpeed's JIT-compiled ops: which ones a run needs, whether they are built, building them visibly.

DeepSpeed compiles async_io, fused_adam, cpu_adam and shm_comm with ninja the first time a process
loads them (minutes on a small machine) and says nothing while it does: a first offload looks hung.
Here each build nvme_tier triggers announces itself, and ``nvme-tier build-ops`` builds up front
what a config needs. Only DeepSpeed's op builders (the public API ``ds_report`` and
``DS_BUILD_OPS`` use) are touched, through the accelerator that picks them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import BackendUnavailableError, BuildLockError
from .build_watch import heartbeat, refuse_leftover_lock

log = logging.getLogger("nvme_tier")

# Op name (DeepSpeed's builder NAME, also the build directory) -> builder class name.
OP_BUILDERS = {
    "async_io": "AsyncIOBuilder",
    "fused_adam": "FusedAdamBuilder",
    "cpu_adam": "CPUAdamBuilder",
    "deepspeed_shm_comm": "ShareMemCommBuilder",
}
PREBUILT, LOADED, CACHED, NOT_BUILT = "prebuilt", "loaded", "cached", "not built"
# Ops a builder's load() loads first, each through its own torch build lock (DeepSpeed's CPU
# AsyncIOBuilder loads pin_memory; a name with no build directory costs one stat).
LOADED_FIRST = {"async_io": ("pin_memory",)}
PROGRESS_EVERY_S = 30.0  # a compile prints nothing for minutes: say it is still running


def extensions_dir() -> str:
    """Where torch.utils.cpp_extension puts JIT builds (the logic of its _get_build_directory)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


def builder_of(name: str) -> Any | None:
    """This accelerator's builder for op ``name`` (None when the accelerator has no such op)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder(OP_BUILDERS[name])


def op_state(builder: Any) -> str:
    """``prebuilt`` (in the DeepSpeed install), ``loaded`` (in this process), ``cached`` or ``not built``."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    if installed_ops.get(builder.name) and accelerator_name == get_accelerator()._name:
        return PREBUILT
    if builder.name in type(builder)._loaded_ops:
        return LOADED
    built = os.path.join(extensions_dir(), builder.name, f"{builder.name}.so")
    return CACHED if os.path.exists(built) else NOT_BUILT


@contextlib.contextmanager
def build_notice(builder: Any) -> Iterator[None]:
    """Around a ``builder.load()``: one line before a JIT build starts and one when it is done."""
    if op_state(builder) != NOT_BUILT:
        yield
        return
    where = os.path.join(extensions_dir(), builder.name)
    log.warning(
        "nvme_tier: building DeepSpeed %s (one-time, minutes on small machines; cached in %s; "
        "`nvme-tier build-ops` builds every op up front)",
        builder.name,
        where,
    )
    started = time.perf_counter()

    def still(elapsed: float) -> None:
        log.warning("nvme_tier: still building DeepSpeed %s: %.0f s so far", builder.name, elapsed)

    with heartbeat(still, 2 * PROGRESS_EVERY_S):
        yield
    log.warning("nvme_tier: built DeepSpeed %s in %.0f s", builder.name, time.perf_counter() - started)


def load_op(builder: Any) -> Any:
    """``builder.load()``, announced when it has to compile; a typed error, not torch's endless
    wait, when a killed build left its lock behind."""
    if op_state(builder) not in (PREBUILT, LOADED):  # those load without torch's build lock
        refuse_leftover_lock(extensions_dir(), [*LOADED_FIRST.get(builder.name, ()), builder.name])
    with build_notice(builder):
        return builder.load(verbose=False)


class _DropBuildBanners(io.TextIOBase):
    """stdout minus DeepSpeed's "DeepSpeed ... built successfully" print (emitted cached or not)."""

    def __init__(self, target: Any):
        self.target = target
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if not (line.startswith("DeepSpeed ") and line.endswith(" built successfully")):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_out(self) -> None:
        if self.partial:
            self.target.write(self.partial)
        self.target.flush()


@contextlib.contextmanager
def quiet_comm_op_build() -> Iterator[None]:
    """For ``deepspeed.init_distributed``/``initialize``: announce the shm_comm build, drop DeepSpeed's
    own "built successfully" print (it appears on every run, whether anything was built or not)."""
    builder = builder_of("deepspeed_shm_comm")
    notice = build_notice(builder) if builder is not None else contextlib.nullcontext()
    out = _DropBuildBanners(sys.stdout)
    try:
        with notice, contextlib.redirect_stdout(out):
            yield
    finally:
        out.close_out()


# DeepSpeed (0.19+) logs this from inside the first aio write, through its own logger, which names
# the nearest Python frame: nvme_tier's aio_binding.aio_async_pwrite. Its marker makes it once per process.
_DS_WRITE_WARNING_MARKER = "_deepspeed_nvme_write_warning_emitted"


def silence_deepspeed_write_warning() -> None:
    """Keep DeepSpeed's SSD write-endurance (TBW) advice, logged from inside the first aio write and
    attributed to nvme_tier's code line, away: nvme_tier says it once per filesystem and user
    (``storage.site.warn_write_endurance_once``). Setting DeepSpeed's marker is what silences it."""
    import deepspeed.utils

    setattr(deepspeed.utils, _DS_WRITE_WARNING_MARKER, True)


def set_deepspeed_log_level(level: int) -> None:
    """DeepSpeed's own logger (it logs every engine's full config at INFO)."""
    from deepspeed.utils import logger

    logger.setLevel(level)


# -- which ops a config needs ----------------------------------------------------------------------
@dataclass(frozen=True)
class NeededOp:
    name: str
    why: str


def ops_for_config(ds_config: dict | None, aio_usable: bool) -> list[NeededOp]:
    """The JIT ops a DeepSpeed config makes DeepSpeed and nvme_tier load on this accelerator.

    Without a config: what ``nvme-tier demo`` loads (Adam, ZeRO, the nvme tier on backend auto).
    """
    from deepspeed.accelerator import get_accelerator

    from ..config import CONFIG_KEY, OffloadStatesConfig
    from ..policy import decide
    from ..types import StateKind

    demo = {"optimizer": {"type": "Adam"}, CONFIG_KEY: {"path": "/demo/picks/a/temporary/dir"}}
    cfg = ds_config if ds_config is not None else demo
    needed: list[NeededOp] = []
    if get_accelerator().device_name() == "cpu":
        needed.append(NeededOp("deepspeed_shm_comm", "DeepSpeed's communication on the CPU accelerator"))
    zero = cfg.get("zero_optimization") or {}
    offload_devices = {
        (zero.get(key) or {}).get("device", "none") for key in ("offload_optimizer", "offload_param")
    }
    optimizer = str((cfg.get("optimizer") or {}).get("type", "")).lower()
    torch_adam = bool(((cfg.get("optimizer") or {}).get("params") or {}).get("torch_adam", False))
    if optimizer in ("adam", "adamw") and not torch_adam:
        if offload_devices & {"cpu", "nvme"}:
            needed.append(
                NeededOp("cpu_adam", f"optimizer {optimizer} with ZeRO-Offload (offload_optimizer)")
            )
        else:
            needed.append(NeededOp("fused_adam", f"optimizer {optimizer} (DeepSpeed's FusedAdam)"))
    aio_reasons = []
    if "nvme" in offload_devices:
        aio_reasons.append("ZeRO-Infinity nvme offload")
    if CONFIG_KEY in cfg:
        block = OffloadStatesConfig.parse(cfg[CONFIG_KEY])
        if block.backend in ("aio", "auto") and decide(block, list(StateKind)).uses_nvme:
            aio_reasons.append(f"offload_states nvme tier, backend {block.backend}")
    if aio_reasons and aio_usable:
        needed.append(NeededOp("async_io", "; ".join(aio_reasons)))
    return needed


@dataclass(frozen=True)
class OpBuild:
    """What ``build-ops`` did for one op."""

    name: str
    state: str  # before the build: prebuilt / loaded / cached / not built / unavailable
    seconds: float
    error: str = ""


def build_op(name: str, progress: Callable[[float], None] | None = None) -> OpBuild:
    """Load (and so build, unless cached) op ``name``; never raises: the error is in the result.

    ``progress(elapsed seconds)`` is called every PROGRESS_EVERY_S while it runs."""
    builder = builder_of(name)
    if builder is None:
        return OpBuild(name, "unavailable", 0.0, "this accelerator has no such op")
    state = op_state(builder)
    started = time.perf_counter()
    beat = heartbeat(progress, PROGRESS_EVERY_S) if progress else contextlib.nullcontext()
    try:
        with beat:
            load_op(builder)  # async_io's load() builds pin_memory first where DeepSpeed needs it
    except Exception as exc:  # a failed build is reported per op, the next op still builds
        return OpBuild(name, state, time.perf_counter() - started, " ".join(str(exc).split())[:300])
    return OpBuild(name, state, time.perf_counter() - started)


def build_missing(ds_config: dict | None, aio_usable: bool) -> list[OpBuild]:
    """Build, announced, the ops ``ds_config`` needs that are not built yet (cached ones untouched).

    Called before ``deepspeed.initialize`` so that the minutes of compiling come first and are
    named, not hidden inside initialize or the first offload.
    """
    missing = []
    for op in ops_for_config(ds_config, aio_usable):
        builder = builder_of(op.name)
        if builder is not None and op_state(builder) == NOT_BUILT:
            missing.append(build_op(op.name))
    return missing


# -- the async_io op -------------------------------------------------------------------------------
INSTALL_HINT = (
    "the 'aio' backend needs libaio and DeepSpeed's async_io op: run `apt-get install -y libaio-dev` "
    "(or `yum install libaio-devel`), then `ds_report` should show async_io [OKAY]; or use backend 'zarr'"
)


@functools.lru_cache(maxsize=1)
def aio_compatible() -> tuple[bool, str]:
    """(usable, reason) without building anything."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as exc:  # pragma: no cover - deepspeed is a hard dependency
        return False, f"cannot import DeepSpeed's AsyncIOBuilder ({exc})"
    try:
        ok = AsyncIOBuilder().is_compatible(verbose=False)
    except Exception as exc:
        return False, f"async_io compatibility check failed ({exc})"
    return (True, "async_io op is compatible") if ok else (False, "libaio is not installed")


@functools.lru_cache(maxsize=1)
def load_aio_op():
    """Build (first time: minutes, then cached in ~/.cache/torch_extensions) and load async_io."""
    ok, why = aio_compatible()
    if not ok:
        raise BackendUnavailableError(f"{why}; {INSTALL_HINT}")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    try:
        op = load_op(AsyncIOBuilder())  # a line before a JIT build: it takes minutes, silently
    except BuildLockError:
        raise  # it names the lock file and the fix; the install hint would mislead
    except Exception as exc:
        raise BackendUnavailableError(
            f"building DeepSpeed's async_io op failed ({exc}); {INSTALL_HINT}"
        ) from exc
    silence_deepspeed_write_warning()
    return op
