"""Running models on the benchmarks: GenEval images from the generator, MME and POPE replies
from the understanding model, and the untrained baselines both are compared with (DPG-Bench's
grids: :mod:`tokenflow.eval.dpg_runner`).

Generation: whole prompts are batched (``batch_size`` images, each with its unconditional row);
a prompt's ``n`` images draw from a generator seeded from ``(seed, prompt index)``, so they
depend on neither the other prompts nor their number (up to floating-point rounding in the
batched model, which can move a draw that sits on a probability boundary). Prompts
are tokenized as in training (``<s>`` + caption, cut to ``max_text_tokens``); the sampling
config's negative prompt (by default the empty prompt ``<s>``) is the unconditional input. A prompt whose sampling or decoding raises scores 0 on every
one of its images, the error as the reason: failures are counted, never skipped.

Understanding: each distinct image is decoded, preprocessed to the tokenizer's resolution and
encoded once; an image that cannot be decoded gets an empty reply to each of its questions (MME
reads it as unparseable, so wrong; the POPE stage scores those questions wrong too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, TypeVar

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig, SamplingConfig, TokenizerConfig
from tokenflow.data.decode import DecodeError, decode_image, preprocess
from tokenflow.eval.geneval import (ColorClassifier, GenEvalPrompt, GenEvalRules, ImageResult, ObjectDetector,
                                    score_image)
from tokenflow.eval.geneval_layout import image_url, read_prompt, write_prompt
from tokenflow.models.generator import NextScaleGenerator, TextBatch, left_pad
from tokenflow.models.language_model import language_model_from_config
from tokenflow.models.quantizer import CodebookFeatures
from tokenflow.models.sampling import sample_tokens
from tokenflow.models.text import generation_prompt
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.understanding import UnderstandingModel
from tokenflow.seeding import seed_for
from tokenflow.viz import to_uint8

log = logging.getLogger(__name__)

LLM = TypeVar("LLM", NextScaleGenerator, UnderstandingModel)


class EvaluationError(RuntimeError):
    """The evaluation as a whole failed (nothing could be scored): the stage fails and runs again
    next time, instead of recording a score of 0."""


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def untrained_tokenizer(cfg: TokenizerConfig, seed: int) -> TokenFlowTokenizer:
    """A randomly initialised inference tokenizer of ``cfg`` (seeded; global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TokenFlowTokenizer(cfg, with_teacher=False).eval()


def untrained_like(model: LLM, seed: int) -> LLM:
    """A randomly initialised (seeded) model of ``model``'s architecture, on its device, sharing
    its frozen codebook and special token ids."""
    lm_config = model.lm.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = language_model_from_config(lm_config.to_dict(), lm_config._attn_implementation)
        if isinstance(model, NextScaleGenerator):
            fresh = NextScaleGenerator(lm, model.codebook, model.image_start_id, model.image_end_id, model.qk_norm)
        else:
            fresh = UnderstandingModel(lm, model.codebook, model.bos_id)
    return fresh.to(_device(model)).eval()


def check_codebook(codebook: CodebookFeatures, tokenizer: TokenFlowTokenizer, model_url: str) -> None:
    """Raise ``ValueError`` unless the model reads the tokenizer's codes (same scales and vectors)."""
    ref = CodebookFeatures.from_quantizer(tokenizer.quantizer).to(codebook.semantic.device)
    same = (ref.scales == codebook.scales and ref.semantic.shape == codebook.semantic.shape
            and ref.pixel.shape == codebook.pixel.shape and torch.allclose(ref.semantic, codebook.semantic)
            and torch.allclose(ref.pixel, codebook.pixel))
    if not same:
        raise ValueError(f"{model_url} was trained on the tokens of another tokenizer (its codebook differs)")


# --------------------------------------------------------------------------- GenEval


@dataclass(frozen=True)
class Generation:
    """The verdict on one generated image; ``failed``: no image (sampling or decoding raised)."""

    prompt_index: int
    index: int
    result: ImageResult
    failed: bool


def sample_prompt_images(model: NextScaleGenerator, tok: PreTrainedTokenizerBase, tokenizer: TokenFlowTokenizer,
                         prompts: Sequence[str], n: int, sampling: SamplingConfig, seeds: Sequence[int],
                         max_text_tokens: int) -> torch.Tensor:
    """``n`` images per prompt, ``[len(prompts) * n, 3, S, S]`` in [0, 1] (CPU), sampled as one
    batch; prompt ``p``'s rows draw from their own generator seeded ``seeds[p]``."""
    device = _device(model)
    ids = [generation_prompt(tok, prompt, max_text_tokens)[0] for prompt in prompts]
    negative = generation_prompt(tok, sampling.negative_prompt, max_text_tokens)[0]
    text = left_pad([row for row in ids for _ in range(n)], tok.pad_token_id)
    uncond = left_pad([negative], tok.pad_token_id)
    generators = [g for seed in seeds for g in [torch.Generator(device=device).manual_seed(seed)] * n]
    tokens = sample_tokens(model, TextBatch(text.ids.to(device), text.mask.to(device)),
                           TextBatch(uncond.ids.to(device), uncond.mask.to(device)), sampling, generators)
    images = tokenizer.decode_indices(tokens.to(_device(tokenizer))).clamp(0, 1).cpu()
    if images.shape[0] != n * len(prompts):
        raise ValueError(f"expected {n * len(prompts)} images, got {images.shape[0]}")
    return images


def generate_images(model: NextScaleGenerator, tok: PreTrainedTokenizerBase, tokenizer: TokenFlowTokenizer,
                    prompts: Sequence[GenEvalPrompt], images_per_prompt: int, sampling: SamplingConfig, seed: int,
                    max_text_tokens: int, outdir: str, batch_size: int = 1) -> dict[int, str]:
    """Sample ``images_per_prompt`` images per prompt into GenEval's folder layout at ``outdir``
    (emptied first), whole prompts batched up to ``batch_size`` images. A batch that raises is
    retried prompt by prompt; returns the error of each prompt that failed on its own (no images).
    When every prompt fails the evaluation itself has failed: raises ``EvaluationError``."""
    storage.remove_tree(outdir)
    return sample_prompts(model, tok, tokenizer, [p.prompt for p in prompts], images_per_prompt, sampling, seed,
                          max_text_tokens, batch_size,
                          lambda i, images: write_prompt(outdir, i, prompts[i], list(to_uint8(images))))


def sample_prompts(model: NextScaleGenerator, tok: PreTrainedTokenizerBase, tokenizer: TokenFlowTokenizer,
                   texts: Sequence[str], n: int, sampling: SamplingConfig, seed: int, max_text_tokens: int,
                   batch_size: int, write: Callable[[int, torch.Tensor], None]) -> dict[int, str]:
    """``n`` images per text, whole texts batched up to ``batch_size`` images, each text's handed to
    ``write(index, images)``; a batch that raises is retried text by text. Returns the errors of
    the texts that failed on their own; when every text fails the evaluation itself has failed:
    raises ``EvaluationError``."""
    failures: dict[int, str] = {}
    model.eval()
    per_batch = max(1, batch_size // n)
    for start in range(0, len(texts), per_batch):
        indices = range(start, min(start + per_batch, len(texts)))
        for i, images, error in _sample_batch(model, tok, tokenizer, texts, indices, n, sampling, seed,
                                              max_text_tokens):
            if images is None:
                failures[i] = error
            else:
                write(i, images)
    if texts and len(failures) == len(texts):
        raise EvaluationError(f"every one of {len(texts)} prompts failed to generate; the first: {failures[0]}")
    return failures


def score_generated(outdir: str, prompts: Sequence[GenEvalPrompt], images_per_prompt: int,
                    failures: Mapping[int, str], detector: ObjectDetector, color_classifier: ColorClassifier,
                    rules: GenEvalRules, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[Generation]:
    """Score the images in GenEval's layout at ``outdir``: ``images_per_prompt`` per prompt, in
    order. A prompt in ``failures`` and an image missing or undecodable score 0 with the reason;
    a folder whose metadata is not the prompt's raises ``ValueError``."""
    out: list[Generation] = []
    for i, prompt in enumerate(prompts):
        if i in failures:
            reason = f"generation failed: {failures[i]}"
            out.extend(Generation(i, j, ImageResult(prompt.tag, prompt.prompt, False, reason), True)
                       for j in range(images_per_prompt))
            continue
        if read_prompt(outdir, i) != prompt:
            raise ValueError(f"{outdir}: folder {i:05d} holds another prompt than {prompt.prompt!r}")
        for j in range(images_per_prompt):
            try:
                image = decode_image(storage.read_bytes(image_url(outdir, i, j)), limits)
            except (FileNotFoundError, DecodeError) as exc:
                reason = f"image {j}: {exc.reason if isinstance(exc, DecodeError) else 'missing'}"
                out.append(Generation(i, j, ImageResult(prompt.tag, prompt.prompt, False, reason), True))
                continue
            out.append(Generation(i, j, score_image(image, prompt, detector, color_classifier, rules), False))
    return out


def load_generated(outdir: str, index: int, images_per_prompt: int, size: int,
                   limits: SampleLimitsConfig = DEFAULT_LIMITS) -> torch.Tensor | None:
    """Prompt ``index``'s images ``[n, 3, size, size]`` from the layout, or None when any is missing."""
    try:
        return torch.stack([load_image(image_url(outdir, index, j), size, limits) for j in range(images_per_prompt)])
    except (FileNotFoundError, DecodeError):
        return None


def _sample_batch(model: NextScaleGenerator, tok: PreTrainedTokenizerBase, tokenizer: TokenFlowTokenizer,
                  texts: Sequence[str], indices: Sequence[int], n: int, sampling: SamplingConfig,
                  seed: int, max_text_tokens: int) -> list[tuple[int, torch.Tensor | None, str]]:
    """(text index, its ``n`` images or None, the error) for each of ``indices``."""
    try:
        images = sample_prompt_images(model, tok, tokenizer, [texts[i] for i in indices], n, sampling,
                                      [seed_for(seed, i) for i in indices], max_text_tokens)
        return [(i, images[k * n : (k + 1) * n], "") for k, i in enumerate(indices)]
    except Exception as exc:  # scored 0 and counted, whatever went wrong with the prompt
        if len(indices) > 1:
            log.warning("a batch of %d prompts failed (%s): sampling them one by one", len(indices), exc)
            return [row for i in indices for row in _sample_batch(model, tok, tokenizer, texts, [i], n, sampling,
                                                                  seed, max_text_tokens)]
        log.warning("generation failed for prompt %d (%r): %s", indices[0], texts[indices[0]], exc)
        return [(indices[0], None, f"{type(exc).__name__}: {exc}")]


def reconstructions(tokenizer: TokenFlowTokenizer, sources: Sequence[bytes], batch_size: int = 32,
                    limits: SampleLimitsConfig = DEFAULT_LIMITS) -> tuple[dict[int, Image.Image], dict[int, str]]:
    """The tokenizer's round trip of each source image (encoded bytes) at its resolution, by
    index, and the decode-failure reason of the sources that cannot be read."""
    size, device = tokenizer.cfg.image_size, _device(tokenizer)
    failed: dict[int, str] = {}
    decoded: dict[int, torch.Tensor] = {}
    for i, source in enumerate(sources):
        try:
            decoded[i] = preprocess(decode_image(source, limits), size)
        except DecodeError as exc:
            failed[i] = exc.reason
    order = list(decoded)
    images: dict[int, Image.Image] = {}
    tokenizer.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        with torch.no_grad():
            tokens = tokenizer.encode(torch.stack([decoded[i] for i in chunk]).to(device))
            recon = tokenizer.decode_indices(tokens).clamp(0, 1).cpu()
        images.update((i, Image.fromarray(pixels)) for i, pixels in zip(chunk, to_uint8(recon)))
    return images, failed


def score_reconstructions(tokenizer: TokenFlowTokenizer, sources: Sequence[bytes], prompts: Sequence[GenEvalPrompt],
                          detector: ObjectDetector, color_classifier: ColorClassifier, rules: GenEvalRules,
                          batch_size: int = 32, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[ImageResult]:
    """Each prompt scored on the tokenizer's reconstruction of its source image (encoded bytes):
    what a generator that reproduced the images exactly would score through this tokenizer. A
    source that cannot be decoded scores 0 with the reason."""
    if len(sources) != len(prompts):
        raise ValueError(f"{len(sources)} source images for {len(prompts)} prompts")
    images, failed = reconstructions(tokenizer, sources, batch_size, limits)
    return [ImageResult(prompt.tag, prompt.prompt, False, f"source image: {failed[i]}") if i in failed
            else score_image(images[i], prompt, detector, color_classifier, rules) for i, prompt in enumerate(prompts)]


# --------------------------------------------------------------------------- MME, POPE


def load_image(url: str, size: int, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> torch.Tensor:
    """An image file as the tokenizer's input ``[3, size, size]``; raises ``DecodeError``."""
    return preprocess(decode_image(storage.read_bytes(url), limits), size)


def encode_images(tokenizer: TokenFlowTokenizer, urls: Sequence[str], batch_size: int,
                  limits: SampleLimitsConfig = DEFAULT_LIMITS) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tokens (CPU) of each distinct image URL, and the decode-failure reason of the others."""
    tokens: dict[str, torch.Tensor] = {}
    failed: dict[str, str] = {}
    size, device = tokenizer.cfg.image_size, _device(tokenizer)
    pending: dict[str, torch.Tensor] = {}

    def flush() -> None:
        encoded = tokenizer.encode(torch.stack(list(pending.values())).to(device)).cpu()
        tokens.update(zip(pending, encoded))
        pending.clear()

    tokenizer.eval()
    for url in dict.fromkeys(urls):
        try:
            pending[url] = load_image(url, size, limits)
        except DecodeError as exc:
            log.warning("cannot decode %s: %s", url, exc)
            failed[url] = exc.reason
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if failed and not tokens:
        raise EvaluationError(f"none of the {len(failed)} benchmark images could be decoded; the first: "
                              f"{next(iter(failed.items()))}")
    return tokens, failed


class Question(Protocol):
    """What answering needs of a benchmark question (MME's, POPE's): its image URL and text."""

    @property
    def image(self) -> str: ...

    @property
    def question(self) -> str: ...


def answer_questions(model: UnderstandingModel, tok: PreTrainedTokenizerBase, questions: Sequence[Question],
                     tokens: Mapping[str, torch.Tensor], batch_size: int, max_new_tokens: int,
                     max_text_tokens: int) -> list[str]:
    """Greedy replies in question order; ``""`` where the image has no tokens."""
    replies = [""] * len(questions)
    answerable = [i for i, q in enumerate(questions) if q.image in tokens]
    device = _device(model)
    model.eval()
    for start in range(0, len(answerable), batch_size):
        chunk = answerable[start : start + batch_size]
        images = torch.stack([tokens[questions[i].image] for i in chunk]).to(device)
        answers = model.generate(images, [questions[i].question for i in chunk], tok, max_new_tokens,
                                 max_text_tokens)
        for i, answer in zip(chunk, answers):
            replies[i] = answer
    return replies
