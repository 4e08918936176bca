"""One DP-BloGS training run: its block-size plan, its mechanism and its step count.

Shared by the Lightning callback and the plain-PyTorch engine, which only decide when to call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_blogs.accounting.blogs_paper import BlockPlan, plan_block_sizes
from lightning_blogs.mechanism.blogs import BlockShuffleMechanism, sensitivity

__all__ = ["BloGSSession"]


class BloGSSession:
    """Plan + mechanism + step count of one DP-BloGS run.

    Args:
        named_params: the trainable parameters, ``(name, parameter)`` in a fixed order.
        plan: block sizes for exactly these parameters (from :func:`plan_block_sizes`).
        seed: permutation seed (already resolved: OS entropy or the user's).
        reproducible: True when ``seed`` was given by the user; only then are generator states
            written to checkpoints (an entropy-seeded state on disk would let a reader replay
            the permutations).
        steps: optimizer steps already taken (non-zero when resuming).
        noise_multiplier: sigma of the formal mode (Gaussian noise of standard deviation
            ``sigma * 2 sqrt(n) C`` per coordinate, n tensors); 0 for the published mechanism.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        plan: BlockPlan,
        seed: int,
        reproducible: bool,
        steps: int = 0,
        noise_multiplier: float = 0.0,
    ) -> None:
        names = tuple(n for n, _ in named_params)
        if names != plan.names:
            raise ValueError("the block-size plan was made for other parameters than the ones given")
        self.plan = plan
        self.steps = steps
        self.reproducible = reproducible
        self.noise_multiplier = float(noise_multiplier)
        noise_std = self.noise_multiplier * sensitivity(plan.clip_norm, len(named_params))
        self.mechanism = BlockShuffleMechanism(
            [p for _, p in named_params], plan.block_sizes, plan.clip_norm, seed, noise_std=noise_std
        )

    @classmethod
    def plan_for(
        cls,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        *,
        clip_norm: float,
        delta: float,
        steps: int,
        target_epsilon: float | None,
        block_size: int | Mapping[str, int] | None,
        seed: int,
        reproducible: bool,
        noise_multiplier: float = 0.0,
    ) -> BloGSSession:
        """Plan block sizes for ``named_params`` and start a run at step 0."""
        plan = plan_block_sizes(
            {n: p.numel() for n, p in named_params},
            clip_norm=clip_norm,
            delta=delta,
            steps=steps,
            target_epsilon=target_epsilon,
            block_size=block_size,
        )
        return cls(named_params, plan, seed, reproducible, noise_multiplier=noise_multiplier)

    @classmethod
    def from_state_dict(
        cls, named_params: Sequence[tuple[str, torch.nn.Parameter]], state: Mapping[str, Any], seed: int
    ) -> BloGSSession:
        """Resume a run saved by :meth:`state_dict`: same plan, same step count.

        ``seed`` is used only when the saved run was entropy-seeded (its generator state was not
        saved); a user-seeded run continues its saved generators exactly.
        """
        numels = {n: p.numel() for n, p in named_params}
        if dict(zip(state["names"], state["numels"], strict=True)) != numels:
            raise ValueError(
                "the checkpoint's DP-BloGS plan was made for other trainable parameters than this model's; "
                "resume with the same model"
            )
        plan = plan_block_sizes(
            numels,
            clip_norm=state["clip_norm"],
            delta=state["delta"],
            steps=state["total_steps"],
            target_epsilon=None,
            block_size=dict(zip(state["names"], state["block_sizes"], strict=True)),
        )
        plan = dataclasses.replace(plan, target_epsilon=state["target_epsilon"])
        reproducible = state["seed"] is not None
        session = cls(
            named_params,
            plan,
            state["seed"] if reproducible else seed,
            reproducible,
            int(state["steps"]),
            noise_multiplier=state.get("noise_multiplier", 0.0),
        )
        session.mechanism.load_generator_state_dict(state["generator_states"])
        return session

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Use ``noise_multiplier`` for the steps from now on (a resumed formal run with new settings)."""
        self.noise_multiplier = float(noise_multiplier)
        self.mechanism.noise_std = self.noise_multiplier * sensitivity(self.plan.clip_norm, len(self.plan.names))

    @property
    def epsilon(self) -> float:
        """The paper's figure after the steps taken so far."""
        return self.plan.epsilon_after(self.steps)

    @property
    def over_budget(self) -> bool:
        """True when the next step goes past the planned number of steps."""
        return self.steps >= self.plan.steps

    def step_(self) -> None:
        """Clip and block-shuffle the gradients in place and count one optimizer step."""
        self.mechanism.privatize_()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Plan, step count, and (for a user seed only) the permutation generators' states."""
        plan = self.plan
        return {
            "names": list(plan.names),
            "numels": list(plan.numels),
            "block_sizes": list(plan.block_sizes),
            "clip_norm": plan.clip_norm,
            "delta": plan.delta,
            "total_steps": plan.steps,
            "target_epsilon": plan.target_epsilon,
            "steps": self.steps,
            "noise_multiplier": self.noise_multiplier,
            "seed": self.mechanism.seed if self.reproducible else None,
            "generator_states": self.mechanism.generator_state_dict() if self.reproducible else {},
        }
