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
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types

PACKAGE = "_breaching_ref"


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

        class _DenseLayer(torch.nn.Module):
            """Placeholder base class; breaching's DenseNet layers are never built here."""

        tv = _stub("torchvision", _fedjax_stub=True)
        tv.models = _stub("torchvision.models")
        tv.models.densenet = _stub("torchvision.models.densenet", _DenseLayer=_DenseLayer)
        tv.transforms = _stub("torchvision.transforms")
        tv.datasets = _stub("torchvision.datasets")
        tv.datasets.utils = _stub(
            "torchvision.datasets.utils", download_and_extract_archive=None
        )
    _install_pil_stub()


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


def config_dir() -> str:
    """breaching's bundled Hydra config folder (``config/case/user/*.yaml`` and friends)."""
    return os.path.join(breaching_root(), "config")


def vision_model(name: str, num_classes: int = 10, shape=(3, 32, 32)):
    """Build one of breaching's CIFAR-size vision models exactly as ``construct_model`` does."""
    cfg_data = types.SimpleNamespace(name="CIFAR10", shape=list(shape), classes=num_classes)
    return models_module()._construct_vision_model(name, cfg_data, pretrained=False)


def text_model(name: str, vocab_size: int):
    """Build one of breaching's text models (``linear``, ``transformer3``) as ``construct_model`` does."""
    cfg_data = types.SimpleNamespace(vocab_size=vocab_size)
    name = {"linear-text": "linear"}.get(name, name)
    return models_module()._construct_text_model(name, cfg_data, pretrained=False)
