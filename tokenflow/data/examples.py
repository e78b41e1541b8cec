"""Training examples for the LLM stages, read from token shards (images are never re-encoded).

Generation: one example per row, its caption the prompt (no caption: the empty prompt, i.e. an
unconditional example). Understanding: stage 1 pairs every captioned row with the caption
prompt; stage 2 uses the row's LLaVA-style ``conversations`` (``json`` column), one example per
conversation or, with ``split_turns``, one per question/answer turn. Rows that give a stage no
example are counted by the caller, never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

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


def conversation_turns(raw_json: str | None) -> list[Turn]:
    """(human, gpt) pairs of a LLaVA ``conversations`` list, ``<image>`` markers removed."""
    if not raw_json:
        return []
    try:
        record = json.loads(raw_json)
    except json.JSONDecodeError:
        return []
    messages = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        return []
    turns = []
    for human, gpt in zip(messages[::2], messages[1::2]):
        if not (isinstance(human, dict) and isinstance(gpt, dict)):
            continue
        if human.get("from") == "human" and gpt.get("from") == "gpt":
            question = str(human.get("value", "")).replace("<image>", "").strip()
            turns.append((question, str(gpt.get("value", "")).strip()))
    return turns


def generation_example(sample: TokenSample) -> GenerationExample:
    return GenerationExample(sample.key, sample.tokens, (sample.caption or "").strip())


def caption_examples(sample: TokenSample) -> list[ChatExample]:
    caption = (sample.caption or "").strip()
    return [ChatExample(sample.key, sample.tokens, ((CAPTION_PROMPT, caption),))] if caption else []


def conversation_examples(sample: TokenSample, split_turns: bool) -> list[ChatExample]:
    turns = conversation_turns(sample.json)
    if not turns:
        return []
    if split_turns:
        return [ChatExample(sample.key, sample.tokens, (turn,)) for turn in turns]
    return [ChatExample(sample.key, sample.tokens, tuple(turns))]


def yes_no_turns(sample: TokenSample) -> list[Turn]:
    """The sample's turns answered yes or no (the held-out understanding probe)."""
    return [(q, a) for q, a in conversation_turns(sample.json)
            if a.lower().rstrip(".") in ("yes", "no")]


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
