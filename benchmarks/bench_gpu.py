"""GPU benchmark: TokenFlow-B encode, pre-tokenize on one GPU, ~1B generator training, sampling.

    benchmarks/gpu.sh [--quick] [--out results.json] [--peak-tflops T] [--encode-batch N] ...

Everything is built randomly initialised from config (nothing is downloaded): the tokenizer from
``configs/models/tokenflow-b.yaml`` with ``pretrained`` cleared, the generator's LM from a
transformers config mapping (a Llama of TinyLlama-1.1B's shape) wrapped in ``NextScaleGenerator``
with the tokenizer's codebook and scales (561 image tokens) as in training. Training
hyper-parameters (AdamW, weight decay, clipping, lr schedule, QK-norm), the sampler and the
pre-tokenize settings come from ``configs/pipelines/tokenflow-b.yaml``. One table, one row each:

- encode, fp32 / bf16: ``TokenFlowTokenizer.encode`` on random images already on the GPU, batch
  ``--encode-batch``, after warm-up, ``torch.cuda.synchronize`` around the timed calls; the
  pre-tokenize stage's CUDA settings (no TF32, deterministic cuDNN); bf16 is ``torch.autocast``.
- pre-tokenize: ``pretokenize_corpus`` (Ray Data, one actor holding the one GPU) over a shapes
  corpus (224 px PNG webdataset shards) written first: end to end (actor start-up included), and
  steady state: the images of the 2nd..last token shard over the time between the first and the
  last shard's write (one actor encodes its shards one after another).
- generator training: a DeepSpeed ZeRO-2 bf16 engine (world size 1) built by the stage's own
  ``engine_for``, on random text ids (128, all valid) and random image tokens; timed steps
  after warm-up steps. Tokens/s counts every sequence position (text, image, end
  marker). MFU: model FLOPs per second over the GPU's dense bf16 peak (``--peak-tflops`` or a
  table by GPU name). Model FLOPs of one sequence of T positions with I image tokens:
  6 (N_lm T + N_head I + N_in (I - 1)) + 12 L d T^2, where N_lm is the weights of the LM's linear
  layers (not the embedding table, not its unused text head), N_head the image head's, N_in the
  image input projection's (every scale after the first), L layers, d = heads x head_dim (the
  block-causal mask is applied densely, so attention is counted over all T^2 pairs); no
  gradient checkpointing, so no recomputation.
- sampling: ``sample_tokens`` (the reference's sampler: CFG ramped over the scales, 3 rounds of
  top-k/top-p per scale after the first) with the trained engine's bf16 module, then
  ``decode_indices`` (fp32), images/s over timed batches after one warm-up batch.

Full mode needs a CUDA device; it is expected to take about 3-4 minutes on one H100 (an estimate,
not yet measured; the budget is 8): imports and model builds ~40 s, encode ~15 s, the corpus
(4,096 images) ~25 s, pre-tokenize ~60 s, LM build and DeepSpeed set-up ~40 s, 25 training
steps ~15 s, sampling ~20 s. ``--quick`` runs tiny sizes (tokenflow-tiny, a 2-layer Llama, 1-2
steps) on whatever device there is, CPU included, to exercise every path; its numbers mean
nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from benchmarks.common import REPO, header, parser, private_ray, table, work_dir

log = logging.getLogger("benchmarks.gpu")

PIPELINE = REPO / "configs" / "pipelines" / "tokenflow-b.yaml"
DEEPSPEED = "zero2-bf16"
MEASUREMENTS = ("encode, fp32", "encode, bf16 autocast", "pre-tokenize, end to end", "pre-tokenize, steady state",
                "generator training", "generator training, image tokens", "generator training MFU",
                "sampling + decode")
# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), matched in this order
# against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0))
CPU_PLACEHOLDER_TFLOPS = 1.0
# TinyLlama-1.1B's shape (22 layers x 2048, grouped-query attention), Llama-2's vocabulary size.
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
            "tie_word_embeddings": False}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "tie_word_embeddings": False}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode measures: models, batch sizes, step and call counts."""

    tokenizer: str  # configs/models/<name>.yaml
    lm: dict[str, Any]  # transformers config of the generator's LM (vocabulary size apart)
    vocab: int
    encode_batch: int
    encode_warmup: int
    encode_calls: int
    images: int  # shapes corpus to pre-tokenize
    shard_size: int
    image_size: int
    pretokenize: dict[str, Any]  # overrides of the B pipeline's pretokenize settings
    micro_batch: int
    text_tokens: int
    warmup_steps: int
    steps: int
    sample_batch: int
    sample_batches: int


FULL = Sizes("tokenflow-b", LLAMA_1B, 32000, encode_batch=64, encode_warmup=2, encode_calls=10, images=4096,
             shard_size=256, image_size=224, pretokenize={}, micro_batch=16, text_tokens=128, warmup_steps=5,
             steps=20, sample_batch=16, sample_batches=2)
QUICK = Sizes("tokenflow-tiny", TINY_LLAMA, 512, encode_batch=2, encode_warmup=1, encode_calls=1, images=32,
              shard_size=16, image_size=64, pretokenize={"batch_size": 16, "micro_batch": 16}, micro_batch=2,
              text_tokens=8, warmup_steps=1, steps=2, sample_batch=2, sample_batches=1)


class Row(NamedTuple):
    measurement: str
    setting: str
    value: float
    unit: str


def peak_tflops(device_name: str | None, given: float | None) -> tuple[float, str]:
    """The dense bf16 peak (TFLOP/s) and where it comes from: ``given``, the table by GPU name, or
    (CPU, quick mode only) a placeholder. Raises ``SystemExit`` for a GPU not in the table."""
    if given is not None:
        return given, "--peak-tflops"
    if device_name is None:
        return CPU_PLACEHOLDER_TFLOPS, "placeholder: CPU has no bf16 peak here"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops, f"dense bf16 peak of {key}"
    raise SystemExit(f"no bf16 peak known for {device_name!r}: pass --peak-tflops")


def millions(count: int) -> str:
    """A parameter count in millions: ``1,100M``."""
    return f"{count / 1e6:,.{0 if count >= 1e7 else 2}f}M"


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, calls: int, device: Any) -> float:
    """Seconds taken by ``calls`` calls of ``fn`` after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def build_tokenizer(sizes: Sizes, path: Path) -> Any:
    """The tokenizer, randomly initialised from its config (seed 0, no teacher), saved to ``path``
    as the inference export the pre-tokenize stage loads; returned on the CPU."""
    import torch

    from tokenflow.config import load_config
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.models.weights import save_tokenizer

    cfg = load_config(REPO / "configs" / "models" / f"{sizes.tokenizer}.yaml",
                      ["tokenizer.semantic_encoder.pretrained=null"]).tokenizer
    torch.manual_seed(0)
    model = TokenFlowTokenizer(cfg, with_teacher=False)
    save_tokenizer(model, path, include_teacher=False)
    return model.eval()


def encode_rows(tokenizer: Any, sizes: Sizes, device: Any) -> list[Row]:
    """Encode images/s at fp32 and under bf16 autocast."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # as the pre-tokenize stage (allow_tf32: false)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    size = tokenizer.cfg.image_size
    images = torch.rand(sizes.encode_batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    setting = (f"{tokenizer.cfg.name}, {size} px, {tokenizer.num_tokens} tokens, batch {sizes.encode_batch}, "
               f"{sizes.encode_calls} calls after {sizes.encode_warmup}, images on the device")
    rows = []
    for name, autocast in (("encode, fp32", False), ("encode, bf16 autocast", True)):
        context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            seconds = timed(lambda: tokenizer.encode(images), sizes.encode_warmup, sizes.encode_calls, device)
        rows.append(Row(name, setting + ("" if autocast else ", no TF32"),
                        sizes.encode_batch * sizes.encode_calls / seconds, "images/s"))
        log.info("%s: %.1f images/s", name, rows[-1].value)
    return rows


def write_corpus(sizes: Sizes, out: Path) -> dict[str, Any]:
    """A shapes corpus (webdataset tars, no held-out split) and its manifest."""
    from tokenflow.config import CorpusConfig, ShapesCorpusConfig
    from tokenflow.stages.corpus import build_corpus

    if sizes.images < 2 * sizes.shard_size:
        raise SystemExit("the steady-state rate needs at least 2 shards: images >= 2 x shard size")
    shapes = ShapesCorpusConfig(num_samples=sizes.images, shard_size=sizes.shard_size, seed=0,
                                heldout_fraction=0.0, image_size=sizes.image_size)
    return build_corpus(CorpusConfig(shapes=shapes), str(out))


def steady_rate(tokens_dir: Path, manifest: dict[str, Any]) -> float:
    """Images/s of the 2nd..last token shard, from the times the shards were written."""
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    written = sorted(((tokens_dir / s["path"]).stat().st_mtime, s["rows"]) for s in shards)
    seconds = written[-1][0] - written[0][0]
    if seconds <= 0:
        raise RuntimeError("the token shards were written at the same time: too few images to time")
    return sum(rows for _, rows in written[1:]) / seconds


def pretokenize_rows(sizes: Sizes, base: Any, tokenizer_path: Path, work: Path, device: Any) -> list[Row]:
    """The pre-tokenize stage (settings ``base`` for one actor) through Ray Data, on the GPU when
    there is one."""
    import ray

    from tokenflow.stages.pretokenize import pretokenize_corpus

    corpus = write_corpus(sizes, work / "corpus")
    n = corpus["splits"]["train"]["samples"]
    cpus = os.cpu_count() or 1
    gpus = 1.0 if device.type == "cuda" else 0.0
    cfg = base.model_copy(update={"num_actors": 1, "gpus_per_actor": gpus,
                                  "cpus_per_actor": min(base.cpus_per_actor, cpus), **sizes.pretokenize})
    with private_ray(num_cpus=cpus):
        ray.data.DataContext.get_current().enable_progress_bars = False
        if ray.cluster_resources().get("GPU", 0) < gpus:
            raise RuntimeError(f"Ray sees no GPU: {ray.cluster_resources()}")
        start = time.perf_counter()
        manifest = pretokenize_corpus(corpus, str(tokenizer_path), str(work / "tokens"), cfg)
        seconds = time.perf_counter() - start
    shards = len(corpus["splits"]["train"]["shards"])
    setting = (f"Ray Data, 1 actor x {cfg.cpus_per_actor:g} CPU x {gpus:g} GPU, batch {cfg.batch_size}, micro-batch "
               f"{cfg.micro_batch}, {'TF32' if cfg.allow_tf32 else 'no TF32'}; {n} shapes images "
               f"({sizes.image_size} px PNG) in {shards} shards")
    rows = [Row("pre-tokenize, end to end", f"{setting}, actor start-up included ({seconds:.1f} s)", n / seconds,
                "images/s"),
            Row("pre-tokenize, steady state", f"{setting}, shards 2..{shards} from their write times",
                steady_rate(work / "tokens", manifest), "images/s")]
    log.info("pre-tokenize: %.1f images/s end to end, %.1f steady", rows[0].value, rows[1].value)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_single_process_group(device: Any) -> None:
    """A process group of one (nccl on CUDA, gloo on CPU) for the DeepSpeed engine."""
    import torch

    from tokenflow.train.engines import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)


def build_generator(sizes: Sizes, tokenizer: Any, qk_norm: bool, device: Any) -> Any:
    """The LM (random init, seed 0) in ``NextScaleGenerator`` with the tokenizer's codebook; the
    last two vocabulary ids serve as the image start and end markers."""
    import torch

    from tokenflow.config import LanguageModelConfig
    from tokenflow.models.generator import NextScaleGenerator
    from tokenflow.models.language_model import build_language_model
    from tokenflow.models.quantizer import CodebookFeatures

    torch.manual_seed(0)
    lm = build_language_model(LanguageModelConfig(architecture=sizes.lm), sizes.vocab)
    codebook = CodebookFeatures.from_quantizer(tokenizer.quantizer)
    return NextScaleGenerator(lm, codebook, sizes.vocab - 2, sizes.vocab - 1, qk_norm).to(device)


def linear_weights(module: Any, skip: Any = None) -> int:
    """Weights of the linear layers in ``module`` (but ``skip``)."""
    from torch import nn

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear) and m is not skip)


def flops_per_sample(model: Any, seq_len: int) -> float:
    """Training model FLOPs of one sequence: 6 x (each linear layer's weights x the positions it
    runs on) + 12 L d T^2 for attention (see the module docstring)."""
    lm, image = model.lm, model.codebook.num_tokens
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    matmul = (linear_weights(lm, skip=lm.get_output_embeddings()) * seq_len + linear_weights(model.image_head) * image
              + linear_weights(model.image_inputs) * (image - model.scales[0] ** 2))
    return 6.0 * matmul + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len**2


def random_prompts(batch: int, length: int, vocab: int, device: Any, generator: Any) -> Any:
    """Random text ids (never the image markers), every position valid."""
    import torch

    from tokenflow.models.generator import TextBatch

    ids = torch.randint(0, vocab - 2, (batch, length), generator=generator)
    return TextBatch(ids.to(device), torch.ones(batch, length, dtype=torch.bool, device=device))


def train_rows(sizes: Sizes, base: Any, model: Any, device: Any, peak: tuple[float, str]) -> tuple[list[Row], Any]:
    """Tokens/s and MFU of the ZeRO-2 engine (the stage settings ``base`` with this LM and batch);
    returns the rows and the engine."""
    import torch

    from tokenflow.config import LanguageModelConfig
    from tokenflow.train.llm_common import engine_for

    lm_cfg = LanguageModelConfig(architecture=sizes.lm, max_text_tokens=sizes.text_tokens)
    t = base.model_copy(update={
        "language_model": lm_cfg, "micro_batch_size": sizes.micro_batch, "grad_accum": 1, "deepspeed": DEEPSPEED})
    engine = engine_for(model, t, [p for p in model.parameters() if p.requires_grad], t.lr,
                        sizes.warmup_steps + sizes.steps)
    generator = torch.Generator().manual_seed(0)
    codebook = model.codebook
    text = random_prompts(sizes.micro_batch, sizes.text_tokens, sizes.vocab, device, generator)
    tokens = torch.randint(0, codebook.codebook_size, (sizes.micro_batch, codebook.num_tokens),
                           generator=generator).to(device)
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        out = engine(text, tokens)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach())

    seconds = timed(step, sizes.warmup_steps, sizes.steps, device)
    if not all(torch.isfinite(loss) for loss in losses):
        raise RuntimeError(f"non-finite training loss: {[float(x) for x in losses]}")
    seq_len = sizes.text_tokens + codebook.num_tokens + 1
    tokens_per_s = sizes.micro_batch * seq_len * sizes.steps / seconds
    lm = model.lm.config
    memory = (f"; peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
              if device.type == "cuda" else "")
    setting = (f"Llama {millions(sum(p.numel() for p in model.lm.parameters()))} ({lm.num_hidden_layers} x "
               f"{lm.hidden_size}) + image head K={codebook.codebook_size}, micro-batch {sizes.micro_batch} x "
               f"{seq_len} positions ({sizes.text_tokens} text + {codebook.num_tokens} image + 1), {DEEPSPEED}, "
               f"world size 1, {sizes.steps} steps after {sizes.warmup_steps}{memory}")
    achieved = flops_per_sample(model, seq_len) * tokens_per_s / seq_len / 1e12
    rows = [Row("generator training", setting, tokens_per_s, "tokens/s"),
            Row("generator training, image tokens", "as above, image positions only",
                tokens_per_s * codebook.num_tokens / seq_len, "tokens/s"),
            Row("generator training MFU", f"model FLOPs/s over peak, 6 x weights x positions + 12 L d T^2 per "
                f"sequence, T = {seq_len}: {achieved:.3g} TFLOP/s of {peak[0]:g} ({peak[1]})",
                100 * achieved / peak[0], "%")]
    log.info("training: %.0f tokens/s, MFU %.1f%%", tokens_per_s, rows[2].value)
    return rows, engine


def sampling_row(sizes: Sizes, cfg: Any, model: Any, tokenizer: Any, device: Any) -> Row:
    """Images/s of ``sample_tokens`` (sampling settings ``cfg``) then ``decode_indices``."""
    import torch

    from tokenflow.models.generator import TextBatch
    from tokenflow.models.sampling import sample_tokens

    model.eval()
    text = random_prompts(sizes.sample_batch, sizes.text_tokens, sizes.vocab, device, torch.Generator().manual_seed(1))
    empty = TextBatch(torch.ones(1, 1, dtype=torch.long, device=device),  # the empty prompt: BOS (id 1) alone
                      torch.ones(1, 1, dtype=torch.bool, device=device))
    draws = torch.Generator(device=device).manual_seed(0)
    n = sizes.sample_batches
    tokens = sample_tokens(model, text, empty, cfg, draws)  # warm-up
    sampling = timed(lambda: sample_tokens(model, text, empty, cfg, draws), 0, n, device)
    decoding = timed(lambda: tokenizer.decode_indices(tokens), 1, n, device)
    images, seconds = sizes.sample_batch * n, sampling + decoding
    setting = (f"batch {sizes.sample_batch}, CFG {cfg.cfg_scale:g} ramped, top-k {list(cfg.top_k)}, top-p "
               f"{list(cfg.top_p)}, {len(model.scales)} scales, generator bf16, decode fp32; per batch "
               f"{sampling / n:.2f} s sampling + {decoding / n:.2f} s decode, {n} batches after 1")
    log.info("sampling + decode: %.2f images/s", images / seconds)
    return Row("sampling + decode", setting, images / seconds, "images/s")


def environment(device: Any) -> dict[str, str]:
    """The device and the versions that decide the numbers."""
    import deepspeed
    import torch
    import transformers

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "cudnn": str(torch.backends.cudnn.version()), "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


def with_flags(sizes: Sizes, args: Any) -> Sizes:
    """``sizes`` with the sizes given on the command line."""
    given = {"encode_batch": args.encode_batch, "micro_batch": args.train_micro_batch,
             "sample_batch": args.sample_batch, "steps": args.steps, "images": args.images}
    return dataclasses.replace(sizes, **{k: v for k, v in given.items() if v is not None})


def measure(sizes: Sizes, work: Path, device: Any, peak: tuple[float, str]) -> list[Row]:
    """Every row of the table, in order."""
    import torch

    from tokenflow.config import load_config

    pipeline = load_config(PIPELINE)
    tokenizer_path = work / "tokenizer.safetensors"
    tokenizer = build_tokenizer(sizes, tokenizer_path).to(device)
    rows = encode_rows(tokenizer, sizes, device)
    rows += pretokenize_rows(sizes, pipeline.pretokenize, tokenizer_path, work, device)
    join_single_process_group(device)
    try:
        model = build_generator(sizes, tokenizer, pipeline.train_generator.qk_norm, device)
        train, engine = train_rows(sizes, pipeline.train_generator, model, device, peak)
        rows += train
        rows.append(sampling_row(sizes, pipeline.train_generator.sampling, engine.module, tokenizer, device))
    finally:
        torch.distributed.destroy_process_group()
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", help="also write the results as JSON to this path (gpu.sh runs from the repository root)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: a table by GPU name)")
    p.add_argument("--encode-batch", type=int, help="images per encode call")
    p.add_argument("--train-micro-batch", type=int, help="generator training samples per step")
    p.add_argument("--sample-batch", type=int, help="prompts per sampling batch")
    p.add_argument("--steps", type=int, help="timed generator training steps")
    p.add_argument("--images", type=int, help="shapes images to pre-tokenize")
    args = p.parse_args()
    start = time.perf_counter()

    import torch

    if not args.quick and not torch.cuda.is_available():
        sys.exit("no CUDA device here: the full GPU benchmark needs one (--quick runs tiny sizes on any device, "
                 "the CPU included)")
    # An explicit index: torch.cuda.set_device refuses a bare "cuda".
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    os.environ["DS_ACCELERATOR"] = device.type  # DeepSpeed's engine goes where the benchmark runs
    peak = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, args.peak_tflops)
    sizes = with_flags(QUICK if args.quick else FULL, args)
    header("GPU benchmark: TokenFlow-B encode, pre-tokenize, ~1B generator training and sampling"
           + (" (--quick: tiny sizes, numbers meaningless)" if args.quick else ""))
    env = environment(device)
    print("; ".join(f"{k}: {v}" for k, v in env.items()) + "\n")
    with work_dir(args.work_dir) as work:
        rows = measure(sizes, work, device, peak)
    table(Row._fields, rows)
    wall = time.perf_counter() - start
    print(f"wall: {wall:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.orig_argv), "quick": args.quick, **env,
                                              "wall_s": wall, "rows": [r._asdict() for r in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
