"""What the aio store takes from the host, asked before DeepSpeed's op would abort the process.

Page-locked memory (``ulimit -l``, for the staging slots), kernel aio events (``fs.aio-max-nr``,
for each handle's contexts) and the idle handles (``AioHandlePool``), reused across stores.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..config import AioSettings
from ..deepspeed.ops import load_aio_op
from ..errors import BackendUnavailableError
from .staging import SharedStagingPool

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


class AioHandlePool:
    """Idle aio handles of the process, reused across stores, and the thread reserving file space.

    Creating a handle starts intra_op_parallelism threads and io_setup()s as many kernel aio
    contexts; destroying one io_destroy()s them, which waits for an RCU grace period each (~0.3 s
    per handle here). A store takes its handles on first I/O and gives them back (idle, nothing in
    flight, buffers freed) when it closes; the last store of a settings key to close destroys them
    (``stop_using``): their threads are joined and their kernel aio contexts freed (fs.aio-nr is
    host-wide: another process may need those events). Staging slots keep their handle paired
    with their buffer, so the pool asks ``staging`` about those too.
    """

    max_idle_per_kind = 8

    def __init__(self, staging: SharedStagingPool):
        self.staging = staging
        self._lock = threading.Lock()
        self._idle: dict[tuple, list] = {}
        self._users: dict[tuple, weakref.WeakSet] = {}  # stores that may still use each key's handles
        self._reserver: ThreadPoolExecutor | None = None  # while any aio store is in use

    def idle_count(self, settings: AioSettings) -> int:
        """Handles a new store can reuse: idle ones, and those paired with idle staging slots."""
        key = handle_key(settings)
        with self._lock:
            idle = len(self._idle.get(key, ()))
        return idle + self.staging.idle_slots(lambda k: _holds_handles_of(k, key))

    def use(self, settings: AioSettings, user: object) -> None:
        """``user`` (a store) may use handles of ``settings`` (registered at each I/O)."""
        with self._lock:
            self._users.setdefault(handle_key(settings), weakref.WeakSet()).add(user)

    def stop_using(self, settings: AioSettings, user: object) -> None:
        """``user`` (a closed store) is done: the last user of these settings takes their handles."""
        key = handle_key(settings)
        with self._lock:
            users = self._users.get(key)
            if users is not None:
                users.discard(user)
            if users:
                return
            self._users.pop(key, None)
        # Its slots' free() gives their handles back here, where (no user left) they are not kept.
        self.staging.drop_idle(lambda k: _holds_handles_of(k, key))
        with self._lock:
            doomed = self._idle.pop(key, [])
            reserver = None
            if not any(self._users.values()):
                reserver, self._reserver = self._reserver, None
        doomed.clear()  # the last references: each destructor joins its threads and frees its contexts
        if reserver is not None:
            reserver.shutdown(wait=True)

    def reserver(self) -> ThreadPoolExecutor:
        """The helper thread that reserves new files' space (aio.py), made on first use."""
        with self._lock:
            if self._reserver is None:
                self._reserver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvme_tier-reserve")
            return self._reserver

    def take(self, settings: AioSettings) -> tuple[tuple, Any]:
        """(key, handle): an idle handle of ``settings``, else a new one (refused before the
        kernel's budget is out). Give it back under that key, the one it was made with."""
        key = handle_key(settings)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return key, idle.pop()
        op = load_aio_op()
        shortfall = aio_budget_shortfall(1, settings)
        if shortfall:  # refuse in Python: past the limit DeepSpeed's op aborts the process
            raise BackendUnavailableError(f"aio backend: {shortfall}; {AIO_MAX_NR_HINT}")
        return key, op.aio_handle(*key)

    def give_back(self, key: tuple, handle: Any) -> None:
        """Keep ``handle`` (made with ``key``) idle for reuse while a store uses those settings;
        else it is destroyed (with the caller's last reference to it)."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if self._users.get(key) and len(idle) < self.max_idle_per_kind:
                idle.append(handle)

    def drop_idle(self) -> None:
        """Destroy every idle handle (a test that changes how handles are made)."""
        with self._lock:
            self._idle.clear()


def _holds_handles_of(slot_key: object, key: tuple) -> bool:
    """Whether a staging slot key is an aio slot's whose handle has settings ``key``."""
    return isinstance(slot_key, tuple) and slot_key[:2] == ("aio", key)
