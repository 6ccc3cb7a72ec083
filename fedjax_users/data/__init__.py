"""Users from real data: datasets, breaching's federated partitions, and cases that combine them."""

from fedjax_users.data.cases import DEFAULT_CASE, UsersCase, construct_users, load_case, user_example_indices
from fedjax_users.data.errors import DataError
from fedjax_users.data.partition import PARTITIONS, partition_indices, torch_randperm
from fedjax_users.data.sources import Examples, load_examples, normalize

__all__ = [
    "DEFAULT_CASE",
    "DataError",
    "Examples",
    "PARTITIONS",
    "UsersCase",
    "construct_users",
    "load_case",
    "load_examples",
    "normalize",
    "partition_indices",
    "torch_randperm",
    "user_example_indices",
]
