"""The per-worker understanding training loop run by Ray Train, one call per phase.

``align``: the projector (and, with ``align_trains: all``, the LM) learns from (caption prompt,
caption) pairs; the phase exports what it trained. ``finetune``: starts from that export and
trains everything on the corpus conversations; held-out yes/no questions measure accuracy (every rank
answers the same questions: ZeRO-3 forwards are collective); the phase exports the whole model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.data.examples import ChatExample, caption_examples, conversation_examples, yes_no_turns
from tokenflow.models.llm_weights import WEIGHTS_NAME, read_weights
from tokenflow.models.understanding import UnderstandingModel, chat_batch
from tokenflow.train.harness import Tracker, all_reduce_mean, join_worker_group, report_checkpoint, restore
from tokenflow.train.llm_common import engine_for, example_stream, export_llm, first_examples, load_llm_parts

log = logging.getLogger(__name__)

ALIGNED_FILE = "aligned.safetensors"


def parse_yes_no(answer: str) -> str | None:
    """``yes``/``no`` from a generated answer (first word, case and punctuation ignored)."""
    words = answer.strip().lower().split()
    first = words[0].strip(".,!?;:") if words else ""
    return first if first in ("yes", "no") else None


def yes_no_accuracy(model: UnderstandingModel, tok, probes: list[tuple[Any, str, str]], batch: int,
                    max_new_tokens: int, max_tokens: int, device: torch.device, synced: bool) -> dict[str, float]:
    """Accuracy on (tokens, question, answer) probes, the majority-class rate, and the fraction of
    answers that were neither yes nor no (counted wrong)."""
    correct = unparsed = 0
    for start in range(0, len(probes), batch):
        chunk = probes[start : start + batch]
        tokens = torch.stack([torch.from_numpy(p[0]) for p in chunk]).to(device)
        answers = model.generate(tokens, [p[1] for p in chunk], tok, max_new_tokens, max_tokens, synced)
        for (_, _, truth), answer in zip(chunk, answers):
            parsed = parse_yes_no(answer)
            unparsed += parsed is None
            correct += parsed == parse_yes_no(truth)
    truths = [parse_yes_no(p[2]) for p in probes]
    majority = max(truths.count("yes"), truths.count("no")) / len(probes)
    return {"heldout/yes_no_accuracy": correct / len(probes), "heldout/majority_rate": majority,
            "heldout/unparsed_rate": unparsed / len(probes)}


def train_understanding_worker(job: dict[str, Any]) -> None:
    """Train loop for one Ray Train worker and one phase (``job["phase"]``)."""
    cfg = TokenFlowConfig.model_validate(job["config"])
    t = cfg.train_understanding
    align = job["phase"] == "align"
    steps, lr = (t.align_steps, t.align_lr) if align else (t.steps, t.lr)
    rank, world, device = join_worker_group(job["use_gpu"])

    tok, codebook, lm = load_llm_parts(job, t)
    model = UnderstandingModel(lm, codebook, tok.bos_token_id)
    projector_only = t.align_trains == "projector"
    if align and projector_only:
        lm.requires_grad_(False)
    elif not align and job.get("aligned_url"):
        weights, _ = read_weights(job["aligned_url"])
        if projector_only:
            model.projector.load_state_dict({k.removeprefix("projector."): v for k, v in weights.items()})
        else:
            model.load_state_dict(weights)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = engine_for(model, t, trainable, lr, steps)

    def expand(sample) -> list[ChatExample]:
        return caption_examples(sample) if align else conversation_examples(sample, t.split_turns)

    stream = example_stream(job["train_urls"], expand, rank, world, t.seed)
    probes = [(e.tokens, q, a) for e in first_examples(job["heldout_urls"], _probe_examples, t.heldout_questions)
              for q, a in e.turns]
    step = 0
    state = restore({"model": engine}, rank, world)
    if state is not None:
        step = state["step"]
        stream.load_state_dict(state["stream"])
    tracker = Tracker(job, rank)
    prefix = "align/" if align else ""
    max_tokens = t.language_model.max_text_tokens
    synced = engine.zero_optimization_stage() == 3

    last_time = time.perf_counter()
    while step < steps:
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            examples = [stream.next()[1] for _ in range(t.micro_batch_size)]
            tokens = torch.stack([torch.from_numpy(e.tokens) for e in examples]).to(device)
            chat = chat_batch(tok, [e.turns for e in examples], max_tokens)
            loss = engine(tokens, type(chat)(*(x.to(device) for x in chat)))
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach()) / t.grad_accum
        step += 1

        if step % t.log_every == 0 or step == steps:
            values = {f"{prefix}{k}": v for k, v in all_reduce_mean({"loss/answer": loss_sum}, world).items()}
            now = time.perf_counter()
            values[f"{prefix}samples_per_s"] = t.micro_batch_size * t.grad_accum * world * t.log_every / max(
                now - last_time, 1e-9)
            values[f"{prefix}lr"] = engine.optimizer.param_groups[0]["lr"]
            last_time = now
            if not align and probes and (step % t.eval_every == 0 or step == steps):
                model.eval()
                values.update(yes_no_accuracy(engine.module, tok, probes, t.micro_batch_size, t.max_new_tokens,
                                              max_tokens, device, synced))
                model.train()
            tracker.metrics(values, step)

        if step % t.checkpoint_every == 0 or step == steps:
            report_checkpoint({"model": engine}, rank, world, {"step": step, "stream": stream.state_dict()})

    meta = {"kind": "understanding", "scales": list(codebook.scales), "bos_id": tok.bos_token_id,
            "attn_implementation": t.language_model.attn_implementation}
    if align:
        export_llm(model, engine, rank, lm, meta, job["aligned_url"], keep=("projector.",) if projector_only else ())
    else:
        export_llm(model, engine, rank, lm, meta, storage.join(job["export_dir"], WEIGHTS_NAME))


def _probe_examples(sample) -> list[ChatExample]:
    return [ChatExample(sample.key, sample.tokens, (turn,)) for turn in yes_no_turns(sample)]
