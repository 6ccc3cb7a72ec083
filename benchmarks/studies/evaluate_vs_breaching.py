"""``python -m benchmarks.studies.evaluate_vs_breaching``: the JAX attack of ``fedjax-users evaluate`` against breaching's own.

One configuration: the shipped digits case with ``user=local_gradient user.num_data_points=1
model=lenet_zhu`` (the case's weights from ``--seed``), no defence. The user's update is observed
once; then the same attack runs on it in these ways, from the same weights and the same update:

* ``breaching``: breaching 0.1.2's own ``OptimizationBasedAttacker`` with its ``invertinggradients``
  config (cosine similarity, total variation 0.2, signed Adam at 0.1 with ``step-lr`` drops,
  boxed, one trial), ``optim.max_iterations=--iterations``, on the update of the drop-in
  ``fedjax_users.interop.breaching.UserSingleStep`` (breaching's attack code unchanged, loaded
  by ``parity.reference``; it re-simulates the user with torch), at torch's default threads and at
  one thread (on the 2-core machine torch's two threads were slower, and under other processes'
  load many times slower: docs/performance.md);
* ``jax, breaching's settings``: ``fedjax_users.attacks`` with the same objective and budget
  (``AttackConfig(objective="cosine", signed=True, schedule="step", restarts=1)``), its step size
  and total-variation scale converted from breaching's normalised units to pixel units (times
  and over the data's std), through the exact user as ``evaluate`` runs it;
* ``..., XLA's layouts``: the same with the attack's convolutions left as XLA:CPU compiles them
  inside the attack's loop (``fedjax_users.convolutions`` not applied): the attack as it was
  before that rewrite;
* ``..., K side by side``: the same on ``--side-by-side`` K observations at once
  (``attacks.invert_each``: one program a chunk of them, a chunk per core, side by side), as
  ``evaluate`` attacks the defences of a grid that differ only in their noise; its time is divided
  by K (per defence), its scores are the first observation's;
* ``jax, evaluate's settings``: ``fedjax_users.evaluate.COSINE`` (plain Adam with a cosine decay,
  total variation 0.01) at the same number of steps, alone and K side by side.

Everything is warmed up first (JAX compiles; breaching runs a 20-iteration attack, since its
first call runs its TorchScript objective unoptimised: 314 s instead of 9 s for 2,000
iterations, docs/performance.md), then timed with ``benchmarks.timing.measure``: ``--rounds``
rounds, each contender once per round after an untimed call, the order rotating. The speed-up of
a contender is the median over rounds of breaching's time over its own in the same round, so a
busy moment of the machine slows both sides of a ratio. Each reconstruction is scored (PSNR and
SSIM against the digit, dm-pix; the label it used).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
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
    """Print each attack's PSNR, SSIM, label, time per defence and speed-up over breaching's."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.evaluate_vs_breaching", description=__doc__)
    parser.add_argument("--iterations", type=int, default=2000, help="attack iterations, every contender alike")
    parser.add_argument("--side-by-side", type=int, default=4, help="observations attacked at once (K)")
    parser.add_argument("--seed", type=int, default=0, help="the case's seed (its weights), as fedjax-users evaluate --seed")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each contender once per round)")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[0, 1],
                        help="breaching's runs: torch's threads in each (0: torch's default)")
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
    attacks_module = reference.attacks_module()
    attacker = attacks_module.prepare_attack(model, torch.nn.CrossEntropyLoss(), attack_cfg, SETUP)
    found = {}

    def breaching_attack(chosen=attacker, name="breaching", threads=None):
        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        try:
            torch.manual_seed(5)
            found[name] = chosen.reconstruct([payload], [shared], server_secrets={}, dryrun=False)[0]
        finally:
            torch.set_num_threads(default)

    warm_cfg = reference.attack_config("invertinggradients", ["optim.max_iterations=20", "optim.callback=1000000"])
    breaching_attack(attacks_module.prepare_attack(model, torch.nn.CrossEntropyLoss(), warm_cfg, SETUP), "warm-up")

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
    own = dataclasses.replace(evaluate.COSINE, steps=args.iterations)
    k = args.side_by_side
    one = jax.tree_util.tree_map(lambda leaf: leaf[None], observed)
    stacked = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf] * k), observed)
    stacked_context = context[:3] + (jnp.stack([context[3]] * k),)

    def jax_attack(name, config, count, rewrite=True):
        if count == 1:  # one program, as evaluate attacks a defence alone; or the attack before the rewrite
            finals, _ = attacks._invert_each(update, one, context, config, truth.shape, None, rewrite)
            found[name] = np.asarray(jax.block_until_ready(finals))[0, 0]  # restarts=1: the only restart
        else:  # as evaluate attacks a group of defences (a chunk of them per core)
            recs, _ = attacks.invert_each(update, stacked, stacked_context, truth.shape, config,
                                          context_axes=(None, None, None, 0))
            found[name] = np.asarray(jax.block_until_ready(recs))[0]

    jax_runs = {  # name: (config, observations in one call, convolutions rewritten)
        "jax, breaching's settings, XLA's layouts": (faithful, 1, False),
        "jax, breaching's settings": (faithful, 1, True),
        f"jax, breaching's settings, {k} side by side": (faithful, k, True),
        "jax, evaluate's settings": (own, 1, True),
        f"jax, evaluate's settings, {k} side by side": (own, k, True),
    }
    breaching_runs = {("breaching" if n == 0 else f"breaching, {n} torch thread{'s' * (n > 1)}"): n or None
                      for n in args.torch_threads}  # name: torch's threads (None: its default)
    contenders = {**{name: functools.partial(breaching_attack, name=name, threads=n) for name, n in breaching_runs.items()},
                  **{name: functools.partial(jax_attack, name, *run) for name, run in jax_runs.items()}}
    cpu = {name: [] for name in contenders}

    def with_cpu_time(name):  # the process's CPU seconds of each call beside timing.measure's wall seconds
        start = time.process_time()
        contenders[name]()
        cpu[name].append(time.process_time() - start)

    for name in jax_runs:  # compiled before timing: the first calls measure the steady state
        contenders[name]()
    measured = timing.measure({name: functools.partial(with_cpu_time, name) for name in contenders}, warmup=0,
                              min_rounds=args.rounds, max_rounds=args.rounds, budget_s=0.0)

    print(f"case default_digits with {' '.join(OVERRIDES)}, seed {args.seed}; digit label {int(case.data.labels[0])}; "
          f"{args.iterations} iterations; {args.rounds} rounds; JAX {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs")
    print(f"a random image scores {float(evaluate.psnr(jax.random.uniform(jax.random.key(0), truth.shape), truth)[0]):.2f} dB")
    width = max(map(len, contenders)) + 2
    versus = {b: "speed-up" if n is None else f"vs {n} thread{'s' * (n > 1)}" for b, n in breaching_runs.items()}
    print(f"{'attack':<{width}}{'PSNR (dB)':>10}{'SSIM':>7}{'label':>7}{'per defence (s)':>17}{'ms/iteration':>14}"
          f"{'cores':>7}" + "".join(f"{v:>13}" for v in versus.values()))
    share = {name: jax_runs[name][1] if name in jax_runs else 1 for name in contenders}
    rounds = {name: np.asarray(m.times_s) / share[name] for name, m in measured.items()}
    for name, times in rounds.items():
        if name in breaching_runs:
            rec = found[name]["data"].permute(0, 2, 3, 1).numpy() * np.asarray(std) + np.asarray(mean)
            used, speed_up = int(found[name]["labels"][0]), [""] * len(breaching_runs)
        else:
            rec, used = found[name], int(label[0])
            speed_up = [f"{np.median(rounds[b] / times):.1f}x" for b in breaching_runs]
        cores = np.median(np.asarray(cpu[name][2::2]) / share[name] / times)  # the timed calls: every second after the first
        print(f"{name:<{width}}{float(evaluate.psnr(rec, truth)[0]):>10.2f}{float(evaluate.ssim(rec, truth)[0]):>7.3f}"
              f"{used:>7}{np.median(times):>17.3f}{1e3 * np.median(times) / args.iterations:>14.3f}{cores:>7.2f}"
              + "".join(f"{v:>13}" for v in speed_up))
    print(f"per defence: the median over rounds of a call's time, over {k} for the side-by-side rows; cores: its CPU "
          f"time over its wall time; speed-up (vs n threads): the median over rounds of breaching's time at torch's "
          f"default threads (at n threads) over the row's in the same round")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
