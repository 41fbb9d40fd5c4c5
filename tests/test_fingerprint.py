"""The content fingerprint behind skip_unchanged: what it must tell apart, and that it is exactly the
documented hash (checked against a plain-Python reference, so every device computes the same value)."""

from __future__ import annotations

import pytest
import torch

from nvme_tier.fingerprint import LANES, ROW_WORDS, fingerprint, fingerprints

MASK = (1 << 64) - 1
ROW_BYTES = ROW_WORDS * 4


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference(data: bytes) -> str:
    """The module docstring's definition, on Python ints."""
    padded = data + bytes(-len(data) % 4)
    lanes = [0] * LANES
    for i in range(len(padded) // 4):
        word = int.from_bytes(padded[4 * i : 4 * i + 4], "little", signed=True)
        row, col = divmod(i, ROW_WORDS)
        for lane in range(LANES):
            m = (splitmix64(col + (2 * lane) * (1 << 48)) | 1) * (
                splitmix64(row + (2 * lane + 1) * (1 << 48)) | 1
            )
            lanes[lane] = (lanes[lane] + word * m) & MASK
    length = splitmix64(len(data))
    return "".join(
        f"{splitmix64((v + length + lane * 0x9E3779B97F4A7C15) & MASK):016x}" for lane, v in enumerate(lanes)
    )


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "nbytes", [0, 1, 2, 3, 4, 5, 7, 8, 1001, ROW_BYTES - 1, ROW_BYTES + 3, 2 * ROW_BYTES + 6]
)
def test_matches_the_reference(nbytes):
    data = random_bytes(nbytes, seed=nbytes)
    assert fingerprint(data) == reference(bytes(data.tolist()))


def test_chunking_does_not_change_the_result():
    data = random_bytes(3 * ROW_BYTES + 11)
    whole = fingerprint(data)
    assert fingerprint(data, chunk_bytes=ROW_BYTES) == whole
    assert fingerprint(data, chunk_bytes=2 * ROW_BYTES) == whole
    assert fingerprint(data, chunk_bytes=1) == whole  # rounded up to one row


def test_equal_bytes_give_equal_fingerprints():
    a = random_bytes(10_000)
    b = a.clone()
    assert fingerprint(a) == fingerprint(b)
    assert fingerprints([a, b, a[:5]]) == [fingerprint(a), fingerprint(a), fingerprint(a[:5])]
    assert len(fingerprint(a)) == 32 and int(fingerprint(a), 16) >= 0


def test_unaligned_view_hashes_its_own_bytes():
    data = random_bytes(1000)
    view = data[1:998]
    assert view.storage_offset() % 4
    assert fingerprint(view) == fingerprint(view.clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8])
def test_swap_of_two_elements_is_detected(dtype):
    t = torch.arange(1, 4097).to(dtype)
    for i, j in [(0, 1), (0, 4095), (17, 2000), (100, 100 + ROW_WORDS // 2)]:
        if j >= t.numel() or t[i] == t[j]:
            continue
        swapped = t.clone()
        swapped[i], swapped[j] = t[j], t[i]
        assert fingerprint(swapped) != fingerprint(t), (i, j)


def test_change_that_keeps_the_sum_is_detected():
    t = torch.arange(ROW_WORDS * 3, dtype=torch.int32)
    for i, j in [(0, 1), (5, ROW_WORDS + 5), (ROW_WORDS - 1, ROW_WORDS)]:
        moved = t.clone()
        moved[i] += 1000
        moved[j] -= 1000
        assert moved.sum() == t.sum()
        assert fingerprint(moved) != fingerprint(t), (i, j)
    shifted = torch.roll(t, 1)  # every element moved, same multiset
    assert fingerprint(shifted) != fingerprint(t)


def test_every_single_bit_flip_is_detected():
    data = random_bytes(4 * 64 + 3)
    base = fingerprint(data)
    for pos in (0, 1, 2, 3, 130, data.numel() - 1):
        for bit in range(8):
            flipped = data.clone()
            flipped[pos] ^= 1 << bit
            assert fingerprint(flipped) != base, (pos, bit)


def test_sign_flips_of_two_words_are_detected():
    """Top-bit changes are where a plain sum of words mod 2**64 collides; here they must not."""
    t = torch.randn(ROW_WORDS + 10, generator=torch.Generator().manual_seed(3))
    base = fingerprint(t)
    for i, j in [(0, 1), (2, 3), (7, ROW_WORDS + 7)]:
        flipped = t.clone()
        flipped[[i, j]] = -flipped[[i, j]]
        assert fingerprint(flipped) != base
    assert fingerprint(-t) != base


def test_length_counts_trailing_zero_bytes_included():
    one = torch.tensor([1], dtype=torch.uint8)
    assert (
        len({fingerprint(one), fingerprint(torch.tensor([1, 0], dtype=torch.uint8)), fingerprint(one[:0])})
        == 3
    )
    assert fingerprint(torch.zeros(4, dtype=torch.uint8)) != fingerprint(torch.zeros(8, dtype=torch.uint8))


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool],
)
def test_every_dtype_through_its_bytes(dtype):
    g = torch.Generator().manual_seed(5)
    t = (torch.randn(333, generator=g) * 100).to(dtype)
    assert (
        fingerprint(t) == fingerprint(t.view(torch.uint8)) == reference(bytes(t.view(torch.uint8).tolist()))
    )
    changed = t.clone()
    changed[200] = 0 if bool(t[200] != 0) else 1
    assert fingerprint(changed) != fingerprint(t)


def test_many_random_small_edits_never_collide():
    data = random_bytes(ROW_BYTES * 2 + 1)
    contents: dict[str, bytes] = {fingerprint(data): data.numpy().tobytes()}
    g = torch.Generator().manual_seed(11)
    for _ in range(200):
        edited = data.clone()
        count = int(torch.randint(1, 4, (1,), generator=g))
        positions = torch.randint(0, data.numel(), (count,), generator=g)
        edited[positions] += torch.randint(1, 256, (count,), generator=g, dtype=torch.uint8)
        raw = edited.numpy().tobytes()
        assert contents.setdefault(fingerprint(edited), raw) == raw  # equal fingerprint only for equal bytes
    assert len(contents) > 190


def test_non_contiguous_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        fingerprint(torch.zeros(4, 4).T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    data = random_bytes(3 * ROW_BYTES + 5)
    assert fingerprint(data.cuda()) == fingerprint(data)
