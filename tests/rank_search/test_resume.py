"""A rank search stopped by a signal keeps its finished points and ``--resume`` trains only the rest."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from peftjax.cli import main
from peftjax.errors import Preempted
from peftjax.rank_search import load_rank_search, run_rank_search
from test_sweep_config import TINY

CONFIG = {**TINY, "train": {**TINY["train"], "steps": 3}, "sweep": {**TINY["sweep"], "seeds": [0, 1]}}


def test_a_stopped_rank_search_resumes_without_training_finished_points_again(tmp_path, capsys):
    out = tmp_path / "out"
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(out)}))
    config, sweep = load_rank_search(path)
    first_log = []

    def log(line: str) -> None:  # SIGTERM once the first program (seed 0) is done
        first_log.append(line)
        if line.startswith("batched  seed=0"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match=r"stopped by SIGTERM after step 1; checkpoint .*points \(batched: 2 of 4 "
                                        r"points finished; the program in training starts over\)") as stopped:
        run_rank_search(config, sweep, log=log, report=False)
    assert stopped.value.exit_code == 143
    finished = sorted(p.name for p in (out / "points").glob("*.json"))
    assert finished == ["qv-r1-s0-lr0.003.batched.json", "qv-r2-s0-lr0.003.batched.json", "sweep.json"]
    assert not (out / "rank_search.json").exists()

    assert main(["rank-search", str(path), "--quiet"]) == 2  # no --resume: refused, nothing touched
    assert "already holds a rank search; pass --resume" in capsys.readouterr().err
    assert main(["rank-search", str(path), "sweep.ranks=[1,4]", "--resume", "--quiet"]) == 2
    assert "holds the points of another rank search (sweep.ranks.1: 2 -> 4)" in capsys.readouterr().err

    second_log = []
    payload = run_rank_search(config, sweep, resume=True, log=second_log.append, report=False)
    assert "batched: 2 of 4 points already trained" in second_log[1]
    assert [line.split()[1] for line in second_log if line.startswith("batched  seed=")] == ["seed=1"]
    assert [(r["rank"], r["seed"]) for r in payload["rows"]] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    saved = json.loads((out / "points" / "qv-r2-s0-lr0.003.batched.json").read_text())
    assert payload["rows"][1]["test_accuracy"] == saved["test_accuracy"]
    assert payload["timing"]["batched"]["points_reused"] == 2
