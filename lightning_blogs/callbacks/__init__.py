"""Lightning adapters: callbacks that privatise gradients inside ``lightning.Trainer``."""

from lightning_blogs.callbacks.dp_blogs import DPBloGS, PaperFigureWarning
from lightning_blogs.callbacks.dp_sgd import DPSGD

__all__ = ["DPBloGS", "DPSGD", "PaperFigureWarning"]
