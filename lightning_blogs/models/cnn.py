"""A small convolutional network that works from 8x8 up to 32x32 (and larger) inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_blogs._validation import check_positive_int, check_positive_int_sequence

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Stages of conv3x3 -> ReLU -> conv3x3 -> ReLU -> 2x2 max-pool, then a linear head.

    Each entry of ``channels`` is one stage with that many output channels; its two 3x3
    convolutions are padded ("same" size). A stage halves the spatial size with a 2x2 max-pool
    while the feature map is at least 2 pixels wide (so tiny inputs never shrink to zero);
    an adaptive average pool then reduces whatever is left to ``pool_size x pool_size``
    before the final linear layer, so the same architecture runs on 8x8, 28x28 and 32x32
    images. There are no normalisation layers, so per-example gradients are well defined.

    Input: float tensor ``(batch, in_channels, image_size, image_size)``; output: logits
    ``(batch, num_classes)``.

    Args:
        in_channels: image channels, >= 1 (1 for greyscale, 3 for RGB).
        image_size: image height = width in pixels, >= 1.
        num_classes: number of classes (output logits), >= 1.
        channels: output channels of each stage, each >= 1 (at least one stage).
        pool_size: side of the adaptive average pool's output grid, >= 1 (1 = global
            average pooling).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        pool_size: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.image_size = check_positive_int("image_size", image_size)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.channels = check_positive_int_sequence("channels", channels)
        self.pool_size = check_positive_int("pool_size", pool_size)

        layers: list[nn.Module] = []
        previous, size = self.in_channels, self.image_size
        for width in self.channels:
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, kernel_size=3, padding=1),
                nn.ReLU(),
            ]
            if size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2))
                size //= 2
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(self.pool_size)
        self.head = nn.Linear(previous * self.pool_size * self.pool_size, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(batch, C, S, S)`` to logits ``(batch, num_classes)``."""
        return self.head(self.pool(self.features(x)).flatten(1))
