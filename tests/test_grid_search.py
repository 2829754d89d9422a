"""Phase I coordinate descent: finds the optimum of a synthetic loss over a grid and stops by the spec's rule."""

import itertools
import math
import random

import pytest
import torch

from fastoptim.grid.search import CoordinateDescent


def drive(search, loss, log=None):
    """Answer every ask with loss(config); returns the configs in the order they were run."""
    log = [] if log is None else log
    while asked := search.ask():
        for hparams in asked:
            log.append(dict(hparams))
            search.tell(hparams, loss(hparams))
    return log


def random_separable_problem(rng):
    """A grid of 3 keys and a separable bowl with a random optimum on the grid (coordinate descent's home turf)."""
    grid = {"lr": [1e-3 * 2 ** i for i in range(6)], "beta1": [0.8, 0.9, 0.95, 0.98], "warmup": [0, 100, 200, 400]}
    optimum = {key: rng.choice(values) for key, values in grid.items()}
    weights = {key: rng.uniform(0.01, 0.1) for key in grid}
    index = {key: {v: i for i, v in enumerate(values)} for key, values in grid.items()}

    def loss(hparams):
        return 3.0 + sum(weights[k] * (index[k][hparams[k]] - index[k][optimum[k]]) ** 2 for k in grid)

    start = {key: rng.choice(values) for key, values in grid.items()}
    return grid, start, optimum, loss


def python_random(rng):
    """A random.Random drawn from conftest's per-test torch generator (fresh each run, reproducible by its seed)."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=rng)))


@pytest.mark.parametrize("problem", range(5))
def test_finds_grid_optimum_of_separable_loss(problem, rng):
    grid, start, optimum, loss = random_separable_problem(python_random(rng))
    search = CoordinateDescent(start, grid, delta=3e-3)
    log = drive(search, loss)

    brute = min((dict(zip(grid, values)) for values in itertools.product(*grid.values())), key=loss)
    assert brute == optimum
    assert search.incumbent == optimum
    assert search.best() == (optimum, loss(optimum))
    # Every config is run at most once, and far fewer than the full grid.
    keys = [tuple(sorted(h.items())) for h in log]
    assert len(keys) == len(set(keys))
    assert len(log) < math.prod(len(v) for v in grid.values())


@pytest.mark.parametrize("problem", range(5))
def test_stops_exactly_when_all_neighbours_run_and_none_improves_by_delta(problem, rng):
    rng = python_random(rng)
    grid = {"a": [0, 1, 2, 3, 4], "b": [0, 1, 2, 3]}
    table = {(a, b): rng.uniform(3.0, 3.05) for a in grid["a"] for b in grid["b"]}  # rugged: many near-ties
    loss = lambda h: table[(h["a"], h["b"])]
    delta = 3e-3
    search = CoordinateDescent({"a": 2, "b": 1}, grid, delta=delta)
    drive(search, loss)

    incumbent = search.incumbent
    neighbours = [{**incumbent, key: value} for key, values in grid.items() for value in values]
    for hparams in neighbours:
        assert search.score(hparams) == loss(hparams), f"neighbour {hparams} of the final incumbent was not run"
        assert loss(hparams) >= loss(incumbent) - delta


def test_move_needs_improvement_larger_than_delta():
    grid = {"lr": [1, 2, 3]}
    improvements = {1: 0.0, 2: -0.0029, 3: -0.001}  # best neighbour improves by 2.9e-3 < Δ1
    search = CoordinateDescent({"lr": 1}, grid, delta=3e-3)
    drive(search, lambda h: 3.0 + improvements[h["lr"]])
    assert search.incumbent == {"lr": 1}
    assert search.moves == 0
    # grab_best_run still reports the minimum-loss run.
    assert search.best() == ({"lr": 2}, 3.0 - 0.0029)

    search = CoordinateDescent({"lr": 1}, grid, delta=3e-3)
    drive(search, lambda h: 3.0 + {1: 0.0, 2: -0.0031, 3: 0.0}[h["lr"]])
    assert search.incumbent == {"lr": 2} and search.moves == 1


def test_sweeps_one_key_at_a_time_and_repeats_passes_after_a_move():
    grid = {"x": [0, 1, 2], "y": [0, 1, 2]}
    # Non-separable: the best y depends on x, so a second pass over y is needed after x moves.
    loss = lambda h: 3.0 + 0.1 * (h["x"] - 2) ** 2 + 0.05 * (h["y"] - h["x"]) ** 2
    search = CoordinateDescent({"x": 0, "y": 0}, grid, delta=1e-3)
    batches = []
    while asked := search.ask():
        batches.append(asked)
        for hparams in asked:
            search.tell(hparams, loss(hparams))
    assert batches[0] == [{"x": 0, "y": 0}]
    for batch in batches[1:]:  # each batch varies a single key around one incumbent
        varying = {key for key in grid if len({h[key] for h in batch}) > 1}
        assert len(varying) <= 1
    assert search.incumbent == {"x": 2, "y": 2}
    assert search.moves == 4  # x→1, y→1, x→2, y→2: two passes


def test_divergence_counts_as_finished_and_failed():
    grid = {"lr": [1e-3, 1e-2, 1e-1, 1.0]}
    loss = lambda h: math.inf if h["lr"] >= 1e-1 else (math.nan if h["lr"] == 1e-3 else 3.0)
    search = CoordinateDescent({"lr": 1e-2}, grid)
    log = drive(search, loss)
    assert search.done and search.incumbent == {"lr": 1e-2}
    assert sorted(h["lr"] for h in log) == sorted(grid["lr"])
    assert search.score({"lr": 1e-3}) == math.inf  # NaN loss scored as a failure

    # A diverged start is beaten by any finite neighbour.
    search = CoordinateDescent({"lr": 1.0}, grid)
    drive(search, loss)
    assert search.incumbent == {"lr": 1e-2}


def test_infeasible_neighbours_are_skipped_and_infeasible_start_rejected():
    grid = {"warmup": [0, 50, 500, 5000]}
    feasible = lambda h: h["warmup"] <= 1000
    search = CoordinateDescent({"warmup": 50}, grid, feasible=feasible)
    log = drive(search, lambda h: 3.0 + h["warmup"] * 1e-4)
    assert all(h["warmup"] <= 1000 for h in log)
    with pytest.raises(ValueError, match="infeasible"):
        CoordinateDescent({"warmup": 5000}, grid, feasible=feasible)
    with pytest.raises(ValueError, match=r"grid\['lr'\] is empty"):
        CoordinateDescent({"lr": 1}, {"lr": []})


def test_fixed_keys_ride_along_and_empty_grid_runs_the_start():
    search = CoordinateDescent({"lr": 1, "eps": 1e-8}, {"lr": [1, 2]})
    log = drive(search, lambda h: 3.0 - 0.01 * h["lr"])
    assert all(h["eps"] == 1e-8 for h in log)
    search = CoordinateDescent({"lr": 1}, {})
    assert drive(search, lambda h: 3.0) == [{"lr": 1}]
