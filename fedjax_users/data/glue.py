"""breaching's CoLA users from a local Hugging Face ``datasets`` cache: one sentence a user.

breaching builds ``cola`` (``cases/data/datasets_text.py``) as
``datasets.load_dataset("glue", "cola", cache_dir=data.path)[split][user_idx]``: user ``i`` holds
row ``i`` of the split (``training`` reads ``train``; ``validation`` and ``test`` their own), its
``label`` becomes ``labels``, and its ``sentence`` is tokenized for classification:
``tokenizer(sentence, padding="max_length", truncation=True)`` with ``model_max_length =
data.shape[0]``. Nothing is downloaded; the rows are read from the Arrow files ``datasets`` leaves in
``data.path``:

* ``<data.path>/glue/cola/<version>/<hash>/glue-<split>.arrow`` (``datasets`` before 2.14, which
  ran the ``glue`` script), or
* ``<data.path>/nyu-mll___glue/cola/<version>/<hash>/glue-<split>.arrow`` (later ``datasets``,
  where ``glue`` is the hub's ``nyu-mll/glue``), or
* ``glue-<split>.arrow`` in ``data.path`` itself, e.g. to choose one of several cached copies.

A split may be sharded (``glue-train-00000-of-00002.arrow``, ...): the shards are read in order.

The files are read with ``pyarrow`` alone, not through ``datasets``: ``pyarrow`` is what
``datasets`` reads them with (Arrow IPC streams, one per shard), so the rows and their order are
``datasets``' own (a freshly loaded split has no index mapping: row ``i`` of the files is
``dataset[split][i]``), without ``datasets``' dependencies (pandas, multiprocess, fsspec, ...) or
its hub resolution of the name ``glue``, which offline can miss a cache another ``datasets`` version
wrote. ``pyarrow`` (about 55 MB) is not a dependency of fedjax_users: it is imported when CoLA is
read, and its absence is one line naming ``pip install pyarrow``.

Only the token ids reach the users: breaching's tokenizer also returns ``attention_mask`` and
``token_type_ids``, which breaching's users pass to the model with the ids. The model that reads
them, the sequence classifier (``fedjax_users.models.bert.BertForSequenceClassification``),
rebuilds both from the ids: the mask is false exactly at the padding token, and a single
sentence's token types are zeros.

Example::

    >>> from fedjax_users.data import glue
    >>> glue.CACHE_FOLDERS
    ('glue', 'nyu-mll___glue')
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

import numpy as np

from fedjax_users.data.errors import DataError
from fedjax_users.data.examples import Examples
from fedjax_users.data.hf_tokenizer import TextTokenizer, load_tokenizer

CONFIG = "cola"
FILE_PREFIX = "glue"  # datasets names a split's files <dataset name>-<split>
CACHE_FOLDERS = ("glue", "nyu-mll___glue")  # the datasets cache's folder, older and newer naming
HF_SPLITS = {"training": "train", "validation": "validation", "test": "test"}  # breaching: training -> train
COLUMNS = ("sentence", "label")
OFFLINE = "nothing is downloaded"

__all__ = ["CACHE_FOLDERS", "HF_SPLITS", "classification_ids", "cola", "find_split_files", "read_rows"]


def _split_files(folder: str, split: str) -> list[str]:
    single = os.path.join(folder, f"{FILE_PREFIX}-{split}.arrow")
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(glob.escape(folder), f"{FILE_PREFIX}-{split}-[0-9]*-of-[0-9]*.arrow")))


def find_split_files(path: str, split: str) -> list[str]:
    """The Arrow files of CoLA's ``split`` under ``path``, shards in order.

    Args:
        path: ``data.path`` (breaching's ``cache_dir``), or the folder holding the Arrow files.
        split: breaching's split name (``training``, ``validation``, ``test``).

    Returns:
        The paths of ``glue-<split>.arrow`` (or its shards).

    Raises:
        DataError: no cached split (naming where it looked), or several cached copies (naming
            them: ``data.path`` can point at one).

    Example::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as root:
        ...     cached = os.path.join(root, "glue", "cola", "1.0.0", "abc")  # datasets' cache layout
        ...     os.makedirs(cached)
        ...     for shard in ("00000", "00001"):
        ...         open(os.path.join(cached, f"glue-train-{shard}-of-00002.arrow"), "w").close()
        ...     [os.path.basename(f) for f in find_split_files(root, "training")]
        ['glue-train-00000-of-00002.arrow', 'glue-train-00001-of-00002.arrow']
        >>> with tempfile.TemporaryDirectory() as root:
        ...     find_split_files(root, "training")
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: cola: no cached split 'train' under data.path=...
    """
    if split not in HF_SPLITS:
        raise DataError(f"unknown split {split!r} for cola; expected one of {', '.join(HF_SPLITS)}")
    hf_split, root = HF_SPLITS[split], os.path.expanduser(path)
    here = _split_files(root, hf_split)
    if here:
        return here
    patterns = [os.path.join(root, folder, CONFIG, "*", "*") for folder in CACHE_FOLDERS]
    copies = [folder for pattern in patterns for folder in sorted(glob.glob(pattern)) if _split_files(folder, hf_split)]
    if len(copies) > 1:
        raise DataError(f"cola: several cached copies of split {hf_split!r} ({', '.join(copies)}); set data.path to "
                        f"the one to read")
    if not copies:
        raise DataError(
            f"cola: no cached split {hf_split!r} under data.path={path} and {OFFLINE}: looked for "
            f"{FILE_PREFIX}-{hf_split}.arrow in {root} and in {' and '.join(patterns)} (the datasets cache "
            f"breaching's load_dataset('glue', 'cola', cache_dir=data.path) leaves)"
        )
    return _split_files(copies[0], hf_split)


def _pyarrow():
    if importlib.util.find_spec("pyarrow") is None:
        raise DataError("cola's datasets cache is read with the pyarrow package, which is not installed "
                        "(pip install pyarrow)")
    import pyarrow

    return pyarrow


def read_rows(files: list[str]) -> tuple[list[str], np.ndarray]:
    """The sentences and labels of CoLA's rows, in the order of the files and of their rows.

    Args:
        files: ``find_split_files``'s Arrow streams.

    Returns:
        ``(sentences, labels)``: the rows' ``sentence`` and ``label`` (int64; ``-1`` in GLUE's
        unlabelled ``test`` split).

    Raises:
        DataError: ``pyarrow`` missing, a file that is not an Arrow stream, or one without
            ``sentence`` and ``label`` columns.
    """
    pa = _pyarrow()
    sentences, labels = [], []
    for file in files:
        try:
            with pa.memory_map(file) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"cola: {file} is not a readable Arrow stream ({err})") from None
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"cola: {file} lacks the column(s) {', '.join(missing)} "
                            f"(has {', '.join(table.column_names)})")
        sentences += table.column("sentence").to_pylist()
        labels += table.column("label").to_pylist()
    return sentences, np.asarray(labels, dtype=np.int64)


def classification_ids(tokenizer: TextTokenizer, sentences: list[str], length: int) -> np.ndarray:
    """breaching's classification tokenization: ``[CLS] ... [SEP]`` padded or cut to ``length`` ids.

    Args:
        tokenizer: breaching's tokenizer (fedjax_users.data.hf_tokenizer).
        sentences: the texts.
        length: ``data.shape[0]`` (breaching's ``tokenizer.model_max_length``).

    Returns:
        int32 ``[len(sentences), length]``.
    """
    # breaching sets model_max_length = length and asks for padding="max_length", truncation=True:
    # passing max_length=length is the same call without changing the shared tokenizer.
    encoded = tokenizer.backend(list(sentences), padding="max_length", truncation=True, max_length=length)
    return np.asarray(encoded["input_ids"], dtype=np.int32).reshape(len(sentences), length)


def _length(cfg_data) -> int:
    shape = tuple(cfg_data.get("shape") or ())
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 2:
        raise DataError(f"data.shape must be [max_sequence_length] (at least 2: [CLS] and [SEP]) for cola, "
                        f"got {list(shape)}")
    return int(shape[0])


def cola(cfg_data, split: str, rows: Optional[tuple[list[str], np.ndarray]] = None):
    """breaching's ``cola`` ``split``: ``Examples`` whose user ``i`` (``given``) holds the split's row ``i``.

    Args:
        cfg_data: the case's data config (``path``, ``task: classification``, ``shape``, ``tokenizer``,
            ``vocab_size``).
        split: breaching's split name.
        rows: ``(sentences, labels)`` in place of reading the cache (tests hand rows in).

    Returns:
        ``Examples`` with ``given(user)`` one example: its token ids ``[1, data.shape[0]]`` and label.

    Raises:
        DataError: another task, the cache or the tokenizer missing (both named in one line), a
            user past the split's rows.

    Example (needs the cached split and tokenizer under ``data.path``)::

        cola(load_case("9_bert_training", ["data=cola"]).data, "training").given(0).stored  # int32 [1, 25]

    The task is checked before anything is read::

        >>> from omegaconf import OmegaConf
        >>> cola(OmegaConf.create({"task": "masked-lm"}), "training")
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: data cola is a classification dataset (...), got data.task='masked-lm'
    """

    if cfg_data.get("task") != "classification":
        raise DataError(f"data cola is a classification dataset (breaching tokenizes it only so), got data.task="
                        f"{cfg_data.get('task')!r}")
    length = _length(cfg_data)
    path = str(cfg_data.get("path") or "~/data")
    problems, files, tokenizer = [], None, None
    # Both are looked for before either is read, so one line says everything that is missing.
    if rows is None:
        try:
            files = find_split_files(path, split)
            _pyarrow()
        except DataError as err:
            problems.append(str(err))
    try:
        tokenizer = load_tokenizer(cfg_data.get("tokenizer"), cfg_data.get("vocab_size"), os.path.expanduser(path))
    except DataError as err:
        problems.append(str(err))
    if problems:
        raise DataError(f"data cola (tokenizer {cfg_data.get('tokenizer')}): {'; '.join(problems)}")
    sentences, labels = rows if rows is not None else read_rows(files)

    def given(user_idx: int) -> Examples:
        if not 0 <= user_idx < len(sentences):
            raise DataError(f"cola user {user_idx} does not exist: split {HF_SPLITS[split]!r} has "
                            f"{len(sentences)} rows")
        ids = classification_ids(tokenizer, [sentences[user_idx]], length)
        return Examples(stored=ids, labels=labels[user_idx : user_idx + 1], num_classes=tokenizer.vocab_size)

    empty = np.zeros((0, length), np.int32)
    return Examples(stored=empty, labels=np.zeros(0, np.int64), num_classes=tokenizer.vocab_size, given=given)
