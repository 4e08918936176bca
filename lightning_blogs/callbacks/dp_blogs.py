"""DP-BloGS as a Lightning callback."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_blogs._validation import (
    check_choice,
    check_int,
    check_open_unit_interval,
    check_positive_float,
    check_positive_int,
)
from lightning_blogs.accounting.gaussian import ACCOUNTANTS
from lightning_blogs.callbacks._common import check_trainer_supported, shared_entropy_seed
from lightning_blogs.callbacks.formal import BUDGET_ACTIONS, FormalAccounting, enforce_budget, stop_when_spent
from lightning_blogs.engine.session import BloGSSession
from lightning_blogs.sampling import is_poisson_sampled, poisson_sample_rate

__all__ = ["DPBloGS", "PaperFigureWarning"]

EPSILON_KEY = "privacy/epsilon_blogs_paper"
_GUARANTEES = ("paper", "formal")


class PaperFigureWarning(UserWarning):
    """The logged DP-BloGS figure is the paper's, not a formal differential-privacy guarantee."""


_PAPER_FIGURE_MESSAGE = (
    "DP-BloGS: the logged figure '" + EPSILON_KEY + "' is the formula published with DP-BloGS "
    "(arXiv 2407.21347 v1, since withdrawn). It is NOT a differential-privacy guarantee: the "
    "block shuffle leaves sums and norms of the clipped gradient unchanged, so no (epsilon, delta) "
    "bound holds for this mechanism, whatever the block size. It also depends only on clip_norm, "
    "tensor sizes, block sizes, steps and delta, so a small clip_norm makes it small without "
    "making training more private (especially under Adam). See docs/privacy.md."
)


class DPBloGS(Callback):
    r"""Differentially Private Block-wise Gradient Shuffle (DP-BloGS), as published.

    Once per optimizer step (in ``on_before_optimizer_step``: after gradient accumulation, after
    AMP unscaling and after the DDP all-reduce) every trainable parameter's gradient is clipped to
    ``clip_norm`` and cut into blocks of a per-parameter size, and the blocks are permuted at
    random, in place, on the gradients' own device. Block sizes are planned at fit start from the
    paper's privacy formula so that its figure after the planned number of steps stays within
    ``target_epsilon``.

    The figure is logged every step as ``privacy/epsilon_blogs_paper`` (progress bar and every
    logger). It is the paper's number and **not a formal DP guarantee** (``docs/privacy.md``); it
    is never logged under ``privacy/epsilon``, which this package reserves for proven bounds.

    Example::

        trainer = lightning.Trainer(
            max_epochs=10,
            callbacks=[DPBloGS(target_epsilon=4.0, delta=1e-5, clip_norm=0.01)],
        )

    Args:
        target_epsilon: the paper's figure not to exceed after ``total_steps`` steps, > 0. May be
            None only when ``block_size`` is a single integer (the figure is then reported only).
        delta: the figure's delta, in (0, 1).
        clip_norm: per-tensor L2 clipping bound C > 0. The figure shrinks with C.
        block_size: override of the planner: one block size (entries) for every tensor, or a
            mapping from parameter-name glob to block size; unmatched parameters are planned.
        seed: seed of the permutations, in ``[0, 2**64)``. None (default) draws one from the
            operating system's entropy pool on rank 0 and shares it with every rank. A given seed
            makes runs reproducible, and is logged as such: it is not private against anyone who
            knows it.
        total_steps: number of optimizer steps to plan for; default the Trainer's
            ``estimated_stepping_batches`` (which accounts for ``accumulate_grad_batches``,
            ``max_epochs``/``max_steps``, ``limit_train_batches`` and the number of devices).
        on_budget_exceeded: what happens once ``total_steps`` steps are done and training goes
            on: ``"stop"`` (default) stops training, ``"warn"`` warns once and continues (the
            figure then exceeds the target), ``"raise"`` raises before the extra step.

    Raises:
        ValueError: an argument is out of range (at construction), or the target cannot be met
            (at fit start, before any step; the message states the smallest reachable figure).
    """

    def __init__(
        self,
        target_epsilon: float | None,
        delta: float = 1e-5,
        clip_norm: float = 1.0,
        block_size: int | Mapping[str, int] | None = None,
        seed: int | None = None,
        total_steps: int | None = None,
        on_budget_exceeded: Literal["stop", "warn", "raise"] = "stop",
        noise_multiplier: float | None = None,
        guarantee: Literal["paper", "formal"] | None = None,
        accountant: Literal["rdp", "pld"] = "rdp",
    ) -> None:
        # A noise multiplier means the formal mode; "paper" is the published mechanism.
        self.guarantee = check_choice(
            "guarantee", guarantee or ("formal" if noise_multiplier is not None else "paper"), _GUARANTEES
        )
        if noise_multiplier is not None and self.guarantee == "paper":
            raise ValueError("noise_multiplier needs guarantee='formal' (or None): the paper's mechanism adds no noise")
        self.noise_multiplier = (
            None if noise_multiplier is None else check_positive_float("noise_multiplier", noise_multiplier)
        )
        self.accountant = check_choice("accountant", accountant, ACCOUNTANTS)
        if self.guarantee == "formal" and target_epsilon is None and noise_multiplier is None:
            raise ValueError("guarantee='formal' needs a target_epsilon (to calibrate the noise) or a noise_multiplier")
        if self.guarantee == "paper" and target_epsilon is None and not isinstance(block_size, int):
            raise ValueError("target_epsilon must be a number > 0, or None together with an integer block_size")
        self.target_epsilon = None if target_epsilon is None else check_positive_float("target_epsilon", target_epsilon)
        self.delta = check_open_unit_interval("delta", delta)
        self.clip_norm = check_positive_float("clip_norm", clip_norm)
        if isinstance(block_size, Mapping):
            self.block_size: int | dict[str, int] | None = {
                str(glob): check_positive_int(f"block_size[{glob!r}]", size) for glob, size in block_size.items()
            }
        else:
            self.block_size = None if block_size is None else check_positive_int("block_size", block_size)
        if seed is not None and not 0 <= check_int("seed", seed) < 2**64:
            raise ValueError(f"seed must be None (OS entropy) or an integer in [0, 2**64), got {seed!r}")
        self.seed = seed
        self.total_steps = None if total_steps is None else check_positive_int("total_steps", total_steps)
        self.on_budget_exceeded = check_choice("on_budget_exceeded", on_budget_exceeded, BUDGET_ACTIONS)

        self.session: BloGSSession | None = None
        self.formal: FormalAccounting | None = None
        self._device_steps: torch.Tensor | None = None
        self._figure_coefficients = (0.0, 0.0)
        self._restored: dict[str, Any] | None = None
        self._warned_over_budget = False

    @property
    def steps(self) -> int:
        """Optimizer steps privatised so far (continued across a resume)."""
        return 0 if self.session is None else self.session.steps

    @property
    def block_sizes(self) -> dict[str, int]:
        """Planned block size of every trainable parameter, by name (empty before fit start)."""
        return {} if self.session is None else self.session.plan.as_dict()

    # ----------------------------------------------------------------------------------- checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse configurations the callback cannot handle correctly, before any training."""
        if stage != "fit":
            return
        check_trainer_supported(
            "DPBloGS",
            trainer,
            pl_module,
            sharded_reason="it needs every rank to hold the whole aggregated gradient of each tensor",
            manual_hint="; with manual optimization use lightning_blogs.BloGSPrivacyEngine instead",
        )

    # ------------------------------------------------------------------------------- planning
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Plan block sizes (or restore the plan of a resumed run) and build the mechanism."""
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        # Rank 0 draws the entropy and every rank uses it: identical permutations keep DDP
        # replicas bit-identical. A user seed needs no broadcast.
        seed = self.seed
        if seed is None:
            seed = shared_entropy_seed(trainer)
        # A checkpoint's state, or this callback's own from an earlier fit: either way the run
        # continues its plan and its step count; it never starts again from zero.
        previous = self._restored if self._restored is not None else self.state_dict() or None
        if previous is not None:
            self.session = BloGSSession.from_state_dict(named, previous, seed)
            self._restored = None
            if previous.get("formal"):
                self.formal = FormalAccounting.from_state_dict(previous["formal"])
                steps = self._planned_steps(trainer)  # loads the train loader
                sample_rate, poisson = self._sample_rate(trainer)
                self.formal.continue_with(
                    noise_multiplier=self.noise_multiplier,
                    sample_rate=sample_rate,
                    poisson=poisson,
                    target_epsilon=self.target_epsilon,
                    steps=steps,
                    owner="DPBloGS(guarantee='formal')",
                )
                self.session.set_noise_multiplier(self.formal.noise_multiplier)
        elif self.guarantee == "formal":
            self._start_formal(trainer, named, seed)
        else:
            self.session = BloGSSession.plan_for(
                named,
                clip_norm=self.clip_norm,
                delta=self.delta,
                steps=self._planned_steps(trainer),
                target_epsilon=self.target_epsilon,
                block_size=self.block_size,
                seed=seed,
                reproducible=self.seed is not None,
            )
        if self.formal is None:
            # The paper figure is evaluated on the module's device from a device-side step counter,
            # so that logging it every step neither copies to the device nor reads back from it.
            dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
            self._device_steps = torch.tensor(float(self.session.steps), dtype=dtype, device=pl_module.device)
            self._figure_coefficients = self.session.plan.composition_coefficients()
            rank_zero_warn(_PAPER_FIGURE_MESSAGE, category=PaperFigureWarning)
        self._log_plan(trainer)

    def _start_formal(self, trainer: pl.Trainer, named: list[tuple[str, torch.nn.Parameter]], seed: int) -> None:
        """Formal mode: find the sampling rate, calibrate (or take) sigma, count the allowed steps."""
        steps = self._planned_steps(trainer)  # loads the train loader
        sample_rate, poisson = self._sample_rate(trainer)
        self.formal = FormalAccounting.start(
            accountant=self.accountant,
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=sample_rate,
            poisson=poisson,
            steps=steps,
            owner="DPBloGS(guarantee='formal')",
        )
        # The shuffle is post-processing: it costs nothing in the proven bound. Block size 1 (the
        # paper's strongest setting) unless the user chose.
        self.session = BloGSSession.plan_for(
            named,
            clip_norm=self.clip_norm,
            delta=self.delta,
            steps=steps,
            target_epsilon=None,
            block_size=1 if self.block_size is None else self.block_size,
            seed=seed,
            reproducible=self.seed is not None,
            noise_multiplier=self.formal.noise_multiplier,
        )

    @staticmethod
    def _sample_rate(trainer: pl.Trainer) -> tuple[float, bool]:
        """The training loader's sampling rate, and whether it is Poisson-sampled."""
        loader = trainer.train_dataloader
        if is_poisson_sampled(loader):
            return poisson_sample_rate(loader), True
        # The nominal rate of shuffled fixed-size batches; the accountant's bound then does not apply.
        return min(1.0, loader.batch_size * trainer.world_size / len(loader.dataset)), False

    def _planned_steps(self, trainer: pl.Trainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        estimated = trainer.estimated_stepping_batches
        if not math.isfinite(estimated) or estimated < 1:
            raise ValueError(
                f"DPBloGS cannot plan for {estimated} optimizer steps (infinite training or an "
                "iterable dataset without max_steps): pass DPBloGS(total_steps=...) or set "
                "Trainer(max_steps=...)."
            )
        return int(estimated)

    def _log_plan(self, trainer: pl.Trainer) -> None:
        plan, formal = self.session.plan, self.formal
        seed_note = (
            f"{self.session.mechanism.seed} (user seed: reproducible, not private)"
            if self.session.reproducible
            else "os-entropy"
        )
        params: dict[str, Any] = {
            "privacy/clip_norm": plan.clip_norm,
            "privacy/delta": plan.delta,
            "privacy/seed": seed_note,
        }
        if formal is None:
            params.update(
                {
                    "privacy/mechanism": "dp-blogs (paper figure, not a formal DP guarantee)",
                    "privacy/planned_steps": plan.steps,
                    "privacy/target_epsilon_blogs_paper": plan.target_epsilon,
                    "privacy/planned_epsilon_blogs_paper": plan.epsilon,
                }
            )
            summary = f"paper figure {plan.epsilon:.4g} after {plan.steps} steps (target {plan.target_epsilon})"
        else:
            params.update(formal.hyperparameters())
            params.update(
                {
                    "privacy/mechanism": "dp-blogs formal (per-tensor clip + Gaussian noise + shuffle)",
                    "privacy/target_epsilon": self.target_epsilon,
                }
            )
            summary = (
                f"noise_multiplier {formal.noise_multiplier:.4g}, sample rate {formal.sample_rate:.4g}, "
                f"{formal.allowed_steps} steps within the budget"
            )
        params.update({f"privacy/block_size/{n}": b for n, b in plan.as_dict().items()})
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        sizes = np.array(plan.block_sizes)
        rank_zero_info(
            f"DPBloGS: {len(sizes)} tensors, block sizes min {sizes.min()} / median {int(np.median(sizes))} / "
            f"max {sizes.max()}, {summary}, seed: {seed_note}"
        )

    @property
    def allowed_steps(self) -> int | None:
        """Optimizer steps the budget allows in total: the plan's, or the accountant's in formal mode
        (None: a formal run without a target has no budget)."""
        return self.session.plan.steps if self.formal is None else self.formal.allowed_steps

    # ----------------------------------------------------------------------------- every step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Clip (add noise) and block-shuffle the gradients, count the step, log the privacy figure."""
        session = self.session
        self._warned_over_budget = enforce_budget(
            "DPBloGS", self.on_budget_exceeded, session.steps, self.allowed_steps, self._warned_over_budget
        )
        session.step_()
        if self.formal is None:
            self._device_steps += 1
            sqrt_coefficient, linear_coefficient = self._figure_coefficients
            figure = sqrt_coefficient * self._device_steps.sqrt() + linear_coefficient * self._device_steps
            pl_module.log(EPSILON_KEY, figure, on_step=True, on_epoch=False, prog_bar=True)
            return
        self.formal.record_step(pl_module)

    @property
    def epsilon(self) -> float:
        """The privacy figure after the steps taken so far: the accountant's epsilon in formal mode,
        the paper's figure otherwise (0 before the first step)."""
        if self.session is None:
            return 0.0
        return self.session.epsilon if self.formal is None else self.formal.epsilon

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop training once the allowed steps are done (``on_budget_exceeded='stop'``), before the
        step that would exceed the budget."""
        stop_when_spent("DPBloGS", trainer, self.on_budget_exceeded, self.session.steps, self.allowed_steps)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the plan, the step count, the accountant's history (formal
        mode), and (for a user seed only) the generators' states. An OS-entropy generator state is
        never written to disk: the resumed run draws fresh entropy."""
        if self.session is None:
            return {}
        state = self.session.state_dict()
        if self.formal is not None:
            state["formal"] = self.formal.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's state; it is applied at fit start, once the model is known.

        Lightning skips an empty state (a checkpoint saved before fit start): the run is then
        planned afresh."""
        self._restored = dict(state_dict)
