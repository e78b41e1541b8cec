"""The text-to-image (next-scale prediction) training task, run by every Ray Train worker
through :func:`tokenflow.train.loop.run_loop`.

Every rank runs the same forward passes for evaluation and sampling (ZeRO-3 gathers are
collective); rank 0 logs to MLflow and writes the sample grids.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from tokenflow import storage
from tokenflow.config import TrainGeneratorConfig
from tokenflow.data.examples import GenerationExample, generation_example
from tokenflow.models.generator import NextScaleGenerator, TextBatch, left_pad, scale_losses
from tokenflow.models.llm_weights import WEIGHTS_NAME, generator_meta
from tokenflow.models.sampling import sample_tokens
from tokenflow.models.text import IMAGE_END, IMAGE_START, generation_prompt
from tokenflow.seeding import seed_for
from tokenflow.train.harness import Tracker, join_worker_group, mixture_values
from tokenflow.train.jobs import GeneratorJob
from tokenflow.train.llm_common import (engine_for, example_stream, export_llm, heldout_examples, load_llm_parts,
                                        special_id)
from tokenflow.train.loop import Schedule, run_loop

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


class GeneratorTask:
    """The next-scale prediction step for :func:`run_loop`: one DeepSpeed engine over the LM and
    its image-token embedding/projector; captions dropped to the empty prompt with
    ``cond_drop_prob`` for classifier-free guidance."""

    def __init__(self, job: GeneratorJob, rank: int, world: int, device: torch.device, tracker: Tracker):
        self.t = t = job.config.train_generator
        self.job, self.rank, self.world, self.device, self.tracker = job, rank, world, device, tracker
        tok, self.codebook, self.lm = load_llm_parts(job, t)
        self.model = NextScaleGenerator(self.lm, self.codebook, special_id(tok, IMAGE_START),
                                        special_id(tok, IMAGE_END), t.qk_norm).to(device)
        self.engine = engine_for(self.model, t, [p for p in self.model.parameters() if p.requires_grad], t.lr,
                                 t.steps)
        self.engines = {"generator": self.engine}
        self.rates = {"image_tokens_per_s": float(self.codebook.num_tokens)}
        self.prompts = _Prompts(tok, t.language_model.max_text_tokens)
        self.stream = example_stream(job.train, _expand, rank, world, t.seed)
        self.heldout = heldout_examples(job.heldout, _expand, t.heldout_samples)
        if not self.heldout:
            raise ValueError("the held-out token shards hold no samples")
        self.sample_captions = [e.caption for e in self.heldout if e.caption][: t.sample_prompts]
        self.unconditional = 0

    def micro_step(self, step: int, micro: int) -> dict[str, float]:
        t = self.t
        examples = [self.stream.next()[2] for _ in range(t.micro_batch_size)]
        drop = torch.rand(len(examples), generator=torch.Generator().manual_seed(
            seed_for(t.seed, step, self.rank, micro))) < t.cond_drop_prob
        captions = ["" if d else e.caption for e, d in zip(examples, drop.tolist())]
        self.unconditional += sum(1 for c in captions if not c)
        tokens = torch.stack([torch.from_numpy(e.tokens) for e in examples]).to(self.device)
        out = self.engine(self.prompts.batch(captions, self.device), tokens)
        self.engine.backward(out.loss)
        self.engine.step()
        return {"loss/image_tokens": float(out.loss.detach())}

    def log_values(self) -> dict[str, float]:
        return {"unconditional_examples": float(self.unconditional),
                "truncated_prompts": float(self.prompts.truncated), **mixture_values(self.stream.counts, self.world)}

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out token loss (overall and per scale) and, on rank 0, a grid of samples."""
        t, scales = self.t, self.codebook.scales
        self.model.eval()
        total, count = 0.0, 0
        per_scale = torch.zeros(len(scales), dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(self.heldout), t.micro_batch_size):
                chunk = self.heldout[start : start + t.micro_batch_size]
                tokens = torch.stack([torch.from_numpy(e.tokens) for e in chunk]).to(self.device)
                out = self.engine.module(self.prompts.batch([e.caption for e in chunk], self.device), tokens)
                total += float(out.loss) * len(chunk)
                per_scale += scale_losses(out.logits, tokens, scales).double().cpu() * len(chunk)
                count += len(chunk)
        values = {"heldout/loss": total / count, "heldout/unigram_entropy": self.job.unigram_entropy,
                  **{f"heldout/loss/scale_{i}_{s}": float(v) / count
                     for i, (s, v) in enumerate(zip(scales, per_scale))}}
        if self.sample_captions:
            _log_samples(self.engine.module, self.prompts, self.sample_captions, t, step, self.device, self.tracker,
                         self.job.tokenizer_url)
        self.model.train()
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "unconditional": self.unconditional,
                "truncated": self.prompts.truncated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.unconditional, self.prompts.truncated = state["unconditional"], state["truncated"]

    def resharded(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        first = rank == 0  # the counters are totals over the saving ranks, kept by the first rank
        return {"stream": self.stream.resharded([s["stream"] for s in states]),
                "unconditional": sum(s["unconditional"] for s in states) if first else 0,
                "truncated": sum(s["truncated"] for s in states) if first else 0}


def train_generator_worker(job: GeneratorJob) -> None:
    """One Ray Train worker: train, then export the generator."""
    rank, world, device = join_worker_group(job.use_gpu)
    tracker = Tracker(job, rank)
    task = GeneratorTask(job, rank, world, device, tracker)
    t = task.t
    run_loop(task, Schedule.of(t, t.eval_every), tracker, rank, world, "train_generator")
    export_llm(task.model, task.engine, rank, task.lm, generator_meta(task.model, t.language_model.attn_implementation),
               storage.join(job.export_dir, WEIGHTS_NAME))


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
                               captions, scale=max(1, 192 // images.shape[-1]))
        listing = Path(tmp) / f"samples_step{step:07d}.txt"
        listing.write_text("\n".join(captions) + "\n")
        tracker.image("samples", grid, step)
        tracker.artifact(listing, "samples")
