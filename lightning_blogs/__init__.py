"""lightning-blogs: private training for PyTorch Lightning.

- :class:`DPBloGS`: DP-BloGS (block-wise gradient shuffle) as a Lightning callback.
- :class:`BloGSPrivacyEngine`: the same mechanism for plain PyTorch loops.

The figure DP-BloGS reports is the published formula, not a formal differential-privacy
guarantee; see ``docs/privacy.md``.
"""

from lightning_blogs.callbacks import DPSGD, DPBloGS, PaperFigureWarning
from lightning_blogs.engine import BloGSPrivacyEngine

__all__ = ["BloGSPrivacyEngine", "DPBloGS", "DPSGD", "PaperFigureWarning", "__version__"]

__version__ = "0.1.0"
