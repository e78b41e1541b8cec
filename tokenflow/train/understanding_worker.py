"""The understanding training task, run by every Ray Train worker through
:func:`tokenflow.train.loop.run_loop`, one call per phase.

``align``: the projector (and, with ``align_trains: all``, the LM) learns from (caption prompt,
caption) pairs; the phase exports what it trained. ``finetune``: starts from that export and
trains everything on the corpus conversations; held-out yes/no questions measure accuracy (every rank
answers the same questions: ZeRO-3 forwards are collective); the phase exports the whole model.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch

from tokenflow import storage
from tokenflow.data.examples import ChatExample, align_examples, conversation_examples, yes_no_turns
from tokenflow.eval.mme import parse_answer
from tokenflow.models.llm_weights import WEIGHTS_NAME, read_weights
from tokenflow.models.understanding import UnderstandingModel, chat_batch
from tokenflow.train.harness import Tracker, join_worker_group, mixture_values
from tokenflow.train.jobs import UnderstandingJob
from tokenflow.train.llm_common import engine_for, example_stream, export_llm, heldout_examples, load_llm_parts
from tokenflow.train.loop import Schedule, run_loop

log = logging.getLogger(__name__)

ALIGNED_FILE = "aligned.safetensors"


def yes_no_accuracy(model: UnderstandingModel, tok, probes: list[tuple[Any, str, str]], batch: int,
                    max_new_tokens: int, max_tokens: int, device: torch.device, synced: bool) -> dict[str, float]:
    """Accuracy on (tokens, question, answer) probes, the majority-class rate, and the fraction of
    answers that were neither yes nor no (counted wrong); replies are read by MME's rule."""
    correct = unparsed = 0
    for start in range(0, len(probes), batch):
        chunk = probes[start : start + batch]
        tokens = torch.stack([torch.from_numpy(p[0]) for p in chunk]).to(device)
        answers = model.generate(tokens, [p[1] for p in chunk], tok, max_new_tokens, max_tokens, synced)
        for (_, _, truth), answer in zip(chunk, answers):
            parsed = parse_answer(answer)
            unparsed += parsed == "other"
            correct += parsed == parse_answer(truth)
    truths = [parse_answer(p[2]) for p in probes]
    majority = max(truths.count("yes"), truths.count("no")) / len(probes)
    return {"heldout/yes_no_accuracy": correct / len(probes), "heldout/majority_rate": majority,
            "heldout/unparsed_rate": unparsed / len(probes)}


class UnderstandingTask:
    """One understanding phase's step for :func:`run_loop`: the answer loss of LLaVA-style chat
    examples (captions in ``align``, the corpus conversations in ``finetune``)."""

    def __init__(self, job: UnderstandingJob, rank: int, world: int, device: torch.device):
        self.t = t = job.config.train_understanding
        self.align = job.phase == "align"
        self.device = device
        self.projector_only = t.align_trains == "projector"
        self.tok, self.codebook, self.lm = load_llm_parts(job, t)
        self.model = UnderstandingModel(self.lm, self.codebook, self.tok.bos_token_id)
        if self.align and self.projector_only:
            self.lm.requires_grad_(False)
        elif not self.align and job.aligned_url:
            weights, _ = read_weights(job.aligned_url)
            if self.projector_only:
                self.model.projector.load_state_dict({k.removeprefix("projector."): v for k, v in weights.items()})
            else:
                self.model.load_state_dict(weights)
        self.model.to(device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.steps, lr = (t.align_steps, t.align_lr) if self.align else (t.steps, t.lr)
        self.engine = engine_for(self.model, t, trainable, lr, self.steps)
        self.engines = {"model": self.engine}
        self.rates: dict[str, float] = {}
        expand = (partial(align_examples, limits=job.config.limits) if self.align else
                  partial(conversation_examples, split_turns=t.split_turns, limits=job.config.limits))
        self.stream = example_stream(job.train, expand, rank, world, t.seed)
        self.world = world
        self.probes = [(e.tokens, q, a) for e in heldout_examples(job.heldout, _probe_examples,
                                                                 t.heldout_questions) for q, a in e.turns]

    def micro_step(self, step: int, micro: int) -> dict[str, float]:
        t = self.t
        examples = [self.stream.next()[2] for _ in range(t.micro_batch_size)]
        tokens = torch.stack([torch.from_numpy(e.tokens) for e in examples]).to(self.device)
        chat = chat_batch(self.tok, [e.turns for e in examples], t.language_model.max_text_tokens)
        loss = self.engine(tokens, type(chat)(*(x.to(self.device) for x in chat)))
        self.engine.backward(loss)
        self.engine.step()
        return {"loss/answer": float(loss.detach())}

    def log_values(self) -> dict[str, float]:
        return mixture_values(self.stream.counts, self.world)

    def evaluate(self, step: int) -> dict[str, float]:
        t = self.t
        self.model.eval()
        values = yes_no_accuracy(self.engine.module, self.tok, self.probes, t.micro_batch_size, t.max_new_tokens,
                                 t.language_model.max_text_tokens, self.device,
                                 self.engine.zero_optimization_stage() == 3)
        self.model.train()
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])

    def resharded(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        return {"stream": self.stream.resharded([s["stream"] for s in states])}


def train_understanding_worker(job: UnderstandingJob) -> None:
    """One Ray Train worker and one phase (``job.phase``): train, then export what it trained."""
    rank, world, device = join_worker_group(job.use_gpu)
    tracker = Tracker(job, rank)
    task = UnderstandingTask(job, rank, world, device)
    t = task.t
    evaluates = not task.align and bool(task.probes)
    run_loop(task, Schedule.of(t, t.eval_every if evaluates else None, task.steps, "align/" if task.align else ""),
             tracker, rank, world, f"train_understanding ({job.phase})")
    meta = {"kind": "understanding", "scales": list(task.codebook.scales), "bos_id": task.tok.bos_token_id,
            "attn_implementation": t.language_model.attn_implementation}
    if task.align:
        export_llm(task.model, task.engine, rank, task.lm, meta, job.aligned_url,
                   keep=("projector.",) if task.projector_only else ())
    else:
        export_llm(task.model, task.engine, rank, task.lm, meta, storage.join(job.export_dir, WEIGHTS_NAME))


def _probe_examples(sample) -> list[ChatExample]:
    return [ChatExample(sample.key, sample.tokens, (turn,)) for turn in yes_no_turns(sample)]
