"""The real GenEval backends (transformers detector, open_clip colour classifier), built small and
random from config, saved to disk and loaded through the real loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenflow.eval.geneval import COLORS, Detection, GenEvalPrompt, GenEvalRules, Include, score_image
from tokenflow.eval.geneval_backends import OpenClipColorClassifier, TransformersObjectDetector

CLIP_OVERRIDES = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(0)
    labels = {0: "dog", 1: "mouse"}
    config = YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         image_size=[64, 64], patch_size=16, num_detection_tokens=8,
                         id2label=labels, label2id={v: k for k, v in labels.items()})
    path = tmp_path_factory.mktemp("detector")
    YolosForObjectDetection(config).save_pretrained(path)
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    import open_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(open_clip.create_model("ViT-B-32", **CLIP_OVERRIDES).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8))


def test_detector_and_colour_classifier_run_end_to_end(detector_dir, clip_weights, image):
    detector = TransformersObjectDetector(detector_dir, min_score=0.0)
    assert detector.labels == {0: "dog", 1: "computer mouse"}  # COCO name mapped to GenEval's
    detections = detector.detect(image)
    assert detections and {d.label for d in detections} <= {"dog", "computer mouse"}
    for d in detections:
        assert 0.0 <= d.score <= 1.0
        assert -1 <= d.bbox[0] <= d.bbox[2] <= image.width + 1 and -1 <= d.bbox[1] <= d.bbox[3] <= image.height + 1

    colors = OpenClipColorClassifier("ViT-B-32", clip_weights, overrides=CLIP_OVERRIDES)
    label = detections[0].label
    prompt = GenEvalPrompt("colors", f"a red {label}", (Include(label, 1, "red"),))
    result = score_image(image, prompt, detector, colors, GenEvalRules(threshold=0.0))
    assert result.detections[label]
    assert result.correct == (result.reason == "") and (result.correct or "expected 1 red" in result.reason)
    # A one-pixel sliver at the border still gives a crop.
    assert colors.classify(image, Detection(label, 1.0, (79.6, 0.0, 80.0, 0.2)), COLORS) in COLORS


def test_missing_weights_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-detector"):
        TransformersObjectDetector(tmp_path / "no-detector")
    with pytest.raises(FileNotFoundError, match="no-clip.pt"):
        OpenClipColorClassifier("ViT-B-32", tmp_path / "no-clip.pt")
