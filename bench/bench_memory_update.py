"""Benchmark of the gated FIFO memory update (SPEC §2): Triton kernels vs the torch backend.

    python -m bench.bench_memory_update [--device auto|cpu|cuda] [--dtypes float32,bfloat16]
                                        [--B 4] [--T 1024,4096] [--d 256,1024] [--S 64]
                                        [--chunk-size 64] [--impls reference,torch,triton]
                                        [--out DIR]

Implementations: "reference" (chunkmem.reference, a Python loop over the n summaries), "torch"
(chunkmem.torch_backend, parallel scan) and "triton" (chunkmem.triton_memory). The Triton rows
are measured on a GPU only: on CPU the kernels would run in the Triton interpreter, whose
timings mean nothing, so no "triton" row is written there. Each point runs "fwd" (under
no_grad) and "fwd+bwd" (forward, then backward of a fixed upstream gradient into all six
inputs). Timing and peak memory: bench.measure (CPU: perf_counter over repeated calls, peak RSS
above the inputs; GPU: triton.testing.do_bench, max_memory_allocated above the inputs).

Writes memory_update.{json,csv} to bench/out/<device-name>/ (untracked; ``--out
bench/results/<device-name>`` regenerates the committed copy on purpose, and records the machine
and command in that folder's PROVENANCE.md) in the common record format
(bench.common): one record per (impl, dtype, pass, shape) with op "memory_update", D = d (the
width; also written as "d"), H empty, tokens_per_s = B*T / median time; CPU records also carry
"threads" (torch threads; 1 by default). The default CPU run takes about a minute on an idle
2-core machine (the reference's fwd+bwd at T=4096, d=1024 is ~3.4 s a call: its backward
writes a (B, T, d) gradient per chunk).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch

from bench.common import (default_out_dir, describe_machine, device_name, machine_info,
                          make_record, write_provenance, write_results)
from bench.measure import measure_cpu, measure_cuda
from chunkmem.reference import gated_memory_update_reference
from chunkmem.torch_backend import gated_memory_update_torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")


def _triton_impl(*args, **kwargs):
    from chunkmem.triton_memory import gated_memory_update_triton

    return gated_memory_update_triton(*args, **kwargs)


IMPLS = {
    "reference": gated_memory_update_reference,
    "torch": gated_memory_update_torch,
    "triton": _triton_impl,
}


def make_inputs(B, T, d, S, dtype, device, seed=0):
    """memory (B,S,d) half full, x (B,T,d), weights (d,d) ~ N(0,1/d), biases (d,), mem_len (B,)."""
    gen = torch.Generator().manual_seed(seed)
    mem_len = torch.tensor([S // 2 + (i % 2) * (S - S // 2) for i in range(B)], dtype=torch.int64)
    valid = torch.arange(S)[None, :] >= (S - mem_len)[:, None]
    memory = torch.randn(B, S, d, generator=gen) * valid[:, :, None]
    x = torch.randn(B, T, d, generator=gen)
    w_gate = torch.randn(d, d, generator=gen) / d ** 0.5
    w_cand = torch.randn(d, d, generator=gen) / d ** 0.5
    b_gate, b_cand = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    tensors = [t.to(device=device, dtype=dtype) for t in (memory, x, w_gate, b_gate, w_cand, b_cand)]
    return tensors, mem_len.to(device)


def make_step(fn, tensors, mem_len, chunk_size, pass_):
    """A no-argument callable running one forward (no_grad) or forward + backward."""
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(*tensors, chunk_size=chunk_size, mem_len=mem_len)
        return step
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    upstream = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1))
    upstream = upstream.to(device=tensors[0].device, dtype=tensors[0].dtype)

    def step():
        out, _ = fn(*leaves, chunk_size=chunk_size, mem_len=mem_len)
        torch.autograd.grad(out, leaves, upstream)
    return step


def run_point(impl, dtype_name, pass_, B, T, d, S, chunk_size, device) -> dict:
    """Measure one point; any failure becomes a record with status oom / error."""
    fields = dict(op="memory_update", impl=impl, device=device_name(device), dtype=dtype_name,
                  B=B, T=T, D=d, d=d, S=S, chunk_size=chunk_size, **{"pass": pass_})
    if not device.startswith("cuda"):
        fields["threads"] = torch.get_num_threads()
    try:
        tensors, mem_len = make_inputs(B, T, d, S, DTYPES[dtype_name], device)
        step = make_step(IMPLS[impl], tensors, mem_len, chunk_size, pass_)
        if device.startswith("cuda"):
            m = measure_cuda(step, device)
        else:
            m = measure_cpu(step, min_repeats=3, max_repeats=10, min_time_s=0.3)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never raised
        oom = isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        msg = (str(exc).strip().splitlines() or [""])[0]
        return make_record(status="oom" if oom else f"error: {type(exc).__name__}: {msg}"[:200],
                           **fields)
    return make_record(median_ms=m["median_ms"], p20_ms=m["p20_ms"], p80_ms=m["p80_ms"],
                       peak_mem_mb=m["peak_mem_mb"], tokens_per_s=B * T / (m["median_ms"] * 1e-3),
                       **fields)


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bench_memory_update", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    p.add_argument("--dtypes", type=_csv(str), default=None,
                   help="default: float32 on CPU, bfloat16,float32 on a GPU")
    p.add_argument("--impls", type=_csv(str), default=("reference", "torch", "triton"))
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=_csv(int), default=None, help="default: 1024,4096 CPU; up to 64k GPU")
    p.add_argument("--d", type=_csv(int), default=(256, 1024))
    p.add_argument("--S", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier on a shared machine; 0 = leave)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: bench/out/<device-name>, untracked); pass "
                        "bench/results/<device-name> on purpose to regenerate the committed results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    if not on_gpu and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (("bfloat16", "float32") if on_gpu else ("float32",))
    seq_lens = args.T or ((1024, 4096, 16384, 65536) if on_gpu else (1024, 4096))
    impls = [i for i in args.impls if on_gpu or i != "triton"]  # never time the interpreter
    unknown = set(impls) - set(IMPLS) | set(dtypes) - set(DTYPES)
    if unknown:
        print(f"unknown impl/dtype: {sorted(unknown)}", file=sys.stderr)
        return 2

    records = []
    for dtype_name in dtypes:
        for d in args.d:
            for T in seq_lens:
                for pass_ in PASSES:
                    for impl in impls:
                        rec = run_point(impl, dtype_name, pass_, args.B, T, d, args.S,
                                        args.chunk_size, device)
                        records.append(rec)
                        figure = (f"{rec['median_ms']:9.3f} ms  {rec['tokens_per_s']:12.0f} tok/s  "
                                  f"{rec['peak_mem_mb']:8.1f} MB" if rec["status"] == "ok"
                                  else rec["status"])
                        print(f"{impl:9s} {dtype_name:8s} {pass_:7s} B={args.B} T={T:6d} d={d:5d}"
                              f" S={args.S} C={args.chunk_size}: {figure}", flush=True)
    name = device_name(device)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m bench.bench_memory_update", *map(shlex.quote, argv)])
    machine = machine_info(device)
    meta = dict(script="bench/bench_memory_update.py", device=name, command=command,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), argv=argv, machine=machine)
    out_dir = Path(args.out) if args.out else default_out_dir(name)
    csv_path, json_path = write_results(records, out_dir, stem="memory_update", meta=meta)
    prov = write_provenance(out_dir, "python -m bench.bench_memory_update", command=command,
                            files=[csv_path, json_path], date_utc=meta["date"],
                            machine=describe_machine(machine), notes=f"{meta['threads']} torch threads")
    print(f"wrote {csv_path}, {json_path} and {prov}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
