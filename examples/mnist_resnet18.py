"""Quick start: ResNet18 with a one-channel stem, SGD, ten classes, trained with DP-BloGS.

Uses MNIST when it is on disk (``--data-dir``, torchvision's layout) and falls back to the
8x8 digits that ship with scikit-learn otherwise, so it runs anywhere:

    python examples/mnist_resnet18.py --epochs 1

The printed figure is the one published with DP-BloGS, not a formal DP guarantee.
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning.pytorch as pl
import torch

from lightning_blogs import DPBloGS
from lightning_blogs.data import DigitsDataModule, MNISTDataModule, mnist_available
from lightning_blogs.models import ImageClassifier, resnet18


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw (default: data)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=None, help="permutation seed (default: OS entropy)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[pl.LightningDataModule, ImageClassifier]:
    """The data module (MNIST if present, else digits) and the ResNet18 classifier."""
    if mnist_available(args.data_dir):
        datamodule: pl.LightningDataModule = MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size)
    else:
        print(f"MNIST not found under {args.data_dir!r}: using scikit-learn's 8x8 digits instead.")
        datamodule = DigitsDataModule(batch_size=args.batch_size)
    net = resnet18(in_channels=1, image_size=datamodule.image_size, num_classes=10)
    return datamodule, ImageClassifier(net, optimizer=partial(torch.optim.SGD, lr=args.lr, momentum=0.9))


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    pl.seed_everything(0, workers=True)
    datamodule, module = build(args)
    blogs = DPBloGS(target_epsilon=args.target_epsilon, delta=args.delta, clip_norm=args.clip_norm, seed=args.seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator="auto",
        devices=1,
        callbacks=[blogs],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    (results,) = trainer.test(module, datamodule=datamodule)
    print(
        f"test accuracy {results['test/acc']:.4f} | paper figure epsilon {blogs.epsilon:.4g} "
        f"(delta {args.delta:g}; not a formal DP guarantee) after {blogs.steps} steps"
    )
    return {
        "test_acc": results["test/acc"],
        "epsilon_blogs_paper": blogs.epsilon,
        "steps": blogs.steps,
        "block_sizes": blogs.block_sizes,
    }


if __name__ == "__main__":
    main()
