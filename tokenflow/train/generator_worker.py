"""The per-worker text-to-image training loop (next-scale prediction) run by Ray Train.

Every rank runs the same forward passes for evaluation and sampling (ZeRO-3 gathers are
collective); rank 0 logs to MLflow and writes the sample grids.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tokenflow import storage
from tokenflow.config import TokenFlowConfig, TrainGeneratorConfig
from tokenflow.data.examples import GenerationExample, generation_example
from tokenflow.models.generator import NextScaleGenerator, TextBatch, left_pad, scale_losses
from tokenflow.models.llm_weights import WEIGHTS_NAME, generator_meta
from tokenflow.models.sampling import sample_tokens
from tokenflow.models.text import IMAGE_END, IMAGE_START, generation_prompt
from tokenflow.train.harness import (Tracker, all_reduce_mean, join_worker_group, report_checkpoint, restore,
                                     seed_for)
from tokenflow.train.llm_common import (engine_for, example_stream, export_llm, first_examples, load_llm_parts,
                                        special_id)

log = logging.getLogger(__name__)


def _expand(sample) -> list[GenerationExample]:
    return [generation_example(sample)]


class _Prompts:
    """Captions -> left-padded :func:`generation_prompt` batches, counting truncated ones."""

    def __init__(self, tok, max_tokens: int):
        self.tok, self.max_tokens = tok, max_tokens
        self.truncated = 0

    def batch(self, captions: list[str], device: torch.device) -> TextBatch:
        rows = []
        for caption in captions:
            ids, cut = generation_prompt(self.tok, caption, self.max_tokens)
            self.truncated += int(cut)
            rows.append(ids)
        text = left_pad(rows, self.tok.pad_token_id)
        return TextBatch(text.ids.to(device), text.mask.to(device))


def train_generator_worker(job: dict[str, Any]) -> None:
    """Train loop for one Ray Train worker; ``job`` is built by the stage driver."""
    cfg = TokenFlowConfig.model_validate(job["config"])
    t = cfg.train_generator
    rank, world, device = join_worker_group(job["use_gpu"])

    tok, codebook, lm = load_llm_parts(job, t)
    model = NextScaleGenerator(lm, codebook, special_id(tok, IMAGE_START), special_id(tok, IMAGE_END),
                               t.qk_norm).to(device)
    engine = engine_for(model, t, [p for p in model.parameters() if p.requires_grad], t.lr, t.steps)
    prompts = _Prompts(tok, t.language_model.max_text_tokens)

    stream = example_stream(job["train_urls"], _expand, rank, world, t.seed)
    heldout = first_examples(job["heldout_urls"], _expand, t.heldout_samples)
    if not heldout:
        raise ValueError("the held-out token shards hold no samples")
    sample_captions = [e.caption for e in heldout if e.caption][: t.sample_prompts]
    step, unconditional = 0, 0
    state = restore({"generator": engine}, rank, world)
    if state is not None:
        step, unconditional = state["step"], state["unconditional"]
        stream.load_state_dict(state["stream"])
        prompts.truncated = state["truncated"]
    tracker = Tracker(job, rank)

    def evaluate() -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0
        per_scale = torch.zeros(len(codebook.scales), dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(heldout), t.micro_batch_size):
                chunk = heldout[start : start + t.micro_batch_size]
                tokens = torch.stack([torch.from_numpy(e.tokens) for e in chunk]).to(device)
                out = engine.module(prompts.batch([e.caption for e in chunk], device), tokens)
                total += float(out.loss) * len(chunk)
                per_scale += scale_losses(out.logits, tokens, codebook.scales).double().cpu() * len(chunk)
                count += len(chunk)
        values = {"heldout/loss": total / count, "heldout/unigram_entropy": job["unigram_entropy"],
                  **{f"heldout/loss/scale_{i}_{s}": float(v) / count
                     for i, (s, v) in enumerate(zip(codebook.scales, per_scale))}}
        if sample_captions:
            _log_samples(engine.module, prompts, sample_captions, t, step, device, tracker, job["tokenizer_url"])
        model.train()
        return values

    per_step = t.micro_batch_size * t.grad_accum * world
    last_time = time.perf_counter()
    while step < t.steps:
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            examples = [stream.next()[1] for _ in range(t.micro_batch_size)]
            drop = torch.rand(len(examples), generator=torch.Generator().manual_seed(
                seed_for(t.seed, step, rank, micro))) < t.cond_drop_prob
            captions = ["" if d else e.caption for e, d in zip(examples, drop.tolist())]
            unconditional += sum(1 for c in captions if not c)
            tokens = torch.stack([torch.from_numpy(e.tokens) for e in examples]).to(device)
            out = engine(prompts.batch(captions, device), tokens)
            engine.backward(out.loss)
            engine.step()
            loss_sum += float(out.loss.detach()) / t.grad_accum
        step += 1

        if step % t.log_every == 0 or step == t.steps:
            values = all_reduce_mean({"loss/image_tokens": loss_sum}, world)
            now = time.perf_counter()
            rate = per_step * t.log_every / max(now - last_time, 1e-9)
            values.update({"lr": engine.optimizer.param_groups[0]["lr"], "samples_per_s": rate,
                           "image_tokens_per_s": rate * codebook.num_tokens,
                           "unconditional_examples": float(unconditional),
                           "truncated_prompts": float(prompts.truncated)})
            last_time = now
            if step % t.eval_every == 0 or step == t.steps:
                values.update(evaluate())
            tracker.metrics(values, step)

        if step % t.checkpoint_every == 0 or step == t.steps:
            report_checkpoint({"generator": engine}, rank, world,
                              {"step": step, "stream": stream.state_dict(), "unconditional": unconditional,
                               "truncated": prompts.truncated})

    export_llm(model, engine, rank, lm, generator_meta(model, t.language_model.attn_implementation),
               storage.join(job["export_dir"], WEIGHTS_NAME))


def _log_samples(model: NextScaleGenerator, prompts: _Prompts, captions: list[str], t: TrainGeneratorConfig,
                 step: int, device: torch.device, tracker: Tracker, tokenizer_url: str) -> None:
    """Sample the fixed held-out prompts (every rank, same seed); rank 0 decodes and logs a grid
    with the prompts under ``samples/``."""
    text = prompts.batch(captions, device)
    negative_ids = generation_prompt(prompts.tok, t.sampling.negative_prompt, prompts.max_tokens)[0]
    negative = TextBatch(*(x.to(device) for x in left_pad([negative_ids], prompts.tok.pad_token_id)))
    tokens = sample_tokens(model, text, negative, t.sampling, torch.Generator(device=device).manual_seed(t.seed))
    if not tracker.active:
        return
    from tokenflow.models.weights import load_tokenizer
    from tokenflow.viz import save_image_grid

    images = load_tokenizer(storage.local_path(tokenizer_url), view=t.tokenizer_view).decode_indices(tokens.cpu())
    with tempfile.TemporaryDirectory() as tmp:
        grid = save_image_grid(Path(tmp) / f"samples_step{step:07d}.png", [img[None] for img in images],
                               [c[:48] for c in captions], scale=2)
        listing = Path(tmp) / f"samples_step{step:07d}.txt"
        listing.write_text("\n".join(captions) + "\n")
        tracker.artifact(grid, "samples")
        tracker.artifact(listing, "samples")
