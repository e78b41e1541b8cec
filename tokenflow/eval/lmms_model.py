"""The understanding model in lmms-eval's model interface (needs the ``tokenflow-pipeline[lmms]``
extra; registered as ``tokenflow_understanding`` by :func:`tokenflow.eval.lmms.model_manifests`).

Every request's image (``doc_to_visual``: exactly one image) is converted to RGB, preprocessed to
the tokenizer's resolution and encoded; the model reads the tokens and the request's text in
the chat format it was trained with (``chat_prompt``, prompt cut to ``max_text_tokens``).

- ``generate_until``: greedy replies, batched (``batch_size`` requests with the same
  ``gen_kwargs``); ``max_new_tokens`` from ``gen_kwargs`` (else the instance's default), each
  reply cut before the first of the ``until`` strings. Sampling settings are not supported
  (greedy, with a warning).
- ``loglikelihood``: the continuation scored as the answer turn (``chat_answer``: the task's
  target delimiter becomes the answer's leading space): its summed cross-entropy in nats, a loss
  (lower is better, as lmms-eval's built-in models report and its ``multiple_choice`` argmin
  expects), and whether greedy decoding would produce it.
- ``generate_until_multi_round``: lmms-eval's convention; round 0 asks the request's context,
  each later round asks what ``doc_to_text(doc, previous_output=, round_idx=,
  previous_round_info=)`` returns (``visuals, context, terminal, previous_output, info``) until it
  says terminal; a round without visuals keeps the previous image. One list of replies per
  request, one reply per round.

lmms-eval calls ``clean()`` after an evaluation, which drops the instance's modules: use one
instance per ``simple_evaluate``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image, ImageOps
from transformers import PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.data.decode import preprocess, to_rgb
from tokenflow.eval.runners import check_codebook
from tokenflow.models.llm_weights import load_understanding
from tokenflow.models.text import chat_answer, chat_prompt, encode_text
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.understanding import UnderstandingModel
from tokenflow.models.weights import load_tokenizer

log = logging.getLogger(__name__)

# lmms-eval 0.7.3 passes every model output through unwrap_generation_output, which turns a
# loglikelihood's (loss, is_greedy) pair into its str(); the text of a GenerationResult passes
# as it is. Probed rather than pinned, so a release that keeps pairs gets them unwrapped.
_PAIR = (0.0, True)
WRAP_PAIRS = unwrap_generation_output(_PAIR)[0] != _PAIR


def _until(gen_kwargs: dict[str, Any]) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def cut(reply: str, until: Sequence[str]) -> str:
    """``reply`` before the first occurrence of any of the ``until`` strings."""
    end = min([reply.index(s) for s in until if s and s in reply], default=len(reply))
    return reply[:end]


class TokenFlowUnderstanding(lmms):
    """A ``train_understanding`` export with its tokenizer export, as an lmms-eval model."""

    is_simple = True

    def __init__(self, pretrained: str, tokenizer: str, device: str | None = None, batch_size: int | str = 1,
                 max_text_tokens: int = 64, max_new_tokens: int = 8, **kwargs: Any):
        """model_args: ``pretrained`` (the export directory, any URL), ``tokenizer`` (the tokenizer
        export file); the defaults of ``max_text_tokens`` and ``max_new_tokens`` are the config's."""
        super().__init__()
        if kwargs:
            log.warning("ignoring model arguments %s", sorted(kwargs))
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        image_tokenizer = load_tokenizer(storage.local_path(tokenizer), target).eval()
        model, text_tokenizer = load_understanding(pretrained)
        check_codebook(model.codebook, image_tokenizer, pretrained)
        self._bind(model.to(target), text_tokenizer, image_tokenizer, batch_size, max_text_tokens, max_new_tokens)

    @classmethod
    def from_models(cls, model: UnderstandingModel, text_tokenizer: PreTrainedTokenizerBase,
                    image_tokenizer: TokenFlowTokenizer, batch_size: int = 1, max_text_tokens: int = 64,
                    max_new_tokens: int = 8) -> "TokenFlowUnderstanding":
        """An instance around models already loaded (and checked against each other)."""
        self = cls.__new__(cls)
        lmms.__init__(self)
        self._bind(model, text_tokenizer, image_tokenizer, batch_size, max_text_tokens, max_new_tokens)
        return self

    def _bind(self, model: UnderstandingModel, text_tokenizer: PreTrainedTokenizerBase,
              image_tokenizer: TokenFlowTokenizer, batch_size: int | str, max_text_tokens: int,
              max_new_tokens: int) -> None:
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tok, self.image_tokenizer = model.eval(), text_tokenizer, image_tokenizer.eval()
        self.batch_size = int(batch_size)
        self.max_text_tokens, self.max_new_tokens = int(max_text_tokens), int(max_new_tokens)

    # ------------------------------------------------------------------ lmms-eval's interface

    def generate_until(self, requests: list[Instance]) -> list[str]:
        replies = [""] * len(requests)
        for chunk in self._chunks(requests, lambda args: _kwargs_key(args[1])):
            images = [self._image(*requests[i].args[2:]) for i in chunk]
            answers = self._generate(images, [requests[i].args[0] for i in chunk], requests[chunk[0]].args[1])
            for i, answer in zip(chunk, answers):
                replies[i] = answer
        return replies

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        scores: list[Any] = [None] * len(requests)
        for chunk in self._chunks(requests, lambda args: None):
            images, contexts, continuations = [], [], []
            for i in chunk:
                context, continuation, doc_to_visual, doc_id, task, split = requests[i].args
                images.append(self._image(doc_to_visual, doc_id, task, split))
                if callable(continuation):  # output_type loglikelihood passes doc_to_target
                    continuation = continuation(self.task_dict[task][split][doc_id])
                contexts.append(context)
                continuations.append(str(continuation))
            for i, pair in zip(chunk, self._score(images, contexts, continuations)):
                scores[i] = GenerationResult(text=pair) if WRAP_PAIRS else pair
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        rounds: list[list[str]] = [[] for _ in requests]
        for chunk in self._chunks(requests, lambda args: _kwargs_key(args[1])):
            gen_kwargs = requests[chunk[0]].args[1]
            info: dict[int, Any] = dict.fromkeys(chunk)
            asking = {i: (self._image(requests[i].args[2], *requests[i].args[4:]), requests[i].args[0]) for i in chunk}
            round_idx = 0
            while asking:
                answers = self._generate([image for image, _ in asking.values()],
                                         [context for _, context in asking.values()], gen_kwargs)
                for i, answer in zip(asking, answers):
                    rounds[i].append(answer)
                round_idx += 1
                following = {}
                for i, (image, _) in asking.items():
                    _, _, _, doc_to_text, doc_id, task, split = requests[i].args
                    visuals, context, terminal, previous, info[i] = doc_to_text(
                        self.task_dict[task][split][doc_id], previous_output=rounds[i], round_idx=round_idx,
                        previous_round_info=info[i])
                    if previous is not None:  # the task may rewrite earlier rounds' replies
                        rounds[i] = list(previous)
                    if not terminal:
                        following[i] = (_one_image(visuals, task, doc_id) if visuals else image, context)
                asking = following
        return rounds

    # ------------------------------------------------------------------ the model

    def _chunks(self, requests: Sequence[Instance], key: Callable[[tuple], Hashable]) -> Iterator[list[int]]:
        """Request indices grouped by ``key(args)`` (first-seen order), ``batch_size`` at a time."""
        groups: dict[Hashable, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(key(request.args), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    def _image(self, doc_to_visual: Callable[[Any], Any], doc_id: int, task: str, split: str) -> Image.Image:
        return _one_image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)

    @torch.no_grad()
    def _encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Tokens of the images, on the model's device."""
        size = self.image_tokenizer.cfg.image_size
        pixels = torch.stack([preprocess(to_rgb(ImageOps.exif_transpose(im)), size) for im in images])
        tokens = self.image_tokenizer.encode(pixels.to(next(self.image_tokenizer.parameters()).device))
        return tokens.to(next(self.model.parameters()).device)

    def _generate(self, images: Sequence[Image.Image], contexts: Sequence[str],
                  gen_kwargs: dict[str, Any]) -> list[str]:
        if gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0:
            log.warning("the TokenFlow understanding model decodes greedily; ignoring sampling settings %s",
                        {k: gen_kwargs.get(k) for k in ("do_sample", "temperature", "top_p")})
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        replies = self.model.generate(self._encode(images), list(contexts), self.tok, max_new_tokens,
                                      self.max_text_tokens)
        until = _until(gen_kwargs)
        return [cut(reply, until) for reply in replies]

    @torch.no_grad()
    def _score(self, images: Sequence[Image.Image], contexts: Sequence[str],
               continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(summed cross-entropy of the continuation as the answer, greedy) per request; the text
        is right-padded after the ``<s>`` + image prefix."""
        prefix = self.model._prefix(self._encode(images))
        rows = [(encode_text(self.tok, chat_prompt(c), self.max_text_tokens)[0],
                 self.tok(chat_answer(a), add_special_tokens=False)["input_ids"])
                for c, a in zip(contexts, continuations)]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long, device=prefix.device)
        mask = torch.zeros((len(rows), prefix.shape[1] + width), dtype=torch.long, device=prefix.device)
        mask[:, : prefix.shape[1]] = 1
        for i, (prompt, answer) in enumerate(rows):
            ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer, device=ids.device)
            mask[i, prefix.shape[1] : prefix.shape[1] + len(prompt) + len(answer)] = 1
        inputs = torch.cat([prefix, self.model.lm.get_input_embeddings()(ids)], dim=1)
        logits = self.model.lm(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits
        out = []
        for i, (prompt, answer) in enumerate(rows):
            first = prefix.shape[1] + len(prompt)  # position of the answer's first token
            logprobs = logits[i, first - 1 : first - 1 + len(answer)].float().log_softmax(-1)
            target = torch.tensor(answer, device=logprobs.device)
            loss = -logprobs.gather(1, target[:, None]).sum()
            out.append((float(loss), bool((logprobs.argmax(-1) == target).all())))
        return out


def _kwargs_key(gen_kwargs: dict[str, Any]) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def _one_image(visuals: Any, task: str, doc_id: int) -> Image.Image:
    images = [visuals] if isinstance(visuals, Image.Image) else list(visuals or [])
    if len(images) != 1 or not isinstance(images[0], Image.Image):
        raise ValueError(f"{task} document {doc_id}: the TokenFlow understanding model reads exactly one image "
                         f"per question, got {[type(v).__name__ for v in images]}")
    return images[0]
