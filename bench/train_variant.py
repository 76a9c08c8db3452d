"""Train one model of a ``chunkmem.train`` preset with a data option the preset has no field for:

- ``--text-piece-segments K``: each stdlib training file is cut at line ends into pieces of at
  most K segments, each read as its own document (memory emptied at its start), so text starts
  are more common in training.

The learned initial memory and the memory resets are config fields now
(``python -m chunkmem.train train --init-slots K --recall-carry --text-reset-prob P``); this
script passes the same options through (``--init-slots``, ``--recall-carry``,
``--text-reset-prob``) so a variant can combine them with text pieces.

Everything else (data, schedule, evaluation, checkpoint layout) is the preset's. Writes
``<out-dir>/<preset>/<name>/ckpt.pt`` (a chunkmem training checkpoint) and ``summary.json`` with
the final evaluation on the whole held-out set.

    python bench/train_variant.py --model memory --text-piece-segments 64 --seed 0 --out-dir runs_v2/s0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chunkmem.training import loop as loop_module  # noqa: E402
from chunkmem.training.config import make_config  # noqa: E402
from chunkmem.training.data import Document, stdlib_documents  # noqa: E402
from chunkmem.training.run import final_eval  # noqa: E402


def text_pieces(docs, max_len):
    """Each document cut at line ends into pieces of at most ``max_len`` bytes (a longer line is cut
    where it reaches the limit); every piece's first byte is unscored, as a file's."""
    out = []
    for d in docs:
        tok, start = d.tokens, 0
        while start < len(tok):
            end = min(start + max_len, len(tok))
            if end < len(tok):
                nl = np.flatnonzero(tok[start:end] == ord("\n"))
                if nl.size and nl[-1] > 0:
                    end = start + int(nl[-1]) + 1
            if end - start >= 2:
                mask = np.ones(end - start, dtype=bool)
                mask[0] = False
                out.append(Document(tok[start:end].copy(), mask, name=f"{d.name}@{start}"))
            start = end
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--model", default="memory", choices=("memory", "nomem", "transformer"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--text-rows", type=int, default=None)
    p.add_argument("--recall-rows", type=int, default=None)
    p.add_argument("--init-slots", type=int, default=0)
    p.add_argument("--recall-carry", action="store_true")
    p.add_argument("--text-reset-prob", type=float, default=0.0)
    p.add_argument("--text-piece-segments", type=int, default=0)
    p.add_argument("--name", default=None, help="run folder name (default: derived from the options)")
    p.add_argument("--out-dir", default="runs_v2")
    args = p.parse_args(argv)

    if args.init_slots and args.model != "memory":
        raise SystemExit("--init-slots needs --model memory")
    cfg = make_config(args.preset, model=args.model, seed=args.seed, steps=args.steps, threads=1,
                      text_rows=args.text_rows, recall_rows=args.recall_rows, out_dir=args.out_dir,
                      init_slots=args.init_slots, recall_carry=args.recall_carry,
                      text_reset_prob=args.text_reset_prob)
    name = args.name or "-".join([args.model] + ([f"init{args.init_slots}"] if args.init_slots else [])
                                 + (["carry"] if args.recall_carry else [])
                                 + ([f"reset{args.text_reset_prob:g}"] if args.text_reset_prob else [])
                                 + ([f"pieces{args.text_piece_segments}"] if args.text_piece_segments else []))
    run_dir = os.path.join(args.out_dir, args.preset, name)
    os.makedirs(run_dir, exist_ok=True)
    train_docs = stdlib_documents("train", val_fraction=cfg.val_fraction)
    if args.text_piece_segments:
        train_docs = text_pieces(train_docs, args.text_piece_segments * cfg.segment_len)
    val_docs = stdlib_documents("val", val_fraction=cfg.val_fraction)
    trainer = loop_module.Trainer(cfg, train_docs=train_docs)
    t0 = time.time()
    while trainer.step_count < cfg.steps:
        row = trainer.step()
        s = trainer.step_count
        if s % cfg.eval_every == 0 or s == cfg.steps:
            ev = trainer.evaluate(cfg.eval_text_docs, cfg.eval_recall_docs, val_docs)
            trainer.eval_log.append(ev)
            print(f"[{name}] step {s}: loss {row['loss']:.3f} val bpb first/after {ev['bpb_first']:.3f}/"
                  f"{ev['bpb_after']:.3f}" + "".join(f" {k}={v:.2f}" for k, v in ev.items() if k.startswith("acc_")),
                  flush=True)
    trainer.save(os.path.join(run_dir, "ckpt.pt"))
    ev = final_eval(trainer, val_docs)
    summary = {"config": dataclasses.asdict(cfg), "variant": vars(args), "name": name,
               "params": sum(p.numel() for p in trainer.module.parameters()), "steps": trainer.step_count,
               "train_seconds": trainer.elapsed, "wall_seconds": time.time() - t0,
               "train_text_documents": len(train_docs), "final_eval": ev, "eval": trainer.eval_log,
               "train_log_tail": trainer.log[-50:]}
    with open(os.path.join(run_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps(ev, indent=1))


if __name__ == "__main__":
    main()
