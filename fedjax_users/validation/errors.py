r"""The errors validation raises, and how a caught cause is quoted inside their one-line messages.

Example::

    >>> from fedjax_users.validation import errors
    >>> issubclass(errors.InputTypeError, TypeError), issubclass(errors.NonFiniteError, ValueError)
    (True, True)
    >>> errors.first_line(ValueError("shapes differ\n  more detail"))
    'ValueError: shapes differ'
"""

from __future__ import annotations


class InputError(ValueError):
    """Inputs, labels, a payload or an argument that do not fit the model, the config or the function."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong Python type (a dict for a ``ServerPayload``, an int for a key)."""


class NonFiniteError(FloatingPointError, ValueError):
    """A user's update or statistics went NaN or infinite (for example a learning rate that diverges)."""


def first_line(err: BaseException) -> str:
    r"""An exception's type and the first line of its message, to quote it as the cause in one line.

    The full text stays with the exception, chained as the ``__cause__`` of the one raised.

    Args:
      err: the exception caught.

    Returns:
      ``"TypeName: first line"`` (``"TypeName: "`` for an empty message).

    Example::

        >>> first_line(TypeError("unsupported operand\n(a long explanation)"))
        'TypeError: unsupported operand'
        >>> first_line(RuntimeError())
        'RuntimeError: '
    """
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
