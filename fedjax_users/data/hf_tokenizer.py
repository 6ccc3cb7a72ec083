"""breaching's text tokenizers, read from a local Hugging Face hub cache (nothing is downloaded).

breaching's ``_get_tokenizer`` (``cases/data/datasets_text.py``) maps its tokenizer names to
Hugging Face repositories, loads ``AutoTokenizer.from_pretrained(repo, cache_dir=data.path)``,
adds the pad token ``[PAD]`` and refuses a tokenizer whose base vocabulary (``vocab_size``,
without added tokens) is not ``data.vocab_size``. Here the same ``AutoTokenizer`` of
``transformers`` reads the repository's snapshot folder in the hub cache layout
(``models--<owner>--<name>/snapshots/<revision>/``, the revision ``refs/main`` names, else the
newest snapshot), looked for under ``data.path`` first (breaching's ``cache_dir``) and then in
the caches ``transformers`` itself reads (``fedjax_users.models.huggingface.cache_dirs``). Loading
the folder, rather than the repository name, means no hub lookup can ever be made.

Special tokens, the mask token and the added ``[PAD]`` are therefore exactly breaching's: they come
from the same class with the same files. breaching's ``word-level`` tokenizer is read from the file
breaching caches (``<data.path>/cache/word-tokenizer_<vocab_size>.json``) when it exists;
generating it, and breaching's ``character`` tokenizer (``google/canine-c``, a Python tokenizer
without a ``tokenizer.json``), are refused with one line.

Example::

    >>> from fedjax_users.data import hf_tokenizer
    >>> hf_tokenizer.repo_id("GPT-2"), hf_tokenizer.repo_id("bert"), hf_tokenizer.repo_id("roberta-base")
    ('gpt2', 'bert-base-uncased', 'roberta-base')
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional, Sequence

from fedjax_users.data.errors import DataError
from fedjax_users.models import huggingface
from fedjax_users.models.huggingface import cache_dirs

__all__ = ["REPOS", "TextTokenizer", "find_snapshot", "load_tokenizer", "repo_id"]

# breaching's own names and the repositories its ``_get_tokenizer`` loads; any other name is a repository.
REPOS = {"bert": "bert-base-uncased", "GPT-2": "gpt2", "eleutherAI-GPT": "EleutherAI/gpt-neo-2.7B"}
WORD_LEVEL = "word-level"
UNSUPPORTED = {
    "character": "breaching's character tokenizer (CanineTokenizer of google/canine-c) is not read here",
}
PAD_TOKEN = "[PAD]"  # breaching: tokenizer.add_special_tokens({"pad_token": "[PAD]"})
# A snapshot holding none of these has no tokenizer (a download of the model config alone, say).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


@dataclasses.dataclass(frozen=True, eq=False)
class TextTokenizer:
    """A tokenizer as breaching's ``_get_tokenizer`` leaves it (``[PAD]`` added), and where it was read.

    Attributes:
      name: breaching's tokenizer name (``data.tokenizer``).
      source: the snapshot folder or file it was read from.
      backend: the ``transformers`` tokenizer.
      vocab_size: breaching's ``tokenizer.vocab_size`` (added tokens excluded).
      num_tokens: ``len(tokenizer)``, every id it can produce (breaching's masked-lm collator
        draws its random replacements below it).
      special_ids: the ids its masked-lm collator never selects.
      mask_token_id: its mask token, or ``None``.
      pad_token_id: its pad token (``[PAD]``, added as breaching adds it).
    """

    name: str
    source: str
    backend: Any
    vocab_size: int
    num_tokens: int
    special_ids: tuple[int, ...]
    mask_token_id: Optional[int]
    pad_token_id: int

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included (breaching's ``tokenizer(examples["text"])``).

        Args:
          texts: the texts.

        Returns:
          One list of ids per text.
        """
        if not texts:
            return []
        return [list(ids) for ids in self.backend(list(texts))["input_ids"]]


def repo_id(name: str) -> str:
    """The Hugging Face repository breaching loads for a tokenizer name.

    Args:
      name: ``data.tokenizer``: one of breaching's names (``REPOS``) or a repository.

    Returns:
      The repository (``name`` itself when it is not one of breaching's).

    Example::

        >>> repo_id("eleutherAI-GPT")
        'EleutherAI/gpt-neo-2.7B'
    """
    return REPOS.get(name, name)


def _has_tokenizer(snapshot: str) -> bool:
    return any(os.path.isfile(os.path.join(snapshot, f)) for f in TOKENIZER_FILES)


def find_snapshot(repo: str, dirs: Sequence[str]) -> Optional[str]:
    """Where a repository's tokenizer is in local hub caches.

    Args:
      repo: the repository (``repo_id``).
      dirs: hub caches, searched in order.

    Returns:
      The snapshot folder (``models--<owner>--<name>/snapshots/<revision>/``, the revision
      ``refs/main`` names, else the newest) holding a tokenizer file in the first cache with one,
      or ``None``.

    Example::

        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as cache:
        ...     snapshot = os.path.join(cache, "models--gpt2", "snapshots", "abc123")
        ...     os.makedirs(snapshot)
        ...     open(os.path.join(snapshot, "tokenizer.json"), "w").close()
        ...     found = find_snapshot("gpt2", [cache])
        ...     missing = find_snapshot("bert-base-uncased", [cache])
        >>> os.path.basename(found), missing
        ('abc123', None)
    """
    return huggingface.find_snapshot(repo, dirs=dirs, holds=_has_tokenizer)


def _search_dirs(data_path: Optional[str], environ=None) -> list[str]:
    """Where a tokenizer is looked for: ``data.path`` (breaching's ``cache_dir``), then the user's hub caches."""
    dirs = [os.path.expanduser(data_path)] if data_path else []
    return list(dict.fromkeys(dirs + cache_dirs(environ)))


def _need_transformers(name: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise DataError(
            f"data.tokenizer={name!r} is read with the transformers package, which is not installed "
            f"(pip install transformers)"
        )


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _backend(name: str, data_path: Optional[str], vocab_size: Optional[int], environ) -> tuple[Any, str]:
    """The transformers tokenizer breaching would build for ``name``, before its ``[PAD]``, and its source."""
    if name in UNSUPPORTED:
        raise DataError(f"data.tokenizer={name!r}: {UNSUPPORTED[name]}")
    _need_transformers(name)
    import transformers

    if name == WORD_LEVEL:
        file = os.path.join(os.path.expanduser(data_path or "~/data"), "cache", f"word-tokenizer_{vocab_size}.json")
        if not os.path.isfile(file):
            raise DataError(
                f"data.tokenizer='word-level' reads breaching's generated {file}, which is missing; "
                f"generating it from the corpus is not done here"
            )
        loader, source = (lambda: transformers.PreTrainedTokenizerFast(tokenizer_file=file)), file
    else:
        repo, dirs = repo_id(name), _search_dirs(data_path, environ)
        source = find_snapshot(repo, dirs)
        if source is None:
            alias = f" (Hugging Face {repo!r})" if repo != name else ""
            raise DataError(
                f"tokenizer {name!r}{alias} is not in a local Hugging Face cache and nothing is downloaded: "
                f"no models--{repo.replace('/', '--')}/snapshots/<revision>/ with a tokenizer in {', '.join(dirs)}"
            )
        loader = lambda: transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)  # noqa: E731
    try:
        return loader(), source
    except Exception as err:  # a damaged or foreign cache can fail in any number of ways
        raise DataError(f"tokenizer {name!r} at {source} could not be read: {_one_line(err)}") from None


def load_tokenizer(name: str, vocab_size: Optional[int], data_path: Optional[str] = None,
                   environ=None) -> TextTokenizer:
    """breaching's tokenizer ``name`` from a local cache, ``[PAD]`` added, its vocabulary checked.

    Read with ``transformers``' ``AutoTokenizer`` from the snapshot folder (module docstring):
    nothing is downloaded.

    Args:
      name: ``data.tokenizer`` (breaching's name, a repository, or ``word-level``).
      vocab_size: ``data.vocab_size``, the base vocabulary breaching requires; ``None`` skips the check.
      data_path: ``data.path``, searched first (breaching's ``cache_dir``).
      environ: supplies ``HF_HUB_CACHE`` / ``HF_HOME`` (default ``os.environ``).

    Returns:
      The :class:`TextTokenizer`.

    Raises:
      DataError: a tokenizer not read here, ``transformers`` missing, no cached tokenizer (naming
        where it looked), a damaged cache, or a vocabulary other than ``vocab_size``.

    Example::

        >>> load_tokenizer("character", vocab_size=None)
        Traceback (most recent call last):
        ...
        fedjax_users.data.errors.DataError: data.tokenizer='character': breaching's character tokenizer ...
    """
    backend, source = _backend(str(name), data_path, vocab_size, environ)
    backend.add_special_tokens({"pad_token": PAD_TOKEN})
    # breaching sets this for its batched preprocessing: whole articles are tokenized at once.
    backend.model_max_length = int(1e10)
    if vocab_size is not None and backend.vocab_size != vocab_size:
        raise DataError(
            f"tokenizer {name!r} ({source}) has a vocabulary of {backend.vocab_size}, data.vocab_size is "
            f"{vocab_size} (breaching refuses this mismatch too)"
        )
    return TextTokenizer(
        name=str(name),
        source=source,
        backend=backend,
        vocab_size=int(backend.vocab_size),
        num_tokens=len(backend),
        special_ids=tuple(sorted(int(i) for i in backend.all_special_ids)),
        mask_token_id=None if backend.mask_token is None else int(backend.mask_token_id),
        pad_token_id=int(backend.pad_token_id),
    )
