"""The update for torch (``io.save_shared_safetensors``): torch's names, layouts and order in the file,
breaching's metadata beside it, read back bit for bit, damaged pairs refused by name, and the run
command writing the pair for every query.

What torch itself reads, and breaching's dict from the files, are checked against torch models in
``tests/interop/test_shared_files.py``.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import fedjax_users as fu
from fedjax_users import cli, io, models, runs
from fedjax_users.interop.order import TorchOrder, torch_order


def _filled(tree, dtype, seed: int = 0):
    """A tree of ``jax.ShapeDtypeStruct`` s filled with random values: floats in ``dtype``, integers int32."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return rng.integers(1, 100, leaf.shape).astype(np.int32)
        return rng.standard_normal(leaf.shape).astype(dtype)

    return jax.tree_util.tree_map(fill, tree)


def _metadata(data_key="inputs", num_users=None) -> fu.Metadata:
    hyper = fu.LocalHyperparams(lr=1e-3, steps=2, data_per_step=2,
                                labels=[np.array([0, 7], np.int32), np.array([3], np.int32)])
    return fu.Metadata(num_data_points=3, labels=np.array([7, 0, 3], np.int32), local_hyperparams=hyper,
                       data_key=data_key, num_users=num_users)


@pytest.fixture(scope="module")
def resnet20():
    """resnet20 (BatchNorm, int32 ``num_batches_tracked``): its variables' shapes and torch order."""
    model = models.get("resnet20")
    x = jnp.zeros((1, 32, 32, 3))
    return jax.eval_shape(model.init, jax.random.key(0), x), torch_order(model, x)


def _shared(variables, dtype=np.float32, **metadata) -> fu.SharedData:
    return fu.SharedData(gradients=_filled(variables["params"], dtype), batch_stats=_filled(variables["batch_stats"], dtype, 1),
                         metadata=_metadata(**metadata))


def assert_identical(actual: fu.SharedData, expected: fu.SharedData) -> None:
    """Same tree (metadata numbers included), and every leaf with the same dtype, shape and bytes."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert (a.dtype, a.shape) == (e.dtype, e.shape), jax.tree_util.keystr(path)
        assert a.tobytes() == e.tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16], ids=["float32", "float64", "bfloat16"])
def test_round_trip_is_bit_identical_and_equals_the_msgpack_file(resnet20, tmp_path, dtype):
    variables, order = resnet20
    shared = _shared(variables, dtype)
    written = io.save_shared_safetensors(tmp_path / "u.safetensors", shared, order, {"model": "resnet20"})
    assert written == [str(tmp_path / "u.safetensors"), str(tmp_path / "u.metadata.json")]
    back, config = io.load_shared(tmp_path / "u.safetensors", like=fu.ServerPayload(**variables))
    assert config == {"model": "resnet20"}
    assert_identical(back, shared)
    assert back.batch_stats["stem"]["1"]["num_batches_tracked"].dtype == np.int32  # int64 in the file
    io.save_shared(tmp_path / "u.msgpack", shared, config)
    assert_identical(back, io.load_shared(tmp_path / "u.msgpack")[0])


def test_file_holds_torch_names_layouts_and_order(resnet20, tmp_path):
    variables, order = resnet20
    shared = _shared(variables)
    path = tmp_path / "u.safetensors"
    io.save_shared_safetensors(path, shared, order)
    tensors = safetensors.numpy.load_file(str(path))
    with safe_open(str(path), framework="numpy") as handle:
        header = handle.metadata()
    gradients, buffers = json.loads(header["gradients"]), json.loads(header["buffers"])
    assert gradients == order.torch_names("params") and buffers == order.torch_names("batch_stats")
    assert sorted(tensors) == sorted(gradients + buffers)
    # torch's order, not a sorted tree's: the stem's conv before its BatchNorm, the head last.
    assert gradients[:3] == ["stem.0.weight", "stem.1.weight", "stem.1.bias"]
    assert gradients[-2:] == ["linear.weight", "linear.bias"]
    assert buffers[:3] == ["stem.1.running_mean", "stem.1.running_var", "stem.1.num_batches_tracked"]
    params, stats = shared.gradients, shared.batch_stats
    np.testing.assert_array_equal(tensors["stem.0.weight"], params["stem"]["0"]["kernel"].transpose(3, 2, 0, 1))  # OIHW
    np.testing.assert_array_equal(tensors["linear.weight"], params["linear"]["kernel"].T)  # [out, in]
    np.testing.assert_array_equal(tensors["stem.1.weight"], params["stem"]["1"]["scale"])
    np.testing.assert_array_equal(tensors["stem.1.running_var"], stats["stem"]["1"]["var"])
    assert tensors["stem.1.num_batches_tracked"].dtype == np.int64
    assert header["format"] == io.SAFETENSORS_FORMAT and header["version"] == "1"


@pytest.mark.parametrize("user", ["local_gradient", "local_update", "multiuser_aggregate"])
def test_metadata_file_is_breachings_metadata_with_the_config_and_checksum(resnet20, tmp_path, user):
    variables, order = resnet20
    keys = {"local_gradient": {}, "local_update": dict(data_key="inputs"),
            "multiuser_aggregate": dict(data_key=None, num_users=2)}[user]
    shared = _shared(variables, **dict(dict(data_key=None), **keys))
    path = tmp_path / "u.safetensors"
    io.save_shared_safetensors(path, shared, order, {"user": {"user_type": user}})
    document = json.loads((tmp_path / "u.metadata.json").read_text())
    assert document["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert document["tensors"] == "u.safetensors" and document["config"] == {"user": {"user_type": user}}
    metadata = document["metadata"]
    # breaching sends data_key (multi-step users) and num_users (aggregates) only where they apply.
    sent = {key for key, value in keys.items() if value is not None}
    assert set(metadata) == {"num_data_points", "labels", "local_hyperparams"} | sent
    assert metadata["labels"] == [7, 0, 3] and document["label_dtype"] == "int32"
    assert metadata["local_hyperparams"] == {"lr": 1e-3, "steps": 2, "data_per_step": 2, "labels": [[0, 7], [3]]}
    assert_identical(io.load_shared(path)[0], shared)


@pytest.mark.parametrize("buffers", [None, {}], ids=["none-shared", "model-without-buffers"])
def test_no_buffers_stay_none_and_empty_stays_empty(tmp_path, buffers):
    shared = fu.SharedData(gradients={"fc": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}},
                           batch_stats=buffers, metadata=fu.Metadata())
    path = tmp_path / "u.safetensors"
    io.save_shared_safetensors(path, shared, TorchOrder(params=(("fc", "kernel"), ("fc", "bias"))))
    with safe_open(str(path), framework="numpy") as handle:
        assert json.loads(handle.metadata()["buffers"]) == (None if buffers is None else [])
    back = io.load_shared(path)[0]
    assert back.batch_stats == buffers
    assert back.metadata == fu.Metadata() and json.loads((tmp_path / "u.metadata.json").read_text())["label_dtype"] is None


@pytest.fixture
def saved(resnet20, tmp_path):
    variables, order = resnet20
    path = tmp_path / "u.safetensors"
    io.save_shared_safetensors(path, _shared(variables), order)
    return path


def _damage(path, how: str) -> str:
    """Damage the pair in one way; returns the path to load."""
    meta = path.with_name("u.metadata.json")
    raw = path.read_bytes()
    if how == "no metadata":
        meta.unlink()
    elif how == "flipped tensor byte":
        path.write_bytes(raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "metadata not JSON":
        meta.write_text("format: yaml\n")
    elif how == "foreign metadata":
        meta.write_text(json.dumps({"format": "something else"}))
    elif how == "metadata version":
        meta.write_text(json.dumps(dict(json.loads(meta.read_text()), version=9)))
    elif how == "no tensors":
        path.unlink()
    return str(path)


DAMAGES = [
    ("no metadata", "has no metadata file beside it: .*u.metadata.json not found"),
    ("flipped tensor byte", "is corrupt, or not the file .*u.metadata.json was written with"),
    ("truncated", "is corrupt, or not the file"),
    ("metadata not JSON", "u.metadata.json is not a fedjax_users metadata file"),
    ("foreign metadata", "u.metadata.json is not a fedjax_users metadata file"),
    ("metadata version", "metadata format version 9; this fedjax_users reads version 1"),
    ("no tensors", "shared-update file not found: .*u.safetensors"),
]


@pytest.mark.parametrize("how, message", DAMAGES, ids=[how for how, _ in DAMAGES])
def test_damaged_pairs_are_refused_in_one_line(saved, how, message):
    path = _damage(saved, how)
    with pytest.raises(io.SharedFileError, match=message) as err:
        io.load_shared(path)
    assert "\n" not in str(err.value)


def test_an_update_that_does_not_fit_the_model_is_refused(saved):
    other = jax.eval_shape(models.get("resnet20", num_classes=5).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(io.SharedFileError, match=r"does not fit the model: gradients\['linear'\]\['bias'\] has shape"):
        io.load_shared(saved, like=fu.ServerPayload(**other))


def test_writing_needs_a_safetensors_name_and_an_order_that_fits(resnet20, tmp_path):
    variables, order = resnet20
    shared = _shared(variables)
    with pytest.raises(io.SharedFileError, match="must end in .safetensors"):
        io.save_shared_safetensors(tmp_path / "u.st", shared, order)
    short = TorchOrder(params=order.params[1:], batch_stats=order.batch_stats)
    with pytest.raises(io.SharedFileError, match=r"the torch order does not fit the update's params \(stem/0/kernel\)"):
        io.save_shared_safetensors(tmp_path / "u.safetensors", shared, short)
    with pytest.raises(io.SharedFileError, match="order must be a fedjax_users.interop.order.TorchOrder"):
        io.save_shared_safetensors(tmp_path / "u.safetensors", shared, list(order.params))
    with pytest.raises(io.SharedFileError, match="folder .*missing does not exist"):
        io.save_shared_safetensors(tmp_path / "missing" / "u.safetensors", shared, order)
    assert os.listdir(tmp_path) == []


def test_two_leaves_with_one_torch_name_are_refused(tmp_path):
    # A Flax module holding both a kernel and a weight: torch would call both "weight".
    shared = fu.SharedData(gradients={"fc": {"kernel": np.ones((2, 2)), "weight": np.ones(2)}}, batch_stats=None,
                           metadata=fu.Metadata())
    with pytest.raises(io.SharedFileError, match="ambiguous"):
        io.save_shared_safetensors(tmp_path / "u.safetensors", shared,
                                   TorchOrder(params=(("fc", "kernel"), ("fc", "weight"))))


def test_run_output_names_the_torch_files_beside_each_update(tmp_path):
    folder = runs.RunOutput(folder=str(tmp_path))
    assert folder.safetensors_paths(1) == [str(tmp_path / "shared_update.safetensors")]
    assert folder.safetensors_paths(2)[1] == str(tmp_path / "shared_update.query1.safetensors")
    single = runs.RunOutput(folder=None, update_file=str(tmp_path / "mine.msgpack"))
    assert single.safetensors_paths(1) == [str(tmp_path / "mine.safetensors")]
    assert io.metadata_path(single.safetensors_paths(1)[0]) == str(tmp_path / "mine.metadata.json")
    # --out FILE.msgpack: an existing torch file of the same stem is a run too.
    (tmp_path / "mine.metadata.json").write_text("{}")
    with pytest.raises(io.SharedFileError, match="mine.metadata.json exists: .* --force"):
        runs.prepare(str(tmp_path / "mine.msgpack"), "case", force=False)
    assert runs.prepare(str(tmp_path / "mine.msgpack"), "case", force=True) == single


def test_run_writes_the_torch_pair_of_its_update(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "model=lenet_zhu", "--out", str(out)]) == 0
    assert "shared_update.safetensors" in capsys.readouterr().out
    assert {"shared_update.safetensors", "shared_update.metadata.json"} <= set(os.listdir(out))
    summary = json.loads((out / "summary.json").read_text())
    assert {"shared_update.msgpack", "shared_update.safetensors", "shared_update.metadata.json"} <= set(summary["files"])
    from_torch_files, config = io.load_shared(out / "shared_update.safetensors")
    from_msgpack, config_msgpack = io.load_shared(out / "shared_update.msgpack")
    assert_identical(from_torch_files, from_msgpack)
    assert config == config_msgpack
    with safe_open(str(out / "shared_update.safetensors"), framework="numpy") as handle:
        names = json.loads(handle.metadata()["gradients"])
    assert names[0] == "body.0.weight" and names[-1] == "fc.0.bias"


def test_writing_and_reading_need_no_torch():
    """The run dependencies do not name torch: the writer, the order and the run folder must not import it."""
    import subprocess
    import sys

    code = ("import sys, fedjax_users.io, fedjax_users.interop.order, fedjax_users.runs; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
