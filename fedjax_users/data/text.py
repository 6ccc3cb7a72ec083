"""Text data that breaching downloads (wikitext with a HuggingFace tokenizer): what is missing, said once.

breaching builds ``wikitext`` with ``datasets.load_dataset("wikitext", "wikitext-103-v1",
cache_dir=data.path)`` and its tokenizer with ``AutoTokenizer.from_pretrained(<tokenizer>,
cache_dir=data.path)``. Nothing is downloaded here: ``wikitext`` raises one ``DataError`` naming
the packages and cached files it needs and where they are looked for, and that ``data=random_tokens``
runs the case offline. Reading a cached corpus is not implemented yet (the line says so).
"""

from __future__ import annotations

import importlib.util
import os

from fedjax_users.data.errors import DataError

# breaching's tokenizer names (datasets_text._get_tokenizer) and the HuggingFace repositories they load.
TOKENIZERS = {"gpt2": "gpt2", "GPT-2": "gpt2", "bert-base-uncased": "bert-base-uncased", "bert": "bert-base-uncased"}
PACKAGES = ("datasets", "transformers")


def _cache_entries(path: str, tokenizer: str) -> dict[str, str]:
    """The cache folders breaching's calls would read, by what they hold."""
    repo = TOKENIZERS.get(tokenizer, tokenizer)
    return {
        "the wikitext-103-v1 corpus": os.path.join(path, "wikitext", "wikitext-103-v1"),
        f"the {repo} tokenizer": os.path.join(path, f"models--{repo.replace('/', '--')}"),
    }


def wikitext(cfg_data, split: str):
    """breaching's wikitext split; raises ``DataError`` saying what is missing (see the module docstring)."""
    del split
    path = os.path.expanduser(str(cfg_data.get("path") or "~/data"))
    tokenizer = str(cfg_data.get("tokenizer"))
    missing_packages = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    entries = _cache_entries(path, tokenizer)
    missing = [f"{what} ({where})" for what, where in entries.items() if not os.path.isdir(where)]
    offline = "data=random_tokens runs this case offline"
    if missing_packages or missing:
        needs = [f"the {' and '.join(missing_packages)} package{'s' if len(missing_packages) > 1 else ''}"] \
            if missing_packages else []
        raise DataError(
            f"data wikitext (tokenizer {tokenizer}) reads a local HuggingFace cache at data.path={path} and "
            f"nothing is downloaded; missing: {', '.join(needs + missing)}; {offline}"
        )
    raise DataError(
        f"data wikitext: the cache at {path} is there, but reading a cached corpus is not implemented "
        f"yet; {offline}"
    )
