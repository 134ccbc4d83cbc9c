"""bench/sga_budget.py's analysis: running best, simulated early stopping, gain fractions."""

from __future__ import annotations

import numpy as np

from bench.sga_budget import analyze, best_so_far, early_stop


def test_best_so_far_ignores_images_no_longer_evaluated():
    history = [{"true": [3.0, 5.0]}, {"true": [2.0, float("nan")]}, {"true": [2.5, 4.0]}]
    assert best_so_far(history).tolist() == [[3.0, 5.0], [2.0, 5.0], [2.0, 4.0]]


def test_early_stop_follows_the_rule_of_infer():
    # image 0 stops improving after t=2; image 1 keeps improving by 10% per iteration
    best = np.array([[1.0, 1.0], [0.9, 0.9], [0.8, 0.81], [0.8, 0.729], [0.8, 0.656],
                     [0.8, 0.59]])
    used, kept = early_stop(best, patience=2, min_improvement=1e-3)
    assert used.tolist() == [4, 5] and kept.tolist() == [0.8, 0.59]


def test_analyze_reports_fractions_of_the_full_gain():
    true = [[1.0, 2.0], [0.9, 1.8], [0.8, 1.6], [0.75, 1.5], [0.77, 1.4]]
    paper = [[1.0, 2.0], [0.9, 1.8], [0.8, 1.6], [0.75, 1.5], [0.75, 1.4]]
    report = {"amortized_loss": [1.0, 2.0], "full": 4, "budgets": [2],
              "runs": {"paper": {"iterations": 4, "best": paper, "true": true},
                       "scaled-2": {"iterations": 2, "best": [*paper[:2], [0.75, 1.5]]}}}
    rows = {(r["run"], r["budget"], r.get("eval_every")): r for r in analyze(report)}
    assert rows[("paper", 4, None)]["fraction_of_full_gain"] == 1.0
    assert abs(rows[("paper", 2, None)]["fraction_of_full_gain"] - 0.6 / 0.85) < 1e-12
    assert abs(rows[("scaled", 2, None)]["fraction_of_full_gain"] - 0.75 / 0.85) < 1e-12
    # checked at 0, 5 (past the end) and the last (4) only: image 0 keeps 0.77, not 0.75
    assert rows[("paper", 4, 5)]["mean_loss"] == (0.77 + 1.4) / 2
