"""DP-BloGS for plain PyTorch training loops (the call shape of the original ``forgetnet`` package)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch

from lightning_blogs._validation import check_choice, check_positive_float, check_positive_int
from lightning_blogs.engine.session import BloGSSession
from lightning_blogs.mechanism import entropy_seed

__all__ = ["BloGSPrivacyEngine"]

_BUDGET_ACTIONS = ("raise", "warn")


class BloGSPrivacyEngine:
    """Wrap an optimizer so that every ``step()`` clips and block-shuffles the gradients first.

    Same core as :class:`lightning_blogs.DPBloGS`; use it where there is no Lightning Trainer::

        engine = BloGSPrivacyEngine(optimizer=opt, model=model, target_epsilon=4.0, delta=1e-5,
                                    clip_value=0.01, steps=len(loader) * epochs, batch_size=64)
        for x, y in loader:
            engine.zero_grad()
            loss_fn(model(x), y).backward()
            epsilon, delta = engine.step()

    The returned figure is the one published with DP-BloGS, **not a formal DP guarantee** (see
    ``docs/privacy.md``).

    Args:
        optimizer: the optimizer over ``model``'s parameters.
        model: the module whose trainable parameters are protected.
        target_epsilon: the paper's figure not to exceed after ``steps`` steps, > 0.
        delta: the figure's delta, in (0, 1).
        clip_value: per-tensor L2 clipping bound C > 0.
        steps: number of optimizer steps to plan for, >= 1.
        batch_size: kept for the original call shape; the paper's figure does not depend on it.
        block_size: planner override (one size, or a mapping from parameter-name glob to size).
        seed: permutation seed; None (default) draws one from OS entropy.
        on_budget_exceeded: ``"raise"`` (default) refuses a step beyond ``steps``; ``"warn"``
            warns once and goes on (the figure then exceeds the target).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        target_epsilon: float,
        delta: float,
        clip_value: float,
        steps: int,
        batch_size: int,
        block_size: int | Mapping[str, int] | None = None,
        seed: int | None = None,
        on_budget_exceeded: Literal["raise", "warn"] = "raise",
    ) -> None:
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.on_budget_exceeded = check_choice("on_budget_exceeded", on_budget_exceeded, _BUDGET_ACTIONS)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in named if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"optimizer does not hold these trainable parameters of model: {missing[:5]}")
        self.optimizer = optimizer
        self.model = model
        self.session = BloGSSession.plan_for(
            named,
            clip_norm=clip_value,
            delta=delta,
            steps=steps,
            target_epsilon=check_positive_float("target_epsilon", target_epsilon),
            block_size=block_size,
            seed=entropy_seed() if seed is None else seed,
            reproducible=seed is not None,
        )
        self._warned_over_budget = False

    @property
    def block_sizes(self) -> dict[str, int]:
        """Planned block size of every trainable parameter, by name."""
        return self.session.plan.as_dict()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (``optimizer.zero_grad``)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> tuple[float, float]:
        """Clip and block-shuffle the gradients, step the optimizer, return ``(epsilon, delta)``."""
        if self.session.over_budget:
            message = (
                f"BloGSPrivacyEngine: {self.session.plan.steps} steps were planned; step "
                f"{self.session.steps + 1} takes the paper figure past target_epsilon."
            )
            if self.on_budget_exceeded == "raise":
                raise RuntimeError(message + " Plan for more steps (steps=...) or stop training.")
            if not self._warned_over_budget:
                warnings.warn(message, stacklevel=2)
                self._warned_over_budget = True
        self.session.step_()
        self.optimizer.step()
        return self.get_privacy_spent()

    def get_privacy_spent(self) -> tuple[float, float]:
        """``(epsilon, delta)`` of the paper's figure after the steps taken so far."""
        return self.session.epsilon, self.session.plan.delta

    def state_dict(self) -> dict[str, Any]:
        """The session (plan and step count) and the optimizer's state."""
        return {"session": self.session.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the step count and the figure continue."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.session = BloGSSession.from_state_dict(named, state_dict["session"], entropy_seed())
        self.optimizer.load_state_dict(state_dict["optimizer"])
