"""Tests of the paper's privacy figure and the block-size planner (``accounting/blogs_paper.py``).

Every expected value is recomputed here with ``mpmath`` (50 digits) straight from
``shared/PRIVACY.md`` section 1::

    eps1(d)      = 2 ln(1 + d (exp(2C / sqrt(d)) - 1))
    eps2(d, B)   = 2 ln(1 + (B/d) (exp(2C sqrt(B/d)) - 1))
    eps_i        = min(eps1(d_i), eps2(d_i, B_i))
    eps_step     = sum_i eps_i
    eps_total(T) = sqrt(2 T ln(1/delta)) eps_step + T eps_step (exp(eps_step) - 1)
"""

from __future__ import annotations

import math
import time

import mpmath
import numpy as np
import pytest
import torch
import torchvision

from lightning_blogs.accounting import (
    BlockPlan,
    UnreachableEpsilonError,
    compose_epsilon,
    max_step_epsilon,
    plan_block_sizes,
    tensor_epsilon,
    tensor_epsilon_blocks,
    tensor_epsilon_dense,
)

mp = mpmath.mp
mp.dps = 50

# --------------------------------------------------------------------------------------------
# independent reference implementation (mpmath)


def mp_eps1(d: int, c: float) -> mpmath.mpf:
    d = mp.mpf(d)
    return 2 * mp.log(1 + d * (mp.exp(2 * mp.mpf(c) / mp.sqrt(d)) - 1))


def mp_eps2(d: int, b: int, c: float) -> mpmath.mpf:
    r = mp.mpf(b) / mp.mpf(d)
    return 2 * mp.log(1 + r * (mp.exp(2 * mp.mpf(c) * mp.sqrt(r)) - 1))


def mp_tensor_eps(d: int, b: int, c: float) -> mpmath.mpf:
    return min(mp_eps1(d, c), mp_eps2(d, b, c))


def mp_step(numels: dict[str, int], blocks: dict[str, int], c: float) -> mpmath.mpf:
    return mp.fsum(mp_tensor_eps(numels[n], blocks[n], c) for n in numels)


def mp_total(step: mpmath.mpf, steps: int, delta: float) -> mpmath.mpf:
    t = mp.mpf(steps)
    return mp.sqrt(2 * t * mp.log(1 / mp.mpf(delta))) * step + t * step * (mp.exp(step) - 1)


def mp_figure(numels: dict[str, int], blocks: dict[str, int], c: float, steps: int, delta: float) -> mpmath.mpf:
    return mp_total(mp_step(numels, blocks, c), steps, delta)


def assert_rel(actual: float, expected: mpmath.mpf, rel: float = 1e-9) -> None:
    expected_f = float(expected)
    assert abs(actual - expected_f) <= rel * abs(expected_f), (actual, expected_f)


# --------------------------------------------------------------------------------------------
# model sizes

SMALL = {"a": 100, "b": 7, "c": 4096}

# a small CNN + MLP (conv 3->16->32, fc 2048->128->10), with biases and a norm layer
SMALL_MODEL = {
    "conv1.weight": 16 * 3 * 3 * 3,
    "conv1.bias": 16,
    "bn1.weight": 16,
    "bn1.bias": 16,
    "conv2.weight": 32 * 16 * 3 * 3,
    "conv2.bias": 32,
    "fc1.weight": 128 * 2048,
    "fc1.bias": 128,
    "fc2.weight": 10 * 128,
    "fc2.bias": 10,
}


@pytest.fixture(scope="module")
def resnet18_sizes() -> dict[str, int]:
    model = torchvision.models.resnet18(num_classes=10)
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def tinyllama_sizes() -> dict[str, int]:
    """A TinyLlama-1.1B-shaped model on the meta device (no memory is allocated)."""
    hidden, inter, vocab, layers, heads, kv_heads = 2048, 5632, 32000, 22, 32, 4
    kv_dim = hidden // heads * kv_heads  # 256
    with torch.device("meta"):
        model = torch.nn.Module()
        model.embed_tokens = torch.nn.Embedding(vocab, hidden)
        model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            layer.self_attn.q_proj = torch.nn.Linear(hidden, hidden, bias=False)
            layer.self_attn.k_proj = torch.nn.Linear(hidden, kv_dim, bias=False)
            layer.self_attn.v_proj = torch.nn.Linear(hidden, kv_dim, bias=False)
            layer.self_attn.o_proj = torch.nn.Linear(hidden, hidden, bias=False)
            layer.mlp = torch.nn.Module()
            layer.mlp.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
            layer.mlp.up_proj = torch.nn.Linear(hidden, inter, bias=False)
            layer.mlp.down_proj = torch.nn.Linear(inter, hidden, bias=False)
            layer.input_layernorm = torch.nn.RMSNorm(hidden)
            layer.post_attention_layernorm = torch.nn.RMSNorm(hidden)
            model.layers.append(layer)
        model.norm = torch.nn.RMSNorm(hidden)
        model.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    assert next(model.parameters()).device.type == "meta"
    return {name: p.numel() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# the per-tensor formulas


@pytest.mark.parametrize("c", [1e-4, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("d", [1, 7, 100, 4096, 2_359_296, 65_536_000])
def test_tensor_formulas_match_mpmath(d: int, c: float) -> None:
    assert_rel(float(tensor_epsilon_dense(d, c)), mp_eps1(d, c), 1e-12)
    for b in sorted({1, 2, 3, max(1, d // 7), d}):
        assert_rel(float(tensor_epsilon_blocks(d, b, c)), mp_eps2(d, b, c), 1e-12)
        assert_rel(float(tensor_epsilon(d, b, c)), mp_tensor_eps(d, b, c), 1e-12)


def test_tensor_formulas_vectorised() -> None:
    d = np.array([1, 7, 100, 4096])
    b = np.array([1, 3, 10, 64])
    out = tensor_epsilon(d, b, 0.5)
    assert out.shape == (4,)
    for i in range(4):
        assert_rel(float(out[i]), mp_tensor_eps(int(d[i]), int(b[i]), 0.5), 1e-12)
    # eps2 increases with B, and B = d gives eps2 = 2 ln(exp(2C)) = 4C
    e = tensor_epsilon_blocks(4096, np.arange(1, 4097), 0.5)
    assert np.all(np.diff(e) > 0)
    assert e[-1] == pytest.approx(2.0, rel=1e-12)


# --------------------------------------------------------------------------------------------
# worked examples


def test_worked_example_fixed_block_sizes() -> None:
    blocks = {"a": 10, "b": 3, "c": 64}
    c, delta, steps = 0.5, 1e-5, 200
    plan = plan_block_sizes(SMALL, clip_norm=c, delta=delta, steps=steps, target_epsilon=None, block_size=blocks)
    assert isinstance(plan, BlockPlan)
    assert plan.as_dict() == blocks
    assert plan.names == ("a", "b", "c")
    assert plan.numels == (100, 7, 4096)
    assert plan.target_epsilon is None
    assert (plan.clip_norm, plan.delta, plan.steps) == (c, delta, steps)
    for name, eps in zip(plan.names, plan.tensor_epsilons, strict=True):
        assert_rel(eps, mp_tensor_eps(SMALL[name], blocks[name], c))
    step = mp_step(SMALL, blocks, c)
    assert_rel(plan.step_epsilon, step)
    assert_rel(plan.epsilon, mp_total(step, steps, delta))
    # written-out values (from mpmath; guards against the helper and the library agreeing on a typo)
    assert plan.step_epsilon == pytest.approx(float(step), rel=1e-12)
    assert plan.epsilon_after(200) == pytest.approx(plan.epsilon, rel=1e-15)
    assert_rel(plan.epsilon_after(50), mp_total(step, 50, delta))
    assert plan.epsilon_after(0) == 0.0


def test_worked_example_values_are_what_the_formula_says() -> None:
    """Hand-check of one term so the mpmath helper itself is pinned: for d = 7, B = 3, C = 0.5,
    eps2 = 2 ln(1 + 3/7 (exp(sqrt(3/7)) - 1)) and eps1 = 2 ln(1 + 7 (exp(1/sqrt 7) - 1))."""
    eps2 = 2 * math.log(1 + 3 / 7 * (math.exp(math.sqrt(3 / 7)) - 1))
    eps1 = 2 * math.log(1 + 7 * (math.exp(1 / math.sqrt(7)) - 1))
    assert eps2 < eps1
    assert float(mp_tensor_eps(7, 3, 0.5)) == pytest.approx(eps2, rel=1e-14)
    plan = plan_block_sizes({"b": 7}, 0.5, 1e-5, 200, None, block_size=3)
    assert plan.step_epsilon == pytest.approx(eps2, rel=1e-12)
    expected = math.sqrt(2 * 200 * math.log(1e5)) * eps2 + 200 * eps2 * math.expm1(eps2)
    assert plan.epsilon == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("c", "steps", "target"), [(0.01, 100, 3.0), (1e-3, 1000, 1.0), (0.05, 10, 8.0)])
def test_worked_example_planned(c: float, steps: int, target: float) -> None:
    delta = 1e-5
    plan = plan_block_sizes(SMALL_MODEL, clip_norm=c, delta=delta, steps=steps, target_epsilon=target)
    blocks = plan.as_dict()
    assert all(1 <= blocks[n] <= SMALL_MODEL[n] for n in SMALL_MODEL)
    figure = mp_figure(SMALL_MODEL, blocks, c, steps, delta)
    assert_rel(plan.epsilon, figure)
    assert_rel(plan.step_epsilon, mp_step(SMALL_MODEL, blocks, c))
    assert plan.epsilon <= target
    assert figure <= target
    assert plan.target_epsilon == target
    # not all blocks are 1 and not all are numel: the target binds somewhere in between
    assert any(b > 1 for b in blocks.values())
    assert any(blocks[n] < SMALL_MODEL[n] for n in SMALL_MODEL)
    assert_common_budget_and_maximal(SMALL_MODEL, plan, c, steps, delta, target)


def assert_common_budget_and_maximal(
    numels: dict[str, int], plan: BlockPlan, c: float, steps: int, delta: float, target: float
) -> None:
    """The plan is the greedy common-budget plan and its budget cannot be raised.

    1. With t = max eps_i over the tensors with B_i > 1, every tensor has the largest B with
       eps_i(B) <= t (brute force over every B in [1, d]; B = 1 where even B = 1 does not fit,
       the planner's floor).
    2. Raising t to the next value at which any tensor would get a larger block
       (t' = min over tensors with B_i < d_i of eps_i(B_i + 1)) gives a figure above the target.
    """
    names = list(numels)
    above_one = [e for e, b in zip(plan.tensor_epsilons, plan.block_sizes, strict=True) if b > 1]
    assert above_one, "every block size is 1: not a maximal plan unless the target is the smallest figure"
    t = max(above_one)
    next_levels = []
    for name, b in zip(plan.names, plan.block_sizes, strict=True):
        d = numels[name]
        all_b = np.arange(1, d + 1)
        eps = tensor_epsilon(d, all_b, c)
        fits = np.flatnonzero(eps <= t)
        largest = int(all_b[fits[-1]]) if fits.size else 1
        assert b == largest, (name, b, largest)
        if b < d:
            next_levels.append(float(eps[b]))  # eps_i(B_i + 1)
    if not next_levels:
        return
    t_next = min(next_levels)
    raised = {}
    for name in names:
        d = numels[name]
        eps = tensor_epsilon(d, np.arange(1, d + 1), c)
        fits = np.flatnonzero(eps <= t_next)
        raised[name] = int(fits[-1]) + 1 if fits.size else 1
    assert raised != plan.as_dict()
    assert mp_figure(numels, raised, c, steps, delta) > target


# --------------------------------------------------------------------------------------------
# reference values (PRIVACY.md section 2)


def test_resnet18_reference_block_size_one(resnet18_sizes: dict[str, int]) -> None:
    assert len(resnet18_sizes) == 62
    assert sum(resnet18_sizes.values()) == 11_181_642
    plan = plan_block_sizes(resnet18_sizes, clip_norm=1.0, delta=1e-5, steps=938, target_epsilon=None, block_size=1)
    assert set(plan.block_sizes) == {1}
    assert abs(plan.epsilon - 144.149) < 0.01
    assert_rel(plan.epsilon, mp_figure(resnet18_sizes, dict.fromkeys(resnet18_sizes, 1), 1.0, 938, 1e-5))


def test_resnet18_reference_one_block_per_tensor(resnet18_sizes: dict[str, int]) -> None:
    blocks = dict(resnet18_sizes)  # B = numel: no shuffling at all
    plan = plan_block_sizes(resnet18_sizes, 1e-4, 1e-5, 938, target_epsilon=None, block_size=blocks)
    assert plan.as_dict() == blocks
    assert abs(plan.epsilon - 4.2288) < 1e-3
    assert_rel(plan.epsilon, mp_figure(resnet18_sizes, blocks, 1e-4, 938, 1e-5))
    # a huge int block size is clamped to numel and gives the same figure
    clamped = plan_block_sizes(resnet18_sizes, 1e-4, 1e-5, 938, None, block_size=10**12)
    assert clamped.as_dict() == blocks
    assert clamped.epsilon == plan.epsilon
    # and a target above it plans one block per tensor
    planned = plan_block_sizes(resnet18_sizes, 1e-4, 1e-5, 938, target_epsilon=4.3)
    assert planned.as_dict() == blocks


def test_resnet18_unreachable_at_c1(resnet18_sizes: dict[str, int]) -> None:
    with pytest.raises(UnreachableEpsilonError) as info:
        plan_block_sizes(resnet18_sizes, clip_norm=1.0, delta=1e-5, steps=938, target_epsilon=100.0)
    assert abs(info.value.smallest_epsilon - 144.149) < 0.01


# --------------------------------------------------------------------------------------------
# never exceeds the target


@pytest.mark.parametrize("steps", [1, 100, 2000])
@pytest.mark.parametrize("c", [1e-3, 0.01, 0.1, 1.0])
def test_never_exceeds_target(c: float, steps: int) -> None:
    delta = 1e-5
    ones = dict.fromkeys(SMALL_MODEL, 1)
    smallest = float(mp_figure(SMALL_MODEL, ones, c, steps, delta))
    no_shuffle = float(mp_figure(SMALL_MODEL, SMALL_MODEL, c, steps, delta))
    for target in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0):
        if target < smallest:
            with pytest.raises(UnreachableEpsilonError) as info:
                plan_block_sizes(SMALL_MODEL, c, delta, steps, target)
            assert info.value.smallest_epsilon == pytest.approx(smallest, rel=1e-9)
            continue
        plan = plan_block_sizes(SMALL_MODEL, c, delta, steps, target)
        assert plan.epsilon <= target
        assert float(mp_figure(SMALL_MODEL, plan.as_dict(), c, steps, delta)) <= target * (1 + 1e-12)
        assert_rel(plan.epsilon, mp_figure(SMALL_MODEL, plan.as_dict(), c, steps, delta))
        if target >= no_shuffle:
            assert plan.as_dict() == SMALL_MODEL, (target, no_shuffle)
        else:
            assert plan.as_dict() != SMALL_MODEL
            assert_common_budget_and_maximal(SMALL_MODEL, plan, c, steps, delta, target)


# Regression (found against c98bb70): _plan_free compared a count-weighted sum over distinct sizes
# with max_step_epsilon(target) (a per-tensor sum); one ulp apart, a target equal to the no-shuffle
# figure missed the early return and got numel - 1 for every tensor.
def test_target_exactly_at_no_shuffle_figure() -> None:
    c, steps, delta = 0.01, 100, 1e-5
    plan_all = plan_block_sizes(SMALL_MODEL, c, delta, steps, None, block_size=dict(SMALL_MODEL))
    plan = plan_block_sizes(SMALL_MODEL, c, delta, steps, target_epsilon=plan_all.epsilon)
    assert plan.epsilon <= plan_all.epsilon
    assert plan.as_dict() == SMALL_MODEL


def test_larger_target_never_gives_smaller_blocks() -> None:
    c, steps, delta = 0.01, 100, 1e-5
    previous = None
    for target in np.geomspace(0.5, 20, 25):
        try:
            plan = plan_block_sizes(SMALL_MODEL, c, delta, steps, float(target))
        except UnreachableEpsilonError:
            assert previous is None
            continue
        assert plan.epsilon <= target
        if previous is not None:
            assert all(b >= p for b, p in zip(plan.block_sizes, previous.block_sizes, strict=True))
            assert plan.epsilon >= previous.epsilon
        previous = plan
    assert previous is not None


# --------------------------------------------------------------------------------------------
# unreachable targets


@pytest.mark.parametrize(("c", "steps", "target"), [(1.0, 938, 10.0), (0.5, 200, 1.0), (0.1, 10_000, 0.5)])
def test_unreachable_target(c: float, steps: int, target: float) -> None:
    delta = 1e-5
    smallest = float(mp_figure(SMALL_MODEL, dict.fromkeys(SMALL_MODEL, 1), c, steps, delta))
    assert smallest > target
    with pytest.raises(UnreachableEpsilonError) as info:
        plan_block_sizes(SMALL_MODEL, c, delta, steps, target)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.smallest_epsilon == pytest.approx(smallest, rel=1e-9)
    message = str(err)
    assert f"{err.smallest_epsilon:.6g}" in message
    assert f"{smallest:.6g}" in message
    assert "clip_norm" in message
    # the error is catchable as a plain ValueError
    with pytest.raises(ValueError, match="clip_norm"):
        plan_block_sizes(SMALL_MODEL, c, delta, steps, target)


def test_target_just_below_smallest_is_unreachable_and_just_above_is_not() -> None:
    c, steps, delta = 0.5, 200, 1e-5
    smallest = float(mp_figure(SMALL, dict.fromkeys(SMALL, 1), c, steps, delta))
    with pytest.raises(UnreachableEpsilonError):
        plan_block_sizes(SMALL, c, delta, steps, smallest * (1 - 1e-9))
    plan = plan_block_sizes(SMALL, c, delta, steps, smallest * (1 + 1e-9))
    assert plan.as_dict() == dict.fromkeys(SMALL, 1)
    assert plan.epsilon <= smallest * (1 + 1e-9)


# --------------------------------------------------------------------------------------------
# overrides


def test_int_block_size_applies_to_all_clamped() -> None:
    plan = plan_block_sizes(SMALL, 0.5, 1e-5, 200, None, block_size=50)
    assert plan.as_dict() == {"a": 50, "b": 7, "c": 50}
    assert_rel(plan.epsilon, mp_figure(SMALL, {"a": 50, "b": 7, "c": 50}, 0.5, 200, 1e-5))
    plan = plan_block_sizes(SMALL, 0.5, 1e-5, 200, None, block_size=np.int64(3))
    assert plan.as_dict() == {"a": 3, "b": 3, "c": 3}


def test_int_block_size_with_target_checks_it() -> None:
    # within the target: reported as is
    plan = plan_block_sizes(SMALL, 0.01, 1e-5, 100, target_epsilon=50.0, block_size=8)
    assert plan.as_dict() == {"a": 8, "b": 7, "c": 8}
    assert plan.epsilon <= 50.0
    # above the target: raises, naming the figure
    fig = float(mp_figure(SMALL, {"a": 8, "b": 7, "c": 8}, 0.01, 100, 1e-5))
    with pytest.raises(UnreachableEpsilonError) as info:
        plan_block_sizes(SMALL, 0.01, 1e-5, 100, target_epsilon=fig * 0.99, block_size=8)
    assert f"{fig:.6g}" in str(info.value)
    assert "block_size" in str(info.value)
    assert info.value.smallest_epsilon <= fig * (1 + 1e-12)  # equal up to float rounding


def test_glob_mapping_fixes_matched_and_plans_the_rest() -> None:
    c, steps, delta, target = 0.01, 100, 1e-5, 3.0
    override = {"*.bias": 4, "conv1.*": 2}  # first match wins: conv1.bias gets 4
    plan = plan_block_sizes(SMALL_MODEL, c, delta, steps, target, block_size=override)
    blocks = plan.as_dict()
    for name, d in SMALL_MODEL.items():
        if name.endswith(".bias"):
            assert blocks[name] == min(4, d)
    assert blocks["conv1.weight"] == 2
    assert plan.epsilon <= target
    assert_rel(plan.epsilon, mp_figure(SMALL_MODEL, blocks, c, steps, delta))
    free = [n for n in SMALL_MODEL if not n.endswith(".bias") and not n.startswith("conv1.")]
    assert any(blocks[n] not in (1, SMALL_MODEL[n]) for n in free)  # the planner used the budget
    # the free tensors got the common-budget plan for the budget left by the fixed ones
    fixed_step = mp.fsum(mp_tensor_eps(SMALL_MODEL[n], blocks[n], c) for n in SMALL_MODEL if n not in free)
    free_numels = {n: SMALL_MODEL[n] for n in free}
    assert mp_total(mp_step(free_numels, blocks, c) + fixed_step, steps, delta) <= target
    # with the fixed tensors taking part of the budget, the free ones get blocks no larger than
    # they would get alone
    free_plan = plan_block_sizes(free_numels, c, delta, steps, target)
    assert all(blocks[n] <= free_plan.as_dict()[n] for n in free)  # less budget: blocks no larger


def test_glob_mapping_covering_everything_needs_no_target() -> None:
    plan = plan_block_sizes(SMALL_MODEL, 0.1, 1e-5, 10, None, block_size={"conv*": 3, "*": 16})
    for name, d in SMALL_MODEL.items():
        assert plan.as_dict()[name] == min(3 if name.startswith("conv") else 16, d)


def test_glob_mapping_not_covering_everything_needs_target() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        plan_block_sizes(SMALL_MODEL, 0.1, 1e-5, 10, None, block_size={"*.weight": 3})


def test_override_exceeding_target_raises() -> None:
    c, steps, delta = 0.1, 100, 1e-5
    # fixed part alone is above the target
    with pytest.raises(UnreachableEpsilonError):
        plan_block_sizes(SMALL_MODEL, c, delta, steps, 1.0, block_size={"fc1.weight": 128 * 2048})
    # every tensor fixed, figure above the target
    with pytest.raises(UnreachableEpsilonError):
        plan_block_sizes(SMALL_MODEL, c, delta, steps, 1.0, block_size=10**9)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, False, "4", None])
def test_invalid_block_size(bad: object) -> None:
    if bad is not None:
        with pytest.raises(ValueError, match="block_size"):
            plan_block_sizes(SMALL, 0.5, 1e-5, 200, 100.0, block_size=bad)
    with pytest.raises(ValueError, match="block_size"):
        plan_block_sizes(SMALL, 0.5, 1e-5, 200, 100.0, block_size={"a": 4, "c": bad})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": math.nan}, "clip_norm"),
        ({"clip_norm": math.inf}, "clip_norm"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"delta": math.nan}, "delta"),
        ({"steps": 0}, "steps"),
        ({"steps": -5}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": math.nan}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
    ],
)
def test_invalid_arguments(kwargs: dict, name: str) -> None:
    args = {"numels": SMALL, "clip_norm": 0.5, "delta": 1e-5, "steps": 200, "target_epsilon": 100.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as info:
        plan_block_sizes(**args)
    assert not isinstance(info.value, UnreachableEpsilonError)


def test_empty_or_zero_sized_numels_rejected() -> None:
    with pytest.raises(ValueError, match="numels"):
        plan_block_sizes({}, 0.5, 1e-5, 200, 10.0)
    with pytest.raises(ValueError, match="numels"):
        plan_block_sizes({"a": 0, "b": 3}, 0.5, 1e-5, 200, 10.0)


def test_infinite_target_rejected() -> None:
    with pytest.raises(ValueError, match="target_epsilon") as info:
        plan_block_sizes(SMALL, 0.5, 1e-5, 200, math.inf)
    assert not isinstance(info.value, UnreachableEpsilonError)


# Regression (found against c98bb70): max_step_epsilon's bisection started at hi = target and
# stopped after 200 halvings, so a target above ~1e62 gave 0 and a false UnreachableEpsilonError.
def test_huge_target_plans_one_block_per_tensor() -> None:
    try:
        plan = plan_block_sizes(SMALL, 0.5, 1e-5, 200, 1e70)
    except UnreachableEpsilonError as err:
        pytest.fail(f"a huge target reported as unreachable: {err}")
    assert plan.as_dict() == SMALL
    assert max_step_epsilon(1e70, 200, 1e-5) >= max_step_epsilon(1e60, 200, 1e-5)


# --------------------------------------------------------------------------------------------
# speed


def test_tinyllama_plans_in_under_a_second() -> None:
    sizes = tinyllama_sizes()
    total = sum(sizes.values())
    assert 1.0e9 <= total <= 1.2e9, total
    assert len(sizes) == 1 + 22 * 9 + 2
    start = time.perf_counter()
    plan = plan_block_sizes(sizes, clip_norm=0.01, delta=1e-5, steps=1000, target_epsilon=8.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    assert plan.epsilon <= 8.0
    assert len(plan.block_sizes) == len(sizes)
    assert all(1 <= b <= d for b, d in zip(plan.block_sizes, plan.numels, strict=True))
    # the same-sized tensors got the same block size (the plan depends only on sizes)
    by_size: dict[int, set[int]] = {}
    for b, d in zip(plan.block_sizes, plan.numels, strict=True):
        by_size.setdefault(d, set()).add(b)
    assert all(len(v) == 1 for v in by_size.values())
    # checked against mpmath on the distinct sizes, weighted by how often each appears
    counts: dict[int, int] = {}
    for d in plan.numels:
        counts[d] = counts.get(d, 0) + 1
    step = mp.fsum(counts[d] * mp_tensor_eps(d, next(iter(by_size[d])), 0.01) for d in counts)
    assert_rel(plan.step_epsilon, step)
    assert_rel(plan.epsilon, mp_total(step, 1000, 1e-5))


# --------------------------------------------------------------------------------------------
# composition


def test_compose_zero() -> None:
    assert compose_epsilon(1.7, 0, 1e-5) == 0.0
    assert compose_epsilon(0.0, 0, 1e-5) == 0.0
    assert compose_epsilon(0.0, 100, 1e-5) == 0.0


@pytest.mark.parametrize(
    ("s", "steps", "delta"), [(0.01, 1, 1e-5), (0.003, 938, 1e-5), (0.5, 200, 1e-6), (2.0, 10, 1e-3)]
)
def test_compose_matches_mpmath(s: float, steps: int, delta: float) -> None:
    assert_rel(compose_epsilon(s, steps, delta), mp_total(mp.mpf(s), steps, delta), 1e-12)


def test_compose_overflow_is_inf() -> None:
    assert compose_epsilon(1000.0, 10, 1e-5) == math.inf


@pytest.mark.parametrize("target", [0.01, 0.5, 1.0, 8.0, 144.0, 1e4])
@pytest.mark.parametrize("steps", [1, 10, 938, 100_000])
@pytest.mark.parametrize("delta", [1e-5, 1e-10, 0.1])
def test_max_step_epsilon_inverse(target: float, steps: int, delta: float) -> None:
    s = max_step_epsilon(target, steps, delta)
    assert 0 < s
    composed = compose_epsilon(s, steps, delta)
    assert composed <= target
    assert abs(composed - target) <= 1e-9 * target
    # and the next float up overshoots: s is the largest
    assert compose_epsilon(np.nextafter(s, math.inf), steps, delta) > target * (1 - 1e-15)


# Regression (found against c98bb70): the bisection's upper bound was target_epsilon, assuming
# compose_epsilon(s) > s, which fails when 2 T ln(1/delta) < 1 (here T = 1, delta = 0.9).
def test_max_step_epsilon_inverse_large_delta() -> None:
    target, steps, delta = 0.1, 1, 0.9
    s = max_step_epsilon(target, steps, delta)
    composed = compose_epsilon(s, steps, delta)
    assert composed <= target
    assert abs(composed - target) <= 1e-9 * target
