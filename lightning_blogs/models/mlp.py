"""Multi-layer perceptron over flattened images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_blogs._validation import check_positive_int, check_positive_int_sequence

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected classifier: flatten -> [Linear -> ReLU] per hidden layer -> Linear.

    Input: float tensor ``(batch, in_channels, image_size, image_size)``; output: logits
    ``(batch, num_classes)``. There are no normalisation layers, so per-example gradients are
    well defined.

    Args:
        in_channels: image channels, >= 1 (1 for greyscale, 3 for RGB).
        image_size: image height = width in pixels, >= 1.
        num_classes: number of classes (output logits), >= 1.
        hidden_sizes: width of each hidden layer, each >= 1; empty gives a linear
            (multinomial logistic regression) model.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (128,),
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.image_size = check_positive_int("image_size", image_size)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.hidden_sizes = check_positive_int_sequence("hidden_sizes", hidden_sizes, allow_empty=True)

        layers: list[nn.Module] = [nn.Flatten()]
        width = self.in_channels * self.image_size * self.image_size
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, self.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``(batch, C, S, S)`` to logits ``(batch, num_classes)``."""
        return self.layers(x)
