"""The storage contract from a third party's side: a toy backend defined here, registered in the test,
is chosen by what its capabilities declare, built by the registry, and passes the shipped conformance
suite; the shipped backends' registry entries and selection messages are pinned beside it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch

from nvme_tier.config import AioSettings, OffloadStatesConfig, ZarrSettings
from nvme_tier.deepspeed.ops import INSTALL_HINT
from nvme_tier.errors import BackendUnavailableError, ConfigError, IntegrityError
from nvme_tier.storage import (
    BACKENDS,
    AioBackend,
    Capabilities,
    OwnerInfo,
    StorageBackend,
    WriterDirectory,
    ZarrBackend,
    open_backend,
    register_backend,
    registry,
    select_backend,
)
from nvme_tier.storage.base import chunk_ranges, crc32c, host_array
from nvme_tier.storage.manifest import TensorRecord
from nvme_tier.testing.conformance import BackendConformance
from nvme_tier.testing.samples import random_bytes


class ToyBackend(StorageBackend):
    """One plain file per tensor (CPU tensors only), in chunks of at most the staging budget; built
    from the config by the interface's own ``from_config``."""

    capabilities = Capabilities(
        name="toy", alignment=1, needs_libaio=False, o_direct=False, page_locked_staging=False
    )

    def __init__(
        self, directory: WriterDirectory, *, checksum: bool = True, staging_budget_bytes: int = 1 << 20
    ):
        super().__init__(directory, checksum=checksum)
        self.chunk_bytes = min(1 << 20, staging_budget_bytes)

    def file_name(self, name: str) -> str:
        return f"{name}.toy"

    def _write_bytes(self, name: str, src: torch.Tensor) -> tuple[str, int, list[int] | None]:
        file = self.file_name(name)
        crcs: list[int] | None = [] if self.checksum else None
        fd = self.directory.open(file, write=True)
        try:
            for a, b in chunk_ranges(src.numel(), self.chunk_bytes):
                if crcs is not None:
                    crcs.append(crc32c(src[a:b]))
                os.pwrite(fd, bytes(host_array(src[a:b])), a)
        finally:
            os.close(fd)
        return file, self.chunk_bytes, crcs

    def _read_bytes(self, record: TensorRecord, dst: torch.Tensor) -> None:
        path = self.directory.file_path(record.file)
        fd = self.directory.open(record.file, write=False)
        try:
            if os.fstat(fd).st_size != record.nbytes:
                raise IntegrityError(f"wrong size: {path}", path)
            for i, (a, b) in enumerate(chunk_ranges(record.nbytes, record.chunk_bytes)):
                host = torch.frombuffer(bytearray(os.pread(fd, b - a, a)), dtype=torch.uint8)
                self._check_crc(record, i, host)
                dst[a:b].copy_(host)
        finally:
            os.close(fd)

    def _remove(self, record: TensorRecord) -> None:
        if record.file:
            self.directory.remove_file(record.file)


def toy_needing(**needs: bool | int) -> type[ToyBackend]:
    """A ToyBackend that declares other needs (same name: it replaces the plain toy's entry)."""
    caps = {
        "name": "toy",
        "alignment": 1,
        "needs_libaio": False,
        "o_direct": False,
        "page_locked_staging": False,
    }
    return type("NeedyToy", (ToyBackend,), {"capabilities": Capabilities(**{**caps, **needs})})


class TestToyBackend(BackendConformance):
    """The shipped suite, run on a backend nvme_tier knows nothing about."""

    backend_cls = ToyBackend


@pytest.fixture
def registered() -> Iterator[None]:
    """Whatever a test registers is gone after it (the registry is process-wide)."""
    before = dict(BACKENDS)
    registry._warned.clear()
    yield
    BACKENDS.clear()
    BACKENDS.update(before)
    registry._warned.clear()


# -- the registry ---------------------------------------------------------------------------------
def test_shipped_backends_in_preference_order():
    assert list(BACKENDS) == ["aio", "zarr"]
    assert all(cls.capabilities.name == name for name, cls in BACKENDS.items())


@pytest.mark.parametrize("name", ["aio", "zarr"])
def test_open_backend_builds_from_the_config(tmp_path, name):
    config = OffloadStatesConfig(
        checksum=False,
        staging_budget_mb=8,
        aio=AioSettings(intra_op_parallelism=2),
        zarr=ZarrSettings(chunk_mb=2),
    )
    directory = WriterDirectory(str(tmp_path / "offload"), OwnerInfo.current())
    backend = open_backend(config, directory, name)
    assert type(backend) is BACKENDS[name]
    assert backend.directory is directory and backend.checksum is False
    assert backend.settings == (config.aio if name == "aio" else config.zarr)
    assert not os.path.exists(directory.root)  # built, no I/O


def test_register_in_front_and_open(registered, tmp_path):
    register_backend(ToyBackend, before="aio")
    assert list(BACKENDS) == ["toy", "aio", "zarr"]
    directory = WriterDirectory(str(tmp_path / "offload"), OwnerInfo.current())
    backend = open_backend(OffloadStatesConfig(staging_budget_mb=2), directory, "toy")
    assert isinstance(backend, ToyBackend) and backend.chunk_bytes == 1 << 20
    src = random_bytes(3 << 20, seed=1)
    backend.write("x", src).result()
    out = torch.empty_like(src)
    backend.read_into("x", out).result()
    assert torch.equal(out, src)
    backend.release()
    register_backend(ToyBackend)  # again: moves to the end
    assert list(BACKENDS) == ["aio", "zarr", "toy"]
    with pytest.raises(ConfigError, match="nope"):
        register_backend(ToyBackend, before="nope")


def test_unknown_name_lists_the_registered_ones(registered, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown backend 'toy' \(allowed: auto, aio, zarr\)"):
        select_backend("toy", str(tmp_path))
    register_backend(ToyBackend, before="aio")
    with pytest.raises(ConfigError, match=r"unknown backend 'x' \(allowed: auto, toy, aio, zarr\)"):
        select_backend("x", str(tmp_path))
    assert select_backend("toy", str(tmp_path)) == ("toy", "requested")


# -- selection decides from the declared capabilities -----------------------------------------------
def test_auto_takes_the_first_backend_whose_needs_are_met(registered, tmp_path):
    register_backend(ToyBackend, before="aio")
    assert select_backend("auto", str(tmp_path)) == ("toy", "it needs nothing of this host")


def test_unmet_o_direct_falls_through_in_order(registered, tmp_path, monkeypatch, caplog):
    register_backend(toy_needing(o_direct=True, alignment=4096), before="aio")
    monkeypatch.setattr(registry, "supports_o_direct", lambda path: False)
    with caplog.at_level(logging.WARNING, logger="nvme_tier"):
        name, why = select_backend("auto", str(tmp_path))
    # toy and aio both need O_DIRECT: zarr, which needs nothing, is what is left
    assert (name, why) == ("zarr", f"{str(tmp_path)!r} does not support O_DIRECT")
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("nvme_tier: backend 'auto' falls back to zarr: ")
    assert warning.endswith("To use toy: put offload_states.path on a real disk (not tmpfs) for toy")
    with pytest.raises(ConfigError, match=r"backend 'toy': .* does not support O_DIRECT .*'auto'/'zarr'"):
        select_backend("toy", str(tmp_path))


def test_needs_libaio_asks_for_the_async_io_op(registered, tmp_path, monkeypatch):
    register_backend(toy_needing(needs_libaio=True), before="aio")
    monkeypatch.setattr(registry, "aio_compatible", lambda: (False, "no libaio here"))
    assert select_backend("auto", str(tmp_path)) == ("zarr", "no libaio here")
    with pytest.raises(BackendUnavailableError) as err:
        select_backend("toy", str(tmp_path))
    assert str(err.value) == f"offload_states.backend 'toy': no libaio here; {INSTALL_HINT}"
    with pytest.raises(BackendUnavailableError, match="^offload_states.backend 'aio': no libaio here"):
        select_backend("aio", str(tmp_path))


def test_page_locked_staging_is_sized_from_the_backend(registered, tmp_path, monkeypatch):
    asked: list[int] = []

    def shortfall(nbytes: int) -> str:
        asked.append(nbytes)
        return "ulimit -l is too low"

    register_backend(toy_needing(page_locked_staging=True), before="aio")
    monkeypatch.setattr(registry, "memlock_shortfall", shortfall)
    config = OffloadStatesConfig(staging_budget_mb=8)
    with pytest.raises(
        BackendUnavailableError, match=r"'toy': ulimit -l is too low; .*or use backend 'zarr'$"
    ):
        select_backend("toy", str(tmp_path), config)
    assert asked == [8 << 20]  # the default: one slot of the whole staging budget
    assert select_backend("auto", str(tmp_path), config)[0] == "zarr"  # aio stages page-locked too


def test_declared_alignment_is_checked_against_the_device(registered, tmp_path, monkeypatch):
    register_backend(toy_needing(o_direct=True, alignment=4096), before="aio")
    monkeypatch.setattr(registry, "supports_o_direct", lambda path: True)
    monkeypatch.setattr(registry, "logical_block_size", lambda path: 4096)
    assert select_backend("toy", str(tmp_path)) == ("toy", "requested")
    assert select_backend("auto", str(tmp_path)) == ("toy", "O_DIRECT supported")
    monkeypatch.setattr(registry, "logical_block_size", lambda path: 1 << 16)
    with pytest.raises(ConfigError, match=r"backend 'toy' writes in 4096 B units, .*\(65536 B\)"):
        select_backend("auto", str(tmp_path))


def test_a_backend_without_file_name_is_not_a_backend():
    class Incomplete(StorageBackend):
        capabilities = ToyBackend.capabilities
        _write_bytes = ToyBackend._write_bytes
        _read_bytes = ToyBackend._read_bytes
        _remove = ToyBackend._remove

    with pytest.raises(TypeError, match="file_name"):
        Incomplete(WriterDirectory("/nonexistent", OwnerInfo.current()))


def test_the_conformance_suite_catches_a_broken_alignment_promise(tmp_path):
    """A backend declaring 4096 B alignment that writes unpadded files fails the shipped case."""
    liar = toy_needing(alignment=4096)
    suite = BackendConformance()
    suite.backend_cls = liar
    backend = liar(
        WriterDirectory(str(tmp_path / "offload"), OwnerInfo.current()), staging_budget_bytes=1 << 20
    )
    try:
        with pytest.raises(AssertionError, match="alignment"):
            suite.test_declared_alignment_is_honoured(lambda **kw: backend)
    finally:
        backend.release()


def test_shipped_backends_declare_what_selection_checks():
    aio, zarr = AioBackend.capabilities, ZarrBackend.capabilities
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
    assert AioBackend.staging_slots(OffloadStatesConfig(staging_budget_mb=512)) == (4, 128 << 20)
