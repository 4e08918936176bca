"""Privacy accounting.

``blogs_paper``: the figure published with DP-BloGS and the block-size planner. It is not a
formal differential-privacy guarantee (see ``docs/privacy.md``).

``gaussian``: proven (epsilon, delta) bounds for the Poisson-subsampled Gaussian mechanism on
Google's ``dp-accounting`` (RDP and PLD accountants, noise calibration).
"""

from lightning_blogs.accounting.blogs_paper import (
    BlockPlan,
    UnreachableEpsilonError,
    compose_epsilon,
    composition_coefficients,
    max_step_epsilon,
    plan_block_sizes,
    tensor_epsilon,
    tensor_epsilon_blocks,
    tensor_epsilon_dense,
)
from lightning_blogs.accounting.gaussian import (
    GaussianAccountant,
    GaussianSteps,
    calibrate_noise_multiplier,
)

__all__ = [
    "BlockPlan",
    "GaussianAccountant",
    "GaussianSteps",
    "UnreachableEpsilonError",
    "calibrate_noise_multiplier",
    "compose_epsilon",
    "composition_coefficients",
    "max_step_epsilon",
    "plan_block_sizes",
    "tensor_epsilon",
    "tensor_epsilon_blocks",
    "tensor_epsilon_dense",
]
