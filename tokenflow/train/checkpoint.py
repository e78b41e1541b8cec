"""Training checkpoints: DeepSpeed engine states plus each rank's client state.

Layout of one checkpoint directory (Ray Train merges every rank's files into it):

    <engine name>/latest, <engine name>/state/...   DeepSpeed save_checkpoint output
    rank<R>.json                                    step, data position, RNG state of rank R

Loading is strict: a missing engine state, a missing or unreadable optimizer shard, or a rank
file from another world size is a :class:`CheckpointError`, never a silent fresh start.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch

TAG = "state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored exactly."""


def _rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def save_checkpoint(directory: Path, engines: dict[str, Any], rank: int, world_size: int,
                    client_state: dict[str, Any]) -> None:
    """Every rank calls this with the same directory layout (collective for ZeRO engines)."""
    for name, engine in engines.items():
        engine.save_checkpoint(str(directory / name), tag=TAG)
    state = {"world_size": world_size, "rng": _rng_state(), **client_state}
    (directory / f"rank{rank}.json").write_text(json.dumps(state, sort_keys=True))


def _own_optimizer_shard(engine_dir: Path, rank: int) -> list[Path]:
    """This data-parallel rank's ZeRO optimizer shard(s)."""
    return sorted((engine_dir / TAG).glob(f"zero_pp_rank_{rank}_*optim_states.pt"))


def load_checkpoint(directory: Path, engines: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Restore engines (with optimizer states) and this rank's RNG; returns its client state."""
    rank_file = directory / f"rank{rank}.json"
    if not rank_file.is_file():
        raise CheckpointError(f"{directory}: no state for rank {rank} (saved with another world size?)")
    state = json.loads(rank_file.read_text())
    if state["world_size"] != world_size:
        raise CheckpointError(f"{directory}: saved by {state['world_size']} workers, resuming with "
                              f"{world_size}; exact resume needs the same world size")
    for name, engine in engines.items():
        engine_dir = directory / name
        if not _own_optimizer_shard(engine_dir, rank):
            raise CheckpointError(f"{engine_dir}: optimizer state missing for rank {rank}; "
                                  "refusing to resume without it")
        try:
            path, _ = engine.load_checkpoint(str(engine_dir), tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        except Exception as exc:  # DeepSpeed/torch raise many types for a damaged file
            raise CheckpointError(f"{engine_dir}: cannot load ({type(exc).__name__}: {exc})") from exc
        if path is None:
            raise CheckpointError(f"{engine_dir}: DeepSpeed found no checkpoint to load")
    _set_rng_state(state["rng"])
    return state
