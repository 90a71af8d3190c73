"""Tokenizers: Hugging Face tokenizers from local folders, a word tokenizer that
needs no files, and the check that token ids fit the model's embedding table."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from peftjax.data.errors import DataError
from peftjax.data.examples import TaskData, TextExamples
from peftjax.data.shared import missing_file_error

# Texts go to the tokenizer in chunks so the Python lists it returns stay small.
_TOKENIZE_CHUNK = 4096


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    pad_token_id: int | None

    def __call__(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Mapping[str, Any]: ...

    def __len__(self) -> int: ...


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a local folder (tokenizer.json / vocab files) with AutoTokenizer,
    or the tokenizer of a model name (``minilm``, ``bert-tiny``, ...: see
    :mod:`peftjax.models.names`).

    Only local folders: runs and tests must not download.
    """
    from peftjax.models.names import packaged_checkpoint, preset_tokenizer

    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        folder = packaged_checkpoint(str(path)) or preset_tokenizer(str(path)) or folder
    if not folder.is_dir():
        raise missing_file_error(folder, "tokenizer folder (or a model name with a tokenizer: minilm, bert-tiny, ...)")
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(f"could not load a tokenizer from {folder}: {error}") from None


def tokenizer_name(tokenizer: Tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer_matches(
    tokenizer: Tokenizer, vocab_size: int, model_name: str, data: TaskData | TextExamples | None = None
) -> None:
    """Raises DataError when token ids could index past the model's embedding table.

    A tokenizer with more tokens than the model's vocabulary is the usual sign
    that it belongs to another model; on an accelerator the out-of-range ids
    would not fail but silently read garbage embeddings. With ``data``, the ids
    actually present are checked as well.
    """
    size = len(tokenizer)
    name = tokenizer_name(tokenizer)
    fix = "use the tokenizer saved with the model's checkpoint (model.tokenizer, or the checkpoint folder)"
    if size > vocab_size:
        raise DataError(
            f"tokenizer {name!r} has {size} tokens but model {model_name!r} embeds only {vocab_size}: "
            f"ids from {vocab_size} on have no embedding; {fix}"
        )
    if data is not None:
        largest = data.max_token_id()
        if largest >= vocab_size:
            raise DataError(
                f"the data holds token id {largest} but model {model_name!r} embeds only ids below "
                f"{vocab_size} (tokenised with {name!r}); {fix}"
            )


class WordTokenizer:
    """A whitespace tokenizer over a fixed word list, with BERT-style special tokens.

    It lets the built-in synthetic task (and tests) run without any tokenizer
    files. It answers the calls this module makes of a Hugging Face tokenizer:
    ``tok(texts, pairs, truncation=, max_length=, add_special_tokens=)``.
    """

    special_tokens = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    pad_token_id = 0
    cls_token_id = 1
    sep_token_id = 2
    unk_token_id = 3
    eos_token_id = 2

    def __init__(self, words: Sequence[str], name: str = "peftjax-words") -> None:
        vocabulary = list(self.special_tokens) + sorted(set(words) - set(self.special_tokens))
        self.vocab = {word: index for index, word in enumerate(vocabulary)}
        self.name_or_path = name

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.get(word, self.unk_token_id) for word in text.lower().split()]

    def _encode_one(
        self, first: str, second: str | None, truncation: bool, max_length: int | None, add_special_tokens: bool
    ) -> tuple[list[int], list[int]]:
        a, b = self._ids(first), (self._ids(second) if second is not None else None)
        specials = (3 if b is not None else 2) if add_special_tokens else 0
        if truncation and max_length is not None:
            budget = max(max_length - specials, 0)
            while len(a) + len(b or ()) > budget:  # longest first, as Hugging Face does
                (a if b is None or len(a) >= len(b) else b).pop()
        if add_special_tokens:
            a = [self.cls_token_id, *a, self.sep_token_id]
            b = None if b is None else [*b, self.sep_token_id]
        ids = a + (b or [])
        types = [0] * len(a) + [1] * len(b or [])
        return ids, types

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        **_: Any,
    ) -> dict[str, Any]:
        single = isinstance(text, str)
        firsts = [text] if single else list(text)
        seconds = [text_pair] if single and text_pair is not None else text_pair
        if seconds is not None and len(seconds) != len(firsts):
            raise DataError(f"{len(firsts)} texts but {len(seconds)} pair texts")
        encoded = [
            self._encode_one(first, None if seconds is None else seconds[i], truncation, max_length, add_special_tokens)
            for i, first in enumerate(firsts)
        ]
        ids = [e[0] for e in encoded]
        types = [e[1] for e in encoded]
        masks = [[1] * len(e[0]) for e in encoded]
        if single:
            return {"input_ids": ids[0], "token_type_ids": types[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": masks}


def encode(
    tokenizer: Tokenizer,
    first: list[str],
    second: list[str] | None,
    max_length: int | None,
    add_special_tokens: bool = True,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids (and token type ids when the tokenizer gives them), chunk by chunk."""
    ids: list[list[int]] = []
    types: list[list[int]] | None = []
    for start in range(0, len(first), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        encoding = tokenizer(
            first[start:stop],
            None if second is None else second[start:stop],
            truncation=max_length is not None,
            max_length=max_length,
            padding=False,
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,
            verbose=False,
        )
        ids.extend(encoding["input_ids"])
        chunk_types = encoding.get("token_type_ids")
        if chunk_types is None or types is None:
            types = None
        else:
            types.extend(chunk_types)
    return ids, types


def padding_id(tokenizer: Tokenizer) -> int:
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def document_separator(tokenizer: Tokenizer) -> list[int]:
    for attribute in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return [value]
    return []
