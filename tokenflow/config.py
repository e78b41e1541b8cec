"""Typed configuration: YAML files, includes, dotted overrides, validation and a stable hash.

A config file is a YAML mapping. It may name other files under ``include:`` (paths relative to
the including file); those are merged first, in order, then the file's own keys on top, then
``--set a.b.c=value`` overrides. The merged mapping is validated into :class:`TokenFlowConfig`
before anything runs; unknown keys, wrong types and impossible values raise
:class:`ConfigError` with the dotted path of every offending field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INCLUDE_KEY = "include"
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
# Filled in from each training stage's own settings, never from the DeepSpeed file.
DEEPSPEED_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                        "gradient_accumulation_steps", "gradient_clipping", "optimizer", "scheduler")


class ConfigError(ValueError):
    """A configuration that cannot be loaded or does not validate."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# --------------------------------------------------------------------------- tokenizer model


class SemanticEncoderConfig(StrictModel):
    """The pretrained vision tower that gives the semantic latent (and its frozen teacher copy)."""

    backend: Literal["open_clip", "transformers"]
    arch: str = Field(description="open_clip model name (e.g. ViT-B-16) or transformers model_type")
    pretrained: str | None = Field(
        default=None,
        description="Weights: a local path, an open_clip pretrained tag or a hub id. "
        "None builds the architecture randomly initialised (tests, smoke).",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture fields replacing the named arch's defaults (open_clip vision_cfg "
        "keys or transformers config keys); used to build small towers from config.",
    )
    patch_size: int = Field(gt=0, description="Token stride of the tower: grid = image_size // patch_size.")
    feature_layer: int = Field(
        -1, description="transformers towers: which hidden state gives the tokens (-2: penultimate)."
    )
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class PixelCodecConfig(StrictModel):
    """VQGAN-style convolutional encoder/decoder."""

    ch: int = Field(128, gt=0)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = Field(2, gt=0)
    z_channels: int = Field(256, gt=0)
    attn_at_bottom: bool = True
    decoder_ch: int | None = Field(
        default=None, description="Decoder base width; wider than ch gives the 'enhanced' decoder."
    )
    decoder_num_res_blocks: int | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class QuantizerConfig(StrictModel):
    """Shared-mapping multi-scale residual quantizer."""

    codebook_size: int = Field(gt=1)
    semantic_dim: int = Field(32, gt=0)
    pixel_dim: int = Field(8, gt=0)
    scales: tuple[int, ...]
    pixel_distance_weight: float = Field(1.0, ge=0.0)
    beta: float = Field(0.25, ge=0.0, description="Commitment loss weight.")
    scale_drop_prob: float = Field(0.1, ge=0.0, le=1.0)
    usage_window: int = Field(100, gt=0, description="Batches over which codebook usage is tracked.")

    @model_validator(mode="after")
    def _scales_increase(self) -> "QuantizerConfig":
        if not self.scales:
            raise ValueError("scales must list at least one scale")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {list(self.scales)}")
        if any(b <= a for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"scales must be strictly increasing, got {list(self.scales)}")
        return self

    @property
    def num_tokens(self) -> int:
        """Tokens per image: the sum of s*s over all scales."""
        return sum(s * s for s in self.scales)

    @property
    def feature_dim(self) -> int:
        return self.semantic_dim + self.pixel_dim


class SemanticDecoderConfig(StrictModel):
    """Small ViT from the quantized semantic codes to the teacher's feature space."""

    depth: int = Field(3, gt=0)
    width: int = Field(768, gt=0)
    heads: int = Field(12, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "SemanticDecoderConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class PerceptualConfig(StrictModel):
    """LPIPS-style perceptual loss on a VGG16 backbone; weights come from configured files."""

    enabled: bool = True
    backbone_weights: str | None = Field(
        default=None, description="torchvision vgg16 state dict (.pth or .safetensors)."
    )
    linear_weights: str | None = Field(
        default=None, description="LPIPS linear-layer weights (the lpips package's vgg.pth format)."
    )

    @model_validator(mode="after")
    def _weights_named(self) -> "PerceptualConfig":
        if self.enabled and not (self.backbone_weights and self.linear_weights):
            raise ValueError(
                "perceptual loss is enabled but backbone_weights/linear_weights are not set; "
                "point them at the VGG16 and LPIPS weight files, or set enabled: false"
            )
        return self


class DiscriminatorConfig(StrictModel):
    """Hinge PatchGAN discriminator."""

    ndf: int = Field(64, gt=0)
    n_layers: int = Field(3, gt=0)
    start_step: int = Field(20000, ge=0)


class LossWeightsConfig(StrictModel):
    l2: float = Field(1.0, ge=0.0)
    perceptual: float = Field(1.0, ge=0.0)
    gan: float = Field(0.5, ge=0.0)
    semantic: float = Field(1.0, ge=0.0)
    vq: float = Field(1.0, ge=0.0)


class TokenizerView(StrictModel):
    """A trained tokenizer used at another resolution, as the reference's text-to-image model
    uses TokenFlow-B (trained at 224 px, 14x14) at 256 px with a 16x16 last scale: the image size
    and scales replace the trained ones and the position embeddings are interpolated."""

    image_size: int = Field(gt=0)
    scales: tuple[int, ...]


class TokenizerConfig(StrictModel):
    """The whole TokenFlow tokenizer."""

    name: str
    image_size: int = Field(gt=0)
    pixel_image_size: int | None = Field(
        default=None,
        description="Resolution the pixel branch runs at (bicubic resize in and out) when the "
        "semantic grid is not image_size/16, e.g. SigLIP/14 at 384 -> 27x27 -> 432.",
    )
    semantic_encoder: SemanticEncoderConfig
    pixel_codec: PixelCodecConfig = PixelCodecConfig()
    quantizer: QuantizerConfig
    semantic_decoder: SemanticDecoderConfig = SemanticDecoderConfig()
    perceptual: PerceptualConfig = PerceptualConfig(enabled=False)
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    loss_weights: LossWeightsConfig = LossWeightsConfig()

    @property
    def grid_size(self) -> int:
        """Side of the latent grid both encoders produce."""
        return self.image_size // self.semantic_encoder.patch_size

    @property
    def pixel_size(self) -> int:
        return self.pixel_image_size or self.image_size

    def at_view(self, view: TokenizerView) -> "TokenizerConfig":
        """This tokenizer at ``view``'s image size and scales (validated like any config)."""
        grid = view.image_size // self.semantic_encoder.patch_size
        data = self.model_dump(mode="json")
        data["image_size"] = view.image_size
        if self.pixel_image_size is not None:
            data["pixel_image_size"] = grid * self.pixel_codec.downsample_factor
        data["quantizer"]["scales"] = list(view.scales)
        return TokenizerConfig.model_validate(data)

    @model_validator(mode="after")
    def _shapes_agree(self) -> "TokenizerConfig":
        factor = self.pixel_codec.downsample_factor
        grid = self.grid_size
        if self.pixel_size % factor or self.pixel_size // factor != grid:
            raise ValueError(
                f"the pixel encoder's grid ({self.pixel_size}/{factor}) does not match the semantic "
                f"grid {grid} (image_size {self.image_size} / patch_size "
                f"{self.semantic_encoder.patch_size}); set pixel_image_size to {grid * factor}"
            )
        too_big = [s for s in self.quantizer.scales if s > grid]
        if too_big:
            raise ValueError(
                f"quantizer.scales {too_big} exceed the latent grid {grid}x{grid} "
                f"(image_size {self.image_size} / patch_size {self.semantic_encoder.patch_size})"
            )
        if self.quantizer.scales[-1] != grid:
            raise ValueError(
                f"the last quantizer scale must equal the latent grid {grid}, "
                f"got {self.quantizer.scales[-1]}"
            )
        return self


# --------------------------------------------------------------------------- stages


class ShapesCorpusConfig(StrictModel):
    """The procedural shapes corpus."""

    num_samples: int = Field(2000, gt=0)
    shard_size: int = Field(250, gt=0)
    seed: int = 0
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    image_size: int = Field(64, ge=48)


CorpusFormat = Literal["auto", "webdataset", "parquet", "llava"]
CorpusText = Literal["captions", "conversations", "scenes"]  # scenes: the shapes scene records
CORPUS_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class WebdatasetConfig(StrictModel):
    """How a webdataset sample's text is found."""

    caption_json_key: str | None = Field("caption", description="A sample without a .txt member takes "
                                         "its caption from this field of its .json member (img2dataset "
                                         "writes one); None: .txt only.")


class ParquetColumnsConfig(StrictModel):
    """Column names of a Parquet image table (dataset hubs name them differently)."""

    key: str | None = Field("key", description="Sample keys; None: '<shard stem>-<row>'.")
    image: str = Field("image", description="The encoded image: binary, or a struct with a 'bytes' field "
                       "(what dataset libraries write).")
    caption: str | None = Field("caption", description="Caption strings; None: no captions.")
    metadata: str | None = Field("json", description="Metadata JSON strings (e.g. LLaVA conversations), read "
                             "when the table has the column.")


class LlavaConfig(StrictModel):
    """LLaVA-style instruction data: ``url`` is a JSON list of ``{id, image, conversations}``;
    the corpus stage packs it into Parquet shards with the images it names."""

    image_root: str = Field(description="URL the records' image paths are relative to.")
    shard_size: int = Field(1000, gt=0, description="Records per packed shard.")


class CorpusConfig(StrictModel):
    """One image corpus: the shapes corpus, or existing data at a URL in one of the readers' formats."""

    source: Literal["shapes", "url"] = "shapes"
    url: str | None = Field(default=None, description="Training data: a directory, glob or file of shards "
                            "(webdataset, parquet), or the JSON file (llava).")
    format: CorpusFormat = Field("auto", description="auto: from the files' extensions (.tar: webdataset, "
                                 "with img2dataset's .parquet side files beside the tars; .parquet: parquet).")
    heldout_url: str | None = Field(
        default=None, description="Held-out shards; when unset, the last heldout_shards of url."
    )
    heldout_shards: int = Field(1, ge=0)
    texts: tuple[CorpusText, ...] | None = Field(
        default=None, description="What text the samples carry, checked against the stages using the "
        "corpus before any cluster work; None: from the format (shapes: captions, conversations and "
        "scenes, the scene records the shapes benchmarks read; webdataset: captions; parquet: captions "
        "when columns.caption is set; llava: conversations). [] for images only.")
    webdataset: WebdatasetConfig = WebdatasetConfig()
    columns: ParquetColumnsConfig = ParquetColumnsConfig()
    llava: LlavaConfig | None = None
    shapes: ShapesCorpusConfig = ShapesCorpusConfig()
    on_source_change: Literal["recompute", "fail"] = Field(
        "recompute", description="An indexed corpus whose shards changed since a completed run of the "
        "same corpus config: 'recompute' re-indexes it (and everything downstream runs again), 'fail' "
        "stops before any stage, naming the shards added, removed or rewritten.")

    @model_validator(mode="after")
    def _source_complete(self) -> "CorpusConfig":
        if self.source == "url" and not self.url:
            raise ValueError("source is 'url' but url is not set")
        if (self.format == "llava") != (self.llava is not None):
            raise ValueError("format llava needs the llava section (image_root), and only it")
        if self.format == "llava" and self.source != "url":
            raise ValueError("format llava reads the JSON file at url: set source: url")
        if self.format == "llava" and self.heldout_url:
            raise ValueError("format llava takes its held-out split from the packed shards (heldout_shards), "
                             "not heldout_url")
        return self

    @property
    def holds(self) -> frozenset[str]:
        """The texts its samples carry (``texts``, else the format's)."""
        if self.texts is not None:
            return frozenset(self.texts)
        if self.source == "shapes":
            return frozenset({"captions", "conversations", "scenes"})
        if self.format == "llava":
            return frozenset({"conversations"})
        if self.format in ("parquet", "auto") and self.columns.caption is None:
            return frozenset()
        return frozenset({"captions"})


# Corpus settings that never change what its corpus stage makes (not in its identity or manifest).
CORPUS_NOT_CONTENT = ("on_source_change", "texts")


class MixtureEntry(StrictModel):
    """One corpus of a training stage's data and its share of the samples."""

    corpus: str
    weight: float = Field(1.0, gt=0.0, description="Relative share (weights are normalised).")


class PretokenizeConfig(StrictModel):
    """Ray Data pre-tokenization: corpus shards -> token shards."""

    batch_size: int = Field(64, gt=0, description="Decoded images held per encode call.")
    micro_batch: int = Field(
        16, gt=0, description="Fixed shape the model runs on (last one zero-padded); part of the "
        "encoding identity, so tokens never depend on batch_size."
    )
    num_actors: int = Field(1, gt=0, description="Tokenizer actors (one model each).")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float | Literal["auto"] = Field(
        "auto", description="'auto': 1 when the cluster has GPUs, else 0."
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    allow_tf32: bool = False
    max_actor_restarts: int = Field(3, ge=0, description="Restarts of a tokenizer actor whose process "
                                    "or node died; then the attempt fails.")
    max_task_retries: int = Field(3, ge=0, description="Retries of a shard whose actor died while "
                                  "encoding it; then the attempt fails.")
    max_attempts: int = Field(3, ge=1, description="Runs of the whole stage when an attempt ends with a "
                              "lost actor, worker or node (each re-runs only the shards not yet written); "
                              "then the stage fails naming the last loss. Errors in the data or code are "
                              "not retried.")
    retry_wait_s: float = Field(15.0, ge=0, description="Wait before the next attempt, so the cluster can "
                                "mark a lost node dead (Ray's node health checks take about 15 s).")


def deepspeed_config_path(name: str) -> Path:
    """A DeepSpeed config: a name under configs/deepspeed/ (``zero2``) or a path to a YAML/JSON file."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml", ".json"):
        path = CONFIG_ROOT / "deepspeed" / f"{name}.yaml"
    return path


def load_deepspeed_config(name: str) -> dict[str, Any]:
    """Read and check a DeepSpeed config (YAML with include:, or JSON)."""
    data = load_yaml_tree(deepspeed_config_path(name))
    stage = data.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed config {name!r}: zero_optimization.stage must be 0-3, got {stage!r}")
    owned = [k for k in DEEPSPEED_OWNED_KEYS if k in data]
    if owned:
        raise ValueError(f"deepspeed config {name!r} sets {owned}; these come from the stage's own "
                         "settings (micro_batch_size, grad_accum, grad_clip, lr, betas)")
    return data


class AugmentConfig(StrictModel):
    """Training augmentation: random short-side resize in [S, S/min_scale], random crop, flip."""

    min_scale: float = Field(0.8, gt=0.0, le=1.0)


class LRScheduleConfig(StrictModel):
    """Learning-rate multiplier over optimizer steps: linear warmup from 0, then ``decay`` to
    ``min_lr_ratio * lr`` at the last step (``constant`` keeps ``lr``)."""

    warmup_steps: int = Field(0, ge=0)
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainingConfig(StrictModel):
    """What every DeepSpeed-on-Ray-Train stage shares: schedule, optimizer, workers, checkpoints."""

    steps: int = Field(1000, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="Samples per worker per micro-step.")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    num_workers: int | tuple[int, int] = Field(1, description=(
        "Training workers: a number, or [min, max] for an elastic group that Ray Train starts with "
        "as many as the cluster fits and resizes on restarts (a checkpoint saved by another number "
        "of workers is re-sharded through DeepSpeed universal checkpoints; the global batch is "
        "micro_batch_size x grad_accum x the workers of the moment)."))
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    deepspeed: str = Field("zero2", description="Name under configs/deepspeed/ or a file path.")
    checkpoint_every: int = Field(200, gt=0)
    keep_checkpoints: int = Field(2, ge=2, description="Newest checkpoints kept (at least 2, so a "
                                  "corrupt latest one has a predecessor to fall back to).")
    log_every: int = Field(10, gt=0)
    max_failures: int = Field(3, ge=0, description="Worker-group restarts (from the latest "
                              "checkpoint) after a worker or node is lost; then the stage fails.")
    corrupt_checkpoint: Literal["fallback", "fail"] = Field(
        "fallback", description="A latest checkpoint that does not verify: 'fallback' resumes from "
        "the newest one that does (with a warning naming the bad one), 'fail' stops the stage.")
    data: tuple[MixtureEntry, ...] | None = Field(
        default=None, description="The corpora this stage trains on, with mixture weights; None: the only "
        "corpus of ``corpora``.")
    dedup: Literal["images", "pairs", "off"] = Field(
        "images", description="Across the corpora of ``data``, a sample repeating one of an earlier corpus is "
        "dropped: images: the same image bytes; pairs: the same image with the same text (caption and "
        "metadata); off: nothing is dropped.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills nodes in turn, SPREAD puts "
        "them on as many nodes as possible.")

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> "TrainingConfig":
        if self.lr_schedule.warmup_steps >= self.steps:
            raise ValueError(f"lr_schedule.warmup_steps ({self.lr_schedule.warmup_steps}) must be below "
                             f"steps ({self.steps})")
        return self

    @model_validator(mode="after")
    def _workers_positive(self) -> "TrainingConfig":
        low, high = self.worker_range
        if not 0 < low <= high:
            raise ValueError(f"num_workers must be a positive number or [min, max] with 0 < min <= max, "
                             f"got {self.num_workers}")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed group."""
        return self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers, self.num_workers)

    @model_validator(mode="after")
    def _deepspeed_readable(self) -> "TrainingConfig":
        try:
            load_deepspeed_config(self.deepspeed)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


class TrainTokenizerConfig(TrainingConfig):
    """Tokenizer training on Ray Train workers, each running DeepSpeed engines."""

    image_every: int = Field(200, gt=0, description="Held-out reconstruction grid interval.")
    heldout_images: int = Field(8, gt=0)
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _dedup_by_image(self) -> "TrainTokenizerConfig":
        if self.dedup == "pairs":
            raise ValueError("dedup pairs: the tokenizer reads images only (use images or off)")
        return self


class FinetuneDecoderConfig(TrainTokenizerConfig):
    """The reference's second tokenizer phase: only the pixel decoder trains (pixel losses, the
    discriminator from ``tokenizer.discriminator.start_step``); encoders, quantizer and
    codebooks are frozen, so token ids never change. A wider decoder ("enhanced": 256 channels,
    4 blocks per level in TokenFlow-B) starts from scratch; the trained width starts from the
    trained decoder."""

    decoder_ch: int | None = Field(default=None, gt=0, description="Decoder base width; None: "
                                   "the tokenizer's.")
    decoder_num_res_blocks: int | None = Field(default=None, gt=0, description="Decoder blocks per "
                                               "level; None: the tokenizer's.")

    def tokenizer_config(self, trained: TokenizerConfig) -> TokenizerConfig:
        """The trained tokenizer's config with this stage's decoder."""
        codec = trained.pixel_codec.model_copy(update={
            "decoder_ch": self.decoder_ch or trained.pixel_codec.decoder_ch,
            "decoder_num_res_blocks": self.decoder_num_res_blocks or trained.pixel_codec.decoder_num_res_blocks})
        return trained.model_copy(update={"pixel_codec": codec})


class LanguageModelConfig(StrictModel):
    """A transformers causal LM: pretrained from a path/hub id, or built from ``architecture``."""

    pretrained: str | None = Field(
        default=None, description="Local path or hub id of an AutoModelForCausalLM checkpoint; "
        "None builds ``architecture`` randomly initialised (tests, smoke).")
    architecture: dict[str, Any] = Field(
        default_factory=dict, description="transformers config fields incl. model_type (e.g. "
        "llama, qwen3 — qwen3 has QK-norm); vocab_size comes from the text tokenizer.")
    text_tokenizer: str | None = Field(
        default=None, description="Path/hub id of the text tokenizer; None trains a byte-level "
        "BPE on the training split's texts and saves it with the stage output.")
    bpe_vocab_size: int = Field(1024, ge=300)
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    max_text_tokens: int = Field(64, gt=0, description="Longer texts are truncated (and counted).")

    @model_validator(mode="after")
    def _buildable(self) -> "LanguageModelConfig":
        if self.pretrained is None and "model_type" not in self.architecture:
            raise ValueError("set language_model.pretrained, or architecture.model_type to build one")
        return self


class SamplingConfig(StrictModel):
    """Next-scale sampling: CFG ramped linearly over scales, multi-round top-k/top-p per scale."""

    cfg_scale: float = Field(4.0, ge=0.0, description="Guidance at the last scale; scale i uses "
                             "cfg_scale * i / (num_scales - 1).")
    top_k: tuple[int, ...] = Field((1200, 100, 1), min_length=1, description="Per round; 0 = off.")
    top_p: tuple[float, ...] = Field((0.8, 0.8, 0.0), min_length=1, description="Per round; 0 = off.")
    temperature: float = Field(1.0, gt=0.0)
    negative_prompt: str = Field("", description="Text of the unconditional branch of guidance; "
                                 "empty: the empty prompt the generator was trained with.")

    @model_validator(mode="after")
    def _rounds_agree(self) -> "SamplingConfig":
        if len(self.top_k) != len(self.top_p):
            raise ValueError(f"top_k has {len(self.top_k)} rounds but top_p {len(self.top_p)}")
        if any(k < 0 for k in self.top_k) or any(not 0.0 <= p <= 1.0 for p in self.top_p):
            raise ValueError("top_k must be >= 0 and top_p within [0, 1]")
        return self


class TrainGeneratorConfig(TrainingConfig):
    """Text-to-image next-scale prediction in a causal LM, trained on token shards."""

    language_model: LanguageModelConfig
    tokenizer_view: TokenizerView | None = Field(
        default=None, description="Tokenize the generator's corpus at this image size and scales "
        "(its own pretokenize_generation stage); None: the tokenizer as trained.")
    qk_norm: bool = Field(True, description="Per-head RMSNorm on queries and keys, as the reference "
                          "patches into Llama; LMs with native QK-norm (Qwen3) keep theirs.")
    cond_drop_prob: float = Field(0.1, ge=0.0, lt=1.0, description="Caption replaced by the "
                                  "empty prompt (classifier-free guidance training).")
    sampling: SamplingConfig = SamplingConfig()
    eval_every: int = Field(200, gt=0, description="Held-out loss and sample grid interval.")
    heldout_samples: int = Field(64, gt=0, description="Held-out images for the token loss.")
    sample_prompts: int = Field(8, gt=0, description="Held-out captions sampled for the grid.")


class TrainUnderstandingConfig(TrainingConfig):
    """LLaVA-style understanding: stage 1 projector alignment, stage 2 full fine-tune."""

    language_model: LanguageModelConfig
    align_steps: int = Field(200, ge=0, description="Stage 1 (projector only, captions); "
                             "``steps`` is stage 2 (everything, conversations).")
    align_lr: float = Field(1e-3, gt=0)
    align_trains: Literal["projector", "all"] = Field(
        "projector", description="projector: LLaVA stage 1, the (pretrained) LM frozen; all: the LM "
        "trains on the captions too (an LM built from scratch must first learn to read images).")
    align_data: tuple[MixtureEntry, ...] | None = Field(
        default=None, description="Stage 1's corpora (captions; a row without one gives its conversation), "
        "with mixture weights; None: ``data``.")
    dedup: Literal["images", "pairs", "off"] = Field(
        "pairs", description="As for every stage, but by default only the same image with the same "
        "conversation is a duplicate: instruction sets ask new questions about the same (COCO, ...) images.")
    split_turns: bool = Field(False, description="Each question/answer turn of a conversation "
                              "becomes its own sample (independent yes/no pairs).")
    eval_every: int = Field(200, gt=0)
    heldout_questions: int = Field(200, gt=0)
    max_new_tokens: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _warmup_within_align(self) -> "TrainUnderstandingConfig":
        if 0 < self.align_steps <= self.lr_schedule.warmup_steps:
            raise ValueError(f"lr_schedule.warmup_steps ({self.lr_schedule.warmup_steps}) must be below "
                             f"align_steps ({self.align_steps}): the schedule runs once per phase")
        return self


class FIDConfig(StrictModel):
    """rFID's Inception-v3 network (:mod:`tokenflow.eval.fid`)."""

    inception_weights: str | None = Field(
        default=None, description="Local path of the Inception-v3 state dict; None skips rFID "
        "(reported as skipped).")
    architecture: Literal["fid", "torchvision"] = Field(
        "fid", description="fid: the TF-ported FID network (published numbers); torchvision: "
        "torchvision's ImageNet weights.")


class ReconstructionEvalConfig(StrictModel):
    """The tokenizer's round trip on the corpus' held-out images."""

    max_images: int | None = Field(default=None, gt=0, description="Held-out images scored; None: all.")
    batch_size: int = Field(32, gt=0)
    fid: FIDConfig = FIDConfig()


def _require(section: StrictModel, benchmark: str, *fields: str) -> None:
    """Raise unless the fields the release of ``benchmark`` reads are set (when it is chosen)."""
    if getattr(section, "benchmark") == benchmark:
        if missing := [k for k in fields if not getattr(section, k)]:
            raise ValueError(f"benchmark {benchmark} needs {', '.join(missing)}")


class GenEvalRulesConfig(StrictModel):
    """GenEval's scoring settings (the official values by default)."""

    threshold: float = Field(0.3, ge=0.0, lt=1.0)
    counting_threshold: float = Field(0.9, ge=0.0, lt=1.0)
    max_objects: int = Field(16, gt=0)
    max_overlap: float = Field(1.0, gt=0.0, le=1.0, description="NMS IoU; 1.0 disables it.")
    position_margin: float = Field(0.1, ge=0.0)


class GenerationEvalConfig(StrictModel):
    """GenEval on the generator: the shapes prompt set (CPU) or the official benchmark."""

    benchmark: Literal["shapes", "geneval"] = "shapes"
    metadata_url: str | None = Field(default=None, description="Official evaluation_metadata.jsonl (geneval).")
    shapes_per_tag: int = Field(10, gt=0, description="Prompts per tag of the shapes set.")
    images_per_prompt: int = Field(4, gt=0)
    batch_size: int = Field(16, gt=0, description="Images sampled together (whole prompts, at least "
                            "one; classifier-free guidance adds as many unconditional rows).")
    detector_path: str | None = Field(default=None, description="transformers detector directory (geneval).")
    detector_min_score: float = Field(0.05, ge=0.0, lt=1.0)
    clip_model: str = Field("ViT-L-14-quickgelu", description="open_clip architecture of clip_weights.")
    clip_weights: str | None = Field(default=None, description="open_clip state-dict file (geneval).")
    rules: GenEvalRulesConfig = GenEvalRulesConfig()
    sampling: SamplingConfig | None = Field(
        default=None, description="None: train_generator.sampling.")

    @model_validator(mode="after")
    def _real_backends_configured(self) -> "GenerationEvalConfig":
        _require(self, "geneval", "metadata_url", "detector_path", "clip_weights")
        return self


class UnderstandingEvalConfig(StrictModel):
    """MME on the understanding model: the shapes set (CPU) or the official release."""

    benchmark: Literal["shapes", "mme"] = "shapes"
    root_url: str | None = Field(default=None, description="MME_Benchmark_release_version URL (mme).")
    shapes_per_subtask: int = Field(25, gt=0, description="Images per subtask of the shapes set.")
    batch_size: int = Field(16, gt=0, description="Questions answered per generate call.")

    @model_validator(mode="after")
    def _root_given(self) -> "UnderstandingEvalConfig":
        _require(self, "mme", "root_url")
        return self


class POPEEvalConfig(StrictModel):
    """POPE on the understanding model: the shapes set (CPU) or the official release."""

    benchmark: Literal["shapes", "pope"] = "shapes"
    root_url: str | None = Field(default=None, description="Directory of the three split files (pope).")
    image_root_url: str | None = Field(default=None, description="Directory of the images the files "
                                       "name, e.g. COCO val2014 (pope).")
    files: str = Field("coco_pope_{split}.json", description="Split file names, {split} = random, "
                       "popular, adversarial (pope).")
    shapes_images: int = Field(50, gt=0, description="Images of the shapes set (3 yes/no pairs each per split).")
    batch_size: int = Field(16, gt=0, description="Questions answered per generate call.")
    question_suffix: str = Field(" Please answer yes or no.", description="Appended to every question "
                                 "when it is asked (the shapes corpus trains with this one).")

    @model_validator(mode="after")
    def _data_given(self) -> "POPEEvalConfig":
        _require(self, "pope", "root_url", "image_root_url")
        if not (self.files.count("{split}") == self.files.count("{") == self.files.count("}") == 1) \
                or "/" in self.files:
            raise ValueError(f"files must be a file name holding {{split}} once, got {self.files!r}")
        return self


class DPGEvalConfig(StrictModel):
    """DPG-Bench on the generator (2x2 grids asked by a VQA model): the shapes set (exact VQA on
    CPU) or the release with a transformers VQA model."""

    benchmark: Literal["shapes", "dpg"] = "shapes"
    root_url: str | None = Field(default=None, description="Directory holding prompts/ and dpg_bench.csv (dpg).")
    vqa_model_path: str | None = Field(default=None, description="Local transformers VQA model directory (dpg).")
    shapes_prompts: int = Field(40, gt=0, description="Prompts of the shapes set.")
    batch_size: int = Field(16, gt=0, description="Images sampled together (whole prompts of 4 images, at "
                            "least one; classifier-free guidance adds as many unconditional rows).")
    upstream_bugs: bool = Field(False, description="Score as the official script does, with its two bugs "
                                "(category scores from the last tile only; the CSV's first row skipped).")

    @model_validator(mode="after")
    def _data_given(self) -> "DPGEvalConfig":
        _require(self, "dpg", "root_url", "vqa_model_path")
        return self


class LmmsEvalConfig(StrictModel):
    """lmms-eval tasks on the understanding model: the eval_understanding_lmms stage, which exists
    when ``tasks`` names any (it needs the tokenflow-pipeline[lmms] extra)."""

    tasks: tuple[str, ...] = Field((), description="lmms-eval task or group names (built-in, or defined in "
                                   "include_path); empty: no lmms-eval stage.")
    include_path: str | None = Field(default=None, min_length=1, description="Folder (any URL) of task YAMLs "
                                     "added to lmms-eval's built-in tasks, as lmms-eval's --include_path.")
    batch_size: int = Field(16, gt=0, description="Requests per model call.")
    limit: int | None = Field(default=None, gt=0, description="Documents per task (quick checks); None: all.")

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not t.strip() or t != t.strip() for t in value):
            raise ValueError(f"task names must be non-empty without surrounding spaces, got {list(value)}")
        if repeated := sorted({t for t in value if value.count(t) > 1}):
            raise ValueError(f"tasks named more than once: {repeated}")
        return value


class EvalConfig(StrictModel):
    """The eval_* stages: benchmarks, scorers' weights, and the untrained baselines' seed."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where each evaluation's Ray task runs: cuda holds one GPU, auto one when "
        "the cluster has GPUs, cpu none.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs each evaluation's Ray task holds.")
    seed: int = Field(0, ge=0, description="Sampling seeds and the untrained baselines' initialisation.")
    corpus: str | None = Field(default=None, description="The corpus whose held-out split the evaluations "
                               "read (reconstruction images, the shapes benchmarks); None: the tokenizer's "
                               "first corpus.")
    reconstruction: ReconstructionEvalConfig = ReconstructionEvalConfig()
    generation: GenerationEvalConfig = GenerationEvalConfig()
    understanding: UnderstandingEvalConfig = UnderstandingEvalConfig()
    pope: POPEEvalConfig = POPEEvalConfig()
    dpg: DPGEvalConfig = DPGEvalConfig()
    lmms: LmmsEvalConfig = LmmsEvalConfig()


DEFAULT_REGISTERED_MODELS = {
    "train_tokenizer": "tokenflow-tokenizer",
    "finetune_decoder": "tokenflow-tokenizer-decoder-ft",
    "train_generator": "tokenflow-t2i-generator",
    "train_understanding": "tokenflow-understanding",
}


class TrackingConfig(StrictModel):
    """MLflow tracking. The URI may also come from MLFLOW_TRACKING_URI."""

    tracking_uri: str | None = Field(
        default=None, description="None: MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db"
    )
    experiment: str = "tokenflow"
    system_metrics_every_s: float = Field(
        10.0, ge=0, description="MLflow system-metrics sampling interval per node of a training stage and "
        "in the evaluations; 0 turns it off."
    )
    registered_models: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_REGISTERED_MODELS),
        description="Model Registry name per model stage; each completed stage registers its export as a new "
        "version there. {} registers nothing.")
    registry_alias: str = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
                                description="Alias the pipeline moves to each version it registers.")

    @field_validator("registered_models")
    @classmethod
    def _model_stages(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(DEFAULT_REGISTERED_MODELS))
        if unknown:
            raise ValueError(f"registered_models: {unknown} are not model stages "
                             f"(one of {sorted(DEFAULT_REGISTERED_MODELS)})")
        if blank := sorted(k for k, v in value.items() if not v.strip()):
            raise ValueError(f"registered_models: empty name for {blank}")
        return value


# --------------------------------------------------------------------------- root


class WorkflowConfig(StrictModel):
    """How pipeline runs that share storage coordinate (tokenflow.workflow.lease): each stage's
    output has a lease, held and renewed by the run making it."""

    when_busy: Literal["wait", "fail"] = Field(
        "wait", description="A stage another run is making: 'wait' for it (then reuse its output, or "
        "take over when that run failed or died), 'fail' at once naming the holder.")
    lease_ttl_s: float = Field(300.0, gt=0, description="A lease not renewed for this long is taken "
                               "over (its holder is presumed dead).")
    lease_renew_s: float = Field(30.0, gt=0, description="How often the holder renews.")
    busy_poll_s: float = Field(10.0, gt=0, description="How often a waiting run looks again.")

    @model_validator(mode="after")
    def _renew_well_within_ttl(self) -> "WorkflowConfig":
        if self.lease_renew_s * 3 > self.lease_ttl_s:
            raise ValueError(f"lease_renew_s ({self.lease_renew_s}) must be at most a third of lease_ttl_s "
                             f"({self.lease_ttl_s}), so one late renewal does not lose the lease")
        return self


class SampleLimitsConfig(StrictModel):
    """What one sample of a corpus may cost whichever stage reads it (pretokenize, training,
    evaluation): past a limit it is quarantined (or counted as skipped) with the limit as its
    reason, never decoded or parsed further. The reasons are listed in docs/data.md."""

    max_image_pixels: int = Field(64_000_000, gt=0, description="Width x height, read from the "
                                  "header before any pixel is decoded (reason too_large).")
    max_image_bytes: int = Field(64 * 2**20, gt=0, description="Encoded image size (reason file_too_large).")
    max_aspect_ratio: float = Field(50.0, ge=1.0, description="Longer side over shorter side "
                                    "(reason extreme_aspect).")
    max_json_bytes: int = Field(1_000_000, gt=0, description="A sample's metadata JSON (reason json_too_large).")
    max_json_depth: int = Field(32, gt=0, description="Nesting of a sample's metadata JSON, checked "
                                "before it is parsed (reason json_too_deep).")
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Share of a corpus's samples "
                                           "that may be quarantined before pre-tokenization fails with the "
                                           "most frequent reasons (a corpus with no usable sample always fails).")

    def image_identity(self) -> dict[str, float]:
        """The limits that decide which images are used (part of a token shard's encoding)."""
        return {"max_image_pixels": self.max_image_pixels, "max_image_bytes": self.max_image_bytes,
                "max_aspect_ratio": self.max_aspect_ratio}


DEFAULT_LIMITS = SampleLimitsConfig()


class TokenFlowConfig(StrictModel):
    """Root of every config file. Sections are added as stages need them."""

    tokenizer: TokenizerConfig
    corpora: dict[str, CorpusConfig] = Field(default_factory=lambda: {"shapes": CorpusConfig()},
                                             description="The image corpora, by name.")
    pretokenize: PretokenizeConfig = PretokenizeConfig()
    train_tokenizer: TrainTokenizerConfig = Field(default_factory=TrainTokenizerConfig)
    finetune_decoder: FinetuneDecoderConfig | None = None
    train_generator: TrainGeneratorConfig | None = None
    train_understanding: TrainUnderstandingConfig | None = None
    eval: EvalConfig = EvalConfig()
    limits: SampleLimitsConfig = SampleLimitsConfig()
    tracking: TrackingConfig = TrackingConfig()
    workflow: WorkflowConfig = WorkflowConfig()

    def stage_data(self, section: str) -> tuple[MixtureEntry, ...]:
        """The corpora a training section (or ``train_understanding.align``) trains on."""
        if section == "train_understanding.align":
            t = self.train_understanding
            entries = t.align_data if t.align_data is not None else t.data
        else:
            entries = getattr(self, section).data
        if entries is not None:
            return entries
        if len(self.corpora) != 1:
            raise ValueError(f"{section}.data: name the corpora it trains on ({len(self.corpora)} are defined: "
                             f"{', '.join(sorted(self.corpora))})")
        return (MixtureEntry(corpus=next(iter(self.corpora))),)

    @property
    def understanding_data(self) -> tuple[MixtureEntry, ...]:
        """The understanding model's corpora: stage 1's (when it trains) then stage 2's."""
        align = self.stage_data("train_understanding.align") if self.train_understanding.align_steps else ()
        return align + self.stage_data("train_understanding")

    @property
    def training_sections(self) -> tuple[str, ...]:
        """The configured training sections that read corpora."""
        return tuple(s for s in ("train_tokenizer", "finetune_decoder", "train_generator", "train_understanding")
                     if getattr(self, s) is not None)

    @property
    def eval_corpus(self) -> str:
        """The corpus whose held-out split the evaluations read."""
        return self.eval.corpus or self.stage_data("train_tokenizer")[0].corpus

    @property
    def token_corpora(self) -> tuple[str, ...]:
        """Corpora pre-tokenized with the tokenizer as trained (the understanding model's, and the
        generator's without a tokenizer view), in first-use order."""
        names: list[str] = []
        if self.train_understanding is not None:
            names += [e.corpus for e in self.understanding_data]
        if self.train_generator is not None and self.generation_view is None:
            names += [e.corpus for e in self.stage_data("train_generator")]
        return tuple(dict.fromkeys(names))

    @model_validator(mode="after")
    def _data_suitable(self) -> "TokenFlowConfig":
        """Every corpus a stage names exists and carries the text the stage trains on."""
        for name in self.corpora:
            if not re.match(CORPUS_NAME, name):
                raise ValueError(f"corpora: name {name!r} must match {CORPUS_NAME} (it names stages and folders)")
        needs = {"train_tokenizer": (), "finetune_decoder": (), "train_generator": ("captions",),
                 "train_understanding": ("conversations",), "train_understanding.align": ("captions", "conversations")}
        sections = list(self.training_sections)
        if self.train_understanding is not None:
            sections.append("train_understanding.align")
        for section in sections:
            entries = self.stage_data(section)
            field = "align_data" if section.endswith(".align") else "data"
            where = f"{section.removesuffix('.align')}.{field}"
            names = [e.corpus for e in entries]
            if not names:
                raise ValueError(f"{where}: names no corpus")
            if repeated := sorted({n for n in names if names.count(n) > 1}):
                raise ValueError(f"{where}: corpora named more than once: {repeated}")
            for name in names:
                if name not in self.corpora:
                    raise ValueError(f"{where}: no corpus {name!r} in corpora (defined: {', '.join(sorted(self.corpora))})")
                held = self.corpora[name].holds
                if needs[section] and not held & set(needs[section]):
                    raise ValueError(f"{where}: corpus {name!r} holds {sorted(held) or 'no text'}; this stage "
                                     f"trains on {' or '.join(needs[section])} (set corpora.{name}.texts if the "
                                     "corpus has them)")
        if self.eval.corpus is not None and self.eval.corpus not in self.corpora:
            raise ValueError(f"eval.corpus: no corpus {self.eval.corpus!r} in corpora")
        self._shapes_benchmarks_have_scenes()
        return self

    def _shapes_benchmarks_have_scenes(self) -> None:
        """The shapes benchmarks of the evaluations that run build their sets from the scene records
        of the evaluation corpus's held-out split: refuse a corpus without them."""
        runs = {"generation": self.train_generator, "dpg": self.train_generator,
                "understanding": self.train_understanding, "pope": self.train_understanding}
        shapes = [f"eval.{name}" for name, model in runs.items()
                  if model is not None and getattr(self.eval, name).benchmark == "shapes"]
        corpus = self.eval_corpus
        if shapes and "scenes" not in self.corpora[corpus].holds:
            raise ValueError(f"{', '.join(shapes)}: benchmark shapes builds its set from the scene records of "
                             f"the held-out split of eval.corpus {corpus!r}, which holds "
                             f"{sorted(self.corpora[corpus].holds) or 'no text'}; choose the release benchmark, "
                             f"point eval.corpus at a shapes corpus, or set corpora.{corpus}.texts to include "
                             "scenes if its samples carry them")

    @property
    def generation_view(self) -> TokenizerView | None:
        """The view the generator's tokens are made at (None: the tokenizer as trained)."""
        return self.train_generator.tokenizer_view if self.train_generator is not None else None

    @model_validator(mode="after")
    def _generation_view_valid(self) -> "TokenFlowConfig":
        """The generator's tokenizer view must give a valid tokenizer (grid and scales agree)."""
        view = self.generation_view
        if view is not None:
            try:
                self.tokenizer.at_view(view)
            except ValidationError as exc:
                problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ValueError(f"train_generator.tokenizer_view: {problems}") from None
        return self

    @model_validator(mode="after")
    def _lmms_tasks_have_a_model(self) -> "TokenFlowConfig":
        if self.eval.lmms.tasks and self.train_understanding is None:
            raise ValueError("eval.lmms.tasks needs the train_understanding section (the model it evaluates)")
        return self


# --------------------------------------------------------------------------- loading


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``top`` (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and the files it includes into one merged mapping."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"include cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    includes = data.pop(INCLUDE_KEY, [])
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for include in includes:
        merged = _deep_merge(merged, load_yaml_tree(path.parent / include, (*_seen, path)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/flow collections."""
    result = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        parts = key.strip().split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {prefix} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message} (got {err.get('input')!r})"
                         if err["type"] != "value_error" else f"  {where}: {message}")
    return "invalid config:\n" + "\n".join(lines)


def validate(data: dict[str, Any], schema: type[StrictModel] = TokenFlowConfig) -> StrictModel:
    """Validate a merged mapping into ``schema``; raise :class:`ConfigError` listing every problem."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    path: str | Path,
    overrides: Iterable[str] = (),
    schema: type[StrictModel] = TokenFlowConfig,
) -> Any:
    """Load, merge, override and validate a config file."""
    return validate(apply_overrides(load_yaml_tree(path), overrides), schema)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(value: Any) -> str:
    """Stable sha256 of a config (or any section of one); key order does not matter."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()
