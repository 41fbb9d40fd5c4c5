"""The swap-bandwidth benchmark's methods: each writes one tensor to its medium and reads it back.

Raw DeepSpeed aio, nvme_tier's two backends, a (pinned) host copy and ``torch.save``; the runner and
the report are in swap_bandwidth.py.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import torch

from nvme_tier.bench.common import dir_bytes
from nvme_tier.config import AioSettings
from nvme_tier.deepspeed.ops import load_aio_op
from nvme_tier.storage import AioStore, OwnerInfo, StorageBackend, WriterDirectory, ZarrStore
from nvme_tier.units import MiB


class BenchInputs(Protocol):
    """What a method takes from the runner (swap_bandwidth.Bench): the same bytes for every method."""

    src: torch.Tensor
    dst: torch.Tensor
    nbytes: int
    staging: int  # staging budget of the backends, bytes


# -- the methods -----------------------------------------------------------------------------------
class Method:
    """One way of moving the state out and back: ``setup`` once, then rounds of ``write``/``read``.

    ``src``/``dst`` are the "device" tensors (CUDA when present): they exist before any method runs,
    so host memory counted for a method is what the method itself adds.
    """

    page_cache = False  # True: reads can hit the page cache unless it was dropped
    notes: tuple[str, ...] = ()

    def __init__(self, bench: BenchInputs, workdir: str):
        self.bench = bench
        self.src, self.dst = bench.src, bench.dst
        self.nbytes = bench.nbytes
        self.workdir = workdir
        self.pinned_bytes = 0
        self.on_disk_bytes = 0

    def setup(self) -> None:
        pass

    def prepare_write(self) -> None:
        """Untimed: remove the previous round's files."""

    def prepare_read(self) -> None:
        """Untimed: clear what the read will fill."""

    def write(self) -> None:
        raise NotImplementedError

    def read(self) -> None:
        raise NotImplementedError

    def result_ok(self) -> bool:
        return bool(torch.equal(self.dst, self.src))

    def teardown(self) -> None:
        pass


class RawAio(Method):
    notes = ("page-locked host buffer written/read in one request; the device<->host copy is not timed",)

    def setup(self) -> None:
        s = AioSettings()
        self.handle = load_aio_op().aio_handle(
            s.block_size, s.queue_depth, s.single_submit, s.overlap_events, s.intra_op_parallelism
        )
        self.path = os.path.join(self.workdir, "raw.bin")
        self.buf = self.handle.new_cpu_locked_tensor(self.nbytes, torch.empty(0, dtype=torch.uint8))
        self.buf.copy_(self.src)
        self.pinned_bytes = self.buf.numel()

    def prepare_write(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def write(self) -> None:
        _expect(self.handle.sync_pwrite(self.buf, self.path), "sync_pwrite")
        self.on_disk_bytes = os.path.getsize(self.path)

    def read(self) -> None:
        _expect(self.handle.sync_pread(self.buf, self.path), "sync_pread")

    def prepare_read(self) -> None:
        self.buf.zero_()

    def result_ok(self) -> bool:
        return bool(torch.equal(self.buf, self.src.cpu()))

    def teardown(self) -> None:
        self.handle.free_cpu_locked_tensor(self.buf)
        self.buf = self.handle = None


class BackendMethod(Method):
    store_cls: type = AioStore

    def setup(self) -> None:
        self.backend = StorageBackend(
            self.store_cls(
                WriterDirectory(self.workdir, OwnerInfo.current(label="bench")),
                staging_budget_bytes=self.bench.staging,
            )
        )
        # Warm-up: open the handles and allocate staging once, as a long-lived engine does.
        self.backend.write("warmup", torch.zeros(4096, dtype=torch.uint8, device=self.src.device)).result()
        self.backend.delete("warmup")
        store = self.backend.store
        if isinstance(store, AioStore):
            self.notes = (
                *self.notes,
                f"{store.slot_count} requests in flight x {store.chunk_bytes / MiB:g} MiB chunks",
            )
        elif isinstance(store, ZarrStore):
            self.notes = (*self.notes, f"zarr chunks of {store.chunk_bytes / MiB:g} MiB")

    def prepare_write(self) -> None:
        self.backend.delete("state")  # a fresh file each round, like raw_aio

    def write(self) -> None:
        self.backend.write("state", self.src).result()
        self.on_disk_bytes = dir_bytes(self.backend.directory.path)
        self.pinned_bytes = max(self.pinned_bytes, self.backend.pinned_bytes)

    def read(self) -> None:
        self.backend.read_into("state", self.dst).result()
        self.pinned_bytes = max(self.pinned_bytes, self.backend.pinned_bytes)

    def teardown(self) -> None:
        self.backend.release()


class AioBackendMethod(BackendMethod):
    store_cls = AioStore
    notes = ("from device memory through pinned staging; crc32c on",)


class ZarrBackendMethod(BackendMethod):
    store_cls = ZarrStore
    page_cache = True
    notes = ("crc32c on; codec none; zarr allocates its read slices (not pinned)",)


class PinnedCopy(Method):
    def setup(self) -> None:
        self.pinned = torch.cuda.is_available()
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        self.host.fill_(0)  # fault the pages in outside the timed region
        self.pinned_bytes = self.nbytes if self.pinned else 0
        self.notes = (
            "host buffer pre-faulted; it stays allocated while offloaded",
            "device->pinned host and back" if self.pinned else "no CUDA: a plain host-to-host copy",
        )

    def write(self) -> None:
        self.host.copy_(self.src, non_blocking=self.pinned)

    def read(self) -> None:
        self.dst.copy_(self.host, non_blocking=self.pinned)

    def teardown(self) -> None:
        self.host = None


class TorchSave(Method):
    page_cache = True
    notes = ("torch.save of the device tensor; torch.load to host, then copy to the device tensor",)

    def setup(self) -> None:
        self.path = os.path.join(self.workdir, "state.pt")

    def prepare_write(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def write(self) -> None:
        torch.save(self.src, self.path)
        self.on_disk_bytes = os.path.getsize(self.path)

    def read(self) -> None:
        loaded = torch.load(self.path, map_location="cpu", weights_only=True)
        self.dst.copy_(loaded)
        del loaded

    def teardown(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


METHOD_CLASSES: dict[str, type[Method]] = {
    "raw_aio": RawAio,
    "aio_backend": AioBackendMethod,
    "zarr_backend": ZarrBackendMethod,
    "pinned_copy": PinnedCopy,
    "torch_save": TorchSave,
}


def _expect(ret: int, what: str) -> None:
    if ret < 0:
        raise OSError(f"{what} failed ({ret})")
