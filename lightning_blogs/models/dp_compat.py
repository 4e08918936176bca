"""Make a network trainable with per-sample gradients (DP-SGD).

Two things break per-sample gradients in common vision networks:

- BatchNorm normalises each example with statistics of the whole batch, so one example's output
  (and gradient) depends on the others, and its running statistics are an unprotected release of
  the data. GroupNorm normalises each example on its own.
- Opacus computes per-sample gradients in backward hooks, and autograd refuses an in-place change
  to the output of a hooked layer: ``ReLU(inplace=True)`` after a convolution, or torchvision
  ResNet's ``out += identity`` after the block's last norm layer.
"""

from __future__ import annotations

import copy
import math

from torch import Tensor, nn

from lightning_blogs._opacus import require_opacus

__all__ = ["DPGroupNorm", "make_dp_compatible"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
MAX_GROUPS = 32
"""GroupNorm's usual group count (Wu and He 2018); fewer when the channel count is not a multiple."""


class DPGroupNorm(nn.Module):
    """``nn.GroupNorm`` whose output is a fresh tensor, so the caller may change it in place.

    Opacus hooks the inner ``GroupNorm`` (its parameters are ``group_norm.weight`` and
    ``group_norm.bias``); the copy made here is what the surrounding code receives, so code like
    torchvision ResNet's ``out = self.bn2(out); out += identity`` keeps working. The copy costs one
    activation-sized tensor per norm layer.

    Args:
        num_groups: groups, dividing ``num_channels``.
        num_channels: channels ``C`` of the ``(N, C, *)`` input.
        eps: added to the variance, > 0.
        affine: whether to learn a per-channel scale and shift.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(num_groups, num_channels, eps=eps, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        """The group-normalised ``x``, in new memory."""
        return self.group_norm(x).clone()


def _group_norm_for(batch_norm: nn.modules.batchnorm._BatchNorm) -> DPGroupNorm:
    channels = batch_norm.num_features
    groups = math.gcd(MAX_GROUPS, channels)  # the largest group count <= 32 that divides the channels
    norm = DPGroupNorm(groups, channels, eps=batch_norm.eps, affine=batch_norm.affine)
    if batch_norm.affine:
        norm.to(device=batch_norm.weight.device, dtype=batch_norm.weight.dtype)
    return norm


def _describe_norm(module: nn.Module) -> str:
    if isinstance(module, DPGroupNorm):
        return f"GroupNorm({module.group_norm.num_groups}, {module.group_norm.num_channels})"
    return f"{type(module).__name__}({module.num_features})"


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with per-example layers only, and a list of what was changed.

    Every BatchNorm (1d/2d/3d, SyncBatchNorm) becomes ``GroupNorm(gcd(32, C), C)`` with the same
    ``C = num_features``, ``eps`` and ``affine`` (freshly initialised: BatchNorm's affine
    parameters belong to its batch statistics), as a :class:`DPGroupNorm`, whose output may be
    changed in place by the surrounding code; every module with ``inplace=True`` (ReLU and
    friends, Dropout) is set to ``inplace=False``. The result is then checked with Opacus's
    ``ModuleValidator``. ``model`` itself is not modified (build the optimizer on the copy).

    In-place operations written in a ``forward`` on the output of a convolution or linear layer
    cannot be fixed from outside: autograd then raises "Output 0 of BackwardHookFunction is a
    view and is being modified inplace" at the first training step.

    Example::

        net, changes = make_dp_compatible(resnet18(in_channels=1, image_size=28, num_classes=10))
        # changes[0] == "bn1: BatchNorm2d(64) -> GroupNorm(32, 64)"

    Args:
        model: any network.

    Returns:
        ``(compatible_copy, changes)``; ``changes`` holds one line per changed module,
        ``"name: before -> after"`` (``"<root>"`` for the model itself), empty if nothing changed.

    Raises:
        ValueError: Opacus still rejects the result (e.g. an ``nn.LSTM``, which needs Opacus's
            ``DPLSTM``); the message lists its errors.
        ImportError: Opacus is not installed (``pip install 'lightning-blogs[dpsgd]'``).
    """
    opacus = require_opacus("make_dp_compatible")
    model = copy.deepcopy(model)
    changes: list[str] = []
    if isinstance(model, _BATCH_NORMS):
        replacement = _group_norm_for(model)
        changes.append(f"<root>: {_describe_norm(model)} -> {_describe_norm(replacement)}")
        model = replacement
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _BATCH_NORMS):
                replacement = _group_norm_for(child)
                setattr(module, child_name, replacement)
                path = f"{name}.{child_name}" if name else child_name
                changes.append(f"{path}: {_describe_norm(child)} -> {_describe_norm(replacement)}")
        if getattr(module, "inplace", False) is True:
            before = repr(module)
            module.inplace = False
            changes.append(f"{name or '<root>'}: {before} -> {module!r}")
    errors = opacus.validators.ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model still has layers that DP-SGD cannot train after the replacements: {errors}")
    return model, changes
