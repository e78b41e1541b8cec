import pytest
import torch
from safetensors.torch import save_file

from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.weights import file_sha256, load_tokenizer, read_tokenizer_config, save_tokenizer


@pytest.fixture(scope="module")
def trained_like(tiny_config):
    torch.manual_seed(0)
    model = TokenFlowTokenizer(tiny_config)
    with torch.no_grad():  # move weights away from their initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_round_trip_is_bit_exact(tmp_path, trained_like):
    path = tmp_path / "tok.safetensors"
    digest = save_tokenizer(trained_like, path)
    assert digest == file_sha256(path)
    loaded = load_tokenizer(path)
    original = trained_like.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for key, value in original.items():
        assert torch.equal(value, restored[key]), key
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(trained_like.encode(images), loaded.encode(images))
    assert read_tokenizer_config(path) .quantizer == trained_like.cfg.quantizer


def test_inference_export_drops_the_teacher(tmp_path, trained_like):
    path = tmp_path / "export.safetensors"
    save_tokenizer(trained_like, path, include_teacher=False)
    loaded = load_tokenizer(path)
    assert loaded.teacher is None
    assert not any(k.startswith("teacher.") for k in loaded.state_dict())
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(trained_like.encode(images), loaded.encode(images))


def test_saving_twice_gives_identical_bytes(tmp_path, trained_like):
    assert save_tokenizer(trained_like, tmp_path / "a.safetensors") == save_tokenizer(
        trained_like, tmp_path / "b.safetensors"
    )


def test_foreign_or_missing_file_is_a_clear_error(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a TokenFlow tokenizer file"):
        load_tokenizer(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="tokenizer weights not found"):
        load_tokenizer(tmp_path / "absent.safetensors")


def test_a_view_interpolates_position_tables_and_keeps_everything_else(tmp_path, trained_like):
    """The tiny tokenizer (64 px, 8x8) used at 72 px with a 9x9 last scale, as TokenFlow-B is
    used at 256 px: one more scale of tokens, the same codebooks and convolution weights."""
    from tokenflow.config import TokenizerView

    path = tmp_path / "export.safetensors"
    save_tokenizer(trained_like, path, include_teacher=False)
    view = TokenizerView(image_size=72, scales=(1, 2, 3, 4, 6, 8, 9))
    viewed = load_tokenizer(path, view=view)
    assert viewed.cfg.image_size == 72 and viewed.num_tokens == 130 + 81
    tokens = viewed.encode(torch.rand(2, 3, 72, 72))
    assert tokens.shape == (2, 211) and viewed.decode_indices(tokens).shape == (2, 3, 72, 72)
    original, loaded = trained_like.state_dict(), viewed.state_dict()
    resized = {k for k in loaded if loaded[k].shape != original[k].shape}
    assert resized == {"semantic_encoder.backbone.positional_embedding", "semantic_decoder.pos_embed"}
    for key in loaded.keys() - resized:
        assert torch.equal(loaded[key], original[key]), key
    table = original["semantic_encoder.backbone.positional_embedding"]  # class row + 8x8 grid
    new = loaded["semantic_encoder.backbone.positional_embedding"]
    assert new.shape == (1 + 81, table.shape[1]) and torch.equal(new[0], table[0])
    # A constant grid stays constant under bicubic interpolation.
    from tokenflow.models.weights import resize_grid_embedding

    flat = torch.cat([torch.zeros(1, 3), torch.full((64, 3), 2.0)])
    torch.testing.assert_close(resize_grid_embedding(flat, 82)[1:], torch.full((81, 3), 2.0))
    with pytest.raises(ValueError, match="cannot resize"):
        resize_grid_embedding(flat, 80)


def test_decoder_finetune_freezes_everything_but_the_pixel_decoder(tmp_path, trained_like, tiny_config):
    """The enhanced (wider) decoder starts fresh, the trained width from the trained decoder; a
    few optimizer steps change only pixel_decoder.* and the tokens stay identical."""
    from tokenflow.models.losses import TokenizerLoss
    from tokenflow.models.weights import start_decoder_finetune

    path = tmp_path / "export.safetensors"
    save_tokenizer(trained_like, path, include_teacher=False)
    images = torch.rand(4, 3, 64, 64)
    wide = tiny_config.pixel_codec.model_copy(update={"decoder_ch": 32, "decoder_num_res_blocks": 2})
    for cfg, from_trained in ((tiny_config, True), (tiny_config.model_copy(update={"pixel_codec": wide}), False)):
        model = TokenFlowTokenizer(cfg, with_teacher=False)
        assert start_decoder_finetune(model, path) == from_trained
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("pixel_decoder.") for n in trainable)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = TokenizerLoss(cfg)
        for step in range(3):
            terms = loss.pixel_terms(images, model(images).reconstruction, step)
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed and all(k.startswith("pixel_decoder.") for k in changed)
        assert torch.equal(model.encode(images), trained_like.encode(images))


def test_decoder_finetune_refuses_a_different_tokenizer(tmp_path, trained_like, tiny_config):
    from tokenflow.models.weights import start_decoder_finetune

    path = tmp_path / "export.safetensors"
    save_tokenizer(trained_like, path, include_teacher=False)
    other = tiny_config.model_copy(update={"quantizer": tiny_config.quantizer.model_copy(update={"codebook_size": 256})})
    with pytest.raises(Exception, match="codebook"):
        start_decoder_finetune(TokenFlowTokenizer(other, with_teacher=False), path)
