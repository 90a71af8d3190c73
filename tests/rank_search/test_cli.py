"""``peftjax rank-search`` end to end on bert-tiny and the built-in synthetic task."""

from __future__ import annotations

import csv
import json

import yaml

from peftjax.cli import main
from peftjax.rank_search.report import write_report
from test_sweep_config import TINY

CONFIG = {
    **TINY,
    "train": {**TINY["train"], "steps": 3},
    "sweep": {**TINY["sweep"], "ranks": [2, 8]},
}


def test_rank_search_command_writes_results_report_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(out)}))
    assert main(["rank-search", str(path), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["points"] == 2 and printed["pareto"]

    rows = list(csv.DictReader((out / "rank_search.csv").open()))
    assert [(r["target_set"], int(r["rank"]), int(r["seed"])) for r in rows] == [("qv", 2, 0), ("qv", 8, 0)]
    assert all(r["mode"] == "batched" and r["members_in_program"] == "2" and r["peak_memory_bytes"] == "" for r in rows)
    # bert-tiny: 2 layers x (query, value), each (32 x r + r x 32), plus the 32 x 2 head and its bias.
    assert [int(r["trainable_params"]) for r in rows] == [4 * 64 * r + 66 for r in (2, 8)]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 and float(r["step_time_s"]) > 0 for r in rows)

    payload = json.loads((out / "rank_search.json").read_text())
    assert payload["command"].startswith("peftjax rank-search") and len(payload["rows"]) == 2
    assert [s["rank"] for s in payload["summary"]] == [2, 8] and payload["rows"][0]["peak_memory_bytes"] is None
    assert payload["target_sets"] == {"qv": ["query", "value"]}
    assert payload["similarity"]["across_ranks"][0]["modules"] == 4
    assert {p.name for p in (out / "plots").iterdir()} >= {"metric_vs_rank.png", "pareto.png", "spectra.png",
                                                             "effective_rank.png", "similarity.png"}
    assert all((out / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in ("pareto.png", "spectra.png"))
    assert len(list((out / "points").glob("*.npz"))) == 2
    report = (out / "report.md").read_text()
    for heading in ("## test_accuracy by rank and target set", "## Pareto front", "## Spectrum and effective rank",
                    "## Subspace similarity", "## Timing"):
        assert heading in report
    # The report is a function of the JSON alone: rewriting it from the file gives the same text.
    assert write_report(payload, out).read_text() == report

    # A second run into the same folder needs --overwrite.
    assert main(["rank-search", str(path), "--quiet"]) == 2
    assert "already holds a rank search" in capsys.readouterr().err
