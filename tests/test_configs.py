"""Every config in conf/ composes and runs (fast_dev_run); a multirun sweeps; runs never collide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_blogs
from lightning_blogs.train import train

CONF = Path(lightning_blogs.__file__).parent / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]
# What each option needs beyond the defaults to run here (offline, CPU, no GPU).
NEEDS_DATA = {
    ("data", "mnist"): "fake_mnist",
    ("data", "cifar10"): "fake_cifar",
    ("experiment", "mnist_resnet18"): "fake_mnist",
}
SUBPROCESS = {("trainer", "ddp")}  # DDP relaunches the command line: run it as a user would

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def compose_run(overrides: list[str], output_dir: Path):
    """Compose conf/train.yaml as the app does, with the run's output directory set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_app(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the console script as a user would (it must find its configs from any directory)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("lightning-blogs-train")), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_every_group_has_options() -> None:
    assert set(GROUPS) >= {"data", "model", "optimizer", "privacy", "trainer", "logger", "experiment"}
    assert len(OPTIONS) >= 17


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_config_composes_and_runs(group, option, tmp_path, request) -> None:
    overrides = [f"{group}={option}", "trainer.fast_dev_run=true"]
    if (group, option) in NEEDS_DATA:
        data_root, _ = request.getfixturevalue(NEEDS_DATA[group, option])
        if "cifar" in option:
            request.getfixturevalue("skip_cifar_md5")
        overrides += [f"data.data_dir={data_root}", "data.val_size=5", "data.num_workers=0"]
    if group == "trainer" and option == "gpu" and not torch.cuda.is_available():
        cfg = compose_run(overrides, tmp_path)  # composes here; runs only where there is a GPU
        assert cfg.trainer.accelerator == "gpu"
        pytest.skip("trainer=gpu needs CUDA")
    if group == "logger" and option == "wandb":
        pytest.importorskip("wandb")
        overrides.append("logger.offline=true")
    if (group, option) in SUBPROCESS:
        run_app([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    else:
        summary = train(compose_run(overrides, tmp_path))
        assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["optimizer_steps"] == 1
    assert 0 <= summary["test_acc"] <= 1


def test_default_is_digits_cnn_blogs(tmp_path) -> None:
    cfg = compose_run([], tmp_path)
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.privacy._target_ == "lightning_blogs.DPBloGS"
    assert cfg.privacy.seed is None  # OS entropy by default
    assert cfg.model._target_.endswith("SmallCNN")


def test_multirun_sweeps_two_values(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    run_app(["-m", "privacy.target_epsilon=4,8", "trainer.fast_dev_run=true", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(2)]
    assert [s["privacy"]["target_epsilon_blogs_paper"] for s in summaries] == [4.0, 8.0]
    assert all(
        s["privacy"]["privacy/epsilon_blogs_paper"] <= s["privacy"]["target_epsilon_blogs_paper"] for s in summaries
    )


def test_a_finished_run_is_never_overwritten(tmp_path) -> None:
    short = [
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
    ]
    first = train(compose_run(short, tmp_path))
    assert Path(first["best_checkpoint"]).is_file()
    # The figure went to TensorBoard (the default logger) under its own name, never as a proven bound.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "privacy/epsilon_blogs_paper" in tags and "privacy/epsilon" not in tags
    logged = events.Scalars("privacy/epsilon_blogs_paper")
    assert len(logged) == first["optimizer_steps"] == 2
    assert logged[-1].value == pytest.approx(first["privacy"]["privacy/epsilon_blogs_paper"], rel=1e-6)
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(FileExistsError, match="hydra.run.dir"):
        train(compose_run(short, tmp_path))
    assert (tmp_path / "summary.json").read_text() == before


def test_bad_input_fails_before_training_with_a_clear_message(tmp_path) -> None:
    # Hydra wraps the callback's ValueError; its message names the argument and the allowed range.
    with pytest.raises(InstantiationException, match="target_epsilon must be a finite number > 0, got -1"):
        train(compose_run(["privacy.target_epsilon=-1"], tmp_path))
    with pytest.raises(MissingConfigException, match="digits"):  # Hydra lists the available options
        compose_run(["data=imagenet"], tmp_path)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()


def test_blogs_gaussian_reports_a_proven_epsilon_on_poisson_batches(tmp_path) -> None:
    overrides = [
        "privacy=blogs_gaussian",
        "privacy.target_epsilon=2",
        "trainer.max_epochs=2",
        "+trainer.limit_val_batches=1",
    ]
    summary = train(compose_run(overrides, tmp_path))
    privacy = summary["privacy"]
    assert privacy["mechanism"] == "dp-blogs-gaussian" and privacy["note"].startswith("proven")
    assert 0 < privacy["privacy/epsilon"] <= 2.0
    assert privacy["sample_rate"] == pytest.approx(64 / 1257)  # batch_size / len(train split)
    assert summary["optimizer_steps"] == privacy["steps"] == 2 * round(1257 / 64)


def test_dpsgd_makes_resnet18_dp_compatible(tmp_path) -> None:
    summary = train(compose_run(["privacy=dpsgd", "model=resnet18", "trainer.fast_dev_run=true"], tmp_path))
    assert summary["privacy"]["mechanism"] == "dp-sgd" and summary["optimizer_steps"] == 1


def test_privacy_utility_sweep_writes_its_report(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    run_app(
        [
            "experiment=privacy_utility_sweep",
            "privacy=blogs,dpsgd",
            "privacy.target_epsilon=4",
            "trainer.fast_dev_run=true",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    table = (sweep / "privacy_utility.md").read_text()
    assert "blogs (paper figure, NOT a DP guarantee)" in table and "dpsgd (proven)" in table
    assert (sweep / "privacy_utility.png").is_file()
