"""Tests of the networks and of ImageClassifier (including a short real training run)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning_helpers import quiet_trainer
from torch import nn

from lightning_blogs.data import DigitsDataModule
from lightning_blogs.models import MLP, ImageClassifier, SmallCNN, default_optimizer, resnet18

FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": resnet18,
}
SHAPES = [(1, 8), (1, 28), (3, 32)]  # (channels, image size): digits, MNIST, CIFAR-10


_trainer = quiet_trainer


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread (and don't fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# networks


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_forward_shape_and_gradients(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    net = FACTORIES[name](in_channels=channels, image_size=size, num_classes=7)
    x = torch.randn(2, channels, size, size)
    logits = net(x)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_resnet18_small_image_stem() -> None:
    net = resnet18(in_channels=1, image_size=28, num_classes=10)
    stem = net.conv1
    assert isinstance(stem, nn.Conv2d)
    assert stem.in_channels == 1 and stem.out_channels == 64
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.padding == (1, 1)
    assert stem.bias is None
    assert isinstance(net.maxpool, nn.Identity)
    assert net.fc.out_features == 10
    # No downsampling before layer1: a 28x28 image is still 28x28 there.
    x = torch.randn(2, 1, 28, 28)
    assert net.layer1(net.relu(net.bn1(net.conv1(x)))).shape == (2, 64, 28, 28)
    assert resnet18(in_channels=3, image_size=32, num_classes=10).conv1.in_channels == 3


def test_mlp_layers_and_parameter_count() -> None:
    net = MLP(in_channels=1, image_size=8, num_classes=10, hidden_sizes=(128,))
    assert sum(p.numel() for p in net.parameters()) == 64 * 128 + 128 + 128 * 10 + 10
    linear = MLP(in_channels=3, image_size=4, num_classes=5, hidden_sizes=())
    (layer,) = [m for m in linear.modules() if isinstance(m, nn.Linear)]
    assert (layer.in_features, layer.out_features) == (48, 5)
    deep = MLP(in_channels=1, image_size=8, num_classes=10, hidden_sizes=[32, 16])
    widths = [m.out_features for m in deep.modules() if isinstance(m, nn.Linear)]
    assert widths == [32, 16, 10]


def test_small_cnn_structure() -> None:
    net = SmallCNN(in_channels=1, image_size=28, num_classes=10, channels=(8, 16, 24))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 24, 24]
    assert all(c.kernel_size == (3, 3) for c in convs)
    # no normalisation layers: every example's output depends on that example only
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(net(x)[1:], net(x[1:]), atol=1e-6)
    # tiny images never pool down to nothing
    tiny = SmallCNN(in_channels=3, image_size=3, num_classes=4, channels=(4, 4, 4))
    assert tiny(torch.randn(2, 3, 3, 3)).shape == (2, 4)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": 1.0}, "in_channels"),
        ({"image_size": -8}, "image_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
    ],
)
def test_network_argument_validation(name: str, kwargs: dict[str, object], arg: str) -> None:
    full: dict[str, object] = {"in_channels": 1, "image_size": 8, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=f"^{arg} must be a positive integer"):
        FACTORIES[name](**full)


@pytest.mark.parametrize(
    ("factory", "kwargs", "arg"),
    [
        (SmallCNN, {"channels": ()}, "channels"),
        (SmallCNN, {"channels": (16, 0)}, "channels"),
        (SmallCNN, {"channels": "16"}, "channels"),
        (SmallCNN, {"pool_size": 0}, "pool_size"),
        (MLP, {"hidden_sizes": (0,)}, "hidden_sizes"),
        (MLP, {"hidden_sizes": 128}, "hidden_sizes"),
    ],
)
def test_network_specific_argument_validation(
    factory: Callable[..., nn.Module], kwargs: dict[str, object], arg: str
) -> None:
    with pytest.raises(ValueError, match=f"^{arg} must be"):
        factory(in_channels=1, image_size=8, num_classes=10, **kwargs)


# --------------------------------------------------------------------------------------
# ImageClassifier


def test_classifier_num_classes_inferred_or_given() -> None:
    assert ImageClassifier(SmallCNN(in_channels=1, image_size=8, num_classes=7)).num_classes == 7
    assert ImageClassifier(resnet18(in_channels=1, image_size=8, num_classes=4)).num_classes == 4
    explicit = ImageClassifier(MLP(in_channels=1, image_size=8, num_classes=3), num_classes=3)
    assert explicit.hparams["num_classes"] == 3
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier(nn.Flatten())
    with pytest.raises(ValueError, match="^net must be"):
        ImageClassifier(net="SmallCNN")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^optimizer must be"):
        ImageClassifier(nn.Linear(2, 2), optimizer="sgd")  # type: ignore[arg-type]


def test_classifier_default_optimizer_is_sgd() -> None:
    model = ImageClassifier(MLP(in_channels=1, image_size=8, num_classes=10))
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["momentum"] == 0.9
    assert model.optimizer_factory is default_optimizer
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in model.net.parameters()}


def test_classifier_optimizer_and_scheduler_partials() -> None:
    net = MLP(in_channels=1, image_size=8, num_classes=10)
    net.layers[1].weight.requires_grad_(False)  # frozen parameters are not optimised
    model = ImageClassifier(
        net,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2),
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.Adam)
    assert config["optimizer"].defaults["lr"] == 1e-3
    n_params = sum(len(g["params"]) for g in config["optimizer"].param_groups)
    assert n_params == len(list(net.parameters())) - 1
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "epoch"

    plateau = ImageClassifier(
        MLP(in_channels=1, image_size=8, num_classes=10),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=1),
    ).configure_optimizers()
    assert plateau["lr_scheduler"]["monitor"] == "val/loss"


@pytest.mark.usefixtures("one_thread")
def test_classifier_learns_digits() -> None:
    """A few epochs of SmallCNN on the 8x8 digits beat chance (0.1) by far."""
    L.seed_everything(0, verbose=False)
    datamodule = DigitsDataModule(batch_size=32, split_seed=0)
    model = ImageClassifier(
        SmallCNN(in_channels=1, image_size=8, num_classes=10),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
    )
    trainer = _trainer(max_epochs=5)
    trainer.fit(model, datamodule=datamodule)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in logged and torch.isfinite(logged[key])
    assert float(logged["val/acc"]) > 0.8

    (result,) = trainer.test(model, datamodule=datamodule, verbose=False)
    assert set(result) == {"test/loss", "test/acc"}
    assert result["test/acc"] > 0.8
    assert 0.0 <= result["test/acc"] <= 1.0


@pytest.mark.usefixtures("one_thread")
def test_classifier_checkpoint_round_trip(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    datamodule = DigitsDataModule(batch_size=64)
    net_kwargs = {"in_channels": 1, "image_size": 8, "num_classes": 10}
    model = ImageClassifier(SmallCNN(**net_kwargs), optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    trainer = _trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    # The checkpoint holds plain data only, so torch's safe loading accepts it...
    checkpoint = torch.load(path, weights_only=True)
    described = checkpoint["image_classifier"]["optimizer"]
    assert described["target"] == "torch.optim.sgd.SGD"
    assert described["kwargs"] == {"lr": 0.05}
    # ...and so does load_from_checkpoint (whose default is safe loading on torch >= 2.6).
    loaded = ImageClassifier.load_from_checkpoint(path, net=SmallCNN(**net_kwargs))
    assert loaded.num_classes == 10
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))
