"""The shared data folder beside the repository, and the errors that point at it.

Real data (SST-2, the sentiment domains) lives in ``<repo>/../shared/data``
and is never copied into the repository; ``shared:REL`` sources and the
tests find it here.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from peftjax.data.errors import DataFileNotFoundError

# Environment variable that moves the shared data folder.
SHARED_DATA_ENV = "PEFTJAX_SHARED_DATA"


def shared_data_dir() -> pathlib.Path:
    """The shared data folder: ``$PEFTJAX_SHARED_DATA``, else ``<repo>/../shared/data``.

    The shared data lives beside the repository and is never copied into it.
    When the package is not imported from a checkout (so ``<repo>`` is
    site-packages), ``../shared/data`` from the working directory is used.
    """
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        return pathlib.Path(override).expanduser().resolve()
    repo = pathlib.Path(__file__).resolve().parents[2]
    beside_repo = (repo.parent / "shared" / "data").resolve()
    if beside_repo.exists():
        return beside_repo
    beside_cwd = (pathlib.Path.cwd().parent / "shared" / "data").resolve()
    return beside_cwd if beside_cwd.exists() else beside_repo


def sst2_path() -> pathlib.Path:
    """The shared SST-2 folder (``train.tsv``, ``dev.tsv``, ``test.tsv``)."""
    return shared_data_dir() / "sst2"


def require_shared_data(*relative_paths: str) -> pathlib.Path:
    """Test helper: the shared data folder, when ``relative_paths`` exist in it.

    When something is missing the calling test fails if ``CI=true`` (CI must
    have the data, and a silent skip would hide that) and is skipped with the
    expected location otherwise. pytest is imported only here.
    """
    root = shared_data_dir()
    missing = [str(root / path) for path in relative_paths or ("",) if not (root / path).exists()]
    if not missing:
        return root
    import pytest

    message = (
        f"shared data missing: {', '.join(missing)}; it is expected at {root} "
        f"(<repo>/../shared/data, or set ${SHARED_DATA_ENV})"
    )
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")  # pytest.skip raises


def _looks_shared(path: pathlib.Path) -> bool:
    text = str(path)
    return "shared/data" in text.replace(os.sep, "/") or str(shared_data_dir()) in text


def missing_file_error(path: pathlib.Path, what: str, tried: Sequence[pathlib.Path] = ()) -> DataFileNotFoundError:
    message = f"{what} not found: {path}"
    if tried:
        message += f" (tried {', '.join(p.name for p in tried)})"
    if _looks_shared(path):
        message += (
            f". The shared data is expected at {shared_data_dir()}, beside the repository "
            f"(<repo>/../shared/data, e.g. sst2/train.tsv); set ${SHARED_DATA_ENV} if it lives elsewhere"
        )
    return DataFileNotFoundError(message)
