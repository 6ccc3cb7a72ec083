"""The one exception type for problems with user data or case configs."""


class DataError(ValueError):
    """A user-facing data problem (missing folder, bad partition, too few examples): one clear line."""
