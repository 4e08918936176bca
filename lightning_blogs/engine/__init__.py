"""Adapters for plain PyTorch loops, and the run state they share with the Lightning callbacks."""

from lightning_blogs.engine.privacy_engine import BloGSPrivacyEngine
from lightning_blogs.engine.session import BloGSSession

__all__ = ["BloGSPrivacyEngine", "BloGSSession"]
