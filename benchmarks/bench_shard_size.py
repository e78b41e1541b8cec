"""Token storage: our Parquet token shards vs one int64 .npy per image vs the information bound.

    python -m benchmarks.bench_shard_size [--quick] [--work-dir DIR]

Real tokens: the token shards that ``bench_pretokenize`` wrote into ``DIR/tokens`` (tiny
tokenizer, randomly initialised, on the shapes corpus); without them, a corpus and its shards are
made here with ``ShardEncoder`` (the stage's own per-shard code). The .npy baseline holds the same
tokens, one ``np.save`` of an int64 [1, T] array per image (LlamaGen-style).

Synthetic tokens: uniformly random indices for the tiny (130 tokens, K 512), TokenFlow-B (561,
K 32768) and XL (2227, K 32768) token counts, written through the same
``build_token_table``/``parquet_bytes`` (zstd), one file of 250 rows (a smoke-corpus shard) and
one of 2,000. Random tokens are the incompressible worst case:
real tokens repeat (the shapes corpus's white backgrounds compress very well).

"tokens column" is the Parquet column chunk of ``tokens`` (compressed, summed over row groups);
"file" is the whole Parquet file (key, image sha256, caption, json and the footer included).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import header, make_corpus, make_tiny_tokenizer, parser, ratio_line, table, work_dir

log = logging.getLogger("benchmarks.shard_size")

NPY_DIR = "npy-size"
TINY_SCALES = (1, 2, 3, 4, 6, 8)
B_SCALES = (1, 2, 4, 6, 8, 10, 12, 14)
XL_SCALES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27)


def _tokens_column_bytes(path: Path) -> int:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(g).column(c).total_compressed_size
               for g in range(meta.num_row_groups) for c in range(meta.num_columns)
               if meta.row_group(g).column(c).path_in_schema.startswith("tokens."))


def _ensure_token_shards(work: Path, images: int, shard_size: int) -> Path:
    """``work/tokens`` from bench_pretokenize, or shards made here with the stage's ShardEncoder."""
    from tokenflow.data.manifest import shard_records
    from tokenflow.data.shard_encoder import ShardEncoder

    out = work / "tokens"
    if not (out / "_MANIFEST.json").exists():
        manifest = make_corpus(work / "corpus", images, shard_size)
        tokenizer = make_tiny_tokenizer(work / "tokenizer.safetensors")
        encoder = ShardEncoder(str(tokenizer), str(out), batch_size=64, micro_batch=16)
        for record in shard_records(manifest, "train"):
            encoder.encode_shard(record, "train")
    return out


def _npy_sizes(tokens: np.ndarray, out: Path) -> tuple[int, int]:
    """Apparent and on-disk bytes of one int64 .npy per row of ``tokens``."""
    out.mkdir(parents=True, exist_ok=True)
    apparent = disk = 0
    for i, row in enumerate(tokens):
        path = out / f"{i:08d}.npy"
        np.save(path, row.astype(np.int64)[None])
        st = path.stat()
        apparent, disk = apparent + st.st_size, disk + st.st_blocks * 512
        path.unlink()
    return apparent, disk


def _row(name: str, rows: int, num_tokens: int, codebook: int, file_bytes: int, column_bytes: int,
         npy: tuple[int, int]) -> list[Any]:
    per_token = rows * num_tokens
    return [name, rows, num_tokens, codebook, file_bytes / rows, column_bytes / rows, column_bytes / per_token,
            npy[0] / rows, npy[1] / rows, math.log2(codebook) / 8, npy[0] / column_bytes]


def measure_real(tokens_dir: Path, scratch: Path) -> list[Any]:
    from tokenflow.data.token_shards import iter_token_samples, read_shard_info

    shards = sorted(tokens_dir.glob("shards/*/*.parquet"))
    info = read_shard_info(str(shards[0]))
    tokens = np.stack([s.tokens for s in iter_token_samples(str(p) for p in shards)])
    return _row(f"tiny, real tokens: stage output ({len(shards)} files)", len(tokens), info.num_tokens,
                info.codebook_size, sum(p.stat().st_size for p in shards),
                sum(_tokens_column_bytes(p) for p in shards), _npy_sizes(tokens, scratch))


def measure_random(name: str, rows: int, scales: tuple[int, ...], codebook: int, scratch: Path) -> list[Any]:
    from tokenflow.data.token_shards import TokenShardInfo, build_token_table, parquet_bytes

    rng = np.random.default_rng(0)
    info = TokenShardInfo(scales=scales, codebook_size=codebook, tokenizer_digest="0" * 64,
                          encoding_hash="0" * 64, source_shard="synthetic.tar", source_sha256="0" * 64)
    tokens = rng.integers(0, codebook, (rows, info.num_tokens), dtype=np.int64)
    digests = [rng.bytes(32).hex() for _ in range(rows)]
    table_ = build_token_table([f"sample-{i:08d}" for i in range(rows)], tokens, [None] * rows, [None] * rows,
                               digests, info)
    path = scratch / f"{name.split(',')[0]}-{rows}.parquet"
    path.write_bytes(parquet_bytes(table_, "zstd"))
    return _row(f"{name} (1 file)", rows, info.num_tokens, codebook, path.stat().st_size, _tokens_column_bytes(path),
                _npy_sizes(tokens, scratch / NPY_DIR))


def main() -> None:
    args = parser(__doc__).parse_args()
    header("Token shard size")
    small, large = (20, 50) if args.quick else (250, 2000)
    with work_dir(args.work_dir) as work:
        scratch = work / "shard-size"
        scratch.mkdir(exist_ok=True)
        tokens_dir = _ensure_token_shards(work, 32 if args.quick else 1000, 16 if args.quick else 250)
        rows = [measure_real(tokens_dir, scratch / NPY_DIR)]
        for rows_per_file in (small, large):
            rows.append(measure_random("tiny, random tokens", rows_per_file, TINY_SCALES, 512, scratch))
            rows.append(measure_random("B, random tokens", rows_per_file, B_SCALES, 32768, scratch))
            rows.append(measure_random("XL, random tokens", rows_per_file, XL_SCALES, 32768, scratch))
        print(f"Parquet: zstd (the stage default); .npy: int64 [1, T] per image; disk block size "
              f"{os.statvfs(str(scratch)).f_bsize} B\n")
        table(["tokens", "images", "tokens/img", "K", "Parquet file B/img", "tokens column B/img",
               "tokens column B/token", ".npy B/img", ".npy on disk B/img", "bound log2(K)/8 B/token",
               ".npy / tokens column"], rows)
        real, b_random = rows[0], rows[2]  # B: the smaller shard, the worse case
        ratio_line({"tiny_real_B_per_token/2": real[6] / 2, "tiny_real_npy/parquet": real[10],
                    "B_random_B_per_token/2": b_random[6] / 2, "B_random_npy/parquet": b_random[10],
                    "B_random_B_per_token/bound": b_random[6] / b_random[9]})


if __name__ == "__main__":
    main()
