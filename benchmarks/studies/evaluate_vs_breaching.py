"""``python -m benchmarks.studies.evaluate_vs_breaching``: the JAX attack of ``fedjax-users evaluate`` against breaching's own.

One configuration: the shipped digits case with ``user=local_gradient user.num_data_points=1
model=lenet_zhu`` (the case's weights from ``--seed``), no defence. The user's update is observed
once; then the same attack runs on it three ways, from the same weights and the same update:

* ``breaching``: breaching 0.1.2's own ``OptimizationBasedAttacker`` with its ``invertinggradients``
  config (cosine similarity, total variation 0.2, signed Adam at 0.1 with ``step-lr`` drops,
  boxed, one trial), ``optim.max_iterations=--iterations``, on the update of the drop-in
  ``fedjax_users.interop.breaching.UserSingleStep`` (breaching's attack code unchanged, loaded
  by ``parity.reference``; it re-simulates the user with torch);
* ``jax, breaching's settings``: ``fedjax_users.attacks`` with the same objective and budget
  (``AttackConfig(objective="cosine", signed=True, schedule="step", restarts=1)``), its step size
  and total-variation scale converted from breaching's normalised units to pixel units (times
  and over the data's std), through the exact user as ``evaluate`` runs it;
* ``jax, evaluate's settings``: ``fedjax_users.evaluate.COSINE`` (plain Adam with a cosine decay,
  total variation 0.01) at the same number of steps;
* ``jax, evaluate's, K side by side``: the same, on ``--side-by-side`` K observations at once
  (``attacks.invert_each``), as ``evaluate`` attacks the defences of a grid that differ only in
  their noise; its time is divided by K (per defence), its scores are the first observation's.

Each is timed with ``benchmarks.timing.measure`` (first call apart: JAX compiles there; then one
steady call after an untimed one), and its reconstruction scored (PSNR and SSIM against the
digit, dm-pix; the label it used). The speed-up is breaching's steady time over JAX's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import timing
from fedjax_users import attacks, evaluate
from fedjax_users.data import construct_users, load_case
from fedjax_users.interop import breaching as drop_in
from fedjax_users.interop.torch_flax import variables_to_torch
from parity import reference

OVERRIDES = ("user=local_gradient", "user.num_data_points=1", "model=lenet_zhu")
SETUP = dict(device=torch.device("cpu"), dtype=torch.float32)


class _Loader(list):
    """A one-batch dataloader with the ``name`` breaching's ``__repr__`` prints."""

    name = "digits"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the three attacks' PSNR, SSIM, label and times, and the speed-up."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.evaluate_vs_breaching", description=__doc__)
    parser.add_argument("--iterations", type=int, default=1000, help="attack iterations, all three alike")
    parser.add_argument("--side-by-side", type=int, default=4, help="observations attacked at once (K)")
    parser.add_argument("--seed", type=int, default=0, help="the case's seed (its weights), as fedjax-users evaluate --seed")
    args = parser.parse_args(argv)

    cfg_case = load_case(None, list(OVERRIDES))
    case = construct_users(cfg_case, jax.random.key(args.seed))
    mean = jnp.asarray(np.asarray(cfg_case.data.mean, np.float32))
    std = jnp.asarray(np.asarray(cfg_case.data.std, np.float32))
    truth = np.asarray(case.data.inputs * std + mean)

    # breaching's side: its lenet_zhu with the case's weights, the drop-in user on the case's data.
    torch.manual_seed(0)
    model = reference.vision_model("lenet_zhu")
    model.name = "lenet_zhu"
    variables_to_torch({"params": case.payload.params}, model)
    inputs = torch.from_numpy(np.array(case.data.inputs)).permute(0, 3, 1, 2).contiguous()
    loader = _Loader([dict(inputs=inputs, labels=torch.from_numpy(np.array(case.data.labels)).long())])
    from omegaconf import OmegaConf

    cfg_user = OmegaConf.create(dict(
        user_type="local_gradient", num_data_points=1, provide_labels=False, provide_buffers=False,
        provide_num_data_points=True, local_diff_privacy=dict(gradient_noise=0.0, input_noise=0.0,
                                                              distribution="gaussian", per_example_clipping=0.0)))
    user = drop_in.UserSingleStep(model, torch.nn.CrossEntropyLoss(), loader, SETUP, 0, cfg_user)
    payload = dict(parameters=[p.detach().clone() for p in model.parameters()], buffers=None, metadata=cfg_case.data)
    shared, _ = user.compute_local_updates(payload)
    attack_cfg = reference.attack_config("invertinggradients", [f"optim.max_iterations={args.iterations}",
                                                                "optim.callback=1000000"])
    attacker = reference.attacks_module().prepare_attack(model, torch.nn.CrossEntropyLoss(), attack_cfg, SETUP)
    found = {}

    def breaching_attack():
        torch.manual_seed(5)
        found["breaching"] = attacker.reconstruct([payload], [shared], server_secrets={}, dryrun=False)[0]

    # JAX's side: the attacker's user as fedjax-users evaluate builds it.
    cfg = case.user_cfg
    update = functools.partial(evaluate._shared_update, case.model, case.loss, cfg, mean, std)
    context = (case.payload.params, case.payload.batch_stats, case.user_state, case.data.labels)
    observed = update(jnp.asarray(truth), context)
    label = evaluate.infer_labels(observed, 1, int(cfg_case.data.classes))
    context = context[:3] + (jnp.asarray(label),)
    unit_std = float(np.mean(np.asarray(std)))
    faithful = attacks.AttackConfig(
        steps=args.iterations, restarts=1, objective="cosine", signed=True, schedule="step",
        learning_rate=float(attack_cfg.optim.step_size) * unit_std,
        tv_scale=float(attack_cfg.regularization.total_variation.scale) / unit_std)
    configs = {"jax, breaching's settings": faithful,
               "jax, evaluate's settings": dataclasses.replace(evaluate.COSINE, steps=args.iterations)}

    def jax_attack(name):
        found[name] = np.asarray(jax.block_until_ready(attacks.invert(update, observed, context, truth.shape,
                                                                      configs[name])))

    side = f"jax, evaluate's, {args.side_by_side} side by side"
    stacked = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf] * args.side_by_side), observed)
    stacked_context = context[:3] + (jnp.stack([context[3]] * args.side_by_side),)

    def jax_side_by_side():
        recs, _ = attacks.invert_each(update, stacked, stacked_context, truth.shape, configs["jax, evaluate's settings"],
                                      context_axes=(None, None, None, 0))
        found[side] = np.asarray(jax.block_until_ready(recs))[0]

    contenders = {"breaching": breaching_attack, **{name: functools.partial(jax_attack, name) for name in configs},
                  side: jax_side_by_side}
    measured = timing.measure(contenders, warmup=0, min_rounds=1, max_rounds=1, budget_s=0.0)

    print(f"case default_digits with {' '.join(OVERRIDES)}, seed {args.seed}; digit label {int(case.data.labels[0])}; "
          f"{args.iterations} iterations; JAX {jax.__version__}, torch {torch.__version__}")
    print(f"a random image scores {float(evaluate.psnr(jax.random.uniform(jax.random.key(0), truth.shape), truth)[0]):.2f} dB")
    print(f"{'attack':<28}{'PSNR (dB)':>10}{'SSIM':>7}{'label':>7}{'first call (s)':>16}{'steady (s)':>12}{'ms/iteration':>14}")
    steady, first = {}, {}
    for name, measurement in measured.items():
        summary = measurement.summary()
        share = args.side_by_side if name == side else 1
        steady[name], first[name] = summary["median_s"] / share, summary["first_call_s"] / share
        if name == "breaching":
            rec = found[name]["data"].permute(0, 2, 3, 1).numpy() * np.asarray(std) + np.asarray(mean)
            used = int(found[name]["labels"][0])
        else:
            rec, used = found[name], int(label[0])
        print(f"{name:<28}{float(evaluate.psnr(rec, truth)[0]):>10.2f}{float(evaluate.ssim(rec, truth)[0]):>7.3f}"
              f"{used:>7}{first[name]:>16.2f}{steady[name]:>12.2f}{1e3 * steady[name] / args.iterations:>14.2f}")
    print(f"(the {side} row: seconds per observation, the call's time over {args.side_by_side})")
    for name in [*configs, side]:
        print(f"speed-up of {name}: {steady['breaching'] / steady[name]:.1f}x steady, "
              f"{first['breaching'] / first[name]:.1f}x first call (compile included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
