"""Load breaching 0.1.2's own modules with torch alone (no torchvision, hydra or lpips).

``import breaching`` pulls in torchvision (whose PyPI wheel does not import beside the CPU torch
we pin), hydra and lpips. The user classes, the CIFAR-size models, the language models and the
vision partition function need only torch, so each file is loaded by path inside a stand-in
package ``_breaching_ref`` whose missing neighbours are small stubs:

* ``torchvision``: ``model_preparation.py`` subclasses ``torchvision.models.densenet._DenseLayer``
  and ``datasets_vision.py`` imports a download helper; neither is used by what we run.
* ``cases.data.construct_dataloader``: ``users.py`` imports it, but we hand users their
  dataloader directly.
* ``PIL``: ``datasets_vision.py`` imports it for image folders we never read.

torchvision's *model files* are pure Python too: ``torchvision_module`` loads them by path from
the sources ``make venv-test`` unpacks from the torchvision wheel (see ``torchvision_source``),
and the ``torchvision.models`` stub hands breaching's ImageNet branch (``getattr(torchvision.models,
name)``) the builders found there.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types

PACKAGE = "_breaching_ref"
TORCHVISION_PACKAGE = "_torchvision_ref"
TORCHVISION_VERSION = "0.28.0"
# torchvision's model files searched, in this order, for a builder (``resnet18``, ``vgg11_bn``, ...).
TORCHVISION_MODEL_FILES = ("resnet", "vgg", "densenet")


def breaching_root() -> str:
    """Directory of the installed breaching package, found without importing it."""
    spec = importlib.util.find_spec("breaching")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "breaching is not installed; the parity suite needs `pip install --no-deps breaching==0.1.2`"
        )
    return list(spec.submodule_search_locations)[0]


def _stub(name: str, **attrs) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def _install_stubs() -> None:
    import torch

    if "torchvision" not in sys.modules or not hasattr(sys.modules["torchvision"], "_fedjax_stub"):
        try:
            import torchvision  # noqa: F401  # a working torchvision is fine too

            return _install_pil_stub()
        except Exception:
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]

        tv = _stub("torchvision", _fedjax_stub=True)
        # breaching's ImageNet branch asks ``getattr(torchvision.models, name)``: the real builders.
        tv.models = _stub("torchvision.models", __getattr__=_torchvision_builder)
        tv.models.densenet = _stub("torchvision.models.densenet", _DenseLayer=_dense_layer_base(torch))
        tv.transforms = _stub("torchvision.transforms")
        tv.datasets = _stub("torchvision.datasets")
        tv.datasets.utils = _stub(
            "torchvision.datasets.utils", download_and_extract_archive=None
        )
    _install_pil_stub()


def _dense_layer_base(torch) -> type:
    """torchvision's ``_DenseLayer``: breaching's DenseNet layers subclass it for its ``forward``.

    Without torchvision's files (no ``make venv-test``) a placeholder stands in, so everything
    but breaching's DenseNet still loads.
    """
    try:
        return torchvision_module("densenet")._DenseLayer
    except ModuleNotFoundError:

        class _DenseLayer(torch.nn.Module):
            """Placeholder base class: breaching's DenseNet cannot run without torchvision's files."""

        return _DenseLayer


def _install_pil_stub() -> None:
    try:
        import PIL.Image  # noqa: F401
    except Exception:
        pil = _stub("PIL")
        pil.Image = _stub("PIL.Image", Image=object)
        pil.ImageFile = _stub("PIL.ImageFile", LOAD_TRUNCATED_IMAGES=False)


def _load(qualname: str, path: str) -> types.ModuleType:
    if qualname in sys.modules:
        return sys.modules[qualname]
    spec = importlib.util.spec_from_file_location(qualname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualname] = module
    spec.loader.exec_module(module)
    return module


def _package(qualname: str, path: str) -> types.ModuleType:
    module = _stub(qualname)
    module.__path__ = [path]
    return module


@functools.lru_cache(maxsize=None)
def _cases_root() -> str:
    _install_stubs()
    root = os.path.join(breaching_root(), "cases")
    _package(PACKAGE, breaching_root())
    _package(f"{PACKAGE}.cases", root)
    _package(f"{PACKAGE}.cases.data", os.path.join(root, "data"))
    sys.modules[f"{PACKAGE}.cases.data"].construct_dataloader = None
    _package(f"{PACKAGE}.cases.models", os.path.join(root, "models"))
    return root


def users_module() -> types.ModuleType:
    """``breaching/cases/users.py``: UserSingleStep, UserMultiStep, MultiUserAggregate."""
    root = _cases_root()
    return _load(f"{PACKAGE}.cases.users", os.path.join(root, "users.py"))


def models_module() -> types.ModuleType:
    """``breaching/cases/models/model_preparation.py`` with its model files."""
    root = os.path.join(_cases_root(), "models")
    for name in ("nfnets", "utils", "resnets", "densenets", "vgg", "language_models", "losses"):
        _load(f"{PACKAGE}.cases.models.{name}", os.path.join(root, f"{name}.py"))
    return _load(f"{PACKAGE}.cases.models.model_preparation", os.path.join(root, "model_preparation.py"))


def language_models_module() -> types.ModuleType:
    """``breaching/cases/models/language_models.py``: LinearModel, TransformerModel."""
    return models_module() and sys.modules[f"{PACKAGE}.cases.models.language_models"]


def losses_module() -> types.ModuleType:
    """``breaching/cases/models/losses.py``: CausalLoss."""
    return models_module() and sys.modules[f"{PACKAGE}.cases.models.losses"]


def datasets_vision_module() -> types.ModuleType:
    """``breaching/cases/data/datasets_vision.py``: the vision partition ``_split_dataset_vision``."""
    root = os.path.join(_cases_root(), "data")
    return _load(f"{PACKAGE}.cases.data.datasets_vision", os.path.join(root, "datasets_vision.py"))


def datasets_text_module() -> types.ModuleType:
    """``breaching/cases/data/datasets_text.py``: the article split, ``_get_tokenizer``, ``_get_preprocessing``.

    Its functions import ``transformers`` (and ``datasets``, for the whole dataset) when called.
    """
    root = os.path.join(_cases_root(), "data")
    return _load(f"{PACKAGE}.cases.data.datasets_text", os.path.join(root, "datasets_text.py"))


def config_dir() -> str:
    """breaching's bundled Hydra config folder (``config/case/user/*.yaml`` and friends)."""
    return os.path.join(breaching_root(), "config")


def vision_model(name: str, num_classes: int = 10, shape=(3, 32, 32), data_name: str = "CIFAR10"):
    """Build one of breaching's vision models exactly as ``construct_model`` does for ``data_name``
    (data named ``*ImageNet*`` takes its ImageNet branch: torchvision's models, ``fc`` replaced).
    ``nfnet``, which breaching 0.1.2 cannot build, is ``nfnet_model``."""
    if name == "nfnet":
        return nfnet_model(num_classes, shape, data_name)
    cfg_data = types.SimpleNamespace(name=data_name, shape=list(shape), classes=num_classes)
    return models_module()._construct_vision_model(name, cfg_data, pretrained=False)


def nfnet_model(num_classes: int = 10, shape=(3, 32, 32), data_name: str = "CIFAR10"):
    """breaching's own ``NFNet`` class, in its ``VisionContainer``, with the arguments
    ``_construct_vision_model`` gives it for ``nfnet`` but ``activation="relu"``.

    breaching 0.1.2 passes ``activation="ReLU"``, which is not a key of ``nfnets.activations_dict``
    (``"relu"``, ``"gelu"``): its ``construct_model`` raises ``KeyError: 'ReLU'`` for this name.
    """
    preparation = models_module()
    nfnets = sys.modules[f"{PACKAGE}.cases.models.nfnets"]
    model = nfnets.NFNet(shape[0], num_classes, variant="F0", stochdepth_rate=0.25, alpha=0.2, se_ratio=0.5,
                         activation="relu", stem="ImageNet" if "ImageNet" in data_name else "CIFAR",
                         use_dropout=True)
    return preparation.VisionContainer(model)


def text_model(name: str, vocab_size: int):
    """Build one of breaching's text models as ``construct_model`` does (``LSTM`` wrapped, see below)."""
    cfg_data = types.SimpleNamespace(vocab_size=vocab_size)
    name = {"linear-text": "linear"}.get(name, name)
    model = models_module()._construct_text_model(name, cfg_data, pretrained=False)
    return zero_state_rnn_class()(model) if name == "LSTM" else model


# Tiny architectures for breaching's two Hugging Face repositories (parity cases and tests).
TINY_HF_CONFIGS = {
    "bert-base-uncased": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=16),
    "gpt2": dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16),
}
TINY_HF_REVISION = "0123456789abcdef0123456789abcdef01234567"


def tiny_hf_model(repo_id: str, seed: int = 0):
    """A freshly initialised tiny ``BertForPreTraining`` (bert-base-uncased's class on the hub) or ``GPT2LMHeadModel``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if repo_id == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_HF_CONFIGS["gpt2"]))
    return transformers.BertForPreTraining(transformers.BertConfig(**TINY_HF_CONFIGS["bert-base-uncased"]))


def write_tiny_hf_snapshot(hub: str, repo_id: str, weights: bool = True, safe: bool = True) -> str:
    """A download's layout in the hub cache ``hub``: ``models--<repo>/snapshots/<rev>/`` and ``refs/main``.

    The snapshot holds the config and (``weights``) ``model.safetensors``, or with ``safe=False``
    a torch pickle ``pytorch_model.bin`` as older downloads do. Returns the snapshot folder.
    """
    import torch

    folder = os.path.join(hub, f"models--{repo_id}")
    snapshot = os.path.join(folder, "snapshots", TINY_HF_REVISION)
    model = tiny_hf_model(repo_id)
    model.config.save_pretrained(snapshot)
    if weights and safe:
        model.save_pretrained(snapshot)
    elif weights:  # transformers 5 saves only safetensors
        torch.save(model.state_dict(), os.path.join(snapshot, "pytorch_model.bin"))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as handle:
        handle.write(TINY_HF_REVISION)
    return snapshot


@functools.lru_cache(maxsize=None)
def use_tiny_hf_cache() -> str:
    """Point this process's Hugging Face hub cache (offline) at a temporary one holding the tiny models.

    For the parity grid's Hugging Face cases: ``transformers`` (breaching's side) and
    ``fedjax_users.models.huggingface`` both read it. Returns the cache folder.
    """
    import tempfile

    import huggingface_hub.constants

    hub = tempfile.mkdtemp(prefix="fedjax-users-hf-hub-")
    for repo_id in TINY_HF_CONFIGS:
        write_tiny_hf_snapshot(hub, repo_id)
    os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = hub, "1"
    # huggingface_hub reads both once, at import.
    huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE = hub, True
    return hub


def hf_text_model(name: str, vocab_size: int, task: str, pretrained: bool = False):
    """A Hugging Face text model as breaching's ``_construct_text_model`` builds it (its ``HuggingFaceContainer``).

    ``transformers`` reads the config (and, ``pretrained``, the weights) from the local hub cache
    (``HF_HUB_CACHE``; set ``HF_HUB_OFFLINE=1`` so that nothing is fetched).
    """
    cfg_data = types.SimpleNamespace(vocab_size=vocab_size, task=task)
    return models_module()._construct_text_model(name, cfg_data, pretrained=pretrained)


@functools.lru_cache(maxsize=None)
def zero_state_rnn_class():
    """The wrapper class below, defined on first use (this module imports torch only when used)."""
    import torch

    class ZeroStateRNN(torch.nn.Module):
        """breaching's ``RNNModel`` as its users would have to call it: ``model(input_ids=...) -> [B, T, vocab]``.

        breaching's users call ``model(**data)``, but ``RNNModel.forward(input_ids, hiddens)`` needs
        the initial state and returns ``(logits [B*T, vocab], state)``, so no breaching user can run
        it (and its ``init_hidden`` has the wrong layout for ``torch.nn.LSTM``). This wrapper passes
        ``hiddens=None`` (torch's zero state) and shapes the logits back; the model itself runs
        unmodified, and as the attribute ``model`` its parameter names carry the container prefix
        that ``fedjax_users.interop`` drops.
        """

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, **kwargs):
            logits, _ = self.model(input_ids, None)
            return logits.view(*input_ids.shape, -1)

    return ZeroStateRNN


def torchvision_source() -> str:
    """The folder holding torchvision's pure-Python files (``torchvision/models/*.py`` and the
    few modules they import), unpacked from the torchvision wheel by ``make venv-test``."""
    root = os.path.join(sys.prefix, "torchvision-src")
    if not os.path.isfile(os.path.join(root, "torchvision", "models", "resnet.py")):
        raise ModuleNotFoundError(
            f"torchvision {TORCHVISION_VERSION}'s model files are not in {root}; run `make venv-test`"
        )
    return root


@functools.lru_cache(maxsize=None)
def _torchvision_root() -> str:
    """Set up the stand-in package ``_torchvision_ref`` over torchvision's files; its root folder.

    Its ``__init__.py`` (which loads the C extension) and ``models/__init__.py`` (which imports
    every model family, detection and video included) are never run: the two packages are empty
    shells whose ``__path__`` lets the model files' relative imports find their real neighbours
    (``models/_api.py``, ``models/_utils.py``, ``models/_meta.py``, ``_utils.py``,
    ``_internally_replaced_utils.py``, all pure Python). Two neighbours are stand-ins, because
    they only serve machinery we never run and import far more than torch:

    * ``utils._log_api_usage_once``: usage telemetry (``torch._C._log_api_usage_once``); the
      real ``utils.py`` is image-grid drawing that imports PIL's fonts and drawing.
    * ``transforms._presets.ImageClassification``: the preprocessing a pretrained ``Weights``
      entry records (``transforms`` imports the whole v2 transforms package); calling it fails.
    """
    root = os.path.join(torchvision_source(), "torchvision")
    _package(TORCHVISION_PACKAGE, root)
    _package(f"{TORCHVISION_PACKAGE}.models", os.path.join(root, "models"))
    _stub(f"{TORCHVISION_PACKAGE}.utils", _log_api_usage_once=lambda obj: None)
    _stub(f"{TORCHVISION_PACKAGE}.transforms")
    _stub(f"{TORCHVISION_PACKAGE}.transforms._presets", ImageClassification=_UnavailableTransform)
    return root


class _UnavailableTransform:
    """Stand-in for torchvision's preset transforms: only pretrained weights' metadata names them."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision's preset transforms are not loaded by parity.reference")


def torchvision_module(stem: str) -> types.ModuleType:
    """torchvision's ``models/<stem>.py`` (e.g. ``"resnet"``, ``"vgg"``), loaded by path."""
    _torchvision_root()
    return importlib.import_module(f"{TORCHVISION_PACKAGE}.models.{stem}")


def _torchvision_builder(name: str):
    """The builder ``torchvision.models.<name>`` from ``TORCHVISION_MODEL_FILES``.

    An ``AttributeError`` for any other name, as ``torchvision.models`` itself gives: breaching's
    ImageNet branch catches it to try its own models (``linear``, ``nfnet``, ...).
    """
    if not name.startswith("__"):
        for stem in TORCHVISION_MODEL_FILES:
            module = torchvision_module(stem)
            if name in module.__all__ and callable(getattr(module, name)) and name[0].islower():
                return getattr(module, name)
    raise AttributeError(f"torchvision.models (files {TORCHVISION_MODEL_FILES}) has no {name!r}")


def torchvision_model(name: str, **kwargs):
    """torchvision's own ``torchvision.models.<name>(**kwargs)`` (``weights=None`` unless given)."""
    return _torchvision_builder(name)(**{"weights": None, **kwargs})


def attacks_module() -> types.ModuleType:
    """``breaching/attacks/__init__.py`` (``prepare_attack`` and every attacker class), loaded by path.

    The attack files need torch, NumPy and SciPy only; ``base_attack.py`` and ``analytic_attack.py``
    import ``cases/models/transformer_dictionary.py`` (torch only), found through the stand-in package.
    Nothing is stubbed for them: ``lpips``, the one extra breaching's attack pipeline names, is imported
    by ``breaching/analysis`` (the scoring of reconstructions), which is not loaded here.
    """
    _cases_root()
    qualname = f"{PACKAGE}.attacks"
    if qualname in sys.modules and hasattr(sys.modules[qualname], "prepare_attack"):
        return sys.modules[qualname]
    root = os.path.join(breaching_root(), "attacks")
    spec = importlib.util.spec_from_file_location(qualname, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualname] = module
    spec.loader.exec_module(module)
    return module


def attack_config(name: str, overrides=()):
    """breaching's ``config/attack/<name>.yaml`` as its ``get_attack_config`` composes it, without hydra.

    The file's ``defaults`` (other attack files, then ``_self_``) are merged first and the file on top,
    then ``key=value`` overrides, as hydra does for these files (their defaults name files only).
    """
    from omegaconf import OmegaConf

    folder = os.path.join(config_dir(), "attack")

    def compose(stem):
        own = OmegaConf.load(os.path.join(folder, f"{stem}.yaml"))
        defaults = list(own.pop("defaults", []))
        parts = [compose(entry) for entry in defaults if entry != "_self_"]
        return OmegaConf.merge(*parts, own) if parts else own

    return OmegaConf.merge(compose(name), OmegaConf.from_dotlist(list(overrides)))


def data_config(name: str = "CIFAR10"):
    """breaching's ``config/case/data/<name>.yaml`` (its ``defaults`` list dropped): the data config
    that ``construct_model`` reads and that breaching's server sends as each payload's ``metadata``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(config_dir(), "case", "data", f"{name}.yaml"))
    cfg.pop("defaults", None)
    return cfg
