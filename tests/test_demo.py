"""``make demo`` on a fresh clone: no shared data, hub offline. It must learn, and say only what happened."""

from __future__ import annotations

import json
import pathlib

from peftjax import demo


def test_demo_without_shared_data_or_hub_learns_and_reports_its_own_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTJAX_SHARED_DATA", str(tmp_path / "no-shared-data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    result = demo.main(str(out))
    printed = capsys.readouterr().out.splitlines()

    assert printed[0].startswith("peftjax demo: minilm + LoRA(query, value, r=8) on the 800 Amazon review sentences "
                                 "bundled with peftjax (no SST-2 found, hub unreachable;")
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["model"]["name"] == "minilm" and saved["steps"] == 60
    test_rows = (demo.BUNDLED_REVIEWS / "test.tsv").read_text().splitlines()[1:]
    positive = sum(line.endswith("\t1") for line in test_rows) / len(test_rows)
    majority = max(positive, 1 - positive)
    assert saved["metrics"]["test_accuracy"] >= majority + 0.2, saved["metrics"]  # learned, not guessed

    final = next(line for line in printed if line.startswith("final metrics: "))
    assert final == f"final metrics: { {k: round(v, 4) for k, v in result['metrics'].items()} }"
    assert result["metrics"] == saved["metrics"]
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    trend = next(line for line in printed if line.startswith("training loss "))
    assert trend.startswith("training loss fell: " if losses[-1][1] < losses[0][1] else "training loss did not fall: ")
    assert f"{losses[0][1]:.3f} at step {losses[0][0]} -> {losses[-1][1]:.3f} at step {losses[-1][0]}" in trend
    assert pathlib.Path(out / "adapter" / "adapter_model.safetensors").is_file()
