"""The update for torch, read by torch: ``safetensors`` alone (no fedjax_users, no JAX) gives a torch
model's names, order, layouts and dtypes, and ``interop.shared_data_from_files`` gives breaching's
``shared_data`` dict, the one ``shared_data_to_torch`` gives with a torch model and the one
breaching's own ``UserMultiStep`` computes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
reference = pytest.importorskip("parity.reference")

from test_breaching_user import SETUP, FlaxBN, Loader, make_data, make_model, payload, user_cfg  # noqa: E402

import fedjax_users as fu  # noqa: E402
from fedjax_users import interop, io, models  # noqa: E402
from fedjax_users.interop import breaching as drop_in  # noqa: E402
from fedjax_users.interop.order import torch_order  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs with torch and safetensors only: for each file FILE, saves what it read to FILE.pt, in the
# order the file lists.
TORCH_ALONE = """
import json, sys
import safetensors.torch, torch
from safetensors import safe_open
for path in sys.argv[1:]:
    tensors = safetensors.torch.load_file(path)
    with safe_open(path, framework="pt") as handle:
        lists = {key: json.loads(value) for key, value in handle.metadata().items() if key in ("gradients", "buffers")}
    torch.save({key: [(name, tensors[name]) for name in names] for key, names in lists.items()}, path + ".pt")
print(sorted(m for m in ("fedjax_users", "jax", "flax") if m in sys.modules))  # none of them
"""


def _torch_alone(code: str, *args: str, cwd) -> str:
    """Run ``code`` in a fresh interpreter outside the checkout; returns its stdout."""
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Distinct values everywhere, buffers included, so any mix-up of order or layout shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.copy_(torch.randint(1, 50, tensor.shape) if not tensor.is_floating_point() else torch.randn(tensor.shape))
    return model


def test_torch_alone_reads_torchs_names_order_layouts_and_dtypes(tmp_path):
    nets = {}
    for name in ("ConvNet", "resnet20"):  # BatchNorm both; ConvNet's names carry two model. prefixes
        net = _randomized(reference.vision_model(name))
        flax_model, x = models.get(name), jnp.zeros((1, 32, 32, 3))
        variables = interop.variables_from_torch(net, jax.eval_shape(flax_model.init, jax.random.key(0), x))
        # The model's own parameters and buffers as the update: the file must give them back as torch holds them.
        shared = fu.SharedData(gradients=variables["params"], batch_stats=variables["batch_stats"], metadata=fu.Metadata())
        io.save_shared_safetensors(tmp_path / f"{name}.safetensors", shared, torch_order(flax_model, x))
        nets[str(tmp_path / f"{name}.safetensors")] = net
    assert _torch_alone(TORCH_ALONE, *nets, cwd=tmp_path).strip() == "[]"
    for path, net in nets.items():
        read = torch.load(path + ".pt")
        for key, named in (("gradients", list(net.named_parameters())), ("buffers", list(net.named_buffers()))):
            assert len(read[key]) == len(named)
            for (file_name, got), (torch_name, want) in zip(read[key], named):
                # breaching's VisionContainer (and ConvNet's own Sequential) prefix the names with model.
                assert re.fullmatch(r"(model\.)*" + re.escape(file_name), torch_name), (file_name, torch_name)
                assert got.dtype == want.dtype and torch.equal(got, want), torch_name


def test_the_docs_example_runs_with_torch_alone(tmp_path):
    text = open(os.path.join(REPO, "docs", "validation.md"), encoding="utf-8").read()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "safetensors.torch" in b]
    model, x = models.get("lenet_zhu"), jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    shared = fu.SharedData(gradients=variables["params"], batch_stats=None,
                           metadata=fu.Metadata(num_data_points=2, labels=np.array([3, 5], np.int32)))
    path = tmp_path / "shared_update.safetensors"
    io.save_shared_safetensors(path, shared, torch_order(model, x))
    code = re.sub(r'^path = ".*"$', f"path = {str(path)!r}", example, flags=re.M)
    assert code != example
    printed = _torch_alone(code + "\nimport sys; assert 'fedjax_users' not in sys.modules\n", cwd=tmp_path)
    # lenet_zhu's first parameter, OIHW, and the labels.
    assert printed.strip() == "8 (12, 3, 5, 5) tensor([3, 5])"


def test_breachings_dict_from_the_files_is_breachings_users(tmp_path, monkeypatch):
    """A local update of a BatchNorm model (train mode: buffers shared, data_key, per-step labels)."""
    data, cfg = make_data("bn"), user_cfg("local_update")
    theirs_model, _ = make_model("bn")
    theirs = reference.users_module().UserMultiStep(theirs_model, torch.nn.CrossEntropyLoss(), Loader(data), SETUP, 0, cfg)
    expected, _ = theirs.compute_local_updates(payload(theirs_model, buffers_sent=False))

    ours_model, _ = make_model("bn")
    captured = []
    convert = drop_in.shared_data_to_torch
    monkeypatch.setattr(drop_in, "shared_data_to_torch",
                        lambda shared, model: captured.append(shared) or convert(shared, model))
    ours = drop_in.UserMultiStep(ours_model, torch.nn.CrossEntropyLoss(), Loader(data), SETUP, 0, cfg, flax_model=FlaxBN())
    with_model, _ = ours.compute_local_updates(payload(ours_model, buffers_sent=False))
    (shared,) = captured

    path = tmp_path / "u.safetensors"
    io.save_shared_safetensors(path, shared, torch_order(FlaxBN(), jnp.zeros((1, 6, 6, 3))))
    from_files = interop.shared_data_from_files(path)

    # Exactly what shared_data_to_torch gives with the torch model.
    assert from_files.keys() == with_model.keys() == {"gradients", "buffers", "metadata"}
    for key in ("gradients", "buffers"):
        assert len(from_files[key]) == len(with_model[key])
        for got, want in zip(from_files[key], with_model[key]):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert from_files["metadata"].keys() == with_model["metadata"].keys()
    hyper = from_files["metadata"]["local_hyperparams"]
    step_labels = with_model["metadata"]["local_hyperparams"]["labels"]
    assert len(hyper["labels"]) == len(step_labels) == 3
    assert all(torch.equal(a, b) for a, b in zip(hyper["labels"], step_labels))

    # And what breaching's own user computes: the same keys, shapes, dtypes and (float32) values.
    assert from_files["metadata"].keys() == expected["metadata"].keys()
    for key, named in (("gradients", list(theirs_model.named_parameters())),
                       ("buffers", list(theirs_model.named_buffers()))):
        assert [tuple(t.shape) for t in from_files[key]] == [tuple(t.shape) for _, t in named]
        for got, want in zip(from_files[key], expected[key]):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    metadata, theirs_metadata = from_files["metadata"], expected["metadata"]
    assert torch.equal(metadata["labels"], theirs_metadata["labels"]) and metadata["labels"].dtype == torch.int64
    assert metadata["data_key"] == theirs_metadata["data_key"] == "inputs"
    assert metadata["num_data_points"] == theirs_metadata["num_data_points"]
    assert {k: v for k, v in hyper.items() if k != "labels"} == \
        {k: v for k, v in theirs_metadata["local_hyperparams"].items() if k != "labels"}
    theirs_steps = theirs_metadata["local_hyperparams"]["labels"]
    assert len(theirs_steps) == 3 and all(torch.equal(a, b) for a, b in zip(hyper["labels"], theirs_steps))


def test_a_damaged_pair_is_refused_with_the_files_error(tmp_path):
    with pytest.raises(io.SharedFileError, match="shared-update file not found"):
        interop.shared_data_from_files(tmp_path / "none.safetensors")
    shared = fu.SharedData(gradients={"fc": {"bias": np.zeros(2, np.float32)}}, batch_stats=None, metadata=fu.Metadata())
    path = tmp_path / "u.safetensors"
    io.save_shared_safetensors(path, shared, interop.TorchOrder(params=(("fc", "bias"),)))
    (tmp_path / "u.metadata.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(io.SharedFileError, match="not a fedjax_users metadata file"):
        interop.shared_data_from_files(path)
