"""The training step: :class:`Trainer` holds the model, optimizer, schedule, data streams and the
carried memory of one process of a run (one process, or one rank of a DDP/FSDP2 run).

Data parallelism: each process reads its slice of the global batch's rows
(:func:`chunkmem.training.sharding.row_slice`) and carries the memory of those rows only. The loss
is normalized by the token counts of the *global* batch (one all-reduce of four numbers per
step), and the local loss is scaled by the number of processes before ``backward`` because DDP
and FSDP2 average the gradients; so the gradient, the logged loss and the update are those of one
process on the whole batch, up to float32 summation order.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from chunkmem.nn import MemoryState
from chunkmem.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from chunkmem.training.config import TrainConfig, build_model, resolve_device
from chunkmem.training.data import recall_stream, stdlib_documents, text_stream
from chunkmem.training.distributed import DistContext, unwrap_model, wrap_model
from chunkmem.training.evaluation import (LN2, autocast, evaluate_recall, evaluate_text, recall_eval_documents,
                                          run_segments, token_nll)
from chunkmem.training.sharding import row_slice

__all__ = ["Trainer", "lr_lambda", "clip_grad_norm"]


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def clip_grad_norm(params, max_norm: float) -> float:
    """``clip_grad_norm_`` that also works on FSDP2's sharded (DTensor) gradients: the norm is
    that of the whole gradient. Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if hasattr(total, "full_tensor"):  # DTensor: a partial norm on each shard
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


class Trainer:
    """Model, optimizer, schedule, data streams and carried memory of one run (this process's part).

    ``step()`` does one optimizer step and returns its metrics; ``save``/``load`` checkpoint all of
    it (resuming gives the same next steps as not stopping; see :mod:`chunkmem.training.checkpoint`).

    ctx: the process group (default: one process); parallel: "ddp" or "fsdp" (ignored on one
    process); compile: run the model through ``torch.compile`` (True: the default inductor
    backend, or a backend name such as "aot_eager"; see :func:`wrap_model`)."""

    def __init__(self, cfg: TrainConfig, train_docs=None, ctx: DistContext | None = None,
                 parallel: str = "ddp", compile: bool | str = False):
        self.cfg = cfg
        self.ctx = ctx or DistContext(device=resolve_device(cfg))
        self.device = self.ctx.device
        self.parallel = parallel if self.ctx.active else "none"
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        module = build_model(cfg).to(self.device)
        self.model = wrap_model(module, self.ctx, parallel, compile)
        # evaluation: the plain module under DDP (no collectives), the sharded module under FSDP2
        self.eval_model = unwrap_model(self.model)
        params = list(self.model.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=tuple(cfg.betas))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        rank, world = self.ctx.rank, self.ctx.world_size
        self.rows = {"text": row_slice(cfg.text_rows, rank, world),
                     "recall": row_slice(cfg.recall_rows, rank, world)}
        self.streams = {}
        docs = None
        if cfg.text_rows or cfg.recall_text_prefix:
            docs = train_docs if train_docs is not None else stdlib_documents("train", val_fraction=cfg.val_fraction)
        if cfg.text_rows:
            self.streams["text"] = text_stream(docs, cfg.text_rows, cfg.segment_len, cfg.seed, self.rows["text"],
                                               reset_prob=cfg.text_reset_prob)
        if cfg.recall_rows:
            self.streams["recall"] = recall_stream(cfg.recall_spec(), cfg.recall_rows, cfg.seed, self.rows["recall"],
                                                   prefix_docs=docs if cfg.recall_text_prefix else None)
        if not self.streams:
            raise ValueError("need text_rows > 0 or recall_rows > 0")
        self.state = None  # carried memory (MemoryState) of this process's rows, text rows first
        self.step_count = 0
        self.log: list[dict] = []
        self.eval_log: list[dict] = []
        self.elapsed = 0.0  # training seconds over all sessions of the run

    @property
    def module(self) -> torch.nn.Module:
        """The model without DDP / torch.compile wrappers (FSDP2: the sharded module)."""
        return unwrap_model(self.model)

    # -- one step
    def _next_batch(self):
        parts = [s.next_window(self.cfg.n_seg) for s in self.streams.values()]
        if self.cfg.recall_carry and "recall" in self.streams:
            # recall rows keep their memory across recall documents: in training an empty memory
            # then only occurs in text rows (and at step 0), never as the mark of a recall document
            x, y, m, reset = parts[-1]
            parts[-1] = (x, y, m, np.zeros_like(reset))
        x, y, m, reset = (torch.from_numpy(np.concatenate(a)).to(self.device) for a in zip(*parts))
        is_text = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
        is_text[: len(self.rows["text"]) if "text" in self.streams else 0] = True
        return x, y, m, reset, is_text

    def step(self) -> dict:
        cfg, world = self.cfg, self.ctx.world_size
        t0 = time.perf_counter()
        x, y, m, reset, is_text = self._next_batch()
        with autocast(self.device):
            logits, state = run_segments(self.model, x, reset, self.state)
        nll = token_nll(logits, y)
        mt = m & is_text[:, None, None]
        mr = m & ~is_text[:, None, None]
        sums = torch.stack([(nll * mt).sum(), (nll * mr).sum()])
        # global token counts and loss sums (float32: counts are exact below 2**24 tokens a step)
        stats = self.ctx.all_reduce_sum(torch.cat([sums.detach(), torch.stack([mt.sum(), mr.sum()]).float()]))
        n_text, n_recall = stats[2].clamp(min=1), stats[3].clamp(min=1)
        loss = sums[0] / n_text + cfg.recall_weight * (sums[1] / n_recall)
        if world > 1:
            loss = loss * world  # DDP / FSDP2 average the gradients over the processes
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad_norm(self.model.parameters(), cfg.grad_clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.state = state.detach() if state is not None else None
        self.step_count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.elapsed += dt
        text_loss, recall_loss = float(stats[0] / n_text), float(stats[1] / n_recall)
        row = {"step": self.step_count, "lr": lr, "loss": text_loss + cfg.recall_weight * recall_loss,
               "text_bpb": text_loss / LN2, "recall_loss": recall_loss, "grad_norm": gnorm,
               "tokens_per_s": x.numel() * world / dt, "elapsed_s": self.elapsed,
               "loadavg_1m": os.getloadavg()[0]}
        self.log.append(row)
        return row

    # -- evaluation
    def evaluate(self, n_text_docs, n_recall_docs, val_docs) -> dict:
        """Validation metrics of the whole held-out set (shared out over the processes)."""
        docs = val_docs if n_text_docs is None else val_docs[:n_text_docs]
        out = {"step": self.step_count}
        out.update(evaluate_text(self.eval_model, docs, self.cfg, self.device, self.ctx))
        out.update(evaluate_recall(self.eval_model, recall_eval_documents(self.cfg, n_recall_docs), self.cfg,
                                   self.device, self.ctx))
        return out

    # -- the state of the run, independent of the number of processes
    def _local_kinds(self):
        """(kind, number of this process's rows of that kind) in the order of the batch rows."""
        return [(k, len(self.rows[k])) for k in ("text", "recall") if k in self.streams]

    def run_state(self) -> dict:
        """Step, schedule, data position and carried memory in global row order, logs, and the RNG
        states of every process: plain containers and tensors. A collective: every process calls
        it; the result is the same on every process (RNG states aside)."""
        data = {}
        positions = self.ctx.all_gather_object({k: s.state_dict() for k, s in self.streams.items()})
        for k in self.streams:
            data[k] = {f: [v for p in positions for v in p[k][f]] for f in ("doc_index", "seg_offset")}
        memory = None
        if self.state is not None:
            memory = {"n_layers": torch.tensor(len(self.state.layers))}
            for i, lm in enumerate(self.state.layers):
                if lm is None:
                    continue
                for name, t in zip(("memory", "mem_len"), lm):
                    memory[f"{i}.{name}"] = self._rows_to_global(t.detach())
        return {"step": self.step_count, "scheduler": self.sched.state_dict(),
                "data": data, "memory_state": memory, "rng": self.ctx.all_gather_object(rng_state()),
                "log": list(self.log), "eval_log": list(self.eval_log), "elapsed": self.elapsed}

    def _rows_to_global(self, t: torch.Tensor) -> torch.Tensor:
        """(local rows, ...) text rows first -> (global rows, ...) on the CPU, all text rows first."""
        gathered = [g.cpu() for g in self.ctx.all_gather_tensor(t)]
        out, start = [], 0
        for _kind, n in self._local_kinds():
            out += [g[start: start + n] for g in gathered]
            start += n
        return torch.cat(out)

    def _rows_to_local(self, t: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for kind, n in self._local_kinds():
            total = getattr(self.cfg, f"{kind}_rows")
            r = self.rows[kind]
            parts.append(t[start + r.start: start + r.stop])
            start += total
        return torch.cat(parts).to(self.device)

    def load_run_state(self, rs: dict) -> None:
        """Inverse of :meth:`run_state` (any number of processes, if the rows split evenly)."""
        self.sched.load_state_dict(rs["scheduler"])
        self.step_count = int(rs["step"])
        for k, s in self.streams.items():
            r = self.rows[k]
            s.load_state_dict({f: rs["data"][k][f][r.start: r.stop] for f in ("doc_index", "seg_offset")})
        ms = rs["memory_state"]
        if ms is None:
            self.state = None
        else:
            local = {k: (self._rows_to_local(v) if k != "n_layers" else v) for k, v in ms.items()}
            self.state = MemoryState.from_state_dict(local)
        self.log, self.eval_log = list(rs["log"]), list(rs["eval_log"])
        self.elapsed = float(rs["elapsed"])
        rngs = rs["rng"]
        set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])

    # -- checkpoints
    def save(self, path: str) -> None:
        """Checkpoint the run to ``path`` (collective; see :mod:`chunkmem.training.checkpoint`)."""
        save_checkpoint(self, path)

    def load(self, path: str) -> None:
        """Resume from the checkpoint at ``path``; raises CheckpointError (a ValueError) before
        changing anything when it is missing, unreadable, unsafe or from another configuration."""
        load_checkpoint(self, path)

