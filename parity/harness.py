"""Run one parity case: breaching's own user class and fedjax_users on the same model, weights and data.

A case (``parity/cases.py``) names a model, user type, BatchNorm mode, defence and precision; this
module builds its torch model, Flax model, data and user config, and hands them to
:func:`fedjax_users.interop.parity_check.compare`, the one implementation of the comparison (behind
``check_parity``, the function a downstream project calls for its own models). The reference is breaching 0.1.2's
``UserSingleStep`` / ``UserMultiStep`` loaded by ``parity.reference`` and run unmodified; an
aggregate is compared with the mean of the reference's single users (its own ``MultiUserAggregate``
is defective, see ``tests/parity``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

import fedjax_users as fu
from fedjax_users import interop, models
from fedjax_users.interop import parity_check
from fedjax_users.models.text import get_text_model
from parity import reference
from parity.cases import HF_TEXT_MODELS, Case

# The scale of the noise a noise case adds (gradient or input noise).
NOISE_SCALE = 0.05
# The parity grid names breaching's text ``linear`` apart from its vision ``linear``.
TEXT_NAMES = {"linear-text": "linear"}

# One row of the table is the comparison's report.
Result = parity_check.ParityReport


# ----------------------------------------------------------------------------------------------
# Building both sides


def _torch_dtype(case: Case):
    return torch.float64 if case.precision == "float64" else torch.float32


def build_models(case: Case):
    """The reference torch model and the Flax model, holding the same weights."""
    if case.model in HF_TEXT_MODELS:
        reference.use_tiny_hf_cache()
    torch.manual_seed(case.seed)
    if case.model in HF_TEXT_MODELS:
        torch_model = reference.hf_text_model(case.model, case.vocab_size, case.task)
        flax_model = models.get(case.model, num_classes=case.vocab_size, modality="text", task=case.task)
        example = jnp.zeros((1, case.seq_len), jnp.int32)
    elif case.is_text:
        torch_model = reference.text_model(case.model, case.vocab_size)
        flax_model = get_text_model(TEXT_NAMES.get(case.model, case.model), vocab_size=case.vocab_size)
        example = jnp.zeros((1, case.seq_len), jnp.int32)
    else:
        torch_model = reference.vision_model(case.model, num_classes=case.num_classes, shape=case.image_shape,
                                             data_name=case.data_name)
        c, h, w = case.image_shape
        flax_model = models.for_data(case.model, case.data_name, num_classes=case.num_classes, num_channels=c)
        example = jnp.zeros((1, h, w, c), jnp.float64 if case.precision == "float64" else jnp.float32)
    torch_model = torch_model.to(_torch_dtype(case))
    if case.buffers_sent and not case.is_text:
        _calibrate_buffers(torch_model, case)
    template = flax_model.init(jax.random.key(0), example)
    variables = interop.variables_from_torch(torch_model, template)
    return torch_model, flax_model, variables


def _calibrate_buffers(torch_model, case: Case) -> None:
    """Give the server's BatchNorm statistics the values of a real model: averages over a batch.

    Arbitrary statistics leave eval-mode activations badly scaled, and the gradients of a deep
    net then cancel so much that torch's own float32 result is 1e-2 away from its float64 one.
    """
    generator = torch.Generator().manual_seed(case.seed + 1)
    batch = torch.randn((16,) + tuple(case.image_shape), generator=generator, dtype=_torch_dtype(case))
    momenta = {}
    for module in torch_model.modules():
        if hasattr(module, "momentum"):
            momenta[module], module.momentum = module.momentum, None
    was_training = torch_model.training
    torch_model.train()
    with torch.no_grad():
        torch_model(batch)
    torch_model.train(was_training)
    for module, momentum in momenta.items():
        module.momentum = momentum


def build_data(case: Case, num_users: int = 1):
    """Per-user torch data dicts (the reference's layout)."""
    generator = torch.Generator().manual_seed(case.seed + 100)
    users = []
    for _ in range(num_users):
        if case.is_text:
            ids = torch.randint(0, case.vocab_size, (case.num_examples, case.seq_len), generator=generator)
            users.append(dict(input_ids=ids, labels=ids.clone()))
        else:
            x = torch.randn((case.num_examples,) + tuple(case.image_shape), generator=generator,
                            dtype=_torch_dtype(case))
            y = torch.randint(0, case.num_classes, (case.num_examples,), generator=generator)
            users.append(dict(inputs=x, labels=y))
    return users


def torch_loss(case: Case):
    """The loss breaching pairs with the task."""
    if case.task == "masked-lm":
        return reference.losses_module().MLMLoss(vocab_size=case.vocab_size)
    if case.is_text:
        return reference.losses_module().CausalLoss()
    return torch.nn.CrossEntropyLoss()


def server_payload(torch_model, case: Case) -> dict:
    """The reference's payload: parameter and buffer lists (buffers only if the server sends them)."""
    return parity_check.server_payload(torch_model, case.buffers_sent)


def reference_class(cfg: fu.UserConfig) -> type:
    """breaching's user class for ``cfg`` (an aggregate's single users are resolved by check_parity)."""
    users = reference.users_module()
    return users.UserMultiStep if cfg.is_multi_step else users.UserSingleStep


def reference_user(case: Case, torch_model, data: dict, cfg: fu.UserConfig, multi_step: bool):
    """A breaching user object (fresh state) over a one-batch dataloader."""
    users = reference.users_module()
    cls = users.UserMultiStep if multi_step else users.UserSingleStep
    return parity_check.reference_user(cls, torch_model, torch_loss(case), data, cfg)


# ----------------------------------------------------------------------------------------------
# Running a case


def _user_cfg(case: Case, **changes) -> fu.UserConfig:
    return fu.UserConfig.from_dict({**case.user_config(), **changes})


def _probe_user(case, torch_model, data, cfg):
    """A single-step reference user to measure gradient norms on custom data."""
    user = reference_user(case, torch_model, data, cfg, multi_step=False)
    user.data_key = "input_ids" if "input_ids" in data else "inputs"  # set by _load_data otherwise
    return user


def _clip_bound(case, torch_model, data, cfg, multi_step) -> float:
    """A clipping bound that clips some examples and not others (median of the per-example norms)."""
    if multi_step:
        probe = _probe_user(case, torch_model, data, cfg)
        shared, _ = probe.compute_local_updates(server_payload(torch_model, case), custom_data=dict(data))
        norm = torch.norm(torch.stack([torch.norm(g) for g in shared["gradients"]])).item()
        return 0.5 * norm
    norms = []
    for i in range(data["labels"].shape[0]):
        user = _probe_user(case, torch_model, data, cfg)
        one = {k: v[i:i + 1] for k, v in data.items()}
        shared, _ = user.compute_local_updates(server_payload(torch_model, case), custom_data=one)
        norms.append(torch.norm(torch.stack([torch.norm(g) for g in shared["gradients"]])).item())
    return float(np.median(norms))


def case_config(case: Case, torch_model, users_data) -> fu.UserConfig:
    """The user config of ``case``: its defence's clipping bound or noise scale filled in."""
    cfg = _user_cfg(case)
    ldp = cfg.local_diff_privacy
    if case.defence == "clip":
        ldp = dataclasses.replace(ldp, per_example_clipping=_clip_bound(case, torch_model, users_data[0], cfg,
                                                                        cfg.is_multi_step))
    elif case.defence in ("input_noise", "gradient_noise"):
        ldp = dataclasses.replace(ldp, **{case.defence: NOISE_SCALE})
    return cfg.replace(local_diff_privacy=ldp)


def case_setting(case: Case) -> tuple[parity_check.Setting, torch.nn.Module, list[dict]]:
    """What ``case`` compares: its :class:`~fedjax_users.interop.parity_check.Setting`, torch model and users' data."""
    torch_model, flax_model, _ = build_models(case)
    users_data = build_data(case, case.num_users if case.user == "aggregate" else 1)
    cfg = case_config(case, torch_model, users_data)
    setting = parity_check.Setting(reference_class(cfg), torch_loss(case), cfg, buffers_sent=case.buffers_sent,
                                   queries=case.queries, flax_model=flax_model)
    return setting, torch_model, users_data


def run_case(case: Case, bound: Optional[float] = None) -> Result:
    """Run ``case`` on both sides and compare everything the server and the attacker see.

    ``bound``: instead of the case's own (``bound=0`` sends every run to the yardsticks of a miss)."""
    setting, torch_model, users_data = case_setting(case)
    return parity_check.compare(setting, torch_model, users_data, bound=case.bound if bound is None else bound,
                                seed=case.seed, name=case.name, check=False)
