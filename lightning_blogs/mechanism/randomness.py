"""Sources of privacy-relevant randomness.

Shuffle permutations (and, later, noise) must not be predictable by anyone who did not take part in
training: a generator seeded from a guessable value can be replayed. So every generator here is
seeded from the operating system's entropy pool unless the user asks for a fixed seed, which makes
a run reproducible and, by the same token, not private against whoever knows the seed.
"""

from __future__ import annotations

import os

import torch

__all__ = ["entropy_seed", "make_generator"]

# torch.Generator.manual_seed accepts values in [0, 2**64).
_SEED_BYTES = 8


def entropy_seed() -> int:
    """Draw a fresh 64-bit seed from the operating system's entropy pool (``os.urandom``)."""
    return int.from_bytes(os.urandom(_SEED_BYTES), "little")


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed``.

    Args:
        seed: integer in ``[0, 2**64)``; use :func:`entropy_seed` for a private run.
        device: device whose kernels will consume the generator (a CUDA generator for CUDA
            tensors, so that drawing a permutation never leaves the device).
    """
    if not 0 <= seed < 2 ** (8 * _SEED_BYTES):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator
