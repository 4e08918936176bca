"""Tests of the formal accounting of the Poisson-subsampled Gaussian (``accounting/gaussian.py``).

Reference values are those of ``shared/PRIVACY.md`` section 3 (computed with Opacus and
``dp-accounting``) and the TF Privacy test vector; compositions are checked against
``dp-accounting``'s own accountants fed hand-built ``DpEvent``s.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from lightning_blogs.accounting import GaussianAccountant, GaussianSteps, calibrate_noise_multiplier

# (noise_multiplier, sample_rate, steps, delta, RDP with the improved conversion, PLD)
REFERENCE_TABLE = [
    (1.0, 0.01, 10000, 1e-5, 6.713, 6.188),
    (1.5, 0.04, 2250, 1e-5, 7.3291, 6.769),
    (1.1, 256 / 60000, 14040, 1e-5, 2.594, 2.380),
    (1.0, 0.01, 1000, 1e-5, 2.101, 1.829),
    (2.0, 0.001, 1000, 1e-6, 0.1745, 0.0613),
    (1.0, 1.0, 1, 1e-5, 4.7285, 4.37718),  # plain Gaussian, one step
]
# A coarse PLD grid where only composition (not the absolute value) is under test, to stay fast.
COARSE_GRID = 1e-3


def poisson_gaussian(noise_multiplier: float, sample_rate: float, steps: int) -> dp_event.DpEvent:
    """Hand-built reference event, independent of ``GaussianSteps.dp_event``."""
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), steps
    )


def accountant_with(accountant: str, *segments: tuple[float, float, int], grid: float = 1e-4) -> GaussianAccountant:
    result = GaussianAccountant(accountant, value_discretization_interval=grid)
    for noise_multiplier, sample_rate, steps in segments:
        result.step(noise_multiplier, sample_rate, steps)
    return result


# --------------------------------------------------------------------------------------------
# reference values


@pytest.mark.parametrize(("sigma", "q", "steps", "delta", "rdp", "pld"), REFERENCE_TABLE)
def test_rdp_matches_reference_table(sigma, q, steps, delta, rdp, pld):
    epsilon = accountant_with("rdp", (sigma, q, steps)).get_epsilon(delta)
    assert epsilon == pytest.approx(rdp, rel=1e-3)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta", "rdp", "pld"), REFERENCE_TABLE)
def test_pld_matches_reference_table(sigma, q, steps, delta, rdp, pld):
    epsilon = accountant_with("pld", (sigma, q, steps)).get_epsilon(delta)
    assert epsilon == pytest.approx(pld, rel=1e-2)
    assert epsilon < rdp  # the tighter accountant, in every row


def test_tf_privacy_vector():
    # n = 60000, batch 150, sigma 1.3, 15 epochs, delta 1e-5.
    sample_rate = 150 / 60000
    steps = math.ceil(15 * 60000 / 150)
    epsilon = accountant_with("rdp", (1.3, sample_rate, steps)).get_epsilon(1e-5)
    assert epsilon == pytest.approx(0.72422, rel=1e-3)


def test_pld_coarser_grid_is_pessimistic():
    fine = accountant_with("pld", (2.0, 0.001, 1000)).get_epsilon(1e-6)
    coarse = accountant_with("pld", (2.0, 0.001, 1000), grid=COARSE_GRID).get_epsilon(1e-6)
    assert coarse >= fine


# --------------------------------------------------------------------------------------------
# noise calibration


def test_calibration_reference_and_tight():
    sample_rate, steps = 0.04, math.ceil(90 / 0.04)
    sigma = calibrate_noise_multiplier(8.0, 1e-5, sample_rate, steps)
    assert sigma == pytest.approx(1.416, rel=1e-2)
    probe = GaussianAccountant("rdp")
    assert probe.epsilon_after(sigma, sample_rate, steps, 1e-5) <= 8.0
    assert probe.epsilon_after(sigma * (1 - 1e-3), sample_rate, steps, 1e-5) > 8.0


@pytest.mark.parametrize(
    ("target", "delta", "sample_rate", "steps"),
    [
        (0.5, 1e-5, 0.01, 500),
        (2.0, 1e-6, 0.001, 1000),
        (8.0, 1e-5, 0.1, 50),
        (1.0, 1e-5, 1.0, 10),
        (4.7285, 1e-5, 1.0, 1),
    ],
)
def test_calibration_never_overshoots_rdp(target, delta, sample_rate, steps):
    sigma = calibrate_noise_multiplier(target, delta, sample_rate, steps)
    probe = GaussianAccountant("rdp")
    assert probe.epsilon_after(sigma, sample_rate, steps, delta) <= target
    assert probe.epsilon_after(sigma * (1 - 1e-3), sample_rate, steps, delta) > target


def test_calibration_plain_gaussian_inverts_reference_row():
    # PRIVACY.md: one step of sigma = 1 at q = 1 gives RDP epsilon 4.7285 at delta 1e-5.
    assert calibrate_noise_multiplier(4.7285, 1e-5, 1.0, 1) == pytest.approx(1.0, rel=1e-3)


def test_calibration_never_overshoots_pld():
    target, delta, sample_rate, steps = 3.0, 1e-5, 0.02, 200
    sigma = calibrate_noise_multiplier(
        target, delta, sample_rate, steps, "pld", value_discretization_interval=COARSE_GRID
    )
    probe = GaussianAccountant("pld", value_discretization_interval=COARSE_GRID)
    assert probe.epsilon_after(sigma, sample_rate, steps, delta) <= target
    assert probe.epsilon_after(sigma * (1 - 1e-3), sample_rate, steps, delta) > target
    # PLD is tighter than RDP, so it needs less noise for the same target.
    assert sigma < calibrate_noise_multiplier(target, delta, sample_rate, steps, "rdp")


# --------------------------------------------------------------------------------------------
# history, composition, queries


def test_consecutive_identical_steps_merge():
    accountant = GaussianAccountant()
    for _ in range(3):
        accountant.step(1.0, 0.01)
    accountant.step(1.0, 0.01, num_steps=2)
    assert accountant.history == (GaussianSteps(1.0, 0.01, 5),)
    accountant.step(1.5, 0.01, 10)
    accountant.step(1.0, 0.01)  # same as the first entry, but not consecutive: a new entry
    assert accountant.history == (
        GaussianSteps(1.0, 0.01, 5),
        GaussianSteps(1.5, 0.01, 10),
        GaussianSteps(1.0, 0.01, 1),
    )
    assert accountant.steps == 16
    # Merging is bookkeeping only: the bound equals that of one call with all steps.
    one_by_one = GaussianAccountant()
    for _ in range(7):
        one_by_one.step(1.2, 0.02)
    assert one_by_one.get_epsilon(1e-5) == accountant_with("rdp", (1.2, 0.02, 7)).get_epsilon(1e-5)


def test_empty_accountant_is_zero():
    assert GaussianAccountant().get_epsilon(1e-5) == 0.0
    assert GaussianAccountant("pld").get_epsilon(1e-5) == 0.0
    assert GaussianAccountant().steps == 0


def test_dp_event_describes_the_history():
    accountant = accountant_with("rdp", (1.0, 0.01, 100), (2.0, 1.0, 3))
    assert accountant.dp_event == dp_event.ComposedDpEvent(
        [poisson_gaussian(1.0, 0.01, 100), dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(2.0), 3)]
    )


@pytest.mark.parametrize(("name", "grid", "make_reference"), [("rdp", 1e-4, RdpAccountant), ("pld", COARSE_GRID, None)])
def test_mixed_history_composes_like_dp_accounting(name, grid, make_reference):
    noisy, quiet = (2.0, 0.01, 500), (1.0, 0.01, 500)
    delta = 1e-5
    mixed = accountant_with(name, quiet, noisy, grid=grid).get_epsilon(delta)

    reference = make_reference() if make_reference else PLDAccountant(value_discretization_interval=grid)
    reference.compose(dp_event.ComposedDpEvent([poisson_gaussian(*quiet), poisson_gaussian(*noisy)]))
    assert mixed == pytest.approx(reference.get_epsilon(delta), rel=1e-9)

    # Composition costs more than either segment, and less than 1000 steps of the less noisy one.
    assert mixed > accountant_with(name, quiet, grid=grid).get_epsilon(delta)
    assert mixed > accountant_with(name, noisy, grid=grid).get_epsilon(delta)
    assert accountant_with(name, (2.0, 0.01, 1000), grid=grid).get_epsilon(delta) < mixed
    assert mixed < accountant_with(name, (1.0, 0.01, 1000), grid=grid).get_epsilon(delta)
    # The order of the segments does not matter.
    assert accountant_with(name, noisy, quiet, grid=grid).get_epsilon(delta) == pytest.approx(mixed, rel=1e-6)


def test_pld_three_segments_match_dp_accounting():
    # Exercises the cached composition of closed entries, also after the last entry grows.
    segments = [(1.0, 0.01, 300), (1.5, 0.02, 200), (0.9, 1.0, 2), (1.2, 0.01, 100)]
    accountant = accountant_with("pld", *segments[:3], grid=COARSE_GRID)
    accountant.get_epsilon(1e-5)
    accountant.step(*segments[3])
    accountant.get_epsilon(1e-5)
    accountant.step(1.2, 0.01, 50)
    reference = PLDAccountant(value_discretization_interval=COARSE_GRID)
    reference.compose(
        dp_event.ComposedDpEvent(
            [
                poisson_gaussian(1.0, 0.01, 300),
                poisson_gaussian(1.5, 0.02, 200),
                dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(0.9), 2),
                poisson_gaussian(1.2, 0.01, 150),
            ]
        )
    )
    assert accountant.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_epsilon_after_predicts_without_recording(name):
    accountant = accountant_with(name, (1.0, 0.01, 200), grid=COARSE_GRID)
    before = accountant.get_epsilon(1e-5)
    same = accountant.epsilon_after(1.0, 0.01, 50, 1e-5)
    other = accountant.epsilon_after(2.0, 0.02, 50, 1e-5)
    assert accountant.history == (GaussianSteps(1.0, 0.01, 200),)
    assert accountant.get_epsilon(1e-5) == before < same
    accountant.step(1.0, 0.01, 50)
    assert accountant.get_epsilon(1e-5) == same
    assert other == accountant_with(name, (1.0, 0.01, 200), (2.0, 0.02, 50), grid=COARSE_GRID).get_epsilon(1e-5)


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_steps_within_budget_stops_before_the_step_that_exceeds(name):
    accountant = accountant_with(name, (1.0, 0.01, 300), grid=COARSE_GRID)
    target, delta = 2.0, 1e-5
    allowed = accountant.steps_within_budget(1.0, 0.01, target, delta, max_steps=5000)
    assert 0 < allowed < 5000
    assert accountant.epsilon_after(1.0, 0.01, allowed, delta) <= target
    assert accountant.epsilon_after(1.0, 0.01, allowed + 1, delta) > target
    assert accountant.steps == 300  # nothing recorded
    assert accountant.steps_within_budget(1.0, 0.01, target, delta, max_steps=10) == 10
    # Already over a smaller target: no step is allowed.
    assert accountant.get_epsilon(delta) > 0.5
    assert accountant.steps_within_budget(1.0, 0.01, 0.5, delta, max_steps=10) == 0


# --------------------------------------------------------------------------------------------
# checkpoints


def test_state_dict_round_trip_through_weights_only_checkpoint():
    accountant = accountant_with("rdp", (1.0, 0.01, 300), (1.5, 0.04, 20), (1.0, 1.0, 2))
    buffer = io.BytesIO()
    torch.save({"accountant": accountant.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["accountant"]

    restored = GaussianAccountant("rdp")
    restored.load_state_dict(state)
    assert restored.history == accountant.history
    assert restored.steps == accountant.steps == 322
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    # The state is the history only: a resumed run may switch accountants.
    switched = GaussianAccountant("pld", value_discretization_interval=COARSE_GRID)
    switched.load_state_dict(state)
    assert switched.history == accountant.history
    assert switched.get_epsilon(1e-5) < accountant.get_epsilon(1e-5)


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"history": 3},
        {"history": [[1.0, 0.01, 3]]},
        {"history": [{"noise_multiplier": 1.0, "sample_rate": 0.01}]},
        {"history": [{"noise_multiplier": 1.0, "sample_rate": 2.0, "num_steps": 3}]},
    ],
)
def test_load_state_dict_rejects_bad_state(state):
    accountant = accountant_with("rdp", (1.0, 0.01, 5))
    with pytest.raises(ValueError):
        accountant.load_state_dict(state)
    assert accountant.history == (GaussianSteps(1.0, 0.01, 5),)


# --------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: GaussianAccountant("gdp"), "accountant"),
        (lambda: GaussianAccountant("pld", value_discretization_interval=0.0), "value_discretization_interval"),
        (lambda: GaussianAccountant().step(0.0, 0.01), "noise_multiplier"),
        (lambda: GaussianAccountant().step(-1.0, 0.01), "noise_multiplier"),
        (lambda: GaussianAccountant().step(math.nan, 0.01), "noise_multiplier"),
        (lambda: GaussianAccountant().step(math.inf, 0.01), "noise_multiplier"),
        (lambda: GaussianAccountant().step(1.0, 0.0), "sample_rate"),
        (lambda: GaussianAccountant().step(1.0, 1.5), "sample_rate"),
        (lambda: GaussianAccountant().step(1.0, math.nan), "sample_rate"),
        (lambda: GaussianAccountant().step(1.0, True), "sample_rate"),
        (lambda: GaussianAccountant().step(1.0, 0.01, 0), "num_steps"),
        (lambda: GaussianAccountant().step(1.0, 0.01, 2.5), "num_steps"),
        (lambda: GaussianAccountant().get_epsilon(0.0), "delta"),
        (lambda: GaussianAccountant().get_epsilon(1.0), "delta"),
        (lambda: GaussianAccountant().epsilon_after(1.0, 0.01, 0, 1e-5), "num_steps"),
        (lambda: GaussianAccountant().epsilon_after(1.0, 0.01, 1, 2.0), "delta"),
        (lambda: GaussianAccountant().steps_within_budget(1.0, 0.01, 0.0, 1e-5, 10), "target_epsilon"),
        (lambda: GaussianAccountant().steps_within_budget(1.0, 0.01, 1.0, 1e-5, 0), "max_steps"),
        (lambda: calibrate_noise_multiplier(0.0, 1e-5, 0.01, 100), "target_epsilon"),
        (lambda: calibrate_noise_multiplier(math.inf, 1e-5, 0.01, 100), "target_epsilon"),
        (lambda: calibrate_noise_multiplier(1.0, 0.0, 0.01, 100), "delta"),
        (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.0, 100), "sample_rate"),
        (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.01, 0), "steps"),
        (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100, "gdp"), "accountant"),
        (lambda: calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100, relative_tolerance=0.0), "relative_tolerance"),
        (lambda: calibrate_noise_multiplier(1e6, 1e-5, 0.01, 1), "target_epsilon"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()
