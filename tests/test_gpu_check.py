"""The GPU validation harness (``python -m benchmarks.gpu_check``) on CPU: the whole run as a smoke test at
CPU-sized scales, and its parts (plan, budget, build record, JUnit merging, targets) on inputs whose
answers are known. The GPU run itself needs a GPU; everything it does besides the CUDA calls is here."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_numerics, harness, kernels, layouts, step
from ssam_kernels import ops
from ssam_kernels.ops import bitmask, reference


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stage that raises must be recorded and must not stop the others: the build stage (a no-op on CPU)
    # is replaced by one that raises.
    def broken_build(run: gpu_check.Run, limit_s: float) -> dict:
        raise RuntimeError("planted failure")

    monkeypatch.setitem(gpu_check.STAGES, "build", broken_build)
    out = tmp_path / "out"
    results = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])

    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "logs.tar.gz", "results.json", "summary.md"]
    stages = {s["name"]: s for s in results["stages"]}
    assert list(stages) == ["build", "tests", "numerics", "kernels", "step", "layouts"]
    assert stages["build"]["status"] == "error" and "planted failure" in stages["build"]["reason"]
    assert {name: s["status"] for name, s in stages.items() if name != "build"} == dict.fromkeys(
        ["tests", "numerics", "kernels", "step", "layouts"], "ok")

    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["torch"] and saved["meta"]["source_digest"]
    counts = saved["tests"]["counts"]
    assert counts["total"] > 0 and counts["passed"] > 0 and counts["failed"] == counts["errors"] == 0
    assert len(list(ET.parse(out / "junit.xml").getroot().iter("testcase"))) == counts["total"]

    records = saved["numerics"]["records"]
    # On CPU the device-path checks are the self-check alone (select_sync and graph_capture need CUDA).
    assert {r["check"] for r in records} == {"select_topk", "grad_sq_norm", "perturb_restore", "selfcheck"}
    assert {r["n"] for r in records if r["check"] != "selfcheck"} == {(1 << 20) + 4099, 1 << 20}  # CPU scales
    assert "reference" in {r["backend"] for r in records}
    assert all(r["status"] == "pass" for r in records)
    selections = [r for r in records if r["check"] == "select_topk"]
    assert selections[-1]["backend"] == "reference"  # the oracle last, in its own pass
    assert all(r["details"]["identical"] for r in selections[1:])  # same mask as the first backend's

    rows = saved["kernels"]["payloads"]["float32"]["results"]
    assert {r["op"] for r in rows} == set(kernels.IMPLS) and all(r["copy_fraction"] > 0 for r in rows)
    assert saved["step"]["payload"]["meta"]["models"] == ["resnet18"]
    layout_rows = {r["case"]: r for r in saved["layouts"]["payload"]["results"]}
    assert list(layout_rows) == ["tensors", "flat", "refcode"] and layout_rows["flat"]["full_median_ms"] > 0
    assert any(t["met"] is not None for t in saved["targets"])

    summary = (out / "summary.md").read_text()
    assert "- **device**: cpu" in summary
    assert f"**Tests: {counts['passed']} passed, 0 failed, 0 errors, {counts['skipped']} skipped" in summary
    assert "## Kernel bandwidth (float32" in summary and "## Numerics at scale" in summary
    assert "## Layouts: the whole step" in summary and "| flat |" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for name in ("gpu_check.log", "pytest-test_ops.log", "junit-test_ops.xml", "numerics/numerics.json",
                 "kernels-float32/kernels.json", "step/step.json", "layouts/layouts.json"):
        assert f"gpu_check/{name}" in names


def test_out_of_budget_run_still_writes_its_outputs(tmp_path: Path) -> None:
    # With no time for any stage, every stage is skipped with the reason, and the four files are written.
    results = gpu_check.main(["--device", "cpu", "--quick", "--budget", "1", "--out", str(tmp_path)])
    assert [s["status"] for s in results["stages"]] == ["skipped"] * 6
    assert all(s["reason"].startswith("budget:") for s in results["stages"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    assert "| tests | skipped |" in (tmp_path / "summary.md").read_text()


def test_plans() -> None:
    quick = gpu_check.make_plan("cuda", True, None, None)
    assert quick.stages == ("build", "tests", "numerics", "kernels", "step", "layouts")
    assert quick.budget_s == 540
    assert "gpt2_medium" in quick.layouts_args
    assert quick.test_files == gpu_check.CUDA_TEST_FILES and quick.pytest_args == ("-m", "not slow")
    assert "1048576,16777216,268435456" in quick.kernel_args and quick.suffix == ""
    part1, part2 = gpu_check.make_plan("cuda", False, 1, None), gpu_check.make_plan("cuda", False, 2, 400)
    assert part1.stages == ("build", "tests", "numerics")
    assert part2.stages == ("build", "kernels", "step", "layouts")
    cuda = len(gpu_check.CUDA_TEST_FILES)
    assert part1.pytest_args == () and part1.test_files[:cuda] == gpu_check.CUDA_TEST_FILES
    assert part1.test_files[cuda:cuda + 3] == gpu_check.CPU_TEST_FILES_FIRST
    every = {f"tests/{p.name}" for p in Path(__file__).parent.glob("test_*.py")}
    assert gpu_check.SELF_TEST in every and set(part1.test_files) == every - {gpu_check.SELF_TEST}
    assert part2.kernel_dtypes == ("float32", "bfloat16") and part2.budget_s == 400
    assert (part1.suffix, part2.suffix) == ("-part1", "-part2")
    assert gpu_check.make_plan("cuda", False, None, None).budget_s == 1080
    with pytest.raises(ValueError, match="part"):
        gpu_check.make_plan("cuda", True, 1, None)
    with pytest.raises(ValueError, match="device"):
        gpu_check.make_plan("mps", True, None, None)


def test_allowance_shares_the_budget() -> None:
    stages = tuple(gpu_check.WEIGHTS)
    assert gpu_check.allowance("build", 500, stages, "cuda") == pytest.approx(500 * 0.3)
    assert gpu_check.allowance("step", 100, ("step",), "cuda") == pytest.approx(100)  # the last takes all
    assert gpu_check.allowance("kernels", 40, ("kernels", "step"), "cuda") == pytest.approx(30)  # minimum
    assert gpu_check.allowance("tests", 10, stages[1:], "cuda") is None


def _run(tmp_path: Path, capability: tuple[int, int] | None) -> gpu_check.Run:
    plan = gpu_check.make_plan("cuda", True, None, None)
    return gpu_check.Run(plan, tmp_path, tmp_path, {"meta": {"capability": capability}}, print, 0.0)


def test_build_failure_is_recorded(tmp_path: Path) -> None:
    assert gpu_check.arch_list((9, 0)) == "9.0" and gpu_check.arch_list((12, 0)) == "12.0"
    fail = [sys.executable, "-c",
            "import os, sys; print('nvcc exploded', os.environ['TORCH_CUDA_ARCH_LIST']); sys.exit(3)"]
    record = gpu_check.stage_build(_run(tmp_path, (8, 6)), 60, fail)
    assert record["status"] == "failed" and record["rc"] == 3 and record["arch_list"] == "8.6"
    assert "native CUDA kernels unavailable" in record["reason"]
    assert "nvcc exploded 8.6" in (tmp_path / "build.log").read_text()
    assert gpu_check.stage_build(_run(tmp_path, None), 60, fail)["status"] == "failed"  # no GPU visible


def test_build_stopped_at_its_limit(tmp_path: Path) -> None:
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    record = gpu_check.stage_build(_run(tmp_path, (9, 0)), 1, hang)
    assert record["status"] == "timeout" and record["rc"] is None and record["build_seconds"] < 30
    assert "stopped at its wall-clock limit" in (tmp_path / "build.log").read_text()


def test_merge_junit_counts_every_outcome(tmp_path: Path) -> None:
    report = tmp_path / "a.xml"
    report.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.1"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="assert 1 == 2">'
        "trace</failure></testcase>"
        '<testcase classname="tests.test_a" name="test_skip" time="0"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>")
    merged = tmp_path / "junit.xml"
    counts = gpu_check.merge_junit([("tests/test_a.py", report, None),
                                    ("tests/test_b.py", tmp_path / "missing.xml", "stopped at the limit"),
                                    ("tests/test_c.py", None, "not run: out of time")], merged)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 2, "total": 5}
    assert gpu_check.junit_counts(merged) == counts
    problems = gpu_check.junit_problems(merged)
    assert problems == ["tests.test_a::test_bad: assert 1 == 2",
                        "tests/test_b.py::(whole file): stopped at the limit"]


@pytest.mark.slow
def test_tests_stage_cut_short(tmp_path: Path) -> None:
    # A file stopped at its wall-clock limit keeps the cases it finished and adds one error case; a file
    # the stage has no time left for is one skipped case. 30 s: the first file gets 25 (the last 5 are kept
    # for the second). The stage runs with SIGINT ignored, as in a job a script starts with `&` (CI's
    # runs): it must still interrupt its pytest at the limit, not kill it 15 s later with nothing written.
    for stem in ("test_sleepy", "test_late"):
        (tmp_path / f"{stem}.py").write_text("import time\n\ndef test_fast():\n    pass\n\n"
                                              "def test_slow():\n    time.sleep(120)\n")
    plan = dataclasses.replace(gpu_check.make_plan("cpu", True, None, None), pytest_args=(),
                               test_files=(str(tmp_path / "test_sleepy.py"), str(tmp_path / "test_late.py")))
    raw = tmp_path / "raw"
    raw.mkdir()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        record = gpu_check.stage_tests(gpu_check.Run(plan, raw, raw, {"meta": {}}, print, 0.0), 30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert record["status"] == "failed"
    assert record["counts"] == {"passed": 1, "failed": 0, "errors": 1, "skipped": 1, "total": 3}
    sleepy, late = record["files"]
    assert sleepy["rc"] is None and "wall-clock limit" in sleepy["problem"] and sleepy["seconds"] < 40
    assert late["status"] == "not run"
    assert "KeyboardInterrupt" in (raw / "pytest-test_sleepy.log").read_text()


def test_targets() -> None:
    n, elem = 1 << 28, 4

    def row(op: str, impl: str, median: float, fraction: float, nbytes: int = 1000) -> dict:
        return {"op": op, "impl": impl, "n": n, "median_s": median, "copy_fraction": fraction,
                "bytes": nbytes, "copy_gbps": 2000.0 if nbytes > 1000 else 1.0}

    rows = [row(op, "native", 1.0, 0.86 if op != "restore_" else 0.84) for op in gpu_check.STREAMING_OPS]
    rows += [row("select_topk", "native", 1.0, 0.1), row("select_topk", "torch.topk", 4.0, 0.1, 10**9),
             row("perturb_", "native", 1.0, 0.5) | {"n": n // 2}]  # a smaller size is not judged
    params, k = 100_000_000, 50_000_000
    floor_s = gpu_check.step_floor_bytes(params, k, elem, True) / 2000e9
    step = {"meta": {"model_shapes": {"gpt": {"params": params, "element_bytes": elem}}}, "results": [
        {"model": "gpt", "method": "fast", "family": "ours", "backend": "native", "policy": "fisher",
         "sparsity": 0.5, "perturb_restore": {"median_s": 1.1 * floor_s},
         "x_vs_loop": {"perturb_restore": 12}},
        {"model": "gpt", "method": "slow", "family": "ours", "backend": "triton", "policy": None,
         "sparsity": 0.0, "perturb_restore": {"median_s": 1.0}, "x_vs_loop": {"perturb_restore": 3.0}},
        {"model": "gpt", "method": "oracle", "family": "ours", "backend": "reference", "policy": None,
         "sparsity": 0.0, "perturb_restore": {"median_s": 9.0}, "x_vs_loop": {}},
        {"model": "gpt", "method": "refcode", "family": "loop", "policy": None, "sparsity": 0.0}]}
    targets = gpu_check.evaluate_targets({"float32": {"results": rows}}, step)
    met = {(t["target"].split()[0], t["subject"]): t["met"] for t in targets}
    assert met[(">=", "restore_ [native] float32 N=2^28")] is False
    assert met[(">=", "perturb_ [native] float32 N=2^28")] is True
    assert met[(">=", "perturb_ [triton] float32 N=2^28")] is None  # not measured: listed, not hidden
    assert met[("exact-K", "select_topk [native] float32 N=2^28")] is False  # 4x, target 5x
    floors = {t["subject"]: t for t in targets if t["target"].startswith("first_step")}
    assert floors["gpt fast"]["value"] == pytest.approx(1.1) and floors["gpt fast"]["met"] is True
    assert floors["gpt slow"]["met"] is False and "gpt oracle" not in floors  # only the fused backends
    refcode = {t["subject"]: t["met"] for t in targets if t["target"].startswith(">= 10x")}
    assert refcode == {"gpt fast": True, "gpt slow": False}
    step["meta"]["model_shapes"]["gpt"]["params"] = gpu_check.MIN_STEP_PARAMS - 1  # a small model: not judged
    small = [t for t in gpu_check.evaluate_targets({}, step) if t["subject"] == "gpt fast"]
    assert [t["met"] for t in small] == [None, None] and "100 M parameters" in small[0]["reason"]


def test_step_floor_bytes() -> None:
    n, k, e = 32 * 1024, 8 * 1024, 2
    mask, offsets = 4 * 1024, 8 * (32 + 1)
    # norm reads G; perturb reads W, G, mask, offsets and writes backup and W at K entries; restore reads
    # the backup, mask, offsets and writes W at K entries
    assert gpu_check.step_floor_bytes(n, k, e, True) == n * e + (2 * n * e + 2 * k * e) + 2 * k * e \
        + 2 * (mask + offsets)
    assert gpu_check.step_floor_bytes(n, n, e, False) == 7 * n * e


def test_benchmarks_stop_at_the_time_limit(tmp_path: Path) -> None:
    # --time-limit: cases not started by then are listed as skipped, and the outputs are still written.
    common = ["--device", "cpu", "--runs", "1", "--warmup", "1", "--quiet", "--no-plots", "--threads", "1",
              "--time-limit", "0"]
    payload = kernels.main([*common, "--sizes", "256,1024", "--out", str(tmp_path / "k")])
    assert payload["results"] == [] and payload["meta"]["time_limit_s"] == 0
    assert [s["n"] for s in payload["skipped"]] == [256, 1024]
    assert all("past --time-limit" in s["reason"] for s in payload["skipped"])
    assert json.loads((tmp_path / "k" / "kernels.json").read_text())["skipped"] == payload["skipped"]
    payload = step.main([*common, "--models", "resnet18", "--scale", "0.02", "--batch", "2",
                         "--out", str(tmp_path / "s")])
    rows = payload["results"]
    assert rows and all("past --time-limit" in r["skipped"]["all"] for r in rows)
    assert (tmp_path / "s" / "step.md").exists()
    payload = layouts.main(["--model", "resnet18", "--scale", "0.02", "--batch", "2", "--runs", "1",
                            "--warmup", "1", "--quiet", "--threads", "1", "--time-limit", "0",
                            "--out", str(tmp_path / "l")])
    assert all(r["rounds_done"] == 0 and r["full_median_ms"] is None for r in payload["results"])
    assert "round 1: not started, past --time-limit" in (tmp_path / "l" / "layouts.log").read_text()
    assert (tmp_path / "l" / "layouts.md").exists()


def test_log_without_tqdm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(harness, "tqdm", None)
    log = harness.Log(tmp_path / "x.log")
    bar = log.progress(3, "work")
    bar.update()
    bar.set_postfix_str("case")
    bar.close()
    log.write("a line")
    log.close()
    assert capsys.readouterr().out == "a line\n" and (tmp_path / "x.log").read_text() == "a line\n"


def _recorder(tmp_path: Path, backends: list[str]) -> gpu_numerics.Recorder:
    return gpu_numerics.Recorder(torch.device("cpu"), backends, tmp_path, harness.Log(None, quiet=True), None,
                                 {})


def test_numerics_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks and an odd size: the blocked verification (mask words, backup slices per block, the
    # last partial word) is exercised as at 2^30 on a GPU.
    monkeypatch.setattr(gpu_numerics, "BLOCK", 4 * 1024)
    n = 3 * 4 * 1024 + 77
    backends = [b for b in ("reference", "native") if "cpu" in ops.available_backends().get(b, [])]
    recorder = _recorder(tmp_path, backends)
    gen = torch.Generator().manual_seed(1)
    gpu_numerics.check_select(n, torch.device("cpu"), gen, recorder)
    gpu_numerics.check_norm(n, torch.device("cpu"), gen, recorder)
    gpu_numerics.check_perturb_restore(n, [torch.float32, torch.bfloat16], torch.device("cpu"), gen, recorder)
    records = recorder.payload["records"]
    assert len(records) == len(backends) * 5 and all(r["n"] == n for r in records)
    assert all(r["status"] == "pass" for r in records), [r for r in records if r["status"] != "pass"]
    assert json.loads((tmp_path / "numerics.json").read_text())["records"] == records


def test_verify_selection_catches_wrong_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_numerics, "BLOCK", 1024)
    n = 5000
    scores = torch.randint(0, 8, (n,)).to(torch.float16)  # 8 values: heavy ties
    scores[-3:] = float("inf")
    k = n // 3
    (mask, offsets), = ops.select_topk([scores], k, backend="reference")
    good = gpu_numerics.verify_selection(scores, mask, offsets, k)
    assert good["passed"] and good["min_selected_key"] == good["max_unselected_key"]  # the threshold ties
    taken = bitmask.unpack(mask, n)
    keys = reference.score_keys(scores)
    ties = keys == good["min_selected_key"]

    def check(bits: torch.Tensor) -> dict:
        words, offs = bitmask.from_bool(bits)
        return gpu_numerics.verify_selection(scores, words, offs, k)

    fewer = taken.clone()
    fewer[int(taken.nonzero()[0])] = False
    assert not check(fewer)["passed"]  # one entry short of K
    swapped = taken.clone()
    swapped[int((taken & (keys > good["min_selected_key"])).nonzero()[0])] = False
    swapped[int((~taken & (keys < good["min_selected_key"])).nonzero()[0])] = True
    assert not check(swapped)["passed"]  # K entries, but a smaller score taken over a larger one
    reordered = taken.clone()
    reordered[int((taken & ties).nonzero()[0])] = False
    reordered[int((~taken & ties).nonzero()[-1])] = True
    assert not check(reordered)["passed"]  # K entries, right values, ties not in index order
    late = taken.clone()
    late[-1] = False
    late[int((~taken & ties).nonzero()[0])] = True
    assert not check(late)["passed"]  # an +inf at the end left out
