"""The quick start without Lightning: a plain PyTorch loop with ``BloGSPrivacyEngine``.

Same model, data, optimizer and privacy settings as ``examples/mnist_resnet18.py``:

    python examples/plain_pytorch.py --epochs 1

The printed figure is the one published with DP-BloGS, not a formal DP guarantee.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_resnet18 import build, parse_args  # noqa: E402  (the quick start's own setup)

from lightning_blogs import BloGSPrivacyEngine  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    pl.seed_everything(0, workers=True)
    datamodule, module = build(args)
    datamodule.setup("fit")
    train_loader = datamodule.train_dataloader()
    model = module.net
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = len(train_loader) * args.epochs
    if args.max_steps >= 0:
        steps = min(steps, args.max_steps)
    engine = BloGSPrivacyEngine(
        optimizer=optimizer,
        model=model,
        target_epsilon=args.target_epsilon,
        delta=args.delta,
        clip_value=args.clip_norm,
        steps=steps,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    model.train()
    for _ in range(args.epochs):
        for x, y in train_loader:
            if engine.session.steps == steps:
                break
            engine.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            epsilon, delta = engine.step()

    datamodule.setup("test")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    epsilon, delta = engine.get_privacy_spent()
    print(
        f"test accuracy {correct / total:.4f} | paper figure epsilon {epsilon:.4g} "
        f"(delta {delta:g}; not a formal DP guarantee) after {engine.session.steps} steps"
    )
    return {
        "test_acc": correct / total,
        "epsilon_blogs_paper": epsilon,
        "steps": engine.session.steps,
        "block_sizes": engine.block_sizes,
    }


if __name__ == "__main__":
    main()
