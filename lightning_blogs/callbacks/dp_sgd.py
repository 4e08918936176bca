"""DP-SGD as a Lightning callback."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_blogs._opacus import require_opacus
from lightning_blogs._validation import (
    check_choice,
    check_int,
    check_non_negative_float,
    check_open_unit_interval,
    check_positive_float,
    check_positive_int,
)
from lightning_blogs.accounting.gaussian import ACCOUNTANTS
from lightning_blogs.callbacks._common import check_trainer_supported, shared_entropy_seed
from lightning_blogs.callbacks.formal import BUDGET_ACTIONS, FormalAccounting, enforce_budget, stop_when_spent
from lightning_blogs.mechanism.dpsgd import add_noise_and_scale_, clip_and_accumulate_per_sample_
from lightning_blogs.mechanism.randomness import RandomSource

__all__ = ["DPSGD"]

_LOSS_REDUCTIONS = ("mean", "sum")
# Attributes Opacus leaves on parameters and modules; removed when the callback lets go of a module.
_OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample")
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len")


def _loader_sample_rate(loader: object) -> float | None:
    """The Poisson sampling rate a train loader declares (on itself or on its batch sampler), if any."""
    for holder in (loader, getattr(loader, "batch_sampler", None)):
        rate = getattr(holder, "sample_rate", None)
        if rate is not None:
            return float(rate)
    return None


class DPSGD(Callback):
    r"""DP-SGD: per-sample clipping and Gaussian noise, inside an ordinary Lightning training loop.

    Every optimizer step writes

    .. math:: g = \frac{1}{B}\Big(\sum_i g_i \min\big(1, \tfrac{C}{\lVert g_i\rVert_2 + 10^{-6}}\big)
              + \mathcal N(0, \sigma^2 C^2 I)\Big)

    into the parameters' ``.grad``, where ``g_i`` is example ``i``'s gradient over all trainable
    parameters jointly, the sum runs over every example of the step (all accumulated micro-batches,
    all DDP ranks), ``C = clip_norm``, ``sigma = noise_multiplier`` and ``B`` the *expected* batch
    size, a public number (never the realised size; an empty batch is a step of pure noise).

    Per-sample gradients come from Opacus's grad-sample hooks (``pip install
    'lightning-blogs[dpsgd]'``), attached to the LightningModule's layers at fit start and removed
    at the end: the module's ``training_step`` and loss stay as they are. The network must be
    DP-compatible (no BatchNorm, no in-place activations; see
    :func:`lightning_blogs.models.make_dp_compatible`), and every trainable parameter must live in
    a submodule (not directly on the LightningModule).

    Hooks: ``on_after_backward`` clips each micro-batch's per-sample gradients and adds them to
    running sums; ``on_before_optimizer_step`` (once per optimizer step, after AMP unscaling)
    sums them over DDP ranks, adds the noise once (the same draw on every rank, from a seed that
    rank 0 broadcasts) and writes ``.grad``. Lightning's own DDP all-reduce of the ordinary
    gradients still runs; its result is overwritten.

    Accounting seam: :attr:`steps` counts privatised steps and :meth:`_record_step` is the one
    place where a step is recorded; each step is one Gaussian mechanism with
    :attr:`noise_multiplier`, Poisson-subsampled at :attr:`sample_rate` when that is known (the
    subsampled-Gaussian accountants assume Poisson sampling, ``docs/privacy.md``).

    Example::

        net, changes = make_dp_compatible(resnet18(in_channels=1, image_size=28, num_classes=10))
        trainer = lightning.Trainer(callbacks=[DPSGD(noise_multiplier=1.1, clip_norm=1.0)])
        trainer.fit(ImageClassifier(net), datamodule)

    Args:
        noise_multiplier: sigma >= 0, the noise's standard deviation in units of ``clip_norm``.
            0 disables the noise (clipping only: not private, warned at train start).
        clip_norm: the per-sample L2 bound C > 0, over all trainable parameters jointly.
        expected_batch_size: the expected number of examples per optimizer step, over all
            accumulated micro-batches and all ranks, > 0. Default: derived at train start from
            the train loader: ``sample_rate * len(dataset)`` when the loader (or its batch sampler)
            has a ``sample_rate`` (Poisson sampling; then ``accumulate_grad_batches`` must be 1),
            else ``batch_size * accumulate_grad_batches * world_size``.
        seed: seed of the noise, in ``[0, 2**64)``. None (default) draws one from the operating
            system's entropy pool on rank 0 and shares it with every rank. A given seed makes runs
            reproducible, and is logged as such: it is not private against anyone who knows it.
        loss_reduction: how ``training_step``'s loss combines the examples of a batch: ``"mean"``
            (default, e.g. ``cross_entropy``) or ``"sum"``. It tells Opacus how to turn the
            batch's backward pass into per-example gradients.
        target_epsilon: the proven epsilon not to exceed, > 0, or None (no budget). With
            ``noise_multiplier=None`` the noise is calibrated to reach it after ``total_steps``.
        delta: the delta of the reported epsilon, in (0, 1).
        accountant: ``"rdp"`` (default) or ``"pld"`` (tighter, slower).
        total_steps: optimizer steps to calibrate and budget for; default the Trainer's
            ``estimated_stepping_batches``.
        on_budget_exceeded: when the next step would take epsilon past ``target_epsilon``:
            ``"stop"`` (default) stops training before it, ``"warn"`` warns once and goes on,
            ``"raise"`` raises.

    The accountant's epsilon is logged every step as ``privacy/epsilon`` (with ``privacy/delta``)
    when the training loader is Poisson-sampled, and as ``privacy/epsilon_if_poisson_sampled``,
    with a loud warning, when it is not (shuffled fixed-size batches do not meet the accountant's
    assumption, so the number is not a proven bound).

    Raises:
        ValueError: an argument is out of range (at construction); the strategy, the optimization
            mode or the module is unsupported (at setup or fit start); the expected batch size
            cannot be derived (at train start).
        ImportError: Opacus is not installed (at setup).
    """

    def __init__(
        self,
        noise_multiplier: float | None,
        clip_norm: float,
        expected_batch_size: float | None = None,
        seed: int | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        accountant: Literal["rdp", "pld"] = "rdp",
        total_steps: int | None = None,
        on_budget_exceeded: Literal["stop", "warn", "raise"] = "stop",
    ) -> None:
        if noise_multiplier is None and target_epsilon is None:
            raise ValueError("noise_multiplier may be None only with a target_epsilon to calibrate it to")
        self.noise_multiplier = (
            None if noise_multiplier is None else check_non_negative_float("noise_multiplier", noise_multiplier)
        )
        self._requested_noise_multiplier = self.noise_multiplier  # None: calibrated at train start
        self.target_epsilon = None if target_epsilon is None else check_positive_float("target_epsilon", target_epsilon)
        self.delta = check_open_unit_interval("delta", delta)
        self.accountant = check_choice("accountant", accountant, ACCOUNTANTS)
        self.total_steps = None if total_steps is None else check_positive_int("total_steps", total_steps)
        self.on_budget_exceeded = check_choice("on_budget_exceeded", on_budget_exceeded, BUDGET_ACTIONS)
        self.formal: FormalAccounting | None = None
        self._restored_formal: dict[str, Any] | None = None
        self._warned_over_budget = False
        self.clip_norm = check_positive_float("clip_norm", clip_norm)
        self._derive_batch_size = expected_batch_size is None
        self.expected_batch_size = (
            None if expected_batch_size is None else check_positive_float("expected_batch_size", expected_batch_size)
        )
        if seed is not None and not 0 <= check_int("seed", seed) < 2**64:
            raise ValueError(f"seed must be None (OS entropy) or an integer in [0, 2**64), got {seed!r}")
        self.seed = seed
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, _LOSS_REDUCTIONS)

        self.steps = 0
        self.sample_rate: float | None = None
        self._noise: RandomSource | None = None
        self._restored_noise: dict[str, Any] | None = None
        self._grad_sampler: Any = None  # opacus GradSampleModule, holding the hooks
        self._params: list[torch.nn.Parameter] = []
        self._flat: torch.Tensor | None = None  # one buffer, so DDP sums everything in one all-reduce
        self._accumulators: list[torch.Tensor] = []  # views of _flat, one per parameter
        self._seen: set[int] = set()  # ids of parameters that got per-sample gradients this step

    # ----------------------------------------------------------------------------------- checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse configurations the callback cannot handle correctly, before any training."""
        if stage != "fit":
            return
        check_trainer_supported(
            "DPSGD",
            trainer,
            pl_module,
            sharded_reason="per-sample gradients need every rank to hold whole parameters",
        )
        require_opacus("DPSGD")

    # ---------------------------------------------------------------------------- fit start/end
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the per-sample gradient hooks (all layers exist and sit on their device now) and
        set up the noise."""
        self._attach(pl_module)
        if self.seed is None:
            # Rank 0 draws the entropy and every rank uses it: identical noise keeps DDP replicas
            # identical. A fresh draw per fit; its state never reaches a checkpoint.
            self._noise = RandomSource(shared_entropy_seed(trainer))
        elif self._noise is None or self._restored_noise is not None:
            # A user seed continues its stream across fits (replaying it would reuse noise), and a
            # checkpoint of the same seed resumes it exactly.
            self._noise = RandomSource(self.seed)
            if self._restored_noise is not None and self._restored_noise.get("seed") == self.seed:
                self._noise.load_state_dict(self._restored_noise["noise"])
        self._restored_noise = None

    def _attach(self, pl_module: pl.LightningModule) -> None:
        opacus = require_opacus("DPSGD")
        self._detach()
        own = [name for name, p in pl_module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            raise ValueError(
                f"DPSGD needs every trainable parameter inside a submodule (e.g. self.net); {own} are registered "
                "directly on the LightningModule, where Opacus cannot compute per-sample gradients."
            )
        errors = opacus.validators.ModuleValidator.validate(pl_module, strict=False)
        if errors:
            raise ValueError(
                f"DPSGD cannot compute per-sample gradients for this module: {errors}. "
                "lightning_blogs.models.make_dp_compatible(net) replaces BatchNorm and in-place activations."
            )
        try:
            self._grad_sampler = opacus.grad_sample.GradSampleModule(
                pl_module, batch_first=True, loss_reduction=self.loss_reduction, strict=True
            )
        except NotImplementedError as error:  # Opacus's way of saying "unsupported layer"
            raise ValueError(f"DPSGD cannot compute per-sample gradients for this module: {error}") from error
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"DPSGD needs all trainable parameters on one device, found {sorted(map(str, devices))}")
        dtype = torch.float32
        for p in self._params:
            dtype = torch.promote_types(dtype, p.dtype)
        self._flat = torch.zeros(sum(p.numel() for p in self._params), dtype=dtype, device=devices.pop())
        self._accumulators = [
            view.view_as(p)
            for view, p in zip(self._flat.split([p.numel() for p in self._params]), self._params, strict=True)
        ]
        self._seen = set()

    def _detach(self) -> None:
        """Remove the hooks and Opacus's attributes: the module is left as it came."""
        if self._grad_sampler is None:
            return
        module = self._grad_sampler._module
        self._grad_sampler.remove_hooks()
        for p in module.parameters():
            for attr in _OPACUS_PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        for m in module.modules():
            for attr in _OPACUS_MODULE_ATTRS:
                m.__dict__.pop(attr, None)
        self._grad_sampler = None
        self._params, self._accumulators, self._flat = [], [], None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks once fitting is over."""
        if stage == "fit":
            self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the hooks when fitting fails."""
        self._detach()

    # ------------------------------------------------------------------------- batch size, logs
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix the expected batch size and the sampling rate from the train loader; log the setup."""
        self.expected_batch_size, self.sample_rate = self._batch_size_and_rate(trainer)
        self._start_accounting(trainer)
        scaler = self._scaler(trainer)
        if scaler is not None and any(getattr(o, "_step_supports_amp_scaling", False) for o in trainer.optimizers):
            raise ValueError(
                "DPSGD with precision='16-mixed' needs an optimizer that lets the GradScaler unscale gradients "
                "before the step (fused/capturable optimizers unscale inside step(), after DPSGD has written "
                "unscaled gradients). Use fused=False, or precision='bf16-mixed'."
            )
        if self.noise_multiplier == 0:
            rank_zero_warn("DPSGD(noise_multiplier=0) clips per-sample gradients but adds no noise: NOT private.")
        self._log_setup(trainer)

    def _start_accounting(self, trainer: pl.Trainer) -> None:
        """Start (or resume) the accountant; calibrate sigma when only a target was given."""
        if self._requested_noise_multiplier == 0 or (self.formal is not None and self._restored_formal is None):
            return
        steps = self.total_steps or trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError("DPSGD cannot account for infinite training: pass DPSGD(total_steps=...)")
        poisson = self.sample_rate is not None
        # Without Poisson sampling the nominal rate is reported, under a name that says it is unproven.
        nominal = self.expected_batch_size / len(trainer.train_dataloader.dataset)
        rate = self.sample_rate if poisson else min(1.0, nominal)
        settings = dict(sample_rate=rate, poisson=poisson, target_epsilon=self.target_epsilon, steps=int(steps))
        if self._restored_formal is not None:
            self.formal = FormalAccounting.from_state_dict(self._restored_formal)
            self._restored_formal = None
            self.formal.continue_with(noise_multiplier=self._requested_noise_multiplier, owner="DPSGD", **settings)
        else:
            self.formal = FormalAccounting.start(
                accountant=self.accountant,
                delta=self.delta,
                noise_multiplier=self._requested_noise_multiplier,
                owner="DPSGD",
                **settings,
            )
        if self.formal is not None:
            self.noise_multiplier = self.formal.noise_multiplier

    @property
    def epsilon(self) -> float:
        """The accountant's epsilon after the steps taken (inf without noise, 0 before training)."""
        if self.formal is None:
            return math.inf if self.noise_multiplier == 0 else 0.0
        return self.formal.epsilon

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop training once the steps within the budget are done (``on_budget_exceeded='stop'``)."""
        if self.formal is not None:
            stop_when_spent("DPSGD", trainer, self.on_budget_exceeded, self.steps, self.formal.allowed_steps)

    def _batch_size_and_rate(self, trainer: pl.Trainer) -> tuple[float, float | None]:
        loader = trainer.train_dataloader
        accumulate = trainer.accumulate_grad_batches
        sample_rate = _loader_sample_rate(loader)
        if sample_rate is not None and accumulate > 1:
            if self._derive_batch_size:
                raise ValueError(
                    f"expected_batch_size must be given with a Poisson-sampled loader and accumulate_grad_batches="
                    f"{accumulate}: each micro-batch is its own Poisson draw, so one optimizer step is not one "
                    f"step subsampled at sample_rate={sample_rate}."
                )
            rank_zero_warn(
                f"DPSGD: Poisson-sampled micro-batches accumulated {accumulate} at a time do not form one "
                "Poisson-subsampled step; sample_rate is left unknown (None) for the accountant."
            )
            sample_rate = None
        if not self._derive_batch_size:
            return self.expected_batch_size, sample_rate
        if sample_rate is not None:
            expected = sample_rate * len(loader.dataset)
        elif getattr(loader, "batch_size", None) is not None:
            expected = loader.batch_size * accumulate * trainer.world_size
        else:
            raise ValueError(
                "expected_batch_size could not be derived: the train loader has neither a batch_size nor a "
                f"sample_rate (got {type(loader).__name__}); pass DPSGD(expected_batch_size=...)."
            )
        return check_positive_float("expected_batch_size", expected), sample_rate

    def _log_setup(self, trainer: pl.Trainer) -> None:
        seed_note = f"{self.seed} (user seed: reproducible, not private)" if self.seed is not None else "os-entropy"
        params: dict[str, Any] = {
            "privacy/mechanism": "dp-sgd",
            "privacy/noise_multiplier": self.noise_multiplier,
            "privacy/clip_norm": self.clip_norm,
            "privacy/expected_batch_size": self.expected_batch_size,
            "privacy/sample_rate": "unknown (not Poisson-sampled)" if self.sample_rate is None else self.sample_rate,
            "privacy/seed": seed_note,
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        rank_zero_info(
            f"DPSGD: {len(self._params)} tensors, noise_multiplier {self.noise_multiplier}, clip_norm "
            f"{self.clip_norm}, expected batch size {self.expected_batch_size:g}, sample_rate "
            f"{self.sample_rate}, noise seed: {seed_note}"
        )

    # ----------------------------------------------------------------------------- every step
    @staticmethod
    def _scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clip this micro-batch's per-sample gradients, add them to the running sums, free them."""
        # Lightning divides the loss by accumulate_grad_batches, and under 16-mixed the GradScaler
        # multiplies it by its scale: undo both. The scale stays a device tensor (get_scale() would
        # synchronise); it is the one this backward used, as the scaler only updates after the step.
        unscale: float | torch.Tensor = float(trainer.accumulate_grad_batches)
        scaler = self._scaler(trainer)
        if scaler is not None:
            unscale = scaler._scale.double().reciprocal().float() * unscale
        grad_samples, accumulators = [], []
        for p, accumulator in zip(self._params, self._accumulators, strict=True):
            if p.grad_sample is not None:
                grad_samples.append(p.grad_sample)
                accumulators.append(accumulator)
                self._seen.add(id(p))
                p.grad_sample = None
        clip_and_accumulate_per_sample_(grad_samples, accumulators, self.clip_norm, unscale)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Sum over ranks, add the noise once, divide by the expected batch size, write ``.grad``."""
        if self.formal is not None:
            self._warned_over_budget = enforce_budget(
                "DPSGD", self.on_budget_exceeded, self.steps, self.formal.allowed_steps, self._warned_over_budget
            )
        self._check_every_gradient_was_clipped(pl_module)
        total = trainer.strategy.reduce(self._flat, reduce_op="sum")  # identity on a single device
        if total is not self._flat:
            self._flat.copy_(total)
        scaler = self._scaler(trainer)
        if scaler is not None:
            self._skip_step_on_overflow(scaler, optimizer)
        live = [(p, a) for p, a in zip(self._params, self._accumulators, strict=True) if p.requires_grad]
        add_noise_and_scale_(
            [p for p, _ in live],
            [a for _, a in live],
            self.noise_multiplier,
            self.clip_norm,
            self.expected_batch_size,
            self._noise,
        )
        self._flat.zero_()
        self._seen = set()
        self._record_step(pl_module)

    def _check_every_gradient_was_clipped(self, pl_module: pl.LightningModule) -> None:
        # A gradient that did not come through the per-sample hooks (a parameter used outside its
        # module, or unfrozen after fit start) would reach the optimizer unclipped: refuse.
        for name, p in pl_module.named_parameters():
            if p.grad is not None and id(p) not in self._seen:
                raise RuntimeError(
                    f"DPSGD: parameter {name!r} has a gradient but no per-sample gradient. Use parameters only "
                    "through the submodule that owns them, and do not unfreeze parameters after fit start."
                )

    def _skip_step_on_overflow(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        # fp16 per-sample gradients overflow more easily than their mean (Opacus scales backprops by
        # the batch size). The scaler decided on inf/nan from the ordinary gradients when it
        # unscaled them; fold the sums' overflow into that decision, on the device, so that the
        # step is skipped and the scale lowered on every rank (the sums are already all-reduced).
        overflow = torch.isfinite(self._flat).all().logical_not().float()
        state = scaler._per_optimizer_states[id(optimizer)]
        for found_inf in state["found_inf_per_device"].values():
            torch.maximum(found_inf, overflow.to(found_inf.device), out=found_inf)

    def _record_step(self, pl_module: pl.LightningModule) -> None:
        """Record one privatised step: the Gaussian mechanism with ``noise_multiplier`` on the sum of
        clipped per-sample gradients (sensitivity ``clip_norm``), subsampled at ``sample_rate``.

        The single place where steps are counted; an accountant composes one step here. A step
        that the 16-mixed GradScaler then skips (inf/nan) is counted too: its noise was drawn, and
        counting errs on the safe side."""
        self.steps += 1
        if self.formal is not None:
            self.formal.record_step(pl_module)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The step count, and for a user seed the seed and the noise generators' states (an
        OS-entropy state is never written to disk: a resumed run draws fresh entropy)."""
        state: dict[str, Any] = {"steps": self.steps}
        if self.formal is not None:
            state["formal"] = self.formal.state_dict()
        if self.seed is not None and self._noise is not None:
            state.update(seed=self.seed, noise=self._noise.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the step count; a seeded noise state is applied at fit start."""
        self.steps = int(state_dict["steps"])
        self._restored_formal = state_dict.get("formal")
        self._restored_noise = dict(state_dict) if "noise" in state_dict else None
