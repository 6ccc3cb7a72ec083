"""Run one parity case: breaching's own user class and fedjax_users on the same model, weights and data.

The reference side is breaching 0.1.2's ``UserSingleStep`` / ``UserMultiStep`` loaded by
``parity.reference`` and run unmodified; the aggregate is compared with the mean of the reference's
single-user results (its own ``MultiUserAggregate`` is defective, see ``tests/parity``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

import fedjax_users as fu
from fedjax_users import interop, losses, models
from fedjax_users.models.text import get_text_model
from parity import reference
from parity.cases import Case

NOISE_SCALE = 0.05
# A gradient or parameter difference beyond this magnitude means the case's local training diverged.
DIVERGED = 1e6
# How far float32 rounding alone can move the reference's result (see ``_reference_spread``): its
# float32 run is repeated on weights, buffers and inputs perturbed by this relative amount (about
# the float32 forward error of either framework a few layers deep, ~4-8 ulp), ``SPREAD_DRAWS`` times.
SPREAD_PERTURBATION = 5e-7
SPREAD_DRAWS = 4
# The parity grid names breaching's text ``linear`` apart from its vision ``linear``.
TEXT_NAMES = {"linear-text": "linear"}


@dataclasses.dataclass
class Result:
    """Outcome of one case: worst errors over everything compared, and the bound they must meet."""

    name: str
    max_abs: float
    max_rel: float
    bound: float
    passed: bool
    detail: str = ""
    # Set when the float32 bound was missed and the float64 reference was the yardstick.
    ours_vs_float64: Optional[float] = None
    reference_vs_float64: Optional[float] = None
    # Set when that was missed too: the worst distance to float64 of the reference's float32 runs
    # on inputs perturbed far below float32 resolution of the result (``_reference_spread``).
    reference_spread: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


class _Errors:
    """Accumulates max abs / relative error of tensors and exact checks of metadata."""

    def __init__(self):
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.mismatches: list[str] = []

    def _pairs(self, what: str, ours: list, theirs: list) -> list[tuple[np.ndarray, np.ndarray]]:
        pairs = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a = np.asarray(a.detach().cpu().double().numpy() if torch.is_tensor(a) else a, dtype=np.float64)
            b = np.asarray(b.detach().cpu().double().numpy() if torch.is_tensor(b) else b, dtype=np.float64)
            if a.shape != b.shape:
                self.mismatches.append(f"{what}[{i}]: shape {a.shape} vs {b.shape}")
            else:
                pairs.append((a, b))
        return pairs

    def tensors(self, what: str, ours, theirs) -> None:
        self.tensor_lists(what, [ours], [theirs])

    def tensor_lists(self, what: str, ours: Optional[list], theirs: Optional[list]) -> None:
        """Max abs error, and that error relative to the largest reference entry of the whole list.

        The scale is the whole gradient's (all tensors), not each tensor's: a tensor whose exact
        value is zero (a conv bias before train-mode BatchNorm) holds only rounding noise, and its
        own maximum would turn 1e-7 of noise into a huge ratio.
        """
        if theirs is None or ours is None:
            if (theirs is None) != (ours is None):
                self.mismatches.append(f"{what}: {'missing' if ours is None else 'unexpected'}")
            return
        if len(ours) != len(theirs):
            self.mismatches.append(f"{what}: {len(ours)} vs {len(theirs)} entries")
            return
        pairs = [(a, b) for a, b in self._pairs(what, ours, theirs) if a.size]
        if not pairs:
            return
        err = max(float(np.max(np.abs(a - b))) for a, b in pairs)
        scale = max(float(np.max(np.abs(b))) for _, b in pairs)
        if not np.isfinite(scale) or scale > DIVERGED:
            # Overflowing numbers agree or disagree by chance: such a case must change, not pass.
            self.mismatches.append(f"{what}: the reference diverged (max |entry| {scale:.3g})")
        self.max_abs = max(self.max_abs, err)
        self.max_rel = max(self.max_rel, err / scale if scale > 0 else err)

    def equal(self, what: str, ours, theirs) -> None:
        if torch.is_tensor(theirs) or isinstance(ours, (jax.Array, np.ndarray)):
            if ours is None or theirs is None or not np.array_equal(np.asarray(ours), np.asarray(theirs)):
                self.mismatches.append(f"{what}: {ours} vs {theirs}")
        elif ours != theirs:
            self.mismatches.append(f"{what}: {ours!r} vs {theirs!r}")


# ----------------------------------------------------------------------------------------------
# Building both sides


def _torch_dtype(case: Case):
    return torch.float64 if case.precision == "float64" else torch.float32


def build_models(case: Case):
    """The reference torch model and the Flax model, holding the same weights."""
    torch.manual_seed(case.seed)
    if case.is_text:
        torch_model = reference.text_model(case.model, case.vocab_size)
        flax_model = get_text_model(TEXT_NAMES.get(case.model, case.model), vocab_size=case.vocab_size)
        example = jnp.zeros((1, case.seq_len), jnp.int32)
    else:
        torch_model = reference.vision_model(case.model, num_classes=case.num_classes, shape=case.image_shape)
        c, h, w = case.image_shape
        flax_model = models.get(case.model, num_classes=case.num_classes, num_channels=c)
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
    """Per-user torch data dicts (the reference's layout) and the same data for JAX."""
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


def to_user_data(torch_data: dict) -> fu.UserData:
    """A reference data dict as fedjax_users data (NCHW -> NHWC for images)."""
    if "input_ids" in torch_data:
        inputs = jnp.asarray(torch_data["input_ids"].numpy().astype(np.int32))
    else:
        inputs = interop.nchw_to_nhwc(torch_data["inputs"])
    return fu.UserData(inputs=inputs, labels=jnp.asarray(torch_data["labels"].numpy().astype(np.int32)))


def torch_loss(case: Case):
    """The loss breaching pairs with the task."""
    if case.is_text:
        return reference.losses_module().CausalLoss()
    return torch.nn.CrossEntropyLoss()


def jax_loss(case: Case):
    """The matching per-example loss of fedjax_users."""
    return losses.causal_lm_loss if case.is_text else losses.softmax_cross_entropy


def server_payload(torch_model, case: Case) -> dict:
    """The reference's payload: parameter and buffer lists (buffers only if the server sends them)."""
    parameters = [p.detach().clone() for p in torch_model.parameters()]
    buffers = [b.detach().clone() for b in torch_model.buffers()] if case.buffers_sent else None
    return dict(parameters=parameters, buffers=buffers)


def jax_payload(variables: dict, case: Case) -> fu.ServerPayload:
    """The same payload as fedjax_users sees it."""
    # A server that sends buffers of a model without any sends an empty list: still eval mode.
    stats = variables.get("batch_stats", {}) if case.buffers_sent else None
    return fu.ServerPayload(params=variables["params"], batch_stats=stats)


def reference_user(case: Case, torch_model, data: dict, cfg: fu.UserConfig, multi_step: bool):
    """A breaching user object (fresh state) over a one-batch dataloader."""
    users = reference.users_module()
    cls = users.UserMultiStep if multi_step else users.UserSingleStep
    setup = dict(device=torch.device("cpu"), dtype=_torch_dtype(case))
    cfg_user = OmegaConf.create(cfg.to_dict())
    return cls(torch_model, torch_loss(case), [data], setup, idx=0, cfg_user=cfg_user)


# ----------------------------------------------------------------------------------------------
# Comparisons


def _compare_shared(errors: _Errors, ours: fu.SharedData, theirs: dict, torch_model, prefix: str = "") -> None:
    errors.tensor_lists(prefix + "gradients", interop.grads_to_torch_list(ours.gradients, torch_model),
                        theirs["gradients"])
    our_buffers = None if ours.batch_stats is None else interop.buffers_to_torch_list(ours.batch_stats,
                                                                                          torch_model)
    errors.tensor_lists(prefix + "buffers", our_buffers, theirs["buffers"])


def _compare_metadata(errors: _Errors, ours: fu.Metadata, theirs: dict) -> None:
    errors.equal("metadata.num_data_points", ours.num_data_points, theirs.get("num_data_points"))
    errors.equal("metadata.labels", ours.labels, theirs.get("labels"))
    errors.equal("metadata.data_key", ours.data_key, theirs.get("data_key"))
    errors.equal("metadata.num_users", ours.num_users, theirs.get("num_users"))
    hp_ours, hp_theirs = ours.local_hyperparams, theirs.get("local_hyperparams")
    if (hp_ours is None) != (hp_theirs is None):
        errors.mismatches.append(f"metadata.local_hyperparams: {hp_ours} vs {hp_theirs}")
    elif hp_ours is not None:
        for key in ("lr", "steps", "data_per_step"):
            errors.equal(f"metadata.local_hyperparams.{key}", getattr(hp_ours, key), hp_theirs[key])
        if len(hp_ours.labels) != len(hp_theirs["labels"]):
            errors.mismatches.append("metadata.local_hyperparams.labels: different step counts")
        for i, (a, b) in enumerate(zip(hp_ours.labels, hp_theirs["labels"])):
            errors.equal(f"metadata.local_hyperparams.labels[{i}]", a, b)


KS_SAMPLES = 20_000


def _ks_noise(errors: _Errors, what: str, ours: np.ndarray, theirs: np.ndarray, scale: float) -> str:
    """Two-sample KS between our and the reference's noise samples, plus their spread vs the scale.

    A fixed random subset of ``KS_SAMPLES`` entries per side is enough to tell a wrong scale or a
    Gaussian/Laplace swap apart, without flagging the tiny second-order effects of the noise on the
    later steps of a multi-step user.
    """
    ours, theirs = np.ravel(ours), np.ravel(theirs)
    pick = np.random.default_rng(0)
    if ours.size > KS_SAMPLES:
        ours = ours[pick.choice(ours.size, KS_SAMPLES, replace=False)]
    if theirs.size > KS_SAMPLES:
        theirs = theirs[pick.choice(theirs.size, KS_SAMPLES, replace=False)]
    statistic, p_value = scipy_stats.ks_2samp(ours, theirs)
    ratio = float(np.std(ours) / np.std(theirs))
    if p_value < 1e-3 or not 0.9 < ratio < 1.1:
        errors.mismatches.append(f"{what}: KS p={p_value:.2g}, std ratio {ratio:.3f}")
    return f"{what}: KS p={p_value:.2g} (n={ours.size}/{theirs.size}), std ratio {ratio:.3f}"


# ----------------------------------------------------------------------------------------------
# Running a case


def _user_cfg(case: Case, **changes) -> fu.UserConfig:
    return fu.UserConfig.from_dict({**case.user_config(), **changes})


def _run_reference(case, torch_model, users_data, cfg, multi_step, queries=1):
    """Shared data of each reference user (fresh user objects; ``queries`` per user)."""
    outputs = []
    for data in users_data:
        user = reference_user(case, torch_model, data, cfg, multi_step)
        for _ in range(queries):
            payload = server_payload(torch_model, case)
            shared, true_data = user.compute_local_updates(payload)
        outputs.append((shared, true_data))
    return outputs


def _run_ours(case, flax_model, variables, users_data, cfg, key, queries=1):
    """fedjax_users' result for the same users (aggregate or single user)."""
    payload = jax_payload(variables, case)
    loss = jax_loss(case)
    if case.user == "aggregate":
        stacked = fu.UserData(
            inputs=jnp.stack([to_user_data(d).inputs for d in users_data]),
            labels=jnp.stack([to_user_data(d).labels for d in users_data]),
        )
        state = None
        for _ in range(queries):
            shared, true_data = fu.aggregate(flax_model, payload, stacked, cfg, key, users_state=state, loss=loss)
            state = true_data.user_state
        return shared, true_data
    compute = fu.local_update if case.user == "local_update" else fu.local_gradient
    state = None
    for _ in range(queries):
        shared, true_data, state = compute(flax_model, payload, to_user_data(users_data[0]), cfg, key,
                                           user_state=state, loss=loss)
    return shared, true_data


def _mean_reference(outputs: list, provide_buffers: bool) -> dict:
    """The intended aggregate of the reference users' shared data: the mean, metadata combined."""
    grads = [torch.stack(list(g)).mean(0) for g in zip(*(shared["gradients"] for shared, _ in outputs))]
    buffers = None
    if provide_buffers and outputs[0][0]["buffers"] is not None:
        buffers = []
        for group in zip(*(shared["buffers"] for shared, _ in outputs)):
            stacked = torch.stack(list(group))
            mean = stacked.double().mean(0)
            buffers.append(mean.round().to(stacked.dtype) if not stacked.is_floating_point() else mean)
    return dict(gradients=grads, buffers=buffers)


def _aggregate_metadata(outputs: list, cfg: fu.UserConfig) -> dict:
    metas = [shared["metadata"] for shared, _ in outputs]
    labels = None
    if cfg.provide_labels:
        labels = torch.cat([m["labels"] for m in metas]).sort()[0]
    hyper = None
    if cfg.provide_local_hyperparams:
        step_labels = [lab for m in metas if m["local_hyperparams"] is not None
                       for lab in m["local_hyperparams"]["labels"]]
        hyper = dict(lr=cfg.local_learning_rate, steps=cfg.num_local_updates,
                     data_per_step=cfg.num_data_per_local_update_step, labels=step_labels)
    return dict(
        num_data_points=cfg.num_data_points * len(outputs) if cfg.provide_num_data_points else None,
        labels=labels, local_hyperparams=hyper, num_users=len(outputs),
    )


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


def _reference_shared(case, outputs, cfg) -> dict:
    """What the comparison is made against: the user's shared data, or the users' mean."""
    return _mean_reference(outputs, cfg.provide_buffers) if case.user == "aggregate" else outputs[0][0]


def _compare_outputs(case, errors, torch_model, cfg, ours, ours_true, ref) -> None:
    """Gradients/deltas, buffers, metadata and (single users) the true data."""
    _compare_shared(errors, ours, _reference_shared(case, ref, cfg), torch_model)
    if case.user == "aggregate":
        _compare_metadata(errors, ours.metadata, _aggregate_metadata(ref, cfg))
    else:
        shared, true_data = ref[0]
        _compare_metadata(errors, ours.metadata, shared["metadata"])
        if case.defence != "input_noise":
            errors.tensors("true_data.data", _as_reference_layout(ours_true.data), true_data["data"])
        errors.equal("true_data.labels", ours_true.labels, true_data["labels"])


def _exact_reference(case, torch_model, users_data, cfg, multi_step) -> dict:
    """The reference's shared data computed in float64 from the same (float32) weights and data."""
    model64 = copy.deepcopy(torch_model).double()
    data64 = [{k: v.double() if v.is_floating_point() else v for k, v in d.items()} for d in users_data]
    case64 = dataclasses.replace(case, precision="float64")
    return _reference_shared(case, _run_reference(case64, model64, data64, cfg, multi_step, case.queries), cfg)


def _distance(gradients: list, exact: dict) -> float:
    errors = _Errors()
    errors.tensor_lists("gradients", gradients, exact["gradients"])
    return errors.max_rel


def _distance_to_exact(case, torch_model, cfg, ours, ref, exact) -> tuple[float, float]:
    """Relative distance of our float32 result and of the reference's to the reference in float64.

    Several SGD steps amplify float32 rounding (and a parameter difference loses digits to
    cancellation), so two correct float32 implementations can differ by more than the bound. The
    reference's own float32 error against its float64 run is the yardstick then.
    """
    return (_distance(interop.grads_to_torch_list(ours.gradients, torch_model), exact),
            _distance(_reference_shared(case, ref, cfg)["gradients"], exact))


def _jitter(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``tensor`` times ``1 + u``, ``u`` uniform in +-SPREAD_PERTURBATION, in its own dtype."""
    u = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    return (tensor.double() * (1.0 + SPREAD_PERTURBATION * u)).to(tensor.dtype)


def _reference_spread(case, torch_model, users_data, cfg, multi_step, exact) -> float:
    """Worst distance to ``exact`` of the reference's float32 result over slightly perturbed runs.

    With ReLU after BatchNorm (ConvNet), a few of the millions of pre-activations of every forward
    pass lie within float32 rounding (~1e-6) of zero; which side of the kink each lands on is chance,
    and every flip changes the gradient by up to ~1e-2 of its scale. Any float32 implementation, the
    reference included, is then only determined up to those flips: its own result moves by ~1e-2
    when its inputs move by a few ulp, so a single float32 run of it (which may happen to flip
    nothing that matters) is no yardstick. The perturbation's smooth effect stays below the float32
    bound; the spread it measures is the discontinuity.
    """
    generator = torch.Generator().manual_seed(case.seed + 31)
    worst = 0.0
    for _ in range(SPREAD_DRAWS):
        model = copy.deepcopy(torch_model)
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(_jitter(tensor, generator))
        data = [{k: _jitter(v, generator) if v.is_floating_point() else v for k, v in d.items()}
                for d in users_data]
        shared = _reference_shared(case, _run_reference(case, model, data, cfg, multi_step, case.queries), cfg)
        worst = max(worst, _distance(shared["gradients"], exact))
    return worst


def run_case(case: Case) -> Result:
    """Run ``case`` on both sides and compare everything the server and the attacker see."""
    torch_model, flax_model, variables = build_models(case)
    num_users = case.num_users if case.user == "aggregate" else 1
    users_data = build_data(case, num_users)
    cfg = _user_cfg(case)
    multi_step = cfg.is_multi_step
    if case.defence == "clip":
        cfg = cfg.replace(local_diff_privacy=dataclasses.replace(
            cfg.local_diff_privacy,
            per_example_clipping=_clip_bound(case, torch_model, users_data[0], cfg, multi_step)))
    key = jax.random.key(case.seed)
    errors = _Errors()
    details = []

    ref = _run_reference(case, torch_model, users_data, cfg, multi_step, queries=case.queries)
    ours, ours_true = _run_ours(case, flax_model, variables, users_data, cfg, key, queries=case.queries)
    _compare_outputs(case, errors, torch_model, cfg, ours, ours_true, ref)
    if case.defence in ("input_noise", "gradient_noise"):
        details += _noise_case(case, errors, torch_model, flax_model, variables, users_data, cfg, multi_step, ref,
                               ours)
    bound = case.bound
    passed = not errors.mismatches and errors.max_rel <= bound
    ours_exact = reference_exact = spread = None
    if not errors.mismatches and not passed and case.precision == "float32":
        exact = _exact_reference(case, torch_model, users_data, cfg, multi_step)
        ours_exact, reference_exact = _distance_to_exact(case, torch_model, cfg, ours, ref, exact)
        passed = ours_exact <= max(2.0 * reference_exact, bound)
        details.append(f"vs float64 reference: ours {ours_exact:.2e}, reference float32 {reference_exact:.2e}")
        if not passed:
            spread = _reference_spread(case, torch_model, users_data, cfg, multi_step, exact)
            passed = ours_exact <= 2.0 * spread
            details.append(f"reference float32 on {SPREAD_DRAWS} inputs perturbed by "
                           f"{SPREAD_PERTURBATION:.0e}: up to {spread:.2e}")
    detail = "; ".join(errors.mismatches[:3] + details)
    return Result(case.name, errors.max_abs, errors.max_rel, bound, passed, detail, ours_exact, reference_exact,
                  spread)


def _as_reference_layout(data):
    data = np.asarray(data)
    return np.transpose(data, (0, 3, 1, 2)) if data.ndim == 4 else data


def _noise_case(case, errors, torch_model, flax_model, variables, users_data, cfg, multi_step, ref_clean,
                ours_clean):
    """Noise cannot match draw for draw: the noise-off runs were compared exactly; here the
    distributions of the noise (or of the update's response to it) are compared."""
    field = "gradient_noise" if case.defence == "gradient_noise" else "input_noise"
    noisy_cfg = cfg.replace(local_diff_privacy=dataclasses.replace(cfg.local_diff_privacy, **{field: NOISE_SCALE}))
    reference_clean = _reference_shared(case, ref_clean, cfg)

    torch.manual_seed(case.seed + 7)
    ref_noisy = _run_reference(case, torch_model, users_data, noisy_cfg, multi_step)
    ours_noisy, ours_true = _run_ours(case, flax_model, variables, users_data, noisy_cfg,
                                      jax.random.key(case.seed + 7))
    if field == "input_noise" and case.user == "local_gradient" and cfg.local_diff_privacy.per_example_clipping == 0:
        # Without clipping the reference records the noised inputs: their residual is the noise itself.
        theirs = (ref_noisy[0][1]["data"] - users_data[0]["inputs"]).double().numpy()
        ours = _as_reference_layout(ours_true.data) - users_data[0]["inputs"].double().numpy()
        return [_ks_noise(errors, "input noise samples", ours, theirs, NOISE_SCALE)]
    # Residual of the shared update against the noise-free one: the summed noise for gradient
    # noise; for input noise the induced change of the update.
    reference_noisy = _reference_shared(case, ref_noisy, noisy_cfg)
    theirs = np.concatenate([
        (n - c).double().numpy().ravel()
        for n, c in zip(reference_noisy["gradients"], reference_clean["gradients"])])
    ours = np.concatenate([
        (np.asarray(n, np.float64) - np.asarray(c, np.float64)).ravel()
        for n, c in zip(jax.tree_util.tree_leaves(ours_noisy.gradients),
                        jax.tree_util.tree_leaves(ours_clean.gradients))])
    if field == "gradient_noise":
        return [_ks_noise(errors, "gradient noise residual of the update", ours, theirs, NOISE_SCALE)]
    # The update's response to input noise is one correlated draw, not i.i.d. samples: only its
    # size is compared (the noise samples themselves are checked in the local_gradient case).
    ratio = float(np.std(ours) / np.std(theirs))
    if not 0.5 < ratio < 2.0:
        errors.mismatches.append(f"input-noise response: std ratio {ratio:.3f}")
    return [f"input-noise response of the update: std ratio {ratio:.3f}"]
