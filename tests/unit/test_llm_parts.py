"""Text tokenizer, training examples, chat batches, answer parsing, LLM exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenflow.data.examples import caption_examples, conversation_examples, conversation_turns, yes_no_turns
from tokenflow.data.token_shards import TokenSample
from tokenflow.models.generator import NextScaleGenerator
from tokenflow.models.language_model import build_language_model
from tokenflow.models.llm_weights import (TEXT_TOKENIZER_DIR, WEIGHTS_NAME, generator_meta, load_generator,
                                          load_understanding, save_llm, save_text_tokenizer)
from tokenflow.models.quantizer import CodebookFeatures
from tokenflow.models.text import IMAGE_END, IMAGE_START, SPECIAL_TOKENS, train_bpe
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.understanding import IGNORE, UnderstandingModel, chat_batch

from tests.unit.test_generator import TINY_LLAMA, TINY_LM

TEXTS = ["two red circles left of a blue square", "USER: Is there a green triangle?\nASSISTANT:", " Yes", " No",
         "one yellow square and a red circle"]


def _sample(conversations) -> TokenSample:
    return TokenSample("k", np.arange(130), "a red circle", json.dumps({"conversations": conversations}))


def test_bpe_is_deterministic_and_has_the_special_tokens():
    a, b = train_bpe(TEXTS * 3, 300), train_bpe(list(reversed(TEXTS)) * 2, 300)
    assert a.get_vocab() == b.get_vocab()
    assert all(t in a.get_vocab() for t in SPECIAL_TOKENS)
    ids = a("two red circles", add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == "two red circles"


def test_conversations_become_turns_and_split_on_request():
    conv = [{"from": "human", "value": "<image>\nIs it red? Answer yes or no."}, {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "Is it blue?"}, {"from": "gpt", "value": "No"}]
    sample = _sample(conv)
    assert conversation_turns(sample.json) == [("Is it red? Answer yes or no.", "Yes"), ("Is it blue?", "No")]
    assert [e.turns for e in conversation_examples(sample, split_turns=True)] == [
        (("Is it red? Answer yes or no.", "Yes"),), (("Is it blue?", "No"),)]
    assert len(conversation_examples(sample, split_turns=False)[0].turns) == 2
    assert caption_examples(sample)[0].turns == (("Describe the image.", "a red circle"),)
    assert yes_no_turns(sample) == conversation_turns(sample.json)
    assert conversation_turns("not json") == conversation_turns(None) == []


def test_chat_batch_supervises_answers_and_eos_only():
    tok = train_bpe(TEXTS * 3, 300)
    batch = chat_batch(tok, [(("Is it red?", "Yes"),), (("Is it red?", "No"), ("Is it blue?", "Yes"))], 32)
    assert batch.ids.shape == batch.labels.shape == batch.mask.shape
    for row in range(2):
        supervised = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        assert supervised[-1] == tok.eos_token_id
        text = tok.decode([t for t in supervised if t != tok.eos_token_id])
        assert text.split() == (["Yes"] if row == 0 else ["No", "Yes"])
    assert not batch.mask[0, -1]  # the shorter row is right-padded


def test_parse_yes_no():
    from tokenflow.eval.mme import parse_answer  # the one yes/no reader (training probes and MME)

    assert [parse_answer(a) for a in ["Yes", "no.", " YES it is", "maybe", ""]] == ["yes", "no", "yes", "other",
                                                                                   "other"]


@pytest.mark.parametrize("lm_config", [TINY_LM, TINY_LLAMA], ids=["qwen3", "llama+qk_norm"])
def test_exports_round_trip(tmp_path, tiny_config, lm_config):
    torch.manual_seed(0)
    codebook = CodebookFeatures.from_quantizer(TokenFlowTokenizer(tiny_config, with_teacher=False).quantizer)
    tok = train_bpe(TEXTS * 3, 300)
    lm = build_language_model(lm_config, len(tok))
    gen = NextScaleGenerator(lm, codebook, tok.convert_tokens_to_ids(IMAGE_START), tok.convert_tokens_to_ids(IMAGE_END),
                             qk_norm=True)
    out = tmp_path / "gen"
    save_text_tokenizer(tok, str(out / TEXT_TOKENIZER_DIR))
    meta = {**generator_meta(gen, "eager"), "lm_config": lm.config.to_dict()}
    save_llm({k: v.clone() for k, v in gen.state_dict().items()}, meta, str(out / WEIGHTS_NAME))
    loaded, loaded_tok = load_generator(str(out))
    assert loaded_tok.get_vocab() == tok.get_vocab()
    for name, value in gen.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name

    und = UnderstandingModel(build_language_model(TINY_LM, len(tok)), codebook, tok.bos_token_id)
    out = tmp_path / "und"
    save_text_tokenizer(tok, str(out / TEXT_TOKENIZER_DIR))
    save_llm({k: v.clone() for k, v in und.state_dict().items()},
             {"kind": "understanding", "scales": list(codebook.scales), "bos_id": tok.bos_token_id,
              "lm_config": und.lm.config.to_dict()}, str(out / WEIGHTS_NAME))
    model, _ = load_understanding(str(out))
    tokens = torch.randint(0, 512, (2, 130))
    answers = model.generate(tokens, ["Is it red?", "Is there a blue square?"], tok, max_new_tokens=2)
    assert answers == und.eval().generate(tokens, ["Is it red?", "Is there a blue square?"], tok, max_new_tokens=2)


def test_understanding_reads_the_sum_of_all_scales_codes_through_a_gelu_mlp(tiny_config):
    """As the reference's i2t encoder: the image input is the sum of every scale's (bicubically
    upsampled) unit codes at the last scale's grid, 40-d, through Linear-GELU-Linear."""
    from tokenflow.models.quantizer import upsample_codes

    torch.manual_seed(0)
    codebook = CodebookFeatures.from_quantizer(TokenFlowTokenizer(tiny_config, with_teacher=False).quantizer)
    model = UnderstandingModel(build_language_model(TINY_LM, 40), codebook, bos_id=1)
    linear1, act, linear2 = model.projector
    assert isinstance(act, torch.nn.GELU) and (linear1.in_features, linear2.out_features) == (40, 32)
    tokens = torch.randint(0, 512, (2, 130))
    expected = sum(upsample_codes(codebook.lookup(t), s, 8)
                   for t, s in zip(codebook.split_tokens(tokens), codebook.scales)).flatten(2).transpose(1, 2)
    prefix = model._prefix(tokens)
    torch.testing.assert_close(prefix[:, 1:], model.projector(expected))
    assert prefix.shape == (2, 1 + 64, 32)


def test_llm_stages_refuse_token_shards_made_at_another_view():
    from tokenflow.config import TokenizerView
    from tokenflow.data.token_shards import TokenShardError
    from tokenflow.stages.llm_stage import check_view

    view = TokenizerView(image_size=256, scales=(1, 2, 4, 6, 8, 10, 12, 14, 16))
    made_at_view = {"tokenizer_view": view.model_dump(mode="json")}
    check_view(made_at_view, "s3://b/gen-tokens", view)
    check_view({"tokenizer_view": None}, "s3://b/tokens", None)
    check_view({}, "s3://b/old-tokens", None)  # manifests from before views: the trained view
    with pytest.raises(TokenShardError, match="made at tokenizer view None, the stage needs"):
        check_view({"tokenizer_view": None}, "s3://b/tokens", view)
    with pytest.raises(TokenShardError, match="pretokenize_generation"):
        check_view(made_at_view, "s3://b/gen-tokens", None)
