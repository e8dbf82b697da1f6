"""Does SSAM do what the paper claims, and at what cost? SGD, SAM, SSAM-F and SSAM-D, and SSAM-D with
schedules that skip the second pass on most steps (EveryK, LookSAM, AE-SAM), over several seeds on MNIST-1D.

For every method and seed: train with ``train.py``'s recipe, then measure at the final weights the test
accuracy, the training time per epoch, and the sharpness (``sharpness.py``) on a fixed subset of the
training data: the top Hessian eigenvalue, and the loss increase under a random and under an adversarial
(SAM-style, gradient-direction) perturbation of radius ``rho``. The cost: seconds per epoch divided by
SGD's of the same seed (``relative_cost``), and the fraction of steps that took SAM's second pass
(``sam_fraction``). Reports mean ± sample std over seeds, and differences paired by seed.

Timing is made as fair as a shared machine allows: one thread per run, the same ssam_kernels backend for
every method, the runs interleaved by seed (every method for seed 0, then seed 1, ...) so that a change of
the machine's load hits every method alike; the load average is recorded before and after.

    python python/study.py                  # the full study (5 seeds x 7 methods), ~5 min on 2 CPU cores
    python python/study.py --quick          # CI smoke run: 2 seeds, 3 epochs, small sharpness budget
    python python/study.py --methods SGD SAM "SSAM-D s=0.9"   # a subset, or methods not run by default
    python python/study.py --from-json python/results/study.json   # re-render tables and plots only

Writes to ``--out`` (default ``python/results/``): ``study.json`` (every run and the summary),
``study.md`` (the tables), ``study.png`` (accuracy and sharpness per method, error bars = std) and
``study_cost.png`` (accuracy and λ_max against the relative cost).
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
    schedule: str = "every-step"  # train.py's --schedule; k and alpha as LookSAM's paper
    k: int = 5
    alpha: float = 0.7

    def argv(self) -> list[str]:
        """``train.py``'s options for this method."""
        argv = ["--optimizer", self.optimizer, "--sparsity", str(self.sparsity)]
        if self.schedule != "every-step":
            argv += ["--schedule", self.schedule]
        if self.schedule in ("every-k", "looksam"):
            argv += ["--schedule-k", str(self.k)]
        if self.schedule == "looksam":
            argv += ["--looksam-alpha", str(self.alpha)]
        return argv


# The schedules run on SSAM-D s=0.5: as flat as SAM in the first study (paired λ_max +0.03 ± 0.13), and,
# unlike SSAM-F, without a Fisher pass per epoch, a cost that no schedule removes.
SCHEDULE_BASE = "SSAM-D s=0.5"
METHODS = (
    Method("SGD", "sgd"), Method("SAM", "sam"),
    Method("SSAM-F s=0.5", "ssam-f", 0.5), Method(SCHEDULE_BASE, "ssam-d", 0.5),
    Method("SSAM-D s=0.5 EveryK k=5", "ssam-d", 0.5, "every-k"),
    Method("SSAM-D s=0.5 LookSAM k=5", "ssam-d", 0.5, "looksam"),
    Method("SSAM-D s=0.5 AE-SAM", "ssam-d", 0.5, "aesam"),
)
MORE_METHODS = (Method("SSAM-F s=0.9", "ssam-f", 0.9), Method("SSAM-D s=0.9", "ssam-d", 0.9))  # --methods
ALL_METHODS = METHODS + MORE_METHODS
# (key in a run's record, column title, format of mean and std)
METRICS = (
    ("test_accuracy", "test accuracy (%)", "{:.2f}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("hessian_top_eigenvalue", "λ_max(H)", "{:.2f}"),
    ("random_loss_increase", "ΔL random (r=rho)", "{:.1e}"),
    ("random_loss_increase_large", "ΔL random (r=R)", "{:.4f}"),
    ("adversarial_loss_increase", "ΔL adversarial", "{:.4f}"),
    ("seconds_per_epoch", "s / epoch", "{:.3f}"),
    ("relative_cost", "cost (x SGD)", "{:.2f}"),
    ("sam_fraction", "SAM steps", "{:.2f}"),
)
PAIRED = ("test_accuracy", "hessian_top_eigenvalue", "adversarial_loss_increase", "relative_cost")
QUICK = {"seeds": 2, "epochs": 3, "sharpness_samples": 256}


def run_one(method: Method, seed: int, args: argparse.Namespace, dataset: Dataset) -> dict:
    """Train one (method, seed) and measure it; returns the flat record stored in the JSON."""
    argv = [*method.argv(), "--seed", str(seed), "--dataset", args.dataset, "--model", args.model,
            "--width", str(args.width), "--epochs", str(args.epochs), "--lr", str(args.lr),
            "--rho", str(args.rho), "--device", args.device, "--threads", str(args.threads),
            "--backend", args.backend, "--quiet"]
    load_before = os.getloadavg()[0]
    trained = train.train(train.parse_args(argv), dataset)
    result, data = trained.result, trained.dataset
    # The same first n training samples for every run: sharpness of the same loss function.
    x = data.prepare(data.x_train[:args.sharpness_samples], None, False)
    y = data.y_train[:args.sharpness_samples]
    measured = sharpness(trained.model, x, y, args.rho, args.random_radius, seed=seed)
    return {"method": method.label, "optimizer": method.optimizer, "sparsity": method.sparsity,
            "schedule": method.schedule, "seed": seed,
            "test_accuracy": 100 * result["final_test_accuracy"], "train_accuracy":
            100 * result["final_train_accuracy"], "train_loss": result["final_train_loss"],
            "seconds_per_epoch": result["seconds_per_epoch"], "sam_fraction": result["sam_fraction"],
            "sharpness_aware_steps": result["sharpness_aware_steps"], "total_steps": result["total_steps"],
            "backend": result["environment"]["backend"], "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0], "sharpness_loss": measured["loss"],
            **{k: v for k, v in measured.items() if k != "loss"},
            "history": result["history"]}


def add_relative_cost(runs: list[dict]) -> None:
    """``relative_cost`` of every run: its seconds per epoch over SGD's of the same seed (paired: the same
    data order, and the neighbouring slot of the machine's time). Runs of a seed without SGD get none."""
    sgd = {r["seed"]: r["seconds_per_epoch"] for r in runs if r["method"] == "SGD"}
    for r in runs:
        if r["seed"] in sgd:
            r["relative_cost"] = r["seconds_per_epoch"] / sgd[r["seed"]]
        else:
            r.pop("relative_cost", None)


def _stats(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    """Per method and metric: mean, sample standard deviation (n − 1) and n over seeds (the metrics every
    run of the method has: a study.json from before the cost metrics re-renders without them)."""
    methods = dict.fromkeys(r["method"] for r in runs)
    summary = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        summary[m] = {key: _stats([r[key] for r in mine]) for key, _, _ in METRICS
                      if all(key in r for r in mine)}
    return summary


def paired(runs: list[dict], reference: str, keys: tuple[str, ...] = PAIRED,
           methods: list[str] | None = None) -> dict:
    """Per method (``methods``, None: all but ``reference``): mean ± std over seeds of
    ``metric(method, seed) − metric(reference, seed)``. A seed fixes the initial weights and the batch
    order for every method, so the pairing removes their share of the seed-to-seed spread."""
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["method"] == reference})
    if not seeds:
        return {}
    if methods is None:
        methods = [m for m in dict.fromkeys(r["method"] for r in runs) if m != reference]
    table = {}
    for m in methods:
        pairs = [(by[m, s], by[reference, s]) for s in seeds if (m, s) in by]
        if pairs:
            table[m] = {key: _stats([a[key] - b[key] for a, b in pairs]) for key in keys
                        if all(key in a and key in b for a, b in pairs)}
    return table


def scheduled(runs: list[dict]) -> list[str]:
    """The methods that take a schedule other than every step (compared with their base, SSAM-D s=0.5)."""
    return list(dict.fromkeys(r["method"] for r in runs if r.get("schedule", "every-step") != "every-step"))


def analyse(report: dict) -> None:
    """The derived parts of ``report`` from its runs: relative costs, summary, paired differences."""
    runs = report["runs"]
    add_relative_cost(runs)
    report["summary"] = summarise(runs)
    report["paired_vs_SAM"] = paired(runs, "SAM")
    report["paired_vs_SSAM"] = paired(runs, SCHEDULE_BASE, methods=scheduled(runs))


def markdown_table(summary: dict, metrics: tuple[tuple[str, str, str], ...] = METRICS) -> str:
    """One row per method, ``mean ± std`` per metric (``-`` where the method has none)."""
    metrics = tuple(m for m in metrics if any(m[0] in values for values in summary.values()))
    header = "| method | " + " | ".join(title for _, title, _ in metrics) + " |"
    lines = [header, "|---|" + "---:|" * len(metrics)]
    for method, values in summary.items():
        cells = [f"{fmt.format(values[key]['mean'])} ± {fmt.format(values[key]['std'])}" if key in values
                 else "-" for key, _, fmt in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> str:
    """``study.json``, ``study.md`` (the summary table, then the paired differences to SAM and those of
    the schedules to their base), ``study.png`` and ``study_cost.png`` in ``out``; returns the Markdown."""
    config, runs = report["config"], report["runs"]
    paired_metrics = tuple(m for m in METRICS if m[0] in PAIRED)
    markdown = markdown_table(report["summary"])
    if report["paired_vs_SAM"]:
        markdown += ("\nPaired by seed, minus SAM (same initial weights and batch order):\n\n"
                     + markdown_table(report["paired_vs_SAM"], paired_metrics))
    if report.get("paired_vs_SSAM"):
        markdown += (f"\nPaired by seed, minus {SCHEDULE_BASE} (the schedules' base, every step "
                     "sharpness-aware):\n\n" + markdown_table(report["paired_vs_SSAM"], paired_metrics))
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(report, indent=2))
    (out / "study.md").write_text(markdown)
    setting = (f"{config['dataset']} / {config['model']}, {config['epochs']} epochs, rho={config['rho']}, "
               f"{config['seeds']} seeds")
    plot(runs, report["summary"], out / "study.png",
         f"{setting}, R={config['random_radius']} (bars: mean ± std, dots: seeds)")
    if all("relative_cost" in values for values in report["summary"].values()):
        plot_cost(report["summary"], out / "study_cost.png",
                  f"{setting}, {config['threads']} thread, backend {report['environment'].get('backend')} "
                  "(mean ± std over seeds)")
    return markdown


def plot(runs: list[dict], summary: dict, path: Path, title: str) -> None:
    """Bars of the mean with std error bars, and every seed as a dot, for accuracy and sharpness."""
    panels = [m for m in METRICS if m[0] in ("test_accuracy", "hessian_top_eigenvalue",
                                             "adversarial_loss_increase", "random_loss_increase_large")]
    methods = list(summary)
    fig = Figure(figsize=(4.6 * len(panels), 4.8))  # no pyplot: no GUI backend, no global state
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
            ax.set_ylim(min(values) - spread - 0.5, min(100.0, max(values) + spread + 0.5))
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_cost(summary: dict, path: Path, title: str, goal: float = 1.3) -> None:
    """Test accuracy and λ_max against the relative cost, one point per method, error bars = std in
    both directions; a dashed line at ``goal`` (the cost the schedules aim under)."""
    methods = list(summary)
    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(len(methods))]
    for ax, key, name in zip(axes, ("test_accuracy", "hessian_top_eigenvalue"),
                             ("test accuracy (%)", "λ_max(H) (lower: flatter)"), strict=True):
        for method, color in zip(methods, colors, strict=True):
            x, y = summary[method]["relative_cost"], summary[method][key]
            ax.errorbar(x["mean"], y["mean"], xerr=_nan_to_zero(x["std"]), yerr=_nan_to_zero(y["std"]),
                        fmt="o", color=color, capsize=3, label=method)
        ax.axvline(goal, color="gray", linestyle="--", linewidth=1)
        ax.text(goal, 1.0, f" {goal}x SGD", transform=ax.get_xaxis_transform(), va="top", color="gray")
        ax.set_xlabel("seconds per epoch / SGD's (same seed)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _nan_to_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


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
                        choices=[m.label for m in ALL_METHODS], metavar="METHOD",
                        help=f"the methods, of {[m.label for m in ALL_METHODS]}; relative_cost needs SGD")
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
    parser.add_argument("--backend", default="auto", choices=("auto", *sk.ops.BACKENDS),
                        help="the ssam_kernels backend of every method (auto: native where it is built)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where study.json, study.md, study.png and study_cost.png go")
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
        analyse(report)
        print(write_outputs(report, args.out))
        return report
    started, load_at_start = time.perf_counter(), os.getloadavg()
    print(f"load average at start (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in load_at_start)}")
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, torch.device(args.device))
    methods = [m for m in ALL_METHODS if m.label in args.methods]
    jobs = [(m, seed) for seed in range(args.seeds) for m in methods]  # seeds outer: load drifts hit all
    runs: list[dict] = []
    width = max(len(m.label) for m in methods)
    with tqdm(jobs, desc="study", unit="run") as bar:
        for method, seed in bar:
            bar.set_postfix(method=method.label, seed=seed)
            r = run_one(method, seed, args, dataset)
            runs.append(r)
            sgd = next((q for q in runs if q["method"] == "SGD" and q["seed"] == seed), None)
            cost = f" ({r['seconds_per_epoch'] / sgd['seconds_per_epoch']:.2f}x SGD)" if sgd else ""
            tqdm.write(f"{method.label:>{width}} seed {seed}: test {r['test_accuracy']:.2f}%  "
                       f"λ_max {r['hessian_top_eigenvalue']:.2f}  "
                       f"ΔL_adv {r['adversarial_loss_increase']:.4f}  "
                       f"ΔL_rand(R) {r['random_loss_increase_large']:.4f}  "
                       f"{r['seconds_per_epoch']:.3f} s/epoch{cost}  SAM steps {r['sam_fraction']:.2f}  "
                       f"load {r['load_average_1min_before']:.2f}")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    used = sorted({r["backend"] for r in runs if r["backend"] is not None})
    report = {
        "config": config, "runs": runs, "wall_seconds": time.perf_counter() - started,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
                        "backend": used[0] if len(used) == 1 else used,
                        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                        "backends": sk.available_backends()},
    }
    analyse(report)
    print(write_outputs(report, args.out))
    print(f"wall time {report['wall_seconds']:.0f} s -> {args.out}")
    return report


if __name__ == "__main__":
    main()
