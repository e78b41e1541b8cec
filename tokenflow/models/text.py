"""Text tokenizers for the LLM stages and the prompt formats they share.

On clusters the text tokenizer comes from the pretrained LM's path/hub id. For smoke runs and
tests the project trains a small byte-level BPE (the ``tokenizers`` package) on the training
split's captions and questions; it is saved with the stage output, so inference loads exactly
what training used. Either way the tokenizer carries the special tokens the stages need.
"""

from __future__ import annotations

from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_START, IMAGE_END = "<boi>", "<eoi>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_START, IMAGE_END)

CAPTION_PROMPT = "Describe the image."


def chat_prompt(question: str) -> str:
    """The understanding model's prompt for one question (the image precedes it)."""
    return f"USER: {question.strip()}\nASSISTANT:"


def chat_answer(answer: str) -> str:
    """The supervised continuation of :func:`chat_prompt` (the EOS token is appended separately)."""
    return f" {answer.strip()}"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE trained on ``texts`` with :data:`SPECIAL_TOKENS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, additional_special_tokens=[IMAGE_START, IMAGE_END])


def load_text_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A pretrained tokenizer with the image markers and a pad token added when missing."""
    tok = AutoTokenizer.from_pretrained(name_or_path)
    missing = [t for t in (IMAGE_START, IMAGE_END) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token is None or tok.eos_token is None:
        raise ValueError(f"text tokenizer {name_or_path!r} needs BOS and EOS tokens")
    return tok


def encode_text(tok: PreTrainedTokenizerBase, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of ``text`` (no special tokens), cut to ``max_tokens``; second: was it cut."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens], len(ids) > max_tokens


def generation_prompt(tok: PreTrainedTokenizerBase, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """The generator's text input: ``<s>`` then ``text``'s ids cut to ``max_tokens`` (``<s>``
    alone for the empty prompt); second: was it cut."""
    ids, cut = encode_text(tok, text, max_tokens) if text else ([], False)
    return [tok.bos_token_id] + ids, cut
