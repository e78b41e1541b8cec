"""Shared fixtures: the tiny tokenizer config and real photographs shipped by scikit-image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "configs" / "models"

# Photographs bundled inside scikit-image (no download).
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry",
                   "hubble_deep_field", "retina", "colorwheel", "logo", "coins", "camera")


def one_corpus(manifest: dict, url: str = "", name: str = "shapes") -> list:
    """A training stage's data when it reads a single corpus (or its token shards): ``manifest``
    at ``url``, weight 1."""
    from tokenflow.data.stage_data import StageData

    return [StageData(name, 1.0, manifest, url)]


@pytest.fixture(scope="session")
def tiny_config():
    from tokenflow.config import load_config

    return load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml").tokenizer


@pytest.fixture(scope="session")
def photos() -> list[torch.Tensor]:
    """Real RGB photographs as float [3, H, W] tensors in [0, 1]."""
    from skimage import data

    out = []
    for name in _SKIMAGE_PHOTOS:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        arr = np.ascontiguousarray(arr[..., :3])
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0)
    return out


def random_crops(photos: list[torch.Tensor], n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random square crops of random photos, area-resized to ``size``: [n, 3, size, size]."""
    crops = []
    for _ in range(n):
        img = photos[int(torch.randint(len(photos), (), generator=generator))]
        h, w = img.shape[1:]
        side = int(torch.randint(size, min(h, w) // 2 + 1, (), generator=generator))
        y = int(torch.randint(0, h - side + 1, (), generator=generator))
        x = int(torch.randint(0, w - side + 1, (), generator=generator))
        crop = img[None, :, y : y + side, x : x + side]
        crops.append(torch.nn.functional.interpolate(crop, size=(size, size), mode="area"))
    return torch.cat(crops)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session; its endpoint and key are exported in the
    standard AWS variables, so every S3 client started after this (Ray workers too) finds it."""
    from tokenflow.services.object_store import ObjectStore

    store = ObjectStore(tmp_path_factory.mktemp("s3")).start(dict(os.environ))
    saved = {k: os.environ.get(k) for k in store.client_env}
    os.environ.update(store.client_env)
    forget_s3_clients()
    yield store
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    forget_s3_clients()
    store.stop()


def forget_s3_clients() -> None:
    """Drop fsspec's cached S3 filesystems: they keep the endpoint and key of the environment
    they were made in, and tests here change it (one process of a deployment never does)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_url(s3_store, request) -> str:
    """A fresh prefix in the session's bucket."""
    import uuid

    return f"s3://{s3_store.bucket}/{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"
