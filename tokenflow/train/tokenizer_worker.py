"""The tokenizer's training task, run by every Ray Train (``TorchTrainer``) worker through
:func:`tokenflow.train.loop.run_loop`.

Each worker holds two DeepSpeed engines: the tokenizer (generator) and the PatchGAN
discriminator, each with its own Adam. The discriminator and the adversarial term start at
``tokenizer.discriminator.start_step``. Rank 0 logs to MLflow; every rank takes part in the
collective work (ZeRO partitions, held-out evaluation, checkpoints).

The same task runs the decoder-only fine-tune (``job.section == "finetune_decoder"``): the
tokenizer is rebuilt from the trained export's own config (with this stage's decoder and the
pipeline's loss settings), the export loaded, everything but the pixel decoder frozen, and only
the pixel terms train it (no teacher; the training-time scale drop as in the reference). The
export copies every frozen tensor from the trained file, so the tokens are exactly its tokens.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tokenflow import storage
from tokenflow.config import SampleLimitsConfig
from tokenflow.data.corpus import iter_record
from tokenflow.data.decode import DecodeError, decode_image, preprocess
from tokenflow.data.manifest import ShardRecord
from tokenflow.eval.image_metrics import mean_color_baseline, psnr
from tokenflow.models.codebook_usage import usage_and_perplexity
from tokenflow.models.discriminator import PatchDiscriminator
from tokenflow.models.losses import TokenizerLoss
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.seeding import seed_for
from tokenflow.train.engines import deepspeed_config, make_engine
from tokenflow.train.harness import Tracker, join_worker_group, mixture_values
from tokenflow.train.image_stream import ImageStream, QuarantinedSample
from tokenflow.train.jobs import TokenizerJob
from tokenflow.train.loop import Schedule, run_loop
from tokenflow.train.mixture import MixtureSource, shares_of

log = logging.getLogger(__name__)


def _first_images(records: list[ShardRecord], count: int, image_size: int,
                  limits: SampleLimitsConfig) -> list[torch.Tensor]:
    images: list[torch.Tensor] = []
    for record in records:
        for sample in iter_record(record):
            if len(images) == count:
                return images
            if sample.problem is None:
                try:
                    images.append(preprocess(decode_image(sample.image, limits), image_size))
                except DecodeError:
                    continue
    return images


def heldout_images(sources: list[MixtureSource[ShardRecord]], count: int, image_size: int,
                   limits: SampleLimitsConfig) -> torch.Tensor:
    """The first decodable held-out images of each corpus, ``count`` split by weight,
    centre-cropped: the same on every rank."""
    images = [image for source, n in zip(sources, shares_of(count, sources))
              for image in _first_images(source.shards, n, image_size, limits)]
    if not images:
        raise ValueError("the held-out split has no decodable images")
    return torch.stack(images)


def global_usage(model: TokenFlowTokenizer) -> tuple[float, float]:
    """Codebook usage and perplexity over every worker's recent tokens (collective)."""
    counts = model.usage.counts.double()
    dist.all_reduce(counts)
    return usage_and_perplexity(counts)


class TokenizerTask:
    """The tokenizer (or decoder-only) training step for :func:`run_loop`: two DeepSpeed engines,
    the tokenizer and the PatchGAN discriminator, each with its own Adam."""

    def __init__(self, job: TokenizerJob, rank: int, world: int, device: torch.device, tracker: Tracker):
        cfg = job.config
        self.t = t = getattr(cfg, job.section)
        self.rank, self.device, self.tracker = rank, device, tracker
        self.decoder_only = job.decoder_only
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.init_path = storage.local_path(job.init_url) if job.init_url else None
        if self.decoder_only:
            from tokenflow.models.weights import read_tokenizer_config, start_decoder_finetune

            trained = read_tokenizer_config(self.init_path)
            losses = {k: getattr(cfg.tokenizer, k) for k in ("perceptual", "discriminator", "loss_weights")}
            tok = t.tokenizer_config(trained.model_copy(update=losses))
            model = TokenFlowTokenizer(tok, with_teacher=False)
            loaded = start_decoder_finetune(model, self.init_path)
            log.info("decoder fine-tune: pixel decoder %s", "from the trained weights" if loaded else "initialised fresh")
        else:
            tok = cfg.tokenizer
            model = TokenFlowTokenizer(tok)
        self.model = model.to(device)
        disc = PatchDiscriminator(tok.discriminator).to(device)
        self.loss_fn = TokenizerLoss(tok).to(device)
        ds_cfg = deepspeed_config(t.deepspeed, t.micro_batch_size, t.grad_accum, t.grad_clip)
        self.gen = make_engine(self.model, torch.optim.Adam(self.model.trainable_parameters(), lr=t.lr,
                                                            betas=t.betas), ds_cfg, t.lr_schedule, t.steps)
        self.dis = make_engine(disc, torch.optim.Adam(disc.parameters(), lr=t.lr, betas=t.betas), ds_cfg)  # constant lr
        self.engines = {"generator": self.gen, "discriminator": self.dis}
        self.rates: dict[str, float] = {}
        limits = cfg.limits
        self.stream = ImageStream(job.train, rank, world, t.seed, tok.image_size, t.augment.min_scale, limits)
        self.world = world
        self.heldout = heldout_images(job.heldout, t.heldout_images, tok.image_size, limits).to(device)
        self.baseline_psnr = float(psnr(mean_color_baseline(self.heldout), self.heldout).mean())

    def micro_step(self, step: int, micro: int) -> dict[str, float]:
        gan = self.loss_fn.gan_active(step)
        images = self.stream.next_batch(self.t.micro_batch_size).to(self.device)
        generator = torch.Generator().manual_seed(seed_for(self.t.seed, step, self.rank, micro))
        out = self.gen(images, drop_scale=self.model.sample_drop_scale(generator))
        disc = self.dis.module
        disc.requires_grad_(False)
        if self.decoder_only:
            terms = self.loss_fn.pixel_terms(images, out.reconstruction, step, disc if gan else None)
        else:
            terms = self.loss_fn.generator_terms(images, out, step, disc if gan else None)
        disc.requires_grad_(True)
        self.gen.backward(terms["total"])
        self.gen.step()
        values = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        values.setdefault("loss/gan", 0.0)
        values["loss/disc"] = 0.0
        if gan:
            d_loss = self.loss_fn.discriminator_loss(self.dis, images, out.reconstruction)
            self.dis.backward(d_loss)
            self.dis.step()
            values["loss/disc"] = float(d_loss.detach())
        return values

    def log_values(self) -> dict[str, float]:
        usage, perplexity = global_usage(self.model)
        return {"codebook/usage": usage, "codebook/perplexity": perplexity,
                "quarantined": float(len(self.stream.quarantined)), **mixture_values(self.stream.stream.counts, self.world)}

    def evaluate(self, step: int) -> dict[str, float]:
        from tokenflow.viz import save_image_grid

        self.model.eval()
        with torch.no_grad():
            out = self.gen.module(self.heldout)
        self.model.train()
        recon = ((out.reconstruction + 1) / 2).clamp(0, 1)
        if self.tracker.active:
            with tempfile.TemporaryDirectory() as tmp:
                grid = save_image_grid(Path(tmp) / f"heldout_step{step:07d}.png", [self.heldout.cpu(), recon.cpu()],
                                       ["held-out", f"reconstruction, step {step}"], scale=2)
                self.tracker.image("heldout_reconstructions", grid, step)
        return {"heldout/psnr": float(psnr(recon, self.heldout).mean()),
                "heldout/psnr_mean_color": self.baseline_psnr, **out.profile.metrics()}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "quarantined": [q.__dict__ for q in self.stream.quarantined]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.stream.quarantined = [QuarantinedSample(**q) for q in state["quarantined"]]

    def resharded(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        # The quarantine records of every saving rank go to the first one.
        return {"stream": self.stream.stream.resharded([s["stream"] for s in states]),
                "quarantined": [q for s in states for q in s["quarantined"]] if rank == 0 else []}


def train_tokenizer_worker(job: TokenizerJob) -> None:
    """One Ray Train worker: train, export, and write the merged quarantine list."""
    rank, world, device = join_worker_group(job.use_gpu)
    tracker = Tracker(job, rank)
    task = TokenizerTask(job, rank, world, device, tracker)
    run_loop(task, Schedule.of(task.t, task.t.image_every), tracker, rank, world, job.section)
    export_tokenizer(task.model, task.gen, job.export_url, rank, frozen_from=task.init_path)
    quarantined = [None] * world
    dist.all_gather_object(quarantined, [q.__dict__ for q in task.stream.quarantined])
    if rank == 0:
        storage.write_json_atomic(job.quarantine_url, sorted(
            (q for part in quarantined for q in part), key=lambda q: (q["shard"], q["key"])))


def export_tokenizer(model: TokenFlowTokenizer, engine: Any, url: str, rank: int,
                     frozen_from: Path | None = None) -> None:
    """Write the inference export (no teacher) from rank 0; gathers ZeRO-3 partitions first.
    ``frozen_from`` (the decoder fine-tune): every tensor but the pixel decoder is copied from
    that trained export, bit for bit, whatever precision the engine ran in."""
    import deepspeed

    from tokenflow.models.weights import restore_frozen, save_tokenizer

    params = [p for name, p in model.named_parameters() if not name.startswith("teacher.")]
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if rank == 0:
            if frozen_from is not None:
                restore_frozen(model, frozen_from)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "tokenizer.safetensors"
                save_tokenizer(model, path, include_teacher=False)
                storage.write_bytes_atomic(url, path.read_bytes())
