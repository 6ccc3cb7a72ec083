"""The benchmark suite end to end on its tiniest grid, and its torch.func contender against breaching.

No timing is asserted: only that every output is produced and well-formed, and that the
vectorised PyTorch contender computes what breaching's user classes compute.
"""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("matplotlib")

import benchmarks  # noqa: E402
import fedjax_users as fu  # noqa: E402
from benchmarks import fingerprint as bench_fingerprint  # noqa: E402
from benchmarks import grid, memory, problems, torch_func  # noqa: E402
from parity import reference  # noqa: E402


@pytest.fixture(scope="module")
def smoke_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert benchmarks.main(["--grid", "smoke", "--out", str(out)]) == 0
    return out


# The whole benchmark suite on its smoke grid (it times every contender): the slower tier.
@pytest.mark.slow
def test_json_has_every_workload_and_contender(smoke_outputs):
    results = json.loads((smoke_outputs / "results.json").read_text())
    assert results["grid"] == "smoke"
    assert results["machine"]["cpu_cores"] >= 1 and results["machine"]["jax_backend"]
    assert results["peak"]["peak_flops_per_s"] > 0
    assert results["models"]["lenet_zhu"]["forward_flops_per_example"] > 1e5  # two 5x5 convs at least
    rows = {(r["kind"], r["label"]): r for r in results["results"]}
    assert {kind for kind, _ in rows} == set(grid.KINDS)
    assert len(rows) == len(grid.grid("smoke"))
    for (kind, _), row in rows.items():
        expected = {"fedjax_users", "fedjax_users_eager", "fedjax_users_unchecked", "breaching", "floor_jax", "floor_torch"}
        if kind != "local_update":
            expected.add("torch_func")
        assert set(row["contenders"]) == expected
        for stats in row["contenders"].values():
            assert 0 < stats["min_s"] <= stats["median_s"] <= stats["max_s"]
            assert stats["first_call_s"] > 0 and stats["rounds"] >= 1
            assert stats["flops_per_s"] > 0 and stats["fraction_of_peak"] > 0
        assert row["ratios"]["fedjax_over_floor_jax"] == pytest.approx(
            row["contenders"]["fedjax_users"]["median_s"] / row["contenders"]["floor_jax"]["median_s"]
        )
    # Every row names the code it was measured on: today's.
    assert {r["fingerprint"] for r in results["results"]} == {
        bench_fingerprint.row_fingerprint(bench_fingerprint.SUITE, "lenet_zhu")}
    aggregate = next(r for r in results["results"] if r["kind"] == "aggregate")
    assert aggregate["examples"] == aggregate["users"] * aggregate["steps"] * aggregate["batch"]
    assert [t["holds"] for t in results["targets"]][-1] is None  # the breaching ratio is reported only
    assert all(t["values"] for t in results["targets"])


@pytest.mark.slow
def test_markdown_and_plot(smoke_outputs):
    text = (smoke_outputs / "results.md").read_text()
    for heading in ("## Targets of issue 5", "## local_gradient", "## local_update", "## aggregate"):
        assert heading in text
    table_rows = [line for line in text.splitlines() if line.startswith("| lenet_zhu |")]
    assert len(table_rows) == 1 + len(grid.grid("smoke"))  # the FLOPs table and one row per workload
    assert len({line.count("|") for line in table_rows[1:]}) == 1
    png = (smoke_outputs / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_memory_run_reports_a_peak():
    result = memory.run(memory.SMOKE_SPECS, log=lambda _: None)["runs"][0]
    assert "error" not in result, result
    assert result["finite"] and result["users"] == 4
    # 4 users split over the child's devices (4 under the test command's XLA_FLAGS), in chunks of
    # at most 2 a device, as fu.choose_strategy reports them.
    per_device = -(-4 // result["devices"])
    assert result["chunk_users"] == min(2, per_device)
    assert result["chunks"] == -(-per_device // min(2, per_device))
    assert result["peak_rss_mib"] >= 0.9 * result["rss_before_mib"] > 0
    assert result["fingerprint"] == bench_fingerprint.row_fingerprint(bench_fingerprint.MEMORY, "lenet_zhu")


# ----------------------------------------------------------------------------------------------
# The torch.func contender computes breaching's numbers


def _reference_user(torch_model, x, y, cfg, multi_step):
    users = reference.users_module()
    cls = users.UserMultiStep if multi_step else users.UserSingleStep
    setup = dict(device=torch.device("cpu"), dtype=torch.float32)
    return cls(torch_model, torch.nn.CrossEntropyLoss(), [dict(inputs=x, labels=y)], setup, 0,
               OmegaConf.create(cfg.to_dict()))


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    model = reference.vision_model("lenet_zhu").eval()
    payload = dict(parameters=[p.detach().clone() for p in model.parameters()], buffers=[])
    return model, payload


def _assert_close(ours: dict, theirs: list, model):
    names = [name for name, _ in model.named_parameters()]
    assert len(theirs) == len(names)
    for name, expected in zip(names, theirs):
        np.testing.assert_allclose(ours[name].numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_torch_func_clipping_matches_breaching(lenet):
    model, payload = lenet
    data = problems.make_data((5,), seed=3)
    x, y = data.torch(torch.device("cpu"))
    params, buffers = torch_func.model_state(model)
    loss = torch.nn.CrossEntropyLoss()
    per_example = torch_func.per_example_gradients(model, loss, params, buffers, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], 1).norm(dim=1)
    clip = float(norms.median())  # some examples are clipped, some not
    factors = torch_func.clip_factors(per_example, clip)
    assert (factors < 1).any() and (factors == 1).any()

    workload = grid.Workload("local_gradient", "lenet_zhu", batch=5)
    cfg = problems.user_config(workload).replace(
        local_diff_privacy=fu.LocalDiffPrivacy(per_example_clipping=clip))
    theirs, _ = _reference_user(model, x, y, cfg, multi_step=False).compute_local_updates(dict(payload))
    ours = torch_func.clipped_mean_gradient(model, loss, params, buffers, x, y, clip)
    _assert_close(ours, theirs["gradients"], model)


@pytest.mark.parametrize("steps", [1, 3])
def test_torch_func_users_match_breaching_users(lenet, steps):
    model, payload = lenet
    workload = grid.Workload("aggregate", "lenet_zhu", batch=2, steps=steps, users=3)
    data = problems.data_for(workload, seed=4)
    x, y = data.torch(torch.device("cpu"))
    lr = 0.5  # large enough that the steps move the weights well beyond float32 round-off
    cfg = problems.user_config(workload).replace(
        user_type="local_update" if steps > 1 else "local_gradient", user_range=None, local_learning_rate=lr)
    shared = [_reference_user(model, x[u], y[u], cfg, steps > 1).compute_local_updates(dict(payload))[0]
              for u in range(3)]
    expected = [torch.stack(group).mean(0) for group in zip(*(s["gradients"] for s in shared))]
    params, buffers = torch_func.model_state(model)
    loss = torch.nn.CrossEntropyLoss()
    if steps > 1:
        ours = torch_func.mean_user_update(model, loss, params, buffers, x, y, steps, lr)
    else:
        ours = torch_func.mean_user_gradient(model, loss, params, buffers, x, y)
    _assert_close(ours, expected, model)


# ----------------------------------------------------------------------------------------------
# Bookkeeping of the suite (no clocks involved in what is asserted)


def test_measure_calls_every_contender_in_rotating_rounds():
    from benchmarks import timing

    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    measured = timing.measure(contenders, warmup=1, min_rounds=4, max_rounds=4, budget_s=1.0)
    assert calls[:6] == list("abcabc")  # first calls, then the warm-up
    rounds = [calls[6 + 6 * r: 12 + 6 * r] for r in range(4)]
    # Each contender twice in a row per round: an untimed switch-in call, then the timed one.
    assert rounds == [list("aabbcc"), list("bbccaa"), list("ccaabb"), list("aabbcc")]
    assert len(calls) == 6 + 6 * 4
    assert all(len(m.times_s) == 4 for m in measured.values())
    summary = measured["a"].summary()
    assert summary["rounds"] == 4 and summary["min_s"] <= summary["q1_s"] <= summary["median_s"] <= summary["q3_s"]


def test_measure_freezes_the_heap_only_while_it_times():
    import gc

    from benchmarks import timing

    frozen = []
    contenders = {"a": lambda: frozen.append(gc.get_freeze_count())}
    timing.measure(contenders, warmup=0, min_rounds=2, max_rounds=2, budget_s=1.0)
    # First call unfrozen; in the rounds (switch-in and timed calls) the setup heap is frozen.
    assert frozen[0] == 0 and all(count > 0 for count in frozen[1:]) and len(frozen) == 5
    assert gc.get_freeze_count() == 0


def _row(kind, ratio, label="B=8"):
    return dict(kind=kind, model="m", label=label,
                ratios=dict(fedjax_over_floor_jax=ratio, torch_func_over_fedjax=1 / ratio, breaching_over_fedjax=9.0))


def test_targets_judge_every_row():
    from benchmarks import analysis

    verdicts = {t["target"]: t["holds"] for t in analysis.targets(
        [_row("local_gradient", 1.2), _row("local_gradient", 1.4, "B=64"), _row("aggregate", 1.1)])}
    lg_floor, lg_torch, agg_floor, agg_breaching = verdicts.values()
    assert lg_floor is False  # one of the two batch sizes is above 1.3x
    assert lg_torch is False  # torch.func would be faster at both (1/1.2 and 1/1.4 < 1)
    assert agg_floor is True and agg_breaching is None
    empty = analysis.targets([])
    assert all(t["holds"] is None and not t["values"] for t in empty)


def test_cli_grids():
    from benchmarks import cli

    parse = cli._parser().parse_args
    assert parse([]).grid == "full"
    assert parse(["--quick"]).grid == "quick"
    assert parse(["--grid", "smoke"]).grid == "smoke"
    with pytest.raises(SystemExit):
        parse(["--quick", "--grid", "smoke"])


def test_gc_pause_prints_both_heap_states(capsys):
    import gc

    from benchmarks.studies import gc_pause

    assert gc_pause.main(["--batch", "2", "--calls", "3", "--repeats", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("heap ")]
    labels = [line.split(" collection")[0].split() for line in lines]
    assert labels == [
        ["heap", "as", "it", "is", "fedjax_users"], ["heap", "as", "it", "is", "floor_jax"],
        ["heap", "frozen", "fedjax_users"], ["heap", "frozen", "floor_jax"],
    ]
    # three call positions after each collection, and the heap unfrozen afterwards
    assert all(len(line.split("|")[1].split(":")[1].split()) == 3 for line in lines)
    assert gc.get_freeze_count() == 0
