"""PNG plots of a sweep: time and peak memory against T, log-log, one line per implementation."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_results", "sweep_title"]

METRICS = {"time": ("median_ms", "median time (ms)"), "memory": ("peak_mem_mb", "peak memory (MiB)")}
IMPL_COLORS = {"chunkmem-torch": "C0", "chunkmem-triton": "C1", "chunkmem-reference": "C7",
               "sdpa": "C3", "flex": "C2"}
OP_STYLES = {"global+chunk+memory": "-", "chunk+memory": "--", "chunk": ":", "causal": "-"}


def sweep_title(device: str, dtype: str, cfg: dict) -> str:
    """'<device> <dtype> B=.. H=.. D=.. chunk=.. S=..' from a sweep config (dict)."""
    return (f"{device} {dtype} B={cfg.get('B')} H={cfg.get('H')} D={cfg.get('D')} "
            f"chunk={cfg.get('chunk_size')} S={cfg.get('S')}")


def _series(records, pass_):
    """{(impl, op): [(T, record), ...]} of the attention points of one pass."""
    out = {}
    for r in records:
        if r["op"] != "model" and r["pass"] == pass_:
            out.setdefault((r["impl"], r["op"]), []).append((r["T"], r))
    return {k: sorted(v, key=lambda tr: tr[0]) for k, v in sorted(out.items())}


def plot_results(records, out_dir, title: str = "") -> list[Path]:
    """Write <out_dir>/time_vs_T.png and memory_vs_T.png (a panel per pass); returns the paths.

    Points that are not ok are left out of the lines; an OOM point is marked with an 'x' at the
    top of its panel.
    """
    out_dir = Path(out_dir)
    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p and r["op"] != "model" for r in records)]
    paths = []
    for name, (key, label) in METRICS.items():
        fig, axes = plt.subplots(1, len(passes), figsize=(7 * len(passes), 5.5), squeeze=False)
        for ax, pass_ in zip(axes[0], passes):
            for (impl, op), pts in _series(records, pass_).items():
                ok = [(t, r[key]) for t, r in pts if r["status"] == "ok" and r[key] is not None and r[key] > 0]
                if not ok:
                    continue
                line, = ax.plot(*zip(*ok), marker="o", label=f"{impl} [{op}]",
                                color=IMPL_COLORS.get(impl), linestyle=OP_STYLES.get(op, ":"))
                ooms = [t for t, r in pts if r["status"] == "oom"]
                if ooms:
                    ax.plot(ooms, [max(v for _, v in ok)] * len(ooms), "x", color=line.get_color(), ms=10)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.set_title(f"{pass_}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{title} - {name}")
        fig.tight_layout()
        path = out_dir / f"{name}_vs_T.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """``python -m bench.plots <results.json>``: redraw the PNGs next to a results.json."""
    import sys

    from bench.common import read_results

    argv = sys.argv[1:] if argv is None else argv
    meta, records = read_results(argv[0])
    title = sweep_title(meta.get("device", ""), meta.get("dtype", ""), meta.get("config", {}))
    for path in plot_results(records, Path(argv[0]).parent, title=title):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
