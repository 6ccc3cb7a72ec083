"""The curated public API: each module's ``__all__`` names what exists, and each function or class it
exports is documented in the optax form (what each argument is, what is returned).

Scoped to the modules whose surface has been curated (``CURATED``); a module joins the list once its
``__all__`` and docstrings are done. The package's submodules are checked against its docstring.
"""

import ast
import importlib
import importlib.util
import inspect
import textwrap

import pytest

import fedjax_users as fu

CURATED = (
    "fedjax_users.accounting",
    "fedjax_users.attacks",
    "fedjax_users.batchnorm",
    "fedjax_users.cli",
    "fedjax_users.cohort",
    "fedjax_users.config",
    "fedjax_users.convolutions",
    "fedjax_users.data",
    "fedjax_users.data.cases",
    "fedjax_users.data.catalog",
    "fedjax_users.data.compose",
    "fedjax_users.data.errors",
    "fedjax_users.data.examples",
    "fedjax_users.data.glue",
    "fedjax_users.data.hf_tokenizer",
    "fedjax_users.data.images",
    "fedjax_users.data.keys",
    "fedjax_users.data.make_digits_npz",
    "fedjax_users.data.masking",
    "fedjax_users.data.partition",
    "fedjax_users.data.server",
    "fedjax_users.data.sources",
    "fedjax_users.data.text",
    "fedjax_users.data.tf_example",
    "fedjax_users.data.tff",
    "fedjax_users.evaluate",
    "fedjax_users.interop",
    "fedjax_users.interop.breaching",
    "fedjax_users.interop.files",
    "fedjax_users.interop.metadata",
    "fedjax_users.interop.naming",
    "fedjax_users.interop.order",
    "fedjax_users.interop.parity_check",
    "fedjax_users.interop.shared_data",
    "fedjax_users.interop.state_dict",
    "fedjax_users.interop.tensors",
    "fedjax_users.interop.torch_flax",
    "fedjax_users.io",
    "fedjax_users.losses",
    "fedjax_users.models",
    "fedjax_users.plots",
    "fedjax_users.privacy",
    "fedjax_users.progress",
    "fedjax_users.runs",
    "fedjax_users.semantics",
    "fedjax_users.strategy",
    "fedjax_users.strategy.chunking",
    "fedjax_users.strategy.clipping",
    "fedjax_users.strategy.compilation",
    "fedjax_users.strategy.cpu",
    "fedjax_users.strategy.examples",
    "fedjax_users.strategy.patches",
    "fedjax_users.strategy.sharding",
    "fedjax_users.strategy.streaming",
    "fedjax_users.suggestions",
    "fedjax_users.types",
    "fedjax_users.user",
    "fedjax_users.users",
    "fedjax_users.validation",
)


def _own_body(node: ast.AST):
    """The nodes of a function's body, not descending into the functions and classes it defines."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(child))


def _returns_something(function) -> bool:
    """Whether ``function`` returns a value: by its return annotation, else by a ``return value`` in its body.

    A context manager (annotated ``Iterator[None]``) and a function annotated ``-> None`` return nothing.
    """
    annotation = inspect.signature(function).return_annotation
    if annotation is not inspect.Signature.empty:
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
        return text not in ("None", "NoneType", "Iterator[None]")
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(function)))
    definition = ast.parse(source).body[0]
    return any(isinstance(n, ast.Return) and n.value is not None for n in _own_body(definition)) or any(
        isinstance(n, (ast.Yield, ast.YieldFrom)) for n in _own_body(definition))


def _takes_arguments(function, bound: bool = False) -> bool:
    parameters = list(inspect.signature(function).parameters)
    return len(parameters) > (1 if bound else 0)


def function_problems(function, name: str, method: bool = False) -> list[str]:
    """What the docstring of ``function`` lacks: a summary, ``Args:`` (if it takes any), ``Returns:`` (if it
    returns something)."""
    doc = inspect.getdoc(function) or ""
    problems = []
    if not doc.strip():
        return [f"{name}: no docstring"]
    if _takes_arguments(function, bound=method) and "Args:" not in doc:
        problems.append(f"{name}: no Args: section")
    if _returns_something(function) and "Returns:" not in doc:
        problems.append(f"{name}: no Returns: section")
    return problems


def _constructor_arguments(cls) -> bool:
    try:
        return bool(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # an exception type: built-in signature
        return False


def class_problems(cls, name: str) -> list[str]:
    """What a class's docstrings lack: its fields (``Args:`` or ``Attributes:``) and its public methods' sections."""
    doc = inspect.getdoc(cls) or ""
    if not doc.strip():
        return [f"{name}: no docstring"]
    problems = []
    if _constructor_arguments(cls) and "Args:" not in doc and "Attributes:" not in doc:
        problems.append(f"{name}: no Args: or Attributes: section for its constructor")
    for attribute, value in vars(cls).items():
        function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        # Methods written in the class body (not those a decorator adds, as flax.struct's replace).
        written_here = inspect.isfunction(function) and function.__qualname__.startswith(f"{cls.__qualname__}.")
        if attribute.startswith("_") or not written_here:
            continue
        # The function as written: a method's and a classmethod's first parameter is bound.
        problems += function_problems(function, f"{name}.{attribute}", method=not isinstance(value, staticmethod))
    return problems


def _exported(module_name: str):
    """(name, object) of each function or class in the module's ``__all__`` defined in a curated module."""
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) in CURATED:
            yield f"{module_name}.{name}", obj


@pytest.mark.parametrize("module_name", CURATED)
def test_every_exported_name_exists(module_name):
    module = importlib.import_module(module_name)
    assert isinstance(module.__all__, (list, tuple)) and module.__all__, f"{module_name} has no __all__"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names what it does not define: {missing}"
    assert len(set(module.__all__)) == len(module.__all__), f"{module_name}.__all__ repeats a name"


@pytest.mark.parametrize("module_name", CURATED)
def test_every_public_function_and_class_is_exported(module_name):
    # A function or class defined here without a leading underscore is public: it is in __all__.
    module = importlib.import_module(module_name)
    defined = [
        name for name, obj in vars(module).items()
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module_name
    ]
    assert sorted(set(defined) - set(module.__all__)) == []


@pytest.mark.parametrize("module_name", CURATED)
def test_exported_functions_and_classes_say_args_and_returns(module_name):
    problems = []
    for name, obj in _exported(module_name):
        problems += class_problems(obj, name) if inspect.isclass(obj) else function_problems(obj, name)
    assert problems == []


def test_the_checker_finds_a_missing_section():
    def documented(x: int) -> int:
        """Twice ``x``.

        Args:
          x: a number.

        Returns:
          ``2 * x``.
        """
        return 2 * x

    def no_returns(x):
        """Twice ``x``.

        Args:
          x: a number.
        """
        return 2 * x

    def no_args(x) -> None:
        """Prints ``x``."""

    class Fields:
        """No section for its fields."""

        def __init__(self, a):
            self.a = a

        def method(self) -> int:
            """A number."""
            return 1

        @classmethod
        def build(cls, a):
            """Made from ``a``."""
            return cls(a)

    assert function_problems(documented, "documented") == []
    assert function_problems(no_returns, "no_returns") == ["no_returns: no Returns: section"]
    assert function_problems(no_args, "no_args") == ["no_args: no Args: section"]
    assert class_problems(Fields, "Fields") == [
        "Fields: no Args: or Attributes: section for its constructor", "Fields.method: no Returns: section",
        "Fields.build: no Args: section", "Fields.build: no Returns: section"]


def test_the_package_documents_each_submodule():
    doc = fu.__doc__
    for name in fu.SUBMODULES:
        assert f"* ``{name}``:" in doc, f"the package docstring does not describe the submodule {name}"
        assert importlib.util.find_spec(f"fedjax_users.{name}") is not None
        assert name in dir(fu)
    # The top-level names are the re-exports, every one defined.
    assert [name for name in fu.__all__ if not hasattr(fu, name)] == []
    assert not set(fu.SUBMODULES) & set(fu.__all__), "a star import would import every submodule (torch too)"
