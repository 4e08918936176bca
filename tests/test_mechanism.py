"""Tests of the DP-BloGS mechanism: block shuffle, randomness, per-tensor clipping, the mechanism class.

Reference: ``shared/PRIVACY.md`` section 1 (clip each tensor to C, then cut the flattened gradient
into blocks of B consecutive entries and permute the blocks uniformly at random; the output must
be a permutation of the input entries, with the partial last block handled explicitly).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_blogs.mechanism import (
    BlockShuffleMechanism,
    RandomSource,
    block_shuffle_,
    clip_per_tensor_,
    entropy_seed,
    make_generator,
    num_blocks,
)

# --------------------------------------------------------------------------------------------
# helpers


def distinct_tensor(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of ``shape`` whose entries are distinct (a random permutation of 0..numel-1)."""
    numel = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g).to(dtype).reshape(shape)


def reconstruct_block_order(before: torch.Tensor, after: torch.Tensor, block_size: int) -> list[int]:
    """Recover which input block sits at each output position, checking blocks kept their contents.

    Walks the output: the entry at the current position must be the first entry of some input
    block (entries are distinct, so it identifies the block); the output must then contain that
    whole block, unchanged, from this position on. Returns the input block indices in output order
    and asserts every input block appears exactly once.
    """
    src = before.reshape(-1).tolist()
    out = after.reshape(-1).tolist()
    numel = len(src)
    assert len(out) == numel
    position_of = {v: i for i, v in enumerate(src)}
    assert len(position_of) == numel, "helper needs distinct entries"
    order = []
    p = 0
    while p < numel:
        start = position_of[out[p]]
        assert start % block_size == 0, f"output position {p} does not start an input block (source index {start})"
        length = min(block_size, numel - start)
        assert out[p : p + length] == src[start : start + length], f"block starting at input {start} was broken up"
        order.append(start // block_size)
        p += length
    assert p == numel
    assert sorted(order) == list(range(num_blocks(numel, block_size)))
    return order


def block_order_fast(after_arange: torch.Tensor, block_size: int) -> np.ndarray:
    """Block order of a shuffled ``arange`` tensor: the run-length-compressed ``value // block_size``."""
    ids = after_arange.reshape(-1).numpy().astype(np.int64) // block_size
    keep = np.concatenate([[True], ids[1:] != ids[:-1]])
    return ids[keep]


@pytest.fixture
def single_thread():
    """Run with one intra-op thread (restored afterwards). The statistical tests call the shuffle
    tens of thousands of times on tiny tensors; on small CPU quotas torch's OpenMP pool makes each
    ``repeat_interleave`` call take milliseconds instead of microseconds. Same code path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def norm64(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


# --------------------------------------------------------------------------------------------
# block shuffle: permutation of entries, blocks intact

SHUFFLE_CASES = [
    # (shape, block_size)
    ((10,), 1),
    ((10,), 10),
    ((10,), 3),  # last block has 1 entry
    ((10,), 4),  # last block has 2 entries
    ((1000,), 7),  # 142 full blocks + one of 6
    ((1000,), 1),
    ((1000,), 1000),
    ((1000,), 999),  # one full block + a block of 1
    ((1000,), 8),  # divides
    ((17, 13), 5),  # 2-D, 221 entries, last block 1
    ((6, 4), 6),  # 2-D, divides
    ((8, 3, 5), 11),  # 3-D, 120 entries, last block 10
    ((1,), 1),
    ((2,), 1),
]


@pytest.mark.parametrize(("shape", "block_size"), SHUFFLE_CASES)
@pytest.mark.usefixtures("single_thread")
def test_shuffle_is_permutation_with_intact_blocks(shape: tuple[int, ...], block_size: int) -> None:
    before = distinct_tensor(shape, seed=1)
    numel = before.numel()
    n_blocks = num_blocks(numel, block_size)
    source = RandomSource(123)
    seen_orders = set()
    for _ in range(20):
        after = before.clone()
        block_shuffle_(after, block_size, source)
        assert after.shape == before.shape
        assert after.dtype == before.dtype
        # same multiset of entries (nothing dropped, duplicated or zero-padded)
        assert torch.equal(torch.sort(after.reshape(-1)).values, torch.sort(before.reshape(-1)).values)
        order = reconstruct_block_order(before, after, block_size)
        seen_orders.add(tuple(order))
    if n_blocks == 1:
        assert seen_orders == {(0,)}
    elif math.factorial(n_blocks) >= 20:
        # 20 draws from >= 20 equally likely orders: seeing only one is (practically) impossible
        assert len(seen_orders) > 1


@pytest.mark.parametrize(("numel", "block_size"), [(10, 3), (1000, 7), (1000, 999), (23, 4)])
@pytest.mark.usefixtures("single_thread")
def test_partial_last_block_survives_everywhere(numel: int, block_size: int) -> None:
    """The forgetnet bug: zero-padding the last block and truncating lost entries when the padded
    block landed mid-vector. Every entry of the partial block must survive in every position."""
    n_blocks = num_blocks(numel, block_size)
    remainder = numel % block_size
    assert remainder != 0
    # entries 1..numel (no zero, so padding zeros would be visible)
    before = torch.arange(1, numel + 1, dtype=torch.float64)
    partial = set(before[-remainder:].tolist())
    source = RandomSource(7)
    positions = set()
    for _ in range(300):
        after = before.clone()
        block_shuffle_(after, block_size, source)
        values = after.tolist()
        assert 0.0 not in values
        assert partial <= set(values)
        assert torch.equal(torch.sort(after).values, before)
        order = reconstruct_block_order(before, after, block_size)
        positions.add(order.index(n_blocks - 1))
    # the partial block was seen away from the end (mid-vector), where the padding bug bites
    assert any(p < n_blocks - 1 for p in positions)
    if n_blocks <= 4:
        assert positions == set(range(n_blocks))


@pytest.mark.parametrize(("shape", "block_size"), [((10,), 11), ((10,), 10**9), ((3, 4), 13), ((1,), 2)])
def test_block_larger_than_numel_moves_nothing(shape: tuple[int, ...], block_size: int) -> None:
    before = distinct_tensor(shape, seed=3)
    after = before.clone()
    block_shuffle_(after, block_size, RandomSource(0))
    assert torch.equal(after, before)


def test_block_size_equal_numel_moves_nothing() -> None:
    before = distinct_tensor((7, 9), seed=4)
    after = before.clone()
    block_shuffle_(after, 63, RandomSource(0))
    assert torch.equal(after, before)


def test_block_size_one_is_an_entrywise_permutation() -> None:
    before = distinct_tensor((50,), seed=5)
    after = before.clone()
    block_shuffle_(after, 1, RandomSource(11))
    assert torch.equal(torch.sort(after).values, torch.sort(before).values)
    assert not torch.equal(after, before)  # 1/50! chance of identity with this fixed seed


@pytest.mark.parametrize("block_size", [0, -1])
def test_shuffle_rejects_non_positive_block_size(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_shuffle_(torch.zeros(10), block_size, RandomSource(0))


def test_shuffle_works_in_place_on_dtypes() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        before = distinct_tensor((37,), seed=6, dtype=dtype)  # entries < 256: exact in every dtype
        after = before.clone()
        ptr = after.data_ptr()
        block_shuffle_(after, 4, RandomSource(2))
        assert after.data_ptr() == ptr
        assert after.dtype == dtype
        reconstruct_block_order(before, after, 4)


def test_num_blocks() -> None:
    assert num_blocks(10, 3) == 4
    assert num_blocks(9, 3) == 3
    assert num_blocks(10, 1) == 10
    assert num_blocks(10, 10) == 1
    assert num_blocks(10, 11) == 1
    assert num_blocks(1000, 7) == 143


# --------------------------------------------------------------------------------------------
# blocks really move: uniformity of the permutation


@pytest.mark.parametrize(("numel", "block_size"), [(24, 6), (10, 3)])
@pytest.mark.usefixtures("single_thread")
def test_permutation_is_uniform(numel: int, block_size: int) -> None:
    """4 blocks: each of the 4! = 24 orders is equally likely (chi-square), so in particular the
    output equals the input with probability 1/24, and block 0 lands uniformly on 4 positions."""
    n_blocks = num_blocks(numel, block_size)
    assert n_blocks == 4
    source = RandomSource(2024)
    before = torch.arange(numel, dtype=torch.float32)
    draws = 6_000
    counts: dict[tuple[int, ...], int] = {}
    pos0 = np.zeros(n_blocks, dtype=np.int64)
    for _ in range(draws):
        after = before.clone()
        block_shuffle_(after, block_size, source)
        order = tuple(block_order_fast(after, block_size).tolist())
        counts[order] = counts.get(order, 0) + 1
        pos0[order.index(0)] += 1
    assert len(counts) == math.factorial(n_blocks)
    observed = np.array(list(counts.values()))
    assert observed.sum() == draws
    assert stats.chisquare(observed).pvalue > 1e-3
    assert stats.chisquare(pos0).pvalue > 1e-3
    identity = counts[tuple(range(n_blocks))]
    assert stats.binomtest(identity, draws, 1 / math.factorial(n_blocks)).pvalue > 1e-3


@pytest.mark.usefixtures("single_thread")
def test_position_of_block_zero_is_uniform_many_blocks() -> None:
    """1000 entries in blocks of 7 (143 blocks, the last partial): block 0 and the partial block
    each land uniformly over the 143 positions."""
    numel, block_size = 1000, 7
    n_blocks = num_blocks(numel, block_size)
    source = RandomSource(99)
    before = torch.arange(numel, dtype=torch.float32)
    draws = 143 * 40
    pos_first = np.zeros(n_blocks, dtype=np.int64)
    pos_last = np.zeros(n_blocks, dtype=np.int64)
    identity = 0
    for _ in range(draws):
        after = before.clone()
        block_shuffle_(after, block_size, source)
        order = block_order_fast(after, block_size)
        assert len(order) == n_blocks
        pos_first[int(np.flatnonzero(order == 0)[0])] += 1
        pos_last[int(np.flatnonzero(order == n_blocks - 1)[0])] += 1
        identity += bool(torch.equal(after, before))
    assert stats.chisquare(pos_first).pvalue > 1e-3
    assert stats.chisquare(pos_last).pvalue > 1e-3
    assert identity == 0  # probability 1/143! per draw


@pytest.mark.usefixtures("single_thread")
def test_two_blocks_swap_half_the_time() -> None:
    source = RandomSource(5)
    before = torch.arange(6, dtype=torch.float32)
    swapped = 0
    draws = 4000
    for _ in range(draws):
        after = before.clone()
        block_shuffle_(after, 3, source)
        if torch.equal(after, before):
            continue
        assert after.tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
        swapped += 1
    assert stats.binomtest(swapped, draws, 0.5).pvalue > 1e-3


# --------------------------------------------------------------------------------------------
# randomness


def shuffled_with(source: RandomSource, numel: int = 1000, block_size: int = 3) -> torch.Tensor:
    t = torch.arange(numel, dtype=torch.float32)
    block_shuffle_(t, block_size, source)
    return t


def test_same_seed_same_permutations() -> None:
    g1, g2 = RandomSource(42), RandomSource(42)
    for _ in range(5):
        assert torch.equal(shuffled_with(g1), shuffled_with(g2))


def test_different_seeds_different_permutations() -> None:
    results = [shuffled_with(RandomSource(seed)) for seed in (0, 1, 2, 12345, 2**32 - 1)]
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert not torch.equal(results[i], results[j])


# Regression (found against c98bb70): block_shuffle_ drew CPU permutations from a torch CPU
# generator (mt19937), which keeps only the low 32 bits of its seed, so seeds s and s + 2**32 gave
# identical permutations and a 64-bit entropy seed was worth 32 bits (replayable by brute force).
@pytest.mark.parametrize(("low", "high"), [(0, 2**63), (1, 2**32 + 1), (5, 5 + 2**40), (2**64 - 1, 2**32 - 1)])
def test_seeds_differing_only_in_high_bits_give_different_permutations(low: int, high: int) -> None:
    assert not torch.equal(shuffled_with(RandomSource(low)), shuffled_with(RandomSource(high)))


def test_permutation_source_randperm() -> None:
    source = RandomSource(3)
    perm = source.randperm(50)
    assert perm.dtype == torch.int64
    assert perm.device == torch.device("cpu")
    assert sorted(perm.tolist()) == list(range(50))
    assert torch.equal(RandomSource(3).randperm(50), perm)
    assert not torch.equal(source.randperm(50), perm)


def test_permutation_source_state_round_trip() -> None:
    source = RandomSource(2**64 - 3)
    source.randperm(10)
    state = source.state_dict()
    expected = [source.randperm(100) for _ in range(3)]
    other = RandomSource(0)
    other.load_state_dict(state)
    for e in expected:
        assert torch.equal(other.randperm(100), e)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70, -(2**63), True, 1.5, "7", None])
def test_permutation_source_rejects_bad_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        RandomSource(seed)  # type: ignore[arg-type]


def test_successive_draws_differ() -> None:
    g = RandomSource(42)
    assert not torch.equal(shuffled_with(g), shuffled_with(g))


def test_entropy_seed_range_and_variation() -> None:
    seeds = [entropy_seed() for _ in range(20)]
    for s in seeds:
        assert isinstance(s, int)
        assert 0 <= s < 2**64
    # 20 draws of 64 random bits: a collision has probability ~1e-17
    assert len(set(seeds)) == len(seeds)
    # both halves of the range are used (all 20 in one half: probability 2**-19)
    assert any(s >= 2**63 for s in seeds) and any(s < 2**63 for s in seeds)


def test_entropy_seeded_generators_give_different_permutations() -> None:
    a = shuffled_with(RandomSource(entropy_seed()))
    b = shuffled_with(RandomSource(entropy_seed()))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70, -(2**63), True, 1.5])
def test_make_generator_rejects_out_of_range_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        make_generator(seed)


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_make_generator_accepts_range_ends(seed: int) -> None:
    g = make_generator(seed)
    assert g.initial_seed() == seed
    assert g.device == torch.device("cpu")


# --------------------------------------------------------------------------------------------
# clipping

CLIP_NORMS = [1e-4, 1.0, 100.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def random_with_norm(numel: int, norm: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(numel, generator=g, dtype=torch.float64)
    return (t * (norm / torch.linalg.vector_norm(t))).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_norm", CLIP_NORMS)
def test_clip_bounds_every_tensor(clip_norm: float, dtype: torch.dtype) -> None:
    ratios = [1e6, 1e3, 10.0, 2.0, 1.0 + 1e-3, 1.0 + 1e-6, 1.0, 1.0 - 1e-7]
    sizes = [1, 3, 1000, 40_000]
    tensors = []
    for i, ratio in enumerate(ratios):
        for j, numel in enumerate(sizes):
            tensors.append(random_with_norm(numel, clip_norm * ratio, seed=100 * i + j, dtype=dtype))
    # a 2-D tensor far above C, and one with a single huge entry
    tensors.append(random_with_norm(64 * 33, clip_norm * 50, seed=7, dtype=dtype).reshape(64, 33))
    spike = torch.zeros(500, dtype=dtype)
    spike[17] = clip_norm * 1e4
    tensors.append(spike)
    originals = [t.clone() for t in tensors]
    clip_per_tensor_(tensors, clip_norm)
    for before, after in zip(originals, tensors, strict=True):
        assert after.dtype == dtype
        assert after.shape == before.shape
        assert torch.isfinite(after).all()
        assert norm64(after) <= clip_norm, (norm64(before) / clip_norm, norm64(after) / clip_norm)
        # the clip is a scaling: direction preserved, and not shrunk needlessly far below C
        n_before = norm64(before)
        if n_before > clip_norm:
            expected = before.double() * (clip_norm / n_before)
            tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
            assert torch.allclose(after.double(), expected, rtol=tol, atol=tol * clip_norm / math.sqrt(before.numel()))
            assert norm64(after) >= clip_norm * (1 - tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_norm", CLIP_NORMS)
def test_clip_leaves_small_tensors_unchanged(clip_norm: float, dtype: torch.dtype) -> None:
    # well below C: bit-identical
    tensors = [random_with_norm(n, clip_norm * r, seed=n, dtype=dtype) for n in (1, 10, 5000) for r in (0.5, 1e-3)]
    originals = [t.clone() for t in tensors]
    clip_per_tensor_(tensors, clip_norm)
    for before, after in zip(originals, tensors, strict=True):
        assert torch.equal(after, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip_norm", CLIP_NORMS)
def test_clip_just_below_c_changes_by_at_most_the_safety_margin(clip_norm: float, dtype: torch.dtype) -> None:
    tensors = [random_with_norm(n, clip_norm * (1 - 1e-7), seed=n, dtype=dtype) for n in (1, 10, 5000)]
    originals = [t.clone() for t in tensors]
    clip_per_tensor_(tensors, clip_norm)
    for before, after in zip(originals, tensors, strict=True):
        change = norm64(after - before) / norm64(before)
        assert change < 1e-5
        assert norm64(after) <= clip_norm


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_clip_zero_tensor_stays_zero(dtype: torch.dtype) -> None:
    for clip_norm in CLIP_NORMS:
        tensors = [torch.zeros(10, dtype=dtype), torch.zeros(3, 4, dtype=dtype), torch.zeros(1, dtype=dtype)]
        clip_per_tensor_(tensors, clip_norm)
        for t in tensors:
            assert not torch.isnan(t).any()
            assert torch.equal(t, torch.zeros_like(t))


def test_clip_is_per_tensor_not_global() -> None:
    big = torch.full((100,), 10.0)  # norm 100
    small = torch.full((4,), 0.1)  # norm 0.2
    clip_per_tensor_([big, small], 1.0)
    assert norm64(big) <= 1.0 and norm64(big) > 0.999
    assert torch.equal(small, torch.full((4,), 0.1))  # a global clip would have shrunk it


def test_clip_float16() -> None:
    tensors = [random_with_norm(1000, 30.0, seed=1, dtype=torch.float16)]
    clip_per_tensor_(tensors, 1.0)
    assert norm64(tensors[0]) <= 1.0


@pytest.mark.parametrize("clip_norm", [0, 0.0, -1.0, -1e-9, float("nan")])
def test_clip_rejects_invalid_clip_norm(clip_norm: float) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        clip_per_tensor_([torch.ones(3)], clip_norm)


def test_clip_empty_list_is_noop() -> None:
    clip_per_tensor_([], 1.0)


# --------------------------------------------------------------------------------------------
# BlockShuffleMechanism


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(10,), (7, 13), (1000,), (3,), (4, 5, 6)]
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape))
        numel = math.prod(shape)
        # distinct entries, large norm so the clip is active
        p.grad = (torch.randperm(numel, generator=g).double() + 1).to(torch.float32).reshape(shape)
        params.append(p)
    return params


BLOCKS = [3, 5, 7, 1, 1000]  # ragged, ragged, ragged, entrywise, larger than numel


def test_mechanism_clips_then_shuffles() -> None:
    params = make_params()
    clip_norm = 0.5
    grads_before = [p.grad.clone() for p in params]
    clipped = [g.clone() for g in grads_before]
    clip_per_tensor_(clipped, clip_norm)
    mech = BlockShuffleMechanism(params, BLOCKS, clip_norm, seed=17)
    mech.privatize_()
    for p, before, ref, block_size in zip(params, grads_before, clipped, BLOCKS, strict=True):
        grad = p.grad
        assert grad.shape == before.shape
        assert norm64(grad) <= clip_norm
        assert norm64(grad) > clip_norm * 0.999
        assert torch.equal(torch.sort(grad.reshape(-1)).values, torch.sort(ref.reshape(-1)).values)
        # blocks of the clipped gradient are moved whole (clipped entries are still distinct)
        reconstruct_block_order(ref, grad, block_size)
    # the ragged and entrywise tensors really were shuffled (fixed seed; identity has prob <= 1/4!)
    for p, ref, block_size in zip(params, clipped, BLOCKS, strict=True):
        if num_blocks(ref.numel(), block_size) >= 4:
            assert not torch.equal(p.grad, ref)
    # block size above numel: clipped, not moved
    assert torch.equal(params[4].grad, clipped[4])


def test_mechanism_skips_params_without_grad() -> None:
    params = make_params()
    params[1].grad = None
    params[3].grad = None
    mech = BlockShuffleMechanism(params, BLOCKS, 1.0, seed=3)
    mech.privatize_()
    assert params[1].grad is None
    assert params[3].grad is None
    for i in (0, 2, 4):
        assert norm64(params[i].grad) <= 1.0


def test_mechanism_same_seed_bit_identical() -> None:
    a, b = make_params(seed=9), make_params(seed=9)
    mech_a = BlockShuffleMechanism(a, BLOCKS, 0.3, seed=2**64 - 5)
    mech_b = BlockShuffleMechanism(b, BLOCKS, 0.3, seed=2**64 - 5)
    for step in range(3):
        if step:
            for pa, pb in zip(a, b, strict=True):
                fresh = torch.randn(pa.shape, generator=torch.Generator().manual_seed(step))
                pa.grad, pb.grad = fresh.clone(), fresh.clone()
        mech_a.privatize_()
        mech_b.privatize_()
        for pa, pb in zip(a, b, strict=True):
            assert torch.equal(pa.grad, pb.grad)


def test_mechanism_different_seeds_differ() -> None:
    a, b = make_params(seed=9), make_params(seed=9)
    BlockShuffleMechanism(a, BLOCKS, 0.3, seed=1).privatize_()
    BlockShuffleMechanism(b, BLOCKS, 0.3, seed=2).privatize_()
    assert not torch.equal(a[2].grad, b[2].grad)  # 1000 entries, block size 7


def test_mechanism_generator_state_round_trip() -> None:
    params = make_params(seed=1)
    mech = BlockShuffleMechanism(params, BLOCKS, 1.0, seed=77)
    mech.privatize_()  # advance the generator
    state = mech.generator_state_dict()
    next_grads = make_params(seed=2)
    for p, q in zip(params, next_grads, strict=True):
        p.grad = q.grad.clone()
    mech.privatize_()
    expected = [p.grad.clone() for p in params]

    resumed_params = make_params(seed=2)
    resumed = BlockShuffleMechanism(resumed_params, BLOCKS, 1.0, seed=12345)  # different seed: state wins
    resumed.load_generator_state_dict(state)
    resumed.privatize_()
    for p, e in zip(resumed_params, expected, strict=True):
        assert torch.equal(p.grad, e)

    # without restoring the state, a fresh mechanism with the original seed draws the first
    # permutations again, not the next ones
    fresh_params = make_params(seed=2)
    BlockShuffleMechanism(fresh_params, BLOCKS, 1.0, seed=77).privatize_()
    assert not torch.equal(fresh_params[2].grad, expected[2])


def test_mechanism_validates_arguments() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="block_sizes"):
        BlockShuffleMechanism(params, BLOCKS[:-1], 1.0, seed=0)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="clip_norm"):
            BlockShuffleMechanism(params, BLOCKS, bad, seed=0)


# --------------------------------------------------------------------------------------------
# no host-device synchronisation on the per-step path (CUDA only)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_path_does_not_sync() -> None:
    device = torch.device("cuda")
    source = RandomSource(1234)
    tensors = [
        torch.randn(1000, device=device) * 10,
        torch.randn(17, 13, device=device),
        torch.randn(4096, device=device, dtype=torch.bfloat16) * 100,
        torch.zeros(10, device=device),
    ]
    references = [t.detach().cpu().clone() for t in tensors]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_per_tensor_(tensors, 1.0)
        for t, block_size in zip(tensors, [7, 5, 64, 3], strict=True):
            block_shuffle_(t, block_size, source)
            block_shuffle_(t, 1, source)
        block_shuffle_(tensors[0], 8, source)  # divisible path
        block_shuffle_(tensors[0], 5000, source)  # single block
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for t, ref in zip(tensors, references, strict=True):
        assert norm64(t.cpu()) <= 1.0
        clipped = ref.clone()
        clip_per_tensor_([clipped], 1.0)
        assert torch.allclose(
            torch.sort(t.cpu().reshape(-1).double()).values,
            torch.sort(clipped.reshape(-1).double()).values,
            rtol=1e-6,
            atol=0,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mechanism_does_not_sync() -> None:
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in [(10,), (7, 13), (1000,)]]
    for p in params:
        p.grad = torch.randn(p.shape, device=device) * 5
    mech = BlockShuffleMechanism(params, [3, 5, 7], 1.0, seed=5)
    mech.privatize_()  # first call creates the CUDA generator
    cpu_state = mech.generator_state_dict()["cpu"]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mech.privatize_()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    state = mech.generator_state_dict()
    assert set(state["devices"]) == {"cuda:0"}
    assert state["cpu"] == cpu_state  # CUDA tensors never draw from the host generator
    for p in params:
        assert norm64(p.grad.cpu()) <= 1.0
