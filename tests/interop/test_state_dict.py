"""The one torch state-dict reader: both formats, a wrapped checkpoint, and one line for each bad file."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedjax_users.data import server  # noqa: E402
from fedjax_users.data.errors import DataError  # noqa: E402
from fedjax_users.interop.state_dict import read_state_dict  # noqa: E402


class _Custom(Exception):
    pass


def _state() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(2, 1, 3, 3, generator=generator), "bn.num_batches_tracked": torch.tensor(3)}


def _assert_same(read: dict, state: dict) -> None:
    assert sorted(read) == sorted(state)  # safetensors keeps no order of its own
    for name, tensor in state.items():
        assert read[name].dtype == tensor.dtype
        np.testing.assert_array_equal(read[name].numpy(), tensor.numpy())


def test_reads_torch_files_plain_or_wrapped_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = _state()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    save_file(state, str(tmp_path / "model.safetensors"))
    for name in ("plain.pth", "wrapped.pth", "model.safetensors"):
        _assert_same(read_state_dict(tmp_path / name), state)


@pytest.mark.parametrize("kind", ["missing", "code", "not tensors", "damaged"])
def test_a_bad_file_is_one_line_of_the_callers_error(tmp_path, kind):
    path = tmp_path / "weights.pth"
    if kind == "code":
        torch.save({"fc.weight": _Custom("a pickled object weights_only refuses")}, path)
    elif kind == "not tensors":
        torch.save({"fc.weight": [1.0, 2.0]}, path)
    elif kind == "damaged":
        path.write_bytes(b"not a torch file")
    with pytest.raises(_Custom) as raised:
        read_state_dict(path, _Custom)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    expected = {"missing": "not found", "code": "as tensors only", "not tensors": "is not a state dict",
                "damaged": "cannot read"}[kind]
    assert expected in message


def test_without_torch_the_reader_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # ``import torch`` raises ImportError
    with pytest.raises(_Custom, match="needs torch installed"):
        read_state_dict(tmp_path / "weights.pth", _Custom)


def test_the_servers_pretrained_weights_go_through_it_as_data_errors(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"fc.weight": [1.0]}, path)
    with pytest.raises(DataError, match="is not a state dict"):
        server.load_pretrained(str(path), {"params": {}}, 10, "ResNet18")
