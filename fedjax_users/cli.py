"""``fedjax-users``: list the case files (``cases``), run one (``run``), its privacy guarantee (``privacy``), the parity suite (``parity``) or the benchmarks (``bench``).

``parity`` and ``bench`` run from a checkout of the repository; the wheel holds ``fedjax_users`` only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

__all__ = [
    "CASE_HELP",
    "CHECKOUT_SUITES",
    "CHECKPOINT_SECONDS",
    "USER_MISTAKES",
    "find_checkout",
    "list_cases",
    "main",
    "privacy_report",
    "run",
]

# The exceptions ``main`` prints as one line (exit status 2) rather than as a traceback.
USER_MISTAKES = (ValueError, FileNotFoundError, KeyError)
# A long aggregate saves its progress about this often with --checkpoint.
CHECKPOINT_SECONDS = 60.0
# The help of the commands' CASE argument.
CASE_HELP = ("a case by name (fedjax-users cases lists them, e.g. 4_fedavg_small_scale) or a case YAML file "
             "(default: the bundled digits case)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedjax-users", description="breaching's federated-learning users as pure JAX functions."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("cases", help="list the case files run and privacy take by name, one line each")
    run = commands.add_parser("run", help="build a case's users and compute what they share")
    run.add_argument("case", nargs="?", help=CASE_HELP)
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. user.num_local_updates=8")
    run.add_argument("--out", default=None,
                     help="the run folder (default: runs/<case>-<timestamp>/), or a .msgpack file for the update alone")
    run.add_argument("--force", action="store_true", help="write into an --out that already exists")
    run.add_argument("--seed", type=int, default=0, help="PRNG seed for noise and random partitions")
    run.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                     help="no progress on stderr (there is none when stderr is not a terminal)")
    run.add_argument("--checkpoint", metavar="DIR", default=None,
                     help="an aggregate saves its progress here about every minute; the same command with the same "
                          "DIR resumes where it stopped, with the same result")
    run.add_argument("--time", action="store_true",
                     help="also time the steady state (a single query is then computed a second time)")
    privacy = commands.add_parser(
        "privacy", help="the differential-privacy guarantee of a case's defences (runs no computation)"
    )
    privacy.add_argument("case", nargs="?", help=CASE_HELP)
    privacy.add_argument("overrides", nargs="*", help="key=value overrides, e.g. user.local_diff_privacy.gradient_noise=0.1")
    privacy.add_argument("--delta", type=float, nargs="+", default=[1e-5, 1e-6, 1e-8], help="deltas to report")
    privacy.add_argument("--queries", type=int, nargs="+", default=[1, 10, 100], help="numbers of queries")
    privacy.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                         help="target epsilons to find the gradient noise for (first delta and queries)")
    # The choices are fedjax_users.accounting.UNITS and RELATIONS, spelled out to keep --help light.
    privacy.add_argument("--unit", choices=("example", "user"), default="example", help="what is protected")
    privacy.add_argument("--relation", choices=("replace_one", "add_remove"), default="replace_one",
                         help="neighbouring relation")
    privacy.add_argument("--plot", metavar="FILE.png", default=None,
                         help="also draw epsilon against the number of queries (log scale, over the --queries "
                              "range), one line per delta, into this picture (written over if it exists)")
    from fedjax_users import evaluate

    evaluate.add_arguments(commands.add_parser(
        "evaluate", help="attack success (PSNR, SSIM, labels) against epsilon, and the utility, for each defence of a grid"))
    commands.add_parser("parity", help="run the parity suite (python -m parity)", add_help=False)
    commands.add_parser("bench", help="run the benchmarks (python -m benchmarks)", add_help=False)
    return parser


def _split_case_argument(case: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """The case file and the overrides: ``fedjax-users run key=value`` (no case) treats the first
    word as an override; a case name resolves to its file (``fedjax_users.data.catalog``)."""
    from fedjax_users.data import catalog

    if case is not None and "=" in case and not os.path.exists(case):
        return None, [case] + overrides
    return catalog.resolve(case), overrides


def list_cases() -> int:
    """``fedjax-users cases``: each case file a name resolves to, with what it computes.

    Returns:
      The exit status, 0.
    """
    from fedjax_users.data import catalog

    entries = catalog.case_files()
    width = max(len(entry.name) for entry in entries)
    source = None
    for entry in entries:
        if entry.source != source:
            source = entry.source
            print(f"{'shipped with fedjax_users' if source == catalog.BUNDLED else 'breaching ' + os.path.dirname(entry.path)}:")
        print(f"  {entry.name:<{width}}  {catalog.describe(entry)}")
    if catalog.breaching_case_folder() is None:
        print("breaching's case files: not installed (pip install --no-deps breaching==0.1.2 adds them)")
    print("run one: fedjax-users run NAME [key=value ...]; see what it guarantees: fedjax-users privacy NAME")
    return 0


def _describe_metadata(metadata) -> str:
    parts = []
    if metadata.num_data_points is not None:
        parts.append(f"num_data_points={metadata.num_data_points}")
    if metadata.num_users is not None:
        parts.append(f"num_users={metadata.num_users}")
    if metadata.labels is not None:
        labels = [int(v) for v in metadata.labels.ravel()[:16]]
        parts.append(f"labels={labels}{'...' if metadata.labels.size > 16 else ''}")
    if metadata.data_key is not None:
        parts.append(f"data_key={metadata.data_key}")
    hyper = metadata.local_hyperparams
    if hyper is not None:
        parts.append(f"local_hyperparams(lr={hyper.lr}, steps={hyper.steps}, data_per_step={hyper.data_per_step})")
    return ", ".join(parts) or "nothing"


def _case_name(cfg_case, case_path: Optional[str], overrides: Sequence[str]) -> str:
    """The case as run: its name (or file name), and the overrides that changed it."""
    name = cfg_case.get("name") or os.path.splitext(os.path.basename(case_path or "default"))[0]
    return f"{name} with {' '.join(overrides)}" if overrides else name


def _one_example(case):
    """One user's first input ``[1, ...]``: what the model's shapes are traced with.

    A streamed cohort reads its first user here (its examples are read once, not per question).
    """
    from fedjax_users.cohort import Cohort

    inputs = case.data.first().inputs if isinstance(case.data, Cohort) else case.data.inputs
    return (inputs[0] if case.user_cfg.is_aggregate else inputs)[:1]


def _data_shapes(case) -> tuple[tuple, tuple]:
    """The users' inputs and labels shapes (a streamed cohort's from its size and first user)."""
    from fedjax_users.cohort import Cohort

    if isinstance(case.data, Cohort):
        first = case.data.first()
        return (len(case.data),) + first.inputs.shape[1:], (len(case.data),) + first.labels.shape[1:]
    return tuple(case.data.inputs.shape), tuple(case.data.labels.shape)


def _batchnorm_mode(case, example) -> str:
    """How the users run BatchNorm: with the server's buffers, their own statistics, or not at all."""
    import jax

    from fedjax_users.users import initial_batch_stats

    stats = initial_batch_stats(case.model, example)
    if not stats:
        return "no BatchNorm"
    # Hugging Face models hold buffers (position ids) but no BatchNorm: name what the mode is about.
    names = [str(path[-1]) for path, _ in jax.tree_util.tree_flatten_with_path(stats)[0]]
    held = "BatchNorm" if any("mean" in name for name in names) else "buffers"
    return f"{held} {'eval mode (server buffers)' if case.payload.batch_stats is not None else 'train mode'}"


def _compute(case, key, progress, steady_state: bool = False, checkpoints=None):
    """Run the case's queries in order, each user's own BatchNorm state carried to the next.

    Returns (shared per query, seconds of the first call, seconds of a steady call or ``None``).
    The steady call is the second query's; with ``steady_state`` and a single query, the first
    query is run once more only to time it (``fedjax-users run --time``): otherwise every query
    is computed once. ``progress`` (a ``fedjax_users.progress.Progress``) shows each query and,
    for an aggregate, its users. ``checkpoints`` = (folder, run id): an aggregate's queries save
    their progress there (a subfolder each) and resume from it.
    """
    import jax

    import fedjax_users as fu
    from fedjax_users.strategy.streaming import Checkpoint

    cfg = case.user_cfg
    queries = case.queries or ()

    def call(query, query_key, state, report):
        users = checkpoint = None
        if cfg.is_aggregate and report:
            # Only reported calls wait on each chunk for the count: the timed steady call does not.
            users = progress.counter(f"query {report} of {len(queries)}: users", "users")
            if checkpoints is not None:
                folder, run_id = checkpoints
                checkpoint = Checkpoint(os.path.join(folder, f"query{report - 1}"), seconds=CHECKPOINT_SECONDS,
                                        run_id=run_id)
        shared, _, new_state = fu.compute(case.model, query.payload, query.data, cfg, query_key, state, case.loss,
                                          progress=users, checkpoint=checkpoint)
        return shared, new_state

    def timed(*args):
        start = time.perf_counter()
        shared, state = call(*args)
        jax.block_until_ready(shared.gradients)
        return shared, state, time.perf_counter() - start

    state, results, timings = case.user_state, [], []
    for q, query in enumerate(queries):
        compiles = " (compiling first)" if q == 0 else ""
        with progress.stage(f"query {q + 1} of {len(queries)}{compiles}"):
            shared, new_state, seconds = timed(query, jax.random.fold_in(key, q), state, q + 1)
        # As breaching's users: with no buffers from the server, a user keeps its own statistics.
        state = new_state if query.payload.batch_stats is None else state
        results.append(shared)
        timings.append(seconds)
    if len(timings) == 1 and steady_state:
        with progress.stage("query 1 again, to time the steady state (--time)"):
            timings.append(timed(queries[0], jax.random.fold_in(key, 0), case.user_state, 0)[2])
    return results, timings[0], timings[1] if len(timings) > 1 else None


def _privacy_sizes(cfg_case, params=None) -> dict:
    """``guarantee`` keywords a case determines: parameter count, input bounds, server buffers.

    Without ``params`` the count comes from the model's variable shapes (``jax.eval_shape``).
    """
    from fedjax_users import accounting, models
    from fedjax_users.data.errors import DataError

    cfg_data = cfg_case.data
    if params is None:
        modality, shape, name = cfg_data.get("modality"), list(cfg_data.get("shape") or []), str(cfg_case.model)
        try:
            data_name = str(cfg_data.get("like") or cfg_data.name)
            if modality == "vision":
                model = models.for_data(name, data_name, int(cfg_data.classes), int(shape[0]))
                count = accounting.model_num_params(model, (1, int(shape[1]), int(shape[2]), int(shape[0])))
            elif modality == "text":
                model = models.for_data(name, data_name, int(cfg_data.vocab_size), modality="text")
                count = accounting.model_num_params(model, (1, int(shape[0])), "int32")
            else:
                raise DataError(f"unknown data.modality {modality!r}; expected vision or text")
        except (TypeError, IndexError) as err:
            raise DataError(f"the data config lacks what the model's shape needs: {err}") from None
    else:
        count = accounting.count_params(params)
    bounds, size = accounting.data_input_bounds(cfg_data)
    server = cfg_case.get("server") or {}
    return dict(num_params=count, input_bounds=bounds, input_size=size,
                server_sends_buffers=bool(server.get("provide_public_buffers", True)))


def _privacy_line(cfg_case, user_cfg, params) -> str:
    """The one ``privacy`` line of ``fedjax-users run``: the case's guarantee at the default delta."""
    from fedjax_users import accounting

    sizes = _privacy_sizes(cfg_case, params)
    return f"privacy     {accounting.guarantee(user_cfg, accounting.DEFAULT_DELTA, **sizes).summary()}"


def _fmt(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.4g}"


def privacy_report(args) -> int:
    """``fedjax-users privacy``: a case's guarantee for several deltas and queries, and the noise for targets.

    Args:
      args: the ``privacy`` command's arguments, parsed (``case``, ``overrides``, ``delta``,
        ``queries``, ``epsilon``, ``unit``, ``relation``, ``plot``).

    Returns:
      The exit status, 0.
    """
    from omegaconf import OmegaConf

    from fedjax_users import UserConfig, accounting
    from fedjax_users.data import load_case

    if args.plot:
        from fedjax_users import plots

        plots.check_picture_path(args.plot, force=True)  # before the report, not after it
    case_path, overrides = _split_case_argument(args.case, list(args.overrides))
    cfg_case = load_case(case_path, overrides)
    cfg = UserConfig.from_dict(OmegaConf.to_container(cfg_case.user, resolve=True))
    sizes = _privacy_sizes(cfg_case)
    options = dict(unit=args.unit, relation=args.relation, **sizes)
    dp = cfg.local_diff_privacy
    name = cfg_case.get("name", case_path or "default")
    print(f"case        {name}")
    steps = (f", {cfg.num_local_updates} steps of {cfg.num_data_per_local_update_step}" if cfg.is_multi_step else "")
    users = f", {cfg.num_users} users" if cfg.is_aggregate else ""
    print(f"user        {cfg.user_type}{users}, {cfg.num_data_points} example{'s' if cfg.num_data_points != 1 else ''}{steps}; "
          f"per_example_clipping {dp.per_example_clipping:g}, {dp.distribution} gradient_noise "
          f"{dp.gradient_noise:g}, input_noise {dp.input_noise:g}")
    print(f"model       {cfg_case.model}, {sizes['num_params']:,} parameters (from shapes only)")
    first = accounting.guarantee(cfg, args.delta[0], args.queries[0], **options)
    print(f"guarantee   {first.summary()}")
    if first.finite:
        norm = "L2" if first.distribution == "gaussian" else "L1"
        print(f"mechanism   {first.defence}: {norm} sensitivity {first.sensitivity:.4g}, noise "
              f"{first.noise_scale:.4g} ({'std' if norm == 'L2' else 'Laplace b'}), noise multiplier "
              f"{first.noise_multiplier:.4g}; covers {first.covers}")
        print(f"epsilon     per {args.unit}, {args.relation}; PLD (RDP)")
        print("  queries   " + "".join(f"{'delta ' + format(d, 'g'):<22}" for d in args.delta))
        for queries in args.queries:
            cells = [accounting.guarantee(cfg, d, queries, **options) for d in args.delta]
            print(f"  {queries:<10}" + "".join(f"{_fmt(g.epsilon) + ' (' + _fmt(g.epsilon_rdp) + ')':<22}" for g in cells))
    _print_noise_for_targets(cfg, args, sizes["num_params"])
    for note in first.notes:
        print(f"note        {note}")
    for item in first.unprotected:
        print(f"not covered {item}")
    if args.plot:
        series = plots.epsilon_series(cfg, args.delta, plots.query_grid(args.queries), **options)
        plots.epsilon_plot(series, args.plot, title=f"{name}: {first.distribution} {first.defence}, noise multiplier "
                                                     f"{first.noise_multiplier:.4g}\nper {args.unit}, {args.relation}")
        print(f"plot        {args.plot}: epsilon against {series.queries[0]} to {series.queries[-1]} queries, "
              f"per {args.unit}, {args.relation}; PLD solid, RDP dashed")
    return 0


def _print_noise_for_targets(cfg, args, num_params: int) -> None:
    """The ``noise for`` lines of ``fedjax-users privacy``: the gradient noise reaching each ``--epsilon``."""
    from fedjax_users import accounting

    dp = cfg.local_diff_privacy
    if dp.per_example_clipping > 0:
        # One row (the first delta and number of queries): each target is a bisection.
        queries = args.queries[0]
        print(f"noise for   {dp.distribution} gradient_noise reaching epsilon at delta {args.delta[0]:g}, "
              f"{queries} quer{'y' if queries == 1 else 'ies'}, per {args.unit}, {args.relation}")
        print("  epsilon   " + "".join(f"{format(e, 'g'):<14}" for e in args.epsilon))
        found = [accounting.calibrate(cfg, e, args.delta[0], queries, args.unit, args.relation,
                                      num_params=num_params) for e in args.epsilon]
        print("  noise     " + "".join(f"{c.local_diff_privacy.gradient_noise:<14.4g}" for c in found))
    else:
        print("noise for   none: without per_example_clipping no gradient noise gives a finite epsilon")


def _server_line(cfg_case, case) -> str:
    server = cfg_case.get("server") or {}
    # Hugging Face text models read their weights from the hub cache, not from server.weights.
    source = server.get("weights") or "the Hugging Face hub cache"
    weights = f"pretrained from {source}" if case.pretrained else "not pretrained"
    buffers = "buffers sent" if case.payload.batch_stats is not None else "no buffers sent"
    queries = len(case.queries)
    return (f"server      {server.get('name', 'honest_but_curious')}, model_state "
            f"{server.get('model_state', 'default')}, {weights}, {buffers}, {queries} quer{'y' if queries == 1 else 'ies'}")


def run(args) -> int:
    """``fedjax-users run``: build the users of a case, compute, summarise, save.

    Args:
      args: the ``run`` command's arguments, parsed (``case``, ``overrides``, ``out``, ``force``,
        ``seed``, ``quiet``, ``checkpoint``, ``time``).

    Returns:
      The exit status, 0.
    """
    import contextlib

    import jax

    from fedjax_users import runs
    from fedjax_users.data import load_case
    from fedjax_users.data.cases import case_dtype

    case_path, overrides = _split_case_argument(args.case, list(args.overrides))
    cfg_case = load_case(case_path, overrides)
    # Before any work: an existing run or a read-only folder would otherwise fail after the computation.
    output = runs.prepare(args.out, _case_name(cfg_case, case_path, ()), force=args.force)
    double = case_dtype(cfg_case).__name__ == "float64"
    # impl.dtype=double: JAX's 64-bit mode for this run only (restored after, also in-process).
    with jax.enable_x64(True) if double else contextlib.nullcontext():
        return _run_case(args, cfg_case, case_path, overrides, output)


class _StreamWaits:
    """While entered: the time streamed aggregates spent, and waited for their users' examples
    (``fedjax_users.strategy.streaming`` logs both after each aggregate)."""

    def __init__(self):
        import logging

        self.waited = self.seconds = 0.0
        self.logger = logging.getLogger("fedjax_users.strategy.streaming")
        self.handler = logging.Handler(logging.INFO)
        self.handler.emit = self._record

    def _record(self, record) -> None:
        self.waited += getattr(record, "waited_s", 0.0)
        self.seconds += getattr(record, "seconds", 0.0)

    def __enter__(self):
        import logging

        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc_info):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def _shapes(tree) -> dict[str, list[int]]:
    """``{"fc/0/kernel": [768, 10], ...}``: each leaf's shape by its path."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): list(leaf.shape)
            for path, leaf in flat}


def _run_case(args, cfg_case, case_path, overrides, output) -> int:
    """``fedjax-users run``: build the case's users, compute every query, print and save the results."""
    import jax
    from omegaconf import OmegaConf

    from fedjax_users import runs
    from fedjax_users.data import construct_users
    from fedjax_users.progress import Progress

    key = jax.random.key(args.seed)
    waits = _StreamWaits()
    with Progress(quiet=args.quiet) as progress, waits:
        with progress.stage("building the users (reading data, building the model)"):
            # An aggregate's users are read a chunk at a time as it computes (fedjax_users.cohort).
            case = construct_users(cfg_case, key, stream=True)
        checkpoints = None
        if args.checkpoint:
            checkpoints = (args.checkpoint, runs.run_id(OmegaConf.to_yaml(cfg_case), args.seed))
        results, first, steady = _compute(case, key, progress, steady_state=args.time, checkpoints=checkpoints)
    example = _one_example(case)
    summary = _report(cfg_case, _case_name(cfg_case, case_path, overrides), case, example, results, waits, first,
                      steady)
    summary.update(seed=args.seed, versions=runs.versions())
    _save_run(output, cfg_case, case, example, results, summary)
    return 0


def _report(cfg_case, name: str, case, example, results, waits, first: float, steady: Optional[float]) -> dict:
    """Print what the run computed, line by line; returns the same facts for ``summary.json``."""
    import jax

    from fedjax_users import accounting, privacy

    cfg, shared = case.user_cfg, results[-1]
    inputs_shape, labels_shape = _data_shapes(case)
    examples = int(labels_shape[0] * (labels_shape[1] if cfg.is_aggregate else 1))
    num_users = cfg.num_users if cfg.is_aggregate else 1
    kind = "parameter difference" if cfg.is_multi_step else "gradient"
    dtype = jax.tree_util.tree_leaves(case.payload.params)[0].dtype
    parameters = accounting.count_params(case.payload.params)
    batchnorm = _batchnorm_mode(case, example)
    print(f"case        {name}")
    print(f"user type   {cfg.user_type} ({num_users} user{'s' if num_users > 1 else ''}, "
          f"{cfg.num_data_points} examples each, user index {', '.join(map(str, case.user_indices[:8]))}"
          f"{'...' if len(case.user_indices) > 8 else ''})")
    print(f"data        {case.data_cfg.name}, {examples} examples held, inputs {inputs_shape}")
    print(f"model       {cfg_case.model}, {parameters:,} parameters, {dtype}, {batchnorm}")
    print(_server_line(cfg_case, case))
    norms = [float(privacy.global_norm(r.gradients)) for r in results]
    print(f"update      {kind}, global norm {', '.join(f'{n:.6g}' for n in norms)}")
    server_sees = _describe_metadata(shared.metadata)
    print(f"server sees {server_sees}{', buffers' if shared.batch_stats is not None else ''}")
    privacy_line = _privacy_line(cfg_case, cfg, case.payload.params)
    print(privacy_line)
    if case.not_applicable:
        print(f"not applicable {', '.join(case.not_applicable)} (torch or breaching machinery only)")
    if case.not_read:
        print(f"not read    {', '.join(case.not_read)}")
    platform = jax.devices()[0].platform
    _print_times(waits, first, steady, platform)
    return dict(
        case=name, user_type=cfg.user_type, users=num_users, examples_per_user=cfg.num_data_points,
        user_indices=[int(i) for i in case.user_indices],
        data=dict(name=case.data_cfg.name, inputs=list(inputs_shape)),
        model=dict(name=cfg_case.model, parameters=parameters, dtype=str(dtype), batchnorm=batchnorm),
        update=dict(kind=kind, shapes=_shapes(shared.gradients), global_norms=norms),
        server_sees=server_sees, privacy=privacy_line.split(None, 1)[1],
        seconds=dict(first_call=first, steady_state=steady, streaming=waits.seconds or None,
                     waiting_for_data=waits.waited if waits.seconds else None), platform=platform,
    )


def _print_times(waits, first: float, steady: Optional[float], platform: str) -> None:
    """The streaming and wall-time lines of ``fedjax-users run``."""
    if waits.seconds:
        print(f"streaming   waited {waits.waited:.2f} s for examples in {waits.seconds:.2f} s of streaming users "
              f"({100 * waits.waited / waits.seconds:.1f}%)")
    if steady is None:
        print(f"wall time   first call {first:.2f} s, compile included, on {platform} "
              f"(--time: also the steady state)")
    else:
        print(f"wall time   {steady * 1e3:.1f} ms steady state, {max(first - steady, 0.0):.2f} s compile "
              f"(first call {first:.2f} s) on {platform}")


def _save_run(output, cfg_case, case, example, results, summary: dict) -> None:
    """Each query's update (msgpack and safetensors, in breaching's order) and the run's files."""
    from omegaconf import OmegaConf

    from fedjax_users import io
    from fedjax_users.interop.order import torch_order

    config = OmegaConf.to_container(cfg_case, resolve=True)
    # breaching's list order for the torch files, from the model alone (traced, nothing computed).
    order = torch_order(case.model, example)
    output.create()
    paths = output.update_paths(len(results))
    torch_files = []
    for path, tensors_path, result in zip(paths, output.safetensors_paths(len(results)), results):
        io.save_shared(path, result, config)
        torch_files += io.save_shared_safetensors(tensors_path, result, order, config)
    summary["files"] = [os.path.basename(p) for p in paths + torch_files]
    written = output.write(config, summary)
    print(f"saved       {', '.join(paths + torch_files + written)} (load the update with fedjax_users.io.load_shared; "
          f"torch reads the .safetensors with safetensors.torch.load_file)")


# The parity suite and the benchmarks need torch and breaching and are not part of the wheel:
# they run from a checkout of the repository, as ``python -m parity`` / ``python -m benchmarks``.
CHECKOUT_SUITES = {"parity": ("parity", "main", []), "bench": ("benchmarks", "main", ["--quick"])}


def find_checkout(start: Optional[str] = None, package_parent: Optional[str] = None) -> Optional[str]:
    """The repository checkout holding ``parity/`` and ``benchmarks/`` (each with a ``__main__.py``).

    Args:
      start: where to look first, then in each folder above it (default: the current folder).
      package_parent: where to look last (default: the folder above this ``fedjax_users``, a
        checkout when installed with ``pip install -e``).

    Returns:
      The checkout's folder, or ``None`` if none of those is one.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as checkout:
        ...     for suite in ("parity", "benchmarks"):
        ...         os.makedirs(os.path.join(checkout, suite))
        ...         open(os.path.join(checkout, suite, "__main__.py"), "w").close()
        ...     os.makedirs(os.path.join(checkout, "docs", "figures"))
        ...     find_checkout(os.path.join(checkout, "docs", "figures")) == os.path.abspath(checkout)
        True
    """
    here = os.path.abspath(start or os.getcwd())
    package_parent = package_parent or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [here, *_parents(here), package_parent]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name, "__main__.py")) for name in ("parity", "benchmarks")):
            return folder
    return None


def _parents(folder: str) -> list[str]:
    parents = []
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        parents.append(folder)
    return parents


def _run_checkout_suite(command: str, argv: list[str]) -> int:
    """``fedjax-users parity|bench``: run that suite from the repository checkout, or say how."""
    import importlib

    module_name, entry, default_argv = CHECKOUT_SUITES[command]
    checkout = find_checkout()
    if checkout is None:
        print(
            f"fedjax-users: error: `{command}` runs from a checkout of the fedjax_users repository "
            f"(it is not in the wheel): clone it, cd into it and run `python -m {module_name}`",
            file=sys.stderr,
        )
        return 2
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    module = importlib.import_module(f"{module_name}.__main__" if module_name == "parity" else module_name)
    return getattr(module, entry)(argv or default_argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fedjax-users`` command.

    Args:
      argv: the command's arguments (``None``: ``sys.argv[1:]``), e.g. ``["run", "4_fedavg_small_scale"]``.

    Returns:
      The exit status: 0, or 2 for a user mistake (``USER_MISTAKES``, printed as one line on stderr)
      or ``parity`` / ``bench`` outside a checkout.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["parity"], ["bench"]):
        return _run_checkout_suite(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    try:
        from fedjax_users import evaluate

        commands = {"cases": lambda _: list_cases(), "privacy": privacy_report, "run": run,
                    "evaluate": lambda a: evaluate.main(a, *_split_case_argument(a.case, list(a.overrides)))}
        return commands[args.command](args)
    except USER_MISTAKES as err:
        # A user mistake (bad case, missing data folder, bad config) is one line, not a traceback.
        print(f"fedjax-users: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
