"""What the aio backend takes from the host, asked before DeepSpeed's op would abort the process.

Page-locked memory (``ulimit -l``, for the staging slots), kernel aio events (``fs.aio-max-nr``,
for each handle's contexts) and the process's idle handles, reused across backends.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config import AioSettings
from ..deepspeed.ops import load_aio_op
from ..errors import BackendUnavailableError
from .staging import staging_pool

MEMLOCK_HINT = (
    "raise the limit (`ulimit -l unlimited`, `memlock unlimited` in /etc/security/limits.conf, "
    "`docker run --ulimit memlock=-1`) or lower offload_states.staging_budget_mb"
)
CAP_IPC_LOCK = 14  # capability bit that lifts RLIMIT_MEMLOCK (root in most containers)


def has_cap_ipc_lock() -> bool:
    """Whether this process may lock memory past RLIMIT_MEMLOCK."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return os.geteuid() == 0


def memlock_limit(cuda: bool | None = None) -> tuple[int, str | None]:
    """The soft ``ulimit -l`` and what lifts it for page-locked staging here, or None when it binds.

    Without CUDA the staging slots come from DeepSpeed's mlock allocator, which aborts the whole
    process (a C assert, no Python exception) past ``ulimit -l``: this must be asked first.
    CUDA pinned memory (cudaHostAlloc) and processes holding CAP_IPC_LOCK are not bound by it.
    What lifts it: ``"unlimited"``, ``"CAP_IPC_LOCK"`` or ``"CUDA"``.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return soft, "unlimited"
    if has_cap_ipc_lock():
        return soft, "CAP_IPC_LOCK"
    if cuda is None:
        cuda = torch.cuda.is_available()
    return soft, "CUDA" if cuda else None


def memlock_shortfall(locked_bytes: int, cuda: bool | None = None) -> str | None:
    """Why page-locking ``locked_bytes`` of staging would fail here, or None when it will not."""
    soft, lifted_by = memlock_limit(cuda)
    if lifted_by is not None or soft >= locked_bytes:
        return None
    return (
        f"ulimit -l is {soft} B, below the {locked_bytes} B of page-locked staging the aio backend "
        "needs (DeepSpeed's mlock allocator would abort the process)"
    )


# Idle aio handles, reused across backends. Creating a handle starts intra_op_parallelism threads
# and io_setup()s as many kernel aio contexts; destroying one io_destroy()s them, which waits for an
# RCU grace period each (~0.3 s per handle here). A backend takes its handles on first I/O and gives
# them back (idle, nothing in flight, buffers freed) on release(); the last backend of a settings
# key to be released destroys them (stop_using_handles).
_IDLE_HANDLES: dict[tuple, list] = {}
_IDLE_LOCK = threading.Lock()
_MAX_IDLE_PER_KIND = 8


def handle_key(settings: AioSettings) -> tuple:
    s = settings
    return (s.block_size, s.queue_depth, s.single_submit, s.overlap_events, s.intra_op_parallelism)


AIO_MAX_NR_HINT = (
    "raise the host's limit (`sysctl -w fs.aio-max-nr=1048576`; in a container, on the host), "
    "lower offload_states.aio.queue_depth or aio.intra_op_parallelism, or use backend 'zarr'"
)


def aio_events_per_handle(settings: AioSettings) -> int:
    """Kernel aio events one handle io_setup()s: DeepSpeed's op gives its own synchronous context
    and each of its ``intra_op_parallelism`` threads an ``aio_context`` of ``queue_depth`` events
    (csrc/aio/py_lib/deepspeed_py_io_handle.cpp, deepspeed_aio_thread.cpp)."""
    return (settings.intra_op_parallelism + 1) * settings.queue_depth


def read_aio_budget() -> tuple[int, int] | None:
    """(fs.aio-nr, fs.aio-max-nr): events in use on this host (every process) and the limit."""
    try:
        with (
            open("/proc/sys/fs/aio-nr", encoding="ascii") as used,
            open("/proc/sys/fs/aio-max-nr", encoding="ascii") as limit,
        ):
            return int(used.read()), int(limit.read())
    except (OSError, ValueError):
        return None  # not Linux procfs: nothing to check against


def aio_budget_shortfall(new_handles: int, settings: AioSettings) -> str | None:
    """Why io_setup() would fail for ``new_handles`` more handles, or None when they fit.

    DeepSpeed's op ignores io_queue_init()'s EAGAIN and later hits a C assert (SIGABRT, every state
    of the process lost), so the kernel's host-wide budget must be asked first.
    """
    budget = read_aio_budget()
    if budget is None or new_handles <= 0:
        return None
    used, limit = budget
    needed = new_handles * aio_events_per_handle(settings)
    if used + needed <= limit:
        return None
    return (
        f"the kernel's aio budget is exhausted: {new_handles} aio handle(s) need {needed} events "
        f"((aio.intra_op_parallelism {settings.intra_op_parallelism} + 1) x aio.queue_depth "
        f"{settings.queue_depth} each), but fs.aio-nr is {used} of fs.aio-max-nr {limit} "
        "(DeepSpeed's op would abort the process)"
    )


def idle_handle_count(settings: AioSettings) -> int:
    """Handles a new backend can reuse: idle ones, and those paired with idle staging slots."""
    key = handle_key(settings)
    with _IDLE_LOCK:
        idle = len(_IDLE_HANDLES.get(key, ()))
    return idle + staging_pool().idle_slots(lambda k: isinstance(k, tuple) and k[:2] == ("aio", key))


# Backends that may still use the handles of each settings key. When the last one is released,
# the idle handles of that key, and the idle staging slots holding them, are destroyed: their
# threads are joined and their kernel aio contexts io_destroy()ed (fs.aio-nr is host-wide: another
# process may need those events). A backend registers at each I/O, before checking slots out.
_USERS: dict[tuple, weakref.WeakSet] = {}
_RESERVER: list[ThreadPoolExecutor] = []  # the posix_fallocate thread, while any aio backend is in use


def use_handles(settings: AioSettings, user: object) -> None:
    with _IDLE_LOCK:
        _USERS.setdefault(handle_key(settings), weakref.WeakSet()).add(user)


def stop_using_handles(settings: AioSettings, user: object) -> None:
    """``user`` (a released backend) is done: the last user of these settings takes their handles."""
    key = handle_key(settings)
    with _IDLE_LOCK:
        users = _USERS.get(key)
        if users is not None:
            users.discard(user)
        if users:
            return
        _USERS.pop(key, None)
    # Its slots' free() gives their handles back here, where (no user left) they are not kept.
    staging_pool().drop_idle(lambda k: isinstance(k, tuple) and k[:2] == ("aio", key))
    with _IDLE_LOCK:
        doomed = _IDLE_HANDLES.pop(key, [])
        reserver = _RESERVER.pop() if _RESERVER and not any(_USERS.values()) else None
    doomed.clear()  # the last references: each destructor joins its threads and frees its contexts
    if reserver is not None:
        reserver.shutdown(wait=True)


def reserver() -> ThreadPoolExecutor:
    """The helper thread that reserves new files' space (aio.py), made on first use."""
    with _IDLE_LOCK:
        if not _RESERVER:
            _RESERVER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier-reserve"))
        return _RESERVER[0]


def take_handle(settings: AioSettings):
    key = handle_key(settings)
    with _IDLE_LOCK:
        idle = _IDLE_HANDLES.get(key)
        if idle:
            return idle.pop()
    op = load_aio_op()
    shortfall = aio_budget_shortfall(1, settings)
    if shortfall:  # refuse in Python: past the limit DeepSpeed's op aborts the process
        raise BackendUnavailableError(f"aio backend: {shortfall}; {AIO_MAX_NR_HINT}")
    return op.aio_handle(*key)


def give_back_handle(settings: AioSettings, handle) -> None:
    """Keep ``handle`` idle for reuse while a backend uses its settings; else it is destroyed
    (with the caller's last reference to it)."""
    key = handle_key(settings)
    with _IDLE_LOCK:
        idle = _IDLE_HANDLES.setdefault(key, [])
        if _USERS.get(key) and len(idle) < _MAX_IDLE_PER_KIND:
            idle.append(handle)
