"""The guide's section on training strategies quotes layer_freeze.py and the strategy API;
the quotes must not drift, and its YAML must be the example config's and load. The README's
strategy examples load as experiment configs, and its table lists every strategy."""

import pathlib
import re

import yaml

from peftjax.config import load_config
from peftjax.methods.base import config_from_dict
from peftjax.strategies import registered_strategies, strategy_from_dict
from peftjax.strategies.base import build_strategies

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


def test_the_readmes_strategy_examples_load_as_configs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Transfer-learning strategies\n", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 4
    base = {"model": {"name": "bert-tiny"}, "data": {"source": "synthetic:sentiment"}, "train": {"steps": 1}}
    for snippet in snippets:
        path = tmp_path / "example.yaml"
        path.write_text(yaml.safe_dump(base) + snippet)
        config = load_config(path, method_validator=config_from_dict, strategy_validator=strategy_from_dict)
        assert [s["type"] for s in config.strategy_dicts()] == [s["type"] for s in yaml.safe_load(snippet)["strategies"]]
        assert build_strategies(config.strategy_dicts())
    table = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)[1:]  # below the header
    ours = [name for name, cls in registered_strategies().items() if cls.__module__.startswith("peftjax.strategies.")]
    assert sorted(table) == sorted(ours), "the table lists every strategy of the package"
