"""python -m bench: time and peak memory of the hybrid attention op and its peers against the
sequence length T, one point per (op, implementation, pass, T), plus whole-model rows.

Default on CPU (fp32): T = 512..16k, chunkmem's PyTorch fallback beside SDPA causal,
FlexAttention (compiled; chunk-only and chunk+memory forward) and the reference backend (T <= 1k),
plus two whole models at T = 4096. On a GPU (bf16): T = 1k..128k until out of memory, with the
Triton kernels. Each CPU point runs in its own child process (its own peak memory).

Output: bench/out/<device-name>/ by default (untracked), with results.csv, results.json,
report.md (the tables, also printed), time_vs_T.png, memory_vs_T.png and PROVENANCE.md (machine
and command). The committed results the README quotes live in bench/results/<device-name>/ and
are regenerated only on purpose: python -m bench --out bench/results/<device-name>.

Duration on a 2-core CPU (this project's machine): the default sweep (86 points) took 25 min
while other jobs loaded the machine (load average 7-13); its 58 points other than the chunk-only
rows took 3.5 min when it was quiet. --seq-lens 512,1024 --model-impls '' --min-time 0.2 took
1.7 min. See bench/README.md for the method.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch  # bench/__init__.py has set OMP_WAIT_POLICY before this first torch import

from bench.cases import IMPL_OPS, MODEL_IMPLS
from bench.common import (RESULTS_ROOT, default_out_dir, describe_machine, device_name,
                          machine_info, write_provenance, write_results)
from bench.plots import plot_results, sweep_title
from bench.report import header_of, report
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
    g = p.add_argument_group("what runs")
    g.add_argument("--device", default="auto",
                   help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N; the dtype follows: "
                        "fp32 on CPU, bf16 on a GPU (default: auto)")
    g.add_argument("--seq-lens", type=_ints, metavar="T,T,...",
                   help="comma-separated sequence lengths (default: CPU 512,1024,...,16384; "
                        "GPU 1024,...,131072)")
    g.add_argument("--impls", type=_names, metavar="IMPL,...",
                   help=f"comma-separated subset of {','.join(IMPL_OPS)}; each runs the ops it has "
                        "(chunkmem-*: global+chunk+memory, chunk+memory, chunk; sdpa: causal; flex: "
                        "chunk+memory, chunk) (default: all that run on the device: chunkmem-triton "
                        "only on a GPU)")
    all_ops = tuple(dict.fromkeys(op for ops in IMPL_OPS.values() for op in ops))
    g.add_argument("--ops", type=_names, metavar="OP,...",
                   help=f"comma-separated subset of {','.join(all_ops)}: only these attention ops "
                        "(default: every op of each impl)")
    g.add_argument("--passes", type=_names, default=PASSES, metavar="PASS,...",
                   help="fwd (forward under no_grad) and/or fwd+bwd (forward, then backward of a "
                        "fixed output gradient) (default: fwd,fwd+bwd)")
    g.add_argument("--reference-max-t", type=int, metavar="T",
                   help="largest T for the dense O(T^2) reference backend (default: CPU 1024, GPU 8192)")
    g = p.add_argument_group("attention shape")
    g.add_argument("--B", type=int, default=1, help="batch size (default: 1)")
    g.add_argument("--H", type=int, default=8, help="heads, query and key/value (default: 8)")
    g.add_argument("--D", type=int, default=64, help="head dim (default: 64)")
    g.add_argument("--chunk-size", type=int, default=64, help="chunk path's chunk size, also FlexAttention's mask (default: 64)")
    g.add_argument("--S", type=int, default=64, help="memory slots, mem_len = S: all valid (default: 64)")
    g.add_argument("--rope-base", type=float, default=None,
                   help="turn on the fused RoPE of the chunkmem op with this base (default: off)")
    g = p.add_argument_group("whole-model rows (forward+backward of a next-token loss)")
    g.add_argument("--model-impls", type=_names, metavar="IMPL,...",
                   help=f"subset of {','.join(MODEL_IMPLS)}; '' skips the model rows "
                        "(default: CPU chunkmem-lm,sdpa-transformer; GPU all three)")
    g.add_argument("--model-T", type=int, help="sequence length (default: CPU 4096, GPU 32768)")
    g.add_argument("--model-heads", type=int,
                   help="heads, d_model = heads * D (default: CPU 4, GPU 8)")
    g.add_argument("--model-layers", type=int, help="layers (default: CPU 2, GPU 4)")
    g.add_argument("--model-segment-len", type=int,
                   help="ChunkMemLM segment_len (default: CPU 1024, GPU 4096)")
    g = p.add_argument_group("measurement")
    g.add_argument("--min-repeats", type=int, default=3, help="CPU: at least this many timed calls per point (default: 3)")
    g.add_argument("--max-repeats", type=int, default=20, help="CPU: at most this many timed calls per point (default: 20)")
    g.add_argument("--min-time", type=float, default=1.0,
                   help="CPU: keep timing calls for at least this many seconds per point (the main "
                        "knob for the run's length; default: 1.0)")
    g.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice, one per core)")
    g.add_argument("--point-timeout", type=float, default=600.0,
                   help="CPU: seconds before a point's child process is killed and recorded as an error "
                        "(default: 600)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR",
                   help="output folder (default: bench/out/<device-name>, untracked). Pass "
                        "bench/results/<device-name> on purpose to regenerate the committed results")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: print one line per point instead (for logs)")
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
    all_ops = {op for ops in IMPL_OPS.values() for op in ops}
    if args.ops is not None and set(args.ops) - all_ops:
        raise SystemExit(f"unknown ops {sorted(set(args.ops) - all_ops)}; choose from {sorted(all_ops)}")
    if "chunkmem-triton" in impls and not gpu:
        raise SystemExit("chunkmem-triton needs a GPU (on CPU it would only run in the Triton interpreter)")

    def pick(value, cpu_default, gpu_default):
        return value if value is not None else (gpu_default if gpu else cpu_default)

    return SweepConfig(
        device=device, dtype="bfloat16" if gpu else "float32",
        seq_lens=args.seq_lens or (GPU_SEQ_LENS if gpu else CPU_SEQ_LENS),
        impls=impls, passes=args.passes, ops=args.ops, B=args.B, H=args.H, D=args.D, chunk_size=args.chunk_size,
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    name = device_name(cfg.device)
    out_dir = Path(args.out) if args.out is not None else default_out_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench", *map(shlex.quote, argv)])
    machine = machine_info(cfg.device)
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
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "command": command,
            "machine": machine,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(wall, 1), "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": load_after, "config": vars(cfg)}
    csv_path, json_path = write_results(records, out_dir, meta=meta)
    title = sweep_title(name, cfg.dtype, vars(cfg))
    pngs = plot_results(records, out_dir, title=title)
    header = header_of(meta, len(records))
    report_path = out_dir / "report.md"
    report_path.write_text(report(records, header))
    print(report_path.read_text())
    files = [csv_path, json_path, *pngs, report_path]
    prov = write_provenance(out_dir, "python -m bench", command=command, files=files,
                            date_utc=meta["date_utc"], machine=describe_machine(machine),
                            notes=f"{len(records)} points, {wall:.0f} s wall, load average before "
                                  f"{_load(load_before)}, after {_load(load_after)}")
    print("wrote", *files, prov, sep="\n  ")
    if out_dir.resolve().parent != RESULTS_ROOT:
        print(f"(the committed results the README quotes are in {RESULTS_ROOT}/<device-name>/; "
              f"to regenerate them on purpose: python -m bench --out bench/results/{name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
