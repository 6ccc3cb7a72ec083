"""breaching's own attackers, run unchanged on updates from the drop-in user (``fedjax_users.interop.breaching``).

The route "breaching's attacker on our user" (``docs/attacks.md``): the attack code of breaching 0.1.2
(``breaching/attacks``, loaded with torch alone by ``parity.reference.attacks_module``, configs
composed from ``breaching/config/attack`` by ``parity.reference.attack_config``) takes the
``shared_data`` and ``server_payload`` of our ``UserSingleStep`` / ``UserMultiStep`` and must
reconstruct what it reconstructs from breaching's own user on the same weights and data, with the
same seed: ``OptimizationBasedAttacker`` with ``invertinggradients`` (cosine similarity, total
variation, signed Adam, boxed; iterations cut for a CPU) on lenet_zhu, and ``AnalyticAttacker``
on breaching's ``linear`` model, whose one-example inversion is exact.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
reference = pytest.importorskip("parity.reference")
omegaconf = pytest.importorskip("omegaconf")

from fedjax_users.interop import breaching as drop_in  # noqa: E402

SETUP = dict(device=torch.device("cpu"), dtype=torch.float32)
# Few iterations keep the test fast; the comparison is iteration by iteration (the objective trace).
ITERATIONS = 6
# Two float32 pipelines (XLA and torch) agree on the update to ~1e-6 of its scale; the attack's
# candidate moves by +-step_size per iteration (signed gradients), so agreement means every sign
# agreed and the rest is rounding.
TOLERANCE = 1e-5


class Loader(list):
    """A one-batch dataloader with the ``name`` breaching's ``__repr__`` prints."""

    name = "synthetic"


def user_config(multi_step: bool):
    cfg = dict(user_type="local_update" if multi_step else "local_gradient", num_data_points=2, provide_labels=True,
               provide_buffers=False, provide_num_data_points=True,
               local_diff_privacy=dict(gradient_noise=0.0, input_noise=0.0, distribution="gaussian",
                                       per_example_clipping=0.0))
    if multi_step:
        cfg.update(num_local_updates=2, num_data_per_local_update_step=1, local_learning_rate=1e-2,
                   provide_local_hyperparams=True)
    return omegaconf.OmegaConf.create(cfg)


def model_and_data(name: str, num: int):
    torch.manual_seed(0)
    model = reference.vision_model(name)
    model.name = name
    generator = torch.Generator().manual_seed(1)
    data = dict(inputs=torch.rand((num, 3, 32, 32), generator=generator) * 2 - 1, labels=torch.tensor([3, 7][:num]))
    return model, Loader([data])


def shared_from(user_module, model, loader, cfg):
    """One query of the user class ``user_module.<UserSingleStep|UserMultiStep>``: payload and shared data."""
    cls = getattr(user_module, "UserMultiStep" if cfg.user_type == "local_update" else "UserSingleStep")
    user = cls(model, torch.nn.CrossEntropyLoss(), loader, SETUP, 0, cfg)
    payload = dict(parameters=[p.detach().clone() for p in model.parameters()], buffers=None,
                   metadata=reference.data_config("CIFAR10"))
    shared, true_data = user.compute_local_updates(payload)
    return payload, shared, true_data


def reconstruct(attack: str, model, payload, shared, overrides=()):
    """breaching's attacker for ``attack`` on one query, from a fixed seed."""
    attacks = reference.attacks_module()
    torch.manual_seed(5)
    attacker = attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), reference.attack_config(attack, overrides),
                                      SETUP)
    return attacker.reconstruct([payload], [shared], server_secrets={}, dryrun=False)


@pytest.mark.parametrize("multi_step", [False, True], ids=["local_gradient", "local_update"])
def test_invertinggradients_reconstructs_alike_on_our_user(multi_step):
    model, loader = model_and_data("lenet_zhu", 2)
    cfg = user_config(multi_step)
    overrides = [f"optim.max_iterations={ITERATIONS}", "optim.callback=1000"]
    results = {}
    for side, module in (("breaching", reference.users_module()), ("ours", drop_in)):
        payload, shared, _ = shared_from(module, model, loader, cfg)
        results[side] = reconstruct("invertinggradients", model, payload, shared, overrides)
    (theirs, their_stats), (ours, our_stats) = results["breaching"], results["ours"]
    assert torch.equal(ours["labels"], theirs["labels"])
    assert ours["data"].shape == theirs["data"].shape == (2, 3, 32, 32)
    assert (ours["data"] - theirs["data"]).abs().max().item() <= TOLERANCE
    trace, their_trace = our_stats["Trial_0_Val"], their_stats["Trial_0_Val"]
    assert len(trace) == len(their_trace) == ITERATIONS
    assert max(abs(a - b) for a, b in zip(trace, their_trace)) <= TOLERANCE * max(abs(b) for b in their_trace)
    # The attack did something: the candidate left its random start and the objective fell.
    assert their_trace[-1] < their_trace[0]


def test_analytic_attack_inverts_our_users_linear_layer_exactly():
    model, loader = model_and_data("linear", 1)
    cfg = omegaconf.OmegaConf.merge(user_config(False), dict(num_data_points=1))
    results = {}
    for side, module in (("breaching", reference.users_module()), ("ours", drop_in)):
        payload, shared, true_data = shared_from(module, model, loader, cfg)
        results[side] = reconstruct("analytic", model, payload, shared)[0]
    truth = true_data["data"]
    assert (results["ours"]["data"] - results["breaching"]["data"]).abs().max().item() <= TOLERANCE
    # One example through Flatten + Linear: weight_grad[label] / bias_grad[label] is the image itself.
    assert (results["ours"]["data"] - truth).abs().max().item() <= TOLERANCE


def measure() -> dict:
    """The numbers docs/attacks.md quotes: largest reconstruction difference, ours vs breaching's user."""
    found = {}
    for multi_step in (False, True):
        model, loader = model_and_data("lenet_zhu", 2)
        cfg = user_config(multi_step)
        runs = [reconstruct("invertinggradients", model, *shared_from(module, model, loader, cfg)[:2],
                            [f"optim.max_iterations={ITERATIONS}"])
                for module in (reference.users_module(), drop_in)]
        (theirs, their_stats), (ours, our_stats) = runs
        found[f"invertinggradients {cfg.user_type}"] = dict(
            max_abs_data=(ours["data"] - theirs["data"]).abs().max().item(),
            objective_first_last=(their_stats["Trial_0_Val"][0], their_stats["Trial_0_Val"][-1]))
    model, loader = model_and_data("linear", 1)
    cfg = omegaconf.OmegaConf.merge(user_config(False), dict(num_data_points=1))
    outs = [reconstruct("analytic", model, *shared_from(module, model, loader, cfg)[:2])[0]
            for module in (reference.users_module(), drop_in)]
    truth = loader[0]["inputs"]
    found["analytic linear"] = dict(max_abs_data=(outs[1]["data"] - outs[0]["data"]).abs().max().item(),
                                    ours_vs_true=(outs[1]["data"] - truth).abs().max().item())
    return found


if __name__ == "__main__":  # python tests/test_breaching_attack.py
    for what, numbers in measure().items():
        print(what, numbers)
