"""DeepSpeed's async_io op binding, one call path for every supported version.

It imports nothing from nvme_tier: storage/aio.py calls ``aio_async_pwrite``/``aio_async_pread``/
``aio_wait`` for every request, and the settle registry below is module-level because the op's
handles are shared by every backend of the process.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from typing import Any

import torch

log = logging.getLogger("nvme_tier")

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


@functools.lru_cache(maxsize=1)
def aio_wait_keeps_gil() -> bool:
    """Whether this DeepSpeed's ``aio_handle.wait()`` keeps the GIL while requests run (< 0.18.4).

    Then every Python thread, the caller's compute included, stalls while an NVMe transfer waits
    for the disk: a non-blocking offload or reload hides nothing (docs/design.md, "No GIL in the
    background"). The zarr backend's I/O releases it on every version.
    """
    import deepspeed
    from packaging.version import Version

    return Version(deepspeed.__version__) < Version("0.18.4")


def aio_wait(handle: Any) -> int:
    """``handle.wait()`` (the number of requests completed), then settle: see the note above.

    Wait through here, not with ``handle.wait()``: only this keeps 0.16.x-0.18.3 from deadlocking.
    """
    done = handle.wait()
    _aio_settle(handle)
    return done
