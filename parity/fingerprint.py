"""What a parity row was proven on: the sources its case runs and the library versions, as one hash.

A row of ``results/*.json`` is evidence about the code it ran on. Each row records the fingerprint
of its case (:func:`fingerprint`); a row whose recorded fingerprint differs from today's is
*stale*: the code or a library it depends on changed since, and it must run again before it says
anything (``python -m parity --stale RESULTS.json``).

The sources of a case are found from the imports, not listed by hand: the static import closure
(every ``import`` statement, including those inside functions) of the modules a case runs
(``fedjax_users.interop.parity_check``, the comparison; ``fedjax_users.interop.breaching``, the
drop-in users it drives; and the module that defines its Flax model), plus the harness that builds
it. The model registry (``fedjax_users/models/__init__.py``) imports every model family; its own
file counts, but the families it imports do not, so a change to ``models/vgg.py`` leaves the
ResNet rows proven. A hand-kept list would drift; a run-time trace (``sys.setprofile``) would slow
the tracing that dominates a case several times over.

A source counts by its code (:func:`code_of`): a comment or a docstring edited in a proven module
leaves its rows proven. The code is read back with ``ast.unparse``, whose spelling is stable within a
Python version (the locks pin 3.11); a different Python may write it differently and so make rows
stale, which errs on the safe side.

Example::

    >>> from parity.cases import Case
    >>> from parity import fingerprint
    >>> case = Case("lenet_zhu", "local_gradient", False)
    >>> "fedjax_users/semantics.py" in fingerprint.case_sources(case)
    True
    >>> "fedjax_users/models/vgg.py" in fingerprint.case_sources(case)
    False
    >>> len(fingerprint.fingerprint(case))
    16
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from typing import Iterable, Mapping, Optional

from parity.cases import HF_TEXT_MODELS, Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "fedjax_users"
# What every case runs: the comparison, the drop-in users it drives (and through them the config,
# the interop, the users' computation), the model registry; and the harness that builds models,
# data and configs on both sides. The comparison imports the users, but both are named: a case
# runs both, whatever either comes to import.
CORE_MODULES = ("fedjax_users.interop.parity_check", "fedjax_users.interop.breaching", "fedjax_users.models")
HARNESS_FILES = ("parity/harness.py", "parity/reference.py", "parity/cases.py")
# A registry imports every family; following it would make every row depend on every model.
REGISTRIES = ("fedjax_users.models",)
# The libraries whose versions a result depends on (a new jax or torch can move a number).
LIBRARIES = ("jax", "jaxlib", "flax", "numpy", "torch", "breaching", "transformers")
# breaching's Hugging Face aliases are built by these modules (building one reads a hub cache).
HF_MODULES = {"bert-sanity-check": "fedjax_users.models.bert", "gpt2S": "fedjax_users.models.gpt2"}


def _module_path(module: str, packages: tuple[str, ...] = (PACKAGE,)) -> Optional[str]:
    """The repository-relative file of ``module`` if it is part of one of ``packages``, else ``None``."""
    if not any(module == package or module.startswith(package + ".") for package in packages):
        return None
    base = os.path.join(*module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(os.path.join(ROOT, path)):
            return path.replace(os.sep, "/")
    return None


def _imports(module: str, packages: tuple[str, ...] = (PACKAGE,)) -> tuple[str, ...]:
    return _imports_of_file(module, ROOT, packages)


@functools.lru_cache(maxsize=None)
def _imports_of_file(module: str, root: str, packages: tuple[str, ...]) -> tuple[str, ...]:
    """The modules of ``packages`` that ``module``'s file imports anywhere in it (names that may be submodules included)."""
    path = _module_path(module, packages)
    is_package = path is not None and path.endswith("__init__.py")
    with open(os.path.join(ROOT, path)) as handle:
        tree = ast.parse(handle.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]  # ``from pkg import submodule``
    # Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too.
    closed = set()
    for name in found:
        parts = name.split(".")
        closed.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return tuple(sorted(name for name in closed if _module_path(name, packages) is not None))


def source_closure(modules: Iterable[str], registries: Iterable[str] = REGISTRIES,
                   packages: Iterable[str] = (PACKAGE,)) -> set[str]:
    """Repository-relative files of ``modules`` and every module of ``packages`` they import, transitively.

    A module in ``registries`` contributes its own file but its imports are not followed. Imports of
    anything outside ``packages`` (libraries, and by default the repository's other folders) are not
    followed either.
    """
    registries, packages = set(registries), tuple(packages)
    seen: set[str] = set()
    todo = [m for m in modules if _module_path(m, packages) is not None]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module not in registries:
            todo += [m for m in _imports(module, packages) if m not in seen]
    return {_module_path(m, packages) for m in seen}


def model_module(case: Case) -> str:
    """The module that defines the Flax model of ``case`` (found by building the module object, not its weights)."""
    if case.model in HF_TEXT_MODELS:
        return HF_MODULES[case.model]
    if case.is_text:
        from fedjax_users.models.text import get_text_model
        from parity.harness import TEXT_NAMES

        return type(get_text_model(TEXT_NAMES.get(case.model, case.model), vocab_size=case.vocab_size)).__module__
    from fedjax_users import models

    module = models.for_data(case.model, case.data_name, num_classes=case.num_classes,
                             num_channels=case.image_shape[0])
    return type(module).__module__


def case_sources(case: Case) -> list[str]:
    """Every source file the case's result depends on, sorted."""
    files = source_closure(CORE_MODULES + (model_module(case),)) | set(HARNESS_FILES)
    return sorted(files)


def versions(libraries: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries a result depends on (``"-"`` when one is not installed)."""
    from fedjax_users import runs

    return runs.versions(tuple(libraries))


def _without_docstrings(tree: ast.Module) -> ast.Module:
    """``tree`` with the docstring of the module and of every class and function removed."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_of(text: bytes, path: str) -> bytes:
    """What of a source file a result depends on: a Python file's code, without comments and docstrings.

    A row proves what the code computes; the words around it do not compute. Hashing the code as
    ``ast.unparse`` writes it back (comments, docstrings, line numbers and layout gone) lets the
    docs of a proven module be edited without rerunning its rows, while any change to a statement,
    an expression or a name still makes them stale. Other files (and a Python file that does not
    parse) count byte for byte.

    Args:
      text: the file's bytes.
      path: its path (only a ``.py`` suffix matters).

    Returns:
      The bytes to hash.

    Example::

      >>> code_of(b"'Doc.'\\nx = 1  # why\\n", "m.py") == code_of(b"x = 1\\n", "m.py")
      True
      >>> code_of(b"x = 1\\n", "m.py") == code_of(b"x = 2\\n", "m.py")
      False
    """
    if not path.endswith(".py"):
        return text
    try:
        tree = ast.parse(text, path)
    except SyntaxError:
        return text
    return ast.unparse(_without_docstrings(tree)).encode()


@functools.lru_cache(maxsize=None)
def _file_hash(full_path: str, mtime_ns: int, size: int) -> str:
    # Keyed by modification time and size too: hashing 600 rows' ~30 files each stays instant,
    # and an edited file is read again.
    with open(full_path, "rb") as handle:
        return hashlib.sha256(code_of(handle.read(), full_path)).hexdigest()


def hash_sources(files: Iterable[str], library_versions: Mapping[str, str]) -> str:
    """A 16-hex-digit hash of repository-relative ``files`` (their code, :func:`code_of`) and ``library_versions``."""
    digest = hashlib.sha256()
    for path in sorted(files):
        full = os.path.join(ROOT, path)
        stat = os.stat(full)
        digest.update(path.encode() + b"\0" + _file_hash(full, stat.st_mtime_ns, stat.st_size).encode() + b"\0")
    for name in sorted(library_versions):
        digest.update(f"{name}=={library_versions[name]}\0".encode())
    return digest.hexdigest()[:16]


def fingerprint(case: Case, library_versions: Optional[Mapping[str, str]] = None) -> str:
    """A 16-hex-digit hash of the case's sources (their code, :func:`code_of`) and the library versions."""
    return hash_sources(case_sources(case), versions() if library_versions is None else library_versions)
