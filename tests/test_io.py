"""``fedjax_users.io``: shared-update files round-trip, and every damaged or foreign file is refused by name."""

import hashlib
import os
import pickle

import msgpack
import numpy as np
import pytest

import fedjax_users as fu
from fedjax_users import io


def _shared(shape=(4, 3)) -> fu.SharedData:
    rng = np.random.default_rng(0)
    hyper = fu.LocalHyperparams(lr=0.1, steps=2, data_per_step=1, labels=[np.array([1]), np.array([0])])
    return fu.SharedData(
        gradients={"fc": {"kernel": rng.standard_normal(shape).astype(np.float32), "bias": np.zeros(3, np.float32)}},
        batch_stats={"bn": {"mean": np.ones(3, np.float32)}},
        metadata=fu.Metadata(num_data_points=2, labels=np.array([0, 1]), local_hyperparams=hyper, data_key="inputs"),
    )


def _payload(shape=(4, 3)) -> fu.ServerPayload:
    return fu.ServerPayload(params={"fc": {"kernel": np.zeros(shape, np.float32), "bias": np.zeros(3, np.float32)}},
                            batch_stats={"bn": {"mean": np.zeros(3, np.float32)}})


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "update.msgpack"
    io.save_shared(path, _shared(), {"model": "linear", "user": {"num_data_points": 2}})
    return path


def test_round_trip_checked_against_the_model(saved):
    shared, config = io.load_shared(saved, like=_payload())
    want = _shared()
    np.testing.assert_array_equal(shared.gradients["fc"]["kernel"], want.gradients["fc"]["kernel"])
    np.testing.assert_array_equal(shared.batch_stats["bn"]["mean"], want.batch_stats["bn"]["mean"])
    assert shared.metadata.local_hyperparams.steps == 2 and shared.metadata.data_key == "inputs"
    np.testing.assert_array_equal(shared.metadata.local_hyperparams.labels[1], [0])
    assert config == {"model": "linear", "user": {"num_data_points": 2}}


def _damaged(saved, tmp_path, how: str):
    raw = saved.read_bytes()
    contents = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "text": b"model: linear\nuser: 5\n",
        "pickle": pickle.dumps({"gradients": {}}),
        "flipped": raw[:-8] + bytes([raw[-8] ^ 0x10]) + raw[-7:],
        "json-like msgpack": msgpack.packb({"gradients": [1, 2, 3]}),
    }[how]
    path = tmp_path / f"{how}.msgpack"
    path.write_bytes(contents)
    return path


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "is not a fedjax_users shared-update file, or is truncated"),
        ("empty", "is empty"),
        ("text", "is not a fedjax_users shared-update file"),
        ("pickle", "is not a fedjax_users shared-update file"),
        ("flipped", "is corrupt: its checksum does not match"),
        ("json-like msgpack", "is not a fedjax_users shared-update file"),
    ],
)
def test_damaged_files_are_refused_by_name(saved, tmp_path, how, message):
    path = _damaged(saved, tmp_path, how)
    with pytest.raises(io.SharedFileError, match=message) as err:
        io.load_shared(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_file_from_another_model_is_refused(saved):
    with pytest.raises(io.SharedFileError, match=r"does not fit the model: gradients\['fc'\]\['kernel'\] has shape "
                                                 r"\(4, 3\), the model's has \(5, 3\)") as err:
        io.load_shared(saved, like=_payload((5, 3)))
    assert str(saved) in str(err.value)
    other = fu.ServerPayload(params={"head": {"kernel": np.zeros((4, 3))}})
    with pytest.raises(io.SharedFileError, match=r"gradients\['head'\]\['kernel'\] is missing"):
        io.load_shared(saved, like=other)


def _envelope(payload: bytes, **changes) -> bytes:
    fields = {"format": io.FORMAT, "version": io.VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
              "payload": payload, **changes}
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "contents, message",
    [
        (msgpack.packb({"format": io.FORMAT_V1, "gradients": {}}), "format version 1, which has no checksum"),
        (_envelope(b"x", version=3), "format version 3; this fedjax_users reads version 2"),
        (_envelope(msgpack.packb([1, 2])), "is a malformed shared-update file"),
        (_envelope(msgpack.packb({"gradients": {"a": 1}})), "is a malformed shared-update file"),
    ],
    ids=["version-1", "version-3", "payload-a-list", "payload-without-metadata"],
)
def test_wrong_versions_and_structures_are_refused(tmp_path, contents, message):
    path = tmp_path / "file.msgpack"
    path.write_bytes(contents)
    with pytest.raises(io.SharedFileError, match=message) as err:
        io.load_shared(path)
    assert str(path) in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(io.SharedFileError, match=f"not found: {tmp_path}/none.msgpack"):
        io.load_shared(tmp_path / "none.msgpack")
    with pytest.raises(io.SharedFileError, match="is a folder"):
        io.load_shared(tmp_path)


def test_saving_into_a_missing_or_read_only_folder(tmp_path):
    with pytest.raises(io.SharedFileError, match=f"folder {tmp_path}/missing does not exist"):
        io.save_shared(tmp_path / "missing" / "update.msgpack", _shared())
    with pytest.raises(io.SharedFileError, match="it is a folder"):
        io.check_writable(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(io.SharedFileError, match="is not writable"):
            io.save_shared(locked / "update.msgpack", _shared())
        assert not (locked / "update.msgpack").exists()
    finally:
        locked.chmod(0o700)


def test_shared_file_error_is_a_value_error():
    assert issubclass(io.SharedFileError, ValueError)
