"""The privacy-utility report: table and plot from a sweep's summaries."""

from __future__ import annotations

import json

from lightning_blogs.report import main


def _summary(path, mechanism, target, acc, epsilon_key, epsilon):
    path.mkdir(parents=True)
    privacy = {"mechanism": mechanism, epsilon_key: epsilon}
    privacy["target_epsilon_blogs_paper" if mechanism == "dp-blogs" else "target_epsilon"] = target
    (path / "summary.json").write_text(json.dumps({"test_acc": acc, "privacy": privacy}))


def test_report_writes_a_labelled_table_and_a_plot(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    _summary(sweep / "0", "dp-blogs", 1.0, 0.36, "privacy/epsilon_blogs_paper", 0.94)
    _summary(sweep / "1", "dp-sgd", 1.0, 0.41, "privacy/epsilon", 0.99)
    _summary(sweep / "2", "dp-sgd", 8.0, 0.68, "privacy/epsilon", 7.99)
    baseline = tmp_path / "none"
    baseline.mkdir()
    (baseline / "summary.json").write_text(json.dumps({"test_acc": 0.95, "privacy": {"mechanism": "none"}}))

    table = main([str(sweep), "--baseline", str(baseline)])
    lines = table.splitlines()
    assert lines[0] == "| mechanism | eps 1 | eps 8 | no target |"
    assert "| blogs (paper figure, NOT a DP guarantee) | 0.360 (eps 0.94 (paper)) |  |  |" in lines
    assert "| dpsgd (proven) | 0.410 (eps 0.99) | 0.680 (eps 7.99) |  |" in lines
    assert "| none (no privacy) |  |  | 0.950 (eps -) |" in lines
    assert (sweep / "privacy_utility.md").read_text() == table
    assert (sweep / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
