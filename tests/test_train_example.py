"""The README's main job (python/train.py) runs end to end for every optimizer and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[1] / "python" / "train.py"


def load_train():
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "asam", "ssam-f", "ssam-d"])
def test_train_script_runs_and_learns(optimizer, tmp_path):
    out = tmp_path / "result.json"
    result = load_train().main(["--optimizer", optimizer, "--epochs", "2", "--quiet", "--device", "cpu",
                                "--fisher-samples", "32", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["config"]["optimizer"] == optimizer and len(saved["history"]) == 2
    assert result["final_test_accuracy"] > 0.5  # 10 classes: chance is 0.1
