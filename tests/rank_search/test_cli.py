"""``peftjax rank-search`` end to end on bert-tiny and the built-in synthetic task."""

from __future__ import annotations

import csv
import json

import yaml

from peftjax.cli import main
from peftjax.rank_search.report import write_report
from test_sweep_config import TINY

COMPARISON = {
    **TINY,
    "model": {"name": "bert-tiny", "options": {"num_hidden_layers": 1}},
    "data": {**TINY["data"], "eval_split": "test", "max_eval_rows": 32},
    "train": {**TINY["train"], "steps": 4},
    "sweep": {**TINY["sweep"], "ranks": [1, 2], "searches": ["grid", "dylora", "adalora", "pilot"],
              "adalora": {"init_rank": 2, "target_rank": 1, "initial_steps": 1, "final_steps": 1},
              "pilot": {"rank": 2, "mean_rank": 1}},
}


def test_rank_search_command_compares_every_search_and_writes_results_report_and_plots(tmp_path, capsys):
    """One run of the command serves both: the grid's files, and the searches on its data and budget."""
    out = tmp_path / "out"
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({**COMPARISON, "output_dir": str(out)}))
    assert main(["rank-search", str(path), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["points"] == 2 and printed["pareto"]
    assert [(c["search"], c["target_set"]) for c in printed["comparison"]] == [
        ("grid", "qv"), ("dylora", "qv"), ("adalora", "qv"), ("pilot", "qv")]

    # The grid.
    rows = list(csv.DictReader((out / "rank_search.csv").open()))
    assert [(r["target_set"], int(r["rank"]), int(r["seed"])) for r in rows] == [("qv", 1, 0), ("qv", 2, 0)]
    assert all(r["mode"] == "batched" and r["members_in_program"] == "2" and r["peak_memory_bytes"] == "" for r in rows)
    # One layer, query and value: 2 modules of 32 x r + r x 32, and the 32 x 2 head and its bias.
    assert [int(r["trainable_params"]) for r in rows] == [2 * 64 * r + 66 for r in (1, 2)]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 and float(r["step_time_s"]) > 0 for r in rows)

    payload = json.loads((out / "rank_search.json").read_text())
    assert payload["command"].startswith("peftjax rank-search") and len(payload["rows"]) == 2
    assert [s["rank"] for s in payload["summary"]] == [1, 2] and payload["rows"][0]["peak_memory_bytes"] is None
    assert payload["target_sets"] == {"qv": ["query", "value"]}
    assert payload["similarity"]["across_ranks"][0]["modules"] == 2
    assert {p.name for p in (out / "plots").iterdir()} >= {"metric_vs_rank.png", "pareto.png", "spectra.png",
                                                             "effective_rank.png", "similarity.png", "comparison.png"}
    assert all((out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
               for name in ("pareto.png", "spectra.png", "comparison.png"))
    assert len(list((out / "points").glob("*.npz"))) >= 2

    # The searches, on the grid's budget.
    rows = payload["search_rows"]
    assert [(r["search"], r["rank"]) for r in rows] == [("dylora", 1), ("dylora", 2), ("adalora", 1), ("pilot", 1)]
    assert all(r["steps"] == 4 for r in rows + payload["rows"])
    dylora = [r for r in rows if r["search"] == "dylora"]
    assert [r["trainable_params"] for r in dylora] == [2 * 64 * r + 66 for r in (1, 2)]
    adalora, pilot = rows[2], rows[3]
    assert sum(adalora["rank_pattern"].values()) == 1 * 2 and sum(pilot["rank_pattern"].values()) == 1 * 2
    assert adalora["trained_params"] == 2 * (2 * 64 + 2) + 66
    assert pilot["pilot"]["source"].startswith("grid point qv-r2-s0")

    entries = {e["search"]: e for e in payload["comparison"]["entries"]}
    # XLA's FLOPs: the grid's one program trains ranks 1 and 2 padded to 2, DyLoRA one member at rank 2,
    # on the same batches: half the grid's, up to the few operations that draw and apply the rank.
    assert 0.49 < entries["dylora"]["flops_fraction_of_grid"] < 0.52
    assert entries["grid"]["optimizer_steps"] == 8 and entries["dylora"]["optimizer_steps"] == 4
    assert entries["pilot"]["optimizer_steps"] == 8  # its pilot (the grid's rank-2 point) and its own run
    for entry in entries.values():
        assert entry["train_flops"] > 0 and entry["compile_s"] > 0 and entry["wall_s"] > entry["compile_s"]
    report = (out / "report.md").read_text()
    for heading in ("## Searches on the same data and budget", "### Every rank: trained alone (grid) or read off",
                    "### Allocations", "## test_accuracy by rank and target set", "## Pareto front",
                    "## Spectrum and effective rank", "## Subspace similarity", "## Timing"):
        assert heading in report
    # The report is a function of the JSON alone: rewriting it from the file gives the same text.
    assert write_report(payload, out).read_text() == report

    # A second run into the same folder needs --overwrite.
    assert main(["rank-search", str(path), "--quiet"]) == 2
    assert "already holds a rank search" in capsys.readouterr().err
