"""Tables of ``bench/results/<device>/lm_compare_v3.md`` from checkpoints and eval-longrange outputs.

    python bench/lm_compare_v3.py eval --ckpt memory/s0=PATH --ckpt nomem/s0=PATH ... --out E.json
    python bench/lm_compare_v3.py table --evals E.json --longrange L0.json --longrange L1.json

``eval``: for each checkpoint (any ``ckpt.pt`` written by ``python -m chunkmem.train`` or
bench/train_variant.py), the final evaluation of ``python -m chunkmem.train`` (bits per byte on
the held-out stdlib files from their start, at most ``eval_max_segments`` segments, by segment
index; recall accuracy on ``final_recall_docs`` held-out documents), its training seconds and the
config fields that say how its memory was emptied in training. Labels are ``model/sSEED``.

``table``: markdown tables (held-out stdlib and recall; first segments of many files from the
eval-longrange JSON files, whose model names must be the same labels without the seed, one JSON
per seed given as ``--longrange`` in seed order, or labels with the seed).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from chunkmem.training.data import stdlib_documents
from chunkmem.training.evaluation import evaluate_recall, evaluate_text, recall_eval_documents
from chunkmem.training.longrange import load_checkpoint_model

OPTIONS = ("init_slots", "recall_carry", "text_reset_prob", "recall_text_prefix", "text_rows", "recall_rows")


def run_eval(args) -> int:
    torch.set_num_threads(1)
    out = {}
    val = None
    for spec in args.ckpt:
        label, _, path = spec.partition("=")
        model, cfg, init = load_checkpoint_model(path)
        if val is None:
            val = stdlib_documents("val", val_fraction=cfg.val_fraction)
        t0 = time.perf_counter()
        docs = val if cfg.final_text_docs is None else val[:cfg.final_text_docs]
        ev = evaluate_text(model, docs, cfg, torch.device("cpu"))
        ev.update(evaluate_recall(model, recall_eval_documents(cfg, cfg.final_recall_docs), cfg, torch.device("cpu")))
        ev["eval_seconds"] = time.perf_counter() - t0
        ck = torch.load(path, weights_only=False, map_location="cpu")
        ev["train_seconds"] = float(ck.get("elapsed", float("nan")))
        ev["checkpoint"] = path
        ev["options"] = {k: getattr(cfg, k) for k in OPTIONS} | {"init_slots": init}
        out[label] = ev
        print(f"{label}: first {ev['bpb_first']:.3f} after {ev['bpb_after']:.3f} recall "
              + "/".join(f"{ev[f'acc_d{d}']:.3f}" for d in cfg.recall_distances), flush=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


SEGS = ("0", "1", "2-3", "4-7", "8-15", "16-31", "32-63")


def run_table(args) -> int:
    evals = {}
    for p in args.evals:
        evals.update(json.load(open(p)))
    lines = ["| model | seed | 1st segment | after | " + " | ".join(f"seg {s}" for s in SEGS[1:])
             + " | recall d=1 | d=2 | d=4 |", "|---|---|---|---|" + "---|" * (len(SEGS) + 2)]
    for label, ev in evals.items():
        name, _, seed = label.rpartition("/s")
        lines.append(f"| {name} | {seed} | {ev['bpb_first']:.3f} | {ev['bpb_after']:.3f} | "
                     + " | ".join(f"{ev[f'bpb_seg{s}']:.3f}" for s in SEGS[1:]) + " | "
                     + " | ".join(f"{ev[f'acc_d{d}']:.3f}" for d in (1, 2, 4)) + " |")
    print("\n".join(lines) + "\n")
    src = args.source
    lines = ["| model | seed | memory at file start | bpb seg 0 | seg 1 | seg 2 | seg 3 | seg 1-3 | P(k/v) seg 0 |"
             " P(k/v) seg 1-3 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, p in enumerate(args.longrange):
        res = json.load(open(p))["models"]
        for label in ("", "+prime-text", "+prime-recall"):
            for name, r in res.items():
                f = r["file_starts"].get(src + label)
                if not f:
                    continue
                nm, _, s = name.rpartition("/s")
                nm, s = (nm, s) if nm else (name, str(seed))
                b, t, m = f["bpb"], f["tokens"], f["recall_mass"]
                later = sum(x * n for x, n in zip(b[1:], t[1:])) / sum(t[1:])
                mlater = sum(x * n for x, n in zip(m[1:], t[1:])) / sum(t[1:])
                what = {"": "empty", "+prime-text": "primed: text", "+prime-recall": "primed: recall"}[label]
                lines.append(f"| {nm} | {s} | {what} | " + " | ".join(f"{v:.3f}" for v in b) + f" | {later:.3f} | "
                             f"{m[0]:.4f} | {mlater:.4f} |")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--ckpt", action="append", required=True, metavar="LABEL=PATH")
    e.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("--evals", action="append", default=[])
    t.add_argument("--longrange", action="append", default=[])
    t.add_argument("--source", default="site-packages")
    args = p.parse_args(argv)
    return run_eval(args) if args.command == "eval" else run_table(args)


if __name__ == "__main__":
    raise SystemExit(main())
