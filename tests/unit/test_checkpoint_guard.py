"""Checkpoints on shared storage are checked before DeepSpeed unpickles anything from them: a
file pickling code (even with digests rewritten to match), a foreign pickle and a planted file
are refused with a reason, and nothing is executed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from tokenflow.models.weights import file_sha256
from tokenflow.train.checkpoint import verify_checkpoint

MODEL_STATES = "generator/state/mp_rank_00_model_states.pt"


class _Payload:
    """What an attacker with write access to the bucket would plant: unpickling runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _checkpoint(root: Path, contents: object, dump=torch.save) -> Path:
    """A one-rank checkpoint whose model-states file holds ``contents`` and whose rank file
    records that file's true size and digest (as an attacker can rewrite it too)."""
    path = root / MODEL_STATES
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        dump(contents, f)
    files = {MODEL_STATES: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}}
    (root / "rank0.json").write_text(json.dumps({"world_size": 1, "step": 2, "files": files}))
    return root


def test_a_plain_tensor_checkpoint_verifies(tmp_path):
    assert verify_checkpoint(_checkpoint(tmp_path, {"module": {"w": torch.zeros(2)}, "iteration": 2}), 0, 1) is None


def test_a_pickled_command_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    directory = _checkpoint(tmp_path / "ckpt", {"module": _Payload(marker)})
    problem = verify_checkpoint(directory, 0, 1)
    assert problem is not None and problem.startswith(MODEL_STATES)
    assert "pickles posix.system" in problem and "refusing to unpickle it" in problem
    assert not marker.exists()


def test_a_foreign_pickle_is_refused(tmp_path):
    directory = _checkpoint(tmp_path, {"module": {}}, dump=pickle.dump)
    assert "not a torch checkpoint archive" in verify_checkpoint(directory, 0, 1)


@pytest.mark.parametrize("planted", ["generator/state/zero_pp_rank_9_mp_rank_00_optim_states.pt", "extra.json"])
def test_a_file_no_rank_wrote_is_refused(tmp_path, planted):
    directory = _checkpoint(tmp_path, {"module": {}})
    (directory / planted).write_bytes(b"x")
    assert verify_checkpoint(directory, 0, 1) == f"{planted} was written by no rank"
