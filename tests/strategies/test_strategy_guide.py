"""The guide's section on training strategies quotes layer_freeze.py and the strategy API;
the quotes must not drift, and its YAML must be the example config's and load."""

import pathlib
import re

import yaml

from peftjax.strategies import strategy_from_dict

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECTION = "\n# Adding a training strategy"


def section() -> str:
    guide = (ROOT / "docs" / "extending.md").read_text()
    assert SECTION in guide
    return guide.split(SECTION, 1)[1]


def test_every_python_snippet_is_in_layer_freeze_or_the_strategy_api():
    sources = [(ROOT / "peftjax" / "strategies" / name).read_text() for name in ("layer_freeze.py", "base.py")]
    snippets = re.findall(r"```python\n(.*?)```", section(), flags=re.S)
    assert len(snippets) >= 12
    for snippet in snippets:
        assert any(snippet in source for source in sources), f"the guide quotes code that is gone:\n{snippet}"


def test_the_yaml_snippet_is_the_example_configs_and_loads():
    (snippet,) = re.findall(r"```yaml\n(.*?)```", section(), flags=re.S)
    example = (ROOT / "experiments" / "configs" / "sst2_minilm_layer_freeze.yaml").read_text()
    assert snippet in example
    (entry,) = yaml.safe_load(snippet)["strategies"]
    assert strategy_from_dict(entry).to_dict() == entry
