"""Aggregation over seeds, learning-rate selection and the Pareto front, on hand-made rows."""

from __future__ import annotations

import pytest

from peftjax.rank_search import SweepConfig
from peftjax.rank_search.summary import pareto, select_learning_rates, summarize


def row(target_set, rank, seed, lr, test, select, params):
    return {"target_set": target_set, "rank": rank, "seed": seed, "learning_rate": lr, "test_accuracy": test,
            "eval_accuracy": select, "trainable_params": params, "step_time_s": 0.5, "step_time_per_member_s": 0.25,
            "members_in_program": 2, "peak_memory_bytes": None, "finite": True, "effective_rank_90": 1.0,
            "effective_rank_99": 2.0}


def test_tuned_rates_are_picked_on_the_select_metric_and_reported_on_the_metric():
    sweep = SweepConfig.from_dict({"ranks": [1, 4], "target_sets": ["qv"], "seeds": [0, 1],
                                   "learning_rates": [1e-3, 1e-2], "metric": "test_accuracy"})
    rows = [
        # rank 1: 1e-2 wins on eval (0.80 vs 0.70 mean) though 1e-3 has the better test score.
        row("qv", 1, 0, 1e-3, 0.90, 0.70, 100), row("qv", 1, 1, 1e-3, 0.90, 0.70, 100),
        row("qv", 1, 0, 1e-2, 0.84, 0.78, 100), row("qv", 1, 1, 1e-2, 0.86, 0.82, 100),
        # rank 4: 1e-3 wins.
        row("qv", 4, 0, 1e-3, 0.88, 0.85, 400), row("qv", 4, 1, 1e-3, 0.86, 0.85, 400),
        row("qv", 4, 0, 1e-2, 0.50, 0.50, 400), row("qv", 4, 1, 1e-2, 0.50, 0.50, 400),
    ]  # fmt: skip
    assert select_learning_rates(rows, sweep) == {("qv", 1): 1e-2, ("qv", 4): 1e-3}
    summary = summarize(rows, sweep)
    assert [(e["rank"], e["learning_rate"], e["seeds"]) for e in summary] == [(1, 1e-2, 2), (4, 1e-3, 2)]
    assert summary[0]["mean"] == pytest.approx(0.85) and summary[0]["std"] == pytest.approx(0.0141421356)
    assert summary[1]["mean"] == pytest.approx(0.87)
    assert [(p["rank"], p["trainable_params"]) for p in pareto(summary, sweep)] == [(1, 100), (4, 400)]


def test_a_loss_metric_prefers_lower_values():
    sweep = SweepConfig.from_dict({"ranks": [1, 2], "seeds": [0], "learning_rates": [1e-3, 1e-2],
                                   "metric": "test_loss", "select_metric": "eval_loss"})
    rows = [dict(row("qv", r, 0, lr, 0, 0, 10 * r), test_loss=loss, eval_loss=loss)
            for r, lr, loss in [(1, 1e-3, 0.5), (1, 1e-2, 0.4), (2, 1e-3, 0.45), (2, 1e-2, 0.6)]]
    assert select_learning_rates(rows, sweep) == {("qv", 1): 1e-2, ("qv", 2): 1e-3}
    # rank 2 costs more and is worse (0.45 > 0.40): only rank 1 is on the front.
    assert [p["rank"] for p in pareto(summarize(rows, sweep), sweep)] == [1]
