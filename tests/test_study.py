"""python/study.py --quick runs end to end (with an even smaller budget) and writes JSON, tables and plots."""

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
METHODS = ["SGD", "SAM", "SSAM-F s=0.5", "SSAM-D s=0.5", "SSAM-D s=0.5 EveryK k=5",
           "SSAM-D s=0.5 LookSAM k=5", "SSAM-D s=0.5 AE-SAM"]
SCHEDULED = METHODS[4:]
METRICS = ["test_accuracy", "train_loss", "hessian_top_eigenvalue", "random_loss_increase",
           "random_loss_increase_large", "adversarial_loss_increase", "seconds_per_epoch", "relative_cost",
           "sam_fraction"]
PAIRED = ["test_accuracy", "hessian_top_eigenvalue", "adversarial_loss_increase", "relative_cost"]


def run_study(*argv: str) -> subprocess.CompletedProcess:
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, str(ROOT / "python" / "study.py"), *argv],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_quick_study_writes_json_tables_and_plots(tmp_path):
    run_study("--quick", "--seeds", "2", "--epochs", "1", "--sharpness-samples", "64", "--out", str(tmp_path))

    report = json.loads((tmp_path / "study.json").read_text())
    assert {"config", "summary", "runs", "wall_seconds", "environment"} <= report.keys()
    assert report["config"]["quick"] and report["config"]["seeds"] == 2 and report["config"]["epochs"] == 1
    assert report["config"]["backend"] == "auto" and report["config"]["threads"] == 1
    environment = report["environment"]
    assert len(environment["load_average_at_start"]) == len(environment["load_average_at_end"]) == 3
    assert isinstance(environment["backend"], str)  # one backend for every method
    assert list(report["summary"]) == METHODS
    for method in METHODS:
        for metric in METRICS:
            stats = report["summary"][method][metric]
            assert stats["n"] == 2 and {"mean", "std"} <= stats.keys()
    runs = report["runs"]
    assert len(runs) == 2 * len(METHODS)
    assert [(r["seed"], r["method"]) for r in runs] == [(s, m) for s in range(2) for m in METHODS]  # by seed
    assert all(run["hessian_top_eigenvalue"] > 0 for run in runs)
    sgd = {r["seed"]: r["seconds_per_epoch"] for r in runs if r["method"] == "SGD"}
    for r in runs:
        assert r["relative_cost"] == pytest.approx(r["seconds_per_epoch"] / sgd[r["seed"]])
        assert r["backend"] == (None if r["method"] == "SGD" else environment["backend"])
    fraction = {m: report["summary"][m]["sam_fraction"]["mean"] for m in METHODS}
    # MNIST-1D: 4000 training signals, 32 steps of 128; EveryK and LookSAM (k=5) take steps 0, 5, ..., 30
    assert fraction["SGD"] == 0 and fraction["SAM"] == fraction["SSAM-D s=0.5"] == 1
    assert fraction["SSAM-D s=0.5 EveryK k=5"] == fraction["SSAM-D s=0.5 LookSAM k=5"] == 7 / 32
    assert 0 < fraction["SSAM-D s=0.5 AE-SAM"] <= 1

    assert list(report["paired_vs_SAM"]) == [m for m in METHODS if m != "SAM"]
    assert list(report["paired_vs_SSAM"]) == SCHEDULED
    assert all(list(row) == PAIRED for row in report["paired_vs_SAM"].values())

    lines = (tmp_path / "study.md").read_text().splitlines()
    table = lines[:2 + len(METHODS)]
    assert table[0].startswith("| method |")
    assert [row.split("|")[1].strip() for row in table[2:]] == METHODS
    assert all(row.count("±") == len(METRICS) for row in table[2:])
    assert any(line.startswith("Paired by seed, minus SAM") for line in lines)
    assert any(line.startswith("Paired by seed, minus SSAM-D s=0.5") for line in lines)

    for plot in ("study.png", "study_cost.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --from-json re-renders the same tables from the runs alone
    again = tmp_path / "again"
    run_study("--from-json", str(tmp_path / "study.json"), "--out", str(again))
    assert (again / "study.md").read_text() == (tmp_path / "study.md").read_text()
    assert (again / "study_cost.png").is_file()
