"""breaching's text data from a local copy: wikitext users and tokenizers checked against breaching's
own ``datasets_text`` functions on tiny generated caches, masked-lm batches against its collator."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from fedjax_users import cli, io
from fedjax_users.config import UserConfig
from fedjax_users.data import DataError, load_case, load_examples, user_example_indices
from fedjax_users.data import cases, hf_tokenizer, masking, text
from text_fakes import (  # noqa: F401 (offline_hub: an autouse fixture)
    BERT_SPECIALS, offline_hub, wikitext_lines, write_bert_tokenizer, write_gpt2_tokenizer, write_raw_wikitext,
)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

BLOCK = 8
ARTICLES = 4


def breaching_case(name):
    from parity.reference import config_dir

    return os.path.join(config_dir(), "case", f"{name}.yaml")


def reference():
    from parity.reference import datasets_text_module

    return datasets_text_module()


class Lines:
    """What breaching's article split reads of a ``datasets.Dataset``: its ``text`` column and ``select``."""

    def __init__(self, lines):
        self.lines = list(lines)

    def __getitem__(self, column):
        assert column == "text"
        return self.lines

    def select(self, indices):
        return Lines([self.lines[i] for i in indices])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A data.path as breaching's users have it: raw wikitext files and both tokenizers cached there."""
    path = tmp_path_factory.mktemp("data")
    splits = {"train": wikitext_lines(ARTICLES, seed=0), "valid": wikitext_lines(2, seed=1), "test": wikitext_lines(1)}
    write_raw_wikitext(path, splits)
    texts = splits["train"] + splits["valid"]
    vocab = {"gpt2": write_gpt2_tokenizer(path, texts), "bert-base-uncased": write_bert_tokenizer(path, texts)}
    return dict(path=str(path), lines=splits, vocab=vocab)


def causal_cfg(corpus, *extra):
    return load_case(breaching_case("10_causal_lang_training"), [
        f"data.path={corpus['path']}", f"data.vocab_size={corpus['vocab']['gpt2']}", f"data.shape=[{BLOCK}]", *extra,
    ])


def bert_cfg(corpus, *extra):
    return load_case(breaching_case("9_bert_training"), [
        f"data.path={corpus['path']}", f"data.vocab_size={corpus['vocab']['bert-base-uncased']}",
        f"data.shape=[{BLOCK}]", *extra,
    ])


# ---------------------------------------------------------------------------------------------
# Tokenizers: breaching's _get_tokenizer on the same cache


@pytest.mark.parametrize("name, repo", [("gpt2", "gpt2"), ("GPT-2", "gpt2"), ("bert-base-uncased", "bert-base-uncased"),
                                        ("bert", "bert-base-uncased")])
def test_tokenizer_is_breachings(name, repo, corpus):
    vocab, lines = corpus["vocab"][repo], corpus["lines"]["train"]
    ours = hf_tokenizer.load_tokenizer(name, vocab, corpus["path"])
    theirs = reference()._get_tokenizer(name, vocab, cache_dir=corpus["path"])
    assert ours.encode(lines) == theirs(lines)["input_ids"]
    assert ours.vocab_size == theirs.vocab_size == vocab
    # [PAD] is added to gpt2 (a new id past the vocabulary) and already bert's.
    assert ours.num_tokens == len(theirs) == vocab + (repo == "gpt2")
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.special_ids == tuple(sorted(theirs.all_special_ids))
    assert ours.mask_token_id == (None if theirs.mask_token is None else theirs.mask_token_id)
    assert (ours.mask_token_id is None) == (repo == "gpt2")
    if repo == "bert-base-uncased":
        assert sorted(theirs.convert_ids_to_tokens(list(ours.special_ids))) == sorted(BERT_SPECIALS)
        assert ours.encode(["Hello"])[0][0] == theirs.cls_token_id


def test_tokenizer_is_found_in_the_user_hub_cache_after_data_path(corpus, tmp_path):
    hub = tmp_path / "hf" / "hub"
    vocab = write_gpt2_tokenizer(hub, ["some other text to learn from"] * 4, vocab_size=270)
    found = hf_tokenizer.load_tokenizer("gpt2", vocab, str(tmp_path / "empty"))
    assert found.source.startswith(str(hub)) and found.vocab_size == vocab
    # data.path (breaching's cache_dir) comes first.
    assert hf_tokenizer.load_tokenizer("gpt2", corpus["vocab"]["gpt2"], corpus["path"]).source.startswith(corpus["path"])


# ---------------------------------------------------------------------------------------------
# The corpus and breaching's preprocessing


def test_raw_lines_are_the_wikitext_builders_examples(tmp_path):
    file = tmp_path / "wiki.test.tokens"
    file.write_text(" = T = \n \n\n text line \n   \n last", encoding="utf-8")
    # Each line keeps its newline; a blank (or whitespace-only) line is "" (the builder's rule).
    assert text.read_raw_lines(str(file)) == [" = T = \n", "", "", " text line \n", "", " last"]


def test_article_split_is_breachings(corpus):
    lines = corpus["lines"]["train"]
    owners = text.line_articles(lines)
    split = reference()._split_wikipedia_into_articles
    for user in range(ARTICLES):
        assert [lines[i] for i in np.flatnonzero(owners == user + 1)] == split(Lines(lines), user).lines
    with pytest.raises(ValueError, match="does not exist"):
        split(Lines(lines), ARTICLES)
    assert owners.max() == ARTICLES
    # The fake's special lines: kept table row, dropped "x = y" line, heading too long to count.
    kept = [lines[i] for i in np.flatnonzero(owners)]
    assert any(" ; " in line for line in kept) and not any(" x = y" in line for line in kept)


def test_group_blocks_is_breachings_group_texts(corpus):
    tokenizer = hf_tokenizer.load_tokenizer("gpt2", corpus["vocab"]["gpt2"], corpus["path"])
    ids = tokenizer.encode(corpus["lines"]["train"][:20])
    for block, batch in [(BLOCK, 1000), (5, 3), (200, 4)]:
        cfg = OmegaConf.create(dict(task="causal-lm", shape=[block], disable_mlm=False, mlm_probability=0.15))
        _, group_texts, _ = reference()._get_preprocessing(tokenizer.backend, cfg)
        # datasets' map hands group_texts consecutive batches of `batch` rows.
        expected = []
        for start in range(0, len(ids), batch):
            grouped = group_texts({"input_ids": ids[start : start + batch]})
            assert grouped["labels"] == grouped["input_ids"]
            expected += grouped["input_ids"]
        assert text.group_blocks(ids, block, batch) == expected
    assert any(len(b) < 200 for b in text.group_blocks(ids, 200, 4))  # short batches make short blocks


def breaching_user_blocks(cfg_data, user):
    """breaching's _build_and_split_dataset_text for one user, past load_dataset (one map batch)."""
    ref = reference()
    lines = text.read_raw_lines(os.path.join(cfg_data.path, "wikitext-103", "wiki.train.tokens"))
    mine = ref._split_wikipedia_into_articles(Lines(lines), user).lines
    tokenizer = ref._get_tokenizer(cfg_data.tokenizer, cfg_data.vocab_size, cache_dir=cfg_data.path)
    tokenize, group_texts, _ = ref._get_preprocessing(tokenizer, cfg_data)
    tokenized = {k: v for k, v in tokenize({"text": mine}).items()}
    return group_texts(tokenized)["input_ids"][: cfg_data.size]


@pytest.mark.parametrize("config", [causal_cfg, bert_cfg])
def test_wikitext_users_are_breachings(config, corpus):
    cfg = config(corpus).data
    examples = load_examples(cfg)
    assert examples.num_classes == cfg.vocab_size and examples.given is not None
    for user in range(ARTICLES):
        held = examples.given(user)
        assert held.stored.tolist() == breaching_user_blocks(cfg, user)
        assert held.stored.shape[1] == BLOCK and held.stored.dtype == np.int32


def test_data_size_cuts_each_users_blocks(corpus):
    full = load_examples(causal_cfg(corpus).data).given(1).stored
    cut = load_examples(causal_cfg(corpus, "data.size=2").data).given(1).stored
    assert len(full) > 2 and cut.tolist() == full[:2].tolist()


def test_a_case_user_holds_its_articles_first_blocks(corpus):
    cfg = causal_cfg(corpus, "user.user_idx=2", "user.num_data_points=3")
    users = cases.construct_users(cfg)
    expected = load_examples(cfg.data).given(2).stored[:3]
    np.testing.assert_array_equal(users.data.inputs, expected)
    np.testing.assert_array_equal(users.data.labels, expected)  # causal-lm labels are the ids


def test_causal_case_file_runs_on_a_local_cache(corpus, tmp_path, capsys):
    out = tmp_path / "u.msgpack"
    code = cli.main(["run", breaching_case("10_causal_lang_training"), f"data.path={corpus['path']}",
                     f"data.vocab_size={corpus['vocab']['gpt2']}", f"data.shape=[{BLOCK}]", "--out", str(out),
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "data        wikitext, " in captured.out
    shared, config = io.load_shared(out)
    assert config["data"]["name"] == "wikitext" and config["data"]["tokenizer"] == "gpt2"
    leaves = jax.tree_util.tree_leaves(shared.gradients)
    assert leaves and all(np.isfinite(leaf).all() for leaf in leaves) and any(np.abs(leaf).max() > 0 for leaf in leaves)


# ---------------------------------------------------------------------------------------------
# Masked-lm batches


def test_masked_wikitext_batches_follow_the_collator(corpus):
    cfg = bert_cfg(corpus).data
    examples = load_examples(cfg)
    tokenizer = hf_tokenizer.load_tokenizer(cfg.tokenizer, cfg.vocab_size, cfg.path)
    ids = examples.given(0).stored
    inputs, labels = examples.collate(ids, [0, 0, 0, 0])
    selected = labels != masking.IGNORE
    assert selected.any() and (labels[selected] == ids[selected]).all()
    assert not selected[np.isin(ids, tokenizer.special_ids)].any()  # [CLS] / [SEP] are never selected
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])
    assert ((inputs[selected] == tokenizer.mask_token_id) | (inputs[selected] < tokenizer.num_tokens)).all()
    again = examples.collate(ids, [0, 0, 0, 0])
    np.testing.assert_array_equal(again[0], inputs)
    assert not np.array_equal(examples.collate(ids, [0, 0, 1, 0])[1], labels)


def _rates(ids, inputs, labels, special, mask_id):
    selected = labels != masking.IGNORE
    return dict(
        selected=selected[~special].mean(),
        masked=(inputs[selected] == mask_id).mean(),
        changed=((inputs != ids) & (inputs != mask_id))[selected].mean(),
        special_selected=selected[special].mean(),
    )


def test_masking_has_the_collators_distribution(corpus):
    import torch

    cfg = bert_cfg(corpus, "data.mlm_probability=0.3").data
    tokenizer = reference()._get_tokenizer(cfg.tokenizer, cfg.vocab_size, cache_dir=cfg.path)
    _, _, collator = reference()._get_preprocessing(tokenizer, cfg)
    ours = hf_tokenizer.load_tokenizer(cfg.tokenizer, cfg.vocab_size, cfg.path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ours.num_tokens, size=(400, 32)).astype(np.int64)
    ids[:, 0], ids[:, -1] = ours.special_ids[0], ours.special_ids[-1]
    special = np.isin(ids, ours.special_ids)
    torch.manual_seed(0)
    batch = collator([{"input_ids": torch.tensor(row)} for row in ids])
    theirs = _rates(ids, batch["input_ids"].numpy(), batch["labels"].numpy(), special, tokenizer.mask_token_id)
    spec = masking.masked_lm(cfg, ours.mask_token_id, ours.num_tokens, ours.special_ids, ours.pad_token_id)
    mine = _rates(ids, *masking.mask_tokens(ids, spec, [0]), special, ours.mask_token_id)
    assert mine["special_selected"] == theirs["special_selected"] == 0
    n_tokens, n_selected = int((~special).sum()), int(mine["selected"] * (~special).sum())
    for key, p, n in [("selected", 0.3, n_tokens), ("masked", 0.8, n_selected), ("changed", 0.1, n_selected)]:
        # Two independent draws of the same rate: within five standard errors of each other.
        tolerance = 5 * np.sqrt(2 * p * (1 - p) / n)
        assert abs(mine[key] - theirs[key]) < tolerance, (key, mine[key], theirs[key])
        assert abs(mine[key] - p) < tolerance, (key, mine[key])


def test_disable_mlm_labels_are_the_ids_but_pads(corpus):
    cfg = bert_cfg(corpus, "data.disable_mlm=True").data
    tokenizer = hf_tokenizer.load_tokenizer(cfg.tokenizer, cfg.vocab_size, cfg.path)
    spec = masking.masked_lm(cfg, tokenizer.mask_token_id, tokenizer.num_tokens, tokenizer.special_ids,
                             tokenizer.pad_token_id)
    ids = np.array([[5, tokenizer.pad_token_id, 7]])
    inputs, labels = masking.mask_tokens(ids, spec, [0])
    np.testing.assert_array_equal(inputs, ids)
    assert labels.tolist() == [[5, masking.IGNORE, 7]]


def test_bert_case_on_random_tokens_has_masked_lm_batches():
    cfg = load_case(breaching_case("9_bert_training"), ["data=random_tokens", "data.size=40", "data.shape=[16]"])
    assert cfg.data.task == "masked-lm" and cfg.data.vocab_size == 30522
    examples = load_examples(cfg.data)
    mask_id = cfg.data.vocab_size - 1
    assert examples.num_classes == 30522 and examples.stored.max() < mask_id
    user_cfg = UserConfig.from_dict(dict(user_type="local_gradient", user_idx=0, num_data_points=4))
    key = jax.random.key(0)
    first = cases._query_data(examples, cfg.data, user_cfg, cfg.impl, (0,), key, key, np.float32, 0)
    rerun = cases._query_data(examples, cfg.data, user_cfg, cfg.impl, (0,), key, key, np.float32, 0)
    second = cases._query_data(examples, cfg.data, user_cfg, cfg.impl, (0,), key, key, np.float32, 1)
    inputs, labels = np.asarray(first.inputs), np.asarray(first.labels)
    ids = examples.take(user_example_indices(examples, cfg.data, 0, 4))[0]
    selected = labels != masking.IGNORE
    assert selected.any() and (labels[selected] == ids[selected]).all()
    assert (inputs[selected] == mask_id).any() and (inputs[~selected] == ids[~selected]).all()
    np.testing.assert_array_equal(np.asarray(rerun.labels), labels)
    # breaching's collator masks every batch its dataloader yields: each query draws new masks.
    assert not np.array_equal(np.asarray(second.labels), labels)


# ---------------------------------------------------------------------------------------------
# Errors: one DataError line each


def _one_line(raised) -> str:
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_offline_without_a_cache_exits_2_with_one_line(tmp_path, capsys):
    code = cli.main(["run", breaching_case("10_causal_lang_training"), f"data.path={tmp_path / 'none'}",
                     "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "wiki.train.tokens" in err and "models--gpt2" in err and "data=random_tokens" in err


def test_vocabulary_mismatch_exits_2(corpus, tmp_path, capsys):
    code = cli.main(["run", breaching_case("10_causal_lang_training"), f"data.path={corpus['path']}",
                     "data.vocab_size=50257", "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"vocabulary of {corpus['vocab']['gpt2']}" in err and "50257" in err


def test_missing_transformers_is_one_line(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DataError) as raised:
        load_examples(causal_cfg(corpus).data)
    assert "transformers package" in _one_line(raised)


def test_a_datasets_cache_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "wikitext" / "wikitext-103-v1").mkdir(parents=True)
    with pytest.raises(DataError) as raised:
        text.find_corpus(str(tmp_path), "training")
    assert "datasets package" in _one_line(raised) and "wikitext-103" in str(raised.value)


def test_a_raw_folder_without_the_split_is_one_line(tmp_path):
    write_raw_wikitext(tmp_path, {"valid": [" = A = \n"]})
    assert text.find_corpus(str(tmp_path), "validation").location.endswith("wiki.valid.tokens")
    with pytest.raises(DataError) as raised:
        text.find_corpus(str(tmp_path), "training")
    assert "lacks wiki.train.tokens" in _one_line(raised)


def test_a_damaged_tokenizer_is_one_line(tmp_path):
    write_gpt2_tokenizer(tmp_path, ["a few words of text"] * 3, vocab_size=260)
    snapshot = hf_tokenizer.find_snapshot("gpt2", [str(tmp_path)])
    with open(os.path.join(snapshot, "tokenizer.json"), "w") as handle:
        handle.write("{not json")
    with pytest.raises(DataError) as raised:
        hf_tokenizer.load_tokenizer("gpt2", None, str(tmp_path))
    assert "could not be read" in _one_line(raised) and snapshot in str(raised.value)


def test_users_past_the_articles_or_other_partitions_are_refused(corpus):
    cfg = causal_cfg(corpus).data
    examples = load_examples(cfg)
    with pytest.raises(DataError, match=f"user {ARTICLES} does not exist"):
        examples.given(ARTICLES)
    with pytest.raises(DataError, match="must be 'given'"):
        user_example_indices(examples, OmegaConf.merge(cfg, {"partition": "random"}), 0, 1)
    with pytest.raises(DataError, match="outside the dataset's 2 clients"):
        user_example_indices(examples, OmegaConf.merge(cfg, {"default_clients": 2}), 2, 1)


def test_masked_lm_needs_a_mask_token(corpus):
    with pytest.raises(DataError) as raised:
        load_examples(causal_cfg(corpus, "data.task=masked-lm").data)
    assert "no mask token" in _one_line(raised)


def test_word_level_tokenizer_is_read_from_breachings_cached_file(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus["lines"]["train"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    vocab = tokenizer.get_vocab_size()
    (tmp_path / "cache").mkdir()
    tokenizer.save(str(tmp_path / "cache" / f"word-tokenizer_{vocab}.json"))
    ours = hf_tokenizer.load_tokenizer("word-level", vocab, str(tmp_path))
    theirs = reference()._get_tokenizer("word-level", vocab, cache_dir=str(tmp_path))
    lines = corpus["lines"]["valid"]
    assert ours.encode(lines) == theirs(lines)["input_ids"] and ours.num_tokens == len(theirs) == vocab + 1
    with pytest.raises(DataError, match="generating it from the corpus is not done here"):
        hf_tokenizer.load_tokenizer("word-level", vocab + 1, str(tmp_path))
    with pytest.raises(DataError, match="CanineTokenizer"):
        hf_tokenizer.load_tokenizer("character", None, str(tmp_path))


def test_a_user_shorter_than_one_block_is_refused(corpus):
    # Article 0's lines hold fewer tokens than this block: breaching would hand its model one short sequence.
    examples = load_examples(causal_cfg(corpus, "data.shape=[2000]").data)
    with pytest.raises(DataError, match="fewer than data.shape"):
        examples.given(0)
