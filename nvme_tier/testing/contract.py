"""The contract half of the conformance suite: a backend does what it declares.

``ContractCases`` holds the fixtures every conformance case uses (see ``BackendConformance``, which
subclasses it and is what a backend's test suite subclasses) and the cases about the interface
itself: the declared ``Capabilities`` are consistent and honoured on disk, ``file_name`` names the
file a record points at, ``from_config`` builds a working backend without I/O.

Importing this module needs pytest; ``nvme_tier`` itself does not import it.
"""

from __future__ import annotations

import os

import pytest
import torch

from ..config import OffloadStatesConfig
from ..storage.base import Capabilities, StorageBackend
from ..storage.manifest import OwnerInfo, WriterDirectory
from ..storage.registry import BACKENDS
from ..units import MiB
from .samples import random_bytes


def data_files(backend: StorageBackend, name: str) -> list[str]:
    """The files holding ``name``'s bytes: the file itself, or every chunk file below it."""
    top = backend.directory.file_path(backend.record(name).file)
    if not os.path.isdir(top):
        return [top]
    found = []
    for dirpath, _dirs, files in os.walk(os.path.join(top, "c")):
        found += [os.path.join(dirpath, f) for f in files]
    return sorted(found, key=lambda p: int(os.path.basename(p)))


class ContractCases:
    """Fixtures, and the cases about what a backend declares. Subclass ``BackendConformance``.

    Set ``backend_cls`` (constructed as ``backend_cls(directory, **kw)``, where ``kw`` may hold
    ``staging_budget_bytes``), or override ``make_backend`` when construction needs more.
    """

    backend_cls: type[StorageBackend] | None = None

    def make_backend(self, directory: WriterDirectory, **kw) -> StorageBackend:
        """A new backend writing into ``directory``; ``kw`` are the case's constructor arguments."""
        if self.backend_cls is None:
            raise NotImplementedError(f"{type(self).__name__}: set backend_cls or override make_backend")
        return self.backend_cls(directory, **kw)

    # -- fixtures ------------------------------------------------------------------------------------
    @pytest.fixture
    def root(self, tmp_path):
        return str(tmp_path / "offload")

    @pytest.fixture
    def new_backend(self, root):
        """Factory: new_backend(root=..., **kw) -> a backend of a fresh writer; all released after."""
        made = []

        def factory(at: str | None = None, **kw):
            backend = self.make_backend(WriterDirectory(at or root, OwnerInfo.current()), **kw)
            made.append(backend)
            return backend

        yield factory
        for backend in made:
            backend.release()

    @pytest.fixture
    def backend(self, new_backend):
        return new_backend()

    # -- the declared contract -----------------------------------------------------------------------
    def test_capabilities_are_consistent(self, backend):
        caps = backend.capabilities
        assert isinstance(caps, Capabilities)
        assert caps.alignment >= 1 and caps.alignment & (caps.alignment - 1) == 0, (
            f"alignment {caps.alignment} is not a power of two"
        )
        if caps.o_direct:
            assert caps.alignment % 512 == 0, "an O_DIRECT backend's alignment is at least a 512 B sector"
        if caps.name in BACKENDS and self.backend_cls is not None:
            assert issubclass(self.backend_cls, BACKENDS[caps.name]), (
                f"{caps.name!r} is another backend's name"
            )
        slots, each = backend.staging_slots(OffloadStatesConfig(staging_budget_mb=8))
        assert slots >= 1 and 0 < slots * each <= 8 * MiB, "declared staging exceeds the staging budget"

    def test_declared_alignment_is_honoured(self, new_backend):
        """Data files' lengths, and the chunk stride of a tensor of several chunks, are multiples of
        the declared alignment (what selection checks against the device's logical block)."""
        backend = new_backend(staging_budget_bytes=2 * MiB)
        alignment = backend.capabilities.alignment
        for i, nbytes in enumerate([1, 4097, 5 * MiB + 7]):
            record = backend.write(f"a{i}", random_bytes(nbytes, seed=i)).result()
            for path in data_files(backend, record.name):
                size = os.path.getsize(path)
                assert size % alignment == 0, f"{path}: {size} B breaks the declared alignment {alignment} B"
            if record.nbytes > record.chunk_bytes:
                assert record.chunk_bytes % alignment == 0, (
                    f"chunks of {record.chunk_bytes} B break the declared alignment {alignment} B"
                )

    def test_file_name_names_the_stored_file(self, backend):
        names = ("plain", "with.dots-and_1")
        for name in names:
            record = backend.write(name, random_bytes(5000)).result()
            assert record.file == backend.file_name(name)
            assert os.path.exists(backend.directory.file_path(record.file))  # file_path checks the name
        assert len({backend.file_name(name) for name in names}) == len(names)
        backend.delete("plain")
        assert not os.path.lexists(backend.directory.file_path(backend.file_name("plain")))

    def test_from_config_builds_without_io(self, backend, root):
        """How the registry opens a backend: the config's knobs applied, nothing touched until used."""
        config = OffloadStatesConfig(checksum=False, staging_budget_mb=2)
        built = backend.from_config(config, WriterDirectory(root, OwnerInfo.current()))
        try:
            assert isinstance(built, StorageBackend) and built.capabilities == backend.capabilities
            assert built.checksum is False
            assert not os.path.exists(root)
            src = random_bytes(3 * MiB + 1, seed=1)
            record = built.write("c", src).result()
            assert record.crc32c is None and record.chunk_bytes <= 2 * MiB
            out = torch.zeros_like(src)
            built.read_into("c", out).result()
            assert torch.equal(out, src)
        finally:
            built.release()
