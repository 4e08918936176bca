"""BloGSPrivacyEngine: the callback's core in a plain PyTorch loop, and the two examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning_helpers import TinyClassifier, parameters_vector, quiet_trainer, tiny_loader

from lightning_blogs import BloGSPrivacyEngine, DPBloGS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.filterwarnings("ignore::lightning_blogs.PaperFigureWarning")


def _engine_for(module: TinyClassifier, steps: int, **kwargs) -> BloGSPrivacyEngine:
    optimizer = torch.optim.SGD(module.parameters(), lr=module.lr, momentum=0.9)
    kwargs = {"target_epsilon": 8.0, "delta": 1e-5, "clip_value": 0.05, "seed": 11, **kwargs}
    return BloGSPrivacyEngine(optimizer=optimizer, model=module, steps=steps, batch_size=8, **kwargs)


def _plain_loop(engine: BloGSPrivacyEngine, module: TinyClassifier, epochs: int) -> list[tuple[float, float]]:
    spent = []
    for _ in range(epochs):
        for x, y in tiny_loader():
            engine.zero_grad()
            torch.nn.functional.cross_entropy(module.net(x), y).backward()
            spent.append(engine.step())
    return spent


def test_engine_equals_callback_bit_for_bit() -> None:
    torch.manual_seed(0)
    lightning_module = TinyClassifier()
    cb = DPBloGS(target_epsilon=8.0, delta=1e-5, clip_norm=0.05, seed=11)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(lightning_module, tiny_loader())

    torch.manual_seed(0)
    plain_module = TinyClassifier()
    engine = _engine_for(plain_module, steps=12)
    spent = _plain_loop(engine, plain_module, epochs=2)

    assert engine.block_sizes == cb.block_sizes
    assert spent[-1] == engine.get_privacy_spent() == (cb.epsilon, 1e-5)
    assert [e for e, _ in spent] == sorted(e for e, _ in spent)  # the figure only grows
    assert torch.equal(parameters_vector(plain_module), parameters_vector(lightning_module))


def test_engine_budget_and_resume() -> None:
    torch.manual_seed(0)
    module = TinyClassifier()
    engine = _engine_for(module, steps=6)
    _plain_loop(engine, module, epochs=1)
    with pytest.raises(RuntimeError, match="step 7 takes the paper figure past target_epsilon"):
        _plain_loop(engine, module, epochs=1)

    state = engine.state_dict()
    torch.manual_seed(0)
    resumed = _engine_for(TinyClassifier(), steps=100)  # a different plan: the checkpoint's wins
    resumed.load_state_dict(state)
    assert resumed.session.steps == 6
    assert resumed.get_privacy_spent() == engine.get_privacy_spent()
    assert resumed.block_sizes == engine.block_sizes

    warn_engine = _engine_for(module, steps=3, on_budget_exceeded="warn")
    with pytest.warns(UserWarning, match="past target_epsilon"):
        spent = _plain_loop(warn_engine, module, epochs=1)
    assert spent[-1][0] > warn_engine.session.plan.epsilon


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"batch_size": 0}, "batch_size"), ({"target_epsilon": 0}, "target_epsilon"), ({"clip_value": -1}, "clip_norm")],
)
def test_engine_names_bad_arguments(kwargs, argument) -> None:
    module = TinyClassifier()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    args = {"target_epsilon": 1.0, "delta": 1e-5, "clip_value": 0.1, "steps": 10, "batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=argument):
        BloGSPrivacyEngine(optimizer=optimizer, model=module, **args)


def test_engine_requires_every_trainable_parameter_in_the_optimizer() -> None:
    module = TinyClassifier()
    optimizer = torch.optim.SGD(module.net[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        BloGSPrivacyEngine(optimizer, module, 1.0, 1e-5, 0.1, 10, 8)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_example_reproduces_the_quick_start_on_digits(tmp_path) -> None:
    args = ["--data-dir", str(tmp_path), "--max-steps", "2", "--seed", "5"]  # no MNIST there: digits
    quick_start = _load_example("mnist_resnet18").main(args)
    plain = _load_example("plain_pytorch").main(args)
    assert quick_start["steps"] == plain["steps"] == 2
    # The Lightning module holds the network as `net`; the plain loop trains the network itself.
    assert {k.removeprefix("net."): v for k, v in quick_start["block_sizes"].items()} == plain["block_sizes"]
    assert len(plain["block_sizes"]) == 62  # every trainable tensor of ResNet18
    assert quick_start["epsilon_blogs_paper"] == pytest.approx(plain["epsilon_blogs_paper"], rel=1e-12)
    assert 0 <= plain["test_acc"] <= 1
