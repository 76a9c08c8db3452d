"""Evaluation: bits per byte on held-out stdlib files and recall accuracy by distance.

Every document is read from its start with an empty memory. In a data-parallel run each process
evaluates its share of the documents (:func:`chunkmem.training.sharding.eval_batches`) and the
sums are added across processes, so every process returns the metrics of the whole set (equal to
the one-process figures up to the order of the float64 sums).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from chunkmem.training.config import TrainConfig
from chunkmem.training.data import pack_documents, recall_document
from chunkmem.training.distributed import DistContext
from chunkmem.training.sharding import eval_batches

__all__ = ["LN2", "SEGMENT_BUCKETS", "autocast", "run_segments", "token_nll", "evaluate_text",
           "evaluate_recall", "recall_eval_documents"]

LN2 = math.log(2.0)
SEGMENT_BUCKETS = (0, 1, 2, 4, 8, 16, 32)  # text bpb is also reported per range of segment index
_ONE = DistContext()


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
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


def token_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token NLL in nats: logits (..., V), y (...) -> (...) float32."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), reduction="none").view(y.shape)


def _batch_arrays(docs, idx, segment_len, n_seg, device):
    """x, y, m of the documents ``idx`` (one all-padding row when ``idx`` is empty)."""
    x, y, m = pack_documents([docs[j] for j in idx] if idx else [docs[0]], segment_len, n_seg)
    if not idx:
        m[:] = False
    return (torch.from_numpy(a).to(device) for a in (x, y, m))


@torch.no_grad()
def evaluate_text(model, docs, cfg: TrainConfig, device: torch.device, ctx: DistContext = _ONE) -> dict:
    """Bits per byte on ``docs`` read from their start (empty memory), at most
    ``cfg.eval_max_segments`` segments each, split into targets inside the first segment of a file
    and targets after it. Returns bpb_first, bpb_after, bpb_all, the token counts and
    ``bpb_seg<range>`` per range of segment index (SEGMENT_BUCKETS)."""
    model.eval()
    L, S = cfg.segment_len, cfg.eval_max_segments
    sums = torch.zeros(S, dtype=torch.float64, device=device)  # per segment index
    counts = torch.zeros(S, dtype=torch.float64, device=device)
    for idx, n_seg in eval_batches([len(d) for d in docs], cfg.eval_batch, ctx.rank, ctx.world_size, L, S):
        x, y, m = _batch_arrays(docs, idx, L, n_seg, device)
        with autocast(device):
            logits, _ = run_segments(model, x)
        nll = token_nll(logits, y) * m
        sums[:n_seg] += nll.sum(dim=(0, 2)).double()
        counts[:n_seg] += m.sum(dim=(0, 2)).double()
    model.train()
    both = ctx.all_reduce_sum(torch.stack([sums, counts])).cpu().numpy()
    sums, counts = both[0], both[1].astype(np.int64)

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
def evaluate_recall(model, docs, cfg: TrainConfig, device: torch.device, ctx: DistContext = _ONE) -> dict:
    """Recall accuracy (argmax over all 256 bytes == the value) per distance, from empty memory.

    Returns {"acc_d{d}": float, "n_d{d}": int, ..., "chance": 1/n_values}."""
    model.eval()
    L = cfg.segment_len
    spec = cfg.recall_spec()
    ds = list(spec.distances)
    hits = torch.zeros(2, len(ds), dtype=torch.float64)  # row 0: hits, row 1: answers
    for idx, n_seg in eval_batches([len(d) for d in docs], cfg.eval_batch, ctx.rank, ctx.world_size, L):
        x, _, _ = _batch_arrays(docs, idx, L, n_seg, device)
        with autocast(device):
            logits, _ = run_segments(model, x)
        pred = logits.argmax(-1).reshape(x.shape[0], -1).cpu().numpy()  # pred[b, p] predicts token p+1
        for b, j in enumerate(idx):
            for pos, _key, value, d in docs[j].answers:
                hits[0, ds.index(d)] += int(pred[b, pos - 1] == value)
                hits[1, ds.index(d)] += 1
    model.train()
    hits = ctx.all_reduce_sum(hits.to(device)).cpu()
    out = {}
    for i, d in enumerate(ds):
        out[f"acc_d{d}"] = float(hits[0, i]) / max(int(hits[1, i]), 1)
        out[f"n_d{d}"] = int(hits[1, i])
    out["chance"] = 1.0 / spec.n_values
    return out
