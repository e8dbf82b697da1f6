"""Smoke test of the benchmark scripts (benchmarks/kernels.py, benchmarks/step.py,
benchmarks/layouts.py): tiny sizes, one or two runs, outputs into a temporary directory; checks the JSON
and Markdown structure so the scripts cannot rot. Timings are not checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm", reason="the benchmarks need the 'bench' extra")
from benchmarks import kernels, layouts, step

COMMON = ["--device", "cpu", "--runs", "2", "--warmup", "1", "--quiet", "--no-plots", "--threads", "1"]


def test_kernels_script(tmp_path: Path) -> None:
    kernels.main([*COMMON, "--sizes", "8:10:2", "--tensors", "7", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "kernels.json").read_text())
    meta = payload["meta"]
    for key in ("device_name", "torch", "triton", "cuda", "commit", "sizes", "dtype", "runs", "date_utc"):
        assert key in meta
    assert meta["sizes"] == [256, 1024] and meta["runs"] == 2
    results = payload["results"]
    assert {r["op"] for r in results} == set(kernels.IMPLS)
    assert {"reference", "foreach", "refcode", "torch.topk", "torch.kthvalue"} <= {r["impl"] for r in results}
    for r in results:
        assert r["runs"] == 2 and r["bytes"] == kernels.op_bytes(r["op"], r["n"], r["k"], 4)
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["gbps"] > 0 and r["copy_gbps"] > 0 and r["copy_fraction"] > 0
    assert all(r["x_vs_refcode"] for r in results if r["op"] == "perturb_")
    md = (tmp_path / "kernels.md").read_text()
    assert "## perturb_" in md and "## Byte model" in md and "| N | impl |" in md
    assert (tmp_path / "kernels.log").read_text().count("median") == len(results)


def test_step_script(tmp_path: Path) -> None:
    step.main([*COMMON, "--models", "resnet18", "--scale", "0.02", "--batch", "2", "--out", str(tmp_path),
               "--threads", "1,2"])
    payload = json.loads((tmp_path / "step.json").read_text())
    shape = payload["meta"]["model_shapes"]["resnet18"]
    assert shape["tensors"] == 62
    assert payload["meta"]["thread_counts"] == [1, 2] and {r["threads"] for r in payload["results"]} == {1, 2}
    rows = {r["method"]: r for r in payload["results"] if r["threads"] == 1}
    assert {"SGD", "AdamW", "loop SAM", "refcode SSAM-F s=0.5", "sk.SAM[reference]",
            "sk.SSAM-D[reference] s=0.9"} <= set(rows)
    for r in rows.values():
        assert r["overhead"]["runs"] == 2 and r["full"]["median_s"] > 0
    assert rows["SGD"]["state_bytes_per_param"] == pytest.approx(4, rel=0.01)  # momentum
    assert rows["refcode SSAM-F s=0.5"]["extra_bytes_per_param"] == pytest.approx(8, rel=0.01)  # mask + e_w
    # ours at s = 0.5 in the tensors layout (the default): a compact fp32 backup of half the entries, per
    # tensor its bit mask (whole 32-bit words) and its int64 chunk offsets (one more than its chunks), and
    # the last gradient norm (float64)
    assert payload["meta"]["layout"] == "auto"
    bound = 0.5 * 4 + 1 / 8 + 1 / 128 + ((4 + 16) * shape["tensors"] + 8) / shape["params"]
    assert 2.0 < rows["sk.SSAM-F[reference] s=0.5"]["extra_bytes_per_param"] <= bound
    assert rows["sk.SSAM-D[reference] s=0.5"]["update_s"] is not None
    assert rows["sk.SSAM-F[reference] s=0.5"]["x_vs_loop"]["overhead"] > 0
    md = (tmp_path / "step.md").read_text()
    assert "## resnet18" in md and "| method |" in md and "sk.SSAM-F[reference] s=0.9" in md
    assert "## Against the published code" in md and "overhead x, 2t" in md and "SSAM-D refresh x, 1t" in md


@pytest.mark.parametrize("base,shapes", [("sgd", "1d"), ("sgd-foreach", "mixed")])
def test_layouts_script(base: str, shapes: str) -> None:
    results = layouts.main(["--tensors", "12", "--rounds", "1", "--runs", "2", "--threads", "1",
                            "--base", base, "--backend", "reference", "--shapes", shapes,
                            "--clock", "thread" if shapes == "mixed" else "wall"])
    assert results["flat_ms"] > 0 and results["tensors_ms"] > 0
    assert results["ratio"] == results["tensors_ms"] / results["flat_ms"]
    assert results["base"] == base and results["tensors"] == 12 and results["shapes"] == shapes
    params = layouts.make_params(4, 0, torch.float32, torch.device("cpu"), shapes)
    assert [p.dim() for p in params] == ([1, 1, 1, 1] if shapes == "1d" else [1, 2, 1, 2])
    sizes = [p.numel() for p in layouts.make_params(50, 0, torch.float32, torch.device("cpu"), max_entries=3)]
    assert set(sizes) == {1, 2, 3}
    with pytest.raises(ValueError, match="max_entries"):
        layouts.make_params(1, 0, torch.float32, torch.device("cpu"), max_entries=0)


def test_layouts_whole_step_on_a_model(tmp_path: Path) -> None:
    payload = layouts.main(["--model", "resnet18", "--scale", "0.02", "--batch", "2", "--rounds", "2",
                            "--runs", "2", "--warmup", "1", "--threads", "1", "--backend", "reference",
                            "--clock", "thread", "--quiet", "--out", str(tmp_path)])
    assert payload["meta"]["timer"].startswith("thread_time")
    rows = {r["case"]: r for r in payload["results"]}
    assert list(rows) == list(layouts.MODEL_CASES) == ["tensors", "flat", "refcode"]
    assert rows["tensors"]["layout"] == "tensors" and rows["flat"]["layout"] == "flat"
    for r in rows.values():
        assert r["rounds_done"] == 2 and len(r["full_ms"]) == len(r["overhead_ms"]) == 2
        assert r["full_median_ms"] > 0 and r["overhead_median_ms"] > 0
    assert rows["tensors"]["full_vs_tensors"] == rows["tensors"]["overhead_vs_tensors"] == 1
    flat, tensors = rows["flat"], rows["tensors"]
    assert flat["full_vs_tensors"] == flat["full_median_ms"] / tensors["full_median_ms"]
    # Between steps the flat layout keeps its gradient buffer (4 bytes per fp32 parameter); PyTorch, and so
    # the tensors layout, frees the gradients at zero_grad(). The tensors layout's per-tensor mask words and
    # chunk offsets take back a little of it on this tiny model (62 tensors, 4661 parameters).
    n = payload["meta"]["params"]
    assert 3.5 * n < flat["held_bytes"] - tensors["held_bytes"] <= 4 * n
    md = (tmp_path / "layouts.md").read_text()
    assert "| flat |" in md and "| refcode |" in md and "resnet18 at width x0.02" in md
    assert (tmp_path / "layouts.log").read_text().count("\nround ") == 2
