"""Image classification networks and the LightningModule that trains them.

All network constructors take the keyword arguments ``in_channels``, ``image_size`` and
``num_classes`` (which a Hydra config can copy from the data module's ``num_channels``,
``image_size`` and ``num_classes``).
"""

from lightning_blogs.models.classifier import ImageClassifier, default_optimizer
from lightning_blogs.models.cnn import SmallCNN
from lightning_blogs.models.dp_compat import make_dp_compatible
from lightning_blogs.models.mlp import MLP
from lightning_blogs.models.resnet import resnet18

__all__ = ["MLP", "ImageClassifier", "SmallCNN", "default_optimizer", "make_dp_compatible", "resnet18"]
