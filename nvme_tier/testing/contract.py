"""The contract half of the conformance suite: a store does what it declares, by key.

``ContractCases`` holds the fixtures every conformance case uses (see ``StoreConformance``, which
subclasses it and is what a store's test suite subclasses) and the cases about the block-store
interface itself: the declared ``Capabilities`` are consistent and honoured on disk, objects are
written, listed, read back, sampled, rewritten in place (where declared) and deleted by key, and
the registry builds the store from the config without I/O.

Importing this module needs pytest; ``nvme_tier`` itself does not import it.
"""

from __future__ import annotations

import os

import pytest
import torch

from ..config import OffloadStatesConfig
from ..errors import IntegrityError
from ..storage.base import StorageBackend
from ..storage.blocks import BlockStore, Capabilities
from ..storage.manifest import OwnerInfo, WriterDirectory
from ..storage.pipeline import ChunkPipeline
from ..storage.registry import StoreRegistry
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


def put(store: BlockStore, key: str, src: torch.Tensor, reuse: tuple[int, int] | None = None):
    """Write ``src`` as object ``key`` through the chunk pipeline; (chunk, crcs, samples)."""
    store.directory.create()
    chunk = store.chunk_for(src.numel())
    with store.slots(chunk, reading=False) as slots, store.open_write(key, src.numel(), chunk, reuse) as file:
        crcs, samples = ChunkPipeline().write(slots, file, src, chunk)
        file.finish(src.numel())
    return chunk, crcs, samples


def get(store: BlockStore, key: str, nbytes: int, chunk: int, crcs) -> torch.Tensor:
    """Object ``key`` read back through the chunk pipeline (checked against ``crcs``)."""
    out = torch.zeros(nbytes, dtype=torch.uint8)
    with store.slots(chunk, reading=True) as slots, store.open_read(key, nbytes, chunk) as file:
        ChunkPipeline().read(slots, file, out, chunk, tuple(crcs))
    return out


class ContractCases:
    """Fixtures, and the cases about the block-store interface. Subclass ``StoreConformance``.

    Set ``store_cls`` (constructed as ``store_cls(directory, **kw)``, where ``kw`` may hold
    ``staging_budget_bytes``), or override ``make_store`` when construction needs more;
    ``make_backend`` puts the upper layer (``StorageBackend``) over it.
    """

    store_cls: type[BlockStore] | None = None

    def make_store(self, directory: WriterDirectory, **kw) -> BlockStore:
        """A new store writing into ``directory``; ``kw`` are the case's constructor arguments."""
        if self.store_cls is None:
            raise NotImplementedError(f"{type(self).__name__}: set store_cls or override make_store")
        return self.store_cls(directory, **kw)

    def make_backend(self, directory: WriterDirectory, checksum: bool = True, **kw) -> StorageBackend:
        """Named tensors over a new store (what the core uses)."""
        return StorageBackend(self.make_store(directory, **kw), checksum=checksum)

    # -- fixtures ------------------------------------------------------------------------------------
    @pytest.fixture
    def root(self, tmp_path):
        return str(tmp_path / "offload")

    @pytest.fixture
    def new_backend(self, root):
        """Factory: new_backend(at=..., **kw) -> a backend of a fresh writer; all released after."""
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

    @pytest.fixture
    def store(self, root):
        """A store of a fresh writer (2 MiB of staging), closed and its directory removed after."""
        made = self.make_store(WriterDirectory(root, OwnerInfo.current()), staging_budget_bytes=2 * MiB)
        yield made
        made.close()
        made.directory.remove()

    # -- the declared contract -----------------------------------------------------------------------
    def test_capabilities_are_consistent(self, store):
        caps = store.capabilities
        assert isinstance(caps, Capabilities)
        assert caps.alignment >= 1 and caps.alignment & (caps.alignment - 1) == 0, (
            f"alignment {caps.alignment} is not a power of two"
        )
        if caps.o_direct:
            assert caps.alignment % 512 == 0, "an O_DIRECT store's alignment is at least a 512 B sector"
        slots, each = type(store).staging_slots(8 * MiB)
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

    def test_objects_by_key(self, store):
        """Written, listed, stamped, sampled, read back and deleted by key, through the pipeline."""
        key, src = store.key("blk"), random_bytes(5 * MiB + 7, seed=11)
        assert store.keys() == []
        chunk, crcs, samples = put(store, key, src)
        assert 0 < chunk <= 2 * MiB and store.stored_size(src.numel()) >= src.numel()
        assert store.keys() == [key]
        assert all(
            os.path.isfile(os.path.join(store.directory.path, f))
            for f in store.files(key, chunk, src.numel())
        )
        assert torch.equal(get(store, key, src.numel(), chunk, crcs), src)
        if samples:
            got = store.page_crcs(key, chunk, [offset for offset, _ in samples])
            assert got == [crc for _, crc in samples], "sampled pages do not read back as written"
        store.delete(key)
        assert store.keys() == [] and not os.path.lexists(store.directory.file_path(key))

    def test_open_read_of_a_missing_object_is_an_integrity_error(self, store):
        store.directory.create()
        with pytest.raises(IntegrityError):
            store.open_read(store.key("absent"), 5000, store.chunk_for(5000)).close()

    def test_rewrite_in_place_keeps_the_object(self, store):
        if not store.capabilities.rewrite_in_place:
            pytest.skip("the store does not declare rewrite_in_place")
        key, src = store.key("kept"), random_bytes(300_001, seed=12)
        put(store, key, src)
        st = os.stat(store.directory.file_path(key))
        chunk, crcs, _ = put(store, key, src.flip(0), reuse=(st.st_dev, st.st_ino))
        assert os.stat(store.directory.file_path(key)).st_ino == st.st_ino
        assert torch.equal(get(store, key, src.numel(), chunk, crcs), src.flip(0))

    def test_file_name_names_the_stored_file(self, backend):
        names = ("plain", "with.dots-and_1")
        for name in names:
            record = backend.write(name, random_bytes(5000)).result()
            assert record.file == backend.file_name(name) == backend.store.key(name)
            assert os.path.exists(backend.directory.file_path(record.file))  # file_path checks the name
        assert len({backend.file_name(name) for name in names}) == len(names)
        backend.delete("plain")
        assert not os.path.lexists(backend.directory.file_path(backend.file_name("plain")))

    def test_registry_builds_it_from_the_config_without_io(self, store, root):
        """How nvme_tier opens a registered store: the config's knobs applied, nothing touched."""
        config = OffloadStatesConfig(checksum=False, staging_budget_mb=2)
        registry = StoreRegistry([type(store)], entry_point_group=None)
        built = registry.open(config, WriterDirectory(root, OwnerInfo.current()), store.capabilities.name)
        try:
            assert isinstance(built.store, type(store)) and built.checksum is False
            assert not os.path.exists(root)
            src = random_bytes(3 * MiB + 1, seed=1)
            record = built.write("c", src).result()
            assert record.crc32c is None and record.chunk_bytes <= 2 * MiB
            out = torch.zeros_like(src)
            built.read_into("c", out).result()
            assert torch.equal(out, src)
        finally:
            built.release()
