"""DeepSpeed engine setup shared by every training stage."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from tokenflow.config import LRScheduleConfig, load_deepspeed_config

log = logging.getLogger(__name__)


def deepspeed_config(name: str, micro_batch_size: int, grad_accum: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config file ``name`` completed with the stage's batch and clipping settings."""
    return {**load_deepspeed_config(name), "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum, "gradient_clipping": grad_clip}


def init_distributed(device: torch.device) -> None:
    """Join the process group Ray Train already set up (gloo on CPU, nccl on GPU)."""
    import deepspeed

    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op on first use (~45 s,
    # a compiler on every node); gloo collectives serve the CPU path without it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def lr_multiplier(schedule: LRScheduleConfig, step: int, total_steps: int) -> float:
    """The factor on the base learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return 1.0
    progress = min(1.0, (step - schedule.warmup_steps) / max(1, total_steps - 1 - schedule.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule.decay == "cosine" else 1.0 - progress
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * shape


def make_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
                schedule: LRScheduleConfig | None = None, total_steps: int = 1):
    """A DeepSpeed engine around ``model`` with a client torch optimizer (no JIT-built ops) and,
    when given, the learning-rate schedule over ``total_steps`` optimizer steps (the engine steps
    it at each optimizer step and checkpoints it)."""
    import deepspeed

    scheduler = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(schedule, step, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, lr_scheduler=scheduler)
    return engine


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device: its Ray-assigned GPU, or the CPU."""
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
