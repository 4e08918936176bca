"""DP-SGD as plain torch functions: per-sample clipping, accumulation, Gaussian noise.

One optimizer step of DP-SGD (Abadi et al. 2016; as Opacus implements it) is

    g = (sum_i clip(g_i) + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_batch_size,
    clip(g_i) = g_i * min(1, clip_norm / (||g_i||_2 + 1e-6)),

where ``g_i`` is example ``i``'s gradient over *all* trainable parameters jointly (flat clipping)
and ``expected_batch_size`` is a public number (``sample_rate * len(dataset)`` under Poisson
sampling), never the realised batch size, which would leak how many examples were drawn. An empty
batch contributes nothing to the sum and still gets its noise.

The per-sample gradients come from elsewhere (Opacus's grad-sample hooks, in the callback); the
functions here only see tensors. Nothing here imports Lightning.

Randomness. The noise must not be predictable: :class:`~lightning_blogs.mechanism.RandomSource`
draws it from generators seeded with 64 bits (from :func:`~lightning_blogs.mechanism.entropy_seed`
unless the user gives a seed).
torch's CPU generator keeps only 32 bits of its seed, so CPU noise comes from NumPy's PCG64 (keyed
by the whole seed through ``SeedSequence``) and accelerator noise from a Philox ``torch.Generator``
on the device (all 64 bits), drawn there without a host copy. Processes that share the seed and
draw in the same order get identical noise, which keeps DDP replicas identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_blogs.mechanism.randomness import RandomSource

__all__ = [
    "add_noise_and_scale_",
    "clip_and_accumulate_per_sample_",
    "per_sample_norms",
]

CLIP_EPSILON = 1e-6
"""Added to the per-sample norm in the clip factor (as Opacus), so a zero gradient divides safely."""


def per_sample_norms(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every example's gradient over all the given tensors jointly.

    Args:
        grad_samples: per-sample gradients, one tensor per parameter, each of shape
            ``(n, *param.shape)`` with the same number of examples ``n`` (0 allowed).

    Returns:
        A tensor of shape ``(n,)``, float32 at least, on the tensors' device.
    """
    sizes = {g.shape[0] for g in grad_samples}
    if len(sizes) != 1:
        raise ValueError(f"grad_samples must all have the same number of examples (dim 0), got {sorted(sizes)}")
    squares = [
        # reshape(n, -1) cannot infer the -1 for an empty batch; a 0-d parameter gives (n, 1)
        torch.linalg.vector_norm(
            g.reshape(g.shape[0], math.prod(g.shape[1:])), dim=1, dtype=torch.promote_types(g.dtype, torch.float32)
        ).square()
        for g in grad_samples
    ]
    return torch.stack(squares).sum(dim=0).sqrt()


@torch.no_grad()
def clip_and_accumulate_per_sample_(
    grad_samples: Sequence[torch.Tensor],
    accumulators: Sequence[torch.Tensor],
    clip_norm: float,
    unscale: float | torch.Tensor = 1.0,
) -> None:
    """Clip every example's gradient to ``clip_norm`` (jointly over all tensors) and add the sum.

    With ``g_i = unscale * grad_samples[:][i]`` (the true per-sample gradient) every accumulator
    gets ``sum_i g_i * min(1, clip_norm / (||g_i||_2 + 1e-6))`` added in place, in the
    accumulator's dtype. ``unscale`` folds in whatever the stored per-sample gradients are off by
    (a loss scale, a loss divided by the number of accumulated micro-batches); a tensor is used as
    is, on the device, so nothing synchronises host and device. Non-finite per-sample gradients
    (fp16 overflow) make the accumulators non-finite, which the caller can detect.

    Args:
        grad_samples: per-sample gradients, shapes ``(n, *param.shape)``, same ``n`` (0 allowed:
            nothing is added).
        accumulators: running sums, one per grad sample, shapes ``param.shape``, modified in place.
        clip_norm: the bound C > 0 on each example's joint L2 norm.
        unscale: factor from stored to true per-sample gradients, > 0 (float or 0-d tensor).
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if len(grad_samples) != len(accumulators):
        raise ValueError(
            f"accumulators must match grad_samples one to one: {len(accumulators)} for {len(grad_samples)}"
        )
    if not grad_samples:
        return
    norms = per_sample_norms(grad_samples) * unscale
    factors = (clip_norm / (norms + CLIP_EPSILON)).clamp_max(1.0) * unscale
    for grad_sample, accumulator in zip(grad_samples, accumulators, strict=True):
        # One example-weighted sum per tensor, in the accumulator's (float32 or wider) dtype.
        accumulator.add_(torch.tensordot(factors.to(accumulator.dtype), grad_sample.to(accumulator.dtype), dims=1))


@torch.no_grad()
def add_noise_and_scale_(
    params: Sequence[torch.Tensor],
    accumulators: Sequence[torch.Tensor],
    noise_multiplier: float,
    clip_norm: float,
    expected_batch_size: float,
    noise: RandomSource,
) -> None:
    """Write ``p.grad = (sum + N(0, (noise_multiplier * clip_norm)^2)) / expected_batch_size``.

    The noise is added to the accumulators in place (one draw per coordinate, in parameter order),
    then every parameter's ``.grad`` is set to its accumulator divided by ``expected_batch_size``,
    in the parameter's dtype. Call it exactly once per optimizer step, after summing the clipped
    per-sample gradients of every micro-batch and (under data parallelism) of every rank.

    Args:
        params: the parameters whose ``.grad`` is written.
        accumulators: the sums of clipped per-sample gradients, one per parameter, same shapes.
        noise_multiplier: sigma >= 0; the noise's standard deviation is ``sigma * clip_norm``.
            0 adds nothing (not private; for tests and baselines).
        clip_norm: the per-sample bound C > 0 the sums were clipped to.
        expected_batch_size: the public normaliser, > 0: expected examples per optimizer step
            over all micro-batches and ranks.
        noise: the source of the draws.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if len(params) != len(accumulators):
        raise ValueError(f"accumulators must match params one to one: {len(accumulators)} for {len(params)}")
    std = noise_multiplier * clip_norm
    for param, accumulator in zip(params, accumulators, strict=True):
        if std > 0:
            draw = noise.standard_normal(accumulator.numel(), accumulator.dtype, accumulator.device)
            accumulator.add_(draw.view_as(accumulator), alpha=std)
        grad = (accumulator / expected_batch_size).to(param.dtype)
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.copy_(grad)
