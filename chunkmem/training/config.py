"""Run configuration: :class:`TrainConfig`, the presets and the model they build."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from chunkmem.baselines import CausalTransformer
from chunkmem.nn import ChunkMemLM
from chunkmem.training.data import VOCAB_SIZE, RecallSpec

__all__ = ["TrainConfig", "PRESETS", "PRESET_NOTES", "MODELS", "ARCH_KEYS", "DATA_KEYS", "make_config", "check_options",
           "resolve_device", "build_model", "config_from_dict"]

MODELS = ("memory", "nomem", "transformer")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in the checkpoint)."""

    model: str = "memory"
    # architecture (shared by the three models); the defaults are the cpu-small preset
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int | None = None
    chunk_size: int | None = 16
    memory_slots: int = 32  # memory model only; holds max(recall_distances) segments of slots
    memory_pool: int = 4  # tokens per memory slot = the recall pair window (one pair per slot)
    use_global: bool = True
    fusion: str = "head"
    rope_base: float = 10000.0
    segment_len: int = 32
    init_slots: int = 0  # memory model only: learned initial memory slots per layer (0: empty memory)
    # data (the global batch: text_rows + recall_rows rows, split evenly across processes)
    n_seg: int = 5  # segments per training step (backprop spans them; memory carried beyond)
    text_rows: int = 16
    recall_rows: int = 32
    recall_weight: float = 1.0
    recall_pairs: int = 3
    recall_distances: tuple = (1, 2, 4)
    recall_keys: int = 64
    recall_values: int = 32
    recall_filler: int = 1
    val_fraction: float = 0.05
    # where a row's memory is emptied in training (always before a document's first segment, except:)
    recall_carry: bool = False  # recall rows keep their memory across recall documents
    text_reset_prob: float = 0.0  # a text row's memory is also emptied before a mid-file segment with this probability
    recall_text_prefix: bool = False  # each recall document starts with one unscored segment of training text
    # optimization
    steps: int = 2000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    # evaluation / checkpoints
    eval_every: int = 250
    eval_text_docs: int = 16  # periodic evaluation subset
    eval_recall_docs: int = 64
    final_text_docs: int | None = None  # None: every validation file
    final_recall_docs: int = 512
    eval_max_segments: int = 64  # text evaluation reads at most this many segments of a file
    eval_batch: int = 32  # documents per evaluation batch and process
    ckpt_every: int = 250
    # runtime
    seed: int = 0
    threads: int = 1  # CPU only: torch threads per process
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    out_dir: str = "runs"

    def recall_spec(self) -> RecallSpec:
        return RecallSpec(segment_len=self.segment_len, pool=self.memory_pool, n_pairs=self.recall_pairs,
                          distances=tuple(self.recall_distances), n_keys=self.recall_keys,
                          n_values=self.recall_values, filler_size=self.recall_filler)

    def run_dir(self, preset: str) -> str:
        return os.path.join(self.out_dir, preset, self.model)


# Fields a checkpoint must agree on to be resumed: the model's shape (ARCH_KEYS) and what the data
# streams and the carried memory are made of (DATA_KEYS). Steps, learning rate, evaluation and
# checkpoint intervals, threads and device may change between the runs of one training. A
# checkpoint written before a field existed is read with the field's default (init_slots 0,
# recall_carry False, text_reset_prob 0, recall_text_prefix False: what those runs did).
ARCH_KEYS = ("model", "d_model", "n_layers", "n_heads", "n_kv_heads", "chunk_size", "memory_slots",
             "memory_pool", "use_global", "fusion", "rope_base", "segment_len", "init_slots")
DATA_KEYS = ("text_rows", "recall_rows", "recall_pairs", "recall_distances", "recall_keys",
             "recall_values", "recall_filler", "val_fraction", "recall_carry", "text_reset_prob",
             "recall_text_prefix", "seed")

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, chunk_size=8, segment_len=16, memory_pool=4,
                 memory_slots=16, n_seg=5, text_rows=2, recall_rows=2, recall_pairs=3, steps=8,
                 lr=3e-3, warmup=2, eval_every=4, eval_text_docs=2, eval_recall_docs=4,
                 final_text_docs=4, final_recall_docs=8, eval_max_segments=4, eval_batch=4,
                 ckpt_every=4),
    "cpu-small": dict(),
    "gpu": dict(d_model=512, n_layers=8, n_heads=8, chunk_size=128, segment_len=512, memory_pool=8,
                memory_slots=256, n_seg=5, text_rows=32, recall_rows=32, recall_pairs=24,
                recall_keys=64, recall_values=64, steps=5000, lr=6e-4, warmup=200, eval_every=500,
                eval_text_docs=64, eval_recall_docs=256, final_recall_docs=1024, eval_batch=32,
                ckpt_every=500),
}

# What each preset is (shown by --help). Parameter counts: sum of numel over the model's
# parameters. Times: wall-clock on a 2-core AMD EPYC CPU, one torch thread per process.
PRESET_NOTES: dict[str, str] = {
    "tiny": ("d_model 32, 2 layers, 2 heads, segment 16, 4 rows x 5 segments, 8 steps; 37,644 params "
             "(memory model). Smoke test: 30-90 ms per step on one process (measured on this CPU shared "
             "with other jobs, depending on their load), a whole run with its evaluations and checkpoints in about 15 s wall "
             "including startup."),
    "cpu-small": ("d_model 64, 2 layers, 2 heads, segment 32, 48 rows x 5 segments, 2000 steps; 132,620 "
                  "params (memory model; 115,980 without memory, 115,968 transformer). About 6.5-8.5 min "
                  "per model on one thread (512 s memory, 402 s nomem, 387 s transformer, from the "
                  "committed bench/results/cpu-amd-epyc/lm_compare.md), so `compare` takes about 22 min "
                  "plus evaluation."),
    "gpu": ("d_model 512, 8 layers, 8 heads, segment 512, 64 rows x 5 segments, 5000 steps; 29.5M "
            "params (memory model). Meant for one modern GPU (bf16 autocast, Triton kernels); its run "
            "time was not measured; on a 2-core CPU it is not practical."),
}


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from ``dataclasses.asdict`` output (tuples restored; unknown keys rejected)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    d = dict(d)
    for k in ("recall_distances", "betas"):
        if k in d:
            d[k] = tuple(d[k])
    return TrainConfig(**d)


def make_config(preset: str, **overrides) -> TrainConfig:
    """The preset's config with ``overrides`` (None values ignored) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**kw)
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {cfg.model!r}")
    if cfg.model != "memory":
        cfg.init_slots = 0  # no memory to initialize (compare passes the same options to every model)
    check_options(cfg)
    return cfg


def check_options(cfg: TrainConfig) -> None:
    """ValueError for an impossible value of the memory initialization / reset options."""
    if isinstance(cfg.init_slots, bool) or not isinstance(cfg.init_slots, int) or cfg.init_slots < 0:
        raise ValueError(f"init_slots must be an int >= 0, got {cfg.init_slots!r}")
    if cfg.init_slots and (cfg.model != "memory" or cfg.init_slots > cfg.memory_slots):
        raise ValueError(f"init_slots needs the memory model and at most memory_slots={cfg.memory_slots} "
                         f"slots, got {cfg.init_slots} ({cfg.model})")
    if not 0.0 <= cfg.text_reset_prob < 1.0:
        raise ValueError(f"text_reset_prob must be in [0, 1), got {cfg.text_reset_prob}")


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model named by ``cfg.model`` (same width, depth, heads and segment length for all)."""
    if cfg.model == "transformer":
        return CausalTransformer(VOCAB_SIZE, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                                 rope_base=cfg.rope_base, segment_len=cfg.segment_len)
    return ChunkMemLM(VOCAB_SIZE, cfg.d_model, cfg.n_layers, cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                      chunk_size=cfg.chunk_size,
                      memory_slots=cfg.memory_slots if cfg.model == "memory" else 0,
                      memory_pool=cfg.memory_pool, use_global=cfg.use_global, rope_base=cfg.rope_base,
                      fusion=cfg.fusion, segment_len=cfg.segment_len,
                      init_slots=cfg.init_slots if cfg.model == "memory" else 0)
