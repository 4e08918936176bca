"""The privacy figure of DP-BloGS as published, and the block-size planner built on it.

Formulas from Zagardo, arXiv 2407.21347 v1, as implemented by ``forgetnet`` 0.1.5
(``docs/privacy.md`` and ``../shared/PRIVACY.md`` section 1). For a tensor of ``d`` entries clipped
to ``C`` and shuffled in blocks of ``B`` entries::

    eps1(d)      = 2 ln(1 + d (exp(2C / sqrt(d)) - 1))
    eps2(d, B)   = 2 ln(1 + (B/d) (exp(2C sqrt(B/d)) - 1))
    eps_i        = min(eps1(d_i), eps2(d_i, B_i))
    eps_step     = sum_i eps_i
    eps_total(T) = sqrt(2 T ln(1/delta)) eps_step + T eps_step (exp(eps_step) - 1)

This figure is NOT a differential-privacy guarantee: the shuffle leaves block sums, norms and
other statistics of the clipped gradient unchanged, so no (epsilon, delta) bound with delta < 1
holds for the mechanism (PRIVACY.md section 2). It is computed because users ask for the paper's
number; it is logged as ``privacy/epsilon_blogs_paper`` and never as a proven bound.

Everything here is vectorised NumPy in float64, so planning a billion-parameter model takes
milliseconds: the work depends on the number of distinct tensor sizes, not on the entries.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lightning_blogs._validation import check_open_unit_interval, check_positive_float, check_positive_int

__all__ = [
    "BlockPlan",
    "UnreachableEpsilonError",
    "compose_epsilon",
    "composition_coefficients",
    "max_step_epsilon",
    "plan_block_sizes",
    "tensor_epsilon",
    "tensor_epsilon_blocks",
    "tensor_epsilon_dense",
]

BlockSizeOverride = int | Mapping[str, int] | None


class UnreachableEpsilonError(ValueError):
    """The target cannot be met even with block size 1 for every tensor.

    Attributes:
        smallest_epsilon: the smallest figure reachable with the given ``clip_norm``, ``delta`` and
            number of steps (every block size 1, or the user's fixed block sizes).
    """

    def __init__(self, message: str, smallest_epsilon: float) -> None:
        super().__init__(message)
        self.smallest_epsilon = smallest_epsilon


def tensor_epsilon_dense(numel: np.ndarray | int, clip_norm: float) -> np.ndarray:
    """``eps1(d) = 2 ln(1 + d (exp(2C/sqrt(d)) - 1))``, elementwise over ``numel``."""
    d = np.asarray(numel, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 2.0 * np.log1p(d * np.expm1(2.0 * clip_norm / np.sqrt(d)))


def tensor_epsilon_blocks(numel: np.ndarray | int, block_size: np.ndarray | int, clip_norm: float) -> np.ndarray:
    """``eps2(d, B) = 2 ln(1 + (B/d) (exp(2C sqrt(B/d)) - 1))``, elementwise (increasing in B)."""
    ratio = np.asarray(block_size, dtype=np.float64) / np.asarray(numel, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 2.0 * np.log1p(ratio * np.expm1(2.0 * clip_norm * np.sqrt(ratio)))


def tensor_epsilon(numel: np.ndarray | int, block_size: np.ndarray | int, clip_norm: float) -> np.ndarray:
    """Per-tensor figure ``eps_i = min(eps1(d_i), eps2(d_i, B_i))``, elementwise."""
    return np.minimum(tensor_epsilon_dense(numel, clip_norm), tensor_epsilon_blocks(numel, block_size, clip_norm))


def composition_coefficients(step_epsilon: float, delta: float) -> tuple[float, float]:
    """``(a, b)`` such that the composed figure after T steps is ``a sqrt(T) + b T``.

    ``a = sqrt(2 ln(1/delta)) eps_step`` and ``b = eps_step (exp(eps_step) - 1)`` (inf on overflow).
    """
    try:
        linear = step_epsilon * math.expm1(step_epsilon)
    except OverflowError:
        linear = math.inf
    return math.sqrt(2.0 * math.log(1.0 / delta)) * step_epsilon, linear


def compose_epsilon(step_epsilon: float, steps: int, delta: float) -> float:
    """The paper's composition over ``steps`` optimizer steps (advanced composition form).

    ``sqrt(2 T ln(1/delta)) eps_step + T eps_step (exp(eps_step) - 1)``; 0 for ``steps == 0``.
    """
    if steps == 0:
        return 0.0
    sqrt_coefficient, linear_coefficient = composition_coefficients(step_epsilon, delta)
    return sqrt_coefficient * math.sqrt(steps) + linear_coefficient * steps


def max_step_epsilon(target_epsilon: float, steps: int, delta: float) -> float:
    """Largest per-step figure whose composition over ``steps`` stays ``<= target_epsilon``."""
    lo, hi = 0.0, target_epsilon
    while compose_epsilon(hi, steps, delta) <= target_epsilon:  # only when 2 T ln(1/delta) < 1
        lo, hi = hi, 2.0 * hi
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if compose_epsilon(mid, steps, delta) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def _largest_block_sizes(numel: np.ndarray, budget: float, clip_norm: float) -> np.ndarray:
    """Largest ``B`` in ``[1, d]`` with ``eps_i(d, B) <= budget`` for each ``d``; 1 where none.

    A vectorised integer bisection on ``eps2``, which increases with ``B``; tensors whose dense
    figure ``eps1(d)`` already fits get ``B = d`` (one block: no shuffle is needed).
    """
    lo = np.ones_like(numel)
    hi = numel.copy()
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi + 1) // 2
        fits = tensor_epsilon_blocks(numel, mid, clip_norm) <= budget
        lo = np.where(active & fits, mid, lo)
        hi = np.where(active & ~fits, mid - 1, hi)
    return np.where(tensor_epsilon_dense(numel, clip_norm) <= budget, numel, lo)


@dataclass(frozen=True)
class BlockPlan:
    """Block sizes for every tensor and the paper's figure they give.

    Attributes:
        names: tensor names, in the order given to the planner.
        numels: entries per tensor.
        block_sizes: entries per block for each tensor, in ``[1, numel]``.
        tensor_epsilons: ``eps_i`` for each tensor.
        step_epsilon: ``sum_i eps_i``.
        clip_norm, delta, steps: the inputs of the figure.
        epsilon: ``compose_epsilon(step_epsilon, steps, delta)``, the figure after all planned
            steps; never above the target the plan was made for.
        target_epsilon: the target, or None when every block size was fixed by the user.
    """

    names: tuple[str, ...]
    numels: tuple[int, ...]
    block_sizes: tuple[int, ...]
    tensor_epsilons: tuple[float, ...] = field(repr=False)
    step_epsilon: float
    clip_norm: float
    delta: float
    steps: int
    epsilon: float
    target_epsilon: float | None

    def as_dict(self) -> dict[str, int]:
        """Mapping from tensor name to block size."""
        return dict(zip(self.names, self.block_sizes, strict=True))

    def epsilon_after(self, steps: int) -> float:
        """The paper's figure after ``steps`` optimizer steps with this plan."""
        return compose_epsilon(self.step_epsilon, steps, self.delta)

    def composition_coefficients(self) -> tuple[float, float]:
        """``(a, b)`` with ``epsilon_after(T) = a sqrt(T) + b T``: the figure as a formula in T."""
        return composition_coefficients(self.step_epsilon, self.delta)


def _fixed_block_sizes(names: list[str], numels: np.ndarray, override: BlockSizeOverride) -> np.ndarray:
    """Block sizes fixed by the user (clamped to ``numel``); 0 marks a tensor left to the planner."""
    fixed = np.zeros_like(numels)
    if override is None:
        return fixed
    if isinstance(override, Mapping):
        patterns = list(override.items())
    else:
        patterns = [("*", override)]
    for pattern, size in patterns:
        check_positive_int(f"block_size[{pattern!r}]", size)
    for i, name in enumerate(names):
        for pattern, size in patterns:  # the first matching glob wins
            if fnmatch.fnmatchcase(name, pattern):
                fixed[i] = min(int(size), int(numels[i]))
                break
    return fixed


def plan_block_sizes(
    numels: Mapping[str, int],
    clip_norm: float,
    delta: float,
    steps: int,
    target_epsilon: float | None,
    block_size: BlockSizeOverride = None,
) -> BlockPlan:
    """Choose per-tensor block sizes so that the paper's figure meets ``target_epsilon``.

    Every free tensor gets the largest block size whose ``eps_i`` fits a common per-tensor budget
    ``t``, and ``t`` is the largest value for which the composed figure stays within the target.
    Larger blocks keep more of the gradient's structure, so the planner shuffles as little as the
    target allows. The plan never exceeds the target.

    Args:
        numels: entries of each trainable tensor, by parameter name.
        clip_norm: per-tensor clipping bound C > 0.
        delta: the figure's delta, in (0, 1).
        steps: number of optimizer steps T >= 1 the plan must cover.
        target_epsilon: the figure not to exceed after ``steps`` steps; None only when
            ``block_size`` fixes every tensor (the figure is then only reported).
        block_size: one block size for every tensor, or a mapping from parameter-name glob
            (``fnmatch``, first match wins) to block size; tensors no glob matches are planned.

    Raises:
        UnreachableEpsilonError: the target cannot be met even with block size 1 for every free
            tensor; the message states the smallest reachable figure and the knobs that move it.
        ValueError: an argument is out of range.
    """
    if not numels:
        raise ValueError("numels is empty: the model has no trainable parameters to protect")
    check_positive_float("clip_norm", clip_norm)
    check_open_unit_interval("delta", delta)
    check_positive_int("steps", steps)
    if target_epsilon is not None:
        check_positive_float("target_epsilon", target_epsilon)

    names = list(numels)
    sizes = np.array([numels[n] for n in names], dtype=np.int64)
    if (sizes < 1).any():
        raise ValueError("every tensor in numels must have at least one entry")
    blocks = _fixed_block_sizes(names, sizes, block_size)
    free = blocks == 0
    if free.any() and target_epsilon is None:
        missing = [n for n, f in zip(names, free, strict=True) if f][:5]
        raise ValueError(
            f"target_epsilon is None but block_size does not cover every parameter (e.g. {missing}); "
            "give a target_epsilon or a block size for every parameter"
        )

    if free.any():
        blocks = _plan_free(sizes, blocks, clip_norm, delta, steps, target_epsilon)
    tensor_eps = tensor_epsilon(sizes, blocks, clip_norm)
    step_eps = float(tensor_eps.sum())
    total = compose_epsilon(step_eps, steps, delta)
    if target_epsilon is not None and total > target_epsilon:
        smallest = _figure(sizes, np.where(free, 1, blocks), clip_norm, delta, steps)
        raise UnreachableEpsilonError(
            f"the fixed block_size gives a figure of {total:.6g} after {steps} steps, above "
            f"target_epsilon={target_epsilon:g}; smallest reachable with these fixed sizes: "
            f"{smallest:.6g}. Use smaller block sizes, lower clip_norm or train for fewer steps.",
            smallest_epsilon=smallest,
        )
    return BlockPlan(
        names=tuple(names),
        numels=tuple(int(s) for s in sizes),
        block_sizes=tuple(int(b) for b in blocks),
        tensor_epsilons=tuple(float(e) for e in tensor_eps),
        step_epsilon=step_eps,
        clip_norm=float(clip_norm),
        delta=float(delta),
        steps=int(steps),
        epsilon=total,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
    )


def _figure(sizes: np.ndarray, blocks: np.ndarray, clip_norm: float, delta: float, steps: int) -> float:
    """The composed figure of a full assignment of block sizes (the one check every plan passes)."""
    return compose_epsilon(float(tensor_epsilon(sizes, blocks, clip_norm).sum()), steps, delta)


def _plan_free(
    sizes: np.ndarray, blocks: np.ndarray, clip_norm: float, delta: float, steps: int, target_epsilon: float
) -> np.ndarray:
    """Fill the entries of ``blocks`` that are 0 (free tensors) so that the figure meets the target.

    Bisects the common per-tensor budget ``t``: the figure of "every free tensor at its largest
    block size within ``t``" does not decrease with ``t``. Every candidate is judged by
    :func:`_figure` on the whole assignment, the same computation as the final check, so no
    rounding difference can make a plan overshoot or fall short of a reachable target.

    Raises:
        UnreachableEpsilonError: even block size 1 for every free tensor exceeds the target.
    """
    free = blocks == 0
    unique, inverse = np.unique(sizes[free], return_inverse=True)

    def candidate(budget: float) -> np.ndarray:
        result = blocks.copy()
        result[free] = _largest_block_sizes(unique, budget, clip_norm)[inverse]
        return result

    def fits(assignment: np.ndarray) -> bool:
        return _figure(sizes, assignment, clip_norm, delta, steps) <= target_epsilon

    smallest = np.where(free, 1, blocks)
    if not fits(smallest):
        figure = _figure(sizes, smallest, clip_norm, delta, steps)
        raise UnreachableEpsilonError(
            f"target_epsilon={target_epsilon:g} cannot be reached: with clip_norm={clip_norm:g}, "
            f"delta={delta:g} and {steps} optimizer steps the smallest reachable figure "
            f"(block size 1 for every tensor) is {figure:.6g}. Lower clip_norm (the figure "
            f"shrinks with it), train for fewer steps, raise delta, or raise target_epsilon.",
            smallest_epsilon=figure,
        )
    hi = float(tensor_epsilon(unique, unique, clip_norm).max())  # every free tensor in one block
    best = candidate(hi)
    if fits(best):
        return best
    lo, best = 0.0, smallest
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        assignment = candidate(mid)
        if fits(assignment):
            lo, best = mid, assignment
        else:
            hi = mid
    return best
