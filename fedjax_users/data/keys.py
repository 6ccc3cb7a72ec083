"""Which keys of a composed case change what is computed, and which only concern torch or breaching.

Every key of a case is in exactly one of two lists: ``HONOURED`` (read by the run: it changes the
users' data, the model, what the server sends or what the users compute) or ``NOT_APPLICABLE``
(breaching's data-loader, cuDNN, checkpointing or logging machinery: nothing a user computes
depends on it). ``check_keys`` refuses any other key, so none that matters is ever dropped
silently; ``not_applicable`` lists those present, for the run summary. ``user.*`` is checked by
``UserConfig.from_dict`` (every breaching user key is honoured). docs/cases.md has both lists.

Example::

    >>> from omegaconf import OmegaConf
    >>> from fedjax_users.data import keys
    >>> case = OmegaConf.create({"model": "lenet_zhu", "impl": {"dtype": "float", "benchmark": True},
    ...                          "data": {"name": "digits", "batch_size": 128}})
    >>> keys.check_keys(case)  # every key is known
    >>> keys.not_applicable(case)
    ('impl.benchmark', 'data.batch_size')
"""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig

from fedjax_users.data.errors import CaseConfigError

__all__ = ["HONOURED", "NOT_APPLICABLE", "check_keys", "not_applicable", "num_queries"]

HONOURED: Mapping[str, frozenset[str]] = {
    "": frozenset({"name", "model", "num_queries", "data", "impl", "server", "user"}),
    "impl": frozenset({"dtype", "shuffle", "sample_with_replacement"}),
    "server": frozenset({"name", "pretrained", "model_state", "provide_public_buffers", "num_queries", "weights"}),
    "data": frozenset({
        "name", "modality", "task", "path", "size", "classes", "shape", "normalize", "mean", "std",
        "augmentations_val", "default_clients", "partition", "examples_from_split", "mixup_freq",
        "num_data_points", "target_label", "seed", "vocab_size", "tokenizer", "mlm_probability",
        "disable_mlm", "inherit", "like",
    }),
}

NOT_APPLICABLE: Mapping[str, frozenset[str]] = {
    "impl": frozenset({
        "non_blocking", "sharing_strategy", "benchmark", "deterministic", "pin_memory", "threads",
        "persistent_workers", "mixed_precision", "grad_scaling", "JIT", "validate_every_nth_step",
        "checkpoint", "enable_huggingface_offline_mode",
    }),
    # The honest server never reads it (only the malicious servers train on external data).
    "server": frozenset({"has_external_data"}),
    # breaching applies augmentations_train to no split (it tests split == "train", and its splits
    # are named "training" / "validation"); batch_size, caching and db only batch or store.
    "data": frozenset({"augmentations_train", "batch_size", "caching", "db"}),
}


def _keys(cfg: Any) -> list[str]:
    return [str(k) for k in cfg] if isinstance(cfg, (DictConfig, Mapping)) else []


def check_keys(cfg_case: DictConfig) -> None:
    """Raise ``CaseConfigError`` for a key neither honoured nor known to be not applicable.

    Args:
      cfg_case: the composed case (its top level, ``impl``, ``server`` and ``data``; ``user`` is
        checked by ``UserConfig.from_dict``).

    Raises:
      CaseConfigError: the first unknown key, dotted.

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_keys(OmegaConf.create({"data": {"nme": "digits"}}))
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.CaseConfigError: unknown case key 'data.nme': it is neither read by fedjax-users ...
    """
    for block in ("", "impl", "server", "data"):
        section = cfg_case if block == "" else cfg_case.get(block)
        known = HONOURED[block] | NOT_APPLICABLE.get(block, frozenset())
        for key in _keys(section):
            if key not in known:
                name = f"{block}.{key}" if block else key
                raise CaseConfigError(
                    f"unknown case key {name!r}: it is neither read by fedjax-users nor known to be "
                    f"torch/breaching machinery only (docs/cases.md lists both)"
                )


def not_applicable(cfg_case: DictConfig) -> tuple[str, ...]:
    """The case's keys that only concern torch or breaching's machinery (for the run summary).

    Args:
      cfg_case: the composed case.

    Returns:
      Those keys, dotted (``impl.benchmark``), block by block.

    Example::

        >>> from omegaconf import OmegaConf
        >>> not_applicable(OmegaConf.create({"server": {"has_external_data": False}}))
        ('server.has_external_data',)
    """
    found = []
    for block, keys in NOT_APPLICABLE.items():
        section = cfg_case.get(block)
        found += [f"{block}.{key}" for key in _keys(section) if key in keys]
    return tuple(found)


def num_queries(cfg_case: DictConfig) -> int:
    """The number of queries: breaching's server reads ``server.num_queries``.

    breaching's case files also set a top-level ``num_queries`` that nothing reads; when both are
    given and differ the case is ambiguous and refused rather than one silently winning.

    Args:
      cfg_case: the composed case.

    Returns:
      ``server.num_queries``, else the top-level ``num_queries``, else 1.

    Raises:
      CaseConfigError: both given and different, or not a positive integer.

    Example::

        >>> from omegaconf import OmegaConf
        >>> num_queries(OmegaConf.create({"num_queries": 2, "server": {"num_queries": 2}}))
        2
    """
    server = cfg_case.get("server") or {}
    queries = server.get("num_queries", cfg_case.get("num_queries", 1))
    top = cfg_case.get("num_queries")
    if top is not None and "num_queries" in server and top != server.num_queries:
        raise CaseConfigError(
            f"num_queries={top} but server.num_queries={server.num_queries}: breaching reads "
            f"server.num_queries; set both to the same value"
        )
    if not isinstance(queries, int) or isinstance(queries, bool) or queries < 1:
        raise CaseConfigError(f"server.num_queries must be a positive integer, got {queries!r}")
    return queries

