"""Partitions: index-for-index parity with breaching's ``_split_dataset_vision``, and our fixes."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedjax_users.data import DataError, partition_indices, torch_randperm
from fedjax_users.data.partition import RANDOM_PARTITION_SEED

NUM_EXAMPLES, NUM_CLASSES = 200, 10
LABELS = np.random.default_rng(7).permutation(np.arange(NUM_EXAMPLES) % NUM_CLASSES)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference_split(torch):
    """breaching's own partition function, applied to a labelled stand-in dataset."""
    from parity import reference

    try:
        module = reference.datasets_vision_module()
    except ModuleNotFoundError as err:
        pytest.skip(f"reference unavailable: {err}")

    class Labelled(torch.utils.data.Dataset):
        def __init__(self, labels):
            self.lookup = dict(enumerate(int(v) for v in labels))
            self.classes = [f"class {c}" for c in range(NUM_CLASSES)]

        def __len__(self):
            return len(self.lookup)

        def __getitem__(self, idx):
            return idx, self.lookup[idx]

    def split(partition, user_idx, default_clients, labels=LABELS, **options):
        cfg_data = OmegaConf.create(dict(partition=partition, default_clients=default_clients, **options))
        subset = module._split_dataset_vision(Labelled(labels), cfg_data, user_idx)
        indices = getattr(subset, "indices", range(len(subset)))
        return np.asarray([int(i) for i in indices], dtype=np.int64)

    return split


def ours(partition, user_idx, default_clients, labels=LABELS, **options):
    return partition_indices(labels, NUM_CLASSES, partition, user_idx, default_clients, **options)


@pytest.mark.parametrize(
    "partition, clients, options",
    [
        ("balanced", 4, {}),
        ("balanced", 10, {}),
        ("unique-class", 10, {}),
        ("mixup", 4, {}),
        ("mixup", 7, {"mixup_freq": 3}),
        ("feat_est", 10, {}),
        ("feat_est", 5, {"num_data_points": 3, "target_label": 6}),
        ("none", 3, {}),
    ],
)
def test_deterministic_partitions_match_reference(reference_split, partition, clients, options):
    for user_idx in sorted({0, 1, clients // 2, clients - 1}):
        want = reference_split(partition, user_idx, clients, **options)
        got = ours(partition, user_idx, clients, **options)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want, err_msg=f"{partition} user {user_idx}")


def test_balanced_matches_reference_with_uneven_classes(reference_split):
    labels = np.random.default_rng(3).integers(0, NUM_CLASSES, size=NUM_EXAMPLES)  # class sizes vary
    for user_idx in range(5):
        np.testing.assert_array_equal(
            ours("balanced", user_idx, 5, labels=labels), reference_split("balanced", user_idx, 5, labels=labels)
        )


@pytest.mark.parametrize("n", [0, 1, 2, 7, 200, 5000])
@pytest.mark.parametrize("seed", [0, RANDOM_PARTITION_SEED, 2**32 - 1])
def test_torch_randperm_is_torchs_seeded_permutation(torch, n, seed):
    want = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    np.testing.assert_array_equal(torch_randperm(n, seed), want)


def test_random_is_the_intended_seeded_split(torch):
    # What the reference means: one permutation from a generator seeded 233, sliced per user.
    perm = torch.randperm(NUM_EXAMPLES, generator=torch.Generator().manual_seed(233)).numpy()
    for user_idx in range(4):
        np.testing.assert_array_equal(ours("random", user_idx, 4), perm[user_idx * 50 : (user_idx + 1) * 50])


def test_reference_random_ignores_its_seed(reference_split, torch):
    # Pins the defect we fix: its draw follows the global RNG, not the generator it seeds.
    torch.manual_seed(0)
    first = reference_split("random", 0, 4)
    torch.manual_seed(1)
    second = reference_split("random", 0, 4)
    torch.manual_seed(0)
    global_draw = torch.randperm(NUM_EXAMPLES)[:50].numpy()
    np.testing.assert_array_equal(first, global_draw)
    assert not np.array_equal(first, second)


def test_random_users_are_disjoint_and_repeatable():
    users = [ours("random", u, 6) for u in range(6)]
    assert all(len(u) == NUM_EXAMPLES // 6 for u in users)
    flat = np.concatenate(users)
    assert len(np.unique(flat)) == len(flat)
    np.testing.assert_array_equal(ours("random", 3, 6), users[3])


def test_random_full_is_seeded_and_per_user_sized():
    a, b, c = ours("random-full", 2, 8, seed=11), ours("random-full", 2, 8, seed=11), ours("random-full", 2, 8, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(a) == NUM_EXAMPLES // 8 and len(np.unique(a)) == len(a)
    np.testing.assert_array_equal(a, torch_randperm(NUM_EXAMPLES, 11)[: NUM_EXAMPLES // 8])
    assert len(ours("random-full", 0, 8)) == NUM_EXAMPLES // 8  # unseeded still works


def test_unique_class_of_a_missing_class_is_empty():
    assert ours("unique-class", 12, 20).size == 0


def test_label_free_partitions_accept_token_labels():
    tokens = np.zeros((30, 5), np.int32)
    assert len(partition_indices(tokens, 100, "random", 1, 3)) == 10
    np.testing.assert_array_equal(partition_indices(tokens, 100, "none", 0, 3), np.arange(30))


@pytest.mark.parametrize(
    "partition, user_idx, clients, labels, message",
    [
        ("bogus", 0, 4, LABELS, "unknown partition 'bogus'"),
        ("balanced", 4, 4, LABELS, "user index 4 is outside the dataset's 4 clients"),
        ("none", -1, 4, LABELS, "user index -1 is outside"),
        ("balanced", 0, 21, LABELS, "too many clients for a balanced partition"),
        ("unique-class", 0, 4, np.zeros((200, 3)), "needs one class label per example"),
        ("random", 0, 0, LABELS, "default_clients must be >= 1"),
    ],
)
def test_partition_errors(partition, user_idx, clients, labels, message):
    with pytest.raises(DataError, match=message):
        partition_indices(labels, NUM_CLASSES, partition, user_idx, clients)


def test_reference_accepts_user_index_equal_to_clients(reference_split):
    # The reference checks ``user_idx > default_clients``; we reject the nonexistent client too.
    assert reference_split("none", 4, 4).size == NUM_EXAMPLES
    with pytest.raises(DataError):
        ours("none", 4, 4)
