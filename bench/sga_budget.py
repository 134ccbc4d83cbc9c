#!/usr/bin/env python
"""How much of SGA's 2000-iteration gain do fewer iterations reach? (performance issue, 4)

    python bench/sga_budget.py --limit 6 --crop 192 --json sga-budget.json --plot sga.png

On validation images (centre crops, so a study fits a CPU budget), for one model:

* **paper**: one SGA run of `--full` iterations with the paper's schedule (t0 = 700,
  c = 1e-3, whatever the budget). Its true (hard-rounded) RD loss is evaluated at every
  iteration, so the best loss reached by any budget T <= full is read off this one run:
  with the paper's schedule a T-iteration run *is* the first T iterations of it.
* **scaled**: one run per budget T with the schedule stretched onto T
  (InferenceConfig(schedule="scaled")), so the temperature anneals fully in T iterations,
  at each of `--lrs` (the paper's 5e-3 and the scaled schedule's default 1e-2).
* **early stopping**: per image, stop when the best true loss has improved by less than
  `min_improvement` (relative) over the last `patience` iterations. Simulated on each
  run's recorded trajectory: an image's trajectory does not depend on when it stops, so
  the iterations it would use and the loss it would keep are exact (only the random draws
  of the *other* images in a batch would differ in a real run).

Gain of a run = amortized loss - its best true loss; reported as the fraction of the paper
schedule's gain at `--full` (sum over images), and as the mean relative loss reduction.
The loss is the model's RD loss R + lambda * 255^2 * MSE with R the estimated bits, which
are within 0.1% of the coded payload (docs/codec.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from codec.evaluation import load_images  # noqa: E402
from codec.inference import PAPER, InferenceConfig, infer  # noqa: E402
from codec.registry import load  # noqa: E402

DEFAULT_DATA = _ROOT.parent / "shared" / "data" / "bsds500" / "val"
PATIENCE = (50, 100, 200, 300)
MIN_IMPROVEMENT = (1e-4, 1e-3)
EVAL_EVERY = (5, 10, 25)


def best_so_far(history: list[dict]) -> np.ndarray:
    """(evaluations, images) running minimum of the true loss; NaN (not evaluated) ignored."""
    true = np.array([h["true"] for h in history], dtype=np.float64)
    return np.fmin.accumulate(np.where(np.isnan(true), np.inf, true), axis=0)


def early_stop(best: np.ndarray, patience: int, min_improvement: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per image: iterations used and loss kept under the early-stopping rule of infer()."""
    n_eval, n_img = best.shape
    used = np.full(n_img, n_eval - 1)
    for i in range(n_img):
        reference, improved_at = best[0, i], 0
        for t in range(1, n_eval):
            if best[t, i] < reference * (1.0 - min_improvement):
                reference, improved_at = best[t, i], t
            if t - improved_at >= patience:
                used[i] = t
                break
    return used, best[used, np.arange(n_img)]


def summarize(start: np.ndarray, full_gain: float, loss: np.ndarray) -> dict:
    gain = start - loss
    return {"fraction_of_full_gain": float(gain.sum() / full_gain),
            "loss_reduction_pct": float(100 * np.mean(gain / start)),
            "mean_loss": float(loss.mean())}


def run(model, x: torch.Tensor, lmbda: float, cfg: InferenceConfig
        ) -> tuple[np.ndarray, np.ndarray, float]:
    """Running best and raw true loss per iteration (evaluations x images), and seconds."""
    sizes = [(x.shape[2], x.shape[3])] * x.shape[0]
    t0 = time.perf_counter()
    lat = infer(model, x, sizes, lmbda, cfg)
    seconds = time.perf_counter() - t0
    return best_so_far(lat.history), np.array([h["true"] for h in lat.history]), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="validation image folder")
    p.add_argument("--limit", type=int, default=6, help="first N images by name (default 6)")
    p.add_argument("--crop", default="192", help="centre crop, multiple of 64 (default 192)")
    p.add_argument("--quality", type=int, default=None, help="model quality (default model)")
    p.add_argument("--full", type=int, default=2000, help="reference budget (2000)")
    p.add_argument("--budgets", default="250,500,1000", help="budgets for 'scaled' runs")
    p.add_argument("--lrs", default="5e-3,1e-2",
                   help="Adam learning rates of the 'scaled' runs (default 5e-3 = the paper's, "
                        "1e-2 = the scaled schedule's default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--plot", type=Path, help="PNG of gain against iterations")
    p.add_argument("--report", type=Path,
                   help="only print the table (and --plot) of an earlier --json")
    args = p.parse_args(argv)
    if args.report:
        show(json.loads(args.report.read_text()), args.plot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    crop = int(args.crop)
    images = load_images([args.data], args.limit, (crop, crop))
    lm = load(args.quality)
    model, lmbda = lm.model, lm.entry.lmbda
    x = torch.stack([torch.from_numpy(im.rgb).permute(2, 0, 1) for im in images]).float() / 255
    print(f"{len(images)} images {crop}x{crop} from {args.data}, model {lm.entry.id}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    runs: dict[str, dict] = {}
    best, true, seconds = run(model, x, lmbda,
                              replace(PAPER, iterations=args.full, seed=args.seed))
    start = best[0]
    runs["paper"] = {"iterations": args.full, "seconds": seconds,
                     "best": best.tolist(), "true": true.tolist()}
    print(f"paper {args.full}: {seconds:.0f} s", file=sys.stderr)
    for lr in (float(v) for v in args.lrs.split(",") if v):
        name = f"scaled_lr{lr:g}"
        for T in budgets:
            cfg = InferenceConfig(iterations=T, schedule="scaled", lr=lr, seed=args.seed)
            b, _, s = run(model, x, lmbda, cfg)
            runs[f"{name}-{T}"] = {"iterations": T, "seconds": s, "lr": cfg.learning_rate,
                                   "best": b.tolist()}
            print(f"{name} {T}: {s:.0f} s", file=sys.stderr)

    report = {"images": [im.name for im in images], "crop": crop, "model": lm.entry.id,
              "threads": torch.get_num_threads(), "full": args.full, "budgets": budgets,
              "amortized_loss": start.tolist(), "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(report) + "\n")
    show(report, args.plot)
    return 0


def analyze(report: dict) -> list[dict]:
    """Table rows: each run and budget, early stopping and sparser evaluation, as % of gain."""
    start = np.array(report["amortized_loss"])
    paper = np.array(report["runs"]["paper"]["best"])
    full_gain = float((start - paper[-1]).sum())
    rows = []
    for T in [*report["budgets"], report["full"]]:
        rows.append({"run": "paper", "budget": T, "mean_iterations": T,
                     **summarize(start, full_gain, paper[T])})
    for key, r in report["runs"].items():
        if key != "paper":
            rows.append({"run": key.rsplit("-", 1)[0], "budget": r["iterations"],
                         "mean_iterations": r["iterations"],
                         **summarize(start, full_gain, np.array(r["best"])[-1])})
    for key, r in report["runs"].items():
        b = np.array(r["best"])
        for patience in PATIENCE:
            for eps in MIN_IMPROVEMENT:
                if patience >= r["iterations"]:
                    continue
                used, kept = early_stop(b, patience, eps)
                rows.append({"run": key.rsplit("-", 1)[0] if key != "paper" else "paper",
                             "budget": r["iterations"], "patience": patience,
                             "min_improvement": eps, "mean_iterations": float(used.mean()),
                             **summarize(start, full_gain, kept)})
    true = report["runs"]["paper"].get("true")  # raw losses: reports before it lack them
    for every in EVAL_EVERY if true is not None else ():
        # the true loss checked every k-th iteration only (and at the last): best of those
        checked = np.unique(np.r_[np.arange(0, len(true), every), len(true) - 1])
        rows.append({"run": "paper", "budget": report["full"], "eval_every": every,
                     "mean_iterations": report["full"],
                     **summarize(start, full_gain, np.array(true)[checked].min(axis=0))})
    return rows


def show(report: dict, plot_path: Path | None = None) -> None:
    rows = analyze(report)
    start = np.array(report["amortized_loss"])
    paper = np.array(report["runs"]["paper"]["best"])
    print(f"\nSGA gain vs budget: {len(start)} crops {report['crop']}px, {report['model']}; "
          f"paper {report['full']} it = 100% (mean loss {start.mean():.4f} -> "
          f"{paper[-1].mean():.4f}, -{100 * np.mean(1 - paper[-1] / start):.2f}%)")
    print(f"{'run':<15}{'budget':>7}{'variant':>20}{'mean it':>9}{'of gain':>9}{'loss -%':>9}")
    for r in rows:
        variant = (f"P{r['patience']} eps{r['min_improvement']:g}" if "patience" in r else
                   f"eval every {r['eval_every']}" if "eval_every" in r else "-")
        print(f"{r['run']:<15}{r['budget']:>7}{variant:>20}{r['mean_iterations']:>9.0f}"
              f"{100 * r['fraction_of_full_gain']:>8.1f}%{r['loss_reduction_pct']:>8.2f}%")
    if plot_path:
        plot(report, rows, plot_path)


def plot(report: dict, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = np.array(report["amortized_loss"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    paper = np.array(report["runs"]["paper"]["best"])
    full_gain = float((start - paper[-1]).sum())
    t = np.arange(len(paper))
    ax.plot(t[1:], 100 * (start - paper[1:]).sum(axis=1) / full_gain, label="paper schedule")
    scaled = sorted({r["run"] for r in rows if r["run"].startswith("scaled_lr")})
    for name, marker in zip(scaled, "osD^v", strict=False):
        pts = [(r["budget"], r["fraction_of_full_gain"]) for r in rows
               if r["run"] == name and "patience" not in r]
        ax.plot(*zip(*[(b, 100 * f) for b, f in pts], strict=True), marker=marker,
                linestyle="--", label=f"scaled schedule, lr {name[len('scaled_lr'):]} "
                                      "(one run per budget)")
    es = [(r["mean_iterations"], 100 * r["fraction_of_full_gain"]) for r in rows
          if r.get("patience") and r["run"] == "paper" and r["min_improvement"] == 1e-4]
    if es:
        ax.scatter(*zip(*es, strict=True), marker="x", color="k",
                   label="paper + early stopping (eps 1e-4)")
    ax.set_xscale("log")
    ax.set_xlabel("SGA iterations (mean per image)")
    ax.set_ylabel(f"% of the {len(paper) - 1}-iteration gain")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"SGA budget, {report['model']}, {len(start)} crops {report['crop']}px")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
