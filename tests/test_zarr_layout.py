"""The zarr backend's files are a real zarr v3 array: zarr itself reads back exactly what was written.

Uncompressed chunk files are written by nvme_tier (O_DIRECT for page-multiple chunks where the
filesystem takes it, buffered otherwise: the 100-byte tensor's single chunk), compressed ones by
zarr; both must open with ``zarr.open_array`` and hold the bytes.
"""

from __future__ import annotations

import pytest
import torch
import zarr

from nvme_tier.config import ZarrSettings
from nvme_tier.storage import OwnerInfo, StorageBackend, WriterDirectory, ZarrStore
from nvme_tier.units import MiB

SIZES = [4 * MiB, 3 * MiB + 12_345, 100]  # whole chunks, a padded last chunk, one tiny chunk


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_zarr_reads_what_the_backend_wrote(tmp_path, codec):
    root = str(tmp_path)
    settings = ZarrSettings(chunk_mb=1, codec=codec, concurrency=3)
    backend = StorageBackend(
        ZarrStore(
            WriterDirectory(root, OwnerInfo.current(label="layout")),
            settings=settings,
            staging_budget_bytes=2 * MiB,
        )
    )
    try:
        gen = torch.Generator().manual_seed(0)
        for i, n in enumerate(SIZES):
            src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
            record = backend.write(f"t{i}", src).result()
            array = zarr.open_array(
                zarr.storage.LocalStore(backend.directory.path), path=record.file, mode="r"
            )
            assert array.shape == (n,) and array.chunks == (min(MiB, n),)
            assert torch.equal(torch.from_numpy(array[:]), src)
            out = torch.zeros_like(src)
            backend.read_into(f"t{i}", out).result()
            assert torch.equal(out, src)
    finally:
        backend.release()
