"""breaching's wikitext users from a local copy: articles as users, tokenized into blocks.

breaching builds ``wikitext`` (``cases/data/datasets_text.py``) as
``datasets.load_dataset("wikitext", "wikitext-103-v1", cache_dir=data.path, split=...)``, keeps one
article's lines per user (``_split_wikipedia_into_articles``, user ``i`` = the ``i + 1``-th
article heading), tokenizes them (``fedjax_users.data.hf_tokenizer``), concatenates them into
blocks of ``data.shape[0]`` tokens (``group_texts``), labels causal-lm blocks with their own ids
and masked-lm batches with its collator (``fedjax_users.data.masking``), and keeps a user's first
``data.size`` blocks. Nothing is downloaded; the corpus is read from either

* the raw files of the wikitext-103-v1 archive, ``wiki.train.tokens`` / ``wiki.valid.tokens`` /
  ``wiki.test.tokens``, in ``data.path/wikitext-103/`` or in ``data.path`` itself: the lines
  Hugging Face's wikitext builder turns into examples (each line with its newline, a blank line
  as ``""``); no extra package is needed; or
* the ``datasets`` cache that breaching's ``load_dataset(..., cache_dir=data.path)`` leaves
  (``data.path/wikitext/wikitext-103-v1/`` or ``data.path/Salesforce___wikitext/...``), read by
  the ``datasets`` package with the hub switched off.

The pure steps (``line_articles``, ``group_blocks``) are checked against breaching's own functions.
``given_text`` is the part every causal/masked-lm dataset shares once a user's texts are found
(tokenizer, blocks, ``data.size``, masked-lm collator): wikitext's articles here, TensorFlow
Federated's Shakespeare and StackOverflow clients in fedjax_users.data.tff.

Example::

    >>> from fedjax_users.data import text
    >>> lines = [" = Valkyria = \\n", "", " Senjou no Valkyria 3 is a tactical role playing game .\\n"]
    >>> text.line_articles(lines).tolist()  # the third line is user 0's (article 1)
    [0, 0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from itertools import chain
from typing import Callable, Optional, Sequence

import numpy as np

from fedjax_users.data.errors import DataError
from fedjax_users.data.examples import Examples
from fedjax_users.data.hf_tokenizer import TextTokenizer, load_tokenizer
from fedjax_users.data.masking import collate_fn, masked_lm

CONFIG = "wikitext-103-v1"
RAW_FOLDER = "wikitext-103"  # the folder inside the wikitext-103-v1 archive
RAW_FILES = {"training": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HF_SPLITS = {"training": "train", "validation": "validation", "test": "test"}  # breaching: training -> train
DATASETS_FOLDERS = ("wikitext", "Salesforce___wikitext")  # the datasets cache's folder, older and newer naming
MIN_LENGTH = 25  # breaching's min_length for a kept line
MAX_HEADING = 100  # breaching counts a line as an article heading below this length
MAP_BATCH = 1000  # datasets' Dataset.map batch size: breaching tokenizes and groups this many lines at a time
TASKS = ("causal-lm", "masked-lm")
OFFLINE = "data=random_tokens runs this case offline"

__all__ = [
    "Corpus",
    "find_corpus",
    "given_text",
    "group_blocks",
    "line_articles",
    "read_raw_lines",
    "text_blocks",
    "wikitext",
]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Where a wikitext split is read.

    Attributes:
      kind: ``"raw"`` (a ``wiki.*.tokens`` file) or ``"datasets"`` (a ``datasets`` cache).
      location: the file, or the cache's ``cache_dir``.
    """

    kind: str
    location: str


# ---------------------------------------------------------------------------------------------
# The corpus


def find_corpus(path: str, split: str) -> Corpus:
    """The local copy of a wikitext-103-v1 split (module docstring).

    Args:
      path: ``data.path``.
      split: ``training``, ``validation`` or ``test``.

    Returns:
      The raw file when the archive's files are there (in ``path/wikitext-103/`` or ``path``),
      else the ``datasets`` cache.

    Raises:
      DataError: neither is there (naming where it looked), the raw folder lacks the split, or
        the cache is there without the ``datasets`` package.

    Example::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     os.makedirs(os.path.join(root, "wikitext-103"))
        ...     open(os.path.join(root, "wikitext-103", "wiki.valid.tokens"), "w").close()
        ...     corpus = find_corpus(root, "validation")
        ...     where = os.path.relpath(corpus.location, root)
        >>> corpus.kind, where
        ('raw', 'wikitext-103/wiki.valid.tokens')
    """
    if split not in RAW_FILES:
        raise DataError(f"unknown wikitext split {split!r}; expected one of {', '.join(RAW_FILES)}")
    for folder in (os.path.join(path, RAW_FOLDER), path):
        if any(os.path.isfile(os.path.join(folder, f)) for f in RAW_FILES.values()):
            file = os.path.join(folder, RAW_FILES[split])
            if not os.path.isfile(file):
                raise DataError(f"the raw wikitext folder {folder} lacks {RAW_FILES[split]} (split {split})")
            return Corpus("raw", file)
    for name in DATASETS_FOLDERS:
        cache = os.path.join(path, name, CONFIG)
        if os.path.isdir(cache):
            if importlib.util.find_spec("datasets") is None:
                raise DataError(
                    f"the datasets cache {cache} is read with the datasets package, which is not installed "
                    f"(pip install datasets, or put the raw files in {os.path.join(path, RAW_FOLDER)})"
                )
            return Corpus("datasets", path)
    raise DataError(
        f"no wikitext-103-v1 corpus under data.path={path} and nothing is downloaded: neither the raw "
        f"{RAW_FILES[split]} (in {os.path.join(path, RAW_FOLDER)} or {path}) nor a datasets cache "
        f"({os.path.join(path, DATASETS_FOLDERS[0], CONFIG)})"
    )


def read_raw_lines(file: str) -> list[str]:
    """The examples Hugging Face's wikitext builder makes of a raw ``wiki.*.tokens`` file.

    Args:
      file: the raw file.

    Returns:
      Every line with its newline, blank ones as ``""``.

    Example::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with open(os.path.join(folder, "wiki.valid.tokens"), "w") as handle:
        ...         _ = handle.write(" = Valkyria = \\n \\n A line .\\n")
        ...     read_raw_lines(os.path.join(folder, "wiki.valid.tokens"))
        [' = Valkyria = \\n', '', ' A line .\\n']
    """
    with open(file, encoding="utf-8") as handle:
        return [line if line.strip() else "" for line in handle]


def _datasets_lines(cache_dir: str, split: str) -> list[str]:
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE
    # Offline for this call only: the cached copy is read and no hub request is made.
    datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = True, True
    try:
        dataset = datasets.load_dataset("wikitext", CONFIG, cache_dir=cache_dir, split=HF_SPLITS[split])
        return list(dataset["text"])
    except Exception as err:  # an incomplete cache fails inside datasets in many ways
        raise DataError(
            f"the datasets cache under {cache_dir} could not be read offline: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]}"
        ) from None
    finally:
        datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _corpus_lines(corpus: Corpus, split: str) -> list[str]:
    """The split's lines (breaching's ``raw_dataset["text"]``)."""
    return read_raw_lines(corpus.location) if corpus.kind == "raw" else _datasets_lines(corpus.location, split)


# ---------------------------------------------------------------------------------------------
# breaching's preprocessing, as pure functions


def line_articles(lines: Sequence[str], min_length: int = MIN_LENGTH) -> np.ndarray:
    """Which user each line belongs to under breaching's article split.

    As ``_split_wikipedia_into_articles``: a line with ``" = "`` and no ``" ; "`` (a table header)
    is a heading, never data, and counts as the next article if it has exactly two ``=`` and is
    shorter than ``MAX_HEADING``; other lines shorter than ``min_length`` are dropped; every other
    line belongs to the article counted last (none before the first heading).

    Args:
      lines: the split's lines, in corpus order.
      min_length: the shortest line kept (breaching's ``min_length``).

    Returns:
      int64 ``[len(lines)]``: ``1 +`` the index of the user whose data the line is, else 0.

    Example::

        >>> lines = [" = First = \\n", " = = Section = = \\n", " A line of the first article, kept .\\n", " short\\n",
        ...          " = Second = \\n", " A line of the second article, kept .\\n"]
        >>> line_articles(lines).tolist()
        [0, 0, 1, 0, 0, 2]
    """
    owners = np.zeros(len(lines), dtype=np.int64)
    article = 0
    for index, line in enumerate(lines):
        if " = " in line and " ; " not in line:
            if line.count("=") == 2 and len(line) < MAX_HEADING:
                article += 1
        elif len(line) >= min_length:
            owners[index] = article
    return owners


def group_blocks(token_lists: Sequence[Sequence[int]], block_size: int, batch: int = MAP_BATCH) -> list[list[int]]:
    """breaching's ``group_texts`` over consecutive batches of ``batch`` tokenized lines.

    Each batch is concatenated and cut into blocks of ``block_size``, its remainder dropped; a
    batch with fewer than ``block_size`` tokens is one shorter block.

    Args:
      token_lists: the tokenized lines, in order.
      block_size: tokens per block (``data.shape[0]``).
      batch: lines grouped at a time (``datasets``' ``Dataset.map`` batch size, as breaching's).

    Returns:
      The blocks, each a list of ids.

    Example::

        >>> group_blocks([[1, 2, 3], [4, 5], [6]], block_size=2)
        [[1, 2], [3, 4], [5, 6]]
        >>> group_blocks([[1, 2, 3], [4, 5], [6]], block_size=2, batch=2)  # [6] alone is a shorter block
        [[1, 2], [3, 4], [6]]
    """
    blocks = []
    for start in range(0, len(token_lists), batch):
        tokens = list(chain(*token_lists[start : start + batch]))
        total = len(tokens) // block_size * block_size if len(tokens) >= block_size else len(tokens)
        blocks += [tokens[i : i + block_size] for i in range(0, total, block_size)]
    return blocks


def _article_texts(lines: Sequence[str], owners: np.ndarray, user_idx: int) -> list[str]:
    """User ``user_idx``'s lines under breaching's article split (``line_articles``), in corpus order."""
    mine = [lines[i] for i in np.flatnonzero(owners == user_idx + 1)]
    if not mine:
        raise DataError(
            f"wikitext user {user_idx} does not exist or has no data: the split has {int(owners.max(initial=0))} "
            f"articles with lines of at least {MIN_LENGTH} characters"
        )
    return mine


def text_blocks(texts: Sequence[str], tokenizer: TextTokenizer, block_size: int, size: Optional[int] = None,
                who: str = "this user") -> np.ndarray:
    """One user's texts as breaching's causal/masked-lm preprocessing leaves them: its first ``size`` token blocks.

    Args:
        texts: the user's texts in order (wikitext's article lines, a TFF client's examples).
        tokenizer: breaching's tokenizer (fedjax_users.data.hf_tokenizer).
        block_size: ``data.shape[0]``.
        size: ``data.size``, breaching's cut of the user's blocks; ``None`` keeps them all.
        who: how errors name the user, e.g. ``"wikitext user 3"``.

    Returns:
        int32 ``[N, block_size]``: ``group_blocks`` of the tokenized texts, cut to ``size``.

    Raises:
        DataError: a block is shorter than ``block_size`` (breaching would hand its model a
            shorter sequence there).

    Example::

        >>> class Chars:  # a stand-in tokenizer: one id per character
        ...     def encode(self, texts):
        ...         return [[ord(c) for c in t] for t in texts]
        >>> text_blocks(["abcd", "efg"], Chars(), block_size=3).tolist()
        [[97, 98, 99], [100, 101, 102]]
    """
    blocks = group_blocks(tokenizer.encode(list(texts)), block_size)
    if size is not None:
        blocks = blocks[:size]
    short = [len(b) for b in blocks if len(b) != block_size]
    if short:
        # breaching would hand its model a shorter sequence here (or fail to batch it with full ones).
        raise DataError(
            f"{who} has a block of {short[0]} tokens, fewer than data.shape[0]={block_size}; "
            f"choose another user or a shorter data.shape"
        )
    return np.asarray(blocks, dtype=np.int32).reshape(len(blocks), block_size)


# ---------------------------------------------------------------------------------------------
# The data source


def _block_size(cfg_data, dataset: str) -> int:
    shape = tuple(cfg_data.get("shape") or ())
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise DataError(f"data.shape must be [sequence_length] for {dataset}, got {list(shape)}")
    return int(shape[0])


def given_text(cfg_data, dataset: str, locate: Callable[[], Callable[[int], Sequence[str]]]):
    """``Examples`` whose users (``given``) are a text dataset's own users, tokenized into blocks as breaching.

    The steps breaching's ``_build_and_split_dataset_text`` takes for every causal/masked-lm text
    dataset once it has a user's texts: its tokenizer, ``group_texts`` (``text_blocks``), the
    ``data.size`` cut, the masked-lm collator. Where the texts are is ``locate``'s business.

    Args:
        cfg_data: the case's data config (``task``, ``shape``, ``path``, ``tokenizer``, ``vocab_size``, ``size``).
        dataset: the dataset's name, for messages.
        locate: finds the dataset's files (``DataError`` naming where it looked if they are not
            there) and returns user index -> that user's texts; called once, before any user.

    Returns:
        ``Examples`` with no examples of its own and ``given(user)`` the user's blocks (labels:
        the ids, as breaching's ``group_texts`` sets them for causal-lm).

    Raises:
        DataError: an unknown task or shape; the files or the cached tokenizer missing (both
            named in one line); a vocabulary other than ``data.vocab_size``.

    Example (reading a user's blocks needs a cached tokenizer under ``data.path``)::

        examples = given_text(cfg_data, "wikitext", lambda: lambda user: ["a line of the user"])
        examples.given(0).stored  # int32 [blocks, data.shape[0]]

    The checks come first, before anything is read::

        >>> from omegaconf import OmegaConf
        >>> given_text(OmegaConf.create({"task": "classification"}), "wikitext", locate=lambda: None)
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: data wikitext supports data.task causal-lm or masked-lm, got ...
    """

    task = cfg_data.get("task")
    if task not in TASKS:
        raise DataError(f"data {dataset} supports data.task {' or '.join(TASKS)}, got {task!r}")
    block_size = _block_size(cfg_data, dataset)
    path = os.path.expanduser(str(cfg_data.get("path") or "~/data"))
    problems, texts_of, tokenizer = [], None, None
    # Both are looked for before either is read, so one line says everything that is missing.
    try:
        texts_of = locate()
    except DataError as err:
        problems.append(str(err))
    try:
        tokenizer = load_tokenizer(cfg_data.get("tokenizer"), cfg_data.get("vocab_size"), path)
    except DataError as err:
        problems.append(str(err))
    if problems:
        raise DataError(f"data {dataset} (tokenizer {cfg_data.get('tokenizer')}): {'; '.join(problems)}; {OFFLINE}")
    collate = None
    if task == "masked-lm":
        collate = collate_fn(masked_lm(cfg_data, tokenizer.mask_token_id, tokenizer.num_tokens,
                                     tokenizer.special_ids, tokenizer.pad_token_id))
    size = cfg_data.get("size")

    @functools.lru_cache(maxsize=None)
    def given(user_idx: int) -> Examples:
        blocks = text_blocks(texts_of(user_idx), tokenizer, block_size, size, f"{dataset} user {user_idx}")
        return Examples(stored=blocks, labels=blocks.copy(), num_classes=tokenizer.vocab_size, collate=collate)

    empty = np.zeros((0, block_size), np.int32)
    return Examples(stored=empty, labels=empty, num_classes=tokenizer.vocab_size, given=given, collate=collate)


def wikitext(cfg_data, split: str):
    """breaching's wikitext ``split``: ``Examples`` whose users (``given``) are the articles (module docstring).

    Args:
        cfg_data: the case's data config (``name: wikitext``).
        split: ``training``, ``validation`` or ``test``.

    Returns:
        ``Examples`` with ``given(user)`` the ``user + 1``-th article's blocks.

    Raises:
      DataError: as ``given_text``; the corpus is read when the first user is asked for.

    Example (needs the corpus and a cached tokenizer under ``data.path``)::

        wikitext(cfg.data, "training").given(0).stored  # int32 [blocks, data.shape[0]]
    """
    path = os.path.expanduser(str(cfg_data.get("path") or "~/data"))

    def locate() -> Callable[[int], list[str]]:
        corpus = find_corpus(path, split)

        # The corpus is read when the first user asks for its lines: after the tokenizer is found.
        @functools.lru_cache(maxsize=None)
        def corpus_and_owners() -> tuple[list[str], np.ndarray]:
            lines = _corpus_lines(corpus, split)
            return lines, line_articles(lines)

        return lambda user_idx: _article_texts(*corpus_and_owners(), user_idx)

    return given_text(cfg_data, "wikitext", locate)
