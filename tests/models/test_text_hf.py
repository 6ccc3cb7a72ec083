"""breaching's Hugging Face text names that cannot be built: one clear error, saying what was looked for and where.

What is built (BERT, GPT-2) is checked against breaching's own models in test_hf_models.py.
"""

from __future__ import annotations

import json

import pytest

from fedjax_users import cli, models
from fedjax_users.models import huggingface


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A Hugging Face home with nothing in it (and no user cache read)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "hf" / "hub"


def _cache_config(hub, repo_id: str, model_type: str = "gpt2") -> str:
    """A tiny config.json in the hub cache layout, as a download would leave it."""
    snapshot = hub / f"models--{repo_id}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    path = snapshot / "config.json"
    path.write_text(json.dumps({"model_type": model_type, "vocab_size": 64, "n_embd": 16, "n_layer": 1, "n_head": 2}))
    return str(path)


@pytest.mark.parametrize("name", ["distilgpt2", "roberta-base", "t5-small"])
def test_uncached_names_say_what_is_missing_and_where_it_was_looked_for(name, empty_cache):
    with pytest.raises(huggingface.UnavailableModelError) as raised:
        models.get(name, num_classes=50, modality="text")
    message = str(raised.value)
    assert "\n" not in message
    assert repr(name) in message and "config.json" in message
    assert str(empty_cache) in message


@pytest.mark.parametrize("name", huggingface.NAMES)
def test_breachings_names_uncached_and_untrained_take_the_default_architectures(name, empty_cache):
    built = models.get(name, num_classes=50, modality="text", task="causal-lm")
    assert built.config.vocab_size == 50
    assert type(built).__name__ == ("GPT2LMHeadModel" if "gpt2" in name else "BertForPreTraining")


def test_a_cached_config_of_an_unported_model_type_is_named(empty_cache):
    path = _cache_config(empty_cache, "bert-base-uncased", model_type="roberta")
    assert huggingface.find_cached_config("bert-base-uncased") == path
    # bert-sanity-check is breaching's alias of bert-base-uncased.
    with pytest.raises(huggingface.UnavailableModelError, match=f"config {path} has model_type 'roberta'"):
        models.get("bert-sanity-check", num_classes=50, modality="text")


def test_hub_cache_variable_comes_first(tmp_path, empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    first = _cache_config(tmp_path / "hub-cache", "gpt2")
    _cache_config(empty_cache, "gpt2")
    assert huggingface.find_cached_config("gpt2") == first


def test_text_names_are_exact_as_in_breaching(empty_cache):
    """breaching compares text names exactly: ``lstm`` is not its ``LSTM`` but a Hugging Face name."""
    assert isinstance(models.get("LSTM", num_classes=50, modality="text"), models.text.LSTMModel)
    with pytest.raises(huggingface.UnavailableModelError, match="'LSTM'"):
        models.get("lstm", num_classes=50, modality="text")


def test_cli_exits_2_with_one_line_for_an_uncached_hugging_face_model(empty_cache, tmp_path, capsys):
    out = tmp_path / "x.msgpack"
    code = cli.main(["run", "configs/case/text_random_tokens.yaml", "model=distilgpt2", "--out", str(out),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedjax-users: error:") and "'distilgpt2'" in err
    assert "Traceback" not in err and not out.exists()
