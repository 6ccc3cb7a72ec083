"""breaching's federated datasets with their own users (shakespeare, stackoverflow, cola, Birdsnap), each checked
against breaching's own loader functions on tiny files in the real layouts (tests/data/federated_fakes.py).

* shakespeare / stackoverflow: breaching's ``load_shakespeare_tff`` / ``load_stackoverflow_tff`` themselves read
  the same sqlite files, with their own queries, split names and ASCII decoding. TensorFlow is not installed here
  (nor can it be a dependency), so the one TensorFlow call in them, ``tf.io.parse_example`` of
  ``FixedLenFeature(shape=())``, is the hand-written stand-in ``federated_fakes.fake_tensorflow``; the protos are
  written by a hand-written encoder, and both are checked against bytes TensorFlow 2.21 wrote. (Once, outside
  this suite, breaching's two readers ran with TensorFlow 2.21 itself on files TensorFlow wrote: 60 users of both
  datasets, every split, with and without indexes, read the same texts as here; docs/datasets.md.)
* Their token blocks: breaching's ``_get_tokenizer`` and ``_get_preprocessing`` (``tokenize``, ``group_texts``)
  on the texts breaching's reader returned.
* cola: breaching's classification ``tokenize`` on each row. The rows are read from Arrow files written with
  pyarrow (in the test extra; not a run dependency, so its tests skip where it is missing). A CoLA user's gradient
  is checked against breaching's ``BertForSequenceClassification`` called with breaching's own batch.
* Birdsnap: breaching's ``Birdsnap`` class on the same folder; only its md5 check of the metadata archive
  ``birdsnap.tgz`` (which fedjax_users does not need) is patched to pass.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from federated_fakes import (
    COLA_SENTENCES,
    SHAKESPEARE_CLIENTS,
    decode_example,
    encode_example,
    fake_tensorflow,
    shakespeare_example,
    write_birdsnap,
    write_cola_cache,
    write_shakespeare,
    write_stackoverflow,
    write_tff_sqlite,
)
from fedjax_users import cli
from fedjax_users.data import DataError, cases, catalog, glue, images, load_case, load_examples, tf_example, tff
from text_fakes import offline_hub, write_bert_tokenizer, write_gpt2_tokenizer  # noqa: F401 (an autouse fixture)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

BLOCK = 8
# Serialized tf.train.Example protos written by TensorFlow 2.21 (``SerializeToString(deterministic=True)``).
TF_SNIPPET = bytes.fromhex("0a140a120a08736e69707065747312060a040a026162")  # snippets: b"ab"
TF_MIXED = bytes.fromhex(  # f: [0.5, -1.0] (float), score: -2 (int64), tokens: b"how do i" (bytes)
    "0a440a110a0166120c120a0a080000003f000080bf0a170a0573636f7265120e1a0c0a0afeffffffffffffffff010a160a06746f6b"
    "656e73120c0a0a0a08686f7720646f2069"
)


def breaching_case(name):
    from parity.reference import config_dir

    return os.path.join(config_dir(), "case", f"{name}.yaml")


def text_reference():
    from parity.reference import datasets_text_module

    return datasets_text_module()


@pytest.fixture(scope="module")
def tff_folder(tmp_path_factory):
    """A data.path with both TFF files (no indexes) and a gpt2-style tokenizer cached in it."""
    path = tmp_path_factory.mktemp("tff")
    write_shakespeare(path)
    write_stackoverflow(path)
    texts = [decode_example(shakespeare_example(c, "train", k))["snippets"][1][0].decode()
             for c in SHAKESPEARE_CLIENTS for k in range(3)]
    return dict(path=str(path), vocab=write_gpt2_tokenizer(path, texts, vocab_size=280))


def tff_cfg(folder, dataset, *extra, case="10_causal_lang_training"):
    return load_case(breaching_case(case), [
        f"data={dataset}", f"data.path={folder['path']}", f"data.vocab_size={folder['vocab']}",
        f"data.shape=[{BLOCK}]", *extra,
    ])


# ---------------------------------------------------------------------------------------------
# tf.train.Example without TensorFlow


def test_the_example_parser_reads_tensorflows_bytes():
    assert tf_example.parse_fixed(TF_SNIPPET, {"snippets": tf_example.BYTES}) == {"snippets": b"ab"}
    spec = {"score": tf_example.INT64, "tokens": tf_example.BYTES, "f": tf_example.BYTES}
    with pytest.raises(DataError, match="'f' is a float_list, expected a bytes_list"):
        tf_example.parse_fixed(TF_MIXED, spec)
    assert tf_example.parse_fixed(TF_MIXED, {"score": tf_example.INT64, "tokens": tf_example.BYTES}) == {
        "score": -2, "tokens": b"how do i"}
    # Our message types write TensorFlow's bytes, and so does the tests' hand-written encoder.
    example = tf_example.Example()
    example.features.feature["snippets"].bytes_list.value.append(b"ab")
    assert example.SerializeToString() == TF_SNIPPET == encode_example({"snippets": ("bytes", [b"ab"])})
    mixed = {"f": ("float", [0.5, -1.0]), "score": ("int64", [-2]), "tokens": ("bytes", [b"how do i"])}
    assert encode_example(mixed) == TF_MIXED and decode_example(TF_MIXED) == mixed


@pytest.mark.parametrize("features, message", [
    ({"x": ("bytes", [b"a"])}, "lacks the feature 'snippets'"),
    ({"snippets": ("bytes", [b"a", b"b"])}, "holds 2 values, expected 1"),
    ({"snippets": ("bytes", [])}, "holds 0 values"),
    ({"snippets": ("int64", [1])}, "is a int64_list, expected a bytes_list"),
])
def test_the_parser_refuses_what_fixed_len_feature_refuses(features, message):
    # tf.io.parse_example with FixedLenFeature(shape=()) raises InvalidArgumentError for each (checked with TF 2.21).
    with pytest.raises(DataError, match=message):
        tf_example.parse_fixed(encode_example(features), {"snippets": tf_example.BYTES})
    with pytest.raises(DataError, match="not a serialized tf.train.Example"):
        tf_example.parse_fixed(b"\x0a\x09broken", {"snippets": tf_example.BYTES})
    # Features not asked for are ignored, as TensorFlow ignores them.
    extra = encode_example({"snippets": ("bytes", [b"a"]), "x": ("float", [1.0])})
    assert tf_example.parse_fixed(extra, {"snippets": tf_example.BYTES}) == {"snippets": b"a"}


# ---------------------------------------------------------------------------------------------
# Shakespeare and StackOverflow: users and texts against breaching's readers


@pytest.mark.parametrize("index", [False, True])
@pytest.mark.parametrize("dataset, reader, splits", [
    ("shakespeare", "load_shakespeare_tff", {"training": "train", "validation": "validation", "test": "test"}),
    ("stackoverflow", "load_stackoverflow_tff", {"training": "train", "validation": "validation", "test": "test"}),
])
def test_tff_users_and_texts_are_breachings(dataset, reader, splits, index, tmp_path, monkeypatch):
    (write_shakespeare if dataset == "shakespeare" else write_stackoverflow)(tmp_path, index=index)
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tensorflow())
    read = getattr(text_reference(), reader)
    for ours, theirs in splits.items():
        texts_of = tff.user_texts(OmegaConf.create({"path": str(tmp_path)}), tff.DATASETS[dataset], ours)()
        users = 0
        while True:
            try:
                expected = read(cache_dir=str(tmp_path), user_idx=users, split=theirs)
            except ValueError as err:
                assert "larger than number of clients" in str(err)
                with pytest.raises(DataError, match=f"{dataset} user {users} does not exist"):
                    texts_of(users)
                break
            assert texts_of(users) == expected and expected
            users += 1
        assert users >= 2
    # With indexes sqlite returns the clients sorted, without them in the order written: both as breaching's query.
    clients = tff.client_ids(os.path.join(tmp_path, f"{dataset}.sqlite"), "train")
    assert (clients == sorted(clients)) == index


def breaching_blocks(cfg_data, texts):
    """breaching's _build_and_split_dataset_text for one user past its reader (fewer than 1,000 texts: one map batch)."""
    ref = text_reference()
    tokenizer = ref._get_tokenizer(cfg_data.tokenizer, cfg_data.vocab_size, cache_dir=cfg_data.path)
    tokenize, group_texts, _ = ref._get_preprocessing(tokenizer, cfg_data)
    return group_texts(dict(tokenize({"text": texts})))["input_ids"][: cfg_data.size]


@pytest.mark.parametrize("dataset, reader", [("shakespeare", "load_shakespeare_tff"),
                                             ("stackoverflow", "load_stackoverflow_tff")])
def test_tff_users_blocks_are_breachings(dataset, reader, tff_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tensorflow())
    cfg = tff_cfg(tff_folder, dataset).data
    assert cfg.name == dataset and cfg.partition == "given"
    examples = load_examples(cfg)
    assert examples.num_classes == tff_folder["vocab"] and examples.given is not None
    split = {"training": "train"}.get(cfg.examples_from_split, cfg.examples_from_split)
    for user in range(2):
        texts = getattr(text_reference(), reader)(cache_dir=cfg.path, user_idx=user, split=split)
        held = examples.given(user)
        assert held.stored.tolist() == breaching_blocks(cfg, texts) and held.stored.shape[1] == BLOCK
        np.testing.assert_array_equal(held.labels, held.stored)  # causal-lm labels are the ids


def test_a_shakespeare_case_runs_on_its_file(tff_folder, tmp_path, capsys):
    code = cli.main(["run", breaching_case("10_causal_lang_training"), "data=shakespeare",
                     f"data.path={tff_folder['path']}", f"data.vocab_size={tff_folder['vocab']}",
                     f"data.shape=[{BLOCK}]", "model=linear", "user.user_idx=3", "user.num_data_points=2",
                     "--out", str(tmp_path / "u"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "data        shakespeare, " in captured.out


def test_stackoverflow_users_of_a_bundled_case(tff_folder):
    # A case outside breaching's tree finds the bundled data config (fedjax_users/configs/data/stackoverflow.yaml).
    cfg = load_case(catalog.resolve("text_random_tokens"), ["data=stackoverflow", f"data.path={tff_folder['path']}",
                                          f"data.vocab_size={tff_folder['vocab']}", "data.tokenizer=GPT-2",
                                          f"data.shape=[{BLOCK}]", "user.user_idx=1", "model=linear"])
    assert cfg.data.examples_from_split == "test"
    users = cases.construct_users(cfg)
    expected = load_examples(cfg.data).given(1).stored[:2]
    np.testing.assert_array_equal(users.data.inputs, expected)


# ---------------------------------------------------------------------------------------------
# Their errors: one line each


def test_a_missing_tff_file_is_one_cli_line(tmp_path, capsys):
    code = cli.main(["run", breaching_case("10_causal_lang_training"), "data=shakespeare", "data.path=/nowhere",
                     "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("fedjax-users: error: ")
    assert "/nowhere/shakespeare.sqlite" in err and "models--gpt2" in err and "Traceback" not in err


def test_an_lzma_archive_gets_the_command_that_decompresses_it(tmp_path):
    (tmp_path / "stackoverflow.sqlite.lzma").write_bytes(b"")
    with pytest.raises(DataError, match=r"decompress .*stackoverflow.sqlite.lzma there: xz -dk "):
        tff.find_database(str(tmp_path), tff.DATASETS["stackoverflow"])
    assert not (tmp_path / "stackoverflow.sqlite").exists()


def test_malformed_tff_files_are_one_line(tmp_path):
    file = tmp_path / "shakespeare.sqlite"
    file.write_bytes(b"not a database at all, just some bytes" * 30)
    with pytest.raises(DataError, match="not a readable sqlite database"):
        tff.find_database(str(tmp_path), tff.DATASETS["shakespeare"])
    file.unlink()
    write_tff_sqlite(str(file), {"train": ["A"]}, shakespeare_example)
    with sqlite_connection(file) as connection:
        connection.execute("DROP TABLE client_metadata;")
    with pytest.raises(DataError, match="lacks client_metadata"):
        tff.find_database(str(tmp_path), tff.DATASETS["shakespeare"])


def sqlite_connection(file):
    import contextlib
    import sqlite3

    @contextlib.contextmanager
    def connect():
        connection = sqlite3.connect(file)
        try:
            yield connection
            connection.commit()
        finally:
            connection.close()

    return connect()


def test_bad_examples_name_their_client(tmp_path):
    def make(client, split, k):
        if client == "BAD_PROTO":
            return b"\x0a\x09broken"
        return encode_example({"snippets": ("bytes", ["café".encode() if client == "ACCENT" else b"plain"])})

    file = write_tff_sqlite(str(tmp_path / "shakespeare.sqlite"), {"train": ["OK'S", "BAD_PROTO", "ACCENT"]}, make)
    dataset = tff.DATASETS["shakespeare"]
    # An id with a quote is read (breaching pastes ids into its SQL, which then fails).
    assert tff.client_texts(file, dataset, "train", "OK'S") == ["plain", "plain"]
    with pytest.raises(DataError, match=r"client 'BAD_PROTO' \(train\), example 0 .*not a serialized"):
        tff.client_texts(file, dataset, "train", "BAD_PROTO")
    with pytest.raises(DataError, match=r"client 'ACCENT' .*is not ASCII"):
        tff.client_texts(file, dataset, "train", "ACCENT")


# ---------------------------------------------------------------------------------------------
# CoLA


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cola")
    return dict(path=str(path), vocab=write_bert_tokenizer(path, COLA_SENTENCES * 3))


def cola_cfg(folder, *extra):
    return load_case(breaching_case("9_bert_training"), [
        "data=cola", "data.task=classification", f"data.path={folder['path']}", f"data.vocab_size={folder['vocab']}",
        *extra,
    ])


ROWS = [(sentence, i % 2) for i, sentence in enumerate(COLA_SENTENCES)]


@pytest.mark.parametrize("length", [25, 6])
def test_cola_users_are_breachings_rows(bert_folder, length):
    cfg = cola_cfg(bert_folder, f"data.shape=[{length}]").data
    sentences, labels = [r[0] for r in ROWS], np.array([r[1] for r in ROWS])
    examples = glue.cola(cfg, "training", rows=(sentences, labels))
    ref = text_reference()
    tokenizer = ref._get_tokenizer(cfg.tokenizer, cfg.vocab_size, cache_dir=cfg.path)
    tokenize, group_texts, _ = ref._get_preprocessing(tokenizer, cfg)
    assert group_texts is None
    for user, (sentence, label) in enumerate(ROWS):
        # breaching: load_dataset(...)[split][user], a one-row Dataset, tokenized for classification.
        expected = tokenize({"sentence": [sentence]})["input_ids"]
        held = examples.given(user)
        assert held.stored.tolist() == expected and held.labels.tolist() == [label]
        assert held.stored.shape == (1, length)
    with pytest.raises(DataError, match=f"cola user {len(ROWS)} does not exist"):
        examples.given(len(ROWS))


def test_cola_cache_layouts_are_read_in_order(tmp_path):
    pytest.importorskip("pyarrow")
    splits = {"train": ROWS, "validation": ROWS[:2], "test": [(s, -1) for s, _ in ROWS[:3]]}
    old = write_cola_cache(tmp_path / "old", splits)
    write_cola_cache(tmp_path / "new", splits, folder="nyu-mll___glue", version="0.0.0", digest="bcdcba79d07bc86", shards=2)
    for root in (tmp_path / "old", tmp_path / "new", old):
        for split, rows in (("training", ROWS), ("validation", ROWS[:2]), ("test", splits["test"])):
            sentences, labels = glue.read_rows(glue.find_split_files(str(root), split))
            assert sentences == [r[0] for r in rows] and labels.tolist() == [r[1] for r in rows]
    assert [os.path.basename(f) for f in glue.find_split_files(str(tmp_path / "new"), "training")] == [
        "glue-train-00000-of-00002.arrow", "glue-train-00001-of-00002.arrow"]
    write_cola_cache(tmp_path / "old", splits, digest="another")
    with pytest.raises(DataError, match="several cached copies"):
        glue.find_split_files(str(tmp_path / "old"), "training")


@pytest.fixture
def tiny_bert_hub(tmp_path, monkeypatch):
    """A hub cache with a tiny ``bert-base-uncased`` (config and weights), read by transformers and fedjax_users."""
    import huggingface_hub.constants
    from parity.reference import write_tiny_hf_snapshot

    hub = str(tmp_path / "hub")
    write_tiny_hf_snapshot(hub, "bert-base-uncased")
    monkeypatch.setenv("HF_HUB_CACHE", hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub)  # read once, at import
    return hub


def test_cola_user_is_breachings_sequence_classifier_on_its_sentence(bert_folder, tiny_bert_hub):
    """A CoLA user's gradient against breaching's BertForSequenceClassification called with breaching's batch."""
    import torch

    import fedjax_users as fu
    from fedjax_users import interop
    from fedjax_users.models import bert
    from parity.reference import hf_text_model

    pytest.importorskip("pyarrow")
    write_cola_cache(bert_folder["path"], {"train": ROWS})
    cfg = cola_cfg(bert_folder, "data.shape=[12]", "user.user_idx=3", "server.pretrained=False")
    case = cases.construct_users(cfg)
    assert type(case.model) is bert.BertForSequenceClassification and case.data.labels.tolist() == [ROWS[3][1]]
    shared, _, _ = fu.compute(case.model, case.payload, case.data, case.user_cfg, jax.random.key(1), loss=case.loss)
    # breaching: its dataset's row 3 through its classification tokenize and default_data_collator, then
    # model(**data) on the server's parameters and CrossEntropyLoss against data["labels"].
    tokenizer = text_reference()._get_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cache_dir=cfg.data.path)
    tokenize, _, _ = text_reference()._get_preprocessing(tokenizer, cfg.data)
    data = {key: torch.tensor(value) for key, value in tokenize({"sentence": [ROWS[3][0]]}).items()}
    data["labels"] = torch.tensor([ROWS[3][1]])
    assert set(data) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert (data["attention_mask"] == 0).any()  # the sentence is padded: the mask matters
    torch_model = hf_text_model(cfg.model, cfg.data.vocab_size, "classification")
    with torch.no_grad():
        for parameter, value in zip(torch_model.parameters(), interop.params_to_torch_list(case.payload.params,
                                                                                            torch_model)):
            parameter.copy_(value)
    # The server sends buffers (BERT's position and token type ids), so breaching's user runs in eval mode.
    assert case.payload.batch_stats is not None
    torch_model.eval()
    torch.nn.CrossEntropyLoss()(torch_model(**data), data["labels"]).backward()
    expected = interop.grads_from_torch_list([p.grad for p in torch_model.parameters()], torch_model,
                                             {"params": case.payload.params})
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(expected))
    jax.tree_util.tree_map_with_path(lambda path, got, want: np.testing.assert_allclose(
        got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)), shared.gradients, expected)


def test_cola_runs_from_the_cli(bert_folder, tiny_bert_hub, tmp_path, capsys):
    from fedjax_users import io

    pytest.importorskip("pyarrow")
    write_cola_cache(bert_folder["path"], {"train": ROWS})
    common = ["run", breaching_case("9_bert_training"), "data=cola", "data.task=classification",
              f"data.path={bert_folder['path']}", f"data.vocab_size={bert_folder['vocab']}", "data.shape=[12]",
              "user.user_idx=2"]
    # server.pretrained (breaching's default): the cached bert weights; the classifier is fresh, as from_pretrained.
    code = cli.main(common + ["--out", str(tmp_path / "cola.msgpack"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    shared, config = io.load_shared(str(tmp_path / "cola.msgpack"))
    assert config["data"]["name"] == "cola" and config["model"] == "bert-base-uncased"
    classifier = np.asarray(shared.gradients["classifier"]["kernel"])
    words = np.asarray(shared.gradients["bert"]["embeddings"]["word_embeddings"]["embedding"])
    assert classifier.shape == (32, 2) and words.shape == (bert_folder["vocab"], 32)
    for leaf in jax.tree_util.tree_leaves(shared.gradients):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.any(classifier != 0) and np.any(words != 0)
    # The torch update file lists the gradients under breaching's names, in its parameters() order.
    from safetensors import safe_open

    from parity.reference import hf_text_model

    with safe_open(str(tmp_path / "cola.safetensors"), "np") as handle:
        names = json.loads(handle.metadata()["gradients"])
        np.testing.assert_array_equal(handle.get_tensor("classifier.weight"), classifier.T)
    torch_model = hf_text_model("bert-base-uncased", bert_folder["vocab"], "classification")
    assert names == [name.removeprefix("model.") for name, _ in torch_model.named_parameters()]
    # breaching's own text models predict a token a position: refused for one label a sentence, in one line.
    capsys.readouterr()
    code = cli.main(common + ["model=transformer3", "--out", str(tmp_path / "t.msgpack"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a language model" in err, err


def test_cola_errors_are_one_line(bert_folder, tmp_path, monkeypatch, capsys):
    code = cli.main(["run", breaching_case("9_bert_training"), "data=cola", "data.task=classification",
                     "data.path=/nowhere", "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("fedjax-users: error: ")
    assert "glue-train.arrow in /nowhere" in err and "/nowhere/nyu-mll___glue/cola" in err
    assert "models--bert-base-uncased" in err
    # breaching's case tasks (masked-lm here) tokenize a "text" column cola does not have: refused up front.
    with pytest.raises(DataError, match="cola is a classification dataset"):
        load_examples(load_case(breaching_case("9_bert_training"), ["data=cola"]).data)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "glue-train.arrow").write_bytes(b"")
    with pytest.raises(DataError, match=r"pip install pyarrow"):
        load_examples(cola_cfg(dict(bert_folder, path=str(tmp_path))).data)


# ---------------------------------------------------------------------------------------------
# Birdsnap


def breaching_birdsnap(root, monkeypatch):
    from parity.reference import datasets_vision_module

    birdsnap = datasets_vision_module().Birdsnap
    # Its only check fedjax_users does not make: the md5 of the metadata archive birdsnap.tgz.
    monkeypatch.setattr(birdsnap, "_check_integrity_of_metadata", lambda self: True)
    return birdsnap(root=str(root), split="validation", download=False)


def test_birdsnap_listing_is_breachings(tmp_path, monkeypatch, capsys):
    write_birdsnap(tmp_path, species=4, per_species=2, not_jpeg=(1, 6))
    theirs = breaching_birdsnap(tmp_path, monkeypatch)
    ours = images.list_birdsnap(str(tmp_path))
    assert ours.files.tolist() == theirs.paths and ours.labels.tolist() == theirs.labels
    assert ours.num_classes == len(theirs.classes) == 4 and len(ours.files) == 6
    assert sorted(set(ours.labels.tolist())) == [1, 2, 3, 4]  # species ids as written, as breaching keeps them
    for index in (0, 5):
        image, label = theirs[index]  # breaching's transform comes later; here the RGB image itself
        decoded = images.decode_image(ours.files[index], ())
        np.testing.assert_array_equal(decoded, np.asarray(image, np.float32) / np.float32(255))
        assert label == ours.labels[index]


def test_birdsnap_case_users_are_species(tmp_path, capsys):
    write_birdsnap(tmp_path, species=3, per_species=2, missing=(2,))
    overrides = ["data=Birdsnap", f"data.path={tmp_path}", "data.shape=[3,8,8]", "data.augmentations_val.Resize=8",
                 "data.augmentations_val.CenterCrop=8", "data.classes=3", "model=linear"]
    cfg = load_case(breaching_case("1_single_image_small"), overrides + ["user.user_idx=1", "user.num_data_points=2"])
    users = cases.construct_users(cfg)
    assert users.data.inputs.shape == (2, 8, 8, 3) and users.data.labels.tolist() == [1, 1]
    # A listed image that is not there is dropped: species 2 keeps one image.
    with pytest.raises(DataError, match="user 2 has 1 examples"):
        cases.construct_users(load_case(breaching_case("1_single_image_small"),
                                        overrides + ["user.user_idx=2", "user.num_data_points=2"]))
    # Birdsnap numbers its species from 1: user 0 holds nothing, as in breaching.
    with pytest.raises(DataError, match="labelled 0, and the labels run 1..3"):
        cases.construct_users(load_case(breaching_case("1_single_image_small"), overrides + ["user.user_idx=0"]))
    code = cli.main(["run", breaching_case("1_single_image_small"), *overrides, "user.user_idx=1",
                     "--out", str(tmp_path / "u"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def test_birdsnap_label_past_the_classes_is_refused(tmp_path):
    # Species 3 of 3 is label 3, past a 3-class model's 0..2 (breaching's real data: species 500 of 500 classes).
    write_birdsnap(tmp_path, species=3, per_species=1)
    cfg = load_case(breaching_case("1_single_image_small"), [
        "data=Birdsnap", f"data.path={tmp_path}", "data.shape=[3,8,8]", "data.augmentations_val.Resize=8",
        "data.augmentations_val.CenterCrop=8", "data.classes=3", "model=linear", "user.user_idx=3"])
    cfg.data.default_clients = 4
    with pytest.raises(DataError, match="label 3, outside the 3 classes 0..2"):
        cases.construct_users(cfg)


def test_a_missing_birdsnap_folder_is_one_cli_line(tmp_path, capsys):
    code = cli.main(["run", breaching_case("1_single_image_small"), "data=Birdsnap", "data.path=/nowhere",
                     "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "/nowhere/birdsnap/species.txt" in err
    write_birdsnap(tmp_path, species=2, per_species=1, missing=(0, 1))
    with pytest.raises(DataError, match="none of the 2 images"):
        images.list_birdsnap(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The bundled data configs


@pytest.mark.parametrize("name", ["shakespeare", "stackoverflow", "cola", "Birdsnap"])
def test_bundled_data_configs_are_breachings(name):
    from parity.reference import config_dir

    from fedjax_users.data.keys import NOT_APPLICABLE

    ours = OmegaConf.to_container(OmegaConf.load(os.path.join(cases.CONFIG_ROOT, "data", f"{name}.yaml")))
    theirs = OmegaConf.to_container(OmegaConf.load(os.path.join(config_dir(), "case", "data", f"{name}.yaml")))
    theirs.pop("defaults")
    # Every key that changes a result is breaching's value; only torch's machinery is left out.
    assert {k: v for k, v in theirs.items() if k not in NOT_APPLICABLE["data"]} == ours
