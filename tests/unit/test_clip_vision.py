"""The plain ViT tower built without open_clip is open_clip's: same parameters, same outputs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from tokenflow.config import SemanticEncoderConfig
from tokenflow.models.clip_vision import (PLAIN_VALUES, SHAPE_DEFAULTS, UNUSED_FIELDS, PlainViT,
                                          open_clip_model_config)
from tokenflow.models.semantic_tower import SemanticTower

_SMALL = {"width": 64, "layers": 2, "head_width": 32}


def _tower_pair(arch: str, overrides: dict, image_size: int = 64,
                patch_size: int = 8) -> tuple[SemanticTower, SemanticTower]:
    """(open_clip's tower with perturbed weights, the structure-only tower with them loaded)."""
    cfg = SemanticEncoderConfig(backend="open_clip", arch=arch, patch_size=patch_size, overrides=overrides)
    torch.manual_seed(0)
    reference = SemanticTower(cfg, image_size).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rebuilt = SemanticTower(cfg.model_copy(update={"overrides": reference.architecture}), image_size,
                            structure_only=True).eval()
    rebuilt.load_state_dict(reference.state_dict(), strict=True)
    return reference, rebuilt


@pytest.mark.parametrize("arch, overrides", [
    ("ViT-B-16", _SMALL),
    ("ViT-B-16-quickgelu", {**_SMALL, "mlp_ratio": 2.0}),
    ("ViT-S-16", {"layers": 1, "head_width": 48}),
])
def test_plain_vit_gives_open_clips_tokens_and_target(arch, overrides):
    reference, rebuilt = _tower_pair(arch, overrides)
    assert isinstance(rebuilt.backbone, PlainViT) and not isinstance(reference.backbone, PlainViT)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert (rebuilt.token_dim, rebuilt.target_dim, rebuilt.architecture) == \
        (reference.token_dim, reference.target_dim, reference.architecture)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.tokens(images), reference.tokens(images))
        assert torch.equal(rebuilt.target(images), reference.target(images))


@pytest.mark.parametrize("overrides", [{**_SMALL, "ls_init_value": 0.1}, {**_SMALL, "no_ln_pre": True},
                                       {**_SMALL, "pool_type": "avg"}, {**_SMALL, "qk_norm": True}])
def test_other_towers_are_built_by_open_clip(overrides):
    reference, rebuilt = _tower_pair("ViT-B-16", overrides)
    assert type(rebuilt.backbone) is type(reference.backbone)


def test_the_plain_fields_are_open_clips_vision_config():
    from open_clip.model import CLIPVisionCfg

    defaults = {f.name: f.default for f in dataclasses.fields(CLIPVisionCfg)}
    assert defaults.keys() == SHAPE_DEFAULTS.keys() | PLAIN_VALUES.keys() | UNUSED_FIELDS
    assert {k: defaults[k] for k in SHAPE_DEFAULTS} == SHAPE_DEFAULTS
    assert all(defaults[k] in values for k, values in PLAIN_VALUES.items())


@pytest.mark.parametrize("arch", ["ViT-B-16", "ViT-L-14-quickgelu", "RN50", "no-such-model"])
def test_model_configs_are_read_as_open_clip_reads_them(arch):
    import open_clip

    assert open_clip_model_config(arch) == open_clip.get_model_config(arch)


def test_loading_a_saved_tokenizer_does_not_import_open_clip(tmp_path, tiny_config):
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.models.weights import save_tokenizer

    path = tmp_path / "tok.safetensors"
    save_tokenizer(TokenFlowTokenizer(tiny_config, with_teacher=False), path)
    code = ("import sys; from tokenflow.models.weights import load_tokenizer; "
            f"load_tokenizer({str(path)!r}); "
            "print(sorted(m for m in ('open_clip', 'torchvision', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
