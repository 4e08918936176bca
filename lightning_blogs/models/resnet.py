"""torchvision's ResNet-18 adapted to small (8x8 to 32x32) images."""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet
from torchvision.models import resnet18 as tv_resnet18

from lightning_blogs._validation import check_positive_int

__all__ = ["resnet18"]


def resnet18(in_channels: int, image_size: int, num_classes: int) -> ResNet:
    """ResNet-18 (randomly initialised) with a small-image stem.

    Builds ``torchvision.models.resnet18(weights=None, num_classes=num_classes)`` and replaces
    the 7x7 stride-2 stem convolution with a 3x3 stride-1 (padding 1, no bias) convolution
    taking ``in_channels`` channels, and the stem max-pool with ``nn.Identity()``; this is the
    usual "ResNet-18 with a one-channel stem" for MNIST and the CIFAR variant for RGB. The
    classifier ends in an adaptive average pool, so any ``image_size`` >= 1 works (8x8 inputs
    reach the last stage at 1x1).

    Note that the network keeps torchvision's ``BatchNorm2d`` layers, which mix information
    across the examples of a batch.

    Args:
        in_channels: image channels, >= 1 (1 for greyscale, 3 for RGB).
        image_size: image height = width in pixels, >= 1 (checked only; the network is
            size-agnostic).
        num_classes: number of classes (output logits), >= 1.

    Returns:
        The model: images ``(batch, in_channels, S, S)`` -> logits ``(batch, num_classes)``.
    """
    in_channels = check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    num_classes = check_positive_int("num_classes", num_classes)

    model = tv_resnet18(weights=None, num_classes=num_classes)
    stem = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    model.conv1 = stem
    model.maxpool = nn.Identity()
    return model
