"""The extension guide quotes peftjax/methods/lora.py; the quotes must not drift."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_snippet_in_the_guide_is_in_the_lora_file():
    guide = (ROOT / "docs" / "extending.md").read_text()
    methods_section = guide.split("\n# Adding a training strategy")[0]  # the strategies' section quotes its own files
    source = (ROOT / "peftjax" / "methods" / "lora.py").read_text()
    snippets = re.findall(r"```python\n(.*?)```", methods_section, flags=re.S)
    assert len(snippets) >= 5
    for snippet in snippets:
        assert snippet in source, f"docs/extending.md quotes code lora.py no longer has:\n{snippet}"
