"""Proven privacy in the Lightning adapters: the accountant, the step budget, and what is logged.

Shared by :class:`~lightning_blogs.DPSGD` and the formal mode of :class:`~lightning_blogs.DPBloGS`:
both run one subsampled Gaussian mechanism per optimizer step, so both keep a
:class:`~lightning_blogs.accounting.GaussianAccountant`, stop before the step that would take the
proven epsilon past the target, and log ``privacy/epsilon`` only when the training batches are
Poisson-sampled (the accountant's assumption).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_blogs.accounting.gaussian import GaussianAccountant, calibrate_noise_multiplier

__all__ = [
    "DELTA_KEY",
    "PROVEN_EPSILON_KEY",
    "UNPROVEN_EPSILON_KEY",
    "FormalAccounting",
    "NotPoissonSampledWarning",
    "enforce_budget",
]

PROVEN_EPSILON_KEY = "privacy/epsilon"
UNPROVEN_EPSILON_KEY = "privacy/epsilon_if_poisson_sampled"
DELTA_KEY = "privacy/delta"
BUDGET_ACTIONS = ("stop", "warn", "raise")


class NotPoissonSampledWarning(UserWarning):
    """The training loader is not Poisson-sampled, so the accountant's epsilon is not a proven bound."""


NOT_POISSON_MESSAGE = (
    "the training DataLoader is NOT Poisson-sampled, so the subsampled-Gaussian accountant's epsilon is NOT a "
    "proven bound for this run (shuffled fixed-size batches do not match its assumptions). It is logged as '"
    + UNPROVEN_EPSILON_KEY
    + "', not as '"
    + PROVEN_EPSILON_KEY
    + "'. Wrap the data module in lightning_blogs.sampling.PoissonDataModule for a proven bound."
)


class FormalAccounting:
    """Accountant, sigma, sampling rate and step budget of one formally private run.

    Args:
        accountant: the subsampled-Gaussian accountant (its history is the run's privacy record).
        noise_multiplier: sigma of every step.
        sample_rate: q of every step.
        poisson: whether the training loader is Poisson-sampled (only then is epsilon proven).
        delta: the delta of the reported epsilon.
        allowed_steps: total optimizer steps within the target; None without a target (no budget).
    """

    def __init__(
        self,
        accountant: GaussianAccountant,
        noise_multiplier: float,
        sample_rate: float,
        poisson: bool,
        delta: float,
        allowed_steps: int | None,
    ) -> None:
        self.accountant = accountant
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.poisson = poisson
        self.delta = delta
        self.allowed_steps = allowed_steps

    @classmethod
    def start(
        cls,
        *,
        accountant: str,
        target_epsilon: float | None,
        delta: float,
        noise_multiplier: float | None,
        sample_rate: float,
        poisson: bool,
        steps: int,
        owner: str,
    ) -> FormalAccounting:
        """Calibrate sigma when it is not given, and count the steps the target allows (of ``steps``).

        Warns loudly when ``poisson`` is False. Raises ValueError when not even one step fits.
        """
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
        gaussian = GaussianAccountant(accountant)
        allowed = (
            None
            if target_epsilon is None
            else gaussian.steps_within_budget(noise_multiplier, sample_rate, target_epsilon, delta, steps)
        )
        if allowed == 0:
            raise ValueError(
                f"{owner}: with noise_multiplier={noise_multiplier:g} and sample rate {sample_rate:g}, a single "
                f"step already exceeds target_epsilon={target_epsilon:g}; raise noise_multiplier or target_epsilon"
            )
        if not poisson:
            rank_zero_warn(f"{owner}: {NOT_POISSON_MESSAGE}", category=NotPoissonSampledWarning)
        return cls(gaussian, noise_multiplier, sample_rate, poisson, delta, allowed)

    def continue_with(
        self,
        *,
        noise_multiplier: float | None,
        sample_rate: float,
        poisson: bool,
        target_epsilon: float | None,
        steps: int,
        owner: str,
    ) -> None:
        """Resume with the current run's settings: the saved history stays, new steps use the given
        sigma (the saved one when None) and sampling rate, and the budget is recounted from here.

        Args:
            steps: optimizer steps this run may take in total (planned), of which
                ``self.accountant.steps`` are already done.
        """
        if noise_multiplier is not None:
            self.noise_multiplier = noise_multiplier
        if poisson != self.poisson and not poisson:
            rank_zero_warn(f"{owner}: {NOT_POISSON_MESSAGE}", category=NotPoissonSampledWarning)
        # Steps taken without Poisson sampling stay unproven, whatever the loader is now.
        self.poisson = self.poisson and poisson
        self.sample_rate = sample_rate
        done = self.accountant.steps
        self.allowed_steps = (
            None
            if target_epsilon is None
            else done
            + self.accountant.steps_within_budget(
                self.noise_multiplier, sample_rate, target_epsilon, self.delta, max(steps - done, 1)
            )
        )

    @property
    def epsilon(self) -> float:
        """The accountant's epsilon (nats) at :attr:`delta` after the recorded steps."""
        return self.accountant.get_epsilon(self.delta)

    def record_step(self, pl_module: pl.LightningModule) -> None:
        """Compose one step and log epsilon (as a proven bound only under Poisson sampling) and delta."""
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        key = PROVEN_EPSILON_KEY if self.poisson else UNPROVEN_EPSILON_KEY
        pl_module.log(key, self.epsilon, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log(DELTA_KEY, self.delta, on_step=True, on_epoch=False)

    def hyperparameters(self) -> dict[str, Any]:
        """What to log once at the start of training."""
        return {
            "privacy/noise_multiplier": self.noise_multiplier,
            "privacy/sample_rate": self.sample_rate,
            "privacy/poisson_sampled": self.poisson,
            "privacy/accountant": self.accountant.accountant,
            "privacy/allowed_steps": self.allowed_steps,
            "privacy/delta": self.delta,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {
            "accountant": self.accountant.accountant,
            "history": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "poisson": self.poisson,
            "delta": self.delta,
            "allowed_steps": self.allowed_steps,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FormalAccounting:
        """Rebuild from :meth:`state_dict`: the epsilon continues where the saved run stopped."""
        accountant = GaussianAccountant(state["accountant"])
        accountant.load_state_dict(state["history"])
        return cls(
            accountant,
            state["noise_multiplier"],
            state["sample_rate"],
            state["poisson"],
            state["delta"],
            state["allowed_steps"],
        )


def enforce_budget(owner: str, action: str, steps: int, allowed_steps: int | None, already_warned: bool) -> bool:
    """Before step ``steps + 1``: act when it goes past ``allowed_steps``. Returns whether a warning was given.

    ``"warn"`` warns once and goes on; ``"raise"`` raises; ``"stop"`` raises too, because training
    should already have stopped (see :func:`stop_when_spent`) unless ``min_steps``/``min_epochs`` kept it going.
    """
    if allowed_steps is None or steps < allowed_steps:
        return already_warned
    message = f"{owner}: the budget allows {allowed_steps} optimizer steps; step {steps + 1} goes past it."
    if action == "warn":
        if not already_warned:
            rank_zero_warn(message + " Continuing (on_budget_exceeded='warn').")
        return True
    if action == "stop":
        message += (
            " Training should have stopped (on_budget_exceeded='stop'); Trainer min_steps or min_epochs kept it going."
        )
    raise RuntimeError(message)


def stop_when_spent(owner: str, trainer: pl.Trainer, action: str, steps: int, allowed_steps: int | None) -> None:
    """With ``action == "stop"``, stop training once ``allowed_steps`` are done: before the step that
    would exceed the budget."""
    if action == "stop" and allowed_steps is not None and steps >= allowed_steps and not trainer.should_stop:
        rank_zero_info(f"{owner}: the {allowed_steps} optimizer steps within the budget are done; stopping.")
        trainer.should_stop = True
