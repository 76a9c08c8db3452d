"""Run one benchmark point and return its record.

``python -m bench.point '<json spec>'`` runs it in this (fresh) process and prints the record
as a line starting with ``BENCH_RECORD `` (bench/sweep.py starts one such process per CPU
point). A spec holds: op, impl, pass, device, dtype, B, H, D, T, chunk_size, S, rope_base,
min_repeats, max_repeats, min_time_s, and for op "model": n_layers, vocab_size, segment_len.
"""
from __future__ import annotations

import gc
import json
import sys
from dataclasses import replace

import torch

from bench.cases import Shape, build_case, make_step
from bench.common import device_name, make_record
from bench.flops import attention_flops

__all__ = ["run_point", "point_record", "RECORD_PREFIX"]

RECORD_PREFIX = "BENCH_RECORD "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPE_KEYS = ("B", "H", "D", "T", "chunk_size", "S", "n_layers", "vocab_size", "segment_len")


def point_record(spec: dict, status: str, **figures) -> dict:
    """The record of ``spec`` with the given status and figures."""
    return make_record(
        op=spec["op"], impl=spec["impl"], device=device_name(spec["device"]), dtype=spec["dtype"],
        status=status, **{"pass": spec["pass"]},
        **{k: spec.get(k) for k in ("B", "H", "D", "T", "chunk_size", "S")}, **figures)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def error_status(exc: BaseException) -> str:
    """'error: Type: first line of the message' (at most 200 characters)."""
    msg = (str(exc).strip().splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {msg}"[:200]


def _small_warmup(spec: dict, shape: Shape, T: int = 256) -> None:
    """Run the same case once at a small T (library init, allocator and kernel caches)."""
    small = replace(shape, T=min(shape.T, T))
    case = build_case(spec["op"], spec["impl"], small, device=spec["device"],
                      dtype=DTYPES[spec["dtype"]], pass_=spec["pass"], rope_base=spec.get("rope_base"))
    make_step(case, spec["pass"])()


def run_point(spec: dict) -> dict:
    """Build, run and measure one point; failures become a record with status oom/error."""
    from bench.measure import measure_cpu, measure_cuda

    shape = Shape(**{k: spec[k] for k in SHAPE_KEYS if spec.get(k) is not None})
    try:
        case = build_case(spec["op"], spec["impl"], shape, device=spec["device"],
                          dtype=DTYPES[spec["dtype"]], pass_=spec["pass"],
                          rope_base=spec.get("rope_base"))
        step = make_step(case, spec["pass"])
        if spec["device"].startswith("cuda"):
            m = measure_cuda(step, spec["device"])
        else:
            if not case.compiled:  # pay one-time library costs outside the measured calls
                _small_warmup(spec, shape)
            m = measure_cpu(step, compiled=case.compiled, min_repeats=spec.get("min_repeats", 3),
                            max_repeats=spec.get("max_repeats", 20),
                            min_time_s=spec.get("min_time_s", 1.0))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never raised
        status = "oom" if _is_oom(exc) else error_status(exc)
    else:
        status = "ok"
    if status != "ok":  # the traceback is gone here: free the point's tensors before the next one
        case = step = None
        gc.collect()
        if spec["device"].startswith("cuda"):
            torch.cuda.empty_cache()
        return point_record(spec, status)
    tokens = spec["B"] * spec["T"]
    tflops = None
    if spec["op"] != "model":
        flops = attention_flops(spec["op"], spec["pass"], B=spec["B"], H=spec["H"], D=spec["D"],
                                T=spec["T"], chunk_size=spec["chunk_size"], S=spec["S"])
        tflops = flops / (m["median_ms"] * 1e-3) / 1e12
    extra = {k: v for k, v in m.items() if k not in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb")}
    return point_record(
        spec, "ok", median_ms=m["median_ms"], p20_ms=m["p20_ms"], p80_ms=m["p80_ms"],
        peak_mem_mb=m["peak_mem_mb"], tokens_per_s=tokens / (m["median_ms"] * 1e-3),
        tflops=tflops, **extra, **case.extra)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    record = run_point(json.loads(argv[0]))
    print(RECORD_PREFIX + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
