"""Block-wise shuffling of a tensor's entries (the DP-BloGS permutation step)."""

from __future__ import annotations

import torch

from lightning_blogs.mechanism.randomness import RandomSource

__all__ = ["block_shuffle_", "num_blocks"]


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` consecutive entries (the last may be partial)."""
    return -(-numel // block_size)


def block_shuffle_(tensor: torch.Tensor, block_size: int, source: RandomSource) -> None:
    """Cut ``tensor`` (flattened) into blocks and permute the blocks uniformly at random, in place.

    Blocks hold ``block_size`` consecutive entries of the flattened tensor; when ``block_size``
    does not divide ``tensor.numel()`` the last block is shorter and is permuted like any other
    block, so the output is always a permutation of the input entries (nothing is padded or
    dropped). The permutation is drawn from ``source`` directly on the tensor's device; no value
    is copied between host and device.

    Args:
        tensor: contiguous tensor, modified in place.
        block_size: entries per block, an integer in ``[1, tensor.numel()]``; values above
            ``numel`` are treated as ``numel`` (a single block: nothing moves).
        source: where the permutation comes from (seeded from OS entropy for a private run).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    if not tensor.is_contiguous():
        raise ValueError("block_shuffle_ needs a contiguous tensor (gradients are contiguous)")
    numel = tensor.numel()
    n_blocks = num_blocks(numel, block_size)
    if n_blocks <= 1:
        return
    flat = tensor.view(-1)
    perm = source.randperm(n_blocks, tensor.device)
    remainder = numel % block_size
    if remainder == 0:
        blocks = flat.view(n_blocks, block_size)
        blocks.copy_(blocks[perm])
        return
    # Ragged case: the short block (input block n_blocks - 1) lands at output block r. Output
    # position j is position j' = j + (B - remainder) [j >= r B + remainder] of the padded layout,
    # whose block j' // B is input block perm[j' // B]. Elementwise only: no sizes from the device.
    padding = block_size - remainder
    short_at = torch.argmax((perm == n_blocks - 1).to(torch.uint8))
    position = torch.arange(numel, device=tensor.device)
    position += (position >= short_at * block_size + remainder) * padding
    source = perm[position // block_size] * block_size + position % block_size
    flat.copy_(flat[source])
