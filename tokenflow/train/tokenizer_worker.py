"""The per-worker tokenizer training loop run by Ray Train (``TorchTrainer``).

Each worker holds two DeepSpeed engines: the tokenizer (generator) and the PatchGAN
discriminator, each with its own Adam. The discriminator and the adversarial term start at
``tokenizer.discriminator.start_step``. Rank 0 logs to MLflow; every rank takes part in the
collective work (ZeRO partitions, held-out evaluation, checkpoints).

The same loop runs the decoder-only fine-tune (``job["section"] == "finetune_decoder"``): the
tokenizer is rebuilt from the trained export's own config (with this stage's decoder and the
pipeline's loss settings), the export loaded, everything but the pixel decoder frozen, and only
the pixel terms train it (no teacher; the training-time scale drop as in the reference). The
export copies every frozen tensor from the trained file, so the tokens are exactly its tokens.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.data.decode import DecodeError, decode_image, preprocess
from tokenflow.data.corpus import iter_shard
from tokenflow.data.manifest import ShardRecord
from tokenflow.eval.image_metrics import mean_color_baseline, psnr
from tokenflow.models.codebook_usage import usage_and_perplexity
from tokenflow.models.discriminator import PatchDiscriminator
from tokenflow.models.losses import TokenizerLoss
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.train.engines import deepspeed_config, make_engine
from tokenflow.train.harness import (Tracker, all_reduce_mean, join_worker_group, report_checkpoint, restore,
                                     seed_for)
from tokenflow.train.image_stream import ImageStream, QuarantinedSample

log = logging.getLogger(__name__)

LOSS_TERMS = ("total", "l2", "semantic", "vq", "commit", "perceptual", "gan", "disc")


def heldout_images(records: list[ShardRecord], count: int, image_size: int) -> torch.Tensor:
    """The first ``count`` decodable held-out images, centre-cropped: the same on every rank."""
    images = []
    for record in records:
        for sample in iter_shard(record.url):
            if sample.problem is None:
                try:
                    images.append(preprocess(decode_image(sample.image), image_size))
                except DecodeError:
                    continue
            if len(images) == count:
                return torch.stack(images)
    if not images:
        raise ValueError("the held-out split has no decodable images")
    return torch.stack(images)


def _global_usage(model: TokenFlowTokenizer) -> tuple[float, float]:
    counts = model.usage.counts.double()
    dist.all_reduce(counts)
    return usage_and_perplexity(counts)


def train_tokenizer_worker(job: dict[str, Any]) -> None:
    """Train loop for one Ray Train worker; ``job`` is built by the stage driver."""
    from tokenflow.viz import save_image_grid

    cfg = TokenFlowConfig.model_validate(job["config"])
    decoder_only = job["section"] == "finetune_decoder"
    t = getattr(cfg, job["section"])
    rank, world, device = join_worker_group(job["use_gpu"])
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    init_path = storage.local_path(job["init_url"]) if decoder_only else None
    if decoder_only:
        from tokenflow.models.weights import read_tokenizer_config, start_decoder_finetune

        trained = read_tokenizer_config(init_path)
        losses = {k: getattr(cfg.tokenizer, k) for k in ("perceptual", "discriminator", "loss_weights")}
        tok = t.tokenizer_config(trained.model_copy(update=losses))
        model = TokenFlowTokenizer(tok, with_teacher=False)
        loaded = start_decoder_finetune(model, init_path)
        log.info("decoder fine-tune: pixel decoder %s", "from the trained weights" if loaded else "initialised fresh")
    else:
        tok = cfg.tokenizer
        model = TokenFlowTokenizer(tok)
    model = model.to(device)
    disc = PatchDiscriminator(tok.discriminator).to(device)
    loss_fn = TokenizerLoss(tok).to(device)
    ds_cfg = deepspeed_config(t.deepspeed, t.micro_batch_size, t.grad_accum, t.grad_clip)
    gen = make_engine(model, torch.optim.Adam(model.trainable_parameters(), lr=t.lr, betas=t.betas), ds_cfg,
                      t.lr_schedule, t.steps)
    dis = make_engine(disc, torch.optim.Adam(disc.parameters(), lr=t.lr, betas=t.betas), ds_cfg)  # constant lr
    engines = {"generator": gen, "discriminator": dis}

    train = [ShardRecord(**r) for r in job["train_shards"]]
    stream = ImageStream(train, rank, world, t.seed, tok.image_size, t.augment.min_scale, t.max_image_pixels)
    heldout = heldout_images([ShardRecord(**r) for r in job["heldout_shards"]], t.heldout_images,
                             tok.image_size).to(device)
    baseline_psnr = float(psnr(mean_color_baseline(heldout), heldout).mean())

    step = 0
    state = restore(engines, rank, world)
    if state is not None:
        step = state["step"]
        stream.load_state_dict(state["stream"])
        stream.quarantined = [QuarantinedSample(**q) for q in state["quarantined"]]
    tracker = Tracker(job, rank)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            out = gen.module(heldout)
        model.train()
        recon = ((out.reconstruction + 1) / 2).clamp(0, 1)
        if tracker.active:
            with tempfile.TemporaryDirectory() as tmp:
                grid = save_image_grid(Path(tmp) / f"heldout_step{step:07d}.png", [heldout.cpu(), recon.cpu()],
                                       ["held-out", f"reconstruction, step {step}"], scale=2)
                tracker.artifact(grid, "reconstructions")
        return {"heldout_psnr": float(psnr(recon, heldout).mean()), "heldout_psnr_mean_color": baseline_psnr,
                **out.profile.metrics()}

    per_step = t.micro_batch_size * t.grad_accum * world
    last_time = time.perf_counter()
    while step < t.steps:
        terms_sum: dict[str, float] = {}
        gan = loss_fn.gan_active(step)
        for micro in range(t.grad_accum):
            images = stream.next_batch(t.micro_batch_size).to(device)
            generator = torch.Generator().manual_seed(seed_for(t.seed, step, rank, micro))
            out = gen(images, drop_scale=model.sample_drop_scale(generator))
            disc.requires_grad_(False)
            if decoder_only:
                terms = loss_fn.pixel_terms(images, out.reconstruction, step, dis.module if gan else None)
            else:
                terms = loss_fn.generator_terms(images, out, step, dis.module if gan else None)
            disc.requires_grad_(True)
            gen.backward(terms["total"])
            gen.step()
            if gan:
                d_loss = loss_fn.discriminator_loss(dis, images, out.reconstruction)
                dis.backward(d_loss)
                dis.step()
                terms["disc"] = d_loss
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / t.grad_accum
        step += 1

        if step % t.log_every == 0 or step == t.steps:
            values = all_reduce_mean({f"loss/{k}": terms_sum.get(k, 0.0) for k in LOSS_TERMS
                                       if k in terms_sum or k in ("gan", "disc")}, world)
            usage, perplexity = _global_usage(model)
            now = time.perf_counter()
            values.update({"codebook/usage": usage, "codebook/perplexity": perplexity,
                           "lr": gen.optimizer.param_groups[0]["lr"],
                           "samples_per_s": per_step * t.log_every / max(now - last_time, 1e-9),
                           "quarantined": float(len(stream.quarantined))})
            last_time = now
            if step % t.image_every == 0 or step == t.steps:
                values.update(evaluate())
            tracker.metrics(values, step)

        if step % t.checkpoint_every == 0 or step == t.steps:
            report_checkpoint(engines, rank, world, {"step": step, "stream": stream.state_dict(),
                                                     "quarantined": [q.__dict__ for q in stream.quarantined]})

    export_tokenizer(model, gen, job["export_url"], rank, frozen_from=init_path)
    quarantined = [None] * world
    dist.all_gather_object(quarantined, [q.__dict__ for q in stream.quarantined])
    if rank == 0:
        storage.write_json_atomic(job["quarantine_url"], sorted(
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
