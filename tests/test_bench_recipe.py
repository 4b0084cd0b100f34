"""The recipe bench's own logic: each recipe trains with the optimizer it names, and the optimizer timer
counts every step of every optimizer."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_recipe  # noqa: E402


def test_recipes_name_their_optimizer_explicitly():
    # TrainConfig's default optimizer may change; a recipe's label must not silently change with it.
    assert bench_recipe.recipe_config("adamw-small-cpu", 0, 10).optimizer == "adamw"
    assert bench_recipe.recipe_config("muon-cpu-5min", 0, 10).optimizer == "muon"
    for name, recipe in bench_recipe.RECIPES.items():
        assert "optimizer" in recipe, name


def test_recipe_overrides_apply_to_a_copy():
    cfg = bench_recipe.recipe_config("muon-cpu-5min+muon_lr=0.04+model.n_layer=6", 1, 7)
    assert (cfg.muon_lr, cfg.model["n_layer"], cfg.seed, cfg.max_steps) == (0.04, 6, 1, 7)
    assert "n_layer" not in bench_recipe.RECIPES["muon-cpu-5min"].get("model", {})


def test_optimizer_timer_counts_each_optimizer_step():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt_a, opt_b = torch.optim.SGD([a], lr=0.1), torch.optim.AdamW([b], lr=0.1)
    timer = bench_recipe.OptimizerTimer()
    with timer:
        for _ in range(6):
            (a.sum() + b.sum()).backward()
            opt_a.step()
            opt_b.step()
    opt_a.step()  # after the block: not counted
    assert sorted(len(times) for times in timer.calls.values()) == [6, 6]
    assert timer.steady_per_step() > 0
