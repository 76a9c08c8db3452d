"""``python -m bench``: sweep sequence length for the hybrid attention op and its peers.

Default on CPU (fp32): T = 512..16k; on a GPU (bf16): T = 1k..128k until out of memory. Writes
bench/results/<device-name>/{results.csv, results.json, report.md, time_vs_T.png,
memory_vs_T.png} and prints the report. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch  # bench/__init__.py has set OMP_WAIT_POLICY before this first torch import

from bench.cases import IMPL_OPS, MODEL_IMPLS
from bench.common import device_name, results_dir, write_results
from bench.plots import plot_results, sweep_title
from bench.report import report
from bench.sweep import PASSES, SweepConfig, plan, run_plan

CPU_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_SEQ_LENS = tuple(2 ** i for i in range(10, 18))  # 1k .. 128k


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def _names(text):
    return tuple(x for x in text.split(",") if x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--seq-lens", type=_ints, help="comma-separated T values (default: per device)")
    p.add_argument("--impls", type=_names,
                   help=f"comma-separated subset of {','.join(IMPL_OPS)} (default: all that run on the device)")
    p.add_argument("--passes", type=_names, default=PASSES, help="fwd,fwd+bwd")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--S", type=int, default=64, help="memory slots (mem_len = S: all valid)")
    p.add_argument("--rope-base", type=float, default=None, help="fused RoPE in the chunkmem op (default off)")
    p.add_argument("--reference-max-t", type=int, help="largest T for the O(T^2) reference (CPU 1024, GPU 8192)")
    p.add_argument("--model-impls", type=_names,
                   help=f"subset of {','.join(MODEL_IMPLS)}; '' skips the model rows "
                        "(CPU default chunkmem-lm,sdpa-transformer; GPU all three)")
    p.add_argument("--model-T", type=int, help="sequence length of the model rows (CPU 4096, GPU 32768)")
    p.add_argument("--model-heads", type=int, help="heads of the model rows, d_model = heads*D (CPU 4, GPU 8)")
    p.add_argument("--model-layers", type=int, help="layers of the model rows (CPU 2, GPU 4)")
    p.add_argument("--model-segment-len", type=int, help="ChunkMemLM segment_len (CPU 1024, GPU 4096)")
    p.add_argument("--min-repeats", type=int, default=3, help="CPU: at least this many timed calls")
    p.add_argument("--max-repeats", type=int, default=20, help="CPU: at most this many timed calls")
    p.add_argument("--min-time", type=float, default=1.0, help="CPU: time calls for at least this long (s)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--point-timeout", type=float, default=600.0, help="CPU: seconds before a point is killed")
    p.add_argument("--out", help="output folder (default bench/results/<device-name>)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args) -> SweepConfig:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is available")
    impls = args.impls or tuple(i for i in IMPL_OPS if gpu or i != "chunkmem-triton")
    unknown = set(impls) - set(IMPL_OPS)
    if unknown:
        raise SystemExit(f"unknown impls {sorted(unknown)}; choose from {list(IMPL_OPS)}")
    if "chunkmem-triton" in impls and not gpu:
        raise SystemExit("chunkmem-triton needs a GPU (on CPU it would only run in the Triton interpreter)")

    def pick(value, cpu_default, gpu_default):
        return value if value is not None else (gpu_default if gpu else cpu_default)

    return SweepConfig(
        device=device, dtype="bfloat16" if gpu else "float32",
        seq_lens=args.seq_lens or (GPU_SEQ_LENS if gpu else CPU_SEQ_LENS),
        impls=impls, passes=args.passes, B=args.B, H=args.H, D=args.D, chunk_size=args.chunk_size,
        S=args.S, rope_base=args.rope_base,
        reference_max_t=pick(args.reference_max_t, 1024, 8192),
        model_impls=pick(args.model_impls, ("chunkmem-lm", "sdpa-transformer"), MODEL_IMPLS),
        model_T=pick(args.model_T, 4096, 32768),
        model_H=pick(args.model_heads, 4, 8), model_layers=pick(args.model_layers, 2, 4),
        model_segment_len=pick(args.model_segment_len, 1024, 4096),
        min_repeats=args.min_repeats, max_repeats=args.max_repeats, min_time_s=args.min_time,
        point_timeout_s=args.point_timeout)


def _load(avg):
    return "/".join(f"{x:.1f}" for x in avg)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    name = device_name(cfg.device)
    out_dir = results_dir(name) if args.out is None else args.out
    specs = plan(cfg)
    print(f"bench: {len(specs)} points on {name} ({cfg.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads) -> {out_dir}", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    records = run_plan(specs, cfg, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    meta = {"device": name, "dtype": cfg.dtype, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(wall, 1), "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": load_after, "config": vars(cfg)}
    csv_path, json_path = write_results(records, out_dir, meta=meta)
    title = sweep_title(name, cfg.dtype, vars(cfg))
    pngs = plot_results(records, out_dir, title=title)
    header = (f"## bench results: {title}\n\n{len(records)} points, wall time {wall:.0f} s, "
              f"torch {torch.__version__}, {meta['threads']} threads, {meta['date_utc']}; load average "
              f"(1/5/15 min) before {_load(load_before)}, after {_load(load_after)} "
              f"(other processes on the machine inflate CPU times)")
    text = report(records, header)
    Path(out_dir, "report.md").write_text(text)
    print(text)
    print("wrote", csv_path, json_path, *pngs, Path(out_dir, "report.md"), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
