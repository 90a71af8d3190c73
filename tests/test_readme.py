"""The README's code: Python blocks run and print what their ``text`` blocks show; shell lines name real things."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text())]


def python_examples() -> list[tuple[str, str | None]]:
    """Each Python block with the ``text`` block right after it (its printed output), if any."""
    found = blocks()
    return [(code, found[i + 1][1] if i + 1 < len(found) and found[i + 1][0] == "text" else None)
            for i, (kind, code) in enumerate(found) if kind == "python"]


@pytest.mark.parametrize("index", range(len(python_examples())))
def test_python_block_runs_and_prints_what_the_readme_shows(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files save them here
    code, expected = python_examples()[index]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_{index}"})
    if expected is None:
        assert printed.getvalue() == "", "a block that prints needs a text block with its output after it"
    else:
        assert printed.getvalue() == expected


def test_shell_lines_name_real_commands_configs_and_scripts():
    from peftjax.cli import build_parser
    from peftjax.config import load_config
    from peftjax.rank_search import load_rank_search

    root = README.parent
    targets = set(re.findall(r"^([\w-]+):", (root / "Makefile").read_text(), re.M))
    checked = 0
    for kind, code in blocks():
        if kind != "bash":
            continue
        for line in code.splitlines():
            words = [w for w in shlex.split(line, comments=True) if "=" not in w or w.startswith("-")]
            if not words:
                continue
            if words[0] == "make":
                assert words[1] in targets, line
            elif words[0] in ("bash", "python"):
                assert (root / words[1]).is_file(), line
            else:
                assert words[0].endswith("peftjax"), line
                args = build_parser().parse_args(shlex.split(line, comments=True)[1:])
                config = pathlib.Path(getattr(args, "config", ""))
                if config.parent != pathlib.Path("."):  # cfg.yaml stands for the reader's own config
                    load = load_rank_search if args.command == "rank-search" else load_config
                    load(root / config, args.overrides)
            checked += 1
    assert checked >= 8
