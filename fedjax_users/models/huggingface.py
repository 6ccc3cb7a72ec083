"""breaching's Hugging Face text models (``gpt2``, ``gpt2S``, ``bert-base-uncased``, ``bert-sanity-check``).

breaching builds every text name it does not know itself through ``transformers``
(``AutoConfig.from_pretrained(name)`` and an ``AutoModelFor...`` class chosen by the task), so
these names need a Hugging Face config, and pretrained weights, that only a download provides.
fedjax_users does not build them: a faithful port needs the Flax classes of ``transformers`` 4.x
(5.0 dropped them) paired name by name with the torch classes, and that pairing is not written
(see docs/models.md). Asking for one of these names (or any other name breaching would hand to
Hugging Face) is one clear error, which says whether a config was found in the local Hugging
Face cache and where it was looked for.
"""

from __future__ import annotations

import glob
import os
from typing import Mapping, Optional, Sequence

# breaching's aliases: the Hugging Face name it loads, and the config changes it makes.
ALIASES: Mapping[str, str] = {"gpt2S": "gpt2", "bert-sanity-check": "bert-base-uncased"}
NAMES = ("gpt2", "gpt2S", "bert-base-uncased", "bert-sanity-check")


class UnavailableModelError(ValueError):
    """A model breaching builds from downloaded files that fedjax_users cannot build: one clear line."""


def cache_dirs(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The Hugging Face hub caches ``transformers`` would read, in its order of precedence."""
    environ = os.environ if environ is None else environ
    dirs = []
    if environ.get("HF_HUB_CACHE"):
        dirs.append(environ["HF_HUB_CACHE"])
    if environ.get("HF_HOME"):
        dirs.append(os.path.join(environ["HF_HOME"], "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    return list(dict.fromkeys(dirs))


def find_cached_config(repo_id: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The path of ``repo_id``'s cached ``config.json`` (the hub cache layout), or ``None``."""
    folder = "models--" + repo_id.replace("/", "--")
    for cache in cache_dirs(environ):
        found = sorted(glob.glob(os.path.join(cache, folder, "snapshots", "*", "config.json")))
        if found:
            return found[-1]
    return None


def unavailable(name: str, known: Sequence[str] = (), environ: Optional[Mapping[str, str]] = None
                ) -> UnavailableModelError:
    """The one-line error for a text model ``name`` that breaching would load through ``transformers``.

    breaching hands every text name it does not build itself to Hugging Face, so this covers its
    named ones (``NAMES``) and any other name; ``known`` are the names fedjax_users builds.
    """
    repo_id = ALIASES.get(name, name)
    config = find_cached_config(repo_id, environ)
    what = f"text model {name!r}" + (f" (Hugging Face {repo_id!r})" if repo_id != name else "")
    others = f"; the text models built here are {list(known)}" if known else ""
    if config is None:
        where = ", ".join(cache_dirs(environ))
        return UnavailableModelError(
            f"unknown {what}: breaching would load it from Hugging Face, and no config.json for it is cached "
            f"(looked in {where}){others}"
        )
    return UnavailableModelError(
        f"{what} is cached at {config}, but fedjax_users has no Flax port of Hugging Face models paired with "
        f"their torch parameters (see docs/models.md){others}"
    )
