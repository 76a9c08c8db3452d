"""What a run writes besides checkpoints: CSV logs, the loss-curve PNG and the comparison table."""
from __future__ import annotations

import csv
import math
import re
import sys

import numpy as np
import torch

from chunkmem.training.config import TrainConfig

__all__ = ["write_csv", "plot_losses", "device_name", "median_load", "format_table", "progress_bar"]


class _NoBar:
    """Stands in for a tqdm bar: prints the messages, shows nothing else."""

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def write(self, msg):
        print(msg)

    def close(self):
        pass


def progress_bar(show: bool, **kw):
    """A tqdm progress bar (``kw`` are tqdm's), or a silent stand-in when ``show`` is False or
    tqdm (an optional dependency, the "bench" extra) is not installed; ``write`` prints either way."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(disable=not show, **kw)


def write_csv(path: str, rows: list[dict]) -> None:
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
    try:
        import matplotlib
    except ImportError:  # an optional dependency (the "bench" extra)
        print(f"matplotlib is not installed: {path} not written", file=sys.stderr)
        return
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


def median_load(log: list[dict]):
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
