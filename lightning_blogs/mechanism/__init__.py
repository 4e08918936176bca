"""The mechanism as plain torch functions: clipping, block shuffling, randomness.

Nothing here imports Lightning; the callbacks and the engine are adapters over these pieces.
"""

from lightning_blogs.mechanism.blogs import BlockShuffleMechanism
from lightning_blogs.mechanism.clipping import clip_per_tensor_
from lightning_blogs.mechanism.randomness import RandomSource, entropy_seed, make_generator
from lightning_blogs.mechanism.shuffle import block_shuffle_, num_blocks

__all__ = [
    "BlockShuffleMechanism",
    "RandomSource",
    "block_shuffle_",
    "clip_per_tensor_",
    "entropy_seed",
    "make_generator",
    "num_blocks",
]
