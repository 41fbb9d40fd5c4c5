"""nvme_tier.testing.faults on a real backend, without an engine: the wrapper is transparent until
its planned fault, and each fault looks like the real one (typed error naming the file, torn file
on disk, destination really overwritten). The engine-level fault tests are test_faults.py."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from nvme_tier.errors import TierIOError
from nvme_tier.storage import OwnerInfo, StorageBackend, WriterDirectory, ZarrStore
from nvme_tier.testing.conformance import StoreConformance, data_files
from nvme_tier.testing.faults import FaultPlan
from nvme_tier.testing.samples import random_bytes


class TestFaultWrapperWithoutFaults(StoreConformance):
    """With nothing planned, the wrapper passes every conformance case of the backend it wraps."""

    store_cls = ZarrStore

    def make_backend(self, directory, checksum=True, **kw):
        return FaultPlan().wrap(StorageBackend(ZarrStore(directory, **kw), checksum=checksum))


@pytest.fixture
def zarr_backend(tmp_path):
    backend = StorageBackend(ZarrStore(WriterDirectory(str(tmp_path / "offload"), OwnerInfo.current())))
    yield backend
    backend.release()


def test_kth_write_fails_after_a_torn_half(zarr_backend):
    plan = FaultPlan(fail_at=2, errno=errno.EIO)
    faulty = plan.wrap(zarr_backend)
    public = [m for m in vars(StorageBackend) if not m.startswith("_")]
    assert all(hasattr(faulty, m) for m in public)  # usable wherever a backend is
    faulty.write("a", random_bytes(10_000, 1)).result()
    with pytest.raises(TierIOError) as err:
        faulty.write("b", random_bytes(10_000, 2)).result()
    assert err.value.errno == errno.EIO and err.value.filename in str(err.value)
    assert err.value.filename == zarr_backend.directory.file_path(zarr_backend.file_name("b"))
    assert zarr_backend.record("b").nbytes == 5_000  # the torn half is really on disk
    assert all(os.path.exists(p) for p in data_files(zarr_backend, "b"))
    assert (plan.writes, plan.fired) == (2, 1)
    faulty.write("c", random_bytes(100, 3)).result()  # once: later writes work again


def test_kth_read_fails_after_the_real_read(zarr_backend):
    plan = FaultPlan(read_fail_at=1)
    faulty = plan.wrap(zarr_backend)
    src = random_bytes(4096, 4)
    faulty.write("x", src).result()
    out = torch.zeros_like(src)
    with pytest.raises(TierIOError, match="reading") as err:
        faulty.read_into("x", out).result()
    assert err.value.filename == zarr_backend.directory.file_path(zarr_backend.record("x").file)
    assert torch.equal(out, src)


def test_commit_and_delete_faults_raise_os_errors(zarr_backend):
    faulty = FaultPlan(fail_commit=True, errno=errno.ENOSPC, remove_fails=True).wrap(zarr_backend)
    faulty.write("x", random_bytes(100)).result()
    with pytest.raises(OSError) as err:
        faulty.commit()
    assert err.value.errno == errno.ENOSPC and err.value.filename.endswith("manifest.json")
    with pytest.raises(OSError):
        faulty.delete("x")
    assert zarr_backend.names() == ["x"]  # its files stay


def test_hang_never_completes_but_says_so(zarr_backend, capsys):
    plan = FaultPlan(fail_at=1, mode="hang")
    future = plan.wrap(zarr_backend).write("h", random_bytes(8192))
    assert plan.hanging.wait(30)
    assert not future.done()
    assert capsys.readouterr().out.startswith("HANGING " + zarr_backend.directory.path)
