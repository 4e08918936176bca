"""DPBloGS in a real Lightning Trainer: step counting, logging, resume, precision, seeds, errors."""

from __future__ import annotations

import csv
import math
import types
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning_helpers import Crash, CrashAtEpoch, TinyClassifier, parameters_vector, quiet_trainer, tiny_loader

from lightning_blogs import DPBloGS, PaperFigureWarning
from lightning_blogs.accounting import UnreachableEpsilonError, compose_epsilon, tensor_epsilon

pytestmark = pytest.mark.filterwarnings("ignore::lightning_blogs.PaperFigureWarning")


class StepRecorder(Callback):
    """Records, after every optimizer step, the global step and the callback's figure."""

    def __init__(self, blogs: DPBloGS) -> None:
        self.blogs = blogs
        self.hook_calls = 0
        self.figures: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.hook_calls += 1

    def on_train_batch_end(self, trainer, *args) -> None:
        self.figures[trainer.global_step] = self.blogs.epsilon


class CountingBloGS(DPBloGS):
    """DPBloGS that counts how often its mechanism really runs."""

    privatized = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        inner = self.session.mechanism.privatize_

        def counted() -> None:
            self.privatized += 1
            inner()

        self.session.mechanism.privatize_ = counted


def test_runs_once_per_optimizer_step_with_accumulation() -> None:
    # 6 batches per epoch, accumulate 3 -> 2 optimizer steps per epoch; 7 batches -> 3 (last partial).
    for n_batches, expected_per_epoch in ((6, 2), (7, 3)):
        cb = CountingBloGS(target_epsilon=50.0, clip_norm=0.1, seed=0)
        trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=3, callbacks=[cb])
        trainer.fit(TinyClassifier(), tiny_loader(n=8 * n_batches))
        assert trainer.global_step == 2 * expected_per_epoch
        assert cb.privatized == trainer.global_step
        assert cb.steps == trainer.global_step
        assert cb.session.plan.steps == trainer.global_step  # planned from estimated_stepping_batches


def test_figure_is_logged_every_step_and_never_as_proven_bound(tmp_path) -> None:
    cb = DPBloGS(target_epsilon=6.0, clip_norm=0.05, seed=1)
    logger = CSVLogger(tmp_path, name="run", version="")
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb], logger=logger, log_every_n_steps=1)
    with pytest.warns(PaperFigureWarning, match="NOT a differential-privacy guarantee"):
        trainer.fit(TinyClassifier(), tiny_loader())
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    key = "privacy/epsilon_blogs_paper"
    logged = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    assert "privacy/epsilon" not in rows[0]
    plan = cb.session.plan
    assert len(logged) == trainer.global_step == 12
    for step, value in logged.items():  # Lightning logs the value of step t at step index t - 1
        assert value == pytest.approx(compose_epsilon(plan.step_epsilon, step + 1, plan.delta), rel=1e-12)
    assert cb.epsilon <= 6.0
    assert "privacy/epsilon_blogs_paper" in trainer.progress_bar_metrics
    hparams = (tmp_path / "run" / "hparams.yaml").read_text()
    assert "privacy/block_size/net.0.weight" in hparams


def test_resumed_run_continues_the_figure(tmp_path) -> None:
    def run(ckpt_path=None, max_epochs=4, dirpath=None):
        cb = DPBloGS(target_epsilon=8.0, clip_norm=0.05, seed=7)
        recorder = StepRecorder(cb)
        callbacks = [cb, recorder]
        if dirpath:
            callbacks.append(ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1))
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=bool(dirpath))
        torch.manual_seed(0)
        module = TinyClassifier()
        trainer.fit(module, tiny_loader(), ckpt_path=ckpt_path)
        return cb, recorder, module

    full_cb, full, full_module = run()

    # An interrupted run: same 4-epoch plan, killed after epoch 2 (a crash, simulated by raising).
    cb = DPBloGS(target_epsilon=8.0, clip_norm=0.05, seed=7)
    trainer = quiet_trainer(
        max_epochs=4,
        callbacks=[cb, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1), CrashAtEpoch(2)],
        enable_checkpointing=True,
    )
    torch.manual_seed(0)
    with pytest.raises(Crash):
        trainer.fit(TinyClassifier(), tiny_loader())
    ckpts = sorted(tmp_path.glob("epoch=1*.ckpt"))
    assert ckpts, list(tmp_path.iterdir())
    assert cb.steps == 12

    resumed_cb, resumed, resumed_module = run(ckpt_path=str(ckpts[0]))
    assert resumed_cb.steps == full_cb.steps == 24
    assert min(resumed.figures) == 13  # the first step after the resume is step 13, not step 1
    for step, figure in resumed.figures.items():
        assert figure == full.figures[step]
    assert resumed_cb.epsilon == full_cb.epsilon
    # A user seed saves the generators, so the resumed run is bit-identical to the uninterrupted one.
    assert torch.equal(parameters_vector(resumed_module), parameters_vector(full_module))


def test_bf16_mixed_on_cpu() -> None:
    cb = DPBloGS(target_epsilon=8.0, clip_norm=0.05)
    trainer = quiet_trainer(max_epochs=1, precision="bf16-mixed", callbacks=[cb])
    module = TinyClassifier()
    before = parameters_vector(module)
    trainer.fit(module, tiny_loader())
    assert cb.steps == trainer.global_step == 6
    after = parameters_vector(module)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def _train_once(seed, clip_norm=0.5) -> torch.Tensor:
    torch.manual_seed(0)
    module = TinyClassifier()
    cb = DPBloGS(target_epsilon=1e6, clip_norm=clip_norm, block_size=1, seed=seed)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(module, tiny_loader())
    return parameters_vector(module)


def test_fixed_seed_is_bit_identical_and_entropy_differs() -> None:
    assert torch.equal(_train_once(seed=123), _train_once(seed=123))
    assert not torch.equal(_train_once(seed=123), _train_once(seed=124))
    assert not torch.equal(_train_once(seed=None), _train_once(seed=None))


def test_unreachable_target_fails_before_training_with_smallest_figure() -> None:
    module = TinyClassifier()
    before = parameters_vector(module)
    cb = DPBloGS(target_epsilon=0.5, clip_norm=1.0)
    trainer = quiet_trainer(max_epochs=10, callbacks=[cb])
    with pytest.raises(UnreachableEpsilonError, match="smallest reachable figure") as info:
        trainer.fit(module, tiny_loader())
    sizes = [p.numel() for p in module.parameters()]
    smallest = compose_epsilon(float(sum(tensor_epsilon(d, 1, 1.0) for d in sizes)), 60, 1e-5)
    assert info.value.smallest_epsilon == pytest.approx(smallest, rel=1e-12)
    assert f"{smallest:.6g}" in str(info.value) and "clip_norm" in str(info.value)
    assert torch.equal(before, parameters_vector(module))  # no step was taken


@pytest.mark.parametrize("action", ["stop", "warn", "raise"])
def test_budget_exceeded_actions(action) -> None:
    cb = DPBloGS(target_epsilon=50.0, clip_norm=0.1, total_steps=4, on_budget_exceeded=action)
    trainer = quiet_trainer(max_epochs=2, callbacks=[cb])  # 12 steps would run
    if action == "stop":
        trainer.fit(TinyClassifier(), tiny_loader())
        assert trainer.global_step == cb.steps == 4
        assert cb.epsilon <= 50.0
    elif action == "warn":
        with pytest.warns(UserWarning, match="goes past it"):
            trainer.fit(TinyClassifier(), tiny_loader())
        assert cb.steps == 12 and cb.epsilon > cb.session.plan.epsilon
    else:
        with pytest.raises(RuntimeError, match="step 5 goes past it"):
            trainer.fit(TinyClassifier(), tiny_loader())
        assert cb.steps == 4


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"target_epsilon": 0}, "target_epsilon"),
        ({"target_epsilon": -1}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"target_epsilon": 1, "delta": 0}, "delta"),
        ({"target_epsilon": 1, "delta": 1}, "delta"),
        ({"target_epsilon": 1, "clip_norm": 0}, "clip_norm"),
        ({"target_epsilon": 1, "block_size": 0}, "block_size"),
        ({"target_epsilon": 1, "seed": -1}, "seed"),
        ({"target_epsilon": 1, "seed": 2**64}, "seed"),
        ({"target_epsilon": 1, "total_steps": 0}, "total_steps"),
        ({"target_epsilon": 1, "on_budget_exceeded": "ignore"}, "on_budget_exceeded"),
        ({"target_epsilon": None}, "target_epsilon"),
    ],
)
def test_constructor_names_bad_arguments(kwargs, argument) -> None:
    with pytest.raises(ValueError, match=argument):
        DPBloGS(**kwargs)


def test_refuses_sharded_strategies_and_manual_optimization() -> None:
    cb = DPBloGS(target_epsilon=1.0)
    for strategy_cls in (FSDPStrategy, DeepSpeedStrategy):
        trainer = types.SimpleNamespace(strategy=object.__new__(strategy_cls), gradient_clip_val=None)
        with pytest.raises(ValueError, match="does not support strategy"):
            cb.setup(trainer, TinyClassifier(), "fit")

    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        quiet_trainer(max_epochs=1, callbacks=[cb]).fit(Manual(), tiny_loader())


def test_warns_about_gradient_clip_val() -> None:
    cb = DPBloGS(target_epsilon=50.0, clip_norm=0.1)
    trainer = quiet_trainer(max_epochs=1, gradient_clip_val=1.0, callbacks=[cb])
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        trainer.fit(TinyClassifier(), tiny_loader())


def test_infinite_training_needs_total_steps() -> None:
    cb = DPBloGS(target_epsilon=10.0, clip_norm=0.1)
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1, callbacks=[cb])
    with pytest.raises(ValueError, match="total_steps"):
        trainer.fit(TinyClassifier(), tiny_loader())


def test_block_size_override_mapping() -> None:
    cb = DPBloGS(target_epsilon=20.0, clip_norm=0.05, block_size={"net.0.*": 5}, seed=0)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(TinyClassifier(), tiny_loader())
    sizes = cb.block_sizes
    assert sizes["net.0.weight"] == 5 and sizes["net.0.bias"] == 5
    assert set(sizes) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert cb.session.plan.epsilon <= 20.0


def test_a_second_fit_continues_the_count() -> None:
    module = TinyClassifier()
    cb = DPBloGS(target_epsilon=20.0, clip_norm=0.05, total_steps=12, on_budget_exceeded="warn")
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(module, tiny_loader())
    first = cb.epsilon
    assert cb.steps == 6
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(module, tiny_loader())
    assert cb.steps == 12 and cb.epsilon > first
    assert cb.epsilon == pytest.approx(cb.session.plan.epsilon, rel=1e-12)
