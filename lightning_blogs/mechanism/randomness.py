"""Sources of privacy-relevant randomness.

Shuffle permutations (and, later, noise) must not be predictable by anyone who did not take part in
training: a generator seeded from a guessable value can be replayed. So every generator here is
seeded from the operating system's entropy pool unless the user asks for a fixed seed, which makes
a run reproducible and, by the same token, not private against whoever knows the seed.

A 64-bit seed is only worth 64 bits if the generator keeps them all. torch's CPU generator
(mt19937) keeps the low 32 bits of its seed, so 2**32 candidate seeds would replay every CPU
permutation; CPU draws (permutations and noise) therefore come from NumPy's PCG64, whose ``SeedSequence`` uses the
whole seed. CUDA (and other accelerator) generators are Philox-based and keep all 64 bits, so
permutations there are drawn on the device by ``torch.randperm`` without touching the host.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["RandomSource", "entropy_seed", "make_generator"]

SEED_BITS = 64


def entropy_seed() -> int:
    """Draw a fresh 64-bit seed from the operating system's entropy pool (``os.urandom``)."""
    return int.from_bytes(os.urandom(SEED_BITS // 8), "little")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**SEED_BITS:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed`` in ``[0, 2**64)``.

    On CUDA the whole seed keys Philox. On the CPU torch keeps only its low 32 bits: use
    :class:`RandomSource` for privacy-relevant CPU draws.
    """
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(_check_seed(seed))
    return generator


class RandomSource:
    """Permutations and Gaussian noise on any device, from one seed that keeps all its 64 bits.

    CPU draws come from NumPy's PCG64 seeded through ``SeedSequence(seed)``; draws for an
    accelerator come from a Philox ``torch.Generator`` on that device, created on first use, with
    ``torch.randperm`` / ``torch.randn`` there (no host-device copy, no synchronisation).
    Processes that share the seed and draw in the same order get identical values.

    Args:
        seed: integer in ``[0, 2**64)``; use :func:`entropy_seed` for a private run.
    """

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        self._cpu = np.random.Generator(np.random.PCG64(self.seed))
        self._devices: dict[torch.device, torch.Generator] = {}

    def randperm(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A uniformly random permutation of ``range(n)`` as an int64 tensor on ``device``."""
        device = torch.device(device)
        if device.type == "cpu":
            return torch.from_numpy(self._cpu.permutation(n))
        return torch.randperm(n, generator=self._device_generator(device), device=device)

    def standard_normal(self, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """``numel`` independent N(0, 1) draws as a 1-d tensor of ``dtype`` on ``device``."""
        device = torch.device(device)
        if device.type == "cpu":
            # NumPy draws float32 or float64; a narrower dtype is rounded from float32.
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            return torch.from_numpy(self._cpu.standard_normal(numel, dtype=np_dtype)).to(dtype)
        return torch.randn(numel, generator=self._device_generator(device), dtype=dtype, device=device)

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._devices:
            self._devices[device] = make_generator(self.seed, device)
        return self._devices[device]

    def state_dict(self) -> dict[str, Any]:
        """The generators' states (plain Python values and byte tensors), to resume exactly."""
        return {
            "cpu": self._cpu.bit_generator.state,
            "devices": {str(d): g.get_state() for d, g in self._devices.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore states saved by :meth:`state_dict`."""
        if "cpu" in state:
            self._cpu.bit_generator.state = state["cpu"]
        for device, generator_state in state.get("devices", {}).items():
            device = torch.device(device)
            self._devices.setdefault(device, make_generator(self.seed, device)).set_state(generator_state)
