"""Whole runs: train one model (with periodic evaluation and checkpoints), evaluate it, and the
three-model comparison. Every process of a data-parallel run calls these; only rank 0 prints and
writes logs, plots and tables."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

from chunkmem.training.config import MODELS, TrainConfig, make_config
from chunkmem.training.data import stdlib_documents
from chunkmem.training.distributed import DistContext
from chunkmem.training.loop import Trainer
from chunkmem.training.outputs import device_name, format_table, median_load, plot_losses, progress_bar, write_csv

__all__ = ["default_ckpt_path", "latest_checkpoint", "train_run", "final_eval", "compare"]


def default_ckpt_path(cfg: TrainConfig, preset: str, parallel: str = "ddp") -> str:
    """``<run dir>/ckpt.pt`` (one file), or ``<run dir>/ckpt-sharded`` for FSDP2 runs."""
    return os.path.join(cfg.run_dir(preset), "ckpt-sharded" if parallel == "fsdp" else "ckpt.pt")


def latest_checkpoint(cfg: TrainConfig, preset: str) -> str | None:
    """The run directory's newer checkpoint of the two layouts (a run may switch between DDP and
    FSDP2), or None."""
    found = []
    for parallel in ("ddp", "fsdp"):
        path = default_ckpt_path(cfg, preset, parallel)
        marker = os.path.join(path, "latest") if parallel == "fsdp" else path
        if os.path.isfile(marker):
            found.append((os.path.getmtime(marker), path))
    return max(found)[1] if found else None


def train_run(cfg: TrainConfig, preset: str, resume: bool = True, progress: bool = True, val_docs=None, *,
              ctx: DistContext | None = None, parallel: str = "ddp", compile: bool = False,
              resume_from: str | None = None) -> Trainer:
    """Train up to cfg.steps with periodic evaluation and checkpoints; write the logs and the loss
    PNG. Resumes from ``resume_from`` when given (an error if it cannot be resumed), else from the
    run directory's latest checkpoint when there is one and ``resume``."""
    trainer = Trainer(cfg, ctx=ctx, parallel=parallel, compile=compile)
    ctx = trainer.ctx
    run_dir = cfg.run_dir(preset)
    ckpt_path = default_ckpt_path(cfg, preset, trainer.parallel)
    if resume_from is None and resume:
        resume_from = latest_checkpoint(cfg, preset)
    if resume_from is not None:
        trainer.load(resume_from)
    if ctx.is_main:
        os.makedirs(run_dir, exist_ok=True)
    val_docs = val_docs if val_docs is not None else stdlib_documents("val", val_fraction=cfg.val_fraction)
    n_params = sum(p.numel() for p in trainer.module.parameters())
    bar = progress_bar(progress and ctx.is_main, total=cfg.steps, initial=trainer.step_count, desc=f"{cfg.model}",
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
            if ctx.is_main:
                bar.write(f"[{cfg.model}] step {s}: val bpb first/after {ev['bpb_first']:.3f}/{ev['bpb_after']:.3f}"
                          + "".join(f" {k}={v:.2f}" for k, v in ev.items() if k.startswith("acc_")))
        if s % cfg.ckpt_every == 0 or s == cfg.steps:
            trainer.save(ckpt_path)
    bar.close()
    if ctx.is_main:
        write_csv(os.path.join(run_dir, "train_log.csv"), trainer.log)
        write_csv(os.path.join(run_dir, "eval_log.csv"), trainer.eval_log)
        with open(os.path.join(run_dir, "summary.json"), "w") as fh:
            json.dump({"config": dataclasses.asdict(cfg), "params": n_params, "steps": trainer.step_count,
                       "processes": ctx.world_size, "parallel": trainer.parallel,
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


def compare(preset: str, overrides: dict, out: str | None, progress: bool = True, tag: str = "",
            models=MODELS, command: str | None = None, *, ctx: DistContext | None = None,
            parallel: str = "ddp", compile: bool = False) -> dict:
    """Train (or resume) the models of a preset, evaluate each on the full held-out data and
    write ``lm_compare[_tag].json`` / ``.md`` / ``_loss.png`` (run directories: runs/<preset>[-tag]/)."""
    base = make_config(preset, **overrides)
    run_name = preset + (f"-{tag}" if tag else "")
    stem = "lm_compare" + (f"_{tag}" if tag else "")
    val_docs = stdlib_documents("val", val_fraction=base.val_fraction)
    results, curves = {}, {}
    device = None
    for name in models:
        cfg = make_config(preset, **{**overrides, "model": name})
        trainer = train_run(cfg, run_name, progress=progress, val_docs=val_docs, ctx=ctx, parallel=parallel,
                            compile=compile)
        ctx, device = trainer.ctx, trainer.device
        ev = final_eval(trainer, val_docs)
        tps = [r["tokens_per_s"] for r in trainer.log]
        results[name] = {"params": sum(p.numel() for p in trainer.module.parameters()),
                         "steps": trainer.step_count, "train_seconds": trainer.elapsed,
                         "tokens_per_s": float(np.median(tps)) if tps else float("nan"),
                         "train_tokens": trainer.step_count * (cfg.text_rows + cfg.recall_rows) * cfg.n_seg * cfg.segment_len,
                         "loadavg_1m_median": median_load(trainer.log), "eval": ev}
        curves[name] = (trainer.log, trainer.eval_log)
        del trainer
    if not ctx.is_main:
        return results
    table = format_table(results, base)
    out = out or os.path.join("bench", "out", device_name(device))
    os.makedirs(out, exist_ok=True)
    cfg_d = dataclasses.asdict(base)
    cfg_d.pop("model")
    val_n = len(val_docs) if base.final_text_docs is None else min(base.final_text_docs, len(val_docs))
    meta = {"preset": preset, "device": device_name(device), "torch": torch.__version__,
            "threads": base.threads if device.type == "cpu" else None, "processes": ctx.world_size,
            "config": cfg_d, "val_files": val_n, "recall_chance": 1.0 / base.recall_values,
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
