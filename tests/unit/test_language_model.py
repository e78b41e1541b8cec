"""QK-norm for LMs without it (the reference patches it into Llama)."""

from __future__ import annotations

import pytest
import torch

from tokenflow.models.generator import NextScaleGenerator
from tokenflow.models.language_model import HeadRMSNorm, add_qk_norm, build_language_model
from tokenflow.models.quantizer import CodebookFeatures

from tests.unit.test_generator import TINY_LLAMA, TINY_LM


def _attentions(lm):
    return [m for name, m in lm.named_modules() if name.endswith("self_attn")]


def _logits(lm, ids):
    with torch.no_grad():
        return lm(input_ids=ids).logits


def test_llama_gets_per_head_rms_norm_on_queries_and_keys():
    torch.manual_seed(0)
    lm = build_language_model(TINY_LLAMA, 40).eval()
    assert add_qk_norm(lm)
    assert not add_qk_norm(lm)  # idempotent: nothing left to patch
    hidden = torch.randn(3, 5, 32)
    for attn in _attentions(lm):
        assert isinstance(attn.q_proj, HeadRMSNorm) and isinstance(attn.k_proj, HeadRMSNorm)
        for proj, heads in ((attn.q_proj, 2), (attn.k_proj, 1)):
            out = proj(hidden).view(3, 5, heads, 16)
            raw = proj.proj(hidden).view(3, 5, heads, 16)
            # Each head's slice has unit root-mean-square and keeps its direction.
            torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3, 5, heads), rtol=0, atol=2e-3)  # eps 1e-6
            torch.testing.assert_close(torch.nn.functional.normalize(out, dim=-1),
                                       torch.nn.functional.normalize(raw, dim=-1))


def test_qk_norm_makes_attention_blind_to_query_and_key_scale():
    """Scaling every query/key projection changes a plain Llama's outputs, not a QK-normed one's."""
    ids = torch.randint(0, 40, (2, 7))
    for patched in (False, True):
        torch.manual_seed(0)
        lm = build_language_model(TINY_LLAMA, 40).eval()
        if patched:
            add_qk_norm(lm)
        before = _logits(lm, ids)
        with torch.no_grad():
            for attn in _attentions(lm):
                for proj in (attn.q_proj, attn.k_proj):
                    linear = proj.proj if patched else proj
                    linear.weight.mul_(8.0)
        after = _logits(lm, ids)
        if patched:
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        else:
            assert not torch.allclose(after, before, atol=1e-3)


def test_native_qk_norm_is_kept_and_the_generator_patches_only_when_asked(tiny_config):
    from tokenflow.models.tokenizer import TokenFlowTokenizer

    codebook = CodebookFeatures.from_quantizer(TokenFlowTokenizer(tiny_config, with_teacher=False).quantizer)
    qwen = build_language_model(TINY_LM, 40)
    assert not add_qk_norm(qwen)  # Qwen3 has q_norm/k_norm of its own
    assert all(hasattr(a, "q_norm") and not isinstance(a.q_proj, HeadRMSNorm) for a in _attentions(qwen))
    for qk_norm in (True, False):
        gen = NextScaleGenerator(build_language_model(TINY_LLAMA, 40), codebook, 4, 5, qk_norm=qk_norm)
        assert all(isinstance(a.q_proj, HeadRMSNorm) == qk_norm for a in _attentions(gen.lm))


def test_attention_without_projections_is_refused():
    class Attn(torch.nn.Module):
        pass

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    with pytest.raises(ValueError, match="cannot add QK-norm"):
        add_qk_norm(Block())


def test_weight_decay_spares_biases_and_norm_gains(tiny_config):
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.train.llm_common import decay_groups

    codebook = CodebookFeatures.from_quantizer(TokenFlowTokenizer(tiny_config, with_teacher=False).quantizer)
    gen = NextScaleGenerator(build_language_model(TINY_LLAMA, 40), codebook, 4, 5, qk_norm=True)
    named = [(n, p) for n, p in gen.named_parameters() if p.requires_grad]
    decay, no_decay = decay_groups([p for _, p in named], 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    spared = {n for n, p in named if any(p is q for q in no_decay["params"])}
    decayed = {n for n, p in named if any(p is q for q in decay["params"])}
    assert spared | decayed == {n for n, _ in named} and not spared & decayed
    assert "lm.model.layers.0.self_attn.q_proj.weight" in spared  # the QK-norm gain
    assert "lm.model.norm.weight" in spared and "image_head.bias" in spared
    assert {"image_head.weight", "image_inputs.position", "image_inputs.level",
            "lm.model.layers.0.self_attn.q_proj.proj.weight"} <= decayed
