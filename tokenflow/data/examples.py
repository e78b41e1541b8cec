"""Training examples for the LLM stages, read from token shards (images are never re-encoded).

Generation: one example per row, its caption the prompt (no caption: the empty prompt, i.e. an
unconditional example). Understanding: stage 1 pairs every captioned row with the caption
prompt (a row without a caption gives its conversation); stage 2 uses the row's LLaVA-style ``conversations`` (``json`` column), one example per
conversation or, with ``split_turns``, one per question/answer turn. Rows that give a stage no
example are counted by the caller, never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig
from tokenflow.data.sample_json import SampleJSONError, parse_sample_object
from tokenflow.data.token_shards import TokenSample, iter_token_samples
from tokenflow.models.text import CAPTION_PROMPT, chat_answer, chat_prompt

Turn = tuple[str, str]  # (question, answer)


@dataclass(frozen=True)
class GenerationExample:
    key: str
    tokens: np.ndarray
    caption: str  # "" for an unconditional example


@dataclass(frozen=True)
class ChatExample:
    key: str
    tokens: np.ndarray
    turns: tuple[Turn, ...]


def conversation(raw_json: str | None, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> tuple[list[Turn], str | None]:
    """(human, gpt) pairs of a LLaVA ``conversations`` list, ``<image>`` markers removed, and
    when there are none, why: ``no_json``, a :class:`SampleJSONError` reason, or ``no_turns``."""
    if not raw_json:
        return [], "no_json"
    try:
        record = parse_sample_object(raw_json, {"conversations": list}, limits)
    except SampleJSONError as exc:
        return [], exc.reason
    messages = record["conversations"]
    turns = []
    for human, gpt in zip(messages[::2], messages[1::2]):
        if not (isinstance(human, dict) and isinstance(gpt, dict)):
            continue
        if human.get("from") == "human" and gpt.get("from") == "gpt":
            question = str(human.get("value", "")).replace("<image>", "").strip()
            turns.append((question, str(gpt.get("value", "")).strip()))
    return turns, None if turns else "no_turns"


def conversation_turns(raw_json: str | None, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[Turn]:
    """The turns of :func:`conversation` (none for unusable metadata)."""
    return conversation(raw_json, limits)[0]


def generation_example(sample: TokenSample) -> GenerationExample:
    return GenerationExample(sample.key, sample.tokens, (sample.caption or "").strip())


def caption_examples(sample: TokenSample) -> list[ChatExample]:
    caption = (sample.caption or "").strip()
    return [ChatExample(sample.key, sample.tokens, ((CAPTION_PROMPT, caption),))] if caption else []


def align_examples(sample: TokenSample, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[ChatExample]:
    """Alignment (stage 1): the caption example, or for a row without a caption its whole
    conversation (LLaVA's pretraining data is one-turn conversations)."""
    return caption_examples(sample) or conversation_examples(sample, False, limits)


def conversation_examples(sample: TokenSample, split_turns: bool,
                          limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[ChatExample]:
    turns = conversation_turns(sample.json, limits)
    if not turns:
        return []
    if split_turns:
        return [ChatExample(sample.key, sample.tokens, (turn,)) for turn in turns]
    return [ChatExample(sample.key, sample.tokens, tuple(turns))]


def yes_no_turns(sample: TokenSample) -> list[Turn]:
    """The sample's turns answered yes or no (the held-out understanding probe)."""
    return [(q, a) for q, a in conversation_turns(sample.json)
            if a.lower().rstrip(".") in ("yes", "no")]


def conversation_problems(urls: Iterable[str], limits: SampleLimitsConfig = DEFAULT_LIMITS) -> Counter[str]:
    """How many rows of the token shards give no conversation, by reason, and ``usable`` for
    the rows that do."""
    return Counter(conversation(sample.json, limits)[1] or "usable" for sample in iter_token_samples(urls))


def training_texts(urls: Iterable[str]) -> Iterator[str]:
    """Every text a stage will tokenize, for training the smoke BPE."""
    yield chat_prompt(CAPTION_PROMPT)
    for sample in iter_token_samples(urls):
        if sample.caption:
            yield sample.caption
            yield chat_answer(sample.caption)
        for question, answer in conversation_turns(sample.json):
            yield chat_prompt(question)
            yield chat_answer(answer)
