"""DP-BloGS formal mode: per-tensor clip + Gaussian noise + shuffle, with a real accountant."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_helpers import Crash, CrashAtEpoch, TinyClassifier, quiet_trainer, tiny_loader
from scipy import stats

from lightning_blogs import DPBloGS
from lightning_blogs.accounting import GaussianAccountant
from lightning_blogs.callbacks.formal import NotPoissonSampledWarning
from lightning_blogs.mechanism.blogs import BlockShuffleMechanism, sensitivity
from lightning_blogs.sampling import poisson_dataloader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _poisson_loader(seed: int = 0):
    return poisson_dataloader(tiny_loader(n=48, batch_size=8), seed=seed)  # q = 8 / 48


def _logged(path, key):
    rows = list(csv.DictReader(open(path)))
    return [float(r[key]) for r in rows if r.get(key)], rows[0].keys()


def test_noise_has_the_stated_standard_deviation() -> None:
    params = [torch.nn.Parameter(torch.zeros(300, 40)), torch.nn.Parameter(torch.zeros(77))]
    for p in params:
        p.grad = torch.zeros_like(p)
    clip_norm, sigma = 0.5, 1.3
    std = sigma * sensitivity(clip_norm, len(params))
    assert std == pytest.approx(sigma * 2 * (2 * clip_norm**2) ** 0.5)
    BlockShuffleMechanism(params, [1, 7], clip_norm, seed=5, noise_std=std).privatize_()
    draws = torch.cat([p.grad.reshape(-1) for p in params]).double()
    n = draws.numel()
    # Mean 0 and variance std^2: the sample variance follows std^2 chi2(n) / n.
    assert abs(draws.mean().item()) < 5 * std / n**0.5
    statistic = (draws**2).sum().item() / std**2
    assert stats.chi2.sf(statistic, n) > 1e-3 and stats.chi2.cdf(statistic, n) > 1e-3
    assert stats.kstest((draws / std).numpy(), "norm").pvalue > 1e-3


def test_formal_mode_logs_the_accountants_epsilon_and_stops_within_budget(tmp_path) -> None:
    sigma, target, delta = 2.0, 3.0, 1e-5
    cb = DPBloGS(target_epsilon=target, delta=delta, clip_norm=0.1, noise_multiplier=sigma, seed=1)
    logger = CSVLogger(tmp_path, name="run", version="")
    trainer = quiet_trainer(max_epochs=30, callbacks=[cb], logger=logger, log_every_n_steps=1)
    trainer.fit(TinyClassifier(), _poisson_loader())
    q = 8 / 48
    reference = GaussianAccountant("rdp")
    allowed = reference.steps_within_budget(sigma, q, target, delta, 30 * 6)
    assert allowed < 30 * 6  # the budget, not max_epochs, ended training
    assert trainer.global_step == cb.steps == allowed
    reference.step(sigma, q, allowed)
    assert cb.epsilon == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    assert cb.epsilon <= target < reference.epsilon_after(sigma, q, 1, delta)  # one more step would exceed
    epsilons, columns = _logged(tmp_path / "run" / "metrics.csv", "privacy/epsilon")
    assert len(epsilons) == allowed and epsilons[-1] == pytest.approx(cb.epsilon, rel=1e-6)  # logged as float32
    assert "privacy/epsilon_blogs_paper" not in columns and "privacy/delta" in columns


def test_target_calibrates_the_noise() -> None:
    cb = DPBloGS(target_epsilon=4.0, clip_norm=0.1, guarantee="formal")
    trainer = quiet_trainer(max_epochs=3, callbacks=[cb])
    trainer.fit(TinyClassifier(), _poisson_loader())
    assert trainer.global_step == cb.steps == 18
    assert cb.epsilon <= 4.0
    assert cb.epsilon > 3.9  # calibrated to the target, not far below it
    assert cb.block_sizes == {n: 1 for n in cb.block_sizes}


def test_without_poisson_sampling_no_proven_epsilon_is_logged(tmp_path) -> None:
    cb = DPBloGS(clip_norm=0.1, noise_multiplier=1.0, target_epsilon=None)
    logger = CSVLogger(tmp_path, name="run", version="")
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb], logger=logger, log_every_n_steps=1)
    with pytest.warns(NotPoissonSampledWarning, match="NOT a proven bound"):
        trainer.fit(TinyClassifier(), tiny_loader())
    unproven, columns = _logged(tmp_path / "run" / "metrics.csv", "privacy/epsilon_if_poisson_sampled")
    assert "privacy/epsilon" not in columns and len(unproven) == 6


def test_resume_continues_the_proven_epsilon(tmp_path) -> None:
    def make():
        return DPBloGS(target_epsilon=50.0, clip_norm=0.1, noise_multiplier=1.0, seed=3, guarantee="formal")

    full = make()
    quiet_trainer(max_epochs=4, callbacks=[full]).fit(TinyClassifier(), _poisson_loader())

    first = make()
    trainer = quiet_trainer(
        max_epochs=4,
        callbacks=[first, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1), CrashAtEpoch(2)],
        enable_checkpointing=True,
    )
    with pytest.raises(Crash):
        trainer.fit(TinyClassifier(), _poisson_loader())
    (ckpt,) = sorted(tmp_path.glob("epoch=1*.ckpt"))
    resumed = make()
    quiet_trainer(max_epochs=4, callbacks=[resumed]).fit(TinyClassifier(), _poisson_loader(), ckpt_path=str(ckpt))
    assert resumed.steps == full.steps == 24
    assert resumed.formal.accountant.history == full.formal.accountant.history
    assert resumed.epsilon == full.epsilon


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"target_epsilon": 1.0, "noise_multiplier": 0}, "noise_multiplier"),
        ({"target_epsilon": 1.0, "noise_multiplier": 1.0, "guarantee": "paper"}, "noise_multiplier"),
        ({"target_epsilon": None, "guarantee": "formal"}, "guarantee='formal'"),
        ({"target_epsilon": 1.0, "guarantee": "proven"}, "guarantee"),
        ({"target_epsilon": 1.0, "guarantee": "formal", "accountant": "gdp"}, "accountant"),
    ],
)
def test_formal_arguments_are_checked(kwargs, argument) -> None:
    with pytest.raises(ValueError, match=argument):
        DPBloGS(**kwargs)


def test_resume_with_a_new_noise_multiplier_composes_both(tmp_path) -> None:
    first = DPBloGS(target_epsilon=None, clip_norm=0.1, noise_multiplier=1.0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True)
    trainer.fit(TinyClassifier(), _poisson_loader())
    second = DPBloGS(target_epsilon=None, clip_norm=0.1, noise_multiplier=3.0)
    quiet_trainer(max_epochs=2, callbacks=[second]).fit(
        TinyClassifier(), _poisson_loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    q = 8 / 48
    assert [tuple(h) for h in second.formal.accountant.history] == [(1.0, q, 6), (3.0, q, 6)]
    assert second.session.mechanism.noise_std == pytest.approx(3.0 * sensitivity(0.1, 4))
