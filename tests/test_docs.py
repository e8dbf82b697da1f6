"""The documentation is checked like code: the README's length, every relative link and anchor, every
reference to a page from the code, and every ```python block of the README and the docs pages (each is
executed here or by the test named for it, or compiled where it needs what CPU tests cannot have)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import ssam_kernels as sk
from tests.helpers import ROOT, python_blocks

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
         "benchmarks/README.md"]
HEADING = re.compile(r"^(#+) (.*)$", re.M)

EXECUTED_HERE = {
    ("README.md", "Using the optimizer"): 2,  # the block count under that heading
    ("docs/usage.md", "Defaults"): 1,
    ("docs/usage.md", "Rebuilding the optimizer, and `close()`"): 1,
    ("docs/usage.md", "Masks"): 1,
    ("docs/usage.md", "Schedules: skipping the second pass"): 1,
    ("docs/checkpoints.md", "Checkpoints"): 1,
    ("docs/building.md", "Build from source with a CUDA toolkit"): 1,
}
EXECUTED_ELSEWHERE = {
    ("docs/recipes.md", "Hugging Face `Trainer`"):
        "tests/test_integrations_transformers.py::test_trainer_recipe",
    ("docs/recipes.md", "Lightning"): "tests/test_lightning.py (recipe_module)",
    ("docs/recipes.md", "Gradient accumulation, clipping and `GradScaler` (plain PyTorch)"):
        "tests/test_integrations_pytorch.py (recipe)",
    ("docs/recipes.md", "`torch.compile`"): "tests/test_integrations_pytorch.py (recipe)",
    ("docs/recipes.md", "`FisherMask` on real models"): "tests/test_fisher.py::test_fisher_mask_recipe",
    ("docs/safety.md", "A step either completes or leaves the weights as they were"):
        "tests/test_step_safety.py::test_perturbed_context_manager (and ..._after_unscale_and_skipped_step)",
}
COMPILED_ONLY = {  # what they need, CPU tests cannot have; what they do is tested in the file named
    ("docs/distributed.md", "Distributed training"): "a DDP process group (tests/test_distributed.py)",
    ("docs/distributed.md", "Checkpoints under FSDP2"): "FSDP2 ranks (tests/distributed_worker.py)",
    ("docs/building.md", "CMake build and C++ tests"): "the CMake build (CI runs it)",
}


def without_code(text: str) -> str:
    """``text`` with every fenced code block blanked (same length: positions stay valid), so that its
    comment lines are not taken for headings and its brackets for links."""
    return re.sub(r"^```.*?^```", lambda m: " " * len(m.group(0)), text, flags=re.S | re.M)


def blocks(page: str) -> list[tuple[str, str]]:
    """``(heading, code)`` of every ```python block of ``page``, with the heading it stands under."""
    text = (ROOT / page).read_text()
    headings = [(m.start(), m.group(2).strip()) for m in HEADING.finditer(without_code(text))]
    return [([h for start, h in headings if start < position][-1], code)
            for position, code in python_blocks(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for _, h in HEADING.findall(without_code(page.read_text()))}


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_anchors_resolve(page: str) -> None:
    path = ROOT / page
    text = without_code(path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page}: link to {target}: no such heading"


def test_pages_named_in_the_code_exist() -> None:
    sources = [p for d in ("ssam_kernels", "python", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]
    sources += [ROOT / "setup.py"]
    cited = 0
    for source in sources:
        text = source.read_text()
        for page in re.findall(r"\b(docs/[\w.-]+\.md|README\.md|benchmarks/[\w.-]+\.md)", text):
            assert (ROOT / page).exists(), f"{source}: names {page}"
        for page, section in re.findall(r"\b((?:docs/)?[\w-]+\.md), \"([^\"]+)\"", text):
            path = ROOT / page if "/" in page else ROOT / "docs" / page
            titles = [h.replace("`", "") for _, h in HEADING.findall(without_code(path.read_text()))]
            wanted = section.replace("`", "")
            assert any(t.startswith(wanted) for t in titles), f"{source}: {page}, {section!r}"
            cited += 1
    assert cited >= 5  # the pattern still finds the code's citations


def test_every_python_block_is_checked() -> None:
    seen: dict[tuple[str, str], int] = {}
    for page in PAGES:
        for heading, code in blocks(page):
            compile(code, f"{page} ({heading})", "exec")
            key = (page, heading)
            seen[key] = seen.get(key, 0) + 1
            assert key in EXECUTED_HERE or key in EXECUTED_ELSEWHERE or key in COMPILED_ONLY, key
    for key, count in EXECUTED_HERE.items():
        assert seen.get(key) == count, key
    assert set(EXECUTED_ELSEWHERE) | set(COMPILED_ONLY) <= set(seen)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def namespace(**extra: object) -> dict[str, object]:
    """What the blocks assume exists: a model, its loss, a batch, and an optimizer over the model."""
    model = mlp()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, mask=sk.DynamicMask(interval=1))
    return {"torch": torch, "nn": nn, "sk": sk, "model": model, "loss_fn": nn.functional.cross_entropy,
            "x": x, "y": y, "opt": opt} | extra


def run_block(code: str, names: dict[str, object]) -> list[str]:
    """Execute ``code`` in ``names``; checks that what it prints is what its comments after each
    ``print(...)`` line say (the backend ``auto`` picked may differ from the one written)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<doc block>", "exec"), names)
    lines = code.splitlines()
    expected = [line.removeprefix("# ") for i, line in enumerate(lines)
                if line.startswith("# ") and i and lines[i - 1].startswith("print(")]
    printed = out.getvalue().splitlines()
    picked = ops_backend_name()
    assert printed == [e.replace("(cpu: native)", f"(cpu: {picked})") for e in expected]
    return printed


def ops_backend_name() -> str:
    return sk.ops.resolve_backend(None, torch.device("cpu")).__name__.rpartition(".")[2]


def test_readme_example_runs_and_prints_what_it_says() -> None:
    first, three_ways = [code for heading, code in blocks("README.md") if heading == "Using the optimizer"]
    names = namespace()
    assert run_block(first, names)  # the default optimizer's repr, as printed in the README
    opt, model = names["opt"], names["model"]
    before = [p.detach().clone() for p in model.parameters()]
    # the README's mixed-precision way runs on CUDA; on CPU, CPU autocast and a CPU GradScaler
    code = three_ways if torch.cuda.is_available() else three_ways.replace('"cuda"', '"cpu"')
    run_block(code, names)
    assert opt.steps == 4 and names["scaler"].is_enabled()  # two steps, two closure steps, the scaler's
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("heading", ["Defaults", "Rebuilding the optimizer, and `close()`", "Masks",
                                     "Schedules: skipping the second pass"])
def test_usage_blocks_run(heading: str) -> None:
    (code,) = [c for h, c in blocks("docs/usage.md") if h == heading]
    names = namespace()
    run_block(code, names)
    if heading.startswith("Rebuilding"):
        params = list(names["model"].parameters())
        assert all(not p._post_accumulate_grad_hooks for p in params)  # both optimizers' hooks are gone
        assert all(p.grad is not None and p.grad._base is None for p in params)  # own gradients
    if heading == "Masks":
        assert sum(int(m.sum()) for m in names["opt"].get_mask()) == names["opt"].live_count


def test_checkpoint_block_resumes(tmp_path: Path) -> None:
    (code,) = [c for _, c in blocks("docs/checkpoints.md")]
    names = namespace(path=tmp_path / "ckpt.pt")
    model, opt, x, y = names["model"], names["opt"], names["x"], names["y"]

    def step(model: nn.Module, opt: sk.SSAM) -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    step(model, opt)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, names["path"])
    step(model, opt)
    resumed = namespace(path=names["path"])
    # the block saves, then loads into "model" and "opt": run only its load half in the fresh objects
    run_block(code.split("# later,")[1].split("\n", 1)[1], resumed)
    step(resumed["model"], resumed["opt"])
    for p, q in zip(model.parameters(), resumed["model"].parameters(), strict=True):
        assert torch.equal(p, q)
    run_block(code, namespace(path=tmp_path / "again.pt"))  # the whole block, as written


def test_building_check_block_runs() -> None:
    (code,) = [c for h, c in blocks("docs/building.md") if h == "Build from source with a CUDA toolkit"]
    exec(compile(code, "docs/building.md", "exec"), {})  # prints what this machine has (not compared)
