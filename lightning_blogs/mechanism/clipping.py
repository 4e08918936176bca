"""Batch layer clipping: one clip per parameter tensor, on the aggregated gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["clip_per_tensor_"]


def clip_per_tensor_(tensors: Sequence[torch.Tensor], clip_norm: float) -> None:
    """Scale every tensor in place so that its L2 norm is at most ``clip_norm``.

    ``g <- g * min(1, clip_norm / ||g||_2)``, each tensor on its own (not by a global norm),
    computed on the tensors' own devices with no host-device synchronisation: the factor stays a
    tensor and nothing branches on its value.

    Args:
        tensors: gradients to clip, modified in place.
        clip_norm: the bound C > 0 on each tensor's L2 norm.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    for tensor in tensors:
        # The norm is taken in float32 at least, and the bound is shrunk by a few units of the
        # tensor's rounding error so that the stored result, after rounding, is still <= C.
        norm = torch.linalg.vector_norm(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32))
        margin = 1.0 + max(2.0 * torch.finfo(tensor.dtype).eps, 1e-6)
        factor = (clip_norm / (norm * margin).clamp_min(torch.finfo(norm.dtype).tiny)).clamp_max(1.0)
        tensor.copy_(tensor * factor)
