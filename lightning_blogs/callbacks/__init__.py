"""Lightning adapters: callbacks that privatise gradients inside ``lightning.Trainer``."""

from lightning_blogs.callbacks.dp_blogs import DPBloGS, PaperFigureWarning

__all__ = ["DPBloGS", "PaperFigureWarning"]
