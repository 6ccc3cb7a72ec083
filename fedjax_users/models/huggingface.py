"""breaching's Hugging Face text models (``gpt2``, ``gpt2S``, ``bert-base-uncased``, ``bert-sanity-check``, ...).

breaching builds every text name it does not know itself through ``transformers``
(``_construct_text_model``): the config ``AutoConfig.from_pretrained(name, **alias_args)``, the
class by the data's task (``masked-lm``: ``AutoModelForMaskedLM``; ``classification``:
``AutoModelForSequenceClassification``; any other: ``AutoModelForPreTraining``), weights from
the hub when pretrained, then ``resize_token_embeddings(data.vocab_size)`` when the vocabulary
sizes differ. Here:

* The config is the ``config.json`` of the local Hugging Face hub cache
  (``<cache>/models--<repo>/snapshots/<rev>/config.json``, the revision ``refs/main`` names),
  read with ``json``; nothing is downloaded. breaching's aliases apply their config changes
  (``ALIAS_ARGS``). With no cached config and no pretrained weights asked for, ``gpt2`` and
  ``bert-base-uncased`` fall back to ``GPT2Config()`` / ``BertConfig()``'s defaults, which are
  those models' architectures; other names are one clear error.
* ``model_type`` ``bert`` builds ``fedjax_users.models.bert`` (``BertForMaskedLM`` for masked-lm,
  ``BertForSequenceClassification`` for classification, ``BertForPreTraining`` otherwise), ``gpt2``
  builds ``fedjax_users.models.gpt2.GPT2LMHeadModel`` (what ``AutoModelForPreTraining`` gives for
  GPT-2; ``AutoModelForMaskedLM`` has none, so breaching fails there and so does this).
  ``GPT2ForSequenceClassification`` is not ported: on breaching's one classification dataset,
  CoLA, it would take the tokenizer's ``token_type_ids`` through its word embeddings and, with no
  ``pad_token_id`` in GPT-2's config, classify the last position, a padding token.
* The classifier's classes are the config's, as ``AutoConfig`` reads them (``num_labels``, else
  the size of ``id2label``, else 2): breaching passes none, so CoLA's two classes are the default's.
* The vocabulary is the data's (``resize_token_embeddings``). Freshly initialised, only the shape
  matters. Pretrained weights (``pretrained_variables``: the snapshot's ``model.safetensors`` or
  ``pytorch_model.bin``) are resized as HF resizes them: rows past the new size dropped, or new
  rows (of the word embeddings and of BERT's decoder bias) set to the mean of the old ones. HF
  draws each new row from a normal around that mean whose covariance is ``1e-9`` times the old
  rows' (``mean_resizing``); that draw, a few parts in ``1e5`` of the rows' spread, is not
  reproduced.

Anything this cannot build is an ``UnavailableModelError``: one line saying what was looked for
and where.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import numpy as np

from fedjax_users.models import bert, gpt2
from fedjax_users.models.dtypes import Dtype, layer_dtypes

# breaching's aliases: the Hugging Face name it loads, and the config changes it makes.
ALIASES: Mapping[str, str] = {"gpt2S": "gpt2", "bert-sanity-check": "bert-base-uncased"}
ALIAS_ARGS: Mapping[str, Mapping[str, Any]] = {
    "gpt2S": {"activation_function": "relu", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "bert-sanity-check": {"hidden_act": "relu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}
NAMES = ("gpt2", "gpt2S", "bert-base-uncased", "bert-sanity-check")
# Repositories whose architecture is the config class's defaults (used when no config is cached).
DEFAULT_MODEL_TYPES: Mapping[str, str] = {"gpt2": "gpt2", "bert-base-uncased": "bert"}
ARCHITECTURES = {"bert": bert.BertArchitecture, "gpt2": gpt2.GPT2Architecture}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# HF checkpoints' base-model prefixes (a bare ``BertModel`` / ``GPT2Model`` file lacks them).
BASE_PREFIXES = {"bert": "bert", "gpt2": "transformer"}
# The leaves with one row per token, which ``resize_token_embeddings`` resizes.
VOCAB_ROWS = (("word_embeddings", "embedding"), ("wte", "embedding"), ("predictions", "bias"))
# Old TF-era names some checkpoints keep; HF renames them on load.
LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}

Architecture = Union[bert.BertArchitecture, gpt2.GPT2Architecture]


class UnavailableModelError(ValueError):
    """A Hugging Face text model fedjax_users cannot build (or read weights for): one clear line."""


def cache_dirs(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The Hugging Face hub caches ``transformers`` would read, in its order of precedence."""
    environ = os.environ if environ is None else environ
    dirs = []
    if environ.get("HF_HUB_CACHE"):
        dirs.append(environ["HF_HUB_CACHE"])
    if environ.get("HF_HOME"):
        dirs.append(os.path.join(environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return list(dict.fromkeys(dirs))


def _has_config(snapshot: str) -> bool:
    return os.path.isfile(os.path.join(snapshot, "config.json"))


def snapshot_in(repo_dir: str, holds: Callable[[str], bool] = _has_config) -> Optional[str]:
    """In one cached repository, the snapshot ``refs/main`` names if ``holds`` it, else the most
    recently written snapshot that ``holds`` (a cache filled by one download has one), else ``None``."""
    snapshots = os.path.join(os.path.expanduser(repo_dir), "snapshots")
    if not os.path.isdir(snapshots):
        return None
    ref = os.path.join(os.path.expanduser(repo_dir), "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as handle:
            named = os.path.join(snapshots, handle.read().strip())
        if holds(named):
            return named
    found = [os.path.join(snapshots, d) for d in os.listdir(snapshots) if holds(os.path.join(snapshots, d))]
    return max(found, key=lambda d: (os.path.getmtime(d), d)) if found else None


def find_snapshot(repo_id: str, environ: Optional[Mapping[str, str]] = None, dirs: Optional[Sequence[str]] = None,
                  holds: Callable[[str], bool] = _has_config) -> Optional[str]:
    """The cached snapshot folder of ``repo_id`` that ``holds`` (by default: its ``config.json``) in the
    first of the hub caches ``dirs`` (default ``cache_dirs(environ)``) with one, or ``None``."""
    folder = "models--" + repo_id.replace("/", "--")
    for cache in cache_dirs(environ) if dirs is None else dirs:
        snapshot = snapshot_in(os.path.join(cache, folder), holds)
        if snapshot is not None:
            return snapshot
    return None


def find_cached_config(repo_id: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The path of ``repo_id``'s cached ``config.json`` (the hub cache layout), or ``None``."""
    snapshot = find_snapshot(repo_id, environ)
    return None if snapshot is None else os.path.join(snapshot, "config.json")


@dataclasses.dataclass(frozen=True)
class HuggingFaceModel:
    """What breaching would build for a Hugging Face name: where its config came from, and the architecture.

    ``config_path`` is ``None`` when the architecture is the config class's defaults;
    ``architecture.vocab_size`` is already the data's (after breaching's resize).
    """

    name: str
    repo_id: str
    model_type: str
    task: Optional[str]
    architecture: Architecture
    config_path: Optional[str]


def _what(name: str) -> str:
    repo_id = ALIASES.get(name, name)
    return f"text model {name!r}" + (f" (Hugging Face {repo_id!r})" if repo_id != name else "")


def unavailable(name: str, known: Sequence[str] = (), environ: Optional[Mapping[str, str]] = None
                ) -> UnavailableModelError:
    """The one-line error for a Hugging Face text model ``name`` with no config here: where it was looked for.

    ``known`` are the text names fedjax_users builds itself.
    """
    where = ", ".join(cache_dirs(environ))
    others = f"; the text models built here are {list(known)}" if known else ""
    return UnavailableModelError(
        f"unknown {_what(name)}: breaching would load it from Hugging Face, and no config.json for it is cached "
        f"(looked in {where}){others}"
    )


def _read_config(path: str) -> dict:
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        raise UnavailableModelError(f"cannot read Hugging Face config {path}: {err}".split("\n")[0]) from None
    if not isinstance(config, dict):
        raise UnavailableModelError(f"Hugging Face config {path} is not a JSON object")
    return config


def resolve(
    name: str, vocab_size: int, task: Optional[str] = None, pretrained: bool = False,
    known: Sequence[str] = (), environ: Optional[Mapping[str, str]] = None,
) -> HuggingFaceModel:
    """The architecture breaching builds for ``name`` on data of ``vocab_size`` tokens and ``task``."""
    repo_id = ALIASES.get(name, name)
    config_path = find_cached_config(repo_id, environ)
    if config_path is not None:
        config = _read_config(config_path)
    elif not pretrained and repo_id in DEFAULT_MODEL_TYPES:
        config = {"model_type": DEFAULT_MODEL_TYPES[repo_id]}
    else:
        raise unavailable(name, known, environ)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnavailableModelError(
            f"{_what(name)}: its config {config_path} has model_type {model_type!r}; the Flax ports are "
            f"{sorted(ARCHITECTURES)}"
        )
    config = {**config, **ALIAS_ARGS.get(name, {}), "vocab_size": vocab_size}
    try:
        architecture = ARCHITECTURES[model_type].from_dict(config).check()
    except (TypeError, ValueError) as err:
        raise UnavailableModelError(f"{_what(name)} ({config_path or 'default config'}): {err}") from None
    model = HuggingFaceModel(name, repo_id, model_type, task, architecture, config_path)
    model_class(model)  # the task's class exists, or one line now
    return model


def model_class(model: HuggingFaceModel) -> type:
    """The Flax class of the ``AutoModelFor...`` breaching picks for the task."""
    if model.task == "classification":
        if model.model_type != "bert":
            raise UnavailableModelError(
                f"{_what(model.name)}: model_type {model.model_type!r} for data.task='classification' "
                "(AutoModelForSequenceClassification) is not ported; BERT's is"
            )
        return bert.BertForSequenceClassification
    if model.task == "masked-lm":
        if model.model_type != "bert":
            raise UnavailableModelError(
                f"{_what(model.name)}: model_type {model.model_type!r} has no masked-LM head "
                "(AutoModelForMaskedLM fails for it in breaching too); use a causal-lm task"
            )
        return bert.BertForMaskedLM
    return bert.BertForPreTraining if model.model_type == "bert" else gpt2.GPT2LMHeadModel


def build(
    name: str, vocab_size: int, task: Optional[str] = None, dtype: Optional[Dtype] = None,
    param_dtype: Optional[Dtype] = None, known: Sequence[str] = (), environ: Optional[Mapping[str, str]] = None,
) -> nn.Module:
    """The Flax model breaching builds for the Hugging Face name ``name`` (freshly initialised by ``init``)."""
    model = resolve(name, vocab_size, task, known=known, environ=environ)
    return model_class(model)(model.architecture, **layer_dtypes(dtype, param_dtype))


# ---------------------------------------------------------------------------------------------
# Pretrained weights from the cached snapshot


def weights_file(name: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """The cached weights of ``name`` (``model.safetensors`` first), or one line naming where it looked."""
    repo_id = ALIASES.get(name, name)
    snapshot = find_snapshot(repo_id, environ)
    if snapshot is not None:
        for file_name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(snapshot, file_name)):
                return os.path.join(snapshot, file_name)
    where = snapshot or ", ".join(cache_dirs(environ))
    raise UnavailableModelError(
        f"server.pretrained=True: no {' or '.join(WEIGHT_FILES)} for {_what(name)} is cached (looked in {where}); "
        "nothing is downloaded: put the files in the Hugging Face cache, or pass server.pretrained=False"
    )


def resize_rows(values: np.ndarray, rows: int) -> np.ndarray:
    """``values`` with ``rows`` leading rows, as ``resize_token_embeddings`` resizes (new rows: the old rows' mean)."""
    if rows <= values.shape[0]:
        return values[:rows]
    mean = values.astype(np.float64).mean(axis=0).astype(values.dtype)
    return np.concatenate([values, np.broadcast_to(mean, (rows - values.shape[0],) + values.shape[1:])])


def _torch_names(state: Mapping[str, Any], model_type: str, params: Mapping) -> dict:
    """The file's parameters under the model's torch names (legacy leaves renamed, base prefix added).

    Entries the model has no parameter for (breaching's model drops them too: a pre-training head,
    tied copies, buffers) are left out.
    """
    from fedjax_users.interop.naming import PARAMS, link

    prefix = BASE_PREFIXES[model_type]
    named = {}
    for key, tensor in state.items():
        head, _, leaf = key.rpartition(".")
        key = f"{head}.{LEGACY_LEAVES.get(leaf, leaf)}" if head else key
        for candidate in (key, f"{prefix}.{key}"):
            try:
                link(candidate, params, PARAMS)
            except ValueError:
                continue
            named[candidate] = tensor
            break
    return named


def pretrained_variables(
    name: str, template: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None
) -> dict:
    """``template`` (the built model's variables) with the cached pretrained weights of ``name``.

    As ``from_pretrained`` then ``resize_token_embeddings``: parameters the file lacks keep their
    fresh initialisation, tied weights come from the word embeddings, the vocabulary rows are
    resized to the template's.
    """
    import jax.numpy as jnp
    from flax import traverse_util

    from fedjax_users.interop.naming import PARAMS, layout_from_torch, link
    from fedjax_users.interop.state_dict import read_state_dict
    from fedjax_users.interop.tensors import to_numpy

    path = weights_file(name, environ)
    repo_id = ALIASES.get(name, name)
    config = _read_config(find_cached_config(repo_id, environ))
    model_type = config.get("model_type")
    if model_type not in BASE_PREFIXES:
        raise UnavailableModelError(f"{_what(name)}: model_type {model_type!r} has no Flax port")
    params = template[PARAMS]
    flat = traverse_util.flatten_dict(dict(params))
    out = dict(flat)
    state = read_state_dict(path, UnavailableModelError)
    for torch_name, tensor in _torch_names(state, model_type, params).items():
        item = link(torch_name, params, PARAMS)
        expected = flat[item.flax_path].shape
        value = layout_from_torch(to_numpy(tensor), item)
        if item.flax_path[-2:] in VOCAB_ROWS and value.shape[1:] == expected[1:]:
            value = resize_rows(value, expected[0])
        if value.shape != expected:
            raise UnavailableModelError(
                f"weights file {path} does not fit {_what(name)}: torch {torch_name!r} has shape "
                f"{tuple(tensor.shape)}, the model {expected}"
            )
        out[item.flax_path] = jnp.asarray(value, flat[item.flax_path].dtype)
    return {**template, PARAMS: traverse_util.unflatten_dict(out)}
