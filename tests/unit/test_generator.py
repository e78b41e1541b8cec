"""Next-scale generation: the block-causal mask, teacher forcing, the sampler."""

from __future__ import annotations

import pytest
import torch

from tokenflow.config import LanguageModelConfig, SamplingConfig
from tokenflow.models.generator import (NextScaleGenerator, TextBatch, block_causal_mask, block_ids, left_pad,
                                       scale_losses)
from tokenflow.models.language_model import build_language_model
from tokenflow.models.quantizer import CodebookFeatures, resize
from tokenflow.models.sampling import filter_logits, guidance, guided_logits, sample_from, sample_tokens
from tokenflow.models.tokenizer import TokenFlowTokenizer

TINY_LM = LanguageModelConfig(architecture={
    "model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 256,
    "tie_word_embeddings": True}, attn_implementation="eager")
# The same size as a Llama (no native QK-norm: the generator patches it in).
TINY_LLAMA = LanguageModelConfig(architecture={
    "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 256,
    "tie_word_embeddings": True}, attn_implementation="eager")


def test_block_causal_mask_sees_text_and_own_and_earlier_scales():
    scales = (1, 2, 3)
    text_len = 3
    blocks = block_ids(text_len, scales, len(scales), with_end=True)
    valid = torch.ones(1, blocks.numel(), dtype=torch.bool)
    valid[0, 0] = False  # one left-pad position
    mask = block_causal_mask(blocks, valid, torch.float32)[0, 0] == 0
    scale_of = {}
    pos = text_len
    for j, s in enumerate(scales):
        for _ in range(s * s):
            scale_of[pos] = j
            pos += 1
    end = pos
    for q in range(blocks.numel()):
        for k in range(blocks.numel()):
            if q == k:
                expected = True
            elif k == 0:
                expected = False  # padding is never seen
            elif k < text_len:
                expected = k <= q  # text: causal; every image position sees all text
            elif q < text_len:
                expected = False  # text never sees the image
            elif q == end:
                expected = True
            elif k == end:
                expected = False
            else:
                expected = scale_of[k] <= scale_of[q]
            assert bool(mask[q, k]) == expected, (q, k)


def test_teacher_forcing_inputs_are_the_tokenizers_accumulated_features(tiny_config):
    torch.manual_seed(0)
    tok = TokenFlowTokenizer(tiny_config, with_teacher=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        latent = tok.latent(images)
        out = tok.quantizer(latent)
    tokens = torch.cat([out.indices[s] for s in tok.quantizer.scales], dim=1)
    codebook = CodebookFeatures.from_quantizer(tok.quantizer)
    # All scales accumulated: exactly what the quantizer's forward accumulated.
    assert torch.equal(codebook.tokens_to_features(tokens), out.features)
    inputs = codebook.next_scale_inputs(tokens)
    scales = tok.quantizer.scales
    assert inputs.shape == (2, sum(s * s for s in scales[1:]), 40)
    # Scale j's input: the quantizer's own accumulation over scales < j, area-resized to s_j.
    per_scale = codebook.split_tokens(tokens)
    grid = scales[-1]

    def upsampled(i: int) -> torch.Tensor:
        codes = tok.quantizer.lookup(per_scale[i]).view(2, scales[i], scales[i], -1).permute(0, 3, 1, 2)
        return resize(codes, grid, "bicubic")

    offset = 0
    for j in range(1, len(scales)):
        expected = resize(sum(upsampled(i) for i in range(j)), scales[j], "area").flatten(2).transpose(1, 2)
        n = scales[j] ** 2
        torch.testing.assert_close(inputs[:, offset : offset + n], expected, rtol=0, atol=1e-6)
        offset += n


def _generator(tiny_config, seed: int = 0) -> NextScaleGenerator:
    torch.manual_seed(seed)
    tok = TokenFlowTokenizer(tiny_config, with_teacher=False)
    lm = build_language_model(TINY_LM, vocab_size=40)
    return NextScaleGenerator(lm, CodebookFeatures.from_quantizer(tok.quantizer), image_start_id=4, image_end_id=5,
                              qk_norm=True)


def test_scale_logits_match_the_teacher_forced_pass(tiny_config):
    """Sampling-time logits of every scale equal the training pass's logits at those positions,
    and padding the prompt further does not change them."""
    model = _generator(tiny_config).eval()
    tokens = torch.randint(0, 512, (2, 130))
    text = left_pad([[1, 7, 8, 9], [1, 10]], pad_id=0)
    with torch.no_grad():
        full = model(text, tokens).logits
        per_scale = model.codebook.split_tokens(tokens)
        offset = 0
        wider = TextBatch(torch.nn.functional.pad(text.ids, (3, 0)), torch.nn.functional.pad(text.mask, (3, 0)))
        for j, s in enumerate(model.scales):
            logits = model.scale_logits(text, per_scale, j)
            torch.testing.assert_close(logits, full[:, offset : offset + s * s], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.scale_logits(wider, per_scale, j), logits, rtol=1e-4, atol=1e-4)
            offset += s * s


def test_generator_trains_and_ignores_later_scales(tiny_config):
    model = _generator(tiny_config)
    tokens = torch.randint(0, 512, (2, 130))
    text = left_pad([[1, 7], [1]], pad_id=0)
    out = model(text, tokens)
    out.loss.backward()
    assert model.image_inputs.feature_proj[0].weight.grad.abs().sum() > 0
    assert model.image_head.weight.grad.abs().sum() > 0
    # Changing the last scale's tokens cannot change any prediction (no scale sees its own tokens).
    changed = tokens.clone()
    changed[:, -64:] = (changed[:, -64:] + 1) % 512
    with torch.no_grad():
        torch.testing.assert_close(model(text, changed).logits, out.logits.detach())


def test_scale_losses_split_the_loss_by_scale(tiny_config):
    model = _generator(tiny_config).eval()
    tokens = torch.randint(0, 512, (2, 130))
    with torch.no_grad():
        out = model(left_pad([[1, 7], [1]], pad_id=0), tokens)
    losses = scale_losses(out.logits, tokens, model.scales)
    sizes = torch.tensor([s * s for s in model.scales], dtype=torch.float32)
    assert losses.shape == (6,)
    torch.testing.assert_close((losses * sizes).sum() / sizes.sum(), out.loss)  # the token-weighted mean
    first = torch.nn.functional.cross_entropy(out.logits[:, 0], tokens[:, 0])
    torch.testing.assert_close(losses[0], first)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, 0.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, 0, 0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.75
    assert kept(filter_logits(logits, 0, 0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, 0, 0.9)) == [True, True, True, False]
    assert kept(filter_logits(logits, 3, 0.6)) == [True, True, False, False]
    assert kept(filter_logits(logits, 0, 0.0)) == [True] * 4


def test_cfg_ramp_is_linear_over_scales():
    assert [guidance(i, 5, 4.0) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(guided_logits(cond, uncond, 2.0), torch.tensor([6.0, -2.0]))


class _KnownLogits:
    """Prompted rows favour token (scale + 1); empty-prompt rows favour token 0 strongly; the
    draft of a refinement round shifts preference to token 7."""

    scales = (1, 2, 3)

    def __init__(self):
        self.calls = []

    def sampling_cache(self, text):
        return lambda scale_tokens, scale, draft=None: self.scale_logits(text, scale_tokens, scale, draft)

    def scale_logits(self, text, scale_tokens, scale, draft=None):
        self.calls.append((scale, draft is not None, [t.shape for t in scale_tokens]))
        b = text.ids.shape[0]
        n = self.scales[scale] ** 2
        logits = torch.zeros(b, n, 10)
        prompted = text.mask.sum(1) > 1
        logits[prompted, :, scale + 1] = 3.0
        logits[~prompted, :, 0] = 5.0
        if draft is not None:
            logits[prompted, :, 7] = 10.0
        return logits


def test_sampler_cfg_ramp_rounds_and_greedy_last_round():
    model = _KnownLogits()
    text = left_pad([[1, 2, 3]], pad_id=0)
    empty = left_pad([[1]], pad_id=0)
    greedy = SamplingConfig(cfg_scale=1.0, top_k=(1,), top_p=(0.0,))
    tokens = sample_tokens(model, text, empty, greedy)
    # Scale 0 (no guidance): token 1. Scale 1 (t=.5): 1.5*3 at token 2 vs -.5*5 at token 0 -> 2.
    assert tokens[0, 0] == 1 and (tokens[0, 1:5] == 2).all() and (tokens[0, 5:] == 3).all()
    # Refinement rounds run on every scale but the first, with the previous round's draft.
    model.calls.clear()
    three = SamplingConfig(cfg_scale=1.0, top_k=(3, 2, 1), top_p=(0.8, 0.8, 0.0))
    tokens = sample_tokens(model, text, empty, three, torch.Generator().manual_seed(0))
    assert [(s, d) for s, d, _ in model.calls] == [(0, False), (1, False), (1, True), (1, True),
                                                   (2, False), (2, True), (2, True)]
    assert (tokens[0, 1:] == 7).all()  # the last, greedy round follows the draft-conditioned logits
    # With huge guidance at the last scale the unconditional favourite is pushed out.
    strong = SamplingConfig(cfg_scale=100.0, top_k=(0,), top_p=(0.5,))
    tokens = sample_tokens(_KnownLogits(), text, empty, strong, torch.Generator().manual_seed(0))
    assert (tokens[0, 5:] == 3).all()


def test_negative_prompt_is_the_unconditional_branch():
    model = _KnownLogits()
    seen = []
    inner = model.scale_logits
    model.scale_logits = lambda text, *a, **k: (seen.append(text), inner(text, *a, **k))[1]
    text = left_pad([[1, 2, 3], [1, 4]], pad_id=0)
    negative = left_pad([[1, 9, 9, 9, 9]], pad_id=0)  # wider than the prompts
    sample_tokens(model, text, negative, SamplingConfig(cfg_scale=2.0, top_k=(1,), top_p=(0.0,)))
    assert seen
    for batch in seen:  # every call: the prompts (left-padded further), then one negative row per prompt
        assert batch.ids.shape == (4, 5)
        assert batch.ids[2:].tolist() == [[1, 9, 9, 9, 9]] * 2 and batch.mask[2:].all()
        assert batch.ids[:2, -3:].tolist() == [[1, 2, 3], [0, 1, 4]]
        assert batch.mask[:2].sum(1).tolist() == [3, 2]


def test_sampler_runs_on_the_real_model(tiny_config):
    model = _generator(tiny_config).eval()
    text = left_pad([[1, 7, 8], [1, 9]], pad_id=0)
    empty = left_pad([[1]], pad_id=0)
    tokens = sample_tokens(model, text, empty, SamplingConfig(top_k=(50, 1), top_p=(0.8, 0.0)),
                           torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 130) and tokens.min() >= 0 and tokens.max() < 512


@pytest.mark.parametrize("lm_cfg", [TINY_LM, TINY_LLAMA, TINY_LM.model_copy(update={"attn_implementation": "sdpa"})],
                         ids=["qwen3", "llama-qk-norm", "qwen3-sdpa"])
def test_kv_cached_sampler_returns_the_uncached_tokens(tiny_config, lm_cfg):
    """fp32: the cached sampler (new positions only) draws exactly the tokens of the full
    recomputation for the same seed, with the reference's three rounds and a negative prompt."""
    torch.manual_seed(0)
    tok = TokenFlowTokenizer(tiny_config, with_teacher=False)
    model = NextScaleGenerator(build_language_model(lm_cfg, vocab_size=40),
                               CodebookFeatures.from_quantizer(tok.quantizer), 4, 5, qk_norm=True).eval()
    text = left_pad([[1, 7, 8, 9], [1, 10], [1, 11, 12]], pad_id=0)
    negative = left_pad([[1, 13]], pad_id=0)
    cfg = SamplingConfig(cfg_scale=3.0, top_k=(300, 100, 1), top_p=(0.8, 0.8, 0.0))
    cached = sample_tokens(model, text, negative, cfg, torch.Generator().manual_seed(3))
    full = sample_tokens(model, text, negative, cfg, torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(cached, full)


def test_kv_cache_logits_match_scale_logits_and_refuse_out_of_order_calls(tiny_config):
    model = _generator(tiny_config).eval()
    text = left_pad([[1, 7, 8, 9], [1, 10]], pad_id=0)
    tokens = torch.randint(0, 512, (2, 130)).split([s * s for s in model.scales], dim=1)
    cache = model.sampling_cache(text)
    with torch.no_grad():
        for j in range(len(model.scales)):
            torch.testing.assert_close(cache(list(tokens), j), model.scale_logits(text, list(tokens), j))
            if j > 0:  # a refinement round: its draft block is not kept in the cache
                draft = torch.randint(0, 512, tokens[j].shape)
                torch.testing.assert_close(cache(list(tokens), j, draft),
                                           model.scale_logits(text, list(tokens), j, draft))
        assert cache.cache.get_seq_length() == text.ids.shape[1] + 130
        with pytest.raises(ValueError, match="out of order"):
            cache(list(tokens), 2)


def test_batched_prompts_draw_the_tokens_each_draws_alone(tiny_config):
    """Prompts of different lengths batched, two rows each with the prompt's own generator: the
    same tokens as sampling each prompt alone (fp32; the eval stage's batching)."""
    model = _generator(tiny_config).eval()
    prompts, negative = [[1, 7, 8, 9], [1, 10], [1, 11, 12]], left_pad([[1]], pad_id=0)
    cfg = SamplingConfig(cfg_scale=3.0, top_k=(300, 100, 1), top_p=(0.8, 0.8, 0.0))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batched = sample_tokens(model, left_pad([p for p in prompts for _ in range(2)], 0), negative, cfg,
                            [g for g in gens for _ in range(2)])
    alone = [sample_tokens(model, left_pad([p, p], 0), negative, cfg, torch.Generator().manual_seed(10 + i))
             for i, p in enumerate(prompts)]
    assert torch.equal(batched, torch.cat(alone))


def test_top_k_draws_only_among_the_k_most_likely_then_the_nucleus():
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0]).expand(1, 2000, 5)
    assert set(sample_from(logits, 2, 0.0, 1.0, torch.Generator().manual_seed(0)).unique().tolist()) == {1, 3}
    # among the top 3 (probabilities .67, .24, .09) a nucleus of 0.8 keeps two
    assert set(sample_from(logits, 3, 0.8, 1.0, torch.Generator().manual_seed(0)).unique().tolist()) == {1, 3}
    assert set(sample_from(logits, 0, 0.0, 1.0, torch.Generator().manual_seed(0)).unique().tolist()) == set(range(5))


def test_per_row_generators_make_a_prompts_draws_independent_of_its_batch():
    logits = torch.randn(3, 5, 50)
    rows = [torch.Generator().manual_seed(s) for s in (1, 2)]
    together = sample_from(logits, 0, 0.0, 1.0, [rows[0], rows[0], rows[1]])
    first = sample_from(logits[:2], 0, 0.0, 1.0, torch.Generator().manual_seed(1))
    second = sample_from(logits[2:], 0, 0.0, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(together, torch.cat([first, second]))
    with pytest.raises(ValueError, match="generators"):
        sample_from(logits, 0, 0.0, 1.0, rows)


@pytest.mark.parametrize("bad", [{"top_k": (1, 2), "top_p": (0.5,)}, {"top_p": (1.5, 0.1, 0.0)}])
def test_sampling_config_rejects_mismatched_rounds(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)
