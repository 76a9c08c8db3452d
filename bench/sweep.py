"""Plan and run a sweep: the list of point specs, run one by one, each CPU point in its own process.

CPU points run in a child process each (``fork`` of this process, which has imported torch and
chunkmem but run no torch op, so no thread pool is inherited; ``spawn`` where fork is missing), so
every point's peak RSS is its own (bench/measure.py). A child that dies (e.g. killed by the
kernel's OOM killer) gives status "oom" when killed by SIGKILL, else an error; one that runs past
``point_timeout_s`` is killed and recorded as an error. GPU points run in this process
(``torch.cuda.OutOfMemoryError`` -> status "oom").

Series: the points of one (op, impl, pass) at growing T. After a point that is not ok, the larger
T of that series are recorded as "skipped: after <status> at T=<t>" without running.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
from dataclasses import dataclass

from bench.cases import IMPL_OPS, MODEL_IMPLS
from bench.point import error_status, point_record, run_point

__all__ = ["SweepConfig", "plan", "run_plan"]

PASSES = ("fwd", "fwd+bwd")


@dataclass
class SweepConfig:
    """What a sweep runs. ``impls``: attention impls (each runs the ops of IMPL_OPS it has)."""
    device: str
    dtype: str
    seq_lens: tuple
    impls: tuple
    passes: tuple = PASSES
    ops: tuple | None = None  # None: every op each impl has
    B: int = 1
    H: int = 8
    D: int = 64
    chunk_size: int = 64
    S: int = 64
    rope_base: float | None = None
    reference_max_t: int = 1024
    model_impls: tuple = MODEL_IMPLS
    model_T: int = 4096
    model_H: int = 4
    model_layers: int = 2
    model_vocab: int = 256
    model_segment_len: int = 1024
    min_repeats: int = 3
    max_repeats: int = 20
    min_time_s: float = 1.0
    point_timeout_s: float = 600.0


def plan(cfg: SweepConfig) -> list[dict]:
    """Point specs, T ascending, then the model points (forward+backward only)."""
    common = dict(device=cfg.device, dtype=cfg.dtype, B=cfg.B, D=cfg.D, chunk_size=cfg.chunk_size,
                  S=cfg.S, rope_base=cfg.rope_base, min_repeats=cfg.min_repeats,
                  max_repeats=cfg.max_repeats, min_time_s=cfg.min_time_s)
    specs = []
    for T in sorted(cfg.seq_lens):
        for impl in cfg.impls:
            if impl == "chunkmem-reference" and T > cfg.reference_max_t:
                continue
            for op in IMPL_OPS[impl]:
                if cfg.ops is not None and op not in cfg.ops:
                    continue
                for pass_ in cfg.passes:
                    specs.append(dict(common, op=op, impl=impl, H=cfg.H, T=T, **{"pass": pass_}))
    for impl in cfg.model_impls:
        specs.append(dict(common, op="model", impl=impl, H=cfg.model_H, T=cfg.model_T,
                          n_layers=cfg.model_layers, vocab_size=cfg.model_vocab,
                          segment_len=cfg.model_segment_len, **{"pass": "fwd+bwd"}))
    return specs


def _child(spec, conn):
    try:
        conn.send(run_point(spec))
    finally:
        conn.close()


def run_in_child(spec: dict, timeout_s: float) -> dict:
    """run_point(spec) in a fresh child process; deaths and timeouts become records."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, send), daemon=True)
    proc.start()
    send.close()
    record = None
    if recv.poll(timeout_s):
        try:
            record = recv.recv()
        except EOFError:  # the child died before sending
            pass
    if record is None and proc.is_alive():
        proc.kill()
        proc.join()
        return point_record(spec, f"error: timeout after {timeout_s:.0f} s")
    proc.join()
    if record is not None:
        return record
    if proc.exitcode == -signal.SIGKILL:
        return point_record(spec, "oom")
    return point_record(spec, f"error: child process exited with code {proc.exitcode}")


def run_plan(specs: list[dict], cfg: SweepConfig, progress: bool = True) -> list[dict]:
    """Run every spec in order; returns the records in the same order."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no monitor thread: CPU points fork this process
    records, failed = [], {}
    bar = tqdm.tqdm(specs, disable=not progress, unit="pt", dynamic_ncols=True)
    for spec in bar:
        series = (spec["op"], spec["impl"], spec["pass"])
        bar.set_description(f"{spec['impl']} {spec['op']} {spec['pass']} T={spec['T']}")
        if series in failed:
            status, t = failed[series]
            records.append(point_record(spec, f"skipped: after {status} at T={t}"[:200]))
            continue
        try:
            if spec["device"].startswith("cuda"):
                rec = run_point(spec)
            else:
                rec = run_in_child(spec, cfg.point_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a harness failure is recorded, the sweep goes on
            rec = point_record(spec, error_status(exc))
        if rec["status"] != "ok":
            failed[series] = (rec["status"], spec["T"])
        records.append(rec)
        if not progress:
            ms = "-" if rec["median_ms"] is None else f"{rec['median_ms']:.1f} ms"
            mb = "-" if rec["peak_mem_mb"] is None else f"{rec['peak_mem_mb']:.1f} MiB"
            print(f"{spec['impl']} {spec['op']} {spec['pass']} T={spec['T']}: {ms} {mb} {rec['status']}",
                  flush=True)
    return records
