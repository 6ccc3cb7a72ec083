"""breaching's masked-lm batches: ``DataCollatorForLanguageModeling`` as a seeded NumPy function.

breaching collates every masked-lm batch a user takes with ``transformers``'
``DataCollatorForLanguageModeling(tokenizer, mlm=not data.disable_mlm,
mlm_probability=data.mlm_probability)``. With ``mlm`` each token that is not special is selected
with probability ``mlm_probability``; a selected token becomes the mask token with probability
``MASK_REPLACE``, else a uniform random id below ``len(tokenizer)`` with probability
``RANDOM_REPLACE / (1 - MASK_REPLACE)``, else stays; labels are the original ids where selected
and ``IGNORE`` elsewhere. Without ``mlm`` the inputs stay and the labels are the ids, ``IGNORE``
at pad tokens.

The distribution is the collator's; the draws are not: torch's generator is not reproduced.
Draws come from NumPy's generator seeded by the caller (fedjax_users: the data seed, split, query
and user), so a rerun gives the same masks.

Example::

    >>> import numpy as np
    >>> from omegaconf import OmegaConf
    >>> from fedjax_users.data import masking
    >>> spec = masking.masked_lm(OmegaConf.create({"mlm_probability": 0.5}), mask_token_id=9, num_tokens=10,
    ...                          special_ids=(0,))
    >>> inputs, labels = masking.mask_tokens(np.array([[0, 3, 4, 5, 6, 7]]), spec, seed=[0])
    >>> inputs.tolist(), labels.tolist()  # 3, 4 masked and 5 kept: all three labelled; 0 is special
    ([[0, 9, 9, 4, 6, 7]], [[-100, 3, 4, 5, -100, -100]])
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from fedjax_users.data.errors import DataError
from fedjax_users.losses import IGNORE_INDEX

__all__ = ["IGNORE", "MASK_REPLACE", "RANDOM_REPLACE", "MaskedLM", "collate_fn", "mask_tokens", "masked_lm"]

# torch's CrossEntropyLoss ignore_index, the label losses.masked_lm_loss skips: one value for both sides.
IGNORE = IGNORE_INDEX
MASK_REPLACE = 0.8  # the collator's mask_replace_prob
RANDOM_REPLACE = 0.1  # the collator's random_replace_prob


@dataclasses.dataclass(frozen=True)
class MaskedLM:
    """What the collator reads: its tokenizer's ids and the data config's ``mlm_probability`` / ``disable_mlm``.

    Attributes:
      mask_token_id: the tokenizer's mask token (``None`` only without ``mlm``).
      num_tokens: ``len(tokenizer)``: random replacements are drawn below it.
      special_ids: ids never selected for masking.
      pad_token_id: the pad token, ignored in the labels without ``mlm``.
      mlm_probability: the chance that a token is selected.
      mlm: mask (breaching's ``not data.disable_mlm``); else the labels are the ids.
    """

    mask_token_id: Optional[int]
    num_tokens: int
    special_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    mlm_probability: float = 0.15
    mlm: bool = True


def masked_lm(cfg_data, mask_token_id: Optional[int], num_tokens: int, special_ids: Sequence[int] = (),
              pad_token_id: Optional[int] = None) -> MaskedLM:
    """The collator settings of a data config, checked as breaching's collator checks them.

    Args:
      cfg_data: the data config (``mlm_probability``, ``disable_mlm``, ``tokenizer`` for messages).
      mask_token_id: the tokenizer's mask token, or ``None`` if it has none.
      num_tokens: ``len(tokenizer)``.
      special_ids: the tokenizer's special ids.
      pad_token_id: its pad token.

    Returns:
      The :class:`MaskedLM`.

    Raises:
      DataError: ``mlm_probability`` outside [0, 1], or masking without a mask token.

    Example::

        >>> from omegaconf import OmegaConf
        >>> masked_lm(OmegaConf.create({"disable_mlm": True}), mask_token_id=None, num_tokens=10).mlm
        False
    """
    probability = cfg_data.get("mlm_probability", 0.15)
    mlm = not bool(cfg_data.get("disable_mlm", False))
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise DataError(f"data.mlm_probability must be a number in [0, 1], got {probability!r}")
    if mlm and mask_token_id is None:
        raise DataError(
            f"data.task=masked-lm: tokenizer {cfg_data.get('tokenizer')!r} has no mask token, which masked "
            f"language modelling needs (breaching's collator refuses it too; data.disable_mlm=True skips masking)"
        )
    return MaskedLM(
        mask_token_id=mask_token_id, num_tokens=int(num_tokens), special_ids=tuple(int(i) for i in special_ids),
        pad_token_id=pad_token_id, mlm_probability=float(probability), mlm=mlm,
    )


def mask_tokens(ids: np.ndarray, spec: MaskedLM, seed: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of one collated batch of token ids (module docstring).

    Args:
      ids: token ids, any shape.
      spec: the collator's settings.
      seed: NumPy's seed for the draws (fedjax_users: data seed, split, query, user).

    Returns:
      ``(inputs, labels)``, shaped and typed as ``ids``; labels ``IGNORE`` where not predicted.

    Example::

        >>> import numpy as np
        >>> no_masking = MaskedLM(mask_token_id=None, num_tokens=10, pad_token_id=1, mlm=False)
        >>> [a.tolist() for a in mask_tokens(np.array([[3, 1, 1]]), no_masking, seed=[0])]
        [[[3, 1, 1]], [[3, -100, -100]]]
    """
    ids = np.asarray(ids)
    if not spec.mlm:
        labels = ids.copy()
        if spec.pad_token_id is not None:
            labels[ids == spec.pad_token_id] = IGNORE
        return ids.copy(), labels
    rng = np.random.default_rng(list(seed))
    # The collator's order of draws: selection, mask replacement, random replacement, random words.
    selected = (rng.random(ids.shape) < spec.mlm_probability) & ~np.isin(ids, spec.special_ids)
    replaced = (rng.random(ids.shape) < MASK_REPLACE) & selected
    randomised = (rng.random(ids.shape) < RANDOM_REPLACE / (1 - MASK_REPLACE)) & selected & ~replaced
    words = rng.integers(0, spec.num_tokens, size=ids.shape).astype(ids.dtype)
    inputs = np.where(replaced, np.asarray(spec.mask_token_id, ids.dtype), np.where(randomised, words, ids))
    labels = np.where(selected, ids, np.asarray(IGNORE, ids.dtype))
    return inputs, labels


def collate_fn(spec: MaskedLM) -> Callable[[np.ndarray, Sequence[int]], tuple[np.ndarray, np.ndarray]]:
    """``Examples.collate`` for ``spec``.

    Args:
      spec: the collator's settings.

    Returns:
      ``(ids, seed) -> (inputs, labels)``: ``mask_tokens`` with ``spec``.

    Example::

        >>> import numpy as np
        >>> collate = collate_fn(MaskedLM(mask_token_id=9, num_tokens=10, mlm_probability=1.0))
        >>> inputs, labels = collate(np.array([[3, 4, 5]]), [0])
        >>> labels.tolist()  # every token selected, so every one is predicted
        [[3, 4, 5]]
    """
    return lambda ids, seed: mask_tokens(ids, spec, seed)
