"""GenEval detector and colour-classifier backends.

* Shapes (exact, CPU): :func:`tokenflow.eval.shapes_detector.detect_shapes` as the detector
  (class = shape name, score = template IoU, colour read exactly from the pixels); the colour
  "classifier" returns that colour.
* Real images: any transformers object-detection model (``AutoModelForObjectDetection`` +
  ``AutoImageProcessor`` from a local directory or hub id; class names from the model's
  ``id2label``, the three COCO names GenEval spells differently mapped to GenEval's), and an
  open_clip zero-shot colour classifier. Official GenEval uses Mask2Former (Swin-S, mmdet) and
  CLIP ViT-L/14 (OpenAI); the colour classifier follows it: three prompt templates per colour
  ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
  "a photo of a {color} object"), text embeddings normalised, averaged per colour and
  re-normalised, and the object's box crop (box rounded outward to whole pixels) classified
  through the model's own eval preprocessing. Box-only detectors give no mask, so the crop keeps
  the background around the object (the official composites the segmented object onto grey).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from tokenflow.eval.geneval import Detection, as_bbox
from tokenflow.eval.shapes_detector import detect_shapes

# transformers' COCO id2label names -> GenEval's object names (the rest are spelled the same).
COCO_TO_GENEVAL: Mapping[str, str] = {"mouse": "computer mouse", "remote": "tv remote",
                                      "keyboard": "computer keyboard"}
COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}",
                                    "a photo of a {color} object")


def _require(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or ``FileNotFoundError`` naming it and what it should hold."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _pixel_box(bbox: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``bbox`` rounded outward to whole pixels, clipped to the image, at least 1x1."""
    width, height = size
    x0 = min(max(0, math.floor(bbox[0])), width - 1)
    y0 = min(max(0, math.floor(bbox[1])), height - 1)
    return x0, y0, max(x0 + 1, min(width, math.ceil(bbox[2]))), max(y0 + 1, min(height, math.ceil(bbox[3])))


class ShapesObjectDetector:
    """The exact shapes detector: every palette-coloured component standing on background is one
    detection (:func:`~tokenflow.eval.shapes_detector.detect_shapes`).

    Components under ``min_area`` pixels are ignored: the corpus' smallest object (a 12 px
    triangle) covers 84 pixels, while noise-like generations are full of small single-colour
    blobs that would otherwise pass as objects; components pressed against other colours
    (isolation under 0.8) are clutter, not objects.
    """

    def __init__(self, min_area: int = 60):
        self.min_area = min_area

    def detect(self, image: Image.Image) -> list[Detection]:
        return [Detection(d.shape, d.score, as_bbox(d.bbox), d.color)
                for d in detect_shapes(image, min_area=self.min_area)]


class ShapesColorClassifier:
    """Returns the colour the shapes detector read from the object's pixels."""

    def classify(self, image: Image.Image, detection: Detection, colors: Sequence[str]) -> str:
        if detection.color is None:
            raise ValueError("the shapes colour classifier needs detections from the shapes detector")
        if detection.color not in colors:
            raise ValueError(f"detected colour {detection.color!r} is not one of {list(colors)}")
        return detection.color


class TransformersObjectDetector:
    """A transformers object-detection model loaded from a local directory.

    ``detect`` returns every prediction scoring at least ``min_score`` (the GenEval thresholds
    are applied later by the scorer), boxes in input-image pixels.
    """

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu", min_score: float = 0.05):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        path = _require(model_path, "GenEval object detector (transformers model directory)")
        self.processor = AutoImageProcessor.from_pretrained(str(path))
        self.model = AutoModelForObjectDetection.from_pretrained(str(path)).to(device).eval()
        self.device = torch.device(device)
        self.min_score = min_score
        self.labels = {int(i): COCO_TO_GENEVAL.get(name, name) for i, name in self.model.config.id2label.items()}

    @torch.no_grad()
    def detect(self, image: Image.Image) -> list[Detection]:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_object_detection(
            outputs, threshold=self.min_score, target_sizes=[(image.height, image.width)])[0]
        return [Detection(self.labels[int(label)], float(score), as_bbox(box))
                for score, label, box in zip(result["scores"], result["labels"], result["boxes"])]


class OpenClipColorClassifier:
    """Zero-shot colour of a detected object's crop with an open_clip model.

    ``model_name`` is an open_clip architecture (``ViT-L-14-quickgelu`` for the official OpenAI
    ViT-L/14 weights: a file does not switch QuickGELU on by itself), ``weights_path`` a local
    state-dict file; ``overrides`` replace architecture fields of the named config
    (``embed_dim``, ``vision_cfg``, ``text_cfg``: small models built from config).
    """

    def __init__(self, model_name: str, weights_path: str | Path, device: str | torch.device = "cpu",
                 overrides: Mapping[str, Any] | None = None):
        import open_clip

        path = _require(weights_path, f"GenEval colour classifier weights ({model_name})")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path), device=device, **dict(overrides or {}))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self._text_classifiers: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    @torch.no_grad()
    def _text_classifier(self, label: str, colors: tuple[str, ...]) -> torch.Tensor:
        """``[D, len(colors)]`` unit text embeddings, one averaged-template column per colour."""
        key = (label, colors)
        if key not in self._text_classifiers:
            columns = []
            for color in colors:
                texts = [t.format(color=color, object=label) for t in COLOR_TEMPLATES]
                emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
                emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                columns.append(torch.nn.functional.normalize(emb, dim=0))
            self._text_classifiers[key] = torch.stack(columns, dim=1)
        return self._text_classifiers[key]

    @torch.no_grad()
    def classify(self, image: Image.Image, detection: Detection, colors: Sequence[str]) -> str:
        crop = image.convert("RGB").crop(_pixel_box(detection.bbox, image.size))
        features = self.model.encode_image(self.preprocess(crop).unsqueeze(0).to(self.device))
        features = torch.nn.functional.normalize(features, dim=-1)
        scores = features @ self._text_classifier(detection.label, tuple(colors))
        return colors[int(scores.argmax())]
