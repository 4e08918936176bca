"""Proven (epsilon, delta) bounds for the Poisson-subsampled Gaussian mechanism.

This is the formal accounting of ``../shared/PRIVACY.md`` section 3, built on Google's
``dp-accounting`` package; nothing here re-derives the mathematics. Every training step is
described as a ``dp-accounting`` event::

    PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier))   # 0 < sample_rate < 1
    GaussianDpEvent(noise_multiplier)                                       # sample_rate == 1

a run of identical steps as ``SelfComposedDpEvent(step, num_steps)``, and a whole history (for
example a run resumed with new settings) as ``ComposedDpEvent([...])``. Two accountants judge it:

- ``"rdp"``: ``dp-accounting``'s Renyi-DP accountant over its default orders (1.1 to 10.9 in steps
  of 0.1, 11 to 63, 128, 256, 512, 1024), converted with the improved bound of Canonne, Kamath and
  Steinke (arXiv 2004.00010, Prop. 12)::

      eps = min_a [ RDP(a) + ln((a - 1) / a) - (ln delta + ln a) / (a - 1) ]

- ``"pld"``: ``dp-accounting``'s privacy-loss-distribution accountant with pessimistic rounding
  (connect-the-dots, privacy losses rounded up to multiples of ``value_discretization_interval``,
  truncated tails counted as infinite privacy loss), so the result is an upper bound at every
  discretization; a coarser grid only makes it looser and faster. It is usually 7-14 % below RDP.

Assumptions the bounds rest on (a different sampler or neighbouring relation voids them):

- Poisson sampling: in every step each example joins the batch independently with probability
  ``sample_rate`` (variable batch size, empty batches possible). Shuffled fixed-size batches are
  not Poisson sampling.
- Add/remove-one neighbouring datasets.
- ``noise_multiplier`` is the standard deviation of the Gaussian noise added to the aggregated,
  clipped gradient divided by that aggregate's L2 sensitivity under add/remove-one.

Epsilon is in nats (natural logarithm); delta is a probability.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np
from dp_accounting.dp_event import (
    ComposedDpEvent,
    DpEvent,
    GaussianDpEvent,
    PoissonSampledDpEvent,
    SelfComposedDpEvent,
)
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

from lightning_blogs._validation import (
    check_choice,
    check_open_unit_interval,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_VALUE_DISCRETIZATION_INTERVAL",
    "RDP_ORDERS",
    "GaussianAccountant",
    "GaussianSteps",
    "calibrate_noise_multiplier",
]

AccountantName = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")

#: Renyi orders of the ``"rdp"`` accountant: ``dp-accounting``'s defaults.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS)

#: Grid of the ``"pld"`` accountant, in nats: ``dp-accounting``'s default. It reproduces the
#: reference values of PRIVACY.md to 4 digits; 1e-3 is several times faster but overstates small
#: epsilons (0.077 instead of 0.061 for sigma 2, q 0.001, 1000 steps, delta 1e-6).
DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-4

# Bracket of the noise-multiplier search: outside it the target is unreasonable.
_MIN_NOISE_MULTIPLIER = 2.0**-10
_MAX_NOISE_MULTIPLIER = 2.0**20


class GaussianSteps(NamedTuple):
    """``num_steps`` consecutive steps of one Poisson-subsampled Gaussian mechanism.

    Attributes:
        noise_multiplier: noise standard deviation / L2 sensitivity, > 0.
        sample_rate: probability that an example joins a batch, in (0, 1]; 1 means no subsampling.
        num_steps: number of steps, >= 1.
    """

    noise_multiplier: float
    sample_rate: float
    num_steps: int

    @property
    def dp_event(self) -> DpEvent:
        """These steps as a ``dp-accounting`` ``SelfComposedDpEvent``."""
        return SelfComposedDpEvent(_step_event(self.noise_multiplier, self.sample_rate), self.num_steps)


class GaussianAccountant:
    """Running (epsilon, delta) bound of a training run made of Poisson-subsampled Gaussian steps.

    Record each optimizer step with :meth:`step`; consecutive steps with the same noise multiplier
    and sample rate are merged into one :attr:`history` entry, and entries with different settings
    (a run resumed with new settings) are composed. :meth:`get_epsilon` is a proven upper bound
    under Poisson sampling and add/remove-one neighbours (see the module docstring);
    :meth:`epsilon_after` asks what it would be after more steps without recording them, and
    :meth:`steps_within_budget` how many more steps fit in a target, so a budget check can stop
    before the step that would exceed it.

    Queries are cached: for ``"rdp"`` the per-step Renyi divergences of each (noise multiplier,
    sample rate) pair are computed once (about 0.1 s), after which a query costs well under a
    millisecond. For ``"pld"`` the one-step distribution of each pair and the composition of all
    entries but the last are kept, so a query costs one self-composition of the last entry (about
    0.5 s for 10,000 steps at the default grid on 2 CPU cores; use :meth:`steps_within_budget`
    rather than a per-step :meth:`epsilon_after` for budget checks) and repeated queries of the
    same history and delta are free.

    Args:
        accountant: ``"rdp"`` (Renyi DP with the improved conversion) or ``"pld"`` (privacy loss
            distributions, tighter and slower).
        value_discretization_interval: grid of the ``"pld"`` accountant in nats, > 0; smaller is
            tighter and slower, any value gives an upper bound. Ignored by ``"rdp"``.

    The state (:meth:`state_dict`) is the history only, so a resumed run may switch accountants.
    """

    def __init__(
        self,
        accountant: AccountantName = "rdp",
        value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
    ) -> None:
        self.accountant: AccountantName = check_choice("accountant", accountant, ACCOUNTANTS)  # type: ignore[assignment]
        self.value_discretization_interval = check_positive_float(
            "value_discretization_interval", value_discretization_interval
        )
        self._history: tuple[GaussianSteps, ...] = ()
        self._epsilons: OrderedDict[tuple[tuple[GaussianSteps, ...], float], float] = OrderedDict()
        # PLD of every entry of some history but its last, which only grows while training.
        self._closed_entries: tuple[GaussianSteps, ...] = ()
        self._closed_pld: privacy_loss_distribution.PrivacyLossDistribution | None = None

    # ------------------------------------------------------------------ recording

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps of the Poisson-subsampled Gaussian mechanism.

        Args:
            noise_multiplier: noise standard deviation / L2 sensitivity, finite and > 0.
            sample_rate: probability that each example joins each batch, in (0, 1]; 1 is the plain
                Gaussian mechanism on the full dataset.
            num_steps: number of steps, a positive integer.
        """
        self._history = _appended(self._history, _checked_steps(noise_multiplier, sample_rate, num_steps))

    @property
    def history(self) -> tuple[GaussianSteps, ...]:
        """Recorded steps, oldest first, consecutive identical settings merged."""
        return self._history

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(entry.num_steps for entry in self._history)

    @property
    def dp_event(self) -> DpEvent:
        """The history as one ``dp-accounting`` ``ComposedDpEvent`` (what the accountant judges)."""
        return ComposedDpEvent([entry.dp_event for entry in self._history])

    # ------------------------------------------------------------------ queries

    def get_epsilon(self, delta: float) -> float:
        """Upper bound on epsilon (nats) of the recorded steps at ``delta`` in (0, 1); 0 if none."""
        return self._epsilon(self._history, check_open_unit_interval("delta", delta))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, num_steps: int, delta: float) -> float:
        """Epsilon bound (nats) if ``num_steps`` more steps were recorded; records nothing.

        Arguments as in :meth:`step`, and ``delta`` in (0, 1). Recording those steps afterwards
        makes the next :meth:`get_epsilon` at the same ``delta`` a cache hit.
        """
        entry = _checked_steps(noise_multiplier, sample_rate, num_steps)
        return self._epsilon(_appended(self._history, entry), check_open_unit_interval("delta", delta))

    def steps_within_budget(
        self, noise_multiplier: float, sample_rate: float, target_epsilon: float, delta: float, max_steps: int
    ) -> int:
        """How many more steps (0 to ``max_steps``) keep the epsilon bound <= ``target_epsilon``.

        A budget check calls this once per setting instead of :meth:`epsilon_after` every step:
        a bisection over the step count (about ``log2(max_steps)`` queries, a few seconds for
        ``"pld"`` and 10,000 steps), exact in the sense that one step more than the answer would
        exceed the target (unless the answer is ``max_steps``). Records nothing.

        Args:
            noise_multiplier: as in :meth:`step`.
            sample_rate: as in :meth:`step`.
            target_epsilon: budget in nats, finite and > 0.
            delta: target delta, in (0, 1).
            max_steps: largest answer wanted (for example the steps left in the run), a positive integer.
        """
        entry = _checked_steps(noise_multiplier, sample_rate, 1)._replace(
            num_steps=check_positive_int("max_steps", max_steps)
        )
        target_epsilon = check_positive_float("target_epsilon", target_epsilon)
        delta = check_open_unit_interval("delta", delta)

        def within(num_steps: int) -> bool:
            steps = entry._replace(num_steps=num_steps)
            return self._epsilon(_appended(self._history, steps), delta) <= target_epsilon

        if within(entry.num_steps):
            return entry.num_steps
        feasible, infeasible = 0, entry.num_steps  # epsilon grows with the number of steps
        while infeasible - feasible > 1:
            middle = (feasible + infeasible) // 2
            if within(middle):
                feasible = middle
            else:
                infeasible = middle
        return feasible

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The history as plain Python types (safe for ``torch.load(weights_only=True)``)."""
        return {"history": [entry._asdict() for entry in self._history]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the history with one saved by :meth:`state_dict` (validated entry by entry)."""
        entries = state_dict.get("history") if isinstance(state_dict, Mapping) else None
        if not isinstance(entries, Sequence) or not all(isinstance(e, Mapping) for e in entries):
            raise ValueError(
                "state_dict must be a mapping with a 'history' list of {noise_multiplier, sample_rate, num_steps} "
                f"mappings, got {state_dict!r}"
            )
        history: tuple[GaussianSteps, ...] = ()
        for entry in entries:
            history = _appended(
                history, _checked_steps(entry.get("noise_multiplier"), entry.get("sample_rate"), entry.get("num_steps"))
            )
        self._history = history

    def __repr__(self) -> str:
        return f"{type(self).__name__}(accountant={self.accountant!r}, steps={self.steps})"

    # ------------------------------------------------------------------ internals

    def _epsilon(self, history: tuple[GaussianSteps, ...], delta: float) -> float:
        if not history:
            return 0.0
        key = (history, delta)
        if key in self._epsilons:
            self._epsilons.move_to_end(key)
            return self._epsilons[key]
        if self.accountant == "rdp":
            rdp = sum(
                entry.num_steps * _rdp_of_one_step(entry.noise_multiplier, entry.sample_rate) for entry in history
            )
            epsilon = float(rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, delta)[0])
        else:
            epsilon = float(self._pld(history).get_epsilon_for_delta(delta))
        self._epsilons[key] = epsilon
        if len(self._epsilons) > 16:
            self._epsilons.popitem(last=False)
        return epsilon

    def _pld(self, history: tuple[GaussianSteps, ...]) -> privacy_loss_distribution.PrivacyLossDistribution:
        closed = history[:-1]
        if closed[: len(self._closed_entries)] != self._closed_entries:
            self._closed_entries, self._closed_pld = (), None
        for entry in closed[len(self._closed_entries) :]:
            pld = _entry_pld(entry, self.value_discretization_interval)
            self._closed_pld = pld if self._closed_pld is None else self._closed_pld.compose(pld)
        self._closed_entries = closed
        last = _entry_pld(history[-1], self.value_discretization_interval)
        return last if self._closed_pld is None else self._closed_pld.compose(last)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
    *,
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
    relative_tolerance: float = 1e-4,
) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` Poisson-subsampled steps is <= target.

    Brent's method (as in ``dp-accounting``'s ``mechanism_calibration``) on the epsilon of
    :class:`GaussianAccountant` itself, so the accountant that judges training is the one searched,
    inside a bracket found by doubling/halving from 1. The answer is nudged up until its epsilon is
    <= ``target_epsilon``: it never overshoots the target and is at most ``relative_tolerance``
    (relative) above the exact smallest noise multiplier. Cost: about ten epsilon evaluations,
    1-5 s for ``"rdp"``, 10-30 s for ``"pld"`` at the default grid and a few thousand steps.

    Args:
        target_epsilon: privacy budget in nats, finite and > 0.
        delta: target delta, in (0, 1).
        sample_rate: Poisson sampling probability per step, in (0, 1].
        steps: number of optimizer steps, a positive integer.
        accountant: ``"rdp"`` or ``"pld"``, as in :class:`GaussianAccountant`; account the
            training run with the same accountant (and grid) to stay within the target.
        value_discretization_interval: ``"pld"`` grid in nats, > 0.
        relative_tolerance: how far above the smallest noise multiplier the answer may be, in (0, 1).

    Returns:
        The noise multiplier (noise standard deviation / L2 sensitivity).

    Raises:
        ValueError: for an argument outside its range, or a target that needs a noise multiplier
            outside [2**-10, 2**20].
    """
    target_epsilon = check_positive_float("target_epsilon", target_epsilon)
    delta = check_open_unit_interval("delta", delta)
    sample_rate = _check_sample_rate(sample_rate)
    steps = check_positive_int("steps", steps)
    check_choice("accountant", accountant, ACCOUNTANTS)
    value_discretization_interval = check_positive_float("value_discretization_interval", value_discretization_interval)
    relative_tolerance = check_open_unit_interval("relative_tolerance", relative_tolerance)

    probe = GaussianAccountant(accountant, value_discretization_interval)  # stays empty; caches answers

    def epsilon_at(noise_multiplier: float) -> float:
        return probe.epsilon_after(noise_multiplier, sample_rate, steps, delta)

    # Bracket [lower, upper]: epsilon(lower) > target >= epsilon(upper); epsilon falls as noise grows.
    lower = upper = 1.0
    if epsilon_at(1.0) > target_epsilon:
        while epsilon_at(upper) > target_epsilon:
            if upper >= _MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target_epsilon} is out of reach: even noise_multiplier={upper:g} gives "
                    f"epsilon {epsilon_at(upper):.4g} at delta={delta}, sample_rate={sample_rate}, steps={steps}"
                )
            lower, upper = upper, 2.0 * upper
    else:
        while epsilon_at(lower) <= target_epsilon:
            if lower <= _MIN_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target_epsilon={target_epsilon} is so large that noise_multiplier={lower:g} already meets it "
                    f"(delta={delta}, sample_rate={sample_rate}, steps={steps}); choose a smaller target"
                )
            lower, upper = lower / 2.0, lower
    # Brent's method leaves the answer within `tolerance` of the exact root; at most one nudge of
    # `tolerance` then makes epsilon <= target, so the answer is <= 2 * tolerance above the root.
    tolerance = 0.5 * relative_tolerance * lower
    noise_multiplier = float(
        optimize.brentq(lambda sigma: epsilon_at(sigma) - target_epsilon, lower, upper, xtol=tolerance)
    )
    while epsilon_at(noise_multiplier) > target_epsilon:
        noise_multiplier += tolerance
    return noise_multiplier


# ---------------------------------------------------------------------- helpers


def _check_sample_rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"sample_rate must be a number in the half-open interval (0, 1], got {value!r}")
    return float(value)


def _checked_steps(noise_multiplier: object, sample_rate: object, num_steps: object) -> GaussianSteps:
    return GaussianSteps(
        check_positive_float("noise_multiplier", noise_multiplier),
        _check_sample_rate(sample_rate),
        check_positive_int("num_steps", num_steps),
    )


def _appended(history: tuple[GaussianSteps, ...], entry: GaussianSteps) -> tuple[GaussianSteps, ...]:
    """``history`` plus ``entry``, merged into the last entry when the settings are the same."""
    if history and history[-1][:2] == entry[:2]:
        last = history[-1]
        return (*history[:-1], last._replace(num_steps=last.num_steps + entry.num_steps))
    return (*history, entry)


def _step_event(noise_multiplier: float, sample_rate: float) -> DpEvent:
    gaussian = GaussianDpEvent(noise_multiplier)
    return gaussian if sample_rate == 1.0 else PoissonSampledDpEvent(sample_rate, gaussian)


@lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Renyi divergences at :data:`RDP_ORDERS` of one step (read-only array)."""
    accountant = rdp_privacy_accountant.RdpAccountant(RDP_ORDERS)
    rdp = accountant.compose(_step_event(noise_multiplier, sample_rate)).rdp
    rdp.flags.writeable = False
    return rdp


@lru_cache(maxsize=8)
def _subsampled_step_pld(
    noise_multiplier: float, sample_rate: float, value_discretization_interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of one Poisson-subsampled step, built as ``PLDAccountant`` builds it."""
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sampling_prob=sample_rate,
        value_discretization_interval=value_discretization_interval,
    )


def _entry_pld(
    entry: GaussianSteps, value_discretization_interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of a history entry, exactly as ``PLDAccountant`` composes ``entry.dp_event``."""
    if entry.sample_rate == 1.0:
        # k plain Gaussian steps are one Gaussian with noise sigma / sqrt(k): exact, no self-composition.
        return privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=entry.noise_multiplier / math.sqrt(entry.num_steps),
            value_discretization_interval=value_discretization_interval,
        )
    step = _subsampled_step_pld(entry.noise_multiplier, entry.sample_rate, value_discretization_interval)
    return step.self_compose(entry.num_steps)
