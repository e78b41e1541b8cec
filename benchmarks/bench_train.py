"""Tokenizer training overhead: the real stage (DeepSpeed ZeRO-2 in Ray Train) vs plain PyTorch DDP.

    python -m benchmarks.bench_train [--quick] [--steps 70] [--log-every 10] [--work-dir DIR]

Same model (tiny tokenizer with its frozen teacher, seed 0), loss (``TokenizerLoss``), optimiser
(Adam, the smoke config's lr held constant and its betas, gradient clipping 1.0), data (the same
``ImageStream`` per rank) and batch (micro-batch 8 per worker, 2 workers) on the shapes corpus:

- stage: ``run_train_tokenizer`` with ``configs/pipelines/smoke.yaml`` (2 Ray Train workers x
  1 CPU, so OMP_NUM_THREADS=1, ZeRO-2 fp32, gloo). Step time per window of ``--log-every`` steps
  comes from the ``samples_per_s`` metric the stage logs to MLflow (rank 0's wall time between
  logs: steps, the metric all-reduces and the MLflow write); evaluation and checkpoints are moved
  past the last measured window.
- plain: the same loop body in 2 spawned processes x 1 torch thread, ``DistributedDataParallel``
  over gloo, ``torch.optim.Adam`` and ``clip_grad_norm_``, with the same per-window all-reduces;
- DeepSpeed without Ray: in the same 2 processes, that loop on the stage's own engine setup
  (``make_engine``, ZeRO-2), its windows alternating with the plain loop's so both see the same
  load; it splits the overhead between DeepSpeed and Ray Train.

Start-up is excluded: the first window (which holds the first steps' one-off costs) is dropped;
the median of the remaining windows is the step time, and the fastest window is shown too. The
machine is shared, so CPU seconds per step are measured as well, which other users' load barely
moves: per window, the ``process_time`` of both ranks for the two loops; for the stage, every
process of its private Ray instance and the driver (sampled; Ray Train workers, Ray services, the
MLflow writes), between the timestamps of the stage's own MLflow metrics.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple

from benchmarks.common import (REPO, CpuSampler, header, make_corpus, parser, private_ray, ratio_line, table,
                               work_dir)

log = logging.getLogger("benchmarks.train")

SMOKE = REPO / "configs" / "pipelines" / "smoke.yaml"


class Loop(NamedTuple):
    """One measured training loop: per window of ``log_every`` steps, its wall seconds, the
    loss/total at its end, the CPU seconds of all its processes and of its training processes
    alone (None where not measured)."""

    windows: list[float]
    losses: list[float]
    cpu: list[float | None]
    trainer_cpu: list[float | None]
    wall: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loop_worker(rank: int, world: int, port: int, config: dict[str, Any], shards: list[dict[str, Any]],
                log_every: int) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """One rank of the stage's loop body outside Ray, twice over: on plain DDP and on the stage's
    DeepSpeed engine setup, each with its own model (same seed) and stream, alternating windows of
    ``log_every`` steps so both see the same machine load. Returns, per engine, (seconds per
    window, loss/total at the end of each window, this process's CPU seconds per window)."""
    import torch
    import torch.distributed as dist

    from tokenflow.config import TokenFlowConfig
    from tokenflow.data.manifest import ShardRecord
    from tokenflow.models.losses import TokenizerLoss
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.seeding import seed_for
    from tokenflow.train.engines import deepspeed_config, init_distributed, make_engine
    from tokenflow.train.harness import all_reduce_mean
    from tokenflow.train.image_stream import ImageStream
    from tokenflow.train.mixture import MixtureSource
    from tokenflow.train.tokenizer_worker import global_usage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"))  # the gloo group both engines use
    cfg = TokenFlowConfig.model_validate(config)
    t, tok = cfg.train_tokenizer, cfg.tokenizer
    records = [ShardRecord(**s) for s in shards]

    def build(engine: str) -> Callable[[int], float]:
        torch.manual_seed(t.seed)
        model = TokenFlowTokenizer(tok)
        loss_fn = TokenizerLoss(tok)
        params = model.trainable_parameters()
        optimizer = torch.optim.Adam(params, lr=t.lr, betas=t.betas)
        stream = ImageStream([MixtureSource("shapes", 1.0, records)], rank, world, t.seed, tok.image_size, t.augment.min_scale, cfg.limits)
        if engine == "deepspeed":
            net = make_engine(model, optimizer, deepspeed_config(t.deepspeed, t.micro_batch_size, 1, t.grad_clip))

            def update(loss: torch.Tensor) -> None:
                net.backward(loss)
                net.step()
        else:
            # Some tower parameters (e.g. the unused output projection) get no gradient: DDP must be told.
            net = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False,
                                                            find_unused_parameters=True)

            def update(loss: torch.Tensor) -> None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                optimizer.step()

        def window(first_step: int) -> float:
            for step in range(first_step, first_step + log_every):
                images = stream.next_batch(t.micro_batch_size)
                generator = torch.Generator().manual_seed(seed_for(t.seed, step, rank, 0))
                terms = loss_fn.generator_terms(images, net(images, drop_scale=model.sample_drop_scale(generator)),
                                                step)
                update(terms["total"])
                values = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
            global_usage(model)
            return all_reduce_mean(values, world)["loss/total"]

        return window

    loops = {engine: build(engine) for engine in ("ddp", "deepspeed")}
    results: dict[str, tuple[list[float], list[float], list[float]]] = {engine: ([], [], []) for engine in loops}
    for index, first_step in enumerate(range(0, t.steps, log_every)):
        for engine in sorted(loops, reverse=index % 2 == 1):  # alternate which one goes first
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            loss = loops[engine](first_step)
            for values, value in zip(results[engine], (time.perf_counter() - start, loss,
                                                       time.process_time() - cpu)):
                values.append(value)
    dist.destroy_process_group()
    return results


def run_loops(config: dict[str, Any], shards: list[dict[str, Any]], log_every: int) -> dict[str, Loop]:
    """:func:`loop_worker` on 2 spawned processes: rank 0's windows and losses, both ranks' CPU."""
    import multiprocessing as mp

    start = time.monotonic()
    port = _free_port()
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(loop_worker, rank, 2, port, config, shards, log_every) for rank in range(2)]
        ranks = [f.result() for f in futures]
    wall = time.monotonic() - start
    loops = {}
    for engine, (windows, losses, _) in ranks[0].items():
        cpu = [sum(c) for c in zip(*(r[engine][2] for r in ranks))]
        loops[engine] = Loop(windows, losses, cpu, cpu, wall)
    return loops


def run_stage(cfg: Any, manifest: dict[str, Any], corpus: Path, out: Path) -> Loop:
    """The real stage on the corpus at ``corpus``, its windows from the ``samples_per_s`` metric it
    logs to MLflow."""
    import mlflow

    from tokenflow.data.stage_data import StageData
    from tokenflow.stages.train_tokenizer import run_train_tokenizer

    t = cfg.train_tokenizer
    start = time.monotonic()
    with CpuSampler() as sampler, private_ray(num_cpus=2):
        result = run_train_tokenizer(cfg, [StageData("shapes", 1.0, manifest, str(corpus))], str(out))
    wall = time.monotonic() - start
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")

    def history(name: str) -> list[Any]:
        return sorted(client.get_metric_history(result["mlflow_run_id"], name), key=lambda m: m.step)

    per_step = t.micro_batch_size * t.grad_accum * t.num_workers
    rates = history("samples_per_s")
    logged = [m.timestamp / 1000 for m in rates]  # when rank 0 logged each window (after its all-reduces)
    cpu = [None] + [sampler.cpu(a, b) for a, b in zip(logged, logged[1:])]
    workers = [None] + [sampler.cpu(a, b, "RayTrainWorker") for a, b in zip(logged, logged[1:])]
    return Loop([per_step * t.log_every / m.value for m in rates], [m.value for m in history("loss/total")], cpu,
                workers, wall)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args()
    images, shard_size, micro = 2000, 250, None
    if args.quick:
        args.steps, args.log_every, images, shard_size, micro = 4, 2, 48, 16, 2
    header("Tokenizer training step: DeepSpeed ZeRO-2 in Ray Train vs plain PyTorch DDP")

    from tokenflow.config import load_config

    # Constant lr (no schedule) in every loop, so the three compute the same steps.
    overrides = [f"train_tokenizer.steps={args.steps}", f"train_tokenizer.log_every={args.log_every}",
                 f"train_tokenizer.checkpoint_every={args.steps}", f"train_tokenizer.image_every={args.steps}",
                 "train_tokenizer.lr_schedule.warmup_steps=0", "train_tokenizer.lr_schedule.decay=constant"]
    if micro:
        overrides += [f"train_tokenizer.micro_batch_size={micro}", "train_tokenizer.heldout_images=2"]
    cfg = load_config(SMOKE, overrides)
    t = cfg.train_tokenizer
    if t.grad_accum != 1 or t.num_workers != 2:
        raise SystemExit("the plain loop mirrors grad_accum=1 on 2 workers")
    with work_dir(args.work_dir) as work:
        manifest = make_corpus(work / "train-corpus", images, shard_size, heldout_fraction=0.1)
        shards = manifest["splits"]["train"]["shards"]
        print(f"corpus: {manifest['splits']['train']['samples']} shapes images (64 px) in {len(shards)} shards; "
              f"tiny tokenizer (random init, seed {t.seed}); {t.num_workers} workers x micro-batch "
              f"{t.micro_batch_size}, lr {t.lr:g}, {t.deepspeed}, {args.steps} steps, windows of "
              f"{args.log_every} steps (first dropped)\n")
        load = os.getloadavg()[0]
        stage = run_stage(cfg, manifest, work / "train-corpus", work / "train-stage")
        load_loops = os.getloadavg()[0]
        loops = run_loops(cfg.model_dump(mode="json"), shards, args.log_every)
        runs = [("stage: run_train_tokenizer", "2 Ray Train workers x 1 CPU, DeepSpeed ZeRO-2 fp32, gloo", stage,
                 f"{stage.wall:.0f}", load),
                ("plain: DDP + torch.optim.Adam", "2 processes x 1 thread, gloo", loops["ddp"],
                 f"{loops['ddp'].wall:.0f} (both loops)", load_loops),
                ("DeepSpeed ZeRO-2 without Ray", "same 2 processes, windows alternating with plain",
                 loops["deepspeed"], "", load_loops)]
        per_step = t.micro_batch_size * t.num_workers
        rows, median, fastest, cpu = [], [], [], []
        for name, setup, loop, wall, load in runs:
            median.append(statistics.median(loop.windows[1:]) / args.log_every)
            fastest.append(min(loop.windows[1:]) / args.log_every)
            cpu.append(statistics.median(loop.cpu[1:]) / args.log_every)
            rows.append([name, setup, median[-1], fastest[-1], per_step / median[-1], cpu[-1],
                         statistics.median(loop.trainer_cpu[1:]) / args.log_every,
                         " ".join(f"{w:.1f}" for w in loop.windows), wall, load])
        table(["loop", "setup", "median step (s)", "fastest window step (s)", "images/s (median)",
               "CPU s/step, all processes", "CPU s/step, the 2 training processes", "windows (s)",
               "wall incl. start-up (s)", "load avg (1 min) before"], rows)
        print("check: loss/total at the end of each window, stage / plain / DeepSpeed without Ray:\n  " +
              "\n  ".join(" / ".join(f"{v:.5f}" for v in values) for values in zip(*(r[2].losses for r in runs)))
              + "\n")
        ratio_line({"stage/plain": median[0] / median[1], "overhead_pct": 100 * (median[0] / median[1] - 1),
                    "overhead_pct_fastest": 100 * (fastest[0] / fastest[1] - 1),
                    "overhead_pct_cpu": 100 * (cpu[0] / cpu[1] - 1), "deepspeed_no_ray/plain": median[2] / median[1],
                    "deepspeed_no_ray/plain_cpu": cpu[2] / cpu[1]})


if __name__ == "__main__":
    main()
