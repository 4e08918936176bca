"""Cost of DP-BloGS per optimizer step, as a ratio against the same step without it.

    python benchmarks/step_overhead.py [--device cuda] [--steps 20] [--batch-size 64]

Both loops run in this process on the same model, data and device: ResNet18 (3x3 stem, 10 classes)
on random 1x28x28 inputs. Block sizes: the planner's, and block size 1 (the worst case: a ragged
gather of every entry). Prints seconds per step and the ratios; also the planning time of the model.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_blogs.accounting import plan_block_sizes
from lightning_blogs.mechanism import BlockShuffleMechanism, entropy_seed
from lightning_blogs.models import resnet18


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, batch, steps: int, mechanism: BlockShuffleMechanism | None) -> float:
    x, y = batch
    device = x.device
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if mechanism is not None:
            mechanism.privatize_()
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet18(in_channels=1, image_size=28, num_classes=10).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    batch = (
        torch.randn(args.batch_size, 1, 28, 28, device=device),
        torch.randint(0, 10, (args.batch_size,), device=device),
    )

    start = time.perf_counter()
    plan = plan_block_sizes(
        {n: p.numel() for n, p in model.named_parameters()}, clip_norm=0.1, delta=1e-5, steps=938, target_epsilon=8.0
    )
    plan_seconds = time.perf_counter() - start

    baseline = time_steps(model, optimizer, batch, args.steps, None)
    planned = time_steps(
        model, optimizer, batch, args.steps, BlockShuffleMechanism(params, plan.block_sizes, 0.1, entropy_seed())
    )
    worst = time_steps(
        model, optimizer, batch, args.steps, BlockShuffleMechanism(params, [1] * len(params), 0.1, entropy_seed())
    )
    print(f"device {device}, ResNet18 {sum(p.numel() for p in params):,} parameters, batch {args.batch_size}")
    print(f"planning (938 steps, target 8): {plan_seconds * 1e3:.1f} ms")
    print(f"baseline step          {baseline * 1e3:8.2f} ms  ratio 1.00")
    print(f"DP-BloGS planned sizes {planned * 1e3:8.2f} ms  ratio {planned / baseline:.2f}")
    print(f"DP-BloGS block size 1  {worst * 1e3:8.2f} ms  ratio {worst / baseline:.2f}")


if __name__ == "__main__":
    main()
