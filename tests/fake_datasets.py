"""Tiny MNIST and CIFAR-10 written by the tests in the real file formats (nothing is downloaded)."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of the MNIST files (big-endian header)."""
    header = struct.pack(">I", 0x0800 + array.ndim)  # 0x08 = unsigned byte, then ndim
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


MNIST_TRAIN, MNIST_TEST = 20, 10


@pytest.fixture
def fake_mnist(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny MNIST where torchvision 0.29 reads it: ``<root>/MNIST/raw/*-ubyte`` (raw IDX).

    torchvision only checks that the four uncompressed files exist (no checksum).
    """
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    for prefix, n in (("train", MNIST_TRAIN), ("t10k", MNIST_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return tmp_path, arrays


CIFAR_PER_BATCH, CIFAR_TEST = 4, 10


@pytest.fixture
def fake_cifar(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny CIFAR-10 in its real format: pickled dicts in ``<root>/cifar-10-batches-py``.

    Each batch holds ``data`` (uint8, ``(n, 3072)``: the red, green then blue 32x32 planes,
    row-major) and ``labels``; ``batches.meta`` holds ``label_names``.
    """
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        n = CIFAR_TEST if name == "test_batch" else CIFAR_PER_BATCH
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        arrays[name] = data
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return tmp_path, arrays


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torchvision accept the fake CIFAR files.

    torchvision's CIFAR10 compares every file's MD5 with the real data set's, which no fake
    can match; only that check is replaced (by a plain existence check). MNIST needs no
    such patch.
    """

    def exists(fpath: str | os.PathLike[str], md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
