"""Users from real data: datasets, breaching's federated partitions, and cases that combine them.

The names here are the ones a caller building users from a case needs; each submodule's
``__all__`` is its own public surface.

Submodules:

* ``cases``: a composed case's model, server payloads and users' data (``construct_users``).
* ``compose``: a case file composed with Hydra, as breaching composes it, with its overrides
  (``load_case``); ``catalog``: case files by name (the package's and breaching's).
* ``keys``: which case keys are honoured and which only concern torch or breaching.
* ``server``: what breaching's server sends (pretrained weights, ``model_state``, buffers).
* ``sources``: a data config's split (``load_examples``): CIFAR folders, the embedded digits,
  synthetic images, random tokens, and the readers below; ``examples``: the split's type.
* ``images`` (ImageNet, TinyImageNet, Birdsnap folders), ``text`` (wikitext), ``tff``
  (TensorFlow Federated's Shakespeare and StackOverflow, with ``tf_example``), ``glue`` (CoLA),
  ``hf_tokenizer`` (breaching's tokenizers from a local hub cache), ``masking`` (masked-lm batches).
* ``partition``: breaching's federated partitions (``partition_indices``).
* ``errors``: ``DataError`` and ``CaseConfigError``; ``make_digits_npz``: the script that made
  the embedded digits.

Example::

    >>> from fedjax_users import data
    >>> case = data.load_case(None, ["data.partition=unique-class"])
    >>> examples = data.load_examples(case.data)
    >>> data.user_example_indices(examples, case.data, user_idx=3, num_data_points=2).tolist()  # labelled 3
    [3, 13]
"""

from fedjax_users.data.cases import DEFAULT_CASE, UsersCase, construct_users, load_case, user_example_indices
from fedjax_users.data.errors import DataError
from fedjax_users.data.partition import PARTITIONS, partition_indices, torch_randperm
from fedjax_users.data.sources import Examples, load_examples, normalize

__all__ = [
    "DEFAULT_CASE",
    "DataError",
    "Examples",
    "PARTITIONS",
    "UsersCase",
    "construct_users",
    "load_case",
    "load_examples",
    "normalize",
    "partition_indices",
    "torch_randperm",
    "user_example_indices",
]
