"""The GPU benchmark's model-FLOP count and peak lookup (no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_gpu import LLAMA_1B, flops_per_sample, peak_tflops
from tokenflow.config import LanguageModelConfig
from tokenflow.models.generator import NextScaleGenerator, TextBatch
from tokenflow.models.language_model import build_language_model
from tokenflow.models.quantizer import CodebookFeatures


def test_model_flops_match_torchs_count_of_a_training_step():
    """The formula behind MFU against torch's FLOP counter (matmuls and attention, forward and
    backward) on the meta device, for a narrow model of the benchmark LM's kind and the B scales."""
    arch = {**LLAMA_1B, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    scales = (1, 2, 4, 6, 8, 10, 12, 14)
    with torch.device("meta"):
        lm = build_language_model(LanguageModelConfig(architecture=arch), 1000)
        codebook = CodebookFeatures(scales, torch.randn(4096, 32), torch.randn(4096, 8))
        model = NextScaleGenerator(lm, codebook, 998, 999, qk_norm=True)
    batch, text_len = 2, 16
    text = TextBatch(torch.zeros(batch, text_len, dtype=torch.long, device="meta"),
                     torch.ones(batch, text_len, dtype=torch.bool, device="meta"))
    tokens = torch.zeros(batch, codebook.num_tokens, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(text, tokens).loss.backward()
    expected = flops_per_sample(model, text_len + codebook.num_tokens + 1)
    assert counter.get_total_flops() / batch == pytest.approx(expected, rel=0.01)


def test_peak_comes_from_the_flag_the_table_or_refuses():
    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == (989.0, "dense bf16 peak of H100")
    assert peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert peak_tflops("Some GPU", 123.0) == (123.0, "--peak-tflops")
    assert peak_tflops(None, None)[1].startswith("placeholder")
    with pytest.raises(SystemExit, match="--peak-tflops"):
        peak_tflops("Some GPU", None)
