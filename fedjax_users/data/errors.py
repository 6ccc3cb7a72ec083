"""The exception types for problems with user data or case configs.

Example::

    >>> from fedjax_users.config import ConfigError
    >>> from fedjax_users.data.errors import CaseConfigError, DataError
    >>> issubclass(CaseConfigError, DataError) and issubclass(CaseConfigError, ConfigError)
    True
"""

from fedjax_users.config import ConfigError

__all__ = ["CaseConfigError", "DataError"]


class DataError(ValueError):
    """A user-facing data problem (missing folder, bad partition, too few examples): one clear line."""


class CaseConfigError(DataError, ConfigError):
    """A malformed case, data or user config file or override: a ``DataError`` and a ``ConfigError``."""
