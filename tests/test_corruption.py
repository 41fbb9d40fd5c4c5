"""Corruption on reload: a flipped byte, a truncated, extended or missing file, a foreign or malformed
manifest. Each reload raises IntegrityError naming the file; the engine is then in phase ``failed``
and refuses to compute (StatesOffloadedError) instead of training on garbage. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import pytest
import torch
from faults import writer_dirs
from helpers import make_engine, optimizer_states_freed, requires_aio, train

import nvme_tier
from nvme_tier.errors import IntegrityError, StatesOffloadedError
from nvme_tier.types import OffloadPhase

ZARR_CHUNK = "optim_states.0.zarr/c/0"
ZARR_META = "optim_states.0.zarr/zarr.json"
AIO_FILE = "optim_states.0.bin"


def flip(path: str, offset: int = 100) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 3)


def extend(path: str) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0" * 17)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def write_text(text: str):
    def corrupt(path: str) -> None:
        with open(path, "w") as fh:
            fh.write(text)

    return corrupt


def edit_manifest(change):
    def corrupt(path: str) -> None:
        with open(path) as fh:
            data = json.load(fh)
        change(data)
        with open(path, "w") as fh:
            json.dump(data, fh)

    return corrupt


def _bump_crc(data: dict) -> None:
    rec = data["records"]["optim_states.0"]
    rec["crc32c"][0] ^= 1


def _edit_text(old: str, new: str):
    def corrupt(path: str) -> None:
        with open(path) as fh:
            text = fh.read()
        with open(path, "w") as fh:
            fh.write(text.replace(old, new, 1))

    return corrupt


def offloaded(backend: str, path, **extra):
    engine = make_engine(3, path, backend=backend, **extra)
    nvme_tier.attach(engine)
    train(engine, 2)
    engine.offload_states()
    (writer,) = writer_dirs(path)
    return engine, writer


def assert_failed_safely(engine, culprit: str, exc_type=IntegrityError) -> None:
    with pytest.raises(exc_type) as err:
        engine.reload_states()
    assert culprit in str(err.value), str(err.value)
    assert err.value.filename and culprit in err.value.filename
    controller = nvme_tier.controller_of(engine)
    assert controller.phase is OffloadPhase.failed
    # Every state stays freed: nothing half-loaded is left for a step to compute on.
    assert optimizer_states_freed(engine)
    with pytest.raises(StatesOffloadedError):
        train(engine, 1)
    with pytest.raises(StatesOffloadedError):
        engine.offload_states()
    with pytest.raises(exc_type):  # asking again does not load garbage either
        engine.reload_states()
    assert controller.phase is OffloadPhase.failed


ZARR_CASES = [
    ("flipped byte", ZARR_CHUNK, flip),
    ("truncated chunk", ZARR_CHUNK, truncate),
    ("extended chunk", ZARR_CHUNK, extend),
    ("missing chunk", ZARR_CHUNK, remove),
    ("missing array", "optim_states.0.zarr", remove),
    ("garbage metadata", ZARR_META, write_text("{not json")),
    ("metadata not an object", ZARR_META, write_text("[1, 2, 3]")),
    ("metadata wrong shape", ZARR_META, edit_manifest(lambda m: m.update(shape=[8]))),
]
AIO_CASES = [
    ("flipped byte", AIO_FILE, flip),
    ("truncated file", AIO_FILE, truncate),
    ("missing file", AIO_FILE, remove),
]
MANIFEST_CASES = [
    ("missing manifest", "manifest.json", remove),
    ("manifest not json", "manifest.json", write_text("\x00\xff garbage")),
    ("records not a mapping", "manifest.json", edit_manifest(lambda d: d.update(records=[1]))),
    ("record missing fields", "manifest.json", edit_manifest(lambda d: d.update(records={"x": {}}))),
    ("owner not a mapping", "manifest.json", edit_manifest(lambda d: d.update(owner="me"))),
    ("checksum edited", "manifest.json", edit_manifest(_bump_crc)),
    ("nbytes 1e400", "manifest.json", _edit_text('"nbytes": ', '"nbytes": 1e400, "was": ')),
    ("nested deeply", "manifest.json", write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")),
]


@pytest.mark.parametrize(
    "what, rel, corrupt", ZARR_CASES + MANIFEST_CASES, ids=[c[0] for c in ZARR_CASES + MANIFEST_CASES]
)
def test_zarr_corruption(what, rel, corrupt, offload_dir):
    engine, writer = offloaded("zarr", offload_dir)
    corrupt(os.path.join(writer, rel))
    assert_failed_safely(engine, os.path.join(writer, rel))


@requires_aio
@pytest.mark.aio
@pytest.mark.parametrize(
    "what, rel, corrupt", AIO_CASES + MANIFEST_CASES[:3], ids=[c[0] for c in AIO_CASES + MANIFEST_CASES[:3]]
)
def test_aio_corruption(what, rel, corrupt, offload_dir):
    engine, writer = offloaded("aio", offload_dir)
    corrupt(os.path.join(writer, rel))
    assert_failed_safely(engine, os.path.join(writer, rel))


def two_offloaded_engines(backend: str, path) -> list[tuple]:
    """Two writers on one path, each trained one step and offloaded: [(engine, its writer dir)]."""
    out = []
    for seed in (0, 1):
        engine = make_engine(3, path, backend=backend, seed=seed)
        nvme_tier.attach(engine)
        train(engine, 1)
        engine.offload_states()
        out.append((engine, nvme_tier.controller_of(engine)._mover.backend.directory.path))
    return out


@pytest.mark.parametrize("backend", ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])])
def test_manifest_swapped_from_another_engine(backend, offload_dir):
    """Two writers on one path; A's manifest replaced by B's (same names, other bytes)."""
    (a, dir_a), (b, dir_b) = two_offloaded_engines(backend, offload_dir)
    assert dir_a != dir_b
    shutil.copyfile(os.path.join(dir_b, "manifest.json"), os.path.join(dir_a, "manifest.json"))
    assert_failed_safely(a, os.path.join(dir_a, "manifest.json"))
    b.reload_states()  # the other writer is unaffected
    train(b, 1)


@pytest.mark.parametrize("backend", ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])])
def test_data_swapped_from_another_engine(backend, offload_dir):
    """A's data file replaced by B's (a valid file of the right size): checksums catch it."""
    (a, dir_a), (b, dir_b) = two_offloaded_engines(backend, offload_dir)
    rel = AIO_FILE if backend == "aio" else "optim_states.0.zarr"
    remove(os.path.join(dir_a, rel))
    copy = shutil.copyfile if backend == "aio" else shutil.copytree
    copy(os.path.join(dir_b, rel), os.path.join(dir_a, rel))
    assert_failed_safely(a, os.path.join(dir_a, rel))


class _Payload:
    """Unpickling this creates a marker file: proof that someone unpickled our files."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_nothing_is_unpickled(offload_dir, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    events: list[str] = []

    def hook(event: str, args) -> None:
        if event == "pickle.find_class" and hook.armed:
            events.append(f"{args}")

    hook.armed = False
    sys.addaudithook(hook)  # cannot be removed; it is disarmed after the test

    engine, writer = offloaded("zarr", offload_dir)
    try:
        hook.armed = True
        engine.reload_states()  # a clean reload: no unpickling at all
        train(engine, 1)
        engine.offload_states()
        payload = pickle.dumps(_Payload(marker))
        with open(os.path.join(writer, ZARR_CHUNK), "wb") as fh:
            fh.write(payload)
        with open(os.path.join(writer, "manifest.json"), "wb") as fh:
            fh.write(payload)
        with pytest.raises(IntegrityError, match="manifest.json"):
            engine.reload_states()
    finally:
        hook.armed = False
    assert events == []
    assert not os.path.exists(marker)


def test_checksums_verified_with_skip_unchanged(offload_dir):
    """A file kept on disk for skip_unchanged is re-verified on every reload, not trusted."""
    engine, writer = offloaded("zarr", offload_dir)
    engine.reload_states()
    engine.offload_states()  # unchanged: nothing rewritten
    assert nvme_tier.controller_of(engine).last_stats["offload"].bytes_written == 0
    flip(os.path.join(writer, ZARR_CHUNK))
    assert_failed_safely(engine, os.path.join(writer, ZARR_CHUNK))


def test_pinned_host_copy_not_corrupted_by_failure(offload_dir):
    """After a failed reload the host-tier copies are still intact (nothing was overwritten)."""
    engine, writer = offloaded("zarr", offload_dir)
    controller = nvme_tier.controller_of(engine)
    hosts = {
        p.buffer.name: p.host.clone() for ps in controller._placed.values() for p in ps if p.host is not None
    }
    assert hosts
    flip(os.path.join(writer, ZARR_CHUNK))
    with pytest.raises(IntegrityError):
        engine.reload_states()
    after = {p.buffer.name: p.host for ps in controller._placed.values() for p in ps if p.host is not None}
    assert hosts.keys() == after.keys()
    assert all(torch.equal(hosts[k], after[k]) for k in hosts)


def test_non_blocking_reload_of_corrupt_file(offload_dir):
    """A prefetch that hits corruption raises at the first compute call; the engine then stays failed."""
    engine, writer = offloaded("zarr", offload_dir)
    flip(os.path.join(writer, ZARR_CHUNK))
    engine.reload_states(non_blocking=True)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        train(engine, 1)
    assert nvme_tier.controller_of(engine).phase is OffloadPhase.failed
    with pytest.raises(StatesOffloadedError):
        train(engine, 1)


# -- skip_unchanged and a kept file damaged between cycles (issue 23, item 2) ------------------------
def _replace_same_size(path: str) -> None:
    """Another file of the same size (other bytes, another inode) in its place."""
    size = os.path.getsize(path)
    os.unlink(path)
    with open(path, "wb") as fh:
        fh.write(b"\x5a" * size)


def _flip_keeping_times(path: str) -> None:
    """One byte flipped far from any sampled page, mtime put back: only ctime tells."""
    st = os.stat(path)
    flip(path, offset=st.st_size // 2 + 1234)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


DAMAGES = {
    "truncated": truncate,
    "one byte flipped": flip,
    "flipped, mtime restored": _flip_keeping_times,
    "replaced by another file": _replace_same_size,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("backend", ["zarr", pytest.param("aio", marks=[requires_aio, pytest.mark.aio])])
def test_skip_unchanged_rewrites_a_damaged_kept_file(backend, damage, offload_dir):
    """A kept file damaged between cycles is written again, never trusted: the offload rewrites it
    and the reload is bit-exact (before, the offload skipped it, freed the states, and the reload
    raised IntegrityError: every optimizer state lost)."""
    from helpers import assert_same_states, snapshot

    engine, writer = offloaded(backend, offload_dir)
    engine.reload_states()
    before = snapshot(engine)
    DAMAGES[damage](os.path.join(writer, AIO_FILE if backend == "aio" else ZARR_CHUNK))
    engine.offload_states()
    stats = nvme_tier.controller_of(engine).last_stats["offload"]
    assert stats.bytes_written > 0, "the damaged file was skipped"
    engine.reload_states()
    assert_same_states(before, snapshot(engine))
    engine.offload_states()  # rewritten once: unchanged from now on, skipped again
    assert nvme_tier.controller_of(engine).last_stats["offload"].bytes_written == 0
    engine.reload_states()
    assert_same_states(before, snapshot(engine))
