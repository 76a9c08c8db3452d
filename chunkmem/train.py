"""Long-context LM training and evaluation for ChunkMemLM (``python -m chunkmem.train``).

Commands::

    python -m chunkmem.train --preset cpu-small [--model memory|nomem|transformer] [--steps N]
    python -m chunkmem.train compare --preset cpu-small      # train the 3 models, evaluate, table
    python -m chunkmem.train eval --preset cpu-small --model memory   # evaluate a saved run
    python -m chunkmem.train compare --preset cpu-small --text-rows 48 --recall-rows 0 --tag textonly

Data (:mod:`chunkmem.data`): every step each of ``text_rows`` rows reads the next ``n_seg``
segments of its own stream of stdlib files, and each of ``recall_rows`` rows the next recall
document. The memory of every row is carried from step to step (cut from the graph) and emptied
where a new document starts, so a document's first segment always starts from an empty memory, in
training as in evaluation. Loss = mean next-byte NLL over text tokens + ``recall_weight`` * mean
NLL over the recall answers.

Models compared at equal width, depth, heads, segment length, steps and batch:
``memory`` (ChunkMemLM), ``nomem`` (the same with ``memory_slots=0``) and ``transformer``
(:class:`chunkmem.baselines.CausalTransformer`, SDPA causal attention within each segment).

A run directory holds ``ckpt.pt`` (model, optimizer, scheduler, step, data position, memory
state, log), ``train_log.csv``, ``eval_log.csv``, ``summary.json`` and ``loss.png``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from chunkmem.baselines import CausalTransformer
from chunkmem.data import (VOCAB_SIZE, RecallSpec, pack_documents, recall_document, recall_stream,
                           stdlib_documents, text_stream)
from chunkmem.nn import ChunkMemLM, MemoryState

__all__ = ["TrainConfig", "PRESETS", "MODELS", "build_model", "Trainer", "evaluate_text",
           "evaluate_recall", "run_segments", "main"]

MODELS = ("memory", "nomem", "transformer")
LN2 = math.log(2.0)
SEGMENT_BUCKETS = (0, 1, 2, 4, 8, 16, 32)  # text bpb is also reported per range of segment index


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
    # data
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
    eval_batch: int = 32
    ckpt_every: int = 250
    # runtime
    seed: int = 0
    threads: int = 1  # CPU only
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    out_dir: str = "runs"

    def recall_spec(self) -> RecallSpec:
        return RecallSpec(segment_len=self.segment_len, pool=self.memory_pool, n_pairs=self.recall_pairs,
                          distances=tuple(self.recall_distances), n_keys=self.recall_keys,
                          n_values=self.recall_values, filler_size=self.recall_filler)

    def run_dir(self, preset: str) -> str:
        return os.path.join(self.out_dir, preset, self.model)


PRESETS: dict[str, dict] = {
    # a few seconds; used by the tests
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, chunk_size=8, segment_len=16, memory_pool=4,
                 memory_slots=16, n_seg=5, text_rows=2, recall_rows=2, recall_pairs=3, steps=8,
                 lr=3e-3, warmup=2, eval_every=4, eval_text_docs=2, eval_recall_docs=4,
                 final_text_docs=4, final_recall_docs=8, eval_max_segments=4, eval_batch=4,
                 ckpt_every=4),
    # <= 10 minutes per model on a 2-core CPU with one thread per process
    "cpu-small": dict(),
    # a single modern GPU (bf16 autocast, Triton kernels through backend "auto")
    "gpu": dict(d_model=512, n_layers=8, n_heads=8, chunk_size=128, segment_len=512, memory_pool=8,
                memory_slots=256, n_seg=5, text_rows=32, recall_rows=32, recall_pairs=24,
                recall_keys=64, recall_values=64, steps=5000, lr=6e-4, warmup=200, eval_every=500,
                eval_text_docs=64, eval_recall_docs=256, final_recall_docs=1024, eval_batch=32,
                ckpt_every=500),
}


def make_config(preset: str, **overrides) -> TrainConfig:
    """The preset's config with ``overrides`` (None values ignored) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**kw)
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {cfg.model!r}")
    return cfg


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
                      fusion=cfg.fusion, segment_len=cfg.segment_len)


# ------------------------------------------------------------------------ segment-wise running

def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def run_segments(model, x: torch.Tensor, reset: torch.Tensor | None = None, state=None):
    """Run ``model`` over ``n_seg`` consecutive segments, carrying its memory.

    x: (B, n_seg, L) long; reset: (B, n_seg) bool (empty a row's memory before that segment) or
    None; state: the memory to start from (None: empty). Returns logits (B, n_seg, L, V) and the
    final state (None for models without memory)."""
    logits = []
    for s in range(x.shape[1]):
        if reset is not None:
            if state is not None and bool(reset[:, s].any()):
                state = state.reset(reset[:, s])
        out, state = model(x[:, s], state)
        logits.append(out)
    return torch.stack(logits, dim=1), state


def _token_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token NLL in nats: logits (..., V), y (...) -> (...) float32."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), reduction="none").view(y.shape)


@torch.no_grad()
def evaluate_text(model, docs, cfg: TrainConfig, device: torch.device) -> dict:
    """Bits per byte on ``docs`` read from their start (empty memory), at most
    ``cfg.eval_max_segments`` segments each, split into targets inside the first segment of a file
    and targets after it. Returns bpb_first, bpb_after, bpb_all, the token counts and
    ``bpb_seg<range>`` per range of segment index (SEGMENT_BUCKETS)."""
    model.eval()
    L, S = cfg.segment_len, cfg.eval_max_segments
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths share a batch
    sums = np.zeros(S)  # per segment index
    counts = np.zeros(S, dtype=np.int64)
    for i in range(0, len(order), cfg.eval_batch):
        batch = [docs[j] for j in order[i: i + cfg.eval_batch]]
        n_seg = min(S, max(-(-len(d) // L) for d in batch))
        x, y, m = (torch.from_numpy(a).to(device) for a in pack_documents(batch, L, n_seg))
        with _autocast(device):
            logits, _ = run_segments(model, x)
        nll = _token_nll(logits, y) * m
        sums[:n_seg] += nll.sum(dim=(0, 2)).double().cpu().numpy()
        counts[:n_seg] += m.sum(dim=(0, 2)).cpu().numpy()
    model.train()

    def bpb(lo, hi):
        return float(sums[lo:hi].sum() / max(counts[lo:hi].sum(), 1) / LN2)

    edges = [e for e in SEGMENT_BUCKETS if e < S] + [S]
    out = {"bpb_first": bpb(0, 1), "bpb_after": bpb(1, S), "bpb_all": bpb(0, S),
           "tokens_first": int(counts[0]), "tokens_after": int(counts[1:].sum())}
    for lo, hi in zip(edges, edges[1:]):  # e.g. "bpb_seg2-3": segments 2 and 3 of every file
        out["bpb_seg" + (f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}")] = bpb(lo, hi)
    return out


def recall_eval_documents(cfg: TrainConfig, n_docs: int):
    """The fixed held-out recall documents (their own seed space, disjoint from training's)."""
    spec = cfg.recall_spec()
    return [recall_document(spec, np.random.default_rng([cfg.seed, 999_999, i])) for i in range(n_docs)]


@torch.no_grad()
def evaluate_recall(model, docs, cfg: TrainConfig, device: torch.device) -> dict:
    """Recall accuracy (argmax over all 256 bytes == the value) per distance, from empty memory.

    Returns {"acc_d{d}": float, "n_d{d}": int, ..., "chance": 1/n_values}."""
    model.eval()
    L = cfg.segment_len
    spec = cfg.recall_spec()
    hits: dict[int, int] = {d: 0 for d in spec.distances}
    total: dict[int, int] = {d: 0 for d in spec.distances}
    for i in range(0, len(docs), cfg.eval_batch):
        batch = docs[i: i + cfg.eval_batch]
        x, _, _ = pack_documents(batch, L, spec.n_segments)
        with _autocast(device):
            logits, _ = run_segments(model, torch.from_numpy(x).to(device))
        pred = logits.argmax(-1).reshape(len(batch), -1).cpu().numpy()  # pred[b, p] predicts token p+1
        for b, doc in enumerate(batch):
            for pos, _key, value, d in doc.answers:
                hits[d] += int(pred[b, pos - 1] == value)
                total[d] += 1
    model.train()
    out = {}
    for d in spec.distances:
        out[f"acc_d{d}"] = hits[d] / max(total[d], 1)
        out[f"n_d{d}"] = total[d]
    out["chance"] = 1.0 / spec.n_values
    return out


# ----------------------------------------------------------------------------------- training

def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


class Trainer:
    """Model, optimizer, schedule, data streams and carried memory of one run.

    ``step()`` does one optimizer step and returns its metrics; ``save``/``load`` checkpoint all of
    it (resuming gives the same next step as not stopping)."""

    def __init__(self, cfg: TrainConfig, train_docs=None):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=tuple(cfg.betas))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))
        docs = train_docs if train_docs is not None else stdlib_documents("train", val_fraction=cfg.val_fraction)
        self.streams = {}
        if cfg.text_rows:
            self.streams["text"] = text_stream(docs, cfg.text_rows, cfg.segment_len, cfg.seed)
        if cfg.recall_rows:
            self.streams["recall"] = recall_stream(cfg.recall_spec(), cfg.recall_rows, cfg.seed)
        if not self.streams:
            raise ValueError("need text_rows > 0 or recall_rows > 0")
        self.state = None  # carried memory (MemoryState) of all rows, text rows first
        self.step_count = 0
        self.log: list[dict] = []
        self.eval_log: list[dict] = []
        self.elapsed = 0.0  # training seconds over all sessions of the run

    # -- one step
    def _next_batch(self):
        parts = [s.next_window(self.cfg.n_seg) for s in self.streams.values()]
        x, y, m, reset = (torch.from_numpy(np.concatenate(a)).to(self.device) for a in zip(*parts))
        is_text = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
        is_text[: self.cfg.text_rows if "text" in self.streams else 0] = True
        return x, y, m, reset, is_text

    def step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        x, y, m, reset, is_text = self._next_batch()
        with _autocast(self.device):
            logits, state = run_segments(self.model, x, reset, self.state)
        nll = _token_nll(logits, y)
        mt = m & is_text[:, None, None]
        mr = m & ~is_text[:, None, None]
        text_loss = (nll * mt).sum() / mt.sum().clamp(min=1)
        recall_loss = (nll * mr).sum() / mr.sum().clamp(min=1)
        loss = text_loss + cfg.recall_weight * recall_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.state = state.detach() if state is not None else None
        self.step_count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.elapsed += dt
        row = {"step": self.step_count, "lr": lr, "loss": loss.item(), "text_bpb": text_loss.item() / LN2,
               "recall_loss": recall_loss.item(), "grad_norm": float(gnorm),
               "tokens_per_s": x.numel() / dt, "elapsed_s": self.elapsed, "loadavg_1m": os.getloadavg()[0]}
        self.log.append(row)
        return row

    # -- evaluation
    def evaluate(self, n_text_docs, n_recall_docs, val_docs) -> dict:
        docs = val_docs if n_text_docs is None else val_docs[:n_text_docs]
        out = {"step": self.step_count}
        out.update(evaluate_text(self.model, docs, self.cfg, self.device))
        out.update(evaluate_recall(self.model, recall_eval_documents(self.cfg, n_recall_docs), self.cfg,
                                   self.device))
        return out

    # -- checkpoints
    def save(self, path: str) -> None:
        ckpt = {
            "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step_count,
            "data": {k: s.state_dict() for k, s in self.streams.items()},
            "memory_state": None if self.state is None else self.state.state_dict(),
            "log": self.log,
            "eval_log": self.eval_log,
            "elapsed": self.elapsed,
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint

    def load(self, path: str) -> None:
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        for k in ("model", "d_model", "n_layers", "n_heads", "segment_len", "memory_slots", "memory_pool"):
            if ckpt["config"][k] != getattr(self.cfg, k):
                raise ValueError(f"checkpoint {path} has {k}={ckpt['config'][k]!r}, config has {getattr(self.cfg, k)!r}")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.step_count = int(ckpt["step"])
        for k, s in self.streams.items():
            s.load_state_dict(ckpt["data"][k])
        ms = ckpt["memory_state"]
        self.state = None if ms is None else MemoryState.from_state_dict(ms).to(self.device)
        self.log, self.eval_log = list(ckpt["log"]), list(ckpt["eval_log"])
        self.elapsed = float(ckpt.get("elapsed", 0.0))


# ------------------------------------------------------------------------------------ outputs

def _write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_losses(path: str, runs: dict[str, tuple[list[dict], list[dict]]], title: str,
                chance: float | None = None) -> None:
    """Loss-curve PNG: training text bpb (smoothed) and recall loss per step, eval points marked.

    runs: name -> (train log rows, eval log rows); chance: recall accuracy of a guess."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (log, elog) in runs.items():
        steps = [r["step"] for r in log]
        for ax, key in ((axes[0], "text_bpb"), (axes[1], "recall_loss")):
            vals = np.array([r[key] for r in log])
            k = max(1, len(vals) // 50)
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid") if len(vals) >= k else vals
            line, = ax.plot(steps[k - 1:], smooth, label=name)
            if key == "text_bpb" and elog:
                ax.plot([e["step"] for e in elog], [e["bpb_all"] for e in elog], "o", color=line.get_color(),
                        ms=4)
        if elog:
            dkeys = sorted(k for k in elog[-1] if k.startswith("acc_d"))
            for dk in dkeys:
                axes[2].plot([e["step"] for e in elog], [e[dk] for e in elog], marker="o", ms=3,
                             label=f"{name} {dk[4:]}")
    if chance is not None:
        axes[2].axhline(chance, color="gray", ls="--", lw=1, label="chance")
        axes[1].axhline(-math.log(chance), color="gray", ls="--", lw=1, label="chance")
    axes[0].set(xlabel="step", ylabel="bits per byte", title="stdlib text (train; dots: validation)")
    axes[1].set(xlabel="step", ylabel="nats", title="recall answer loss (train)")
    axes[2].set(xlabel="step", ylabel="accuracy", title="recall accuracy by distance (held out)", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name(device: torch.device) -> str:
    """GPU name, or "cpu-" + the processor model from /proc/cpuinfo, slugified."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        name = "cpu-" + line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------------- commands

def train_run(cfg: TrainConfig, preset: str, resume: bool = True, progress: bool = True, val_docs=None) -> Trainer:
    """Train (resuming from the run directory's checkpoint when there is one) up to cfg.steps,
    with periodic evaluation and checkpoints; write the logs and the loss PNG."""
    from tqdm import tqdm

    run_dir = cfg.run_dir(preset)
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    trainer = Trainer(cfg)
    if resume and os.path.exists(ckpt_path):
        trainer.load(ckpt_path)
    val_docs = val_docs if val_docs is not None else stdlib_documents("val", val_fraction=cfg.val_fraction)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    bar = tqdm(total=cfg.steps, initial=trainer.step_count, desc=f"{cfg.model}", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    while trainer.step_count < cfg.steps:
        row = trainer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", bpb=f"{row['text_bpb']:.3f}",
                        tok_s=f"{row['tokens_per_s']:.0f}")
        s = trainer.step_count
        if s % cfg.eval_every == 0 or s == cfg.steps:
            ev = trainer.evaluate(cfg.eval_text_docs, cfg.eval_recall_docs, val_docs)
            trainer.eval_log.append(ev)
            bar.write(f"[{cfg.model}] step {s}: val bpb first/after {ev['bpb_first']:.3f}/{ev['bpb_after']:.3f}"
                      + "".join(f" {k}={v:.2f}" for k, v in ev.items() if k.startswith("acc_")))
        if s % cfg.ckpt_every == 0 or s == cfg.steps:
            trainer.save(ckpt_path)
    bar.close()
    _write_csv(os.path.join(run_dir, "train_log.csv"), trainer.log)
    _write_csv(os.path.join(run_dir, "eval_log.csv"), trainer.eval_log)
    with open(os.path.join(run_dir, "summary.json"), "w") as fh:
        json.dump({"config": dataclasses.asdict(cfg), "params": n_params, "steps": trainer.step_count,
                   "train_seconds": trainer.elapsed, "last": trainer.log[-1] if trainer.log else None,
                   "eval": trainer.eval_log}, fh, indent=1)
    plot_losses(os.path.join(run_dir, "loss.png"), {cfg.model: (trainer.log, trainer.eval_log)},
                f"{cfg.model} ({preset})", chance=1.0 / cfg.recall_values)
    return trainer


def final_eval(trainer: Trainer, val_docs) -> dict:
    cfg = trainer.cfg
    t0 = time.perf_counter()
    ev = trainer.evaluate(cfg.final_text_docs, cfg.final_recall_docs, val_docs)
    ev["eval_seconds"] = time.perf_counter() - t0
    return ev


def _median_load(log: list[dict]):
    loads = [r["loadavg_1m"] for r in log if "loadavg_1m" in r]
    return float(np.median(loads)) if loads else None


def format_table(results: dict, cfg: TrainConfig) -> str:
    """Markdown table of the comparison."""
    ds = tuple(cfg.recall_distances)
    head = ("| model | params | train s | load | tok/s | val bpb, 1st segment | val bpb, after | val bpb, all | "
            + " | ".join(f"recall d={d}" for d in ds) + " |")
    lines = [head, "|" + "---|" * (8 + len(ds))]
    for name, r in results.items():
        e = r["eval"]
        load = r.get("loadavg_1m_median")
        load = "n/a" if load is None else f"{load:.1f}"
        lines.append(f"| {name} | {r['params']:,} | {r['train_seconds']:.0f} | {load} | {r['tokens_per_s']:.0f} | "
                     f"{e['bpb_first']:.3f} | {e['bpb_after']:.3f} | {e['bpb_all']:.3f} | "
                     + " | ".join(f"{e[f'acc_d{d}']:.3f}" for d in ds) + " |")
    seg_keys = [k for k in next(iter(results.values()))["eval"] if k.startswith("bpb_seg")]
    if seg_keys:
        lines += ["", "Validation bits per byte by segment index of a file (0 = first segment; memory "
                  "holds up to " f"{cfg.memory_slots // max(1, -(-cfg.segment_len // cfg.memory_pool))} "
                  "past segments):", "",
                  "| model | " + " | ".join(k[len("bpb_seg"):] for k in seg_keys) + " |",
                  "|---|" + "---|" * len(seg_keys)]
        for name, r in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['eval'][k]:.3f}" for k in seg_keys) + " |")
    return "\n".join(lines)


def compare(preset: str, overrides: dict, out: str | None, progress: bool = True, tag: str = "",
            models=MODELS, command: str | None = None) -> dict:
    """Train (or resume) the models of a preset, evaluate each on the full held-out data and
    write ``lm_compare[_tag].json`` / ``.md`` / ``_loss.png`` (run directories: runs/<preset>[-tag]/)."""
    base = make_config(preset, **overrides)
    run_name = preset + (f"-{tag}" if tag else "")
    stem = "lm_compare" + (f"_{tag}" if tag else "")
    device = resolve_device(base)
    val_docs = stdlib_documents("val", val_fraction=base.val_fraction)
    results, curves = {}, {}
    for name in models:
        cfg = make_config(preset, **{**overrides, "model": name})
        trainer = train_run(cfg, run_name, progress=progress, val_docs=val_docs)
        ev = final_eval(trainer, val_docs)
        tps = [r["tokens_per_s"] for r in trainer.log]
        results[name] = {"params": sum(p.numel() for p in trainer.model.parameters()),
                         "steps": trainer.step_count, "train_seconds": trainer.elapsed,
                         "tokens_per_s": float(np.median(tps)) if tps else float("nan"),
                         "train_tokens": trainer.step_count * (cfg.text_rows + cfg.recall_rows) * cfg.n_seg * cfg.segment_len,
                         "loadavg_1m_median": _median_load(trainer.log), "eval": ev}
        curves[name] = (trainer.log, trainer.eval_log)
        del trainer
    table = format_table(results, base)
    out = out or os.path.join("bench", "results", device_name(device))
    os.makedirs(out, exist_ok=True)
    cfg_d = dataclasses.asdict(base)
    cfg_d.pop("model")
    val_n = len(val_docs) if base.final_text_docs is None else min(base.final_text_docs, len(val_docs))
    meta = {"preset": preset, "device": device_name(device), "torch": torch.__version__,
            "threads": base.threads if device.type == "cpu" else None, "config": cfg_d,
            "val_files": val_n, "recall_chance": 1.0 / base.recall_values,
            "command": command or "python -m chunkmem.train compare --preset " + preset}
    with open(os.path.join(out, stem + ".json"), "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as fh:
        fh.write(f"# ChunkMemLM vs no memory vs SDPA transformer ({preset}, {meta['device']})\n\n")
        fh.write(f"`{meta['command']}`; torch {torch.__version__}; same width/depth/heads, segment "
                 f"{base.segment_len}, {base.steps} steps of {base.text_rows} text + {base.recall_rows} recall "
                 f"rows x {base.n_seg} segments (memory_pool {base.memory_pool} = one recall pair per memory "
                 f"slot, memory_slots {base.memory_slots} = {max(base.recall_distances)} segments). Text: bits "
                 f"per byte on {val_n} held-out stdlib files, each read from its start with an empty memory "
                 f"(at most {base.eval_max_segments} segments); '1st segment' = the bytes predicted while "
                 f"reading a file's first segment (bytes 1..{base.segment_len}), 'after' = the later ones. "
                 f"Recall: argmax accuracy (over all 256 bytes) on {base.final_recall_docs} held-out documents, "
                 f"by distance in segments between the pairs and the query (chance "
                 f"{1.0 / base.recall_values:.3f}). 'train s' is wall-clock time, one thread, on a machine "
                 f"shared with other jobs ('load' = median 1-minute load average during training, when logged; "
                 f"tok/s = median training tokens/s).\n\n")
        fh.write(table + "\n")
    plot_losses(os.path.join(out, stem + "_loss.png"), curves, f"lm compare ({preset}, {meta['device']})",
                chance=1.0 / base.recall_values)
    print(table)
    print(f"wrote {out}/{stem}.json, {stem}.md, {stem}_loss.png")
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m chunkmem.train", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="train", choices=("train", "compare", "eval"))
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--model", default=None, choices=MODELS)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--text-rows", dest="text_rows", type=int, default=None)
    p.add_argument("--recall-rows", dest="recall_rows", type=int, default=None)
    p.add_argument("--models", default=",".join(MODELS), help="compare: comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--tag", default="", help="compare: suffix of the run directories and result files")
    p.add_argument("--out-dir", dest="out_dir", default=None, help="run directories (default runs/)")
    p.add_argument("--results", default=None, help="compare: output folder (default bench/results/<device>)")
    p.add_argument("--no-resume", action="store_true", help="train: ignore an existing checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("steps", "lr", "seed", "threads", "device", "out_dir",
                                               "text_rows", "recall_rows")}
    progress = not args.no_progress
    if args.command == "compare":
        models = tuple(m for m in args.models.split(",") if m)
        if not models or set(models) - set(MODELS):
            raise SystemExit(f"--models must name some of {MODELS}, got {args.models!r}")
        compare(args.preset, overrides, args.results, progress=progress, tag=args.tag, models=models,
                command="python -m chunkmem.train " + " ".join(argv if argv is not None else sys.argv[1:]))
        return 0
    cfg = make_config(args.preset, model=args.model, **overrides)
    if args.command == "train":
        trainer = train_run(cfg, args.preset, resume=not args.no_resume, progress=progress)
    else:
        trainer = Trainer(cfg)
        trainer.load(os.path.join(cfg.run_dir(args.preset), "ckpt.pt"))
    ev = final_eval(trainer, stdlib_documents("val", val_fraction=cfg.val_fraction))
    print(json.dumps(ev, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
