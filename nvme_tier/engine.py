"""The ONLY module that touches DeepSpeed internals.

It answers three questions for a live engine: which tensors hold each state (per ZeRO stage and
DeepSpeed version), how to quiesce the engine before its memory is freed, and how to hook the
engine so it cannot compute while states are away. It also hides the differences of DeepSpeed's
async_io op binding that the aio backend meets (``aio_async_pwrite``/``aio_async_pread``/``aio_wait``).
Version differences are detected by feature (attribute presence), each commented with the versions
that need it.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .errors import UnsupportedEngineError
from .tiers import StateBuffer
from .types import StateKind

log = logging.getLogger("nvme_tier")

SUPPORTED_DEEPSPEED = (">=0.16.9", "<0.20")


def check_deepspeed_version(version: str | None = None) -> str:
    """Raise ``UnsupportedEngineError`` naming the installed and supported versions."""
    from packaging.version import Version

    if version is None:
        import deepspeed

        version = deepspeed.__version__
    v = Version(version)
    if not (Version("0.16.9") <= v < Version("0.20")):
        raise UnsupportedEngineError(
            f"nvme_tier supports DeepSpeed {','.join(SUPPORTED_DEEPSPEED)}; installed is {version}. "
            "Install a supported version, e.g. pip install 'deepspeed==0.19.8'"
        )
    return version


# -- which optimizer wrapper is this? ---------------------------------------------------------------
def zero_stage(engine: Any) -> int:
    fn = getattr(engine, "zero_optimization_stage", None)
    return int(fn()) if callable(fn) else 0


def _zero_optimizer(engine: Any) -> Any | None:
    """The ZeRO optimizer wrapper, or None for engines without a (real) optimizer."""
    opt = getattr(engine, "optimizer", None)
    if opt is None or type(opt).__name__ == "DeepSpeedZeRoOffload":  # ZeRO-3 inference engine
        return None
    inner = getattr(opt, "optimizer", opt)
    # ZeRO-0 bf16 without a client optimizer: DeepSpeed wraps a DummyOptim in BF16_Optimizer.
    if inner is None or type(inner).__name__ == "DummyOptim":
        return None
    return opt


def _inner_optimizer(opt: Any) -> Any:
    """The torch optimizer that owns ``.state`` (FusedAdam, DeepSpeedCPUAdam, torch Adam...)."""
    inner = getattr(opt, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "state") else opt


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for v in values:
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _state_tensors(engine: Any) -> dict[StateKind, list[torch.Tensor]]:
    opt = _zero_optimizer(engine)
    params = list(engine.module.parameters())
    found: dict[StateKind, list[torch.Tensor]] = {k: [] for k in StateKind}
    if opt is None:
        # Reference/reward models: only the parameters exist (ZeRO-3: the partitions).
        found[StateKind.lp_params] = [
            getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p for p in params
        ]
        if zero_stage(engine) == 3:
            found[StateKind.lp_params] += params
        return found

    # Adam moments etc. Reached through .state, never through param_groups, because ZeRO-3
    # empties the inner optimizer's param_groups between steps.
    inner = _inner_optimizer(opt)
    for state in list(getattr(inner, "state", {}).values()):
        found[StateKind.optim_states].extend(_tensors(state.values()))

    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        found[StateKind.hp_params] = list(_tensors(opt.fp32_partitioned_groups_flat))
        lp = getattr(opt, "lp_param_buffer", None)  # 0.16.9 and 0.19.x
        found[StateKind.lp_params] = [lp] if torch.is_tensor(lp) else [p.ds_tensor for p in params]
        # Persistent (small) params stay gathered on the device between steps; the others hold
        # an empty placeholder then, which discovery skips.
        found[StateKind.lp_params] += params
        grads = getattr(opt, "grad_partitions_flat_buffer", None)
        found[StateKind.lp_grads] = [grads] if torch.is_tensor(grads) else []
        buckets = getattr(opt, "ipg_buckets", None)  # 0.17+: one bucket per comm dtype
        if isinstance(buckets, dict):
            found[StateKind.contiguous_grad_buffer] = [
                b.buffer for b in buckets.values() if torch.is_tensor(b.buffer)
            ]
        else:  # 0.16.x: a single name-mangled flat bucket
            flat = getattr(opt, "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer", None)
            found[StateKind.contiguous_grad_buffer] = [flat] if torch.is_tensor(flat) else []
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        found[StateKind.hp_params] = list(_tensors(opt.single_partition_of_fp32_groups))
        found[StateKind.lp_params] = list(_tensors(opt.bit16_groups_flat))
        avg = getattr(opt, "averaged_gradients", {})
        found[StateKind.lp_grads] = list(_tensors(avg.values() if isinstance(avg, dict) else avg))
        buckets = getattr(opt, "ipg_buckets", None)  # 0.17+
        if isinstance(buckets, dict):
            found[StateKind.contiguous_grad_buffer] = list(_tensors(b.buffer for b in buckets.values()))
        else:  # 0.16.x
            found[StateKind.contiguous_grad_buffer] = list(_tensors(getattr(opt, "ipg_buffer", None) or []))
    elif hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-0 with bf16)
        found[StateKind.hp_params] = list(_tensors(opt.fp32_groups_flat_partition))
        found[StateKind.lp_params] = list(_tensors(opt.bf16_groups_flat))
        found[StateKind.lp_grads] = list(_tensors(getattr(opt, "fp32_groups_gradients_flat", [])))
    else:
        raise UnsupportedEngineError(
            f"nvme_tier supports ZeRO stages 1-3 and engines without an optimizer; got {type(opt).__name__}"
        )
    return found


def discover_buffers(engine: Any) -> dict[StateKind, list[StateBuffer]]:
    """Group each state's tensors by storage; a storage claimed by two states goes to the first."""
    seen: set[tuple[str, int]] = set()
    out: dict[StateKind, list[StateBuffer]] = {}
    for kind, tensors in _state_tensors(engine).items():
        groups: dict[tuple[str, int], list[torch.Tensor]] = {}
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue
            key = (str(t.device), storage.data_ptr())
            if key in seen and key not in groups:
                continue
            seen.add(key)
            groups.setdefault(key, []).append(t)
        out[kind] = [StateBuffer.of(kind, f"{kind.value}.{i}", ts[0]) for i, ts in enumerate(groups.values())]
    return out


def buffers_present(engine: Any) -> dict[StateKind, int]:
    """Bytes per state the engine currently holds (cheap: no copies)."""
    return {k: sum(b.nbytes for b in bufs) for k, bufs in discover_buffers(engine).items()}


# -- quiescing and device facts --------------------------------------------------------------------
def quiesce(engine: Any) -> None:
    """Finish in-flight work so no kernel touches memory we are about to free.

    ZeRO-3: release gathered/prefetched params first (DeepSpeed's own fix for "param still in
    flight", #6557), exactly as upstream offload_states does.
    """
    opt = getattr(engine, "optimizer", None)
    empty = getattr(opt, "empty_partition_cache", None)
    if callable(empty):
        empty()
    synchronize()


def synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.is_available():
        acc.synchronize()


def empty_cache() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.is_available():
        acc.empty_cache()


def accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def rank_of(engine: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def engine_config_block(engine: Any, key: str) -> Any:
    """The raw top-level ``key`` of the engine's DeepSpeed config (DeepSpeed keeps unknown keys)."""
    params = getattr(getattr(engine, "_config", None), "_param_dict", None)
    if isinstance(params, dict) and key in params:
        return params[key]
    cfg = getattr(engine, "config", None)
    return cfg.get(key) if isinstance(cfg, dict) else None


# -- DeepSpeed's async_io op binding ----------------------------------------------------------------
# Two differences between the supported versions, both hidden here so storage/aio.py has one path:
#
# 1. async_pwrite(buffer, fd, offset) exists from 0.17.1 on; 0.16.x has only (buffer, filename, offset).
# 2. Before 0.18.4 (DeepSpeed #7727), aio_handle.wait() and the submit calls keep the GIL. An op's
#    I/O threads may drop the last C++ reference to the request's tensor after wait() has returned;
#    with torch's PyObject preservation that drop takes the GIL (decref of the tensor's PyObject).
#    If Python meanwhile blocks in wait() on the same handle, holding the GIL, that thread never
#    takes its next request: a deadlock (0.16.9: hangs within a few hundred requests). Hence every
#    request goes through aio_async_pwrite/aio_async_pread/aio_wait, and aio_wait returns only once
#    the op threads have let go of the request's tensor, sleeping (GIL released) until they have.
#    There is no attribute telling whether wait() releases the GIL, so this runs on every version;
#    where it does (0.18.4+), the threads have usually let go already and it costs one refcount read.
_AIO_SETTLE_TIMEOUT_S = 10.0
_aio_requests: dict[int, list[tuple[torch.Tensor, int]]] = {}  # id(handle) -> (alias, refcount at rest)
_aio_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _aio_pwrite_takes_fd(handle_type: type) -> bool:
    """Whether ``aio_handle.async_pwrite`` has the ``(buffer, fd, file_offset)`` overload.

    DeepSpeed 0.17.1+ binds it beside ``(buffer, filename, file_offset)``; 0.16.x (and 0.17.0)
    bind only the filename one. pybind11 lists every overload's signature in the docstring.
    """
    doc = getattr(getattr(handle_type, "async_pwrite", None), "__doc__", None) or ""
    return "fd:" in doc


def _aio_track(handle: Any, buffer: torch.Tensor) -> torch.Tensor:
    """A private alias of ``buffer`` to hand to the op, remembered with its at-rest refcount."""
    alias = buffer[:]  # nothing else refers to it, so its refcount at rest is known
    rest = sys.getrefcount(alias)  # this local + the argument
    with _aio_lock:
        _aio_requests.setdefault(id(handle), []).append((alias, rest))
    return alias


def _aio_untrack_last(handle: Any) -> None:
    """The op refused the request (returned non-zero): nothing holds the alias."""
    with _aio_lock:
        entries = _aio_requests.get(id(handle))
        if entries:
            entries.pop()
            if not entries:
                del _aio_requests[id(handle)]


def _aio_settle(handle: Any) -> None:
    """Sleep (GIL released) until the op's threads dropped every finished request's tensor."""
    with _aio_lock:
        entries = _aio_requests.pop(id(handle), [])
    deadline = time.monotonic() + _AIO_SETTLE_TIMEOUT_S
    while entries:
        alias, rest = entries.pop()  # as when tracked: a local + the argument, + 1 while the op holds it
        delay = 1e-5
        while sys.getrefcount(alias) > rest:
            if time.monotonic() > deadline:
                log.warning(
                    "nvme_tier: async_io threads still hold a request buffer after %.0f s",
                    _AIO_SETTLE_TIMEOUT_S,
                )
                return
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)


def aio_async_pwrite(handle: Any, buffer: torch.Tensor, fd: int, path: str, file_offset: int) -> int:
    """Submit one O_DIRECT write through whichever ``async_pwrite`` overload this DeepSpeed has.

    0.17.1+: the fd we opened (O_NOFOLLOW, space reserved with posix_fallocate). 0.16.x: the op
    opens ``path`` itself with O_WRONLY|O_CREAT|O_DIRECT and no O_TRUNC, so the reservation made
    through ``fd`` stays; ``path`` is the file we just opened inside our private 0700 directory.
    Wait for it with ``aio_wait``.
    """
    alias = _aio_track(handle, buffer)
    if _aio_pwrite_takes_fd(type(handle)):
        rc = handle.async_pwrite(alias, fd, file_offset)
    else:
        rc = handle.async_pwrite(alias, path, file_offset)
    if rc != 0:
        _aio_untrack_last(handle)
    return rc


def aio_async_pread(handle: Any, buffer: torch.Tensor, path: str, file_offset: int) -> int:
    """Submit one O_DIRECT read (every supported version: by file name); wait with ``aio_wait``."""
    alias = _aio_track(handle, buffer)
    rc = handle.async_pread(alias, path, file_offset)
    if rc != 0:
        _aio_untrack_last(handle)
    return rc


def aio_wait(handle: Any) -> int:
    """``handle.wait()`` (the number of requests completed), then settle: see the note above.

    Wait through here, not with ``handle.wait()``: only this keeps 0.16.x-0.18.3 from deadlocking.
    """
    done = handle.wait()
    _aio_settle(handle)
    return done


# -- hooking the engine -----------------------------------------------------------------------------
GUARDED_METHODS = ("backward", "step", "save_checkpoint", "load_checkpoint", "eval_batch", "train_batch")
MUTATING_METHODS = frozenset({"backward", "step", "load_checkpoint", "train_batch"})
# Read the weights only: allowed while just the optimizer states are away (guard_weights).
WEIGHT_READING_METHODS = ("save_16bit_model",)


def install_hooks(
    engine: Any,
    guard: Callable[[str], None],
    mutated: Callable[[], None],
    offload: Callable[..., None],
    reload: Callable[..., None],
    guard_weights: Callable[[str], None],
) -> Callable[[], None]:
    """Route offload_states/reload_states to nvme_tier and guard compute; returns an undo.

    ZeRO-3 parameters' own ``all_gather`` (what ``GatheredParameters`` and user code call, outside
    forward) and ``save_16bit_model`` go through ``guard_weights`` first: right after a non-blocking reload the partitions
    are still being filled on nvme_tier's thread, and gathering them then read freed memory
    (a segfault on the CPU accelerator) and lost any edit made under ``modifier_rank``.

    The ZeRO optimizer's own ``offload_states``/``reload_states`` are routed too: RLHF trainers
    (OpenRLHF's ``offload_deepspeed_states`` and the projects vendoring it) call
    ``engine.optimizer.offload_states(...)`` and reload through the engine, and an upstream
    method running unseen would leave the controller believing every state is on the device.
    The optimizer has them on ZeRO-3 (0.16.9+) and ZeRO-1/2 (0.17.6+); BF16_Optimizer has none.
    """
    originals: dict[str, Any] = {}
    opt = getattr(engine, "optimizer", None)
    opt_routed = [n for n in ("offload_states", "reload_states") if callable(getattr(opt, n, None))]
    opt_originals = {name: opt.__dict__.get(name) for name in opt_routed}

    def wrap(name: str, check: Callable[[str], None] = guard):
        method = getattr(engine, name)

        @functools.wraps(method)
        def guarded(*args, **kwargs):
            check(name)
            try:
                return method(*args, **kwargs)
            finally:
                if name in MUTATING_METHODS:
                    mutated()

        return guarded

    for name in GUARDED_METHODS:
        if hasattr(engine, name):
            originals[name] = engine.__dict__.get(name)
            object.__setattr__(engine, name, wrap(name))
    for name in WEIGHT_READING_METHODS:
        if hasattr(engine, name):
            originals[name] = engine.__dict__.get(name)
            object.__setattr__(engine, name, wrap(name, guard_weights))
    for name, fn in (("offload_states", offload), ("reload_states", reload)):
        originals[name] = engine.__dict__.get(name)
        object.__setattr__(engine, name, fn)
        if name in opt_routed:
            object.__setattr__(opt, name, fn)

    gathers: list[tuple[torch.Tensor, Any]] = []
    for param in engine.module.parameters():
        gather = param.__dict__.get("all_gather")  # ZeRO-3 partitioned parameters only
        if callable(gather):
            gathers.append((param, gather))
            param.all_gather = _guarded_gather(gather, guard_weights)

    # A forward pre-hook on the module covers engine(x) and engine.module(x) alike.
    handle = engine.module.register_forward_pre_hook(lambda _m, _a: guard("forward"))
    handle_engine = engine.register_forward_pre_hook(lambda _m, _a: guard("forward"))

    # The undo closure is held by the controller: it must not keep the engine alive.
    engine_ref = weakref.ref(engine)
    opt_ref = weakref.ref(opt) if opt_routed else None

    def undo() -> None:
        handle.remove()
        handle_engine.remove()
        eng = engine_ref()
        if eng is not None:
            _restore(eng, originals)
        optimizer = opt_ref() if opt_ref is not None else None
        if optimizer is not None:
            _restore(optimizer, opt_originals)
        for param, gather in gathers:
            param.all_gather = gather

    return undo


def _guarded_gather(gather: Callable[..., Any], guard_weights: Callable[[str], None]) -> Callable[..., Any]:
    @functools.wraps(gather)
    def guarded(*args, **kwargs):
        guard_weights("all_gather() of ZeRO-3 parameters (GatheredParameters)")
        return gather(*args, **kwargs)

    return guarded


def _restore(obj: Any, originals: dict[str, Any]) -> None:
    """Put back what ``install_hooks`` replaced: the instance attribute, or none (the class's)."""
    for name, orig in originals.items():
        if orig is None:
            obj.__dict__.pop(name, None)
        else:
            object.__setattr__(obj, name, orig)
