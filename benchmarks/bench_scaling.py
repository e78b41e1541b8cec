"""Scaling sketch: pre-tokenizing 100M images at TokenFlow-B and XL token counts on N GPUs.

    python -m benchmarks.bench_scaling [--quick] [--images 1e8] [--utilization 0.4]

No GPU is available here, so the GPU encode rate is an assumption, derived from a FLOP count:
the B and XL tokenizers are built randomly from their configs (``pretrained: null``) and
``TokenFlowTokenizer.encode`` of one image is run on the meta device under
``torch.utils.flop_counter.FlopCounterMode`` (matmul and convolution FLOPs). That count is divided
into an assumed effective GPU rate: H100 SXM peak (NVIDIA H100 datasheet: FP32 67 TFLOP/s, TF32
Tensor Core 495 TFLOP/s dense) times an assumed utilisation (``--utilization``, default 40%).
The stage's default ``allow_tf32: false`` makes the encode FP32 on CUDA cores.

Measured here, per image, on one CPU core: decoding + preprocessing an ImageNet-sized JPEG
(500x375, quality 90, cut from scikit-image's bundled photographs) to the model's input size,
its sha256, and building + writing the token shard (uniformly random tokens: the incompressible
worst case, 1,000 rows per file). As built, a pretokenize actor does that CPU work serially with
its GPU encode (one CPU per actor), so its rate is 1 / (CPU time + GPU time); "encode-bound" is
what a GPU would give with decoding moved onto other cores (not built).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from benchmarks.common import REPO, header, parser, ratio_line, table

log = logging.getLogger("benchmarks.scaling")

MODELS = {"B": "tokenflow-b", "XL": "tokenflow-xl"}
PEAK_TFLOPS = {"fp32": 67.0, "tf32": 495.0}  # H100 SXM, dense (NVIDIA H100 datasheet)
GPUS = (8, 64, 256)
JPEG_SIZE = (500, 375)  # about the mean ImageNet photo
NPY_HEADER = 128  # bytes: np.save header of a small int64 array


def model_facts(config_name: str) -> dict[str, Any]:
    """Matmul + convolution FLOPs of ``encode`` for one image (on the meta device), tokens per
    image, codebook size, scales and input size of a model config."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tokenflow.config import load_config
    from tokenflow.models.tokenizer import TokenFlowTokenizer

    cfg = load_config(REPO / "configs" / "models" / f"{config_name}.yaml",
                      ["tokenizer.semantic_encoder.pretrained=null"]).tokenizer
    model = TokenFlowTokenizer(cfg, with_teacher=False).eval().to("meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model.encode(torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta"))
    q = cfg.quantizer
    return {"flops": float(counter.get_total_flops()), "tokens": q.num_tokens, "K": q.codebook_size,
            "scales": tuple(q.scales), "size": cfg.image_size}


def _jpegs() -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize(JPEG_SIZE, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def cpu_costs(image_size: int, scales: tuple[int, ...], codebook: int, repeats: int, rows: int) -> dict[str, float]:
    """Seconds per image on one core: decode + preprocess, sha256, token shard build + write;
    and the token shard's bytes per image."""
    import torch

    from tokenflow.data.decode import decode_image, preprocess, sha256_hex
    from tokenflow.data.token_shards import TokenShardInfo, build_token_table, parquet_bytes

    torch.set_num_threads(1)
    jpegs = _jpegs()
    preprocess(decode_image(jpegs[0]), image_size)  # warm-up
    start = time.perf_counter()
    for i in range(repeats):
        preprocess(decode_image(jpegs[i % len(jpegs)]), image_size)
    decode = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for i in range(repeats):
        sha256_hex(jpegs[i % len(jpegs)])
    sha = (time.perf_counter() - start) / repeats

    info = TokenShardInfo(scales=scales, codebook_size=codebook, tokenizer_digest="0" * 64,
                          encoding_hash="0" * 64, source_shard="synthetic.tar", source_sha256="0" * 64)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, codebook, (rows, info.num_tokens))
    digests = [rng.bytes(32).hex() for _ in range(rows)]
    start = time.perf_counter()
    blob = parquet_bytes(build_token_table([f"sample-{i:08d}" for i in range(rows)], tokens, [None] * rows,
                                           [None] * rows, digests, info))
    write = (time.perf_counter() - start) / rows
    return {"decode": decode, "sha": sha, "write": write, "bytes": len(blob) / rows}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=float, default=1e8)
    p.add_argument("--utilization", type=float, default=0.4, help="assumed fraction of GPU peak reached")
    args = p.parse_args()
    header("Scaling sketch: pre-tokenize wall time and storage")
    repeats, rows = (8, 50) if args.quick else (200, 1000)

    measured: dict[str, dict[str, Any]] = {}
    for short, name in MODELS.items():
        facts = model_facts(name)
        measured[short] = {**facts, **cpu_costs(facts["size"], facts["scales"], facts["K"], repeats, rows)}
    print(f"Measured here (CPU, 1 core; JPEG {JPEG_SIZE[0]}x{JPEG_SIZE[1]} q90; random tokens, {rows} rows/file):")
    table(["model", "tokens/img", "K", "input px", "encode GFLOP/img", "decode+preprocess ms/img",
           "sha256 ms/img", "token shard build+write ms/img", "token shard B/img", ".npy int64 B/img"],
          [[k, m["tokens"], m["K"], m["size"], m["flops"] / 1e9, 1e3 * m["decode"], 1e3 * m["sha"],
            1e3 * m["write"], m["bytes"], NPY_HEADER + 8 * m["tokens"]] for k, m in measured.items()])

    u = args.utilization
    print(f"Assumed GPU: H100 SXM at {u:.0%} of its dense peak (FP32 {PEAK_TFLOPS['fp32']:g} TFLOP/s: the "
          f"stage default, allow_tf32: false; TF32 {PEAK_TFLOPS['tf32']:g} TFLOP/s: allow_tf32: true); one "
          "pretokenize actor (1 CPU) per GPU; storage and network keep up (input GB/s assumes 110 KB per JPEG).")
    rows_out, ratios = [], {}
    for short, m in measured.items():
        cpu = m["decode"] + m["sha"] + m["write"]
        npy = NPY_HEADER + 8 * m["tokens"]
        ratios[f"{short}_npy/parquet"] = npy / m["bytes"]
        for prec, peak in PEAK_TFLOPS.items():
            encode = u * peak * 1e12 / m["flops"]  # images/s of one GPU, encode only
            as_built = 1.0 / (cpu + 1.0 / encode)
            ratios[f"{short}_{prec}_as_built/encode_bound"] = as_built / encode
            for n in GPUS:
                rows_out.append([short, prec.upper(), n, as_built, args.images / (n * as_built) / 3600, encode,
                                 args.images / (n * encode) / 3600, encode * cpu, n * as_built * 110e3 / 1e9,
                                 args.images * m["bytes"] / 1e12, args.images * npy / 1e12])
    table(["model", "encode precision", "GPUs", "as built img/s/GPU", "as built hours", "encode-bound img/s/GPU",
           "encode-bound hours", "CPU cores/GPU to feed encode-bound", "as built input GB/s", "Parquet TB",
           ".npy TB"], rows_out)
    print(f"Images: {args.images:,.0f}. Hours exclude start-up; storage is tokens + key + sha256 "
          "(captions extra); encode-bound means decoding moved off the actor's CPU (not built).\n")
    ratio_line(ratios)


if __name__ == "__main__":
    main()
