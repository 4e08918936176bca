"""The DP-BloGS step: per-tensor clipping, then block shuffling, for a fixed set of parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_blogs.mechanism.clipping import clip_per_tensor_
from lightning_blogs.mechanism.randomness import RandomSource
from lightning_blogs.mechanism.shuffle import block_shuffle_

__all__ = ["BlockShuffleMechanism", "sensitivity"]


def sensitivity(clip_norm: float, num_tensors: int) -> float:
    """L2 sensitivity of the per-tensor-clipped aggregate gradient: ``2 sqrt(sum_i C_i^2)``.

    One example can move the clipped aggregate anywhere within the balls of radius ``C_i``, so the
    aggregates of neighbouring data sets differ by at most ``2 C_i`` per tensor (PRIVACY.md s. 2).
    """
    return 2.0 * clip_norm * num_tensors**0.5


class BlockShuffleMechanism:
    """Apply DP-BloGS to the gradients of a fixed list of parameters.

    Each call to :meth:`privatize_` clips every gradient to ``clip_norm`` (one clip per tensor,
    on the aggregated gradient), adds Gaussian noise of standard deviation ``noise_std`` to every
    coordinate when ``noise_std > 0`` (the formal mode), and then shuffles its blocks, in place,
    on the gradient's own device, with no host-device synchronisation. Permutations come from a
    :class:`RandomSource` seeded with ``seed``: processes that share the seed and the
    parameter order draw identical permutations (what keeps DDP replicas equal).

    This class knows nothing of Lightning or of privacy figures; the callback and the plain
    PyTorch engine are thin adapters over it.

    Args:
        params: parameters whose ``.grad`` is privatised, in a fixed order.
        block_sizes: block size for each parameter, same order, each ``>= 1``.
        clip_norm: per-tensor L2 bound C > 0.
        seed: seed of the permutation and noise generators, in ``[0, 2**64)``. Draw it with
            :func:`lightning_blogs.mechanism.entropy_seed` unless a reproducible run is wanted.
        noise_std: standard deviation of the Gaussian noise per coordinate, >= 0 (0: none, the
            published mechanism). For a proven bound use ``noise_multiplier * sensitivity(...)``.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        block_sizes: Sequence[int],
        clip_norm: float,
        seed: int,
        noise_std: float = 0.0,
    ) -> None:
        if len(params) != len(block_sizes):
            raise ValueError(
                f"block_sizes must give one size per parameter: {len(block_sizes)} sizes for {len(params)} parameters"
            )
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.params = list(params)
        self.block_sizes = [int(b) for b in block_sizes]
        self.clip_norm = float(clip_norm)
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = float(noise_std)
        self.source = RandomSource(seed)

    @property
    def seed(self) -> int:
        """The permutation seed."""
        return self.source.seed

    @torch.no_grad()
    def privatize_(self) -> None:
        """Clip and block-shuffle every parameter's ``.grad`` in place (parameters without one are
        skipped: they will not be updated by this step)."""
        pairs = [(p.grad, b) for p, b in zip(self.params, self.block_sizes, strict=True) if p.grad is not None]
        if any(g.is_sparse for g, _ in pairs):
            raise RuntimeError("DP-BloGS does not support sparse gradients")
        clip_per_tensor_([g for g, _ in pairs], self.clip_norm)
        for grad, block_size in pairs:
            if self.noise_std > 0:
                draw = self.source.standard_normal(grad.numel(), grad.dtype, grad.device)
                grad.add_(draw.view_as(grad), alpha=self.noise_std)
            block_shuffle_(grad, block_size, self.source)

    def generator_state_dict(self) -> dict[str, Any]:
        """State of the permutation source (to resume a seeded run exactly)."""
        return self.source.state_dict()

    def load_generator_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`generator_state_dict`."""
        self.source.load_state_dict(dict(state))
