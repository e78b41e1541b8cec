"""Pre-tokenize throughput: bare encode ceiling vs the Ray Data stage vs a per-image .npy loop.

    python -m benchmarks.bench_pretokenize [--quick [--with-b]] [--images 3000] [--b-images 64] [--work-dir DIR]

One shapes corpus (webdataset tars, 64 px PNGs) and one tiny tokenizer (randomly initialised,
seed 0), three ways, on the same 2-CPU budget:

(a) the bare model: ``ShardEncoder.encode_images`` (the stage's own fixed-shape micro-batch
    path, micro-batch 16) on images decoded beforehand (not timed), 2 processes x 1 torch thread
    started together: the ceiling;
(b) ``pretokenize_corpus`` end to end (read tar -> decode -> encode -> Parquet), 2 actors x 1 CPU
    (Ray gives each actor OMP_NUM_THREADS=1, so 1 torch thread), Ray already started. Its fixed
    cost (actor start-up, planning, manifest) is the intercept of two runs: the whole corpus and
    its first two shards (one per actor), fixed = (t2 * N - tN * n2) / (N - n2); "steady" is the
    throughput between them, (N - n2) / (tN - t2). A re-run over the finished output (every shard
    already written: no actors start) is reported as well;
(c) the common baseline (LlamaGen-style code extraction): for each image decode, encode at batch
    size 1, ``np.save`` one int64 .npy file per image; 2 processes x 1 thread.

The machine is shared, so (a) and (b) are measured twice (the best counts: the ratios are
conservative). CPU milliseconds per image are measured as well, which other users' load moves
less than wall time: ``process_time`` of the (a) and (c) processes; for (b), every process of
this script (its private Ray instance, the actors, the driver), sampled. The ``_cpu`` ratios
compare CPU per image. A single-process CPU breakdown of the stage's per-image work follows.

Then the case where encoding dominates, as on a cluster: a TokenFlow-B-shaped tokenizer (the
architecture of configs/models/tokenflow-b.yaml with its pretrained tower source cleared,
randomly initialised, seed 0; 561 tokens/image, K=32768) on 224 px shapes images in shards of 16,
micro-batch 8, (a) and (b) once each on the same 2-CPU budget; ``B_b/a`` is (b)'s end-to-end
throughput over (a)'s.

``--quick`` measures each once, on small inputs, and skips the B-shaped case (building and
running it dominates a quick run; the ratio line then has no ``B_b/a``, ``B_b/a_cpu``);
``--with-b`` keeps it in a quick run (8 images, micro-batch 4). A full run always has it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (REPO, CpuSampler, header, make_corpus, make_tiny_tokenizer, parser,
                               private_ray, ratio_line, table, work_dir)

log = logging.getLogger("benchmarks.pretokenize")

SMOKE = REPO / "configs" / "pipelines" / "smoke.yaml"
B_CONFIG = REPO / "configs" / "models" / "tokenflow-b.yaml"


@dataclass(frozen=True)
class _Case:
    """One corpus (its ``train`` split), one tokenizer, and the stage's settings for them."""

    manifest: dict[str, Any]
    tokenizer: str
    cfg: Any  # PretokenizeConfig (tokenflow is imported after the header is printed)

    @property
    def urls(self) -> list[str]:
        return [s["url"] for s in self.manifest["splits"]["train"]["shards"]]

    @property
    def images(self) -> int:
        return self.manifest["splits"]["train"]["samples"]


def _first_shards(manifest: dict[str, Any], count: int) -> tuple[dict[str, Any], int]:
    """The corpus manifest cut to the first ``count`` shards of its train split, and their images."""
    from tokenflow.data.manifest import corpus_manifest, manifest_reader, shard_records

    cut = corpus_manifest({"train": shard_records(manifest, "train")[:count]}, manifest["source"],
                          manifest_reader(manifest))
    return cut, cut["splits"]["train"]["samples"]


def make_b_tokenizer(path: Path) -> Path:
    """A TokenFlow-B-shaped tokenizer: configs/models/tokenflow-b.yaml with the semantic tower's
    pretrained source cleared, randomly initialised (seed 0), saved as the inference export."""
    import torch

    from tokenflow.config import load_config
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.models.weights import save_tokenizer

    if not path.exists():
        cfg = load_config(B_CONFIG).tokenizer
        tower = cfg.semantic_encoder.model_copy(update={"pretrained": None})
        torch.manual_seed(0)
        model = TokenFlowTokenizer(cfg.model_copy(update={"semantic_encoder": tower}), with_teacher=False)
        save_tokenizer(model, path, include_teacher=False)
    return path


def _encode_worker(tokenizer: str, urls: list[str], threads: int, micro_batch: int, scratch: str,
                   barrier: Any) -> tuple[float, float, float, dict[str, np.ndarray]]:
    """(a): the stage's encode path on images decoded beforehand; returns (start, end, CPU
    seconds, tokens by key)."""
    import torch

    from tokenflow.data.corpus import iter_shard
    from tokenflow.data.decode import decode_image, preprocess
    from tokenflow.data.shard_encoder import ShardEncoder

    torch.set_num_threads(threads)
    encoder = ShardEncoder(tokenizer, scratch, batch_size=micro_batch, micro_batch=micro_batch)
    samples = [s for url in urls for s in iter_shard(url)]
    images = torch.stack([preprocess(decode_image(s.image), encoder.model.cfg.image_size) for s in samples])
    encoder.encode_images(images[:micro_batch])  # warm-up
    barrier.wait()
    start, cpu = time.monotonic(), time.process_time()
    tokens = encoder.encode_images(images)
    return (start, time.monotonic(), time.process_time() - cpu,
            {s.key: t for s, t in zip(samples, tokens, strict=True)})


def _per_image_worker(tokenizer: str, urls: list[str], threads: int, out_dir: str,
                      barrier: Any) -> tuple[float, float, float, int]:
    """(c): decode, encode one image at a time, one int64 .npy per image (LlamaGen-style);
    returns (start, end, CPU seconds, images)."""
    import torch

    from tokenflow.data.corpus import iter_shard
    from tokenflow.data.decode import decode_image, preprocess
    from tokenflow.models.weights import load_tokenizer

    torch.set_num_threads(threads)
    model = load_tokenizer(tokenizer).eval()
    size = model.cfg.image_size
    model.encode(torch.zeros(1, 3, size, size))  # warm-up
    out = Path(out_dir)
    barrier.wait()
    start, cpu, count = time.monotonic(), time.process_time(), 0
    for url in urls:
        for sample in iter_shard(url):
            image = preprocess(decode_image(sample.image), size)
            codes = model.encode(image[None])
            np.save(out / f"{sample.key}.npy", codes.cpu().numpy().astype(np.int64))
            count += 1
    return start, time.monotonic(), time.process_time() - cpu, count


def _parallel(pool: ProcessPoolExecutor, manager: Any, fn: Any, procs: int, threads: int, urls: list[str],
              *args: Any) -> tuple[float, float, list[Any]]:
    """Run ``fn`` on ``procs`` pool processes over round-robin shard groups, started together at
    a barrier; returns (seconds from the first start to the last end, CPU seconds of all,
    per-process results)."""
    barrier = manager.Barrier(procs, timeout=600)
    futures = [pool.submit(fn, args[0], urls[i::procs], threads, *args[1:], barrier) for i in range(procs)]
    results = [f.result() for f in futures]
    return max(r[1] for r in results) - min(r[0] for r in results), sum(r[2] for r in results), results


def _stage_tokens(tokens_dir: Path) -> dict[str, np.ndarray]:
    from tokenflow.data.token_shards import iter_token_samples

    shards = sorted(tokens_dir.glob("shards/*/*.parquet"))
    return {s.key: s.tokens for s in iter_token_samples(str(p) for p in shards)}


def breakdown(tokenizer: str, urls: list[str], scratch: str, batch_size: int, micro_batch: int) -> list[list[Any]]:
    """Where one actor's time goes: the stage's per-image work, one process, 1 thread (CPU time)."""
    import torch

    from tokenflow import storage
    from tokenflow.data.corpus import iter_shard
    from tokenflow.data.decode import decode_image, preprocess, sha256_hex
    from tokenflow.data.manifest import ShardRecord
    from tokenflow.data.shard_encoder import ShardEncoder, token_shard_url
    from tokenflow.data.token_shards import build_token_table, parquet_bytes

    torch.set_num_threads(1)
    encoder = ShardEncoder(tokenizer, scratch, batch_size=batch_size, micro_batch=micro_batch)
    size = encoder.model.cfg.image_size
    encoder.encode_images(torch.zeros(micro_batch, 3, size, size))  # warm-up
    cost = dict.fromkeys(["read tar", "decode + preprocess", "sha256", "encode", "Parquet build, zstd, write"], 0.0)
    images = 0
    for url in urls:
        t0 = time.process_time()
        samples = list(iter_shard(url))
        t1 = time.process_time()
        pixels = [preprocess(decode_image(s.image), size) for s in samples]
        t2 = time.process_time()
        digests = [sha256_hex(s.image) for s in samples]
        t3 = time.process_time()
        tokens = np.concatenate([encoder.encode_images(torch.stack(pixels[i : i + batch_size]))
                                 for i in range(0, len(pixels), batch_size)])
        t4 = time.process_time()
        record = ShardRecord(url, Path(url).name, "webdataset", len(samples), 0, 0, "0" * 64)
        table = build_token_table([s.key for s in samples], tokens, [s.caption for s in samples],
                                  [s.json for s in samples], digests, encoder.info_for(record))
        storage.write_bytes_atomic(token_shard_url(scratch, "breakdown", record.name), parquet_bytes(table))
        t5 = time.process_time()
        for k, dt in zip(cost, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            cost[k] += dt
        images += len(samples)
    total = sum(cost.values())
    return [[k, 1000 * v / images, f"{100 * v / total:.1f}%"] for k, v in cost.items()] + \
        [["total", 1000 * total / images, "100%"]]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--b-images", type=int, default=64, help="images of the TokenFlow-B-shaped case (224 px)")
    p.add_argument("--with-b", action="store_true",
                   help="with --quick: run the TokenFlow-B-shaped case too (a full run always does)")
    args = p.parse_args()
    with_b = args.with_b or not args.quick
    if args.quick:
        args.images, args.shard_size, args.b_images = 64, 16, 8
    header("Pre-tokenize throughput")

    import ray

    from tokenflow.config import load_config
    from tokenflow.stages.pretokenize import pretokenize_corpus

    cfg = load_config(SMOKE).pretokenize
    b_micro, b_shard = (4, 4) if args.quick else (8, 16)
    b_cfg = cfg.model_copy(update={"micro_batch": b_micro, "batch_size": 2 * b_micro})
    ctx = mp.get_context("spawn")
    with work_dir(args.work_dir) as work, ctx.Manager() as manager, \
            ProcessPoolExecutor(2, mp_context=ctx) as pool, CpuSampler() as sampler:
        tiny = _Case(make_corpus(work / "corpus", args.images, args.shard_size),
                     str(make_tiny_tokenizer(work / "tokenizer.safetensors")), cfg)
        n, urls, tokenizer = tiny.images, tiny.urls, tiny.tokenizer
        print(f"corpus: {n} shapes images (64 px PNG) in {len(urls)} webdataset shards; tokenizer: "
              f"tokenflow-tiny, randomly initialised (seed 0), 130 tokens/image, K=512; stage settings "
              f"from {SMOKE.relative_to(REPO)}: batch_size {cfg.batch_size}, micro_batch {cfg.micro_batch}, "
              f"{cfg.num_actors} actors x {cfg.cpus_per_actor:g} CPU, {cfg.compression}\n")
        rows: list[list[Any]] = []
        a_runs, b_runs, cpu_rows = [], [], []

        def record(name: str, setup: str, images: int, seconds: float, cpu: float | None, load: float) -> None:
            rows.append([name, setup, images, seconds, images / seconds if images else "",
                         1000 * cpu / images if images and cpu is not None else "", load])

        def encode_only(case: _Case, label: str = "") -> tuple[float, float, dict[str, np.ndarray]]:
            """(a) on ``case``: (images/s, CPU s/image, tokens by key)."""
            load = os.getloadavg()[0]
            seconds, cpu, results = _parallel(pool, manager, _encode_worker, 2, 1, case.urls, case.tokenizer,
                                              case.cfg.micro_batch, str(work))
            record(f"{label}(a) bare encode, images decoded beforehand", "2 proc x 1 thread", case.images,
                   seconds, cpu, load)
            return case.images / seconds, cpu / case.images, {k: v for r in results for k, v in r[3].items()}

        def stage(run: str, case: _Case, out: Path, images: int, manifest: dict | None = None) -> tuple[float, float]:
            load = os.getloadavg()[0]
            start, wall = time.time(), time.monotonic()
            pretokenize_corpus(manifest or case.manifest, case.tokenizer, str(out), case.cfg)
            seconds, end = time.monotonic() - wall, time.time()
            cpu, actors = sampler.cpu(start, end), sampler.cpu(start, end, "MapWorker")
            driver = sampler.cpu(start, end, pid=os.getpid())
            record(f"(b) pretokenize_corpus, {run}", "2 actors x 1 CPU (1 thread)", images, seconds, cpu, load)
            cpu_rows.append([run, seconds, cpu, actors, driver, cpu - actors - driver])
            return seconds, cpu

        b_work = work / "b-shaped"
        if with_b:
            big = _Case(make_corpus(b_work / "corpus", args.b_images, b_shard, image_size=224),
                        str(pool.submit(make_b_tokenizer, b_work / "tokenizer.safetensors").result()), b_cfg)
            print(f"B-shaped case: {big.images} shapes images (224 px PNG) in {len(big.urls)} webdataset shards; "
                  f"tokenizer: {B_CONFIG.relative_to(REPO)} with semantic_encoder.pretrained cleared, randomly "
                  f"initialised (seed 0), 561 tokens/image, K=32768; stage: batch_size {b_cfg.batch_size}, "
                  f"micro_batch {b_cfg.micro_batch}, {b_cfg.num_actors} actors x {b_cfg.cpus_per_actor:g} CPU\n")
        else:
            print("B-shaped case: skipped (--quick without --with-b); the ratio line has no B_b/a, B_b/a_cpu\n")

        first = encode_only(tiny)
        a_runs.append(first[:2])
        a_tokens = first[2]
        with private_ray(num_cpus=2):
            ray.data.DataContext.get_current().enable_progress_bars = False
            b_runs.append(stage("end to end, run 1", tiny, work / "tokens", n))
            stage("run 1 again: every shard already written (no actors start)", tiny, work / "tokens", 0)
            two, n2 = _first_shards(tiny.manifest, 2)
            short = stage("first 2 shards, end to end (for the fixed cost)", tiny, work / "tokens-2-shards", n2, two)
            if not args.quick:
                b_runs.append(stage("end to end, run 2", tiny, work / "tokens-2", n))
            if with_b:
                b_a, b_a_cpu, b_a_tokens = encode_only(big, "B-shaped ")  # Ray up and idle
                b_b, b_b_cpu = stage("B-shaped, end to end", big, b_work / "tokens", big.images)
        if not args.quick:
            a_runs.append(encode_only(tiny)[:2])
        (work / "npy").mkdir()
        load = os.getloadavg()[0]
        seconds, cpu, _ = _parallel(pool, manager, _per_image_worker, 2, 1, urls, tokenizer, str(work / "npy"))
        record("(c) per-image loop, batch 1, int64 .npy", "2 proc x 1 thread", n, seconds, cpu, load)
        c, c_cpu = n / seconds, cpu / n
        table(["run", "setup", "images", "seconds", "images/s", "CPU ms/image", "load avg (1 min) before"], rows)

        print("Where (b)'s CPU goes (all processes of this script: the private Ray instance, its actors, the "
              "driver):")
        table(["(b) run", "wall s", "CPU s", "encoder actors CPU s", "driver CPU s",
               "other processes CPU s (Ray services, idle pool)"], cpu_rows)

        stage_tokens = _stage_tokens(work / "tokens")
        same_a = len(a_tokens) == n and all(np.array_equal(stage_tokens[k], t) for k, t in a_tokens.items())
        agree_c = np.mean([np.mean(np.load(work / "npy" / f"{k}.npy")[0] == t) for k, t in stage_tokens.items()])
        check_b = ""
        if with_b:
            b_stage_tokens = _stage_tokens(b_work / "tokens")
            same_b = len(b_a_tokens) == big.images and all(np.array_equal(b_stage_tokens[k], t)
                                                           for k, t in b_a_tokens.items())
            check_b = f"; B-shaped stage tokens == B-shaped (a) tokens: {same_b}"
        print(f"check: stage tokens == (a) tokens: {same_a}; (c) batch-1 tokens equal to the stage's: "
              f"{100 * agree_c:.2f}%{check_b}\n")

        shards = urls[: min(2, len(urls))]
        print(f"Where one actor's time goes: the stage's per-image work in one process, 1 thread, "
              f"{len(shards)} shards (CPU time):")
        table(["step", "CPU ms/image", "share"],
              pool.submit(breakdown, tokenizer, shards, str(work), cfg.batch_size, cfg.micro_batch).result())

        # Best of the repeats: highest throughput, and lowest CPU per image.
        a, a_cpu = max(r[0] for r in a_runs), min(r[1] for r in a_runs)
        b_seconds, b_cpu = min(r[0] for r in b_runs), min(r[1] for r in b_runs)
        ratios = {"b/a": n / b_seconds / a, "b/c": n / b_seconds / c, "a/c": a / c,
                  "b/a_cpu": a_cpu * n / b_cpu, "b/c_cpu": c_cpu * n / b_cpu}
        if b_seconds > short[0] and b_cpu > short[1]:  # with --quick the noise can exceed the difference
            steady, steady_cpu = (n - n2) / (b_seconds - short[0]), (b_cpu - short[1]) / (n - n2)
            ratios.update({"b_steady/a": steady / a, "b_steady/c": steady / c, "b_steady/a_cpu": a_cpu / steady_cpu,
                           "b_steady/c_cpu": c_cpu / steady_cpu})
        ratios["b_fixed_s"] = (short[0] * n - b_seconds * n2) / (n - n2)
        if with_b:
            ratios.update({"B_b/a": big.images / b_b / b_a, "B_b/a_cpu": b_a_cpu * big.images / b_b_cpu})
        ratio_line(ratios)


if __name__ == "__main__":
    main()
