"""Tests of the data modules: offline digits, and MNIST / CIFAR-10 on tiny fake files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from fake_datasets import CIFAR_PER_BATCH, CIFAR_TEST, MNIST_TEST, MNIST_TRAIN
from sklearn.datasets import load_digits

from lightning_blogs.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    MNISTDataModule,
    mnist_available,
)

# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything here tries to download (torchvision's only download path)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download data")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------
# digits


def test_digits_class_attributes() -> None:
    assert (DigitsDataModule.num_channels, DigitsDataModule.image_size) == (1, 8)
    assert DigitsDataModule.num_classes == 10


def test_digits_split_sizes_disjoint_and_complete(digits: DigitsDataModule) -> None:
    train, val, test = digits.train_indices, digits.val_indices, digits.test_indices
    assert len(train) + len(val) + len(test) == 1797
    assert abs(len(val) - 0.15 * 1797) <= 1 and abs(len(test) - 0.15 * 1797) <= 1
    assert len(digits.train_set) == len(train)
    assert len(digits.val_set) == len(val) and len(digits.test_set) == len(test)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(1797))


def test_digits_split_is_stratified(digits: DigitsDataModule) -> None:
    labels = load_digits().target
    overall = np.bincount(labels, minlength=10) / len(labels)
    for split in (digits.train_indices, digits.val_indices, digits.test_indices):
        share = np.bincount(labels[split], minlength=10) / len(split)
        assert np.abs(share - overall).max() < 0.01


def test_digits_split_is_deterministic_in_split_seed(digits: DigitsDataModule) -> None:
    same = DigitsDataModule(split_seed=0)
    same.setup()
    for a, b in zip(
        (digits.train_indices, digits.val_indices, digits.test_indices),
        (same.train_indices, same.val_indices, same.test_indices),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert torch.equal(digits.train_set.tensors[0], same.train_set.tensors[0])

    other = DigitsDataModule(split_seed=1)
    other.setup()
    assert set(other.test_indices) != set(digits.test_indices)


def test_digits_fractions_change_split_sizes() -> None:
    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.3)
    dm.setup()
    assert abs(len(dm.val_indices) - 0.1 * 1797) <= 1
    assert abs(len(dm.test_indices) - 0.3 * 1797) <= 1


def test_digits_shapes_and_dtypes(digits: DigitsDataModule) -> None:
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9


def test_digits_normalisation_uses_train_statistics(digits: DigitsDataModule) -> None:
    x_train = digits.train_set.tensors[0]
    assert abs(float(x_train.mean())) < 1e-5
    assert abs(float(x_train.std()) - 1.0) < 1e-3
    # The statistics are those of pixel / 16 on the training split...
    raw = load_digits()
    scaled_train = raw.data[digits.train_indices] / 16.0
    assert digits.mean == pytest.approx(scaled_train.mean())
    assert digits.std == pytest.approx(scaled_train.std())
    assert 0.0 < digits.mean < 1.0
    # ...and every split maps back exactly to the original image and label.
    for split, dataset in (
        (digits.train_indices, digits.train_set),
        (digits.test_indices, digits.test_set),
    ):
        x, y = dataset.tensors
        restored = x.reshape(len(split), 64).double() * digits.std + digits.mean
        np.testing.assert_allclose(restored.numpy(), raw.data[split] / 16.0, atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), raw.target[split])


def test_digits_loaders_shuffle_train_only_and_keep_last_batch(digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    first = torch.cat([y for _, y in digits.train_dataloader()])
    second = torch.cat([y for _, y in digits.train_dataloader()])
    assert len(first) == len(digits.train_set)  # drop_last=False: nothing is lost
    assert not torch.equal(first, second)  # reshuffled each epoch
    assert torch.equal(torch.sort(first).values, torch.sort(second).values)
    val = torch.cat([y for _, y in digits.val_dataloader()])
    assert torch.equal(val, digits.val_set.tensors[1])  # fixed order
    test = torch.cat([y for _, y in digits.test_dataloader()])
    assert torch.equal(test, digits.test_set.tensors[1])


def test_digits_loader_before_setup_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"val_fraction": "0.1"}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"split_seed": 0.5}, "split_seed"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_digits_argument_validation(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be"):
        DigitsDataModule(**kwargs)


def test_digits_error_message_states_range() -> None:
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DigitsDataModule(val_fraction=2)


# --------------------------------------------------------------------------------------
# MNIST


def test_mnist_class_attributes() -> None:
    assert (MNISTDataModule.num_channels, MNISTDataModule.image_size) == (1, 28)
    assert MNISTDataModule.num_classes == 10
    assert (MNISTDataModule.normalize_mean, MNISTDataModule.normalize_std) == ((0.1307,), (0.3081,))


def test_mnist_fake_files_load(fake_mnist: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, arrays = fake_mnist
    assert mnist_available(root) and mnist_available(str(root))
    dm = MNISTDataModule(data_dir=str(root), batch_size=4, val_size=5)
    dm.prepare_data()  # files present: no error, no download
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (MNIST_TRAIN - 5, 5)
    assert dm.test_set is None  # "fit" does not load the test split
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    assert sorted(dm.train_set.indices + dm.val_set.indices) == list(range(MNIST_TRAIN))

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64

    # pixel -> (pixel / 255 - 0.1307) / 0.3081, label unchanged
    index = dm.train_set.indices[0]
    image, label = dm.train_set[0]
    expected = (arrays["train_images"][index] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-5)
    assert label == arrays["train_labels"][index]

    dm.setup("test")
    assert len(dm.test_set) == MNIST_TEST
    test_labels = torch.cat([y for _, y in dm.test_dataloader()])
    np.testing.assert_array_equal(test_labels.numpy(), arrays["t10k_labels"])


def test_mnist_split_is_deterministic(fake_mnist: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = fake_mnist
    splits = []
    for seed in (3, 3, 4):
        dm = MNISTDataModule(data_dir=root, val_size=8, split_seed=seed)
        dm.setup("fit")
        splits.append(list(dm.val_set.indices))
    assert splits[0] == splits[1]
    assert splits[0] != splits[2]


def test_mnist_val_size_zero_and_too_large(fake_mnist: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = fake_mnist
    dm = MNISTDataModule(data_dir=root, val_size=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (MNIST_TRAIN, 0)
    with pytest.raises(ValueError, match="val_size must be smaller"):
        MNISTDataModule(data_dir=root, val_size=MNIST_TRAIN).setup("fit")


def test_mnist_download_true_with_files_present_does_not_download(
    fake_mnist: tuple[Path, dict[str, np.ndarray]],
) -> None:
    root, _ = fake_mnist
    MNISTDataModule(data_dir=root, download=True).prepare_data()  # _no_network would raise


def test_mnist_missing_raises_file_not_found(tmp_path: Path) -> None:
    empty = tmp_path / "nowhere"
    assert not mnist_available(empty)
    dm = MNISTDataModule(data_dir=str(empty))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    assert str(empty) in str(info.value) and "download=True" in str(info.value)
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("test")


def test_mnist_partial_files_count_as_missing(
    fake_mnist: tuple[Path, dict[str, np.ndarray]],
) -> None:
    root, _ = fake_mnist
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    assert not mnist_available(root)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        MNISTDataModule(data_dir=root).prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": -1}, "val_size"),
        ({"val_size": 1.5}, "val_size"),
        ({"download": "yes"}, "download"),
        ({"num_workers": -2}, "num_workers"),
        ({"split_seed": None}, "split_seed"),
        ({"data_dir": None}, "data_dir"),
    ],
)
def test_torchvision_argument_validation(kwargs: dict[str, object], name: str) -> None:
    for cls in (MNISTDataModule, CIFAR10DataModule):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            cls(**kwargs)


# --------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar_class_attributes() -> None:
    assert (CIFAR10DataModule.num_channels, CIFAR10DataModule.image_size) == (3, 32)
    assert CIFAR10DataModule.num_classes == 10
    assert CIFAR10DataModule.normalize_mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR10DataModule.normalize_std == (0.2470, 0.2435, 0.2616)


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar_fake_files_load(fake_cifar: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, arrays = fake_cifar
    assert CIFAR10DataModule.available(root)
    dm = CIFAR10DataModule(data_dir=root, batch_size=3, val_size=5, split_seed=0)
    dm.prepare_data()
    dm.setup()  # stage None: all three splits
    n_train = 5 * CIFAR_PER_BATCH
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (n_train - 5, 5, CIFAR_TEST)

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (3,) and y.dtype == torch.int64

    # Check the channel order and per-channel normalisation on one known image.
    train_data = np.concatenate([arrays[f"data_batch_{i}"] for i in range(1, 6)])
    index = dm.train_set.indices[0]
    image, _ = dm.train_set[0]
    planes = train_data[index].reshape(3, 32, 32) / 255.0
    mean = np.array(CIFAR10DataModule.normalize_mean).reshape(3, 1, 1)
    std = np.array(CIFAR10DataModule.normalize_std).reshape(3, 1, 1)
    np.testing.assert_allclose(image.numpy(), (planes - mean) / std, atol=1e-5)

    test_image, _ = dm.test_set[CIFAR_TEST - 1]
    expected = (arrays["test_batch"][-1].reshape(3, 32, 32) / 255.0 - mean) / std
    np.testing.assert_allclose(test_image.numpy(), expected, atol=1e-5)


def test_cifar_fake_files_fail_the_real_checksum(
    fake_cifar: tuple[Path, dict[str, np.ndarray]],
) -> None:
    root, _ = fake_cifar  # no skip_cifar_md5: torchvision sees "corrupted" files
    assert not CIFAR10DataModule.available(root)
    with pytest.raises(FileNotFoundError, match="corrupted"):
        CIFAR10DataModule(data_dir=root).setup("fit")


def test_cifar_missing_raises_file_not_found(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    assert str(tmp_path) in str(info.value) and "download=True" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        dm.setup("test")
