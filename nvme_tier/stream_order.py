"""Order the caller's CUDA stream after work a CPU thread finishes: a non-blocking reload's NVMe reads.

Upstream's non-blocking reload queues its copies on the current stream, so whatever the caller
queues afterwards (kernels, ``.item()``, ``.cpu()``) sees the bytes. nvme_tier's NVMe reads end on
I/O threads, with nothing on the device to wait for when ``reload_states`` returns. So ``close``
makes the current stream wait (``cuStreamWaitValue32``, through ctypes into libcuda) until a 4-byte
flag in page-locked host memory reaches a ticket; ``open`` writes it from the CPU once the reads'
copies have completed, or failed (the stream is never left waiting; the guards raise the failure).
The CPU is not blocked. ``close`` returns None where this cannot be done (no CUDA, a driver without
stream memory operations or mapped host memory, ``CUDA_DEVICE_MAX_CONNECTIONS=1``): the caller then
finishes the reads before returning.

While a gate is closed nothing may wait on the caller's stream from an I/O thread, or the reads
would wait for their own flag: I/O is submitted ``apart_from_caller``, from a stream of the engine's
own (``SubmitStream``) that has waited for what the caller queued until then.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import torch

_WAIT_VALUE_GEQ = 0x0
_ATTR_CAN_MAP_HOST_MEMORY = 19
_ATTR_CAN_USE_STREAM_MEM_OPS_V1 = 92  # the v1 functions only; v2 (CUDA 11.7+) work on every device
# Flags stay allocated for the life of the process: a stream may still be reading one when its
# engine goes away, and torch would hand the memory out again.
_FLAGS: list[torch.Tensor] = []
_SUPPORTED: dict[int, bool] = {}


class _Driver:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        lib.cuDriverGetVersion(ctypes.byref(version))
        self.v2 = version.value >= 11070
        self.wait = lib.cuStreamWaitValue32_v2 if self.v2 else lib.cuStreamWaitValue32
        self.wait.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
        self.device_pointer = lib.cuMemHostGetDevicePointer_v2
        self.device_pointer.argtypes = (ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint)
        self._lib = lib

    def attribute(self, attribute: int, device: int) -> int:
        handle, value = ctypes.c_int(), ctypes.c_int()
        if self._lib.cuDeviceGet(ctypes.byref(handle), device) != 0:
            return 0
        rc = self._lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, handle)
        return value.value if rc == 0 else 0


_DRIVER: list[_Driver | None] = []


def _driver() -> _Driver | None:
    if not _DRIVER:
        try:
            _DRIVER.append(_Driver())
        except (OSError, AttributeError):  # no libcuda, or one without these functions
            _DRIVER.append(None)
    return _DRIVER[0]


def _supported(index: int) -> bool:
    if index not in _SUPPORTED:
        driver = (
            None if torch.version.hip or os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1" else _driver()
        )
        _SUPPORTED[index] = driver is not None and bool(
            driver.attribute(_ATTR_CAN_MAP_HOST_MEMORY, index)
            and (driver.v2 or driver.attribute(_ATTR_CAN_USE_STREAM_MEM_OPS_V1, index))
        )
    return _SUPPORTED[index]


class StreamGate:
    """One engine's gate: at most one closed at a time (one background operation per engine)."""

    def __init__(self) -> None:
        self._flag: torch.Tensor | None = None
        self._address = 0
        self._ticket = 0

    def close(self, device: torch.device) -> int | None:
        """Make ``device``'s current stream wait until ``open(ticket)``; None where it cannot."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not _supported(index):
            return None
        driver = _driver()
        if self._flag is None:
            flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            address = ctypes.c_uint64()
            if driver.device_pointer(ctypes.byref(address), flag.data_ptr(), 0) != 0:
                return None
            _FLAGS.append(flag)
            self._flag, self._address = flag, address.value
        ticket = self._ticket % 0x7FFFFFFF + 1  # GEQ compares as int32 differences: wrap-safe
        stream = torch.cuda.current_stream(device).cuda_stream
        if driver.wait(stream, self._address, ticket, _WAIT_VALUE_GEQ) != 0:
            return None
        self._ticket = ticket
        return ticket

    def open(self, ticket: int | None) -> None:
        """Let the stream waiting for ``ticket`` run on (a plain CPU store; idempotent)."""
        if ticket is not None and self._flag is not None:
            self._flag[0] = ticket


class SubmitStream:
    """One engine's own stream to submit I/O from, apart from the caller's.

    Its I/O threads queue their copies on it chunk by chunk, long after ``apart_from_caller`` made it
    wait for the caller's stream. One engine's, not the process's: shared, it would make engine A's
    reads (queued as they arrive) wait behind engine B's later ``wait_stream`` of a caller's stream
    that A's own gate holds closed until those reads are in: a deadlock (A reloading while B
    offloads, on one stream). Per engine, B merely waits for A.
    """

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}

    @contextlib.contextmanager
    def apart_from_caller(self) -> Iterator[None]:
        """Submit I/O whose device copies must never wait on the caller's stream after this point."""
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            yield
            return
        index = torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        stream.wait_stream(torch.cuda.current_stream(index))
        with torch.cuda.stream(stream):
            yield
