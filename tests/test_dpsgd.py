"""DP-SGD: the mechanism's arithmetic, the callback in a real Trainer, DDP, AMP, DP-compatible models."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning_helpers import TinyClassifier, parameters_vector, quiet_trainer, tiny_loader
from opacus.validators import ModuleValidator
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_blogs import DPSGD
from lightning_blogs.mechanism.dpsgd import clip_and_accumulate_per_sample_
from lightning_blogs.mechanism.randomness import RandomSource
from lightning_blogs.models import ImageClassifier, make_dp_compatible, resnet18
from lightning_blogs.models.dp_compat import DPGroupNorm

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:DPSGD\\(noise_multiplier=0\\):UserWarning"),
]


class GradRecorder(Callback):
    """Copies every parameter's ``.grad`` as the optimizer will see it (after DPSGD, listed first)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(torch.cat([p.grad.reshape(-1).clone() for p in pl_module.parameters()]))


def _first_step_grad(loader: DataLoader, module: TinyClassifier | None = None, **kwargs) -> tuple[torch.Tensor, DPSGD]:
    """The gradient DPSGD writes at the first optimizer step (trainer kwargs split off by name)."""
    trainer_kwargs = {k: kwargs.pop(k) for k in ("accumulate_grad_batches", "precision", "plugins") if k in kwargs}
    torch.manual_seed(0)
    module = module or TinyClassifier()
    dpsgd, recorder = DPSGD(**kwargs), GradRecorder()
    quiet_trainer(max_steps=1, callbacks=[dpsgd, recorder], **trainer_kwargs).fit(module, loader)
    return recorder.grads[0], dpsgd


def _per_example_reference(x: torch.Tensor, y: torch.Tensor, clip_norm: float | None, batch_size: float):
    """sum_i clip(grad of example i alone) / batch_size, by an explicit loop (clip_norm None: norms only)."""
    torch.manual_seed(0)
    module = TinyClassifier()
    total, norms = 0.0, []
    for xi, yi in zip(x, y, strict=True):
        module.zero_grad()
        torch.nn.functional.cross_entropy(module.net(xi[None]), yi[None]).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
        norms.append(grad.norm().item())
        if clip_norm is not None:
            total = total + grad * min(1.0, clip_norm / (grad.norm().item() + 1e-6))
    return total / batch_size if clip_norm is not None else np.array(norms)


# ------------------------------------------------------------------------------ (a), (b): sums
def test_per_sample_clipping_matches_an_explicit_per_example_loop() -> None:
    x, y = tiny_loader().dataset.tensors
    x, y = x[:8], y[:8]
    clip_norm = float(np.median(_per_example_reference(x, y, None, 1)))  # half the examples get clipped
    expected = _per_example_reference(x, y, clip_norm, batch_size=10)
    grad, dpsgd = _first_step_grad(tiny_loader(), noise_multiplier=0.0, clip_norm=clip_norm, expected_batch_size=10)
    assert dpsgd.expected_batch_size == 10  # the public number, not the 8 examples of the batch
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0)


def test_accumulated_micro_batches_equal_one_large_batch() -> None:
    # 3 micro-batches of 4 with the derived expected batch size 4 * 3 = 12, vs one batch of 12.
    accumulated, dpsgd = _first_step_grad(
        tiny_loader(n=12, batch_size=4), accumulate_grad_batches=3, noise_multiplier=0.0, clip_norm=0.3
    )
    assert dpsgd.expected_batch_size == 12 and dpsgd.sample_rate is None
    large, _ = _first_step_grad(
        tiny_loader(n=12, batch_size=12), noise_multiplier=0.0, clip_norm=0.3, expected_batch_size=12
    )
    assert accumulated.abs().max() > 1e-2
    torch.testing.assert_close(accumulated, large, atol=1e-5, rtol=0)


def test_clip_and_accumulate_folds_in_the_unscale_factor() -> None:
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # true per-sample gradients, norms 5 and 0.5
    out = torch.zeros(2)
    clip_and_accumulate_per_sample_([g * 64], [out], clip_norm=1.0, unscale=torch.tensor(1 / 64))
    torch.testing.assert_close(out, torch.tensor([0.6, 0.8]) * 5 / (5 + 1e-6) + torch.tensor([0.3, 0.4]))


# --------------------------------------------------------------------------------- (c): noise
class ZeroLossModule(TinyClassifier):
    """A 10 -> 2000 linear layer whose loss is 0 times its output: data gradients are exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(10, 2000)

    def training_step(self, batch, batch_idx):
        return 0.0 * self.net(batch[0]).sum()


def test_noise_has_std_sigma_c_over_expected_batch_size() -> None:
    sigma, clip_norm, batch_size = 1.3, 0.7, 5
    grad, _ = _first_step_grad(
        tiny_loader(), ZeroLossModule(), noise_multiplier=sigma, clip_norm=clip_norm, expected_batch_size=batch_size
    )
    std = sigma * clip_norm / batch_size
    z = (grad / std).double().numpy()
    n = z.size  # 22000 coordinates
    # sum z^2 ~ chi2(n) exactly when the std is right; noise added twice would be ~2n.
    assert stats.chi2.ppf(1e-4, n) < (z**2).sum() < stats.chi2.isf(1e-4, n)
    assert abs(z.mean()) < 4 / np.sqrt(n)
    assert stats.kstest(z, "norm").pvalue > 1e-4


def test_noise_seed_keeps_64_bits_and_entropy_differs() -> None:
    draw = lambda seed: RandomSource(seed).standard_normal(1000, torch.float32)  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(7 + 2**40))  # torch's CPU generator would ignore the high bits
    grads = [
        _first_step_grad(tiny_loader(), ZeroLossModule(), noise_multiplier=1.0, clip_norm=1.0, seed=seed)[0]
        for seed in (3, 3, None, None)
    ]
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[2], grads[3])


# ---------------------------------------------------------------------------------- (d): AMP
def test_bf16_mixed_on_cpu() -> None:
    reference, _ = _first_step_grad(tiny_loader(), noise_multiplier=0.0, clip_norm=0.5)
    bf16, _ = _first_step_grad(tiny_loader(), noise_multiplier=0.0, clip_norm=0.5, precision="bf16-mixed")
    torch.testing.assert_close(bf16, reference, atol=0.02 * reference.abs().max().item(), rtol=0)

    dpsgd = DPSGD(noise_multiplier=1.0, clip_norm=0.5)
    module = TinyClassifier()
    before = parameters_vector(module)
    quiet_trainer(max_epochs=1, precision="bf16-mixed", callbacks=[dpsgd]).fit(module, tiny_loader())
    after = parameters_vector(module)
    assert dpsgd.steps == 6 and torch.isfinite(after).all() and not torch.equal(before, after)


def _fp16_plugin(init_scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_16_mixed_unscales_per_sample_gradients() -> None:
    reference, _ = _first_step_grad(tiny_loader(), noise_multiplier=0.0, clip_norm=0.5)
    fp16, _ = _first_step_grad(tiny_loader(), noise_multiplier=0.0, clip_norm=0.5, plugins=[_fp16_plugin(2.0**10)])
    torch.testing.assert_close(fp16, reference, atol=1e-3 * reference.abs().max().item(), rtol=0)


class CancellingModule(TinyClassifier):
    """Loss mean_i w . x_i on examples x and -x: the batch gradient is 0, per-sample ones are +-x."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(10, 1, bias=False)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).mean()


def test_16_mixed_per_sample_overflow_skips_the_step() -> None:
    # fp16 per-sample gradients 1024 * 100 overflow although the batch gradient (0) does not: the
    # GradScaler alone would step on inf/nan; DPSGD folds the overflow into its decision.
    x = torch.full((1, 10), 100.0)
    loader = DataLoader(TensorDataset(torch.cat([x, -x]), torch.zeros(2, dtype=torch.long)), batch_size=2)
    module = CancellingModule()
    before = parameters_vector(module)
    trainer = quiet_trainer(max_steps=1, plugins=[_fp16_plugin(2.0**10)], callbacks=[DPSGD(1.0, clip_norm=1.0)])
    trainer.fit(module, loader)
    assert torch.equal(parameters_vector(module), before)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**9


# ---------------------------------------------------------------------------------- (e): DDP
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_replicas_identical_and_noise_added_once(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_dpsgd_train.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=script.parent,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 4  # 64 examples / 2 ranks / batch 8
    assert rank0["expected_batch_size"] == 16  # 8 per rank * 2 ranks
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(rank0["probe_grads"], rank1["probe_grads"])
    # One draw of N(0, (sigma C)^2) divided by the global batch: chi2(n) for the sum of squares.
    # Each rank adding its own draw would double the variance (or quadruple it, for the same draw).
    z = (rank0["probe_grads"] / (1.0 * 0.5 / 16)).double().numpy()
    assert stats.chi2.ppf(1e-4, z.size) < (z**2).sum() < stats.chi2.isf(1e-4, z.size)
    # Without noise, the step is the clipped per-example sum over BOTH ranks' examples, over 16: a
    # sum over ranks (not a mean), nothing lost on the way.
    x, y = (torch.cat(pair) for pair in zip(rank0["noiseless_batch"], rank1["noiseless_batch"], strict=True))
    expected = _per_example_reference(x, y, clip_norm=0.5, batch_size=16)
    torch.testing.assert_close(rank0["noiseless_grad"], expected, atol=1e-5, rtol=0)
    assert torch.equal(rank0["noiseless_grad"], rank1["noiseless_grad"])


# ------------------------------------------------------------------------ (f): DP-compatible models
@pytest.mark.parametrize(
    "factory",
    [lambda: resnet18(in_channels=1, image_size=8, num_classes=10), torchvision.models.resnet18],
    ids=["ours", "torchvision"],
)
def test_make_dp_compatible_resnet18(factory) -> None:
    model = factory()
    compatible, changes = make_dp_compatible(model)
    assert ModuleValidator.validate(model, strict=False)  # the original keeps its BatchNorms
    assert ModuleValidator.validate(compatible, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in compatible.modules())
    assert not any(getattr(m, "inplace", False) for m in compatible.modules())
    assert len(changes) == 20 + 9  # 20 BatchNorms; the stem's ReLU and one per block (shared in a block)
    assert "layer1.0.bn1: BatchNorm2d(64) -> GroupNorm(32, 64)" in changes
    assert "layer4.1.relu: ReLU(inplace=True) -> ReLU()" in changes
    assert compatible.layer2[0].downsample[1].group_norm.num_groups == 32


def test_make_dp_compatible_group_count_and_no_change() -> None:
    model, changes = make_dp_compatible(torch.nn.Sequential(torch.nn.Conv2d(3, 48, 3), torch.nn.BatchNorm2d(48)))
    assert changes == ["1: BatchNorm2d(48) -> GroupNorm(16, 48)"]  # gcd(32, 48)
    x = torch.randn(2, 48, 5, 5)
    norm = model[1]
    assert isinstance(norm, DPGroupNorm)
    torch.testing.assert_close(
        norm(x), torch.nn.functional.group_norm(x, 16, norm.group_norm.weight, norm.group_norm.bias)
    )
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    assert make_dp_compatible(plain)[1] == []
    with pytest.raises(ValueError, match="still has layers"):
        make_dp_compatible(torch.nn.LSTM(3, 3))


def test_resnet18_trains_with_dpsgd_on_digits_shaped_inputs() -> None:
    net, _ = make_dp_compatible(resnet18(in_channels=1, image_size=8, num_classes=10))
    module = ImageClassifier(net)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    dpsgd = DPSGD(noise_multiplier=1.0, clip_norm=1.0)
    before = parameters_vector(module)
    quiet_trainer(max_steps=2, callbacks=[dpsgd]).fit(module, DataLoader(data, batch_size=4))
    after = parameters_vector(module)
    assert dpsgd.steps == 2 and dpsgd.expected_batch_size == 4
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert not any(hasattr(p, "grad_sample") for p in module.parameters())  # hooks and attributes removed


def test_refuses_batchnorm_and_parameters_outside_submodules() -> None:
    with_bn = ImageClassifier(resnet18(in_channels=1, image_size=8, num_classes=10))
    with pytest.raises(ValueError, match="make_dp_compatible"):
        quiet_trainer(max_steps=1, callbacks=[DPSGD(1.0, 1.0)]).fit(with_bn, tiny_loader())

    class Direct(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.temperature = torch.nn.Parameter(torch.ones(()))

    with pytest.raises(ValueError, match="temperature"):
        quiet_trainer(max_steps=1, callbacks=[DPSGD(1.0, 1.0)]).fit(Direct(), tiny_loader())


# ------------------------------------------------------------------------------- (g): arguments
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier"),
        ({"noise_multiplier": True}, "noise_multiplier"),
        ({"noise_multiplier": "1"}, "noise_multiplier"),
        ({"clip_norm": 0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"expected_batch_size": -4}, "expected_batch_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"loss_reduction": "none"}, "loss_reduction"),
    ],
)
def test_constructor_names_bad_arguments(kwargs, argument) -> None:
    with pytest.raises(ValueError, match=argument):
        DPSGD(**{"noise_multiplier": 1.0, "clip_norm": 1.0, **kwargs})


def test_refuses_sharded_strategies_manual_optimization_and_missing_opacus(monkeypatch) -> None:
    dpsgd = DPSGD(1.0, 1.0)
    for strategy_cls in (FSDPStrategy, DeepSpeedStrategy):
        trainer = types.SimpleNamespace(strategy=object.__new__(strategy_cls), gradient_clip_val=None)
        with pytest.raises(ValueError, match="does not support strategy"):
            dpsgd.setup(trainer, TinyClassifier(), "fit")
    manual = TinyClassifier()
    manual.automatic_optimization = False
    trainer = types.SimpleNamespace(strategy=object(), gradient_clip_val=None)
    with pytest.raises(ValueError, match="automatic optimization"):
        dpsgd.setup(trainer, manual, "fit")
    monkeypatch.setitem(sys.modules, "opacus", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'lightning-blogs\[dpsgd\]'"):
        dpsgd.setup(trainer, TinyClassifier(), "fit")


def test_poisson_loader_sample_rate_and_accumulation() -> None:
    loader = tiny_loader(n=48)
    loader.sample_rate = 0.25  # what a Poisson-sampled loader declares
    _, dpsgd = _first_step_grad(loader, noise_multiplier=1.0, clip_norm=1.0)
    assert dpsgd.sample_rate == 0.25 and dpsgd.expected_batch_size == 12  # 0.25 * 48, not the loader's 8
    with pytest.raises(ValueError, match="expected_batch_size must be given"):
        _first_step_grad(loader, accumulate_grad_batches=2, noise_multiplier=1.0, clip_norm=1.0)


# ----------------------------------------------------------------------------- (h): empty batch
def _empty_then_full_loader() -> DataLoader:
    dataset = tiny_loader().dataset

    def collate(examples):  # an empty Poisson batch: zero-length tensors of the right shape
        return default_collate(examples) if examples else tuple(t[:0] for t in dataset.tensors)

    return DataLoader(dataset, batch_sampler=[[], list(range(8))], collate_fn=collate)


def test_empty_batch_is_a_step_of_pure_noise() -> None:
    seed, sigma, clip_norm, batch_size = 11, 1.0, 0.5, 8
    dpsgd, recorder = DPSGD(sigma, clip_norm, expected_batch_size=batch_size, seed=seed), GradRecorder()
    quiet_trainer(max_epochs=1, callbacks=[dpsgd, recorder]).fit(TinyClassifier(), _empty_then_full_loader())
    assert dpsgd.steps == 2
    noise = RandomSource(seed)
    expected = torch.cat([noise.standard_normal(p.numel(), torch.float32) for p in TinyClassifier().parameters()])
    torch.testing.assert_close(recorder.grads[0], expected * sigma * clip_norm / batch_size, atol=0, rtol=0)


# ------------------------------------------------------------------------------- checkpoints
def test_resume_continues_steps_and_seeded_noise(tmp_path: Path) -> None:
    def fit(max_epochs: int, ckpt_path: str | None = None) -> tuple[DPSGD, torch.Tensor]:
        dpsgd = DPSGD(1.0, 0.5, seed=5)
        torch.manual_seed(0)
        module = TinyClassifier()
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[dpsgd])
        trainer.fit(module, tiny_loader(), ckpt_path=ckpt_path)
        if ckpt_path is None and max_epochs == 1:
            trainer.save_checkpoint(tmp_path / "one.ckpt")
        return dpsgd, parameters_vector(module)

    full, full_params = fit(2)
    fit(1)
    resumed, resumed_params = fit(2, ckpt_path=str(tmp_path / "one.ckpt"))
    assert full.steps == resumed.steps == 12
    assert torch.equal(full_params, resumed_params)  # a user seed resumes its noise stream exactly
    assert set(DPSGD(1.0, 1.0).state_dict()) == {"steps"}  # an OS-entropy state never reaches a checkpoint


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dpsgd_budget_stop_leaves_epsilon_within_target_and_logs_it(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning_helpers import TinyClassifier, quiet_trainer, tiny_loader

    from lightning_blogs.accounting import GaussianAccountant
    from lightning_blogs.sampling import poisson_dataloader

    sigma, target, delta, q = 2.0, 3.0, 1e-5, 8 / 48
    cb = DPSGD(noise_multiplier=sigma, clip_norm=1.0, target_epsilon=target, delta=delta, seed=4)
    logger = CSVLogger(tmp_path, name="run", version="")
    trainer = quiet_trainer(max_epochs=30, callbacks=[cb], logger=logger, log_every_n_steps=1)
    trainer.fit(TinyClassifier(), poisson_dataloader(tiny_loader(n=48, batch_size=8), seed=0))
    allowed = GaussianAccountant("rdp").steps_within_budget(sigma, q, target, delta, 30 * 6)
    assert trainer.global_step == cb.steps == allowed < 30 * 6
    assert cb.epsilon <= target
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    logged = [float(r["privacy/epsilon"]) for r in rows if r.get("privacy/epsilon")]
    assert len(logged) == allowed and logged[-1] == pytest.approx(cb.epsilon, rel=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dpsgd_calibrates_noise_to_the_target() -> None:
    from lightning_helpers import TinyClassifier, quiet_trainer, tiny_loader

    from lightning_blogs.sampling import poisson_dataloader

    cb = DPSGD(noise_multiplier=None, clip_norm=1.0, target_epsilon=4.0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[cb])
    trainer.fit(TinyClassifier(), poisson_dataloader(tiny_loader(n=48, batch_size=8), seed=0))
    assert trainer.global_step == cb.steps == 18
    assert 3.9 < cb.epsilon <= 4.0
    assert cb.noise_multiplier > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dpsgd_resumed_with_a_new_noise_multiplier_composes_both(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_helpers import TinyClassifier, quiet_trainer, tiny_loader

    from lightning_blogs.accounting import GaussianAccountant
    from lightning_blogs.sampling import poisson_dataloader

    def loader():
        return poisson_dataloader(tiny_loader(n=48, batch_size=8), seed=0)

    first = DPSGD(noise_multiplier=1.0, clip_norm=1.0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        TinyClassifier(), loader()
    )
    second = DPSGD(noise_multiplier=2.0, clip_norm=1.0)
    trainer = quiet_trainer(max_epochs=2, callbacks=[second])
    trainer.fit(TinyClassifier(), loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    q = 8 / 48
    assert [tuple(h) for h in second.formal.accountant.history] == [(1.0, q, 6), (2.0, q, 6)]
    reference = GaussianAccountant("rdp")
    reference.step(1.0, q, 6)
    reference.step(2.0, q, 6)
    assert second.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert first.epsilon < second.epsilon
