"""A torch state dict read from a file, running no code from it.

One reader for the pretrained weights the server starts from: torchvision's ``.pth`` files
(:mod:`fedjax_users.data.server`) and the Hugging Face hub cache's ``model.safetensors`` /
``pytorch_model.bin`` (:mod:`fedjax_users.models.huggingface`). torch is imported on first use,
so the modules that call this one stay importable without it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ["read_state_dict"]


def read_state_dict(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file or a torch state dict file, no code from it run.

    A torch file is read with ``torch.load(weights_only=True)`` (tensors and plain containers
    only: a pickled object is refused, not run); a checkpoint that wraps its state dict under
    ``"state_dict"`` (as training scripts save it) is unwrapped.

    Args:
      path: the file; ``.safetensors`` by its suffix, anything else torch's format.
      error: the exception class raised for a file that is missing, unreadable or not a state dict,
        and when torch is not installed (each caller's own: ``DataError``, ``UnavailableModelError``).

    Returns:
      ``{name: torch.Tensor}``, on the CPU.

    Raises:
      error: one line naming the file and what is wrong with it.

    Example:
      >>> import tempfile, torch
      >>> folder = tempfile.TemporaryDirectory()
      >>> path = os.path.join(folder.name, "fc.pth")
      >>> torch.save({"state_dict": {"fc.bias": torch.zeros(2)}}, path)
      >>> {name: tuple(t.shape) for name, t in read_state_dict(path).items()}
      {'fc.bias': (2,)}
      >>> folder.cleanup()
    """
    path = os.fspath(path)
    try:
        import torch
    except ImportError:
        raise error(f"reading the weights file {path} needs torch installed (pip install torch)") from None
    if not os.path.isfile(path):
        raise error(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an untrusted file can fail in any number of ways
        message = f"cannot read weights file {path} as tensors only: {type(err).__name__}: {err}"
        raise error(message.split("\n")[0]) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"weights file {path} is not a state dict (a mapping of names to tensors)")
    return dict(state)
