"""Block-wise shuffling of a tensor's entries (the DP-BloGS permutation step)."""

from __future__ import annotations

import torch

__all__ = ["block_shuffle_", "num_blocks"]


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` consecutive entries (the last may be partial)."""
    return -(-numel // block_size)


def block_shuffle_(tensor: torch.Tensor, block_size: int, generator: torch.Generator) -> None:
    """Cut ``tensor`` (flattened) into blocks and permute the blocks uniformly at random, in place.

    Blocks hold ``block_size`` consecutive entries of the flattened tensor; when ``block_size``
    does not divide ``tensor.numel()`` the last block is shorter and is permuted like any other
    block, so the output is always a permutation of the input entries (nothing is padded or
    dropped). The permutation is drawn by ``torch.randperm`` on the tensor's own device with
    ``generator`` (which must live on that device); no value is copied to the host.

    Args:
        tensor: contiguous tensor, modified in place.
        block_size: entries per block, an integer in ``[1, tensor.numel()]``; values above
            ``numel`` are treated as ``numel`` (a single block: nothing moves).
        generator: ``torch.Generator`` on ``tensor.device``.
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
    perm = torch.randperm(n_blocks, generator=generator, device=tensor.device)
    remainder = numel % block_size
    if remainder == 0:
        blocks = flat.view(n_blocks, block_size)
        blocks.copy_(blocks[perm])
        return
    # Ragged case: block k starts at k * block_size in the input; output block j is input block
    # perm[j]. Entry index = output position + (source start - output start) of its block.
    lengths = torch.full((n_blocks,), block_size, dtype=torch.long, device=tensor.device)
    lengths[-1] = remainder
    out_lengths = lengths[perm]
    out_starts = torch.cumsum(out_lengths, 0) - out_lengths
    shift = perm * block_size - out_starts
    index = torch.arange(numel, device=tensor.device)
    index += torch.repeat_interleave(shift, out_lengths, output_size=numel)
    flat.copy_(flat[index])
