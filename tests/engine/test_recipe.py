"""The training recipes: the learning-rate schedule against a hand computation, and the paper overlay."""

import json
import math

import pytest
import torch
from monai.bundle import ConfigParser

from robustmri.engine.recipe import lr_factor, make_scheduler
from tests.helpers import BUNDLE

CONFIGS = BUNDLE / "configs"


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    # 10 steps, 2 of warm-up: 1/2, 2/2, then 0.5 (1 + cos(pi k / 7)) for k = 0..7
    factors = [lr_factor(step, 10, 2) for step in range(10)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(8)]
    assert factors == pytest.approx(expected)
    assert factors[2] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(step, 10, 0, "constant") for step in range(10)] == [1.0] * 10


def test_scheduler_steps_per_iteration_and_keeps_warm_up_within_the_run():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = make_scheduler(optimizer, epochs=2, steps_per_epoch=5, warmup_epochs=1)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:5] == pytest.approx([2e-3 * k / 5 for k in range(1, 6)])
    assert seen[4] == pytest.approx(2e-3) and seen[-1] == pytest.approx(0.0, abs=1e-12)
    # a warm-up as long as the run is cut to half of it, so there is still a decay
    short = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), epochs=1,
                           steps_per_epoch=4, warmup_epochs=1)
    assert short.lr_lambdas[0](1) == pytest.approx(1.0) and short.lr_lambdas[0](3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        make_scheduler(optimizer, 2, 5, schedule="step")


def test_the_paper_recipe_is_an_overlay_on_any_method():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "isp.json"), str(CONFIGS / "paper_recipe.json")])
    assert parser["optimizer#_target_"] == "torch.optim.Adam"
    assert (parser["learning_rate"], parser["lr_schedule"], parser["weight_decay"], parser["epochs"]) == \
        (0.01, "constant", 0.0, 40)
    assert parser["method_handlers"] == ["@isp"]  # still ISP
    product = json.loads((CONFIGS / "train.json").read_text())
    assert product["optimizer"]["_target_"] == "torch.optim.AdamW" and product["lr_schedule"] == "cosine"
    assert product["ema_decay"] == 0.99 and parser["ema_decay"] is None  # the paper kept no weight average
