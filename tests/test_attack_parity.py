"""Attack parity with breaching: the candidate-data gradient of its attack objectives, on our users.

breaching's optimisation attacks score a candidate batch with an objective
(``breaching/attacks/auxiliaries/objectives.py``: ``Euclidean``, ``CosineSimilarity``) that
recomputes the user's update on the candidate with ``torch.autograd.grad(..., create_graph=True)``
and compares it with the observed one; the attack then differentiates that objective with respect
to the candidate (double backward). Here the same distances are computed on *our* users'
updates (``fu.local_gradient`` / ``fu.local_update`` on the candidate) and differentiated with
``jax.grad``, on lenet_zhu with the weights of the parity harness, in float32 and float64:

* single-step users: equal to breaching's objective (``_grad_fn_single_step``);
* multi-step users: equal to a torch re-simulation of ``UserMultiStep``'s exact steps
  (``torch_user_update``), and to breaching's ``_grad_fn_multi_step`` where that simulates the
  user faithfully. Where it does not is pinned on breaching itself (``test_breaching_objective_*``):
  it pairs each step with the *sorted* labels the user reports, leaves out clipping and noise, wraps
  its steps around the candidate batch rather than ``num_data_points``, and updates no BatchNorm
  statistics. An attack through the exact user has none of these gaps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from typing import Callable, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
reference = pytest.importorskip("parity.reference")
harness = pytest.importorskip("parity.harness")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fedjax_users as fu  # noqa: E402
from fedjax_users import attacks, interop  # noqa: E402
from parity.cases import Case  # noqa: E402

# max |ours - reference| / max |reference| of the candidate gradient, and the relative error of the
# objective's value. Measured: up to 5.5e-6 in float32 (a double backward through three local steps
# in both frameworks' float32 rounding), 4.4e-15 in float64; the float64 bound is the parity suite's.
BOUNDS = {"float32": 3e-5, "float64": 1e-10}
OBJECTIVES = {"Euclidean": attacks.euclidean_distance, "CosineSimilarity": attacks.cosine_distance}
# 3 examples in steps of 2: steps (0, 2), (2, 1), (1, 2); the second is short, the third wraps.
MULTI_STEP_EXAMPLES = 3


@functools.lru_cache(maxsize=None)
def objectives_module():
    """breaching's ``attacks/auxiliaries/objectives.py``, loaded with torch alone as ``parity.reference``
    loads breaching's files (inside its stand-in package; ``attacks/__init__.py`` is not run)."""
    reference.users_module()  # the stand-in package and stubs
    root = os.path.join(reference.breaching_root(), "attacks")
    package = f"{reference.PACKAGE}.attacks"
    reference._package(package, root)
    reference._package(f"{package}.auxiliaries", os.path.join(root, "auxiliaries"))
    return reference._load(f"{package}.auxiliaries.objectives", os.path.join(root, "auxiliaries", "objectives.py"))


def _setup(precision: str, user: str, num_examples: int, model: str = "lenet_zhu", image_shape=(3, 32, 32)):
    """The parity harness's case, models with one set of weights, and the user's true data."""
    case = Case(model, user, False, precision=precision, num_examples=num_examples, image_shape=image_shape)
    torch_model, flax_model, variables = harness.build_models(case)
    return case, torch_model, flax_model, variables, harness.build_data(case)[0]


def _candidate(like: "torch.Tensor", seed: int = 7) -> "torch.Tensor":
    """Random candidate images shaped and typed like the true ones."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(like.shape, generator=generator, dtype=torch.float64).to(like.dtype)


def _observed(case: Case, torch_model, data: dict, cfg: fu.UserConfig) -> dict:
    """What breaching's own user class shares for ``data``; the model is left at the server's state.

    (``UserMultiStep`` trains the model it is given in place: the attacker's copy must hold the
    server's parameters and buffers again.)
    """
    server = [t.detach().clone() for t in list(torch_model.parameters()) + list(torch_model.buffers())]
    user = harness.reference_user(case, torch_model, data, cfg, multi_step=cfg.is_multi_step)
    shared, _ = user.compute_local_updates(harness.server_payload(torch_model, case))
    with torch.no_grad():
        for tensor, value in zip(list(torch_model.parameters()) + list(torch_model.buffers()), server):
            tensor.copy_(value)
    return shared


def breaching_gradient(name: str, torch_model, observed: list, candidate, labels,
                       local_hyperparams: Optional[dict] = None) -> tuple[float, "torch.Tensor"]:
    """breaching's objective ``name`` at ``candidate`` and its gradient there (double backward)."""
    objective = getattr(objectives_module(), name)()
    objective.initialize(torch.nn.CrossEntropyLoss(), types.SimpleNamespace(mixed_precision=False), local_hyperparams)
    candidate = candidate.clone().requires_grad_(True)
    value, _ = objective(torch_model, observed, candidate, labels)
    (gradient,) = torch.autograd.grad(value, candidate)
    return float(value.detach()), gradient


@functools.lru_cache(maxsize=None)
def _our_objectives(flax_model, cfg: fu.UserConfig) -> Callable:
    """jit of (candidate, labels, params, observed) -> {objective: (value, candidate gradient)} through our user."""
    run = fu.local_update if cfg.is_multi_step else fu.local_gradient

    def values_and_gradients(candidate, labels, params, observed):
        def update(x):
            payload = fu.ServerPayload(params=params, batch_stats=None)
            shared, _, _ = run(flax_model, payload, fu.UserData(inputs=x, labels=labels), cfg, jax.random.key(0))
            return shared.gradients

        return {name: jax.value_and_grad(lambda x: distance(update(x), observed))(candidate)
                for name, distance in OBJECTIVES.items()}

    return jax.jit(values_and_gradients)


def our_gradients(flax_model, variables, cfg, torch_model, observed: list, candidate, labels) -> dict:
    """{objective: (value, candidate gradient in NCHW)} of breaching's distances on our user's update."""
    observed_tree = interop.grads_from_torch_list(observed, torch_model, variables)
    out = _our_objectives(flax_model, cfg)(
        interop.nchw_to_nhwc(candidate), jnp.asarray(labels.numpy(), jnp.int32), variables["params"], observed_tree
    )
    return {name: (float(value), np.transpose(np.asarray(grad), (0, 3, 1, 2))) for name, (value, grad) in out.items()}


def assert_close(ours: tuple, theirs: tuple, bound: float) -> None:
    """Equal objective values and candidate gradients, relative to the reference's largest entry."""
    (value, gradient), (their_value, their_gradient) = ours, theirs
    their_gradient = their_gradient.detach().double().numpy()
    assert abs(value - their_value) <= bound * max(abs(their_value), 1e-30), (value, their_value)
    error = float(np.max(np.abs(gradient - their_gradient)) / np.max(np.abs(their_gradient)))
    assert error <= bound, error


def torch_user_update(torch_model, candidate, labels, cfg: fu.UserConfig) -> list:
    """``UserMultiStep``'s local steps re-simulated in torch, differentiably (``create_graph``).

    As the user: step ``i`` takes ``data[seen : seen + k]`` with its *own* labels, ``seen`` wraps
    modulo ``num_data_points``; each step's batch gradient is clipped as ``_clip_list_of_grad_``
    does (out of place, so that it stays differentiable); plain SGD; the parameter difference.
    """
    names = [name for name, _ in torch_model.named_parameters()]
    server = [p.detach().clone().requires_grad_(True) for p in torch_model.parameters()]
    current, seen, clip = list(server), 0, cfg.local_diff_privacy.per_example_clipping
    for _ in range(cfg.num_local_updates):
        x = candidate[seen : seen + cfg.num_data_per_local_update_step]
        y = labels[seen : seen + cfg.num_data_per_local_update_step]
        seen = (seen + cfg.num_data_per_local_update_step) % cfg.num_data_points
        logits = torch.func.functional_call(torch_model, dict(zip(names, current)), (x,))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), current, create_graph=True)
        if clip > 0:
            norm = torch.norm(torch.stack([torch.norm(g, 2) for g in grads]), 2)
            factor = torch.where(norm > clip, clip / (norm + 1e-6), torch.ones_like(norm))
            grads = [g * factor for g in grads]
        current = [p - cfg.local_learning_rate * g for p, g in zip(current, grads)]
    return [after - before for after, before in zip(current, server)]


def resimulated_gradients(torch_model, observed: list, candidate, labels, cfg) -> dict:
    """{objective: (value, candidate gradient)} of breaching's distances on ``torch_user_update``."""
    out = {}
    for name in OBJECTIVES:
        x = candidate.clone().requires_grad_(True)
        simulated = torch_user_update(torch_model, x, labels, cfg)
        distance = getattr(objectives_module(), name)().gradient_based_loss(simulated, observed)
        (gradient,) = torch.autograd.grad(distance, x)
        out[name] = (float(distance.detach()), gradient)
    return out


def _x64(precision: str):
    return jax.enable_x64(precision == "float64")


# ----------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_single_step_objectives_equal_breachings(precision):
    with _x64(precision):
        case, torch_model, flax_model, variables, data = _setup(precision, "local_gradient", 2)
        cfg = fu.UserConfig.from_dict(case.user_config())
        observed = _observed(case, torch_model, data, cfg)["gradients"]
        candidate = _candidate(data["inputs"])
        ours = our_gradients(flax_model, variables, cfg, torch_model, observed, candidate, data["labels"])
    for name in OBJECTIVES:
        assert_close(ours[name], breaching_gradient(name, torch_model, observed, candidate, data["labels"]),
                     BOUNDS[precision])


@pytest.mark.parametrize("clip", [False, True], ids=["no-defence", "clip"])
# float64 holds the comparison to the tighter bound; the float32 runs of the same path are in the
# slower tier (make test-full), and the single-step objectives stay compared in both precisions.
@pytest.mark.parametrize("precision", [pytest.param("float32", marks=pytest.mark.slow), "float64"])
def test_multi_step_objectives_equal_a_torch_resimulation_of_the_user(precision, clip):
    with _x64(precision):
        case, torch_model, flax_model, variables, data = _setup(precision, "local_update", MULTI_STEP_EXAMPLES)
        cfg = fu.UserConfig.from_dict(case.user_config())
        if clip:
            # Half the full batch's gradient norm: some steps clipped (harness._clip_bound, as parity's clip cases).
            bound = harness._clip_bound(case, torch_model, data, cfg, multi_step=True)
            cfg = cfg.replace(local_diff_privacy=dataclasses.replace(cfg.local_diff_privacy, per_example_clipping=bound))
        observed = _observed(case, torch_model, data, cfg)["gradients"]
        candidate = _candidate(data["inputs"])
        ours = our_gradients(flax_model, variables, cfg, torch_model, observed, candidate, data["labels"])
    theirs = resimulated_gradients(torch_model, observed, candidate, data["labels"], cfg)
    for name in OBJECTIVES:
        assert_close(ours[name], theirs[name], BOUNDS[precision])


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_multi_step_objectives_equal_breachings_where_it_simulates_the_user(precision):
    # Each step's labels already sorted and no defence: breaching's simulation is then the user's.
    with _x64(precision):
        case, torch_model, flax_model, variables, data = _setup(precision, "local_update", MULTI_STEP_EXAMPLES)
        data = dict(data, labels=torch.tensor([1, 4, 7]))  # steps [1, 4], [7], [4, 7]
        cfg = fu.UserConfig.from_dict(case.user_config())
        shared = _observed(case, torch_model, data, cfg)
        candidate = _candidate(data["inputs"])
        ours = our_gradients(flax_model, variables, cfg, torch_model, shared["gradients"], candidate, data["labels"])
    hyperparams = shared["metadata"]["local_hyperparams"]
    for name in OBJECTIVES:
        theirs = breaching_gradient(name, torch_model, shared["gradients"], candidate, data["labels"], hyperparams)
        assert_close(ours[name], theirs, BOUNDS[precision])


# ----------------------------------------------------------------------------------------------
# Where breaching's multi-step objective departs from its own UserMultiStep (float64, breaching only)


def _objective_at(torch_model, shared: dict, candidate, labels) -> float:
    """breaching's Euclidean objective at ``candidate``, relative to ``0.5 |observed|^2``: 0 iff it reproduces the update."""
    value, _ = breaching_gradient("Euclidean", torch_model, shared["gradients"], candidate, labels,
                                  shared["metadata"]["local_hyperparams"])
    return value / (0.5 * sum(float(torch.sum(g.double() ** 2)) for g in shared["gradients"]))


def _multi_step_user(labels=(1, 4, 7), model="lenet_zhu", image_shape=(3, 32, 32), steps=3, per_step=2,
                     **dp) -> tuple:
    """A float64 torch model as the parity harness builds it (no Flax side) and one multi-step user's
    shared data for ``len(labels)`` examples with ``labels``; ``dp``: local_diff_privacy keys."""
    case = Case(model, "local_update", False, precision="float64", num_examples=len(labels), image_shape=image_shape)
    torch.manual_seed(case.seed)
    torch_model = reference.vision_model(case.model, case.num_classes, case.image_shape).double()
    data = dict(harness.build_data(case)[0], labels=torch.tensor(labels))
    cfg = fu.UserConfig.from_dict({**case.user_config(), "num_local_updates": steps,
                                   "num_data_per_local_update_step": per_step})
    cfg = cfg.replace(local_diff_privacy=dataclasses.replace(cfg.local_diff_privacy, **dp))
    return torch_model, data, _observed(case, torch_model, data, cfg)


# At the user's own data, an objective that simulates the user is 0 up to float64 rounding.
REPRODUCED = 1e-20
DEPARTED = 1e-6


def test_breaching_objective_reproduces_the_user_with_sorted_step_labels_and_no_defence():
    torch_model, data, shared = _multi_step_user()
    # Steps (0, 2), (2, 1), (1, 2): a short step and a wrap around the data, the same in both.
    assert _objective_at(torch_model, shared, data["inputs"], data["labels"]) < REPRODUCED


def test_breaching_objective_pairs_each_step_with_sorted_labels():
    # The user trains its first step on labels [4, 1] but reports them sorted, [1, 4]; the objective
    # trains the candidate's first two examples on [1, 4], so the true data no longer reproduces the update.
    torch_model, data, shared = _multi_step_user(labels=(4, 1, 7))
    assert [s.tolist() for s in shared["metadata"]["local_hyperparams"]["labels"]] == [[1, 4], [7], [1, 7]]
    assert _objective_at(torch_model, shared, data["inputs"], data["labels"]) > DEPARTED
    # Reordering the true examples to the sorted labels cannot fix it for both steps that hold them.
    swapped = data["inputs"][[1, 0, 2]]
    assert _objective_at(torch_model, shared, swapped, data["labels"]) > DEPARTED


@pytest.mark.parametrize("defence", [dict(per_example_clipping=0.05), dict(gradient_noise=0.01)], ids=["clip", "noise"])
def test_breaching_objective_leaves_out_clipping_and_noise(defence):
    torch.manual_seed(0)
    torch_model, data, shared = _multi_step_user(**defence)
    assert _objective_at(torch_model, shared, data["inputs"], data["labels"]) > DEPARTED


def test_breaching_objective_wraps_around_the_candidate_batch_not_the_users_data():
    # The user wraps modulo num_data_points, the objective modulo the candidate's rows. 4 examples in
    # 3 steps of 2: the user's steps are (0, 2), (2, 2), (0, 2); on the true data and two more rows
    # the objective's are (0, 2), (2, 2), (4, 2), and the true data no longer reproduces the update.
    # (UserMultiStep and fu.local_update read the first num_data_points rows only.)
    torch_model, data, shared = _multi_step_user(labels=(1, 4, 2, 7))
    assert _objective_at(torch_model, shared, data["inputs"], data["labels"]) < REPRODUCED
    padded = torch.cat([data["inputs"], data["inputs"][2:]])  # the third step now sees examples 2, 3
    assert _objective_at(torch_model, shared, padded, data["labels"]) > DEPARTED
    # Where the extra rows change a short step's length, the reported labels no longer fit at all:
    # 3 examples, steps (0, 2), (2, 1), (1, 2); on 4 rows the second step holds 2 rows for 1 label.
    torch_model, data, shared = _multi_step_user()
    with pytest.raises(ValueError, match="batch_size"):
        _objective_at(torch_model, shared, torch.cat([data["inputs"], data["inputs"][:1]]), data["labels"])


def test_breaching_objective_updates_no_batchnorm_statistics():
    # A BatchNorm model in train mode (no server buffers): the user's running statistics move with
    # every step and are shared; the objective computes the parameter difference only (matched
    # exactly: train-mode steps do not read the running statistics) and leaves the statistics as
    # they were, so it has nothing to compare with the shared buffers.
    torch_model, data, shared = _multi_step_user(labels=(2, 5), model="resnet20", image_shape=(3, 8, 8), steps=2,
                                                 per_step=1)
    server = [b.detach().clone() for b in torch_model.buffers()]
    assert torch_model.training  # as the user left it: train mode, the attacker's model too
    assert _objective_at(torch_model, shared, data["inputs"], data["labels"]) < REPRODUCED
    moved = [float((b.double() - s.double()).abs().max()) for b, s in zip(shared["buffers"], server)]
    assert max(moved) > 1e-3  # the user's shared statistics moved
    assert all(torch.equal(b, s) for b, s in zip(torch_model.buffers(), server))  # the objective's did not
