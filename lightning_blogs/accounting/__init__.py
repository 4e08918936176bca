"""Privacy accounting.

``blogs_paper``: the figure published with DP-BloGS and the block-size planner. It is not a
formal differential-privacy guarantee (see ``docs/privacy.md``).
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
