"""The generator on DPG-Bench: four images per prompt sampled as GenEval's are
(:func:`tokenflow.eval.runners.sample_prompts`: whole prompts batched, each prompt's images from a
generator seeded by ``(seed, prompt index)``) and tiled into the prompt's 2x2 grid
``<outdir>/<item_id>.png``; then every question asked of every tile of each grid. A prompt without
a usable grid (its sampling failed, the file is missing or undecodable) gets an empty answer to
every question on every tile, so it scores 0 with the reason: failures are counted, never skipped."""

from __future__ import annotations

from typing import Mapping, Sequence

from PIL import Image
from transformers import PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig, SamplingConfig
from tokenflow.data.decode import DecodeError
from tokenflow.eval.dpg import IMAGES_PER_PROMPT, DPGItem, read_grid, write_grid
from tokenflow.eval.dpg_vqa import VQAScorer
from tokenflow.eval.runners import sample_prompts
from tokenflow.models.generator import NextScaleGenerator
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.viz import to_uint8


def generate_grids(model: NextScaleGenerator, tok: PreTrainedTokenizerBase, tokenizer: TokenFlowTokenizer,
                   items: Sequence[DPGItem], sampling: SamplingConfig, seed: int, max_text_tokens: int, outdir: str,
                   batch_size: int = 1) -> dict[int, str]:
    """Each item's grid under ``outdir`` (emptied first); returns the error of each item whose
    sampling failed on its own. Raises ``EvaluationError`` when every item fails."""
    storage.remove_tree(outdir)
    return sample_prompts(model, tok, tokenizer, [item.prompt for item in items], IMAGES_PER_PROMPT, sampling, seed,
                          max_text_tokens, batch_size,
                          lambda i, images: write_grid(outdir, items[i].item_id, list(to_uint8(images))))


def ask_image(vqa: VQAScorer, item: DPGItem, image: Image.Image) -> dict[int, str]:
    """The answer to each of the item's questions about ``image``, by proposition id."""
    replies = vqa.answer(image, [q.question for q in item.questions])
    return {q.proposition_id: reply for q, reply in zip(item.questions, replies, strict=True)}


def unanswered(item: DPGItem) -> dict[int, str]:
    """An empty (so wrong) answer to each of the item's questions."""
    return dict.fromkeys((q.proposition_id for q in item.questions), "")


def _tiles(outdir: str, item_id: str, limits: SampleLimitsConfig) -> tuple[list[Image.Image], str | None]:
    try:
        return read_grid(outdir, item_id, limits), None
    except FileNotFoundError:
        return [], "grid missing"
    except DecodeError as exc:
        return [], f"grid: {exc.reason}"
    except ValueError as exc:  # not a 2x2 grid
        return [], f"grid: {exc}"


def ask_grids(vqa: VQAScorer, items: Sequence[DPGItem], outdir: str, failures: Mapping[int, str],
              limits: SampleLimitsConfig = DEFAULT_LIMITS) -> tuple[dict[str, list[dict[int, str]]], dict[str, str]]:
    """Answers by item id, tile and proposition id for the grids in ``outdir``, and the error of
    each item without a usable grid (``failures``: the sampling errors by item index)."""
    answers: dict[str, list[dict[int, str]]] = {}
    errors: dict[str, str] = {}
    for i, item in enumerate(items):
        if i in failures:
            tiles, error = [], f"generation failed: {failures[i]}"
        else:
            tiles, error = _tiles(outdir, item.item_id, limits)
        if error:
            errors[item.item_id] = error
        answers[item.item_id] = ([ask_image(vqa, item, tile) for tile in tiles] if tiles
                                 else [unanswered(item)] * IMAGES_PER_PROMPT)
    return answers, errors
