"""Model zoo: Flax versions of breaching's models, looked up by breaching's names.

Each modality keeps its own table (breaching has a vision ``linear`` and a text ``linear``).
A model module exports ``MODELS: dict[name, constructor]``; constructors are called as
``constructor(num_classes=..., num_channels=...)`` (text models read ``num_classes`` as the
vocabulary size), plus ``dtype=`` / ``param_dtype=`` when those are set. Add a modality's table
with ``register(modality, MODELS)``.

Submodules (each a family of models and its ``MODELS`` table; ``docs/models.md``):

* ``vision``: breaching's small CIFAR-size models (``ConvNet``, ``lenet_zhu``, ``cnn6``, ``MLP``,
  ``linear``); ``resnets``, ``vgg``, ``densenet``, ``nfnet`` and ``convnets`` the other vision
  families, with torchvision's ImageNet tables for ResNet, VGG and DenseNet.
* ``text``: breaching's own language models (``linear``, ``transformer*``, ``LSTM``).
* ``huggingface``: breaching's Hugging Face text models, ported in ``gpt2`` and ``bert`` (layers
  in ``hf_layers``), weights read from a local hub cache.
* ``stochastic`` (torch's train-mode dropout and stochastic depth), ``dtypes`` (the layers'
  ``dtype`` / ``param_dtype``).

Example::

    >>> from fedjax_users import models
    >>> type(models.get("ResNet18", num_classes=10)).__name__
    'ResNet'
    >>> type(models.for_data("resnet18", "ImageNet", num_classes=1000)).__name__  # torchvision's, as breaching
    'TorchvisionResNet'
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import flax.linen as nn

from fedjax_users.models import huggingface, vision
from fedjax_users.models.dtypes import Dtype, layer_dtypes
from fedjax_users.suggestions import did_you_mean

__all__ = ["Constructor", "for_data", "get", "names", "register"]

Constructor = Callable[..., nn.Module]

_REGISTRY: dict[str, dict[str, Constructor]] = {}


def register(modality: str, models: Mapping[str, Constructor]) -> None:
    """Add ``models`` to ``modality``'s table; re-registering a name is an error.

    Args:
      modality: the table: ``"vision"`` (CIFAR-size data), ``"imagenet"`` or ``"text"``, or a new one.
      models: name -> constructor, called as ``constructor(num_classes=..., num_channels=...)``
        (plus ``dtype=`` / ``param_dtype=`` when set).

    Raises:
      ValueError: a name already in the table (nothing is added then).

    Example::

        >>> import flax.linen as nn
        >>> register("vision", {"lenet_zhu": nn.Dense})
        Traceback (most recent call last):
        ...
        ValueError: vision models already registered: ['lenet_zhu']
    """
    table = _REGISTRY.setdefault(modality, {})
    clashes = sorted(set(table) & set(models))
    if clashes:
        raise ValueError(f"{modality} models already registered: {clashes}")
    table.update(models)


def names(modality: str = "vision") -> list[str]:
    """The registered model names of a table.

    Args:
      modality: ``"vision"``, ``"imagenet"``, ``"text"`` (or any registered table).

    Returns:
      The names, sorted; empty for a table never registered.

    Example::

        >>> names("text")
        ['LSTM', 'linear', 'transformer1', 'transformer3', 'transformer3f', 'transformer3t', 'transformerS']
    """
    return sorted(_REGISTRY.get(modality, {}))


def get(
    name: str,
    num_classes: int = 10,
    num_channels: int = 3,
    modality: str = "vision",
    dtype: Optional[Dtype] = None,
    param_dtype: Optional[Dtype] = None,
    task: Optional[str] = None,
) -> nn.Module:
    """The Flax module breaching builds for ``name``, matched case-insensitively like breaching.

    Args:
      name: breaching's model name (``cfg_case.model``); text names match exactly, as breaching's.
      num_classes: the classes (the vocabulary size for text models).
      num_channels: the input channels of vision models.
      modality: the table: ``"vision"``, ``"imagenet"`` or ``"text"``.
      dtype: the dtype every layer computes in; ``None`` keeps the layers' defaults.
      param_dtype: the dtype of every layer's parameters; ``None`` keeps the defaults. Under
        ``jax_enable_x64``, ``jnp.float64`` gives a model whose parameters, statistics and
        gradients are all float64.
      task: the data's task; a text name breaching does not build itself is a Hugging Face model
        (``fedjax_users.models.huggingface``), whose class depends on it.

    Returns:
      The Flax module (not initialised).

    Raises:
      ValueError: an unknown name, naming the closest ones and how to list them all.

    Example::

        >>> type(get("lenet_zhu", num_classes=10)).__name__
        'LeNetZhu'
        >>> get("lenet_zhy")
        Traceback (most recent call last):
        ...
        ValueError: unknown vision model 'lenet_zhy'; did you mean 'lenet_zhu'? (71 vision models: ...)
    """
    table = _REGISTRY.get(modality, {})
    # breaching's text names are exact: any other text name goes to Hugging Face there.
    matches = [key for key in table if key == name or (modality != "text" and key.lower() == name.lower())]
    if not matches and modality == "text":
        return huggingface.build(name, num_classes, task, dtype, param_dtype, known=names(modality))
    if not matches:
        # The suggestions are the short list; the whole table (about a hundred names) is one call away.
        hint = did_you_mean(name, table, ignore_case=True)
        raise ValueError(f"unknown {modality} model {name!r}" + (f"; {hint}" if hint else "")
                         + f" ({len(table)} {modality} models: fedjax_users.models.names({modality!r}) lists them)")
    exact = name if name in table else matches[0]
    return table[exact](num_classes=num_classes, num_channels=num_channels, **layer_dtypes(dtype, param_dtype))


def for_data(
    name: str,
    data_name: str,
    num_classes: int = 10,
    num_channels: int = 3,
    modality: str = "vision",
    dtype: Optional[Dtype] = None,
    param_dtype: Optional[Dtype] = None,
    task: Optional[str] = None,
) -> nn.Module:
    """The model breaching's ``construct_model`` builds for ``name`` on the dataset ``data_name`` (and ``task``).

    As ``model_preparation.py``: vision data whose name contains ``ImageNet`` takes the ImageNet
    table (torchvision's models and breaching's ImageNet-only ones); other vision data the CIFAR
    table; text data the text table.

    Args:
      name: breaching's model name.
      data_name: the dataset's name (``cfg_case.data.name``, or the dataset it is ``like``).
      num_classes: as in :func:`get`.
      num_channels: as in :func:`get`.
      modality: the data's modality, ``"vision"`` or ``"text"``.
      dtype: as in :func:`get`.
      param_dtype: as in :func:`get`.
      task: as in :func:`get`.

    Returns:
      The Flax module (not initialised).

    Example::

        >>> [type(for_data("resnet18", data)).__name__ for data in ("ImageNet", "CIFAR10")]
        ['TorchvisionResNet', 'ResNet']
    """
    if modality == "vision" and "ImageNet" in data_name:
        modality = "imagenet"
    return get(name, num_classes, num_channels, modality, dtype, param_dtype, task)


register("vision", vision.MODELS)
from fedjax_users.models import vgg  # noqa: E402

register("vision", vgg.MODELS)
from fedjax_users.models import convnets  # noqa: E402

register("vision", convnets.MODELS)
from fedjax_users.models import densenet  # noqa: E402

register("vision", densenet.MODELS)
from fedjax_users.models import nfnet  # noqa: E402

register("vision", nfnet.MODELS)
register("imagenet", vgg.IMAGENET_MODELS)
register("imagenet", densenet.IMAGENET_MODELS)
# ImageNet data: breaching's ``linear`` at the data's shape (``Flatten`` + ``Linear``, as on CIFAR).
register("imagenet", {"linear": vision.Linear})

from fedjax_users.models import resnets  # noqa: E402

register("vision", resnets.MODELS)
register("imagenet", resnets.IMAGENET_MODELS)

from fedjax_users.models import text  # noqa: E402  (registers after the table exists)

register("text", text.MODELS)
