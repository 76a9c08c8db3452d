"""Long-range evaluation of trained checkpoints (``python -m chunkmem.train eval-longrange``).

All data is made here, nothing is downloaded. Every document is read from its start with an
empty memory, segment by segment (``segment_len`` tokens, as in training), and only the answer
tokens are scored: argmax over all 256 bytes == the value (chance 1/n_values when a model has
learned to answer with a value byte).

- Passkey (:func:`passkey_document`): one key-value pair ``key value | |`` in a pool-aligned
  window of segment 0, filler everywhere else, and ``? key`` -> value in segment ``d``: the key is
  ``d`` segments away from the question. Accuracy by ``d`` (default 1, 2, 4, 5, 8, ..., 64).
- Multi-query associative recall (:func:`mqar_document`): ``n`` pairs (distinct keys) in distinct
  pool windows of segment 0, every one asked once in segment ``d``, in random order. Accuracy by
  number of pairs and distance.

The format of a pair and of a question is that of the training recall task
(:mod:`chunkmem.training.data`: keys ``128 + i``, values ``192 + j``, ``?`` before a key), so the
models are asked what they were trained to do, farther away and with more pairs. Filler:
``"recall"`` (the training task's filler letters) or ``"text"`` (consecutive bytes of held-out
stdlib files, non-ASCII bytes replaced by spaces so they cannot look like a key or a value): the
memory then has to keep the pair while it writes text summaries over it.

Horizon: the FIFO holds ``memory_slots`` summaries of ``memory_pool`` tokens, i.e.
``memory_slots * memory_pool / segment_len`` segments (4 for cpu-small). Past that, the pair's own
slot has left the FIFO and the only carrier is the gated chain: every new summary starts from the
newest slot (``m_j = (1 - g_j) m_{j-1} + g_j c_j``), so what a pair wrote survives only in the
product of the ``1 - g`` gates of the summaries after it, a decaying, content-mixed trace.

Text at file starts (:func:`file_start_bpb`): bits per byte by segment index over the first
segments of many files (held-out stdlib files, and the ``*.py`` files of site-packages, which
training never reads), to measure the first segment (empty memory) on far more bytes than the
71 held-out stdlib files give. ``recall_mass`` reports the mean probability the model puts on the
recall task's key/value bytes (128..223), which stdlib text (ASCII after the replacement above)
never contains.

Checkpoints: any ``ckpt.pt`` written by ``python -m chunkmem.train`` (or bench/train_variant.py);
the learned initial memory is the config's ``init_slots`` (in checkpoints written before that
field existed it is recognized by the ``memory_init`` weights).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import sysconfig
import time

import numpy as np
import torch
import torch.nn.functional as F

from chunkmem.training.checkpoint import load_model_state, read_checkpoint
from chunkmem.training.config import TrainConfig, build_model, config_from_dict
from chunkmem.training.data import (BLOCK_FILL, FILLER_LO, KEY_LO, PAD, QUERY, VALUE_LO, Document,
                                    list_stdlib_files, stdlib_documents)

__all__ = ["load_checkpoint_model", "build_model_with_init", "passkey_document", "mqar_document", "recall_accuracy", "evaluate_passkey",
           "evaluate_mqar", "file_start_documents", "file_start_bpb", "add_parser", "main"]

DISTANCES = (1, 2, 4, 5, 8, 16, 32, 64)  # 4 and 5: both sides of the cpu-small FIFO horizon
PAIRS = (1, 2, 4, 8)
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------- models

def load_checkpoint_model(path: str, device="cpu"):
    """(model in eval mode, TrainConfig, init_slots) from a training checkpoint."""
    ckpt, shards = read_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    init = cfg.init_slots
    if shards is None and not init:  # bench/train_variant.py checkpoints from before the config field
        w = ckpt["model"].get("blocks.0.attn.memory_init")
        init = 0 if w is None else int(w.shape[0])
    model = build_model_with_init(cfg, init)
    load_model_state(model, path)
    return model.to(device).eval(), cfg, init


def build_model_with_init(cfg: TrainConfig, init_slots: int = 0):
    """``build_model(cfg)`` with ``init_slots`` learned initial memory slots (the memory model;
    0: those of ``cfg``)."""
    if not init_slots:
        return build_model(cfg)
    if cfg.model != "memory":
        raise ValueError(f"init_slots needs the memory model, got {cfg.model!r}")
    return build_model(dataclasses.replace(cfg, init_slots=init_slots))


# ------------------------------------------------------------------------------------ data

class Filler:
    """Filler bytes: the training task's letters (``kind="recall"``, ``size`` letters from 'a') or
    windows of held-out stdlib text (``kind="text"``, bytes >= 128 -> space)."""

    def __init__(self, kind: str, size: int = 1, text: np.ndarray | None = None):
        if kind not in ("recall", "text"):
            raise ValueError(f"filler must be 'recall' or 'text', got {kind!r}")
        self.kind, self.size = kind, size
        if kind == "text":
            if text is None:
                text = np.concatenate([d.tokens for d in stdlib_documents("val")])
            self.text = np.where(text >= 128, ord(" "), text).astype(np.int64)

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "recall":
            return rng.integers(FILLER_LO, FILLER_LO + self.size, size=n, dtype=np.int64)
        if n > len(self.text):
            raise ValueError(f"filler text has {len(self.text)} bytes, {n} needed")
        start = int(rng.integers(0, len(self.text) - n + 1))
        return self.text[start:start + n].copy()


def mqar_document(n_pairs: int, distance: int, cfg: TrainConfig, filler: Filler,
                  rng: np.random.Generator) -> Document:
    """``n_pairs`` pairs in segment 0, each asked once in segment ``distance``; ``distance + 1``
    segments. ``answers``: (position, key, value, distance)."""
    L, P = cfg.segment_len, cfg.memory_pool
    if n_pairs > L // P or n_pairs > L // 3 or n_pairs > cfg.recall_keys:
        raise ValueError(f"{n_pairs} pairs do not fit: at most {min(L // P, L // 3, cfg.recall_keys)} "
                         f"(segment {L}, pool {P})")
    if distance < 1:
        raise ValueError(f"distance must be >= 1, got {distance}")
    n = (distance + 1) * L
    tok = filler(n, rng)
    mask = np.zeros(n, dtype=bool)
    keys = KEY_LO + rng.choice(cfg.recall_keys, size=n_pairs, replace=False)
    values = VALUE_LO + rng.integers(0, cfg.recall_values, size=n_pairs)
    for w, k, v in zip(np.sort(rng.choice(L // P, size=n_pairs, replace=False)), keys, values):
        tok[w * P:(w + 1) * P] = BLOCK_FILL
        tok[w * P], tok[w * P + 1] = k, v
    answers = []
    for i, s in zip(rng.permutation(n_pairs), np.sort(rng.choice(L // 3, size=n_pairs, replace=False))):
        pos = distance * L + 3 * int(s)
        tok[pos], tok[pos + 1], tok[pos + 2] = QUERY, keys[i], values[i]
        mask[pos + 2] = True
        answers.append((pos + 2, int(keys[i]), int(values[i]), distance))
    return Document(tok, mask, name=f"mqar-{n_pairs}-{distance}", answers=answers)


def passkey_document(distance: int, cfg: TrainConfig, filler: Filler, rng: np.random.Generator) -> Document:
    """One pair hidden in segment 0, asked for in segment ``distance`` (:func:`mqar_document` with one pair)."""
    return mqar_document(1, distance, cfg, filler, rng)


# ------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def _answer_logits(model, docs, cfg: TrainConfig, batch: int, device):
    """For each document, the logits (n_answers, V) that predict its answers, reading it segment
    by segment from an empty memory (all documents of one call have the same length)."""
    L = cfg.segment_len
    out = []
    for i in range(0, len(docs), batch):
        group = docs[i:i + batch]
        x = torch.from_numpy(np.stack([d.tokens for d in group])).to(device)
        want = [[pos - 1 for pos, *_ in d.answers] for d in group]  # the logit at pos-1 predicts pos
        got = [[] for _ in group]
        state = None
        for s in range(x.shape[1] // L):
            lo = s * L
            need = [(b, p - lo) for b, ps in enumerate(want) for p in ps if lo <= p < lo + L]
            logits, state = model(x[:, lo:lo + L], state)
            for b, t in need:
                got[b].append(logits[b, t].float().cpu())
        out += [torch.stack(g) for g in got]
    return out


def recall_accuracy(model, docs, cfg: TrainConfig, batch: int = 64, device="cpu") -> float:
    """Fraction of the documents' answers whose argmax over the 256 bytes is the value."""
    hits = total = 0
    for doc, logits in zip(docs, _answer_logits(model, docs, cfg, batch, device)):
        values = torch.tensor([v for _, _, v, _ in doc.answers])
        hits += int((logits.argmax(-1) == values).sum())
        total += len(doc.answers)
    return hits / max(total, 1)


def _seeded(seed, *key):
    return np.random.default_rng([seed, 4242, *key])


def evaluate_passkey(model, cfg, filler, distances=DISTANCES, n_docs=64, seed=0, batch=64, device="cpu"):
    """{distance: accuracy} over ``n_docs`` documents per distance (the same documents for every model)."""
    return {d: recall_accuracy(model, [passkey_document(d, cfg, filler, _seeded(seed, 1, d, i)) for i in range(n_docs)],
                               cfg, batch, device) for d in distances}


def evaluate_mqar(model, cfg, filler, pairs=PAIRS, distances=DISTANCES, n_docs=32, seed=0, batch=64, device="cpu"):
    """{(n_pairs, distance): accuracy} (every pair of every document counts once)."""
    return {(n, d): recall_accuracy(
        model, [mqar_document(n, d, cfg, filler, _seeded(seed, 2, n, d, i)) for i in range(n_docs)], cfg, batch, device)
        for n in pairs for d in distances}


def file_start_documents(source: str, n_files: int, min_bytes: int = 64, seed: int = 0) -> list[Document]:
    """Whole files as documents (first byte unscored), deduplicated by content:
    ``source="stdlib-val"`` (the held-out stdlib files) or ``"site-packages"`` (``*.py`` under
    the interpreter's purelib, never read in training; ``n_files`` of them chosen by a hash of
    the path; files shorter than ``min_bytes`` or with a byte >= 128 skipped, so the recall
    task's key/value bytes never occur in them)."""
    if source == "stdlib-val":
        docs = stdlib_documents("val")
        return docs[:n_files] if n_files else docs
    if source != "site-packages":
        raise ValueError(f"source must be 'stdlib-val' or 'site-packages', got {source!r}")
    root = sysconfig.get_paths()["purelib"]
    paths = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True),
                   key=lambda p: hashlib.sha1(f"{seed}:{os.path.relpath(p, root)}".encode()).digest())
    docs, seen = [], set()
    for p in paths:
        if n_files and len(docs) >= n_files:
            break
        try:
            with open(p, "rb") as fh:
                data = fh.read().replace(bytes([PAD]), b" ")
        except OSError:
            continue
        digest = hashlib.sha1(data).digest()
        if len(data) < min_bytes or digest in seen or max(data) >= 128:
            continue
        seen.add(digest)
        tok = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        mask = np.ones(len(tok), dtype=bool)
        mask[0] = False
        docs.append(Document(tok, mask, name=os.path.relpath(p, root)))
    return docs


@torch.no_grad()
def file_start_bpb(model, docs, cfg: TrainConfig, n_segments: int = 4, batch: int = 64, device="cpu",
                   prime: torch.Tensor | None = None) -> dict:
    """Bits per byte by segment index over the first ``n_segments`` segments of each document
    (read from its start with an empty memory, or, with ``prime`` (P, L) tokens, with the memory
    left by reading those P segments first), and the mean probability of the recall task's
    key/value bytes (128..223) at scored positions, by segment index.

    Returns {"bpb": [per segment], "tokens": [...], "recall_mass": [...]}."""
    from chunkmem.training.data import pack_documents
    L = cfg.segment_len
    sums = np.zeros(n_segments)
    mass = np.zeros(n_segments)
    counts = np.zeros(n_segments, dtype=np.int64)
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for i in range(0, len(order), batch):
        group = [docs[j] for j in order[i:i + batch]]
        x, y, m = (torch.from_numpy(a).to(device) for a in pack_documents(group, L, n_segments))
        state = None
        if prime is not None:
            for s in range(prime.shape[0]):
                _, state = model(prime[s].to(device).expand(len(group), L), state)
        for s in range(n_segments):
            if not bool(m[:, s].any()):
                break
            logits, state = model(x[:, s], state)
            logp = F.log_softmax(logits.float(), dim=-1)
            nll = -logp.gather(-1, y[:, s, :, None])[..., 0]
            ms = m[:, s]
            sums[s] += float(nll[ms].sum())
            mass[s] += float(logp[..., KEY_LO:VALUE_LO + 32].exp().sum(-1)[ms].sum())
            counts[s] += int(ms.sum())
    return {"bpb": [float(a / max(c, 1) / LN2) for a, c in zip(sums, counts)], "tokens": counts.tolist(),
            "recall_mass": [float(a / max(c, 1)) for a, c in zip(mass, counts)]}


def _primes(cfg: TrainConfig, seed: int) -> dict:
    """One segment to read before a file start: stdlib training text (from the middle of a file),
    and segment 0 of a recall document (its pairs)."""
    from chunkmem.training.data import recall_document
    L = cfg.segment_len
    train = [d for d in stdlib_documents("train", val_fraction=cfg.val_fraction) if len(d) > 8 * L]
    doc = train[int(_seeded(seed, 3).integers(len(train)))]
    mid = len(doc) // 2
    text = doc.tokens[mid:mid + L]
    recall = recall_document(cfg.recall_spec(), _seeded(seed, 4)).tokens[:L]
    return {"+prime-text": torch.from_numpy(text)[None], "+prime-recall": torch.from_numpy(recall)[None]}


# ------------------------------------------------------------------------------- command line

def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``eval-longrange`` subcommand."""
    p = subparsers.add_parser(
        "eval-longrange", help="passkey / multi-query recall by distance, text at file starts",
        description="Evaluate checkpoints on passkey retrieval and multi-query associative recall by "
                    "distance in segments (and number of pairs), and bits per byte over the first segments "
                    "of many files; write <out>.md, <out>.json and <out>.png (heatmaps).")
    p.add_argument("--ckpt", action="append", required=True, metavar="NAME=PATH",
                   help="a model to evaluate: a label and a training checkpoint (repeat for several)")
    p.add_argument("--distances", default=",".join(map(str, DISTANCES)), help="segments between key and question")
    p.add_argument("--pairs", default=",".join(map(str, PAIRS)), help="MQAR numbers of pairs")
    p.add_argument("--filler", default="recall,text", help="comma-separated: recall, text")
    p.add_argument("--passkey-docs", type=int, default=64, help="documents per distance (default 64)")
    p.add_argument("--mqar-docs", type=int, default=32, help="documents per (pairs, distance) cell (default 32)")
    p.add_argument("--file-starts", type=int, default=0,
                   help="also bpb over the first --start-segments segments of this many (ASCII) site-packages files "
                        "and of every held-out stdlib file (0: skip)")
    p.add_argument("--start-segments", type=int, default=4)
    p.add_argument("--prime", action="store_true",
                   help="with --file-starts, memory models also read the file starts after their memory was "
                        "filled by one segment of stdlib training text ('+prime-text') or by the first segment "
                        "of a recall document ('+prime-recall') instead of starting empty")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated documents")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/out/longrange", help="output path without extension")
    return p


def main(args) -> int:
    torch.set_num_threads(args.threads)
    distances = [int(v) for v in args.distances.split(",") if v]
    pairs = [int(v) for v in args.pairs.split(",") if v]
    fillers = [f for f in args.filler.split(",") if f]
    models = {}
    for spec in args.ckpt:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--ckpt must be NAME=PATH, got {spec!r}")
        models[name] = (path, *load_checkpoint_model(path))
    cfg0 = next(iter(models.values()))[2]
    text_bytes = None
    if "text" in fillers:
        text_bytes = np.concatenate([d.tokens for d in stdlib_documents("val", val_fraction=cfg0.val_fraction)])
    results = {"meta": {"distances": distances, "pairs": pairs, "fillers": fillers, "seed": args.seed,
                        "passkey_docs": args.passkey_docs, "mqar_docs": args.mqar_docs, "torch": torch.__version__,
                        "threads": args.threads, "chance": 1.0 / cfg0.recall_values}, "models": {}}
    starts = {}
    if args.file_starts:
        starts = {"stdlib-val": file_start_documents("stdlib-val", 0),
                  "site-packages": file_start_documents("site-packages", args.file_starts, seed=args.seed)}
    for name, (path, model, cfg, init) in models.items():
        t0 = time.perf_counter()
        horizon = cfg.memory_slots * cfg.memory_pool / cfg.segment_len if cfg.model == "memory" else 0
        r = {"checkpoint": path, "model": cfg.model, "init_slots": init, "fifo_segments": horizon,
             "segment_len": cfg.segment_len, "passkey": {}, "mqar": {}, "file_starts": {}}
        for kind in fillers:
            filler = Filler(kind, cfg.recall_filler, text_bytes)
            r["passkey"][kind] = {str(d): a for d, a in evaluate_passkey(
                model, cfg, filler, distances, args.passkey_docs, args.seed, args.batch).items()}
            r["mqar"][kind] = {f"{n}x{d}": a for (n, d), a in evaluate_mqar(
                model, cfg, filler, pairs, distances, args.mqar_docs, args.seed, args.batch).items()}
        primes = {"": None}
        if args.prime and cfg.model == "memory":
            primes.update(_primes(cfg, args.seed))
        for src, docs in starts.items():
            for label, prime in primes.items():
                r["file_starts"][src + label] = dict(
                    file_start_bpb(model, docs, cfg, args.start_segments, args.batch, prime=prime), files=len(docs))
        r["seconds"] = time.perf_counter() - t0
        results["models"][name] = r
        print(f"{name}: {r['seconds']:.0f} s", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(results, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write(format_markdown(results))
    plot_heatmaps(results, args.out + ".png")
    print(format_markdown(results))
    print(f"wrote {args.out}.json, .md, .png")
    return 0


def format_markdown(results: dict) -> str:
    meta, models = results["meta"], results["models"]
    ds, lines = meta["distances"], []
    for kind in meta["fillers"]:
        lines += [f"### Passkey, {kind} filler: accuracy by distance in segments ({meta['passkey_docs']} "
                  f"documents each, chance {meta['chance']:.3f})", "",
                  "| model | FIFO horizon (segments) | " + " | ".join(f"d={d}" for d in ds) + " |",
                  "|---|---|" + "---|" * len(ds)]
        for name, r in models.items():
            lines.append(f"| {name} | {r['fifo_segments']:g} | "
                         + " | ".join(f"{r['passkey'][kind][str(d)]:.3f}" for d in ds) + " |")
        lines += ["", f"### MQAR, {kind} filler: accuracy by pairs x distance ({meta['mqar_docs']} documents "
                      "per cell)", "", "| model | pairs | " + " | ".join(f"d={d}" for d in ds) + " |",
                  "|---|---|" + "---|" * len(ds)]
        for name, r in models.items():
            for n in meta["pairs"]:
                lines.append(f"| {name} | {n} | " + " | ".join(f"{r['mqar'][kind][f'{n}x{d}']:.3f}" for d in ds) + " |")
        lines.append("")
    srcs = sorted({s for r in models.values() for s in r["file_starts"]})
    for src in srcs:
        any_r = next(r for r in models.values() if src in r["file_starts"])
        fs = any_r["file_starts"][src]
        nseg = len(fs["bpb"])
        lines += [f"### Text at file starts ({src}: {fs['files']} files; scored bytes per segment index: "
                  + ", ".join(map(str, fs["tokens"])) + ")", "",
                  "| model | " + " | ".join(f"bpb seg {s}" for s in range(nseg)) + " | "
                  + " | ".join(f"P(key/value byte) seg {s}" for s in range(nseg)) + " |",
                  "|---|" + "---|" * (2 * nseg)]
        for name, r in models.items():
            f = r["file_starts"].get(src)
            if f:
                lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in f["bpb"]) + " | "
                             + " | ".join(f"{v:.4f}" for v in f["recall_mass"]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_heatmaps(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meta, models = results["meta"], results["models"]
    ds, ps, kinds = meta["distances"], meta["pairs"], meta["fillers"]
    if not kinds:  # --filler "": file starts only, nothing to plot
        return
    names = list(models)
    cols = 1 + len(names)
    fig, axes = plt.subplots(len(kinds), cols, figsize=(3.2 * cols + 1, 3.2 * len(kinds) + 0.6), squeeze=False)
    fig.subplots_adjust(hspace=0.55, wspace=0.4, left=0.08, right=0.86)
    for row, kind in enumerate(kinds):
        grids = [np.array([[models[n]["passkey"][kind][str(d)] for d in ds] for n in names])]
        titles = [f"passkey ({kind} filler)"]
        for n in names:
            grids.append(np.array([[models[n]["mqar"][kind][f"{p}x{d}"] for d in ds] for p in ps]))
            titles.append(f"MQAR {n} ({kind})")
        for col, (g, title) in enumerate(zip(grids, titles)):
            ax = axes[row, col]
            im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(ds)), [str(d) for d in ds])
            ylabels = names if col == 0 else [str(p) for p in ps]
            ax.set_yticks(range(len(ylabels)), ylabels)
            ax.set_xlabel("distance (segments)")
            if col == 1:
                ax.set_ylabel("pairs")
            ax.set_title(title, fontsize=9)
            for (i, j), v in np.ndenumerate(g):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 else "black")
    fig.colorbar(im, cax=fig.add_axes((0.89, 0.15, 0.012, 0.7)), label="accuracy")
    fig.suptitle(f"long-range recall (chance {meta['chance']:.3f})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # python -m chunkmem.training.longrange --ckpt NAME=PATH ... (same options)
    import sys

    _parser = argparse.ArgumentParser(prog="python -m chunkmem.training.longrange")
    _sub = _parser.add_subparsers(dest="command")
    add_parser(_sub)
    sys.exit(main(_parser.parse_args(["eval-longrange", *sys.argv[1:]])))
