"""The conformance suite every block store must pass, shipped for third-party stores.

As ``zarr.testing.store.StoreTests`` does for zarr stores: subclass ``StoreConformance`` in your
own test suite, say which store it builds, and pytest runs every case against it::

    from nvme_tier.testing.conformance import StoreConformance

    class TestMyStore(StoreConformance):
        store_cls = MyStore              # MyStore(directory, **kw), a BlockStore subclass
                                         # (capabilities, suffix, chunk_for, slots, open_write,
                                         # open_read, delete)

        # optional: where the writer directories go (default: a fresh tmp_path/offload)
        @pytest.fixture
        def root(self, tmp_path):
            return str(tmp_path / "offload")

Every case runs: the block-store ones (nvme_tier.testing.contract: the declared capabilities are
consistent and honoured on disk, objects by key, the registry builds the store from the config)
and the ones below, on named tensors (``StorageBackend``) over the store. ``make_store(directory,
**kw)`` may be overridden instead of ``store_cls`` (extra constructor arguments), and
``make_backend`` to wrap the upper layer; the ``new_backend`` fixture releases every backend it
made. The cases pass ``staging_budget_bytes`` for the memory-bounded ones. Corruption targets are
found from ``record.file`` under the writer directory: a single file (aio: ``<name>.bin``) or a
directory of chunk files (zarr: ``<name>.zarr/c/<i>``), so no case branches on the store.

Importing this module needs pytest (``pip install nvme_tier[test]``); ``nvme_tier`` itself does not.
"""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

from ..errors import ConfigError, IntegrityError
from ..fingerprint import fingerprint
from ..storage.manifest import OwnerInfo, WriterDirectory
from ..units import MiB
from .contract import ContractCases, data_files
from .samples import DTYPES, random_bytes, random_tensor, same_bits


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def round_trip(backend, name: str, tensor: torch.Tensor) -> torch.Tensor:
    backend.write(name, tensor).result()
    out = torch.empty_like(tensor)
    backend.read_into(name, out).result()
    return out


class StoreConformance(ContractCases):
    """The cases every store must pass. Not collected itself (no ``Test`` prefix): subclass it.

    Set ``store_cls`` (constructed as ``store_cls(directory, **kw)``, where ``kw`` may hold
    ``staging_budget_bytes``), or override ``make_store`` when construction needs more; the
    fixtures and the cases about the block-store interface come from ``ContractCases``.
    """

    # -- sizes and dtypes ------------------------------------------------------------------------
    @pytest.mark.parametrize("nbytes", [1, 4095, 4096, 4097, 1_000_003])
    def test_odd_sizes(self, backend, nbytes):
        src = random_bytes(nbytes, seed=nbytes)
        record = backend.write("odd", src).result()
        assert record.nbytes == nbytes
        assert record.shape == (nbytes,)
        assert record.dtype == "uint8"
        assert torch.equal(round_trip(backend, "odd", src), src)

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    def test_every_dtype_is_bit_exact(self, backend, dtype):
        src = random_tensor(dtype, (3, 257), seed=7)
        record = backend.write("t", src).result()
        assert record.dtype == str(dtype).removeprefix("torch.")
        assert record.shape == (3, 257)
        assert same_bits(round_trip(backend, "t", src), src)

    def test_zero_size(self, backend):
        src = torch.empty(0, 5, dtype=torch.bfloat16)
        record = backend.write("empty", src).result()
        assert (record.nbytes, record.shape) == (0, (0, 5))
        out = torch.empty(0, 5, dtype=torch.bfloat16)
        backend.read_into("empty", out).result()
        assert backend.names() == ["empty"]
        with pytest.raises(ValueError, match="empty"):
            backend.read_into("empty", torch.empty(1, dtype=torch.uint8))

    def test_zero_dim_tensor(self, backend):
        src = torch.tensor(-2.5, dtype=torch.float64)
        record = backend.write("scalar", src).result()
        assert record.shape == () and record.nbytes == 8
        out = torch.empty((), dtype=torch.float64)
        backend.read_into("scalar", out).result()
        assert out.item() == -2.5

    def test_many_small_tensors(self, backend):
        tensors = {f"p.{i}": random_bytes(1 + (i * 37) % 300, seed=i) for i in range(200)}
        futures = [backend.write(name, t) for name, t in tensors.items()]
        for f in futures:
            f.result()
        assert backend.names() == sorted(tensors)
        assert backend.stored_bytes() == sum(t.numel() for t in tensors.values())
        outs = {name: torch.empty_like(t) for name, t in tensors.items()}
        reads = [backend.read_into(name, outs[name]) for name in tensors]
        for f in reads:
            f.result()
        for name, t in tensors.items():
            assert torch.equal(outs[name], t), name
        backend.commit()
        backend.verify_manifest()

    def test_tensor_larger_than_staging_budget(self, new_backend):
        budget = 4 * MiB
        backend = new_backend(staging_budget_bytes=budget)
        src = random_bytes(20 * MiB + 12_345, seed=3)
        record = backend.write("big", src).result()
        assert record.chunk_bytes <= budget
        assert record.crc32c is not None and len(record.crc32c) > 1
        assert getattr(backend, "pinned_bytes", 0) <= budget
        out = torch.zeros_like(src)
        backend.read_into("big", out).result()
        assert torch.equal(out, src)
        assert getattr(backend, "pinned_bytes", 0) <= budget

    def test_several_futures_in_flight(self, new_backend):
        backend = new_backend(staging_budget_bytes=2 * MiB)
        tensors = [random_bytes(300_000 + 4099 * i, seed=i) for i in range(8)]
        writes = [backend.write(f"s{i}", t) for i, t in enumerate(tensors)]
        records = [f.result() for f in writes]
        assert [r.name for r in records] == [f"s{i}" for i in range(8)]
        outs = [torch.zeros_like(t) for t in tensors]
        reads = [backend.read_into(f"s{i}", out) for i, out in enumerate(outs)]
        assert all(f.result() is None for f in reads)
        for out, t in zip(outs, tensors, strict=True):
            assert torch.equal(out, t)

    def test_read_queued_behind_its_write(self, backend):
        """read_into right after write (no wait) reads what that write stores, old name or new."""
        first, second = random_bytes(10_000, 1), random_bytes(70_001, 2)
        backend.write("x", first).result()
        backend.write("x", second)  # not awaited: the read below must see it
        out = torch.empty_like(second)
        backend.read_into("x", out).result()
        assert torch.equal(out, second)
        fresh = random_bytes(5000, 3)
        backend.write("new", fresh)
        got = torch.empty_like(fresh)
        backend.read_into("new", got).result()
        assert torch.equal(got, fresh)

    def test_overwrite_with_a_different_size(self, backend):
        big, small = random_bytes(1_000_003, 1), random_bytes(4097, 2)
        backend.write("w", big).result()
        before = sum(os.path.getsize(p) for p in data_files(backend, "w"))
        record = backend.write("w", small).result()
        assert record.nbytes == 4097
        assert sum(os.path.getsize(p) for p in data_files(backend, "w")) < before
        assert torch.equal(round_trip(backend, "w", small), small)
        with pytest.raises(ValueError, match="'w'"):
            backend.read_into("w", torch.empty_like(big))
        bigger = random_bytes(2_000_000, 3)
        assert torch.equal(round_trip(backend, "w", bigger), bigger)
        assert backend.names() == ["w"] and backend.stored_bytes() == 2_000_000

    def test_read_into_wrong_size(self, backend):
        backend.write("sized.name", random_bytes(1000)).result()
        with pytest.raises(ValueError, match=r"sized\.name"):
            backend.read_into("sized.name", torch.empty(999, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"sized\.name"):
            backend.read_into("sized.name", torch.empty(251, dtype=torch.float32))

    def test_unknown_name_and_delete(self, backend):
        with pytest.raises(KeyError, match="nope"):
            backend.read_into("nope", torch.empty(1))
        backend.write("gone", random_bytes(5000)).result()
        files = data_files(backend, "gone")
        backend.delete("gone")
        assert backend.names() == []
        assert not any(os.path.exists(p) for p in files)
        with pytest.raises(KeyError):
            backend.record("gone")

    @pytest.mark.parametrize("name", ["..", "../x", "a/b", "/abs", "", ".hidden", "x" * 129])
    def test_bad_names_refused(self, backend, name):
        with pytest.raises(ConfigError):
            backend.write(name, torch.zeros(4))

    def test_non_contiguous_source_refused(self, backend):
        src = torch.arange(100, dtype=torch.float32).reshape(10, 10).t()
        with pytest.raises(ValueError, match="contiguous"):
            backend.write("nc", src)
        assert backend.names() == []
        backend.write("c", src.contiguous()).result()
        with pytest.raises(ValueError, match="contiguous"):
            backend.read_into("c", torch.empty(10, 10).t())

    # -- corruption ----------------------------------------------------------------------------------
    def test_flipped_byte_is_caught(self, backend):
        src = random_bytes(1_000_003, 5)
        backend.write("f", src).result()
        target = data_files(backend, "f")[-1]
        flip_byte(target, 12_345)
        with pytest.raises(IntegrityError) as info:
            backend.read_into("f", torch.empty_like(src)).result()
        assert info.value.filename == target
        assert target in str(info.value)

    def test_flipped_byte_in_a_later_chunk_names_that_chunk(self, new_backend):
        backend = new_backend(staging_budget_bytes=2 * MiB)
        src = random_bytes(5 * MiB + 7, 6)
        backend.write("f", src).result()
        files = data_files(backend, "f")
        target, offset = files[-1], 10
        if len(files) == 1:  # one file: flip inside the last chunk
            offset = src.numel() - 3
        flip_byte(target, offset)
        with pytest.raises(IntegrityError) as info:
            backend.read_into("f", torch.empty_like(src)).result()
        assert info.value.filename == target

    def test_truncated_file(self, backend):
        src = random_bytes(1_000_003, 8)
        backend.write("t", src).result()
        target = data_files(backend, "t")[-1]
        os.truncate(target, os.path.getsize(target) // 2)
        with pytest.raises(IntegrityError) as info:
            backend.read_into("t", torch.empty_like(src)).result()
        assert info.value.filename.startswith(backend.directory.file_path(backend.record("t").file))

    @pytest.mark.parametrize("what", ["data file", "whole entry"])
    def test_missing_file(self, backend, what):
        src = random_bytes(70_000, 9)
        backend.write("m", src).result()
        top = backend.directory.file_path(backend.record("m").file)
        if what == "data file":
            os.unlink(data_files(backend, "m")[0])
        elif os.path.isdir(top):
            shutil.rmtree(top)
        else:
            os.unlink(top)
        with pytest.raises(IntegrityError, match="missing") as info:
            backend.read_into("m", torch.empty_like(src)).result()
        assert info.value.filename.startswith(top)

    def test_manifest_of_another_writer_is_refused(self, new_backend):
        mine, theirs = new_backend(), new_backend()
        mine.write("x", random_bytes(3000, 1)).result()
        theirs.write("x", random_bytes(3000, 2)).result()
        with pytest.raises(IntegrityError, match="missing"):
            mine.verify_manifest()  # nothing committed yet
        mine.commit()
        theirs.commit()
        mine.verify_manifest()
        theirs.verify_manifest()
        manifest = mine.directory.file_path("manifest.json")
        shutil.copyfile(theirs.directory.file_path("manifest.json"), manifest)
        with pytest.raises(IntegrityError, match="belongs to writer") as info:
            mine.verify_manifest()
        assert info.value.filename == manifest

    def test_fingerprint_is_recorded_and_committed(self, backend):
        src = random_bytes(5000)
        digest = fingerprint(src)
        assert backend.write("f", src, fingerprint=digest).result().fingerprint == digest
        assert backend.write("g", src).result().fingerprint is None
        backend.commit()
        assert backend.directory.load_manifest()["f"].fingerprint == digest
        backend.verify_manifest()  # the committed record, fingerprint included, is what was written

    def test_stale_manifest_is_refused(self, backend):
        backend.write("x", random_bytes(3000, 1)).result()
        backend.commit()
        backend.write("x", random_bytes(3000, 2)).result()  # rewritten, not committed
        with pytest.raises(IntegrityError):
            backend.verify_manifest()
        backend.commit()
        backend.verify_manifest()

    # -- files, directories, permissions -------------------------------------------------------------
    def test_root_with_spaces_and_non_ascii(self, tmp_path, new_backend):
        root = str(tmp_path / "dir with spaces" / "ünïcødé 日本 ñ")
        backend = new_backend(at=root)
        src = random_bytes(123_457, 4)
        assert torch.equal(round_trip(backend, "s", src), src)
        backend.commit()
        backend.verify_manifest()
        assert backend.directory.path.startswith(root)
        backend.release()
        assert not os.path.exists(backend.directory.path)
        assert os.path.isdir(root)

    def test_private_file_and_directory_modes(self, backend):
        old = os.umask(0o022)
        try:
            backend.write("a", random_bytes(5000)).result()
            backend.write("b", random_bytes(1_000_003)).result()
            backend.commit()
        finally:
            os.umask(old)
        path = backend.directory.path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        seen = 0
        for dirpath, dirs, files in os.walk(path):
            for d in dirs:
                assert stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode) == 0o700, d
            for f in files:
                full = os.path.join(dirpath, f)
                assert stat.S_IMODE(os.lstat(full).st_mode) == 0o600, full
                seen += 1
        assert seen >= 4  # owner.json, manifest.json and the data

    def test_constructor_does_no_io(self, root):
        directory = WriterDirectory(root, OwnerInfo.current())
        self.make_backend(directory)
        assert not os.path.exists(root)

    def test_release_removes_the_writer_directory(self, new_backend, root):
        backend, other = new_backend(), new_backend()
        backend.write("x", random_bytes(10_000)).result()
        other.write("x", random_bytes(10_000)).result()
        backend.commit()
        path = backend.directory.path
        assert os.path.isdir(path)
        backend.release()
        assert not os.path.exists(path)
        assert os.path.isdir(other.directory.path)
        assert backend.names() == []
        backend.release()  # idempotent

    def test_two_writers_on_one_root_do_not_collide(self, new_backend):
        a, b = new_backend(), new_backend()
        ta, tb = random_bytes(50_000, 1), random_bytes(60_000, 2)
        fa, fb = a.write("same", ta), b.write("same", tb)
        fa.result(), fb.result()
        assert a.directory.path != b.directory.path
        assert a.directory.root == b.directory.root
        a.commit(), b.commit()
        out_a, out_b = torch.empty_like(ta), torch.empty_like(tb)
        a.read_into("same", out_a).result()
        b.read_into("same", out_b).result()
        assert torch.equal(out_a, ta) and torch.equal(out_b, tb)
        a.release()
        out_b.zero_()
        b.read_into("same", out_b).result()
        assert torch.equal(out_b, tb)
        b.verify_manifest()
