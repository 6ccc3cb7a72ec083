"""Cases (data + user + model + server + impl, composed like breaching's ``config/case/*.yaml``)
and the users they describe.

``load_case`` composes a case file (fedjax_users.data.compose: breaching's own case files run
unchanged); ``construct_users`` builds what the case's server sends and the users' data for every
query (``server.num_queries``):

* ``impl.dtype``: ``float`` (float32) or ``double`` (float64; JAX's x64 mode must be on, as
  ``fedjax-users run`` turns it on); the model's parameters, statistics and inputs take it.
* ``impl.shuffle`` (``impl.sample_with_replacement``): each query a user takes its first
  ``num_data_points`` of its examples in a fresh random order (drawn with replacement), as
  breaching's ``RandomSampler``; otherwise the same first examples every query.
* ``server.*``: see fedjax_users.data.server (pretrained weights, ``model_state``; breaching's
  Hugging Face text models read theirs from the hub cache, fedjax_users.models.huggingface); with
  ``server.provide_public_buffers`` the payload carries the model's BatchNorm statistics (users
  run in eval mode), else ``None`` (users train their own, carried from query to query from the
  statistics of the model as built, as breaching's users keep their own copy of it).
* The model is the one breaching builds for the data (``models.for_data``).

Every key of the case is checked (fedjax_users.data.keys): honoured, or listed as not applicable.

Example (building a case compiles its model's initialisation: a second or more)::

    case = construct_users(load_case(None, ["model=linear"]), jax.random.key(0))
    case.model, case.data.inputs.shape, case.user_cfg.user_type   # Linear, (4, 32, 32, 3), 'local_update'
    shared, true_data, state = fu.compute(case.model, case.payload, case.data, case.user_cfg, key,
                                          state=case.user_state, loss=case.loss)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedjax_users import losses, models
from fedjax_users.cohort import FunctionCohort
from fedjax_users.config import UserConfig
from fedjax_users.data import server as case_server
from fedjax_users.data.compose import CONFIG_ROOT, DEFAULT_CASE, require_mapping, load_case
from fedjax_users.data.errors import CaseConfigError, DataError
from fedjax_users.data.keys import check_keys, not_applicable, num_queries
from fedjax_users.data.partition import PARTITIONS, partition_indices
from fedjax_users.data.sources import Examples, load_examples, normalize, split_index
from fedjax_users.models import huggingface
from fedjax_users.types import ServerPayload, UserData

__all__ = [
    "CONFIG_ROOT",
    "DEFAULT_CASE",
    "Query",
    "UsersCase",
    "case_dtype",
    "construct_users",
    "load_case",
    "user_example_indices",
    "user_partition",
]

GROUPS = ("data", "user")
LOSSES: dict[str, Callable] = {
    "classification": losses.softmax_cross_entropy,
    "causal-lm": losses.causal_lm_loss,
    "masked-lm": losses.masked_lm_loss,
}
TEXT_TASKS = ("causal-lm", "masked-lm")
DTYPES = {"float": np.float32, "float32": np.float32, "double": np.float64, "float64": np.float64}


def case_dtype(cfg_case: DictConfig) -> type:
    """``impl.dtype`` as a NumPy float type (breaching's ``getattr(torch, impl.dtype)``).

    Args:
      cfg_case: the composed case.

    Returns:
      ``numpy.float32`` (``float``, the default) or ``numpy.float64`` (``double``).

    Raises:
      CaseConfigError: another dtype.

    Example::

        >>> from omegaconf import OmegaConf
        >>> case_dtype(OmegaConf.create({"impl": {"dtype": "double"}})).__name__
        'float64'
    """
    name = (cfg_case.get("impl") or {}).get("dtype", "float")
    if name not in DTYPES:
        raise CaseConfigError(f"impl.dtype={name!r} is not supported; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# Users of a case


@dataclasses.dataclass(frozen=True)
class Query:
    """One query: what the server sends and the data its users hold for it.

    Attributes:
      payload: the server's model state for this query.
      data: the users' data for it (as ``UsersCase.data``).
    """

    payload: ServerPayload
    data: UserData


@dataclasses.dataclass(frozen=True)
class UsersCase:
    """Everything the core user functions need: model, server payload, the users' data and config.

    Attributes:
      model: the Flax model breaching builds for the data (``models.for_data``).
      payload: the first query's server payload.
      data: the first query's data: one user's examples for ``local_gradient`` /
        ``local_update`` users; the users of ``range(*user_range)`` stacked on a leading axis for
        ``multiuser_aggregate`` (a ``fedjax_users.cohort.FunctionCohort`` reading them on demand,
        built with ``stream=True``).
      user_cfg: the case's ``user`` block.
      loss: the data task's loss (``fedjax_users.losses``).
      data_cfg: the case's ``data`` block.
      user_indices: the users' indices in the dataset.
      queries: every query, in order.
      user_state: the users' own BatchNorm statistics before the first query where the server
        sends no buffers (stacked per user for ``multiuser_aggregate``), else ``None``.
      not_applicable: the case's keys that only concern torch or breaching's machinery.
      not_read: honoured keys this case does not read (as breaching would not), with why.
      pretrained: whether the server sends pretrained weights.
    """

    model: nn.Module
    payload: ServerPayload
    data: UserData | FunctionCohort
    user_cfg: UserConfig
    loss: Callable
    data_cfg: DictConfig
    user_indices: tuple[int, ...]
    queries: tuple[Query, ...] = ()
    user_state: Any = None
    not_applicable: tuple[str, ...] = ()
    not_read: tuple[str, ...] = ()
    pretrained: bool = False


def _require(cfg: DictConfig, key: str, where: str) -> Any:
    value = cfg.get(key)
    if value is None:
        raise DataError(f"{where} needs a {key!r} entry")
    return value


def _held_examples(examples: Examples, cfg_data: DictConfig, user_idx: int) -> Examples:
    """The examples user ``user_idx`` draws from: its own for a dataset with its own users, else all of them.

    A dataset with its own users (``Examples.given``, wikitext's articles) takes breaching's
    ``partition: given`` and no other; the other datasets take any partition but that one.
    """
    partition = _require(cfg_data, "partition", "the data config")
    if examples.given is None:
        if partition == "given":
            raise DataError(
                f"partition 'given' is a dataset's own users (wikitext's articles); dataset {cfg_data.name!r} has "
                f"none: use one of {', '.join(PARTITIONS)}"
            )
        return examples
    if partition != "given":
        raise DataError(f"dataset {cfg_data.name!r} has its own users: data.partition must be 'given', got {partition!r}")
    clients = _require(cfg_data, "default_clients", "the data config")
    if not 0 <= user_idx < clients:
        raise DataError(
            f"user index {user_idx} is outside the dataset's {clients} clients (valid: 0..{clients - 1})"
        )
    return examples.given(user_idx)


def user_partition(examples: Examples, cfg_data: DictConfig, user_idx: int, seed: Optional[int] = None) -> np.ndarray:
    """Every example a user holds under the data config's partition, in order.

    Args:
      examples: the split (a dataset with its own users, ``given``, holds them itself).
      cfg_data: the data config (``partition``, ``default_clients`` and what the partition reads).
      user_idx: the user.
      seed: seeds ``random-full`` (``partition_indices``).

    Returns:
      The example indices, int64 (into ``examples.given(user_idx)`` for a dataset with its own users).

    Raises:
      DataError: the partition does not fit the dataset, or leaves the user no example.

    Example::

        >>> import numpy as np
        >>> from omegaconf import OmegaConf
        >>> from fedjax_users.data.examples import Examples
        >>> examples = Examples(stored=np.arange(6), labels=np.array([0, 1, 0, 1, 0, 1]), num_classes=2)
        >>> user_partition(examples, OmegaConf.create({"partition": "balanced", "default_clients": 3}), 1).tolist()
        [2, 3]
    """
    partition = _require(cfg_data, "partition", "the data config")
    clients = _require(cfg_data, "default_clients", "the data config")
    if examples.given is not None or partition == "given":
        return np.arange(len(_held_examples(examples, cfg_data, user_idx)), dtype=np.int64)
    indices = partition_indices(
        examples.labels,
        examples.num_classes,
        partition,
        user_idx,
        clients,
        mixup_freq=cfg_data.get("mixup_freq", 2),
        num_data_points=cfg_data.get("num_data_points", 1),
        target_label=cfg_data.get("target_label", 0),
        seed=seed,
    )
    if len(indices) == 0:
        # unique-class users are labels: Birdsnap's run 1..500, so its user 0 has none (as in breaching).
        labels = ""
        if partition == "unique-class" and len(examples):
            labels = (f"; unique-class gives user {user_idx} the examples labelled {user_idx}, and the labels run "
                      f"{examples.labels.min()}..{examples.labels.max()}")
        raise DataError(
            f"user {user_idx} has no data under partition {partition!r} "
            f"({len(examples)} examples, {clients} clients){labels}"
        )
    return indices


def user_example_indices(
    examples: Examples, cfg_data: DictConfig, user_idx: int, num_data_points: int, seed: Optional[int] = None,
    order_key: Optional[jax.Array] = None, with_replacement: bool = False,
) -> np.ndarray:
    """The examples a user computes on: its first ``num_data_points`` under the data config's partition.

    Args:
      examples: the split.
      cfg_data: the data config.
      user_idx: the user.
      num_data_points: ``user.num_data_points``.
      seed: seeds ``random-full`` (``partition_indices``).
      order_key: ``impl.shuffle``: the user's examples in a random order drawn from this key;
        ``None`` keeps the partition's order.
      with_replacement: draw that order with replacement (``impl.sample_with_replacement``).

    Returns:
      ``num_data_points`` example indices, int64.

    Raises:
      DataError: as ``user_partition``, or the user holds fewer examples than asked for.

    Example::

        >>> import numpy as np
        >>> from omegaconf import OmegaConf
        >>> from fedjax_users.data.examples import Examples
        >>> examples = Examples(stored=np.arange(6), labels=np.array([0, 1, 0, 1, 0, 1]), num_classes=2)
        >>> cfg_data = OmegaConf.create({"name": "toy", "partition": "balanced", "default_clients": 3})
        >>> user_example_indices(examples, cfg_data, 1, num_data_points=1).tolist()
        [2]
        >>> user_example_indices(examples, cfg_data, 1, num_data_points=3)
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: user 1 has 2 examples under partition 'balanced', fewer than the 3 ...
    """
    indices = user_partition(examples, cfg_data, user_idx, seed)
    if len(indices) < num_data_points:
        raise DataError(
            f"user {user_idx} has {len(indices)} examples under partition {cfg_data.partition!r}, "
            f"fewer than the {num_data_points} of user.num_data_points"
        )
    if order_key is not None:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(order_key)).ravel().tolist())
        order = rng.integers(0, len(indices), len(indices)) if with_replacement else rng.permutation(len(indices))
        indices = indices[order]
    return indices[:num_data_points]


def _check_labels(labels: np.ndarray, num_classes: int, cfg_data: DictConfig) -> None:
    """Classification labels index the model's classes: an index past them would give a silent NaN or zero loss."""
    outside = labels[(labels < 0) | (labels >= num_classes)] if cfg_data.get("task") == "classification" else labels[:0]
    if outside.size:
        raise DataError(
            f"dataset {cfg_data.name!r} gives a user label {int(outside[0])}, outside the {num_classes} classes "
            f"0..{num_classes - 1} (torch's cross-entropy refuses it as well)"
        )


def _model_inputs(examples: Examples, indices: np.ndarray, cfg_data: DictConfig, dtype) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = examples.take(indices)
    if cfg_data.get("modality") == "vision":
        channels, height, width = _require(cfg_data, "shape", "the data config")
        if inputs.shape[1:] != (height, width, channels):
            raise DataError(
                f"dataset {cfg_data.name!r} has images of shape (H, W, C) {inputs.shape[1:]}, "
                f"data.shape asks for {[channels, height, width]} (C, H, W)"
            )
        if cfg_data.get("normalize", False):
            inputs = normalize(inputs, cfg_data.mean, cfg_data.std)
        inputs = inputs.astype(dtype)
    _check_labels(labels, examples.num_classes, cfg_data)
    return inputs, labels


def _user_indices(user_cfg: UserConfig, cfg_data: DictConfig, key: jax.Array) -> tuple[int, ...]:
    if user_cfg.is_aggregate:
        if user_cfg.user_range is None:
            raise DataError("a multiuser_aggregate user needs user.user_range")
        return tuple(range(*user_cfg.user_range))
    if user_cfg.user_idx is None:
        # As the reference, no index means a random client; here drawn from the case's key.
        clients = _require(cfg_data, "default_clients", "the data config")
        return (int(jax.random.randint(key, (), 0, clients)),)
    return (int(user_cfg.user_idx),)


def _user_seed(key: jax.Array, user_idx: int) -> int:
    """Per-user seed for ``random-full``: each user draws its own subset, repeatably."""
    return int(jax.random.bits(jax.random.fold_in(key, user_idx), dtype=jnp.uint32))


def _layer_dtypes(dtype) -> dict:
    return {} if dtype == np.float32 else {"dtype": jnp.float64, "param_dtype": jnp.float64}


def _build_model(cfg_case: DictConfig, cfg_data: DictConfig, examples: Examples, dtype) -> nn.Module:
    name = str(_require(cfg_case, "model", "the case"))
    modality = cfg_data.get("modality")
    if modality not in ("vision", "text"):
        raise DataError(f"unknown data.modality {modality!r}; expected vision or text")
    channels = _require(cfg_data, "shape", "the data config")[0] if modality == "vision" else 1
    language_models = {n.lower() for n in models.names("text")}
    if modality == "text" and cfg_data.get("task") == "classification" and name.lower() in language_models:
        # breaching's own text models predict a token at every position; its CrossEntropyLoss refuses
        # their [B, T, V] output against one label a sequence, and so would ours.
        raise DataError(
            f"model {name!r} is a language model: text classification (dataset {cfg_data.name!r}) needs a sequence "
            f"classifier, breaching's AutoModelForSequenceClassification (e.g. model=bert-base-uncased)"
        )
    try:
        return models.for_data(
            name, str(cfg_data.get("like") or cfg_data.name), num_classes=examples.num_classes,
            num_channels=channels, modality=modality, task=cfg_data.get("task"), **_layer_dtypes(dtype),
        )
    except ValueError as err:
        raise DataError(str(err)) from None


def _loss(cfg_data: DictConfig) -> Callable:
    task = cfg_data.get("task")
    if task not in LOSSES:
        raise DataError(f"unknown data.task {task!r}; known tasks: {', '.join(LOSSES)}")
    if task in TEXT_TASKS and cfg_data.get("modality") != "text":
        raise DataError(f"data.task {task!r} is a text task; dataset {cfg_data.get('name')!r} is not text")
    return LOSSES[task]


def _check_classes(cfg_data: DictConfig, examples: Examples) -> None:
    declared = cfg_data.get("vocab_size" if cfg_data.get("modality") == "text" else "classes")
    if declared is not None and declared != examples.num_classes:
        raise DataError(
            f"dataset {cfg_data.name!r} has {examples.num_classes} classes, the data config declares {declared}"
        )


def _check_dtype(dtype) -> None:
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise CaseConfigError(
            "impl.dtype=double needs JAX's 64-bit mode: call jax.config.update('jax_enable_x64', True) "
            "before building the case (fedjax-users run does)"
        )


def _collated(held: Examples, inputs: np.ndarray, labels: np.ndarray, cfg_data: DictConfig, query: int,
              user_idx: int) -> tuple[np.ndarray, np.ndarray]:
    """A user's batch after the dataset's collate (masked-lm masking), drawn afresh for every query
    as breaching's collator masks every batch its dataloader yields, from the data seed."""
    if held.collate is None:
        return inputs, labels
    split = split_index(cfg_data.get("examples_from_split", "validation"))
    return held.collate(inputs, [int(cfg_data.get("seed", 0)), split, query, user_idx])


def _query_data(examples, cfg_data, user_cfg, impl, user_ids, partition_key, order_key, dtype, query=0,
                stream: bool = False) -> UserData | FunctionCohort:
    seeded = cfg_data.get("partition") == "random-full"
    shuffle = bool(impl.get("shuffle", False))

    def one_user(position: int) -> tuple[np.ndarray, np.ndarray]:
        u = user_ids[position]
        held = _held_examples(examples, cfg_data, u)
        indices = user_example_indices(
            examples, cfg_data, u, user_cfg.num_data_points,
            _user_seed(partition_key, u) if seeded else None,
            order_key=jax.random.fold_in(order_key, u) if shuffle else None,
            with_replacement=bool(impl.get("sample_with_replacement", False)),
        )
        return _collated(held, *_model_inputs(held, indices, cfg_data, dtype), cfg_data, query, u)

    if user_cfg.is_aggregate and stream:
        # Read when its chunk comes (fedjax_users.cohort): a cohort's examples are never all held.
        return FunctionCohort(len(user_ids), one_user)
    per_user = [one_user(position) for position in range(len(user_ids))]
    inputs = np.stack([x for x, _ in per_user])
    labels = np.stack([y for _, y in per_user])
    if not user_cfg.is_aggregate:
        inputs, labels = inputs[0], labels[0]
    return UserData(inputs=jnp.asarray(inputs), labels=jnp.asarray(labels))


def _server_payloads(cfg_case: DictConfig, cfg_server: DictConfig, model, one_input, init_key: jax.Array,
                     queries: int, examples, pretrained: bool, hugging_face: bool) -> tuple[list, dict]:
    """The server's payload of each query (breaching's ``model_state`` between queries), and the
    variables it started from (initialised, or its pretrained weights)."""
    init_jit = jax.jit(model.init)  # compiled once for every query that re-initialises

    def init(k):
        return init_jit(k, one_input)

    built = dict(init(init_key))
    model_name = str(cfg_case.model)
    if pretrained and hugging_face:
        built = huggingface.pretrained_variables(model_name, built)
    elif pretrained:
        built = case_server.pretrained_variables(cfg_server, built, examples.num_classes, model_name)
    state = cfg_server.get("model_state", "default")
    sends_buffers = bool(cfg_server.get("provide_public_buffers", True))
    payloads, previous = [], None
    for q in range(queries):
        previous = case_server.query_variables(state, built, previous, init, init_key, q)
        # A model without buffers still sends an (empty) set, as breaching's server sends an empty list.
        payloads.append(ServerPayload(
            params=previous["params"], batch_stats=previous.get("batch_stats", {}) if sends_buffers else None
        ))
    return payloads, built


def construct_users(cfg_case: DictConfig, key: Optional[jax.Array] = None, stream: bool = False) -> UsersCase:
    """Build the case's model, server payloads and users' data (module docstring).

    Args:
      cfg_case: the composed case (``load_case``).
      key: seeds the model's initialisation and any draws (users chosen, partitions, orders);
        ``None`` for ``jax.random.key(0)``.
      stream: an aggregate's users are a ``fedjax_users.cohort.FunctionCohort`` that reads each
        user's examples when ``fu.aggregate`` reaches its chunk, instead of every user's examples
        stacked in memory (the same numbers; memory then follows the chunk, not the cohort).

    Returns:
      The :class:`UsersCase`.

    Raises:
      DataError: anything the case's data, model or server refuse (``CaseConfigError`` for the
        config itself), in one line, before the model is built where it can be.
    """
    key = jax.random.key(0) if key is None else key
    init_key, choice_key, partition_key, order_key = jax.random.split(key, 4)
    cfg_data = _require(cfg_case, "data", "the case")
    user_block = _require(cfg_case, "user", "the case")
    for group in GROUPS:
        require_mapping(cfg_case, group, "the case")
    check_keys(cfg_case)
    cfg_server = cfg_case.get("server") or OmegaConf.create()
    impl = cfg_case.get("impl") or OmegaConf.create()
    case_server.check_server(cfg_server)
    queries = num_queries(cfg_case)
    dtype = case_dtype(cfg_case)
    _check_dtype(dtype)
    user_cfg = UserConfig.from_dict(OmegaConf.to_container(user_block, resolve=True))
    model_name = str(_require(cfg_case, "model", "the case"))
    # breaching's Hugging Face text models read ``pretrained`` too: their weights come from the hub cache.
    hugging_face = cfg_data.get("modality") == "text" and model_name not in models.names("text")
    pretrained = bool(cfg_server.get("pretrained", False)) and (hugging_face or case_server.reads_pretrained(
        model_name, str(cfg_data.get("like") or cfg_data.name), str(cfg_data.get("modality"))
    ))
    if pretrained and not hugging_face:
        case_server.weights_path(cfg_server, model_name)  # before reading any data
    # The data first: an offline text case says what is missing before what else it lacks.
    examples = load_examples(cfg_data)
    loss = _loss(cfg_data)
    _check_classes(cfg_data, examples)
    if pretrained and hugging_face:
        huggingface.weights_file(model_name)  # before building the model
    model = _build_model(cfg_case, cfg_data, examples, dtype)
    user_ids = _user_indices(user_cfg, cfg_data, choice_key)
    datas = [
        _query_data(examples, cfg_data, user_cfg, impl, user_ids, partition_key, jax.random.fold_in(order_key, q),
                    dtype, q, stream)
        for q in range(queries if impl.get("shuffle", False) or examples.collate is not None else 1)
    ]
    first = datas[0].first() if isinstance(datas[0], FunctionCohort) else datas[0]
    one_input = (first.inputs[0] if user_cfg.is_aggregate else first.inputs)[:1]
    payloads, built = _server_payloads(cfg_case, cfg_server, model, one_input, init_key, queries, examples,
                                       pretrained, hugging_face)
    sends_buffers = payloads[0].batch_stats is not None
    all_queries = tuple(Query(payload=p, data=datas[min(q, len(datas) - 1)]) for q, p in enumerate(payloads))
    user_state = None
    if not sends_buffers and built.get("batch_stats"):
        user_state = built["batch_stats"]
        if user_cfg.is_aggregate:
            user_state = jax.tree_util.tree_map(lambda s: jnp.broadcast_to(s, (len(user_ids),) + s.shape), user_state)
    return UsersCase(
        model=model,
        payload=payloads[0],
        data=datas[0],
        user_cfg=user_cfg,
        loss=loss,
        data_cfg=cfg_data,
        user_indices=user_ids,
        queries=all_queries,
        user_state=user_state,
        not_applicable=not_applicable(cfg_case),
        not_read=_unused_here(cfg_case, pretrained),
        pretrained=pretrained,
    )


def _unused_here(cfg_case: DictConfig, pretrained: bool) -> tuple[str, ...]:
    """Honoured keys that this particular case does not read (as breaching would not)."""
    unused = []
    server = cfg_case.get("server") or {}
    if server.get("pretrained", False) and not pretrained:
        unused.append("server.pretrained (breaching builds this model untrained)")
    if not (cfg_case.get("impl") or {}).get("shuffle", False) and "sample_with_replacement" in (cfg_case.get("impl") or {}):
        unused.append("impl.sample_with_replacement (without impl.shuffle)")
    return tuple(unused)
