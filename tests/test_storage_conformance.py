"""The storage conformance suite (nvme_tier.testing.conformance) run against the shipped stores,
plus the cases that hold for one store only."""

from __future__ import annotations

import os

import pytest
import torch

from nvme_tier.config import AioSettings
from nvme_tier.deepspeed.ops import aio_compatible
from nvme_tier.storage import AioStore, ZarrStore, supports_o_direct
from nvme_tier.testing.conformance import StoreConformance, data_files
from nvme_tier.testing.samples import random_bytes

AIO_OK, AIO_WHY = aio_compatible()


@pytest.mark.aio
@pytest.mark.skipif(not AIO_OK, reason=f"aio backend unavailable: {AIO_WHY} (apt-get install -y libaio-dev)")
class TestAioStore(StoreConformance):
    @pytest.fixture(autouse=True)
    def _needs_o_direct(self, tmp_path):
        if not supports_o_direct(str(tmp_path)):
            pytest.skip(f"{tmp_path} does not support O_DIRECT (tmpfs?)")

    store_cls = AioStore

    def test_on_disk_length_is_padded_to_the_alignment(self, backend):
        backend.write("p", random_bytes(4097)).result()
        (path,) = data_files(backend, "p")
        assert os.path.getsize(path) % backend.store.alignment == 0
        assert os.path.getsize(path) >= 4097

    def test_thousands_of_requests_complete(self, new_backend):
        """DeepSpeed <0.18.4 keeps the GIL in aio_handle.wait(): a wait that is not settled
        (deepspeed.aio_binding.aio_wait) deadlocked within a few hundred requests. 2 x 1024 requests here; a hang
        fails CI's time limit."""
        backend = new_backend(staging_budget_bytes=2 * 4096, settings=AioSettings(intra_op_parallelism=1))
        assert backend.store.chunk_bytes == 4096
        src = random_bytes(4096 * 1024 - 100, seed=7)
        record = backend.write("many", src).result()
        assert len(record.crc32c) == 1024
        out = torch.zeros_like(src)
        backend.read_into("many", out).result()
        assert torch.equal(out, src)


class TestZarrStore(StoreConformance):
    store_cls = ZarrStore
