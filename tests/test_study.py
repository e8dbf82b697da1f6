"""python/study.py --quick runs end to end (with an even smaller budget) and writes JSON, table and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

for module in ("matplotlib", "mnist1d", "tqdm"):
    pytest.importorskip(module)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["SGD", "SAM", "SSAM-F s=0.5", "SSAM-F s=0.9", "SSAM-D s=0.5", "SSAM-D s=0.9"]
METRICS = ["test_accuracy", "train_loss", "hessian_top_eigenvalue", "random_loss_increase",
           "random_loss_increase_large", "adversarial_loss_increase", "seconds_per_epoch"]


def test_quick_study_writes_json_table_and_plot(tmp_path):
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, str(ROOT / "python" / "study.py"), "--quick", "--seeds", "2",
                           "--epochs", "1", "--sharpness-samples", "64", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((tmp_path / "study.json").read_text())
    assert {"config", "summary", "runs", "wall_seconds", "environment"} <= report.keys()
    assert report["config"]["quick"] and report["config"]["seeds"] == 2 and report["config"]["epochs"] == 1
    assert list(report["summary"]) == METHODS
    for method in METHODS:
        for metric in METRICS:
            stats = report["summary"][method][metric]
            assert stats["n"] == 2 and {"mean", "std"} <= stats.keys()
    assert len(report["runs"]) == 2 * len(METHODS)
    assert all(run["hessian_top_eigenvalue"] > 0 for run in report["runs"])

    assert list(report["paired_vs_SAM"]) == [m for m in METHODS if m != "SAM"]

    lines = (tmp_path / "study.md").read_text().splitlines()
    table = lines[:2 + len(METHODS)]
    assert table[0].startswith("| method |")
    assert [row.split("|")[1].strip() for row in table[2:]] == METHODS
    assert all(row.count("±") == len(METRICS) for row in table[2:])
    assert any(line.startswith("Paired by seed, minus SAM") for line in lines)

    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
