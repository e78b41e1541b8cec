"""The learning-rate schedule shared by the training stages."""

from __future__ import annotations

import math

import pytest
import torch

from tokenflow.config import ConfigError, LRScheduleConfig, load_config
from tokenflow.train.engines import lr_multiplier

from tests.conftest import REPO


def test_warmup_is_linear_from_zero_then_constant():
    schedule = LRScheduleConfig(warmup_steps=4)
    assert [lr_multiplier(schedule, s, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_runs_from_peak_after_warmup_to_the_floor_at_the_last_step(decay):
    schedule = LRScheduleConfig(warmup_steps=2, decay=decay, min_lr_ratio=0.1)
    values = [lr_multiplier(schedule, s, 12) for s in range(12)]
    assert values[1] == 1.0 and values[2] == 1.0
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    midpoint = lr_multiplier(schedule, 2 + 9 / 2, 12)  # halfway through the 9 decay steps
    assert midpoint == pytest.approx(0.1 + 0.9 * (0.5 if decay == "linear" else 0.5 * (1 + math.cos(math.pi / 2))))


def test_schedule_drives_a_torch_optimizer_through_lambda_lr():
    schedule = LRScheduleConfig(warmup_steps=1, decay="cosine")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(schedule, s, 5))
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2.0, 2.0, 1.0 + math.cos(math.pi / 3), 1.0 + math.cos(2 * math.pi / 3), 0.0])


def test_warmup_longer_than_the_run_is_rejected():
    smoke = REPO / "configs" / "pipelines" / "smoke.yaml"
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(smoke, ["train_tokenizer.steps=400", "train_tokenizer.lr_schedule.warmup_steps=400"])
    with pytest.raises(ConfigError, match="align_steps"):
        load_config(smoke, ["train_understanding.steps=1000", "train_understanding.align_steps=400",
                            "train_understanding.lr_schedule.warmup_steps=500"])
