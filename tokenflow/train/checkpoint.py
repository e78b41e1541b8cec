"""Training checkpoints: DeepSpeed engine states plus each rank's client state.

Layout of one checkpoint directory (Ray Train merges every rank's files into it):

    <engine name>/latest, <engine name>/state/...   DeepSpeed save_checkpoint output
    rank<R>.json                                    step, data position, RNG state of rank R,
                                                    size and sha256 of every file rank R wrote

:func:`verify_checkpoint` checks a rank's files against its record before anything is loaded,
so a truncated or overwritten file is found without DeepSpeed half-loading it. Loading is
strict: a missing engine state or a missing or unreadable optimizer shard is a
:class:`CheckpointError`, never a silent fresh start. A checkpoint saved by another number of
workers is loaded through DeepSpeed's universal checkpoint format (:func:`to_universal`, then
:func:`load_resized`), which re-partitions the ZeRO optimizer and parameter shards.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from tokenflow.models.weights import file_sha256

TAG = "state"
UNIVERSAL_TAG = "state_universal"


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
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file()}  # this rank's directory: its own files
    state = {"world_size": world_size, "rng": _rng_state(), "files": files, **client_state}
    (directory / f"rank{rank}.json").write_text(json.dumps(state, sort_keys=True))


def saved_world_size(directory: Path) -> int | None:
    """How many workers saved the checkpoint (from rank 0's file), or None when it is unreadable."""
    try:
        return int(json.loads((directory / "rank0.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_checkpoint(directory: Path, rank: int, world_size: int) -> str | None:
    """Why rank ``rank`` of ``world_size`` cannot resume from ``directory``, or None when the
    files it checks verify. Each rank checks the rank files (and every file they list: present,
    same size and sha256, and pickling nothing but tensors and DeepSpeed's own checkpoint
    classes) of the saving ranks ``rank, rank + world_size, ...``, so together the ranks check
    all of them, whatever the saving world size was; every rank refuses a file no rank wrote."""
    saved = saved_world_size(directory)
    if saved is None or saved < 1:
        return "rank0.json missing or unreadable"
    try:
        for saver in range(rank, saved, world_size):
            if problem := _verify_rank(directory, saver, saved):
                return problem
        return _unlisted_file(directory, saved)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a rank file of the wrong shape
        return f"a rank file is malformed ({type(exc).__name__}: {exc})"


# What DeepSpeed pickles into its checkpoints besides what torch's weights-only unpickler allows
# (tensors, containers, numbers). DeepSpeed loads its files with full unpickling, so a file that
# pickles anything else (a function call, any other class) is refused before DeepSpeed reads it.
DEEPSPEED_PICKLED_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def _unsafe_pickle(path: Path) -> str | None:
    """Why the torch file at ``path`` must not be unpickled, or None."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        unsafe = set(get_unsafe_globals_in_checkpoint(str(path))) - DEEPSPEED_PICKLED_CLASSES
    except Exception as exc:  # not a torch zip archive: a legacy or foreign pickle
        return f"not a torch checkpoint archive ({type(exc).__name__}: {exc}); refusing to unpickle it"
    if unsafe:
        return f"pickles {', '.join(sorted(unsafe))}, which no DeepSpeed checkpoint holds; refusing to unpickle it"
    return None


def _unlisted_file(directory: Path, saved: int) -> str | None:
    """A file in the checkpoint that no saving rank listed (DeepSpeed globs shard files, so a
    planted one would be loaded), or None."""
    listed = {f"rank{r}.json" for r in range(saved)}
    for r in range(saved):
        try:
            listed.update(json.loads((directory / f"rank{r}.json").read_text()).get("files", {}))
        except (OSError, ValueError):
            return f"rank{r}.json missing or unreadable"
    for path in sorted(directory.rglob("*")):
        if path.is_file() and str(path.relative_to(directory)) not in listed:
            return f"{path.relative_to(directory)} was written by no rank"
    return None


def _verify_rank(directory: Path, rank: int, world_size: int) -> str | None:
    rank_file = directory / f"rank{rank}.json"
    if not rank_file.is_file():
        return f"no state for rank {rank} of the {world_size} that saved it"
    try:
        state = json.loads(rank_file.read_text())
    except (OSError, ValueError) as exc:
        return f"{rank_file.name} unreadable ({exc})"
    if state.get("world_size") != world_size:
        return f"{rank_file.name} says {state.get('world_size')} workers saved it, rank0.json {world_size}"
    if "files" not in state:
        return f"{rank_file.name} lists no file digests (written by an older version)"
    for name, expected in sorted(state["files"].items()):
        path = directory / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} differs from what was written (sha256)"
        if path.suffix == ".pt" and (problem := _unsafe_pickle(path)):
            return f"{name} {problem}"
    return None


def _own_optimizer_shard(engine_dir: Path, rank: int) -> list[Path]:
    """This data-parallel rank's ZeRO optimizer shard(s)."""
    return sorted((engine_dir / TAG).glob(f"zero_pp_rank_{rank}_*optim_states.pt"))


def load_checkpoint(directory: Path, engines: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Restore engines (with optimizer states) and this rank's RNG from a checkpoint saved by
    ``world_size`` workers; returns this rank's client state."""
    rank_file = directory / f"rank{rank}.json"
    if not rank_file.is_file():
        raise CheckpointError(f"{directory}: no state for rank {rank}")
    state = json.loads(rank_file.read_text())
    if state["world_size"] != world_size:
        raise CheckpointError(f"{directory}: saved by {state['world_size']} workers, resuming with "
                              f"{world_size}: load it with load_resized")
    for name, engine in engines.items():
        engine_dir = directory / name
        if not _own_optimizer_shard(engine_dir, rank):
            raise CheckpointError(f"{engine_dir}: optimizer state missing for rank {rank}; "
                                  "refusing to resume without it")
        _load_engine(engine, engine_dir, TAG)
    _set_rng_state(state["rng"])
    return state


def to_universal(directory: Path, engine: str, out: Path) -> None:
    """Convert engine ``engine``'s DeepSpeed checkpoint in ``directory`` into DeepSpeed's
    universal form under ``out/<engine>/`` (``ds_to_universal``; a subprocess, as DeepSpeed runs it)."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(directory / engine / TAG), "--output_folder", str(out / engine / UNIVERSAL_TAG),
           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise CheckpointError(f"{directory / engine}: conversion to a universal checkpoint failed: {tail}")


def load_resized(directory: Path, universal: Path, engines: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    """Restore engines from their universal form under ``universal`` (see :func:`to_universal`)
    of a checkpoint saved by another number of workers, and this rank's RNG from saving rank
    ``rank`` modulo their number; returns every saving rank's client state, in rank order."""
    saved = saved_world_size(directory)
    if saved is None:
        raise CheckpointError(f"{directory}: rank0.json missing or unreadable")
    states = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(saved)]
    for name, engine in engines.items():
        with _universal_loading(engine):
            _load_engine(engine, universal / name, UNIVERSAL_TAG)
    _set_rng_state(states[rank % saved]["rng"])
    return states


@contextmanager
def _universal_loading(engine: Any) -> Iterator[None]:
    """DeepSpeed reads the universal-load switch from the engine's config at load time; set it
    for this one load only (the engine saves ordinary checkpoints afterwards)."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def _load_engine(engine: Any, engine_dir: Path, tag: str) -> None:
    try:
        path, _ = engine.load_checkpoint(str(engine_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    except Exception as exc:  # DeepSpeed/torch raise many types for a damaged file
        raise CheckpointError(f"{engine_dir}: cannot load ({type(exc).__name__}: {exc})") from exc
    if path is None:
        raise CheckpointError(f"{engine_dir}: DeepSpeed found no checkpoint to load")
