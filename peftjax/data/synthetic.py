"""The built-in synthetic sentiment task: no files, no download."""

from __future__ import annotations

import itertools

import numpy as np

from peftjax.data.errors import DataError
from peftjax.data.tokenization import WordTokenizer

_POSITIVE = ("good", "great", "wonderful", "delightful", "brilliant", "charming", "moving", "superb", "funny", "fresh")
_NEGATIVE = ("bad", "awful", "boring", "dull", "clumsy", "tedious", "bland", "weak", "messy", "stale")
_NEUTRAL = (
    "the", "film", "movie", "plot", "story", "acting", "cast", "script", "music", "ending",
    "is", "was", "quite", "really", "a", "and", "with", "its", "director", "scenes",
)  # fmt: skip
_NEGATION = "not"
_SYNTHETIC_SIZES = {"train": 2048, "eval": 512, "test": 512}
SYNTHETIC_TASKS = ("sentiment",)


def synthetic_sentiment(split: str, num_rows: int | None = None) -> tuple[list[str], list[int]]:
    """Sentences and labels of the built-in sentiment task (no files, no download).

    Each sentence mixes neutral words with one to four sentiment words; "not"
    flips the word after it. The label is 1 when the positive words outweigh
    the negative ones (ties never occur), so a model must read several words
    and the negation, yet a small model learns it in a few hundred steps. The
    splits are fixed: ``train`` 2048, ``eval`` 512, ``test`` 512 rows, each from
    its own seed.
    """
    if split not in _SYNTHETIC_SIZES:
        raise DataError(f"the synthetic task has splits {list(_SYNTHETIC_SIZES)}, not {split!r}")
    rng = np.random.default_rng((5, list(_SYNTHETIC_SIZES).index(split)))
    count = _SYNTHETIC_SIZES[split] if num_rows is None else num_rows
    texts, labels = [], []
    while len(texts) < count:
        # Units keep "not" next to its word when later phrases are inserted.
        units = [[str(word)] for word in rng.choice(_NEUTRAL, size=int(rng.integers(2, 24)))]
        score = 0
        for _ in range(int(rng.integers(1, 5))):
            positive = bool(rng.integers(2))
            phrase = [str(rng.choice(_POSITIVE if positive else _NEGATIVE))]
            if rng.random() < 0.25:
                phrase.insert(0, _NEGATION)
                positive = not positive
            score += 1 if positive else -1
            units.insert(int(rng.integers(len(units) + 1)), phrase)
        if score == 0:
            continue
        texts.append(" ".join(itertools.chain.from_iterable(units)))
        labels.append(int(score > 0))
    return texts, labels


def synthetic_tokenizer() -> WordTokenizer:
    """The word tokenizer that covers the synthetic task's vocabulary."""
    return WordTokenizer(_POSITIVE + _NEGATIVE + _NEUTRAL + (_NEGATION,), name="peftjax-synthetic-words")
