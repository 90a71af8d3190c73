"""Builds the small tokenizers packaged for the tiny text presets (1,000 tokens each).

``bert-tiny``, ``roberta-tiny`` and ``llama-tiny`` embed 1,000 token ids, so a
real tokenizer cannot feed them; these are trained to exactly that size, each in
its family's style and with the special-token ids the preset's config names:

* ``bert-tiny``: uncased WordPiece, ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3,
  ``[MASK]`` 4; ``[CLS] a [SEP] b [SEP]`` with token type ids;
* ``roberta-tiny``: byte-level BPE, ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 (the preset's
  bos/pad/eos), ``<unk>`` 3, ``<mask>`` 4; ``<s> a </s></s> b </s>``;
* ``llama-tiny``: byte-level BPE, ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2 (pad/bos/eos of
  the preset); ``<s>`` before each text, as Llama's tokenizer does.

Byte-level BPE covers any text without unknown tokens. The training text is the
shared data's SST-2 training sentences and the imdb and yelp reviews (English
sentiment, which the tests and examples use). The files are committed; to
rebuild them (the BPE files come out byte for byte the same; WordPiece's order
among equally frequent pieces may differ from run to run)::

    python -m peftjax.models.tiny_tokenizers.make          # reads the shared data folder
"""

from __future__ import annotations

import csv
import json
import pathlib

VOCAB_SIZE = 1000
HERE = pathlib.Path(__file__).resolve().parent


def _sentences(data: pathlib.Path) -> list[str]:
    files = [data / "sst2" / "train.tsv", data / "sentiment_domains" / "imdb.tsv", data / "sentiment_domains" / "yelp.tsv"]
    texts = []
    for file in files:
        with file.open(encoding="utf-8") as handle:
            texts.extend(row["sentence"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return texts


def _write(name: str, tokenizer, config: dict, max_length: int | None = 128) -> None:
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, (name, tokenizer.get_vocab_size())
    tokenizer.save(str(folder / "tokenizer.json"))
    # No max_length for the decoder: language-model packing tokenises whole documents.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **({"model_max_length": max_length} if max_length else {}), **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_bert(texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    _write("bert-tiny", tokenizer, {
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
    })


def _byte_level(texts: list[str], specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build_roberta(texts: list[str]) -> None:
    from tokenizers import processors

    tokenizer = _byte_level(texts, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    _write("roberta-tiny", tokenizer, {
        "bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
        "unk_token": "<unk>", "mask_token": "<mask>", "model_input_names": ["input_ids", "attention_mask"],
    })


def build_llama(texts: list[str]) -> None:
    from tokenizers import processors

    tokenizer = _byte_level(texts, ["<pad>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    _write("llama-tiny", tokenizer, {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_input_names": ["input_ids", "attention_mask"],
    }, max_length=None)


def main() -> None:
    from peftjax.data import shared_data_dir

    texts = _sentences(shared_data_dir())
    build_bert(texts)
    build_roberta(texts)
    build_llama(texts)


if __name__ == "__main__":
    main()
