"""The PyTorch fallback (backend="torch") on CPU next to a compiled FlexAttention, in one process.

    python -m bench.cpu_fallback [--T 16384] [--bwd-T 16384 65536] [--repeats 5] [--threads N]
                                 [--out | --dir DIR]

Shapes: B=1, H=8 (= kv heads), D=64, chunk 64, S=64 memory slots all valid, fp32,
use_global=False. Two tables:

1. forward at --T (no_grad), every time against FlexAttention's chunk-only forward (compiled,
   block mask "same chunk and causal"): chunkmem's chunk path alone, chunk + memory, chunk +
   memory + RoPE, and plain SDPA over the S memory slots (no mask) for scale;
2. chunk + memory + RoPE forward and forward+backward at each --bwd-T, the ratio fwd+bwd / fwd.

Every candidate of a table runs once per round, in turn (a, b, c, a, b, c, ...), so all of them
see the same load on a shared machine; the tables give the best and the median of the rounds and
the load average before and after. Writes cpu_fallback.json and cpu_fallback.md to
bench/out/<device-name>/, or to bench/results/<device-name>/ with --out, or to DIR with --dir.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.cases import Shape, build_case, make_step
from bench.common import RESULTS_ROOT, default_out_dir, describe_machine, device_name, machine_info

ROPE_BASE = 10000.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=16384, help="sequence length of the forward table")
    p.add_argument("--bwd-T", type=int, nargs="*", default=[16384, 65536],
                   help="sequence lengths of the forward+backward table (none: skip it)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per table")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", action="store_true",
                       help="write to bench/results/<device-name>/ (the committed figures)")
    where.add_argument("--dir", type=Path, help="output folder (default bench/out/<device-name>/)")
    return p.parse_args(argv)


def interleaved(fns: dict, repeats: int) -> dict:
    """name -> list of wall times (ms) of each round; one untimed warm-up call each first."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _shape(T: int) -> Shape:
    return Shape(B=1, H=8, D=64, T=T, chunk_size=64, S=64)


def _step(op, impl, T, pass_, rope_base=None):
    return make_step(build_case(op, impl, _shape(T), device="cpu", dtype=torch.float32,
                                pass_=pass_, rope_base=rope_base), pass_)


def _memory_sdpa(T: int):
    s, g = _shape(T), torch.Generator().manual_seed(0)
    q = torch.randn(s.B, s.H, s.T, s.D, generator=g)
    mk, mv = (torch.randn(s.B, s.H, s.S, s.D, generator=g) for _ in range(2))

    def step():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, mk, mv)
    return step


def forward_table(T: int, repeats: int) -> list[dict]:
    rows = [  # (label, step); the first row is the baseline of the ratios
        ("FlexAttention chunk only (compiled)", _step("chunk", "flex", T, "fwd")),
        ("chunkmem torch: chunk only", _step("chunk", "chunkmem-torch", T, "fwd")),
        ("chunkmem torch: chunk + memory", _step("chunk+memory", "chunkmem-torch", T, "fwd")),
        ("chunkmem torch: chunk + memory + RoPE",
         _step("chunk+memory", "chunkmem-torch", T, "fwd", ROPE_BASE)),
        ("plain SDPA over the S memory slots, no mask", _memory_sdpa(T)),
    ]
    times = interleaved(dict(rows), repeats)
    base = min(times[rows[0][0]])
    return [dict(table="forward", label=label, T=T, pass_="fwd", best_ms=min(ts),
                 median_ms=statistics.median(ts), ratio_to_flex=min(ts) / base, times_ms=ts)
            for label, ts in times.items()]


def backward_table(Ts, repeats: int) -> list[dict]:
    out = []
    for T in Ts:  # one length at a time: 64k's autograd buffers are large
        fns = {"fwd": _step("chunk+memory", "chunkmem-torch", T, "fwd", ROPE_BASE),
               "fwd+bwd": _step("chunk+memory", "chunkmem-torch", T, "fwd+bwd", ROPE_BASE)}
        times = interleaved(fns, repeats)
        for pass_, ts in times.items():
            out.append(dict(table="fwd+bwd", label="chunkmem torch: chunk + memory + RoPE", T=T,
                            pass_=pass_, best_ms=min(ts), median_ms=statistics.median(ts),
                            ratio_to_fwd=min(ts) / min(times["fwd"]), times_ms=ts))
    return out


def markdown(records, meta) -> str:
    lines = ["# The PyTorch fallback on CPU next to FlexAttention", "",
             f"Machine: {meta['machine']}; {meta['threads']} torch threads. Command: "
             f"`{meta['command']}`, {meta['date_utc']}. Load average (1 min) before "
             f"{meta['load_before']:.1f}, after {meta['load_after']:.1f} (a shared machine: the "
             "candidates of a table run in turn, round after round).", "",
             f"B=1, H=8, D=64, chunk 64, S=64 memory slots all valid, fp32, use_global=False, RoPE "
             f"base {ROPE_BASE:g}; best (median) of {meta['repeats']} interleaved rounds.", ""]
    fwd = [r for r in records if r["table"] == "forward"]
    if fwd:
        lines += [f"## Forward, T = {fwd[0]['T']}", "",
                  "| | best ms | median ms | best / Flex chunk only |", "|---|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['best_ms']:.1f} | {r['median_ms']:.1f} | "
                  f"{r['ratio_to_flex']:.2f}x |" for r in fwd]
        lines.append("")
    bwd = [r for r in records if r["table"] == "fwd+bwd"]
    if bwd:
        lines += ["## chunk + memory + RoPE: forward+backward against its own forward", "",
                  "| T | pass | best ms | median ms | best / forward |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['T']} | {r['pass_']} | {r['best_ms']:.1f} | {r['median_ms']:.1f} | "
                  f"{r['ratio_to_fwd']:.2f}x |" for r in bwd]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    records = forward_table(args.T, args.repeats)
    records += backward_table(args.bwd_T, args.repeats)
    meta = dict(machine=f"{device_name('cpu')} ({describe_machine(machine_info('cpu'))})",
                threads=torch.get_num_threads(), repeats=args.repeats,
                command="python -m bench.cpu_fallback " + " ".join(sys.argv[1:] if argv is None else argv),
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_before=load_before, load_after=os.getloadavg()[0])
    if args.dir:
        out = args.dir
    elif args.out:
        out = RESULTS_ROOT / device_name("cpu")
    else:
        out = default_out_dir(device_name("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(records, meta)
    (out / "cpu_fallback.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    (out / "cpu_fallback.md").write_text(text)
    print(text)
    print(f"wrote {out / 'cpu_fallback.json'} and {out / 'cpu_fallback.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
