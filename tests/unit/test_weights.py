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
