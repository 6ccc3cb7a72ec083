"""The Flax BERT / GPT-2 ports against breaching's own Hugging Face models, from a tiny generated hub cache.

breaching builds these through ``transformers`` (``_construct_text_model``, loaded by
parity/reference.py); ``transformers`` reads the same cache, offline.
"""

from __future__ import annotations

import dataclasses

import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fedjax_users import interop, losses, models
from fedjax_users.models import bert, gpt2, huggingface
from parity import reference

VOCAB, B, T = reference.TINY_HF_CONFIGS["gpt2"]["vocab_size"], 3, 8
WEIGHT_STD = 0.3
REVISION = reference.TINY_HF_REVISION
# (breaching name, data task, the torch class breaching's auto class gives)
CASES = [
    ("bert-base-uncased", "masked-lm", "BertForMaskedLM"),
    ("bert-sanity-check", "masked-lm", "BertForMaskedLM"),
    ("bert-base-uncased", "causal-lm", "BertForPreTraining"),
    ("gpt2", "causal-lm", "GPT2LMHeadModel"),
    ("gpt2S", "causal-lm", "GPT2LMHeadModel"),
]
# breaching's AutoModelForSequenceClassification (data.task=classification, e.g. CoLA).
CLASSIFIERS = [
    ("bert-base-uncased", "classification", "BertForSequenceClassification"),
    ("bert-sanity-check", "classification", "BertForSequenceClassification"),
]
_torch_hf_model = reference.tiny_hf_model


def save_to_cache(hub, repo_id: str, weights: bool = True, safe: bool = True) -> str:
    """The tiny model's snapshot in the hub cache ``hub`` (see parity.reference.write_tiny_hf_snapshot)."""
    return reference.write_tiny_hf_snapshot(str(hub), repo_id, weights, safe)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face hub cache in ``tmp_path`` holding tiny ``bert-base-uncased`` and ``gpt2``."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for repo_id in ("bert-base-uncased", "gpt2"):
        save_to_cache(hub, repo_id)
    return hub


def _tokens(seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(B, T))
    tokens[0, :2] = 0  # BERT's padding token: torch passes its lookups no gradient
    return tokens


def _sentences(seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """Ids as BERT's tokenizer pads sentences to ``T``: no padding id ([PAD] = 0) inside, then padding."""
    tokens = np.random.default_rng(seed).integers(1, vocab, size=(B, T))
    for row, length in enumerate((T, 5, 2)):
        tokens[row, length:] = 0
    return tokens


SENTENCE_LABELS = np.array([1, 0, 1])


def _torch_logits(torch_model, task: str, tokens: np.ndarray) -> torch.Tensor:
    """breaching's ``model(**data)``; for classification (CoLA), ``data`` is the tokenizer's whole output and labels."""
    ids = torch.tensor(tokens, dtype=torch.long)
    if task != "classification":
        return torch_model(input_ids=ids)
    return torch_model(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=(ids != 0).long(),
                       labels=torch.tensor(SENTENCE_LABELS))


def _labels(task: str, tokens: np.ndarray) -> np.ndarray:
    if task != "masked-lm":
        return tokens
    keep = np.random.default_rng(1).random(tokens.shape) < 0.4
    keep[:, 0] = True
    return np.where(keep, tokens, -100)


def _torch_loss(task: str, vocab: int):
    module = reference.losses_module()
    return module.MLMLoss(vocab_size=vocab) if task == "masked-lm" else module.CausalLoss()


def _flax_loss(task: str):
    return losses.masked_lm_loss if task == "masked-lm" else losses.causal_lm_loss


def _close(actual, expected, rtol: float, what: str) -> None:
    expected = np.asarray(expected)
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def _converted(torch_model, model, tokens):
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(tokens))
    return interop.variables_from_torch(torch_model, template)


def _spread(torch_model: torch.nn.Module, std: float = WEIGHT_STD) -> torch.nn.Module:
    """Every parameter redrawn from ``N(0, std)`` (seeded).

    HF's ``N(0, 0.02)`` keeps a tiny model's pre-activations so small that the GELU variants (and
    much else) agree to float32 rounding; wider weights make the comparison see them.
    """
    with torch.no_grad():
        for parameter in torch_model.parameters():
            parameter.normal_(0.0, std)
    return torch_model


def _compare(name: str, task: str, train: bool, vocab: int = VOCAB):
    """Logits, loss and every parameter's gradient of breaching's torch model and the Flax port."""
    torch.manual_seed(0)
    torch_model = _spread(reference.hf_text_model(name, vocab, task))
    model = models.get(name, num_classes=vocab, modality="text", task=task)
    tokens = _tokens(vocab=vocab)
    labels = _labels(task, tokens)
    variables = _converted(torch_model, model, tokens)

    torch_model.train(train)
    torch_model.zero_grad()
    ref_logits = torch_model(input_ids=torch.tensor(tokens))
    ref_loss = _torch_loss(task, vocab)(ref_logits, torch.tensor(labels))
    ref_loss.backward()
    ref_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in torch_model.parameters()]

    buffers = {k: v for k, v in variables.items() if k != "params"}

    def objective(params):
        logits = model.apply({"params": params, **buffers}, jnp.asarray(tokens), train=train)
        return losses.mean_loss(_flax_loss(task)(logits, jnp.asarray(labels))), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(variables["params"])
    assert logits.shape == (B, T, vocab)
    _close(logits, ref_logits.detach().numpy(), 1e-5, "logits")
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    expected = interop.grads_from_torch_list(ref_grads, torch_model, variables)
    # Relative to the largest gradient entry, as the parity suite judges: some gradients are zero
    # in exact arithmetic (the attention key bias: softmax ignores a constant score shift), so
    # both frameworks return rounding noise there.
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(expected))
    jax.tree_util.tree_map_with_path(
        lambda path, got, want: np.testing.assert_allclose(
            got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)), grads, expected
    )
    return torch_model, model, variables


@pytest.mark.parametrize("name,task,torch_class", CASES)
def test_eval_logits_loss_and_gradients_match_breachings_model(hub, name, task, torch_class):
    torch_model, model, _ = _compare(name, task, train=False)
    assert type(torch_model.model).__name__ == torch_class
    assert type(model).__name__ == torch_class


@pytest.mark.parametrize("name,task", [("bert-sanity-check", "masked-lm"), ("gpt2S", "causal-lm")])
def test_aliases_without_dropout_match_in_train_mode_too(hub, name, task):
    _compare(name, task, train=True)


@pytest.mark.parametrize("data_vocab", [VOCAB - 30, VOCAB + 20])
def test_vocab_resized_to_the_data_as_breaching_does(hub, data_vocab):
    _, _, variables = _compare("bert-base-uncased", "masked-lm", train=False, vocab=data_vocab)
    assert variables["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"].shape == (data_vocab, 32)
    assert variables["params"]["cls"]["predictions"]["bias"].shape == (data_vocab,)


@pytest.mark.parametrize("name,task,_", CASES + CLASSIFIERS)
def test_flax_to_torch_round_trip(hub, name, task, _):
    torch_model = reference.hf_text_model(name, VOCAB, task)
    model = models.get(name, num_classes=VOCAB, modality="text", task=task)
    tokens = _sentences() if task == "classification" else _tokens()
    variables = model.init({"params": jax.random.key(1)}, jnp.asarray(tokens))
    interop.variables_to_torch(variables, torch_model)
    torch_model.eval()
    np.testing.assert_allclose(
        _torch_logits(torch_model, task, tokens).detach().numpy(), model.apply(variables, jnp.asarray(tokens)),
        rtol=1e-5, atol=1e-5,
    )
    back = interop.variables_from_torch(torch_model, variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_tied_weights_are_held_once_as_in_torch(hub):
    for name, task, _ in CASES + CLASSIFIERS:
        torch_model = reference.hf_text_model(name, VOCAB, task)
        model = models.get(name, num_classes=VOCAB, modality="text", task=task)
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(_tokens()))["params"]
        assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) == sum(
            p.numel() for p in torch_model.parameters()
        )


def test_config_is_read_from_the_cache_with_aliases_and_resize(hub):
    read = huggingface.resolve("bert-sanity-check", vocab_size=77, task="masked-lm")
    assert read.config_path == f"{hub}/models--bert-base-uncased/snapshots/{REVISION}/config.json"
    expected = transformers.AutoConfig.from_pretrained(
        "bert-base-uncased", hidden_act="relu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    for field in dataclasses.fields(bert.BertArchitecture):
        want = 77 if field.name == "vocab_size" else getattr(expected, field.name)
        assert getattr(read.architecture, field.name) == want, field.name
    gpt = huggingface.resolve("gpt2S", vocab_size=VOCAB).architecture
    assert (gpt.activation_function, gpt.resid_pdrop, gpt.embd_pdrop, gpt.attn_pdrop) == ("relu", 0.0, 0.0, 0.0)
    assert (gpt.n_embd, gpt.n_layer, gpt.n_positions) == (32, 2, 16)


@pytest.mark.parametrize("ours,theirs", [(bert.BertArchitecture, transformers.BertConfig),
                                          (gpt2.GPT2Architecture, transformers.GPT2Config)])
def test_fallback_architectures_are_transformers_defaults(ours, theirs):
    defaults = theirs()
    for field in dataclasses.fields(ours):
        assert getattr(ours(), field.name) == getattr(defaults, field.name), field.name


def test_uncached_names_fall_back_to_the_default_architectures(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HOME", raising=False)
    read = huggingface.resolve("bert-base-uncased", vocab_size=30522, task="masked-lm")
    assert read.config_path is None and read.architecture == bert.BertArchitecture()
    assert huggingface.resolve("gpt2S", vocab_size=50257).architecture == dataclasses.replace(
        gpt2.GPT2Architecture(), activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    with pytest.raises(huggingface.UnavailableModelError, match="no config.json"):
        huggingface.resolve("bert-base-uncased", vocab_size=10, pretrained=True)


@pytest.mark.parametrize("safe", [True, False])
def test_pretrained_weights_are_read_from_the_snapshot(hub, safe):
    if not safe:  # the torch pickle instead of safetensors
        save_to_cache(hub, "bert-base-uncased", safe=False)
        (hub / "models--bert-base-uncased" / "snapshots" / REVISION / "model.safetensors").unlink()
    torch_model = reference.hf_text_model("bert-base-uncased", VOCAB, "masked-lm", pretrained=True).eval()
    model = models.get("bert-base-uncased", num_classes=VOCAB, modality="text", task="masked-lm")
    tokens = _tokens()
    fresh = model.init(jax.random.key(3), jnp.asarray(tokens))
    loaded = huggingface.pretrained_variables("bert-base-uncased", fresh)
    _close(model.apply(loaded, jnp.asarray(tokens)), torch_model(input_ids=torch.tensor(tokens)).detach().numpy(),
           1e-5, "logits")
    # Every parameter comes from the file (the pre-training file has them all, and more).
    expected = interop.variables_from_torch(torch_model, fresh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["params"], expected["params"])


@pytest.mark.parametrize("data_vocab", [VOCAB - 30, VOCAB + 20])
def test_pretrained_weights_are_resized_as_hugging_face_resizes(hub, data_vocab):
    torch_model = reference.hf_text_model("gpt2", data_vocab, "causal-lm", pretrained=True).eval()
    model = models.get("gpt2", num_classes=data_vocab, modality="text", task="causal-lm")
    tokens = _tokens(vocab=min(VOCAB, data_vocab))
    loaded = huggingface.pretrained_variables("gpt2", model.init(jax.random.key(3), jnp.asarray(tokens)))
    expected = interop.variables_from_torch(torch_model, loaded)
    # HF's new rows are drawn around the old rows' mean with 1e-9 times their covariance.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), loaded, expected)
    _close(model.apply(loaded, jnp.asarray(tokens)), torch_model(input_ids=torch.tensor(tokens)).detach().numpy(),
           1e-4, "logits")


def test_missing_weights_are_one_line_naming_the_snapshot(hub):
    snapshot = save_to_cache(hub, "gpt2", weights=False)
    (hub / "models--gpt2" / "snapshots" / REVISION / "model.safetensors").unlink()
    model = models.get("gpt2S", num_classes=VOCAB, modality="text")
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
    with pytest.raises(huggingface.UnavailableModelError) as raised:
        huggingface.pretrained_variables("gpt2S", template)
    assert "\n" not in str(raised.value) and snapshot in str(raised.value)


def test_tasks_without_a_port_are_one_clear_line(hub):
    with pytest.raises(huggingface.UnavailableModelError, match="no masked-LM head"):
        models.get("gpt2", num_classes=VOCAB, modality="text", task="masked-lm")
    with pytest.raises(huggingface.UnavailableModelError, match=r"'gpt2' for data.task='classification' .*not ported"):
        models.get("gpt2S", num_classes=VOCAB, modality="text", task="classification")


def test_dropout_draws_from_the_dropout_stream_in_train_mode_only(hub):
    model = models.get("bert-base-uncased", num_classes=VOCAB, modality="text", task="masked-lm")
    tokens = jnp.asarray(_tokens())
    variables = model.init(jax.random.key(0), tokens)
    evaluated = model.apply(variables, tokens, train=False)
    first = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    again = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    other = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, evaluated) and not np.allclose(first, other)
    sanity = models.get("bert-sanity-check", num_classes=VOCAB, modality="text", task="masked-lm")
    np.testing.assert_array_equal(sanity.apply(variables, tokens, train=True), sanity.apply(variables, tokens))


def _run_bert_training(tmp_path, *overrides: str) -> tuple[int, str]:
    """``fedjax-users run`` of breaching's 9_bert_training case (bert-base-uncased, masked-lm), shrunk."""
    from fedjax_users import cli

    case = f"{reference.config_dir()}/case/9_bert_training.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    code = cli.main(["run", case, "data=random_tokens", f"data.vocab_size={VOCAB}", "data.shape=[8]", "data.size=40",
                     "user.num_data_points=2", *overrides, "--out", str(tmp_path / "bert.msgpack"), "--no-progress"])
    return code, str(tmp_path / "bert.msgpack")


@pytest.mark.slow
def test_cli_runs_breachings_bert_training_case_on_random_tokens(hub, tmp_path, capsys):
    from fedjax_users import io

    code, out = _run_bert_training(tmp_path)
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "pretrained from the Hugging Face hub cache" in printed
    # BERT's buffers are position and token-type ids, not BatchNorm statistics.
    assert "buffers eval mode (server buffers)" in printed and "BatchNorm" not in printed
    shared, config = io.load_shared(out)
    assert config["model"] == "bert-base-uncased" and config["data"]["task"] == "masked-lm"
    word_grad = np.asarray(shared.gradients["bert"]["embeddings"]["word_embeddings"]["embedding"])
    assert word_grad.shape == (VOCAB, 32) and np.all(np.isfinite(word_grad)) and np.any(word_grad != 0)


@pytest.mark.slow
def test_cli_pretrained_reads_the_cached_weights_or_says_where_it_looked(hub, tmp_path, capsys):
    from fedjax_users import io

    # breaching's honest server is pretrained by default: from_pretrained, here the cached snapshot.
    fresh_code, fresh_out = _run_bert_training(tmp_path / "fresh", "server.pretrained=False")
    code, out = _run_bert_training(tmp_path)
    assert (fresh_code, code) == (0, 0), capsys.readouterr().err
    fresh, _ = io.load_shared(fresh_out)
    loaded, _ = io.load_shared(out)
    key = ("bert", "embeddings", "word_embeddings", "embedding")
    assert not np.allclose(_leaf(fresh.gradients, key), _leaf(loaded.gradients, key))
    (hub / "models--bert-base-uncased" / "snapshots" / REVISION / "model.safetensors").unlink()
    capsys.readouterr()
    code, _ = _run_bert_training(tmp_path / "missing")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.safetensors" in err and REVISION in err
    assert "server.pretrained=False" in err


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def test_users_take_ignored_masked_lm_labels_and_refuse_other_out_of_range_ones(hub):
    import fedjax_users as fu
    from fedjax_users.types import ServerPayload, UserData

    model = models.get("bert-sanity-check", num_classes=VOCAB, modality="text", task="masked-lm")
    tokens = jnp.asarray(_tokens())
    variables = model.init(jax.random.key(0), tokens)
    payload = ServerPayload(params=variables["params"], batch_stats=variables["batch_stats"])
    cfg = fu.UserConfig(user_type="local_gradient", num_data_points=B)
    labels = jnp.asarray(_labels("masked-lm", np.asarray(tokens)))
    shared, _, _ = fu.local_gradient(model, payload, UserData(tokens, labels), cfg, jax.random.key(1),
                                     loss=losses.masked_lm_loss)
    expected = jax.grad(lambda p: losses.mean_loss(losses.masked_lm_loss(
        model.apply({**variables, "params": p}, tokens), labels)))(variables["params"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), shared.gradients,
                           expected)
    with pytest.raises(ValueError, match=r"or -100 \(ignored\); data.labels\[0, 0\] is 100"):
        fu.local_gradient(model, payload, UserData(tokens, labels.at[0, 0].set(VOCAB)), cfg, jax.random.key(1),
                          loss=losses.masked_lm_loss)


def test_pretrained_reads_old_names_and_a_base_models_keys(hub):
    """TF-era ``LayerNorm.gamma`` / ``beta`` and a bare ``BertModel`` file (no ``bert.`` prefix), as HF renames them."""
    snapshot = hub / "models--bert-base-uncased" / "snapshots" / REVISION
    (snapshot / "model.safetensors").unlink()
    state = _torch_hf_model("bert-base-uncased").state_dict()
    legacy = {}
    for key, tensor in state.items():
        if key.startswith("bert."):
            key = key[len("bert."):].replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            legacy[key] = tensor
    torch.save(legacy, snapshot / "pytorch_model.bin")
    model = models.get("bert-base-uncased", num_classes=VOCAB, modality="text", task="masked-lm")
    fresh = model.init(jax.random.key(3), jnp.asarray(_tokens()))
    loaded = huggingface.pretrained_variables("bert-base-uncased", fresh)
    layer_norm = loaded["params"]["bert"]["encoder"]["layer"]["1"]["output"]["LayerNorm"]
    np.testing.assert_array_equal(layer_norm["scale"], state["bert.encoder.layer.1.output.LayerNorm.weight"].numpy())
    np.testing.assert_array_equal(layer_norm["bias"], state["bert.encoder.layer.1.output.LayerNorm.bias"].numpy())
    np.testing.assert_array_equal(loaded["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"],
                                  state["bert.embeddings.word_embeddings.weight"].numpy())
    # The file has no masked-LM head: it keeps its fresh initialisation, as from_pretrained leaves it.
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["params"]["cls"], fresh["params"]["cls"])


def test_short_local_steps_of_a_masked_lm_user_are_exact_past_the_unrolled_limit():
    """masked_lm_loss averages over counted tokens, not rows: a scanned, padded short step must still mask its extra row."""
    import fedjax_users as fu
    from fedjax_users.strategy import Strategy
    from fedjax_users.types import ServerPayload, UserData

    arch = bert.BertArchitecture(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16, hidden_act="relu",
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = bert.BertForMaskedLM(arch)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 50, (5, T)))
    labels = jnp.asarray(_labels("masked-lm", np.asarray(tokens)))
    variables = model.init(jax.random.key(0), tokens)
    payload = ServerPayload(params=variables["params"], batch_stats=None)
    # Steps of 3, 2 (short: one padded row) and 3 examples.
    cfg = fu.UserConfig(user_type="local_update", num_data_points=5, num_local_updates=3,
                        num_data_per_local_update_step=3, local_learning_rate=0.1)
    unrolled, scanned = (
        fu.local_update(model, payload, UserData(tokens, labels), cfg, jax.random.key(1),
                        user_state=variables["batch_stats"], loss=losses.masked_lm_loss,
                        strategy=Strategy(max_unrolled_steps=steps))[0].gradients
        for steps in (8, 0)
    )
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), unrolled, scanned)


# ---------------------------------------------------------------------------------------------
# Sequence classification (breaching's AutoModelForSequenceClassification, data.task=classification)


# bert-base-uncased differs from bert-sanity-check by its gelu (dropout is off in eval mode), which
# test_eval_logits_loss_and_gradients_match_breachings_model compares in float32 here; its float64
# check, the slowest of these, runs in make test-full.
@pytest.mark.parametrize("name,train", [pytest.param("bert-base-uncased", False, marks=pytest.mark.slow),
                                        ("bert-sanity-check", False), ("bert-sanity-check", True)])
def test_sequence_classifier_matches_breachings_model_in_float64(hub, name, train):
    """Logits, loss and every parameter's gradient of breaching's torch classifier on CoLA's tokenizer output."""
    torch.manual_seed(0)
    torch_model = _spread(reference.hf_text_model(name, VOCAB, "classification")).double()
    assert type(torch_model.model).__name__ == "BertForSequenceClassification"
    tokens = _sentences()
    torch_model.train(train)
    ref_logits = _torch_logits(torch_model, "classification", tokens)
    ref_loss = torch.nn.CrossEntropyLoss()(ref_logits, torch.tensor(SENTENCE_LABELS))  # breaching's loss_fn
    ref_loss.backward()
    ref_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in torch_model.parameters()]
    with jax.enable_x64(True):
        model = models.get(name, num_classes=VOCAB, modality="text", task="classification", dtype=jnp.float64,
                           param_dtype=jnp.float64)
        assert type(model) is bert.BertForSequenceClassification
        variables = _converted(torch_model, model, tokens)
        buffers = {k: v for k, v in variables.items() if k != "params"}

        def objective(params):
            logits = model.apply({"params": params, **buffers}, jnp.asarray(tokens), train=train)
            return losses.mean_loss(losses.softmax_cross_entropy(logits, jnp.asarray(SENTENCE_LABELS))), logits

        (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(variables["params"])
        expected = interop.grads_from_torch_list(ref_grads, torch_model, variables)
        logits, grads = np.asarray(logits), jax.tree_util.tree_map(np.asarray, grads)
    assert logits.dtype == np.float64 and logits.shape == (B, 2)
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-12)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(expected))
    jax.tree_util.tree_map_with_path(
        lambda path, got, want: np.testing.assert_allclose(
            got, want, rtol=1e-8, atol=1e-12 * scale, err_msg=jax.tree_util.keystr(path)), grads, expected
    )
    # The head and the pooler are trained; the padding is hidden (without breaching's mask the logits differ).
    assert np.all(grads["classifier"]["kernel"] != 0) and np.all(grads["bert"]["pooler"]["dense"]["bias"] != 0)
    with torch.no_grad():
        unmasked = torch_model(input_ids=torch.tensor(tokens)).numpy()
    assert not np.allclose(logits[1:], unmasked[1:], rtol=1e-3)
    np.testing.assert_allclose(logits[0], unmasked[0], rtol=1e-10)  # the row without padding


@pytest.mark.parametrize("labels", [{"num_labels": 3}, {"id2label": {"0": "a", "1": "b", "2": "c", "3": "d"}}])
def test_classifier_classes_are_the_configs_as_auto_config_reads_them(hub, labels):
    import json

    path = hub / "models--bert-base-uncased" / "snapshots" / REVISION / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **labels}))
    want = transformers.AutoConfig.from_pretrained("bert-base-uncased").num_labels
    assert huggingface.resolve("bert-base-uncased", VOCAB, "classification").architecture.num_labels == want
    torch_model = reference.hf_text_model("bert-base-uncased", VOCAB, "classification")
    model = models.get("bert-base-uncased", num_classes=VOCAB, modality="text", task="classification")
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(_sentences()))["params"]
    assert params["classifier"]["kernel"].shape == (32, want) == tuple(torch_model.model.classifier.weight.shape[::-1])


def test_classifier_dropout_is_its_own_or_the_hidden_rate():
    base = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tokens = jnp.asarray(_sentences())
    for classifier_dropout, dropped in ((None, False), (0.5, True)):
        model = bert.BertForSequenceClassification(bert.BertArchitecture(**base, classifier_dropout=classifier_dropout))
        variables = model.init(jax.random.key(0), tokens)
        trained = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
        assert np.allclose(trained, model.apply(variables, tokens)) != dropped
