"""Does SSAM do what the paper claims? SGD, SAM, SSAM-F and SSAM-D over several seeds on MNIST-1D.

For every method and seed: train with ``train.py``'s recipe, then measure at the final weights the test
accuracy, the training time per epoch, and the sharpness (``sharpness.py``) on a fixed subset of the
training data: the top Hessian eigenvalue, and the loss increase under a random and under an adversarial
(SAM-style, gradient-direction) perturbation of radius ``rho``. Reports mean ± sample std over seeds.

    python python/study.py                  # the full study (5 seeds x 6 methods), ~6 min on 2 CPU cores
    python python/study.py --quick          # CI smoke run: 2 seeds, 3 epochs, small sharpness budget
    python python/study.py --from-json python/results/study.json   # re-render table and plot only

Writes to ``--out`` (default ``python/results/``): ``study.json`` (every run and the summary),
``study.md`` (the table) and ``study.png`` (accuracy and sharpness per method, error bars = std).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import cli
import torch
import train
from data import Dataset, load_dataset
from matplotlib.figure import Figure
from sharpness import sharpness
from tqdm import tqdm

import ssam_kernels as sk


@dataclass(frozen=True)
class Method:
    label: str
    optimizer: str
    sparsity: float = 0.0


METHODS = (
    Method("SGD", "sgd"), Method("SAM", "sam"),
    Method("SSAM-F s=0.5", "ssam-f", 0.5), Method("SSAM-F s=0.9", "ssam-f", 0.9),
    Method("SSAM-D s=0.5", "ssam-d", 0.5), Method("SSAM-D s=0.9", "ssam-d", 0.9),
)
# (key in a run's record, column title, format of mean and std)
METRICS = (
    ("test_accuracy", "test accuracy (%)", "{:.2f}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("hessian_top_eigenvalue", "λ_max(H)", "{:.2f}"),
    ("random_loss_increase", "ΔL random (r=rho)", "{:.1e}"),
    ("random_loss_increase_large", "ΔL random (r=R)", "{:.4f}"),
    ("adversarial_loss_increase", "ΔL adversarial", "{:.4f}"),
    ("seconds_per_epoch", "s / epoch", "{:.2f}"),
)
PAIRED = ("test_accuracy", "hessian_top_eigenvalue", "adversarial_loss_increase")
QUICK = {"seeds": 2, "epochs": 3, "sharpness_samples": 256}


def run_one(method: Method, seed: int, args: argparse.Namespace, dataset: Dataset) -> dict:
    """Train one (method, seed) and measure it; returns the flat record stored in the JSON."""
    argv = ["--optimizer", method.optimizer, "--sparsity", str(method.sparsity), "--seed", str(seed),
            "--dataset", args.dataset, "--model", args.model, "--width", str(args.width),
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--rho", str(args.rho),
            "--device", args.device, "--threads", str(args.threads), "--quiet"]
    trained = train.train(train.parse_args(argv), dataset)
    result, data = trained.result, trained.dataset
    # The same first n training samples for every run: sharpness of the same loss function.
    x = data.prepare(data.x_train[:args.sharpness_samples], None, False)
    y = data.y_train[:args.sharpness_samples]
    measured = sharpness(trained.model, x, y, args.rho, args.random_radius, seed=seed)
    return {"method": method.label, "optimizer": method.optimizer, "sparsity": method.sparsity, "seed": seed,
            "test_accuracy": 100 * result["final_test_accuracy"], "train_accuracy":
            100 * result["final_train_accuracy"], "train_loss": result["final_train_loss"],
            "seconds_per_epoch": result["seconds_per_epoch"], "sharpness_loss": measured["loss"],
            **{k: v for k, v in measured.items() if k != "loss"},
            "history": result["history"]}


def _stats(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    """Per method and metric: mean, sample standard deviation (n − 1) and n over seeds."""
    methods = dict.fromkeys(r["method"] for r in runs)
    return {m: {key: _stats([r[key] for r in runs if r["method"] == m]) for key, _, _ in METRICS}
            for m in methods}


def paired(runs: list[dict], reference: str, keys: tuple[str, ...] = PAIRED) -> dict:
    """Per method: mean ± std over seeds of ``metric(method, seed) − metric(reference, seed)``. A seed fixes
    the initial weights and the batch order for every method, so the pairing removes their share of the
    seed-to-seed spread."""
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["method"] == reference})
    if not seeds:
        return {}
    return {m: {key: _stats([by[m, s][key] - by[reference, s][key] for s in seeds if (m, s) in by])
                for key in keys}
            for m in dict.fromkeys(r["method"] for r in runs) if m != reference}


def markdown_table(summary: dict, metrics: tuple[tuple[str, str, str], ...] = METRICS) -> str:
    """One row per method, ``mean ± std`` per metric."""
    header = "| method | " + " | ".join(title for _, title, _ in metrics) + " |"
    lines = [header, "|---|" + "---:|" * len(metrics)]
    for method, values in summary.items():
        cells = [f"{fmt.format(values[key]['mean'])} ± {fmt.format(values[key]['std'])}"
                 for key, _, fmt in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> str:
    """``study.json``, ``study.md`` (the summary table, then the paired differences to SAM) and
    ``study.png`` in ``out``; returns the Markdown."""
    config, runs = report["config"], report["runs"]
    markdown = markdown_table(report["summary"])
    if report["paired_vs_SAM"]:
        markdown += ("\nPaired by seed, minus SAM (same initial weights and batch order):\n\n"
                     + markdown_table(report["paired_vs_SAM"], tuple(m for m in METRICS if m[0] in PAIRED)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(report, indent=2))
    (out / "study.md").write_text(markdown)
    title = (f"{config['dataset']} / {config['model']}, {config['epochs']} epochs, rho={config['rho']}, "
             f"R={config['random_radius']}, {config['seeds']} seeds (bars: mean ± std, dots: seeds)")
    plot(runs, report["summary"], out / "study.png", title)
    return markdown


def plot(runs: list[dict], summary: dict, path: Path, title: str) -> None:
    """Bars of the mean with std error bars, and every seed as a dot, for accuracy and sharpness."""
    panels = [m for m in METRICS if m[0] in ("test_accuracy", "hessian_top_eigenvalue",
                                             "adversarial_loss_increase", "random_loss_increase_large")]
    methods = list(summary)
    fig = Figure(figsize=(4.2 * len(panels), 4.2))  # no pyplot: no GUI backend, no global state
    axes = fig.subplots(1, len(panels))
    for ax, (key, name, _) in zip(axes, panels, strict=True):
        means = [summary[m][key]["mean"] for m in methods]
        stds = [0.0 if math.isnan(summary[m][key]["std"]) else summary[m][key]["std"] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, m in enumerate(methods):
            values = [r[key] for r in runs if r["method"] == m]
            ax.plot([i] * len(values), values, "k.", markersize=4)
        if key == "test_accuracy":  # the differences are small: zoom on the range of the runs
            values = [r[key] for r in runs]
            spread = max(values) - min(values)
            ax.set_ylim(min(values) - spread - 0.5, max(values) + spread + 0.5)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--from-json", type=Path, default=None,
                        help="no training: re-render the table and plot of an existing study.json into --out")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI smoke run ({QUICK}); explicit flags below still override it")
    parser.add_argument("--seeds", type=cli.positive_int, default=None,
                        help="seeds 0..n-1; None: 5, or 2 with --quick")
    parser.add_argument("--epochs", type=cli.positive_int, default=None, help="None: 50, or 3 with --quick")
    parser.add_argument("--sharpness-samples", type=cli.positive_int, default=None,
                        help="training samples the sharpness is measured on; None: 1000, or 256 with --quick")
    parser.add_argument("--methods", nargs="+", default=[m.label for m in METHODS],
                        choices=[m.label for m in METHODS], metavar="METHOD",
                        help="subset of the methods")
    parser.add_argument("--dataset", default="mnist1d", choices=("mnist1d", "digits"), help="embedded")
    parser.add_argument("--model", default="cnn1d", choices=("cnn1d", "mlp"), help="python/models.py")
    parser.add_argument("--width", type=cli.positive, default=1.0, help="multiplies every channel count")
    parser.add_argument("--lr", type=cli.non_negative, default=0.1, help="initial learning rate")
    parser.add_argument("--rho", type=cli.non_negative, default=0.05, help="training and sharpness radius")
    parser.add_argument("--random-radius", type=cli.positive, default=1.0,
                        help="R: the second radius of the random perturbation")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="small models: one thread is fastest")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where study.json, study.md and study.png go")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"seeds": 5, "epochs": 50, "sharpness_samples": 1000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        report["summary"] = summarise(report["runs"])
        report["paired_vs_SAM"] = paired(report["runs"], "SAM")
        print(write_outputs(report, args.out))
        return report
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, torch.device(args.device))
    methods = [m for m in METHODS if m.label in args.methods]
    jobs = [(m, seed) for seed in range(args.seeds) for m in methods]  # seeds outer: load drifts hit all
    runs = []
    with tqdm(jobs, desc="study", unit="run") as bar:
        for method, seed in bar:
            bar.set_postfix(method=method.label, seed=seed)
            runs.append(run_one(method, seed, args, dataset))
            r = runs[-1]
            tqdm.write(f"{method.label:>13} seed {seed}: test {r['test_accuracy']:.2f}%  "
                       f"λ_max {r['hessian_top_eigenvalue']:.2f}  "
                       f"ΔL_adv {r['adversarial_loss_increase']:.4f}  "
                       f"ΔL_rand(R) {r['random_loss_increase_large']:.4f}  "
                       f"{r['seconds_per_epoch']:.2f} s/epoch")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {
        "config": config, "summary": summarise(runs), "paired_vs_SAM": paired(runs, "SAM"), "runs": runs,
        "wall_seconds": time.perf_counter() - started,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
                        "load_average_at_end": os.getloadavg(), "backends": sk.available_backends()},
    }
    print(write_outputs(report, args.out))
    print(f"wall time {report['wall_seconds']:.0f} s -> {args.out}")
    return report


if __name__ == "__main__":
    main()
