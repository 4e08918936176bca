"""Privacy-utility report: ``python -m lightning_blogs.report SWEEP_DIR [--baseline RUN_DIR]``.

Reads every ``summary.json`` under ``SWEEP_DIR`` (a Hydra multirun directory) and writes, next to
them, ``privacy_utility.md`` (test accuracy against epsilon, one row per mechanism) and
``privacy_utility.png`` (accuracy against epsilon, one line per mechanism). Proven bounds and the
DP-BloGS paper figure are labelled as what they are.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["ReportCallback", "collect", "main", "markdown_table", "plot"]

MECHANISM_LABELS = {
    "none": "none (no privacy)",
    "dp-blogs": "blogs (paper figure, NOT a DP guarantee)",
    "dp-blogs-gaussian": "blogs_gaussian (proven)",
    "dp-sgd": "dpsgd (proven)",
}


def collect(*directories: Path) -> dict[str, dict[float, dict[str, Any]]]:
    """Runs by mechanism label and target epsilon (``inf`` for runs without a target)."""
    runs: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for directory in directories:
        for path in sorted(Path(directory).rglob("summary.json")):
            summary = json.loads(path.read_text())
            privacy = summary["privacy"]
            target = privacy.get("target_epsilon", privacy.get("target_epsilon_blogs_paper"))
            label = MECHANISM_LABELS.get(privacy["mechanism"], privacy["mechanism"])
            runs[label][float("inf") if target is None else float(target)] = summary
    return dict(runs)


def _epsilon(summary: dict[str, Any]) -> str:
    privacy = summary["privacy"]
    for key, suffix in (
        ("privacy/epsilon", ""),
        ("privacy/epsilon_if_poisson_sampled", " (unproven)"),
        ("privacy/epsilon_blogs_paper", " (paper)"),
    ):
        if key in privacy:
            return f"{privacy[key]:.3g}{suffix}"
    return "-"


def markdown_table(runs: dict[str, dict[float, dict[str, Any]]]) -> str:
    """Test accuracy (and the epsilon reached) for every mechanism and target epsilon."""
    targets = sorted({t for by_target in runs.values() for t in by_target})
    header = "| mechanism | " + " | ".join("no target" if t == float("inf") else f"eps {t:g}" for t in targets) + " |"
    lines = [header, "|---" * (len(targets) + 1) + "|"]
    for label, by_target in sorted(runs.items()):
        cells = []
        for target in targets:
            summary = by_target.get(target)
            if summary is None:
                cells.append("")
            else:
                acc = summary["test_acc"]
                cells.append(f"{acc:.3f} (eps {_epsilon(summary)})" if acc is not None else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[float, dict[str, Any]]], path: Path) -> None:
    """Accuracy against target epsilon, one line per mechanism; a baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, by_target in sorted(runs.items()):
        finite = sorted(t for t in by_target if t != float("inf"))
        if finite:
            axes.plot(finite, [by_target[t]["test_acc"] for t in finite], marker="o", label=label)
        elif float("inf") in by_target:
            axes.axhline(by_target[float("inf")]["test_acc"], linestyle="--", color="grey", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("target epsilon (delta 1e-5)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    axes.set_title("digits: accuracy against epsilon")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(sweep_dir: Path, *baselines: Path) -> str:
    """Write ``privacy_utility.md`` and ``privacy_utility.png`` into ``sweep_dir``; return the table."""
    runs = collect(sweep_dir, *baselines)
    if not runs:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    table = markdown_table(runs)
    (sweep_dir / "privacy_utility.md").write_text(table)
    plot(runs, sweep_dir / "privacy_utility.png")
    return table


class ReportCallback(Callback):
    """Hydra callback: write the report into the sweep directory when a multirun ends.

    ``experiment=privacy_utility_sweep`` registers it under ``hydra.callbacks``.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the table and the plot, and print the table."""
        print(write_report(Path(config.hydra.sweep.dir)))


def main(argv: list[str] | None = None) -> str:
    """Write the table and the plot into the sweep directory; return the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--baseline", type=Path, action="append", default=[], help="extra run directories")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep_dir {args.sweep_dir} is not a directory")
    try:
        table = write_report(args.sweep_dir, *args.baseline)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(table)
    return table


if __name__ == "__main__":
    main()
