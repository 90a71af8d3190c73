"""Where a config's data is, and reading its splits as tables before tokenisation.

Sources are local files (csv/tsv/json/jsonl/parquet through ``datasets``, and
plain ``.txt`` for causal LM: one text per non-empty line, column ``text``),
``shared:REL`` (the shared data folder), ``hub:NAME`` (a Hugging Face hub
dataset, from the local cache when offline) and ``synthetic:NAME`` (built in).
Every reader returns a :class:`_Table` so the loader does not care which it was.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import difflib
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from peftjax.config import ConfigError, DataConfig
from peftjax.data.errors import DataError
from peftjax.data.shared import missing_file_error, shared_data_dir
from peftjax.data.synthetic import SYNTHETIC_TASKS, synthetic_sentiment

SPLITS = ("train", "eval", "test")
_TEXT_SUFFIXES = {
    ".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt",
}


def source_kind(source: str) -> tuple[str, str]:
    """``(kind, location)`` with kind ``local``, ``hub`` or ``synthetic``."""
    if source.startswith("hub:"):
        return "hub", source.removeprefix("hub:")
    if source.startswith("synthetic:"):
        return "synthetic", source.removeprefix("synthetic:")
    if source.startswith("shared:"):
        return "local", str(shared_data_dir() / source.removeprefix("shared:"))
    return "local", str(pathlib.Path(source).expanduser())


def _split_name(config: DataConfig, split: str) -> str | None:
    return getattr(config, f"{split}_split")


def local_split_path(config: DataConfig, split: str) -> pathlib.Path | None:
    """The file (text) or folder (images) of one split of a local source; raises if absent."""
    name = _split_name(config, split)
    if name is None:
        return None
    folder = pathlib.Path(source_kind(config.source)[1])
    path = pathlib.Path(name).expanduser()
    if not path.is_absolute():
        if folder.is_file():
            raise DataError(
                f"data.source={config.source!r} is a file; data.source names the folder and "
                f"data.{split}_split the file in it (data.source: {folder.parent}, "
                f"data.{split}_split: {folder.name})"
            )
        if not folder.is_dir():
            raise missing_file_error(folder, f"data folder (data.source={config.source!r})")
        path = folder / path
    key = f"data.{split}_split={name!r}"
    if config.task == "image_classification":
        if not path.is_dir():
            raise missing_file_error(path, f"image folder ({key})")
        return path
    if path.is_file():
        return path
    tried = []
    if not path.suffix:
        tried = [path.with_suffix(suffix) for suffix in _TEXT_SUFFIXES]
        found = [candidate for candidate in tried if candidate.is_file()]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(f"{key} matches several files ({', '.join(map(str, found))}); name one with its extension")
    raise missing_file_error(path, f"data file ({key})", tried)


def check_data_files(config: DataConfig) -> None:
    """Raises ConfigError naming the key and path when a local split file is missing.

    Hub and synthetic sources are not checked (that needs the network or is
    always fine). ``load_config`` calls this so a typo fails at once.
    """
    if source_kind(config.source)[0] != "local":
        return
    for split in SPLITS:
        try:
            local_split_path(config, split)
        except DataError as error:
            message = str(error)
            key = "data.source" if "data folder" in message or "is a file" in message else f"data.{split}_split"
            raise ConfigError(str(error), key) from None


def select_rows(num_rows: int, limit: int | None, mode: str, seed: int) -> np.ndarray | None:
    """Row indices kept by ``max_*_rows`` (None = all rows), in file order.

    ``first`` keeps rows 0..limit-1; ``sample`` keeps ``limit`` rows drawn
    without replacement by ``numpy.random.default_rng(seed)``, sorted.
    """
    if limit is None or limit >= num_rows:
        return None
    if mode == "first":
        return np.arange(limit)
    if mode == "sample":
        return np.sort(np.random.default_rng(seed).choice(num_rows, size=limit, replace=False))
    raise DataError(f"row selection must be 'first' or 'sample', got {mode!r}")


@dataclasses.dataclass
class _Table:
    """Columns of one split before tokenisation, however they were read."""

    where: str  # a path or hub name, for error messages
    num_rows: int
    columns: list[str]
    read: Any  # (column name, row indices or None) -> list of values
    label_names: Any = None  # column name -> tuple of class names, when the source has them

    def column(self, name: str, config_key: str, rows: np.ndarray | None) -> list[Any]:
        if name not in self.columns:
            close = difflib.get_close_matches(name, self.columns, n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(
                f"column {name!r} ({config_key}) not found in {self.where}; columns present: {self.columns}{suggestion}"
            )
        return self.read(name, rows)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """The ``datasets`` module with its progress bars off (their setting restored after)."""
    import datasets  # lazy: importing datasets takes a second

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _arrow_table(dataset: Any, where: str) -> _Table:
    table = dataset.data  # the underlying Arrow table; no row selection was applied to it

    def read(name: str, rows: np.ndarray | None) -> list[Any]:
        column = table.column(name)
        if rows is not None:
            column = column.take(rows)
        return column.to_pylist()

    features = dataset.features

    def label_names(name: str) -> tuple[str, ...] | None:
        names = getattr(features.get(name), "names", None)
        return tuple(names) if names else None

    return _Table(where, dataset.num_rows, list(dataset.column_names), read, label_names)


def _file_format(config: DataConfig, path: pathlib.Path) -> str:
    if config.format != "auto":
        return config.format
    suffix = path.suffix.lower()
    if suffix not in _TEXT_SUFFIXES:
        raise DataError(f"cannot tell the format of {path} from its extension; set data.format (csv, tsv, txt, ...)")
    return _TEXT_SUFFIXES[suffix]


def _read_text_lines(config: DataConfig, path: pathlib.Path) -> _Table:
    """A plain text file: one example per non-empty line, in a column ``text``."""
    if config.task != "causal_lm":
        raise DataError(f"{path} is plain text (one text per line, no labels): data for data.task: causal_lm. "
                        f"{config.task} needs a label column: use csv, tsv, json, jsonl or parquet")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise DataError(f"could not read {path} as UTF-8 text: {error}") from None

    def read(name: str, rows: np.ndarray | None) -> list[Any]:
        return lines if rows is None else [lines[i] for i in rows]

    return _Table(str(path), len(lines), ["text"], read, lambda column: None)


def _check_text_file(path: pathlib.Path, file_format: str) -> None:
    """Raises ``DataError`` naming ``path`` when it is empty, holds a header alone,
    or is not UTF-8 (``datasets`` would say only that generation failed)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = offset = 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                decoder.decode(line)
            except UnicodeDecodeError as error:
                byte = line[error.start : error.start + 1].hex()
                raise DataError(
                    f"{path} is not UTF-8 text: line {lines + 1}, byte {offset + error.start} (0x{byte}); "
                    f"re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name})"
                ) from None
            offset += len(line)
            lines += bool(line.strip())
    header = 1 if file_format in ("csv", "tsv") else 0
    if lines == 0:
        raise DataError(f"{path} is empty; it needs {'a header line and ' if header else ''}one row per example")
    if lines <= header:
        raise DataError(f"{path} has a header line but no rows; it needs one row per example")


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _read_local_table(config: DataConfig, path: pathlib.Path) -> _Table:
    file_format = _file_format(config, path)
    if file_format != "parquet":
        _check_text_file(path, file_format)
    if file_format == "txt":
        return _read_text_lines(config, path)
    if file_format in ("csv", "tsv"):
        # keep_default_na=False: a sentence such as "null" or "NA" stays text.
        builder, options = "csv", {"keep_default_na": False}
        if file_format == "tsv":
            options.update(delimiter="\t", quoting=csv.QUOTE_NONE)  # TSV has no quoting
    elif file_format in ("json", "jsonl"):
        builder, options = "json", {}
    else:
        builder, options = "parquet", {}
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(
                builder, data_files={"data": str(path)}, split="data", cache_dir=config.cache_dir, **options
            )
        except Exception as error:  # datasets wraps parser errors in many types; the innermost says what
            cause = _root_cause(error)
            raise DataError(f"could not read {path} as {file_format}: {type(cause).__name__}: {cause}") from None
    return _arrow_table(dataset, str(path))


def _read_hub_table(config: DataConfig, name: str, split_name: str) -> _Table:
    where = f"hub dataset {name!r}" + (f" ({config.subset})" if config.subset else "") + f" split {split_name!r}"
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(name, config.subset, split=split_name, cache_dir=config.cache_dir)
        except Exception as error:  # connection, missing dataset, missing split, ...
            raise DataError(
                f"could not load {where}: {type(error).__name__}: {error}. Offline, the hub is only reachable "
                "through its local cache; use a local copy instead (for SST-2: data.source: shared:sst2)"
            ) from None
    return _arrow_table(dataset, where)


def _read_synthetic_table(name: str, split: str) -> _Table:
    if name not in SYNTHETIC_TASKS:
        raise DataError(f"data.source: unknown synthetic task {name!r}; built in: {list(SYNTHETIC_TASKS)}")
    texts, labels = synthetic_sentiment(split)
    values = {"sentence": texts, "text": texts, "label": labels}  # "text": the causal-LM default column

    def read(column: str, rows: np.ndarray | None) -> list[Any]:
        data = values[column]
        return data if rows is None else [data[i] for i in rows]

    return _Table(f"synthetic:{name} ({split})", len(texts), list(values), read, lambda column: None)


def read_table(config: DataConfig, split: str) -> _Table | None:
    split_name = _split_name(config, split)
    if split_name is None:
        return None
    kind, location = source_kind(config.source)
    if kind == "synthetic":
        return _read_synthetic_table(location, split)
    if kind == "hub":
        return _read_hub_table(config, location, split_name)
    return _read_local_table(config, local_split_path(config, split))


def split_sizes(config: DataConfig) -> dict[str, int]:
    """Rows in each configured split before ``max_*_rows``, read without tokenising (fast)."""
    if config.task == "image_classification":
        raise DataError("split_sizes counts rows of text tables; load image folders with load_data")
    sizes = {}
    for split in SPLITS:
        table = read_table(config, split)
        if table is not None:
            sizes[split] = table.num_rows
    return sizes
