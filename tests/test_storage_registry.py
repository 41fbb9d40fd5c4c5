"""The storage contract from a third party's side: a toy store defined here, registered in the test,
is chosen by what its capabilities declare, built by the registry, named in the config and passes
the shipped conformance suite; the shipped stores' registry entries and selection messages are
pinned beside it. Each test uses a registry of its own (``StoreRegistry``), never the process's."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from importlib.metadata import EntryPoint

import pytest
import torch

from nvme_tier.config import AioSettings, OffloadStatesConfig, ZarrSettings
from nvme_tier.deepspeed.ops import INSTALL_HINT
from nvme_tier.errors import BackendUnavailableError, ConfigError, IntegrityError
from nvme_tier.storage import (
    AioStore,
    BlockFile,
    BlockStore,
    Capabilities,
    FutureSlot,
    OwnerInfo,
    StoreRegistry,
    WriterDirectory,
    ZarrStore,
    registry,
)
from nvme_tier.storage.checksums import host_array
from nvme_tier.storage.staging import HostBuffer
from nvme_tier.testing.conformance import StoreConformance
from nvme_tier.testing.samples import random_bytes


class ToyFile(BlockFile):
    """A plain file, one synchronous pread/pwrite per chunk (the request is done when it returns)."""

    def __init__(self, path: str, fd: int):
        super().__init__(path)
        self.fd = fd

    def padded(self, length: int) -> int:
        return length

    def pwrite(self, slot: FutureSlot, view: torch.Tensor, index: int, offset: int) -> None:
        os.pwrite(self.fd, host_array(view), offset)

    def pread(self, slot: FutureSlot, view: torch.Tensor, index: int, offset: int) -> None:
        os.preadv(self.fd, [host_array(view)], offset)

    def close(self) -> None:
        os.close(self.fd)


class ToyStore(BlockStore):
    """One plain file per key, in chunks of at most 1 MiB through one staging slot: what a
    third-party store writes (its class, its file, nothing else)."""

    capabilities = Capabilities(
        name="toy", alignment=1, needs_libaio=False, o_direct=False, page_locked_staging=False
    )
    suffix = ".toy"

    def chunk_for(self, nbytes: int) -> int:
        return min(1 << 20, self.staging_budget_bytes)

    @contextlib.contextmanager
    def slots(self, chunk_bytes: int, reading: bool) -> Iterator[list[FutureSlot]]:
        make = lambda: HostBuffer(chunk_bytes)  # noqa: E731
        with self.checked_out(("toy", chunk_bytes), 1, chunk_bytes, make, reading) as slots:
            yield [FutureSlot(slot.buffer) for slot in slots]

    def open_write(self, key, nbytes, chunk_bytes, reuse=None) -> ToyFile:
        self.delete(key)
        return ToyFile(self.directory.file_path(key), self.directory.open(key, write=True, exclusive=True))

    def open_read(self, key, nbytes, chunk_bytes) -> ToyFile:
        file = ToyFile(self.directory.file_path(key), self.directory.open(key, write=False))
        if os.fstat(file.fd).st_size != nbytes:
            file.close()
            raise IntegrityError(f"wrong size: {file.path}", file.path)
        return file

    def delete(self, key: str) -> None:
        self.directory.remove_file(key)


def toy_needing(**needs: bool | int) -> type[ToyStore]:
    """A ToyStore that declares other needs (same name: it replaces the plain toy's entry)."""
    caps = {
        "name": "toy",
        "alignment": 1,
        "needs_libaio": False,
        "o_direct": False,
        "page_locked_staging": False,
    }
    return type("NeedyToy", (ToyStore,), {"capabilities": Capabilities(**{**caps, **needs})})


class TestToyStore(StoreConformance):
    """The shipped suite, run on a store nvme_tier knows nothing about."""

    store_cls = ToyStore


@pytest.fixture
def stores() -> StoreRegistry:
    """A registry of this test only: the shipped stores, no entry points."""
    return StoreRegistry(entry_point_group=None)


# -- the registry ---------------------------------------------------------------------------------
def test_shipped_backends_in_preference_order(stores):
    assert stores.names() == ["aio", "zarr"]
    assert all(stores.store_class(name).capabilities.name == name for name in stores.names())


@pytest.mark.parametrize("name", ["aio", "zarr"])
def test_open_backend_builds_from_the_config(stores, tmp_path, name):
    config = OffloadStatesConfig(
        checksum=False,
        staging_budget_mb=8,
        aio=AioSettings(intra_op_parallelism=2),
        zarr=ZarrSettings(chunk_mb=2),
    )
    directory = WriterDirectory(str(tmp_path / "offload"), OwnerInfo.current())
    backend = stores.open(config, directory, name)
    assert type(backend.store) is stores.store_class(name)
    assert backend.directory is directory and backend.checksum is False
    assert backend.store.settings == (config.aio if name == "aio" else config.zarr)
    assert not os.path.exists(directory.root)  # built, no I/O


def test_register_in_front_and_open(stores, tmp_path):
    stores.register(ToyStore, before="aio")
    assert stores.names() == ["toy", "aio", "zarr"]
    directory = WriterDirectory(str(tmp_path / "offload"), OwnerInfo.current())
    backend = stores.open(OffloadStatesConfig(staging_budget_mb=2), directory, "toy")
    assert isinstance(backend.store, ToyStore) and backend.store.chunk_for(3 << 20) == 1 << 20
    src = random_bytes(3 << 20, seed=1)
    backend.write("x", src).result()
    out = torch.empty_like(src)
    backend.read_into("x", out).result()
    assert torch.equal(out, src)
    backend.release()
    stores.register(ToyStore)  # again: moves to the end
    assert stores.names() == ["aio", "zarr", "toy"]
    with pytest.raises(ConfigError, match="nope"):
        stores.register(ToyStore, before="nope")


def test_unknown_name_lists_the_registered_ones(stores, tmp_path):
    with pytest.raises(
        ConfigError, match=r"backend: unknown backend 'toy' \(allowed: 'auto', 'aio' or 'zarr'"
    ):
        stores.select("toy", str(tmp_path))
    stores.register(ToyStore, before="aio")
    with pytest.raises(ConfigError, match=r"unknown backend 'x' \(allowed: 'auto', 'toy', 'aio' or 'zarr'"):
        stores.select("x", str(tmp_path))
    assert stores.select("toy", str(tmp_path)) == ("toy", "requested")


def test_a_registered_store_is_named_in_the_config(stores):
    """The config takes any name; whether a store has it is checked at attach (and by select)."""
    config = OffloadStatesConfig.parse({"backend": "toy"})
    with pytest.raises(ConfigError, match=r"offload_states\.backend: unknown backend 'toy'"):
        stores.check_name(config.backend)
    stores.register(ToyStore)
    stores.check_name(config.backend)
    with pytest.raises(ConfigError, match=r"offload_states\.backend"):
        OffloadStatesConfig.parse({"backend": "../x"})


def test_entry_point_group_finds_third_party_stores(monkeypatch):
    found = [EntryPoint("toy", f"{__name__}:ToyStore", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(
        registry, "entry_points", lambda group: found if group == registry.ENTRY_POINT_GROUP else []
    )
    assert StoreRegistry().names() == ["aio", "zarr", "toy"]
    broken = [EntryPoint("gone", "no_such_module_xyz:Store", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: broken)
    assert StoreRegistry().names() == ["aio", "zarr"]  # a broken plugin is left out, with a warning


# -- selection decides from the declared capabilities -----------------------------------------------
def test_auto_takes_the_first_backend_whose_needs_are_met(stores, tmp_path):
    stores.register(ToyStore, before="aio")
    assert stores.select("auto", str(tmp_path)) == ("toy", "it needs nothing of this host")


def test_unmet_o_direct_falls_through_in_order(stores, tmp_path, monkeypatch, caplog):
    stores.register(toy_needing(o_direct=True, alignment=4096), before="aio")
    monkeypatch.setattr(registry, "supports_o_direct", lambda path: False)
    with caplog.at_level(logging.WARNING, logger="nvme_tier"):
        name, why = stores.select("auto", str(tmp_path))
    # toy and aio both need O_DIRECT: zarr, which needs nothing, is what is left
    assert (name, why) == ("zarr", f"{str(tmp_path)!r} does not support O_DIRECT")
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("nvme_tier: backend 'auto' falls back to zarr: ")
    assert warning.endswith("To use toy: put offload_states.path on a real disk (not tmpfs) for toy")
    with pytest.raises(ConfigError, match=r"backend 'toy': .* does not support O_DIRECT .*'auto'/'zarr'"):
        stores.select("toy", str(tmp_path))


def test_needs_libaio_asks_for_the_async_io_op(stores, tmp_path, monkeypatch):
    stores.register(toy_needing(needs_libaio=True), before="aio")
    monkeypatch.setattr(registry, "aio_compatible", lambda: (False, "no libaio here"))
    assert stores.select("auto", str(tmp_path)) == ("zarr", "no libaio here")
    with pytest.raises(BackendUnavailableError) as err:
        stores.select("toy", str(tmp_path))
    assert str(err.value) == f"offload_states.backend 'toy': no libaio here; {INSTALL_HINT}"
    with pytest.raises(BackendUnavailableError, match="^offload_states.backend 'aio': no libaio here"):
        stores.select("aio", str(tmp_path))


def test_page_locked_staging_is_sized_from_the_backend(stores, tmp_path, monkeypatch):
    asked: list[int] = []

    def shortfall(nbytes: int) -> str:
        asked.append(nbytes)
        return "ulimit -l is too low"

    stores.register(toy_needing(page_locked_staging=True), before="aio")
    monkeypatch.setattr(registry, "memlock_shortfall", shortfall)
    config = OffloadStatesConfig(staging_budget_mb=8)
    with pytest.raises(
        BackendUnavailableError, match=r"'toy': ulimit -l is too low; .*or use backend 'zarr'$"
    ):
        stores.select("toy", str(tmp_path), config)
    assert asked == [8 << 20]  # the default: one slot of the whole staging budget
    assert stores.select("auto", str(tmp_path), config)[0] == "zarr"  # aio stages page-locked too


def test_declared_alignment_is_checked_against_the_device(stores, tmp_path, monkeypatch):
    stores.register(toy_needing(o_direct=True, alignment=4096), before="aio")
    monkeypatch.setattr(registry, "supports_o_direct", lambda path: True)
    monkeypatch.setattr(registry, "logical_block_size", lambda path: 4096)
    assert stores.select("toy", str(tmp_path)) == ("toy", "requested")
    assert stores.select("auto", str(tmp_path)) == ("toy", "O_DIRECT supported")
    monkeypatch.setattr(registry, "logical_block_size", lambda path: 1 << 16)
    with pytest.raises(ConfigError, match=r"backend 'toy' writes in 4096 B units, .*\(65536 B\)"):
        stores.select("auto", str(tmp_path))


def test_a_store_without_open_read_is_not_a_store():
    class Incomplete(BlockStore):
        capabilities = ToyStore.capabilities
        suffix = ".toy"
        chunk_for = ToyStore.chunk_for
        slots = ToyStore.slots
        open_write = ToyStore.open_write
        delete = ToyStore.delete

    with pytest.raises(TypeError, match="open_read"):
        Incomplete(WriterDirectory("/nonexistent", OwnerInfo.current()))


def test_the_conformance_suite_catches_a_broken_alignment_promise(tmp_path):
    """A store declaring 4096 B alignment that writes unpadded files fails the shipped case."""
    liar = toy_needing(alignment=4096)
    suite = StoreConformance()
    suite.store_cls = liar
    backend = suite.make_backend(
        WriterDirectory(str(tmp_path / "offload"), OwnerInfo.current()), staging_budget_bytes=1 << 20
    )
    try:
        with pytest.raises(AssertionError, match="alignment"):
            suite.test_declared_alignment_is_honoured(lambda **kw: backend)
    finally:
        backend.release()


def test_shipped_backends_declare_what_selection_checks():
    aio, zarr = AioStore.capabilities, ZarrStore.capabilities
    assert (aio.needs_libaio, aio.o_direct, aio.page_locked_staging, aio.alignment) == (
        True,
        True,
        True,
        4096,
    )
    assert (zarr.needs_libaio, zarr.o_direct, zarr.page_locked_staging, zarr.alignment) == (
        False,
        False,
        False,
        1,
    )
    assert AioStore.staging_slots(512 << 20, AioSettings()) == (4, 128 << 20)
    assert (aio.rewrite_in_place, aio.drops_write_errors, zarr.rewrite_in_place) == (True, True, False)
