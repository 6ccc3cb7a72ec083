"""Tiny text caches in their users' layouts: a wikitext-103 raw folder and Hugging Face tokenizers.

The tokenizers are trained here with the ``tokenizers`` package in the pipelines of the real
``gpt2`` (byte-level BPE) and ``bert-base-uncased`` (lower-casing WordPiece with ``[CLS] ... [SEP]``)
and saved in the hub cache layout (``models--<repo>/refs/main``, ``snapshots/<revision>/``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

WORDS = ("the game was released in north america and europe with new levels for players who "
         "had finished the story of the war between two nations and its soldiers").split()
REVISION = "0123456789abcdef"


def _sentence(rng, words: int) -> str:
    return " " + " ".join(rng.choice(WORDS, size=words)) + " . \n"


def wikitext_lines(articles: int = 4, seed: int = 0) -> list[str]:
    """Lines like wikitext-103's (`` = Title = `` headings, `` = = Section = = ``, blank lines) with
    every case breaching's article split treats on its own: text before the first heading, short
    lines, a line with ``" = "`` in it, a table row with ``" ; "``, a heading of 100 characters."""
    rng = np.random.default_rng(seed)
    lines = [" \n", _sentence(rng, 12), " \n"]
    for a in range(articles):
        lines += [f" = Article {a} = \n", " \n", _sentence(rng, 20 + 5 * a), " short line \n", " \n",
                  " = = Section = = \n", " \n", _sentence(rng, 30), " \n"]
        if a == 1:
            lines += [" x = y holds in this long enough line of text \n",
                      " a = b ; c = d in a table row that is long enough \n"]
        if a == 2:
            lines += [" = " + "Long " * 20 + "= \n", _sentence(rng, 15)]
        lines += [_sentence(rng, 10 + a), " \n"]
    return lines


def write_raw_wikitext(path, lines_by_split: dict[str, list[str]]) -> str:
    """``path/wikitext-103/wiki.<split>.tokens`` files, as the wikitext-103-v1 archive has them."""
    folder = os.path.join(str(path), "wikitext-103")
    os.makedirs(folder, exist_ok=True)
    for split, lines in lines_by_split.items():
        with open(os.path.join(folder, f"wiki.{split}.tokens"), "w", encoding="utf-8") as handle:
            handle.writelines(lines)
    return folder


def _snapshot(cache, repo: str) -> str:
    base = os.path.join(str(cache), "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(base, "snapshots", REVISION)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as handle:
        handle.write(REVISION)
    return snapshot


def _save(tokenizer, snapshot: str, config: dict, tokenizer_config: dict) -> str:
    tokenizer.save(os.path.join(snapshot, "tokenizer.json"))
    config = dict(config, vocab_size=tokenizer.get_vocab_size())
    for name, content in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        with open(os.path.join(snapshot, name), "w") as handle:
            json.dump(content, handle)
    return snapshot


def write_gpt2_tokenizer(cache, texts, repo: str = "gpt2", vocab_size: int = 300) -> int:
    """A byte-level BPE tokenizer (gpt2's pipeline, ``<|endoftext|>`` its one special token); its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    _save(tokenizer, _snapshot(cache, repo), {"model_type": "gpt2"}, {"model_max_length": 1024})
    return tokenizer.get_vocab_size()


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert_tokenizer(cache, texts, repo: str = "bert-base-uncased", vocab_size: int = 120) -> int:
    """A lower-casing WordPiece tokenizer wrapping texts in ``[CLS] ... [SEP]`` (bert's pipeline); its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    _save(tokenizer, _snapshot(cache, repo), {"model_type": "bert"}, {"do_lower_case": True, "model_max_length": 512})
    return tokenizer.get_vocab_size()


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No user cache is read, and breaching's own AutoTokenizer calls never try the network."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
