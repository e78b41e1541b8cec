import pytest
import torch
from safetensors.torch import save_file

from tokenflow.config import PerceptualConfig
from tokenflow.models.perceptual import PerceptualLoss


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A randomly initialised VGG16 and LPIPS-layout linear weights, written the way users stage them."""
    from torchvision.models import vgg16

    root = tmp_path_factory.mktemp("perceptual")
    torch.manual_seed(0)
    torch.save(vgg16(weights=None).state_dict(), root / "vgg16.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    save_file(lins, str(root / "lpips_vgg.safetensors"))
    return root / "vgg16.pth", root / "lpips_vgg.safetensors"


def test_distance_is_zero_for_identical_and_positive_for_different_images(weight_files):
    backbone, linear = weight_files
    loss = PerceptualLoss(PerceptualConfig(backbone_weights=str(backbone), linear_weights=str(linear)))
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1).requires_grad_(True)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-7)
    d = loss(a, b)
    assert float(d.detach()) > 0
    d.backward()
    assert b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training


def test_missing_weight_file_names_the_setting(tmp_path, weight_files):
    _, linear = weight_files
    cfg = PerceptualConfig(backbone_weights=str(tmp_path / "nope.pth"), linear_weights=str(linear))
    with pytest.raises(FileNotFoundError, match=r"perceptual.backbone_weights: weights file not found: .*nope.pth"):
        PerceptualLoss(cfg)


def test_linear_weights_in_the_wrong_layout_are_rejected(tmp_path, weight_files):
    backbone, _ = weight_files
    save_file({"something": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    cfg = PerceptualConfig(backbone_weights=str(backbone), linear_weights=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="expected keys lin0..lin4"):
        PerceptualLoss(cfg)
