"""The exception types for problems with user data or case configs."""

from fedjax_users.config import ConfigError


class DataError(ValueError):
    """A user-facing data problem (missing folder, bad partition, too few examples): one clear line."""


class CaseConfigError(DataError, ConfigError):
    """A malformed case, data or user config file or override: a ``DataError`` and a ``ConfigError``."""
