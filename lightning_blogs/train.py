"""Hydra entry point: ``lightning-blogs-train`` / ``python -m lightning_blogs.train``.

Composes ``conf/train.yaml`` (data, model, optimizer, privacy, trainer, logger, experiment),
trains, tests the best checkpoint and writes ``summary.json`` into the run's own directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_blogs.callbacks.dp_blogs import EPSILON_KEY, DPBloGS
from lightning_blogs.callbacks.dp_sgd import DPSGD
from lightning_blogs.callbacks.formal import PROVEN_EPSILON_KEY, UNPROVEN_EPSILON_KEY
from lightning_blogs.models import ImageClassifier, make_dp_compatible
from lightning_blogs.sampling import PoissonDataModule

__all__ = ["main", "train"]

SUMMARY_FILE = "summary.json"
log = logging.getLogger(__name__)


def _check_output_dir(output_dir: Path) -> None:
    """Refuse to train into a directory that already holds a run's results."""
    taken = [p for p in (output_dir / SUMMARY_FILE, output_dir / "checkpoints") if p.exists()]
    if taken:
        raise FileExistsError(
            f"hydra.run.dir={output_dir} already holds an earlier run ({taken[0].name}); "
            "choose a new hydra.run.dir (the default is unique per run) so nothing is overwritten"
        )


def _instantiate_logger(cfg: DictConfig) -> Any:
    if not cfg.get("logger"):
        return False
    target = cfg.logger.get("_target_", "")
    if target.endswith("WandbLogger") and importlib.util.find_spec("wandb") is None:
        raise ModuleNotFoundError(
            "logger=wandb needs the wandb package: pip install 'lightning-blogs[wandb]' "
            "(or choose logger=tensorboard or logger=csv)"
        )
    return hydra.utils.instantiate(cfg.logger)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return (and write) its summary.

    Everything that can be wrong in the configuration fails here before the first step:
    instantiation validates every argument, and DP-BloGS plans its block sizes at fit start.
    """
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    poisson = bool(cfg.get("poisson_sampling"))
    net = hydra.utils.instantiate(
        cfg.model,
        in_channels=datamodule.num_channels,
        image_size=datamodule.image_size,
        num_classes=datamodule.num_classes,
    )
    privacy = hydra.utils.instantiate(cfg.privacy) if cfg.get("privacy") else None
    if isinstance(privacy, DPSGD):
        net, changes = make_dp_compatible(net)  # per-sample gradients need per-example layers
        for change in changes:
            log.info("DP-compatible model: %s", change)
    module = ImageClassifier(net, optimizer=hydra.utils.instantiate(cfg.optimizer))
    if poisson:
        datamodule = PoissonDataModule(datamodule)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.get("callbacks", {}).values()]
    if privacy is not None:
        callbacks.append(privacy)
    # Lightning must not replace the Poisson batch sampler with its distributed sampler.
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=_instantiate_logger(cfg), use_distributed_sampler=not poisson
    )
    if trainer.is_global_zero and not trainer.fast_dev_run:
        _check_output_dir(output_dir)

    trainer.fit(module, datamodule=datamodule)
    best = (trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "") or None
    results: dict[str, Any] = {}
    if cfg.get("test"):
        (results,) = trainer.test(module, datamodule=datamodule, ckpt_path=best)

    summary = {
        "output_dir": str(output_dir),
        "test_acc": results.get("test/acc"),
        "test_loss": results.get("test/loss"),
        "optimizer_steps": trainer.global_step,
        "best_checkpoint": best,
        "privacy": _privacy_summary(privacy),
        "overrides": list(HydraConfig.get().overrides.task),
    }
    if trainer.is_global_zero:
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        print(_summary_line(summary))
    return summary


def _privacy_summary(privacy: Any) -> dict[str, Any]:
    if privacy is None:
        return {"mechanism": "none"}
    if isinstance(privacy, DPSGD | DPBloGS) and privacy.formal is not None:
        formal = privacy.formal
        key = PROVEN_EPSILON_KEY if formal.poisson else UNPROVEN_EPSILON_KEY
        return {
            "mechanism": "dp-sgd" if isinstance(privacy, DPSGD) else "dp-blogs-gaussian",
            key: privacy.epsilon,
            "note": "proven (accountant: " + formal.accountant.accountant + ")"
            if formal.poisson
            else "NOT proven: the training batches were not Poisson-sampled",
            "delta": privacy.delta,
            "clip_norm": privacy.clip_norm,
            "noise_multiplier": formal.noise_multiplier,
            "sample_rate": formal.sample_rate,
            "target_epsilon": privacy.target_epsilon,
            "steps": privacy.steps,
            "block_sizes": getattr(privacy, "block_sizes", None),
        }
    if isinstance(privacy, DPBloGS):
        plan = privacy.session.plan
        return {
            "mechanism": "dp-blogs",
            EPSILON_KEY: privacy.epsilon,
            "note": "paper figure (arXiv 2407.21347 v1), not a formal differential-privacy guarantee",
            "delta": plan.delta,
            "clip_norm": plan.clip_norm,
            "target_epsilon_blogs_paper": plan.target_epsilon,
            "steps": privacy.steps,
            "planned_steps": plan.steps,
            "block_sizes": plan.as_dict(),
        }
    return {"mechanism": type(privacy).__name__}


def _summary_line(summary: dict[str, Any]) -> str:
    acc = summary["test_acc"]
    parts = [f"test accuracy: {acc:.4f}" if acc is not None else "test accuracy: not measured"]
    privacy = summary["privacy"]
    if PROVEN_EPSILON_KEY in privacy:
        parts.append(
            f"{PROVEN_EPSILON_KEY}: {privacy[PROVEN_EPSILON_KEY]:.4g} (delta {privacy['delta']:g}; a proven bound)"
        )
    elif UNPROVEN_EPSILON_KEY in privacy:
        parts.append(f"{UNPROVEN_EPSILON_KEY}: {privacy[UNPROVEN_EPSILON_KEY]:.4g} (NOT proven: batches not Poisson)")
    elif EPSILON_KEY in privacy:
        parts.append(
            f"{EPSILON_KEY}: {privacy[EPSILON_KEY]:.4g} (delta {privacy['delta']:g}; the paper's figure, "
            "NOT a formal DP guarantee)"
        )
    else:
        parts.append(f"privacy: {privacy['mechanism']}")
    parts.append(f"results in {summary['output_dir']}")
    return " | ".join(parts)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Console entry point. Returns the test accuracy (the value Hydra sweepers optimise)."""
    summary = train(cfg)
    acc = summary["test_acc"]
    return math.nan if acc is None else float(acc)


if __name__ == "__main__":
    main()
