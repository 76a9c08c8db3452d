"""Decode throughput against document length: ChunkMemLM.generate vs a KV-cached SDPA transformer.

    python -m bench.bench_decode [--lengths 1024,4096,16384,65536] [--decode-tokens 1024]
                                 [--impls chunkmem-noglobal,chunkmem,sdpa-transformer]
                                 [--threads 1] [--repeats 3] [--out DIR | --results]

For each document length L, a state covering L tokens is built, then ``--decode-tokens`` tokens
are decoded greedily (B = 1, fp32) and only that decode is timed: ``--repeats`` runs per point,
each from the same state, after a 16-token warm-up of every point, in rounds over all points (median and
fastest run reported, and tokens per CPU-second from the process CPU time, which leaves out the
time spent waiting for a core when the machine is shared):

- ``chunkmem-noglobal``: :meth:`chunkmem.nn.ChunkMemLM.generate` with ``use_global=False`` (chunk
  path + memory); ``chunkmem``: the same model with the global path on (global within the
  segment). The state comes from a prefill of L random tokens (``generate(prefix, 0)``, the same
  computation as ``forward``, segment by segment): a real memory, an empty segment cache. L is a
  multiple of ``segment_len``, so the timed tokens start a segment; with the default 1024 decode
  tokens = one segment, the time includes one memory write and the global path's cache growing
  from 0 to segment_len.
- ``sdpa-transformer``: :class:`chunkmem.baselines.CausalTransformer` (same width, depth, heads,
  FFN, tied head, RoPE; no memory; one causal context over the whole document) decoding with
  ``forward_cached`` and a :class:`chunkmem.baselines.KVCache` holding L tokens. Its cache is
  filled with random keys/values (a real prefill is O(L^2): minutes at 64k on a CPU); the decode
  cost does not depend on the values. The cache buffers have room for the decoded tokens, so no
  regrowth is timed.

Model (all three): d_model 256, 4 heads of 64, 2 layers, vocab 256; ChunkMemLM: segment_len
1024, chunk_size 64, 64 memory slots, memory_pool = chunk_size (the CPU model of ``python -m
bench``). Output: decode.json / decode.csv (bench.common record format: op "decode", T = L,
tokens_per_s = decode tokens / median time, plus ms_per_token and the model fields), decode.md (a
table) and decode.png (tokens/s against L). They go to bench/out/<device-name>/ unless ``--out
DIR`` is given, or ``--results`` (= bench/results/<device-name>/, the committed figures).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import device_name, make_record, write_results
from chunkmem.baselines import CausalTransformer, KVCache
from chunkmem.nn import ChunkMemLM

IMPLS = ("chunkmem-noglobal", "chunkmem", "sdpa-transformer")
BENCH_DIR = Path(__file__).resolve().parent
MODEL = dict(vocab_size=256, d_model=256, n_layers=2, n_heads=4)
CHUNKMEM = dict(segment_len=1024, chunk_size=64, memory_slots=64)
WARMUP_TOKENS = 16


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=_ints, default=[1024, 4096, 16384, 65536],
                   help="document lengths L before the decode (multiples of segment_len 1024)")
    p.add_argument("--decode-tokens", type=int, default=1024, help="tokens decoded and timed per run")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--seed", type=int, default=0)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="output folder (default bench/out/<device-name>/)")
    where.add_argument("--results", action="store_true",
                       help="write to bench/results/<device-name>/ (the committed figures)")
    return p.parse_args(argv)


def build_chunkmem(use_global: bool) -> ChunkMemLM:
    return ChunkMemLM(**MODEL, **CHUNKMEM, use_global=use_global).eval()


def build_transformer() -> CausalTransformer:
    return CausalTransformer(**MODEL).eval()


def chunkmem_runner(model: ChunkMemLM, L: int, gen: torch.Generator):
    """A function decoding n tokens from the state after L random tokens (state built once)."""
    prefix = torch.randint(0, MODEL["vocab_size"], (1, L), generator=gen)
    _, state = model.generate(prefix, 0)  # prefill: forward's computation, segment by segment

    def decode(n):
        model.generate(prefix[:, :0], n, state=state, temperature=0)  # the state is not modified

    return decode


def transformer_runner(model: CausalTransformer, L: int, n_max: int, gen: torch.Generator):
    """A function decoding n tokens after a KV cache of L tokens (random keys/values, see above)."""
    cache = KVCache(len(model.blocks))
    attn = model.blocks[0].attn
    shape = (1, attn.n_kv_heads, L + n_max, attn.head_dim)
    cache.k = [torch.randn(shape, generator=gen) for _ in model.blocks]
    cache.v = [torch.randn(shape, generator=gen) for _ in model.blocks]
    first = torch.randint(0, MODEL["vocab_size"], (1, 1), generator=gen)

    def decode(n):
        cache.length = L  # back to the L-token context (later slots are overwritten)
        tok = first
        for _ in range(n):
            logits, _ = model.forward_cached(tok, cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)

    return decode


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(args) -> tuple[list[dict], dict]:
    """Every state first, then ``repeats`` rounds over all the points (interleaved, so a change
    of the machine's load during the run touches every point alike)."""
    torch.set_num_threads(args.threads)
    impls = [i for i in args.impls.split(",") if i]
    bad = set(impls) - set(IMPLS)
    if bad:
        raise SystemExit(f"unknown impls {sorted(bad)}; choose from {IMPLS}")
    t_start, load_before = time.time(), _load()
    points = []  # (impl, L, params, setup_s, decode)
    with torch.no_grad():
        for impl in impls:
            torch.manual_seed(args.seed)
            model = build_transformer() if impl == "sdpa-transformer" else build_chunkmem(impl == "chunkmem")
            params = sum(p.numel() for p in model.parameters())
            for L in args.lengths:
                gen = torch.Generator().manual_seed(args.seed + L)
                t0 = time.perf_counter()
                if impl == "sdpa-transformer":
                    decode = transformer_runner(model, L, args.decode_tokens + WARMUP_TOKENS, gen)
                else:
                    decode = chunkmem_runner(model, L, gen)
                points.append((impl, L, params, time.perf_counter() - t0, decode))
        for point in points:  # warm-up, after every state is built
            point[-1](WARMUP_TOKENS)
        times = {i: [] for i in range(len(points))}
        cpu_times = {i: [] for i in range(len(points))}
        for r in range(args.repeats):
            for i, (impl, L, _, _, decode) in enumerate(points):
                t0, c0 = time.perf_counter(), time.process_time()
                decode(args.decode_tokens)
                times[i].append(time.perf_counter() - t0)
                cpu_times[i].append(time.process_time() - c0)
                print(f"round {r + 1}/{args.repeats} {impl:18s} L={L:6d} {times[i][-1]:6.2f} s "
                      f"({cpu_times[i][-1]:6.2f} s CPU; load {_load()})", flush=True)
    records = []
    for i, (impl, L, params, setup_s, _) in enumerate(points):
        ts = times[i]
        med, cpu_med = statistics.median(ts), statistics.median(cpu_times[i])
        records.append(make_record(
            op="decode", impl=impl, device="cpu", dtype="float32", **{"pass": "decode"}, B=1,
            H=MODEL["n_heads"], D=MODEL["d_model"] // MODEL["n_heads"], T=L,
            chunk_size=None if impl == "sdpa-transformer" else CHUNKMEM["chunk_size"],
            S=None if impl == "sdpa-transformer" else CHUNKMEM["memory_slots"],
            median_ms=med * 1e3, p20_ms=min(ts) * 1e3, p80_ms=max(ts) * 1e3,
            tokens_per_s=args.decode_tokens / med, best_tokens_per_s=args.decode_tokens / min(ts),
            cpu_tokens_per_s=args.decode_tokens / cpu_med, ms_per_token=med * 1e3 / args.decode_tokens,
            run_s=[round(t, 3) for t in ts], run_cpu_s=[round(t, 3) for t in cpu_times[i]],
            decode_tokens=args.decode_tokens, repeats=args.repeats, setup_s=round(setup_s, 2),
            params=params, d_model=MODEL["d_model"], n_layers=MODEL["n_layers"],
            segment_len=None if impl == "sdpa-transformer" else CHUNKMEM["segment_len"],
            threads=args.threads,
        ))
    meta = {
        "command": "python -m bench.bench_decode " + " ".join(sys.argv[1:]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs",
        "device_name": device_name("cpu"), "torch": torch.__version__, "threads": args.threads,
        "load_avg_before": load_before, "load_avg_after": _load(), "wall_s": round(time.time() - t_start, 1),
        "model": MODEL, "chunkmem": CHUNKMEM, "decode_tokens": args.decode_tokens,
        "note": ("p20_ms/p80_ms hold the fastest/slowest run; cpu_tokens_per_s = decode tokens / median "
                 "process CPU time of a run (with 1 thread: the time the process ran, without the time it "
                 "waited for a core on a loaded machine); sdpa-transformer: KV cache of L random "
                 "keys/values (the decode cost does not depend on them)"),
    }
    return records, meta


def table(records, lengths, key="tokens_per_s") -> str:
    impls = list(dict.fromkeys(r["impl"] for r in records))
    by = {(r["impl"], r["T"]): r for r in records}
    head = "| impl | " + " | ".join(f"L={L // 1024}k" for L in lengths) + f" | L={lengths[-1] // 1024}k / L={lengths[0] // 1024}k |"
    lines = [head, "|---" * (len(lengths) + 2) + "|"]
    for impl in impls:
        tps = [by[(impl, L)][key] for L in lengths]
        lines.append(f"| {impl} | " + " | ".join(f"{t:.1f}" for t in tps) + f" | {tps[-1] / tps[0]:.2f}x |")
    return "\n".join(lines)


def plot(records, path):
    """Two panels: wall-clock tokens/s (median run) and tokens per CPU-second, against L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "tokens_per_s", "wall clock (median run)"),
                           (axes[1], "cpu_tokens_per_s", "per CPU-second (process CPU time)")):
        for impl in dict.fromkeys(r["impl"] for r in records):
            pts = sorted((r["T"], r[key]) for r in records if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("document length before the decode (tokens)")
        ax.set_ylabel("decode tokens/s (B=1, fp32)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Decode throughput against document length (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    records, meta = run(args)
    out = args.out or (BENCH_DIR / ("results" if args.results else "out") / device_name("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    write_results(records, out, stem="decode", meta=meta)
    md = table(records, args.lengths)
    md_best = table(records, args.lengths, key="best_tokens_per_s")
    md_cpu = table(records, args.lengths, key="cpu_tokens_per_s")
    (out / "decode.md").write_text(
        "# Decode throughput against document length\n\n"
        f"Command: `{meta['command']}` ({meta['date_utc']}, {meta['wall_s']} s)\n\n"
        f"Machine: {meta['machine']} ({meta['device_name']}), torch {meta['torch']}, "
        f"{args.threads} thread(s); load average {meta['load_avg_before']} before, "
        f"{meta['load_avg_after']} after (a shared machine).\n\n"
        f"Model: {MODEL}; ChunkMemLM {CHUNKMEM}. B=1, fp32, greedy; {args.decode_tokens} decoded "
        f"tokens timed after a state of L tokens, {args.repeats} runs per point in interleaved rounds.\n\n"
        f"Decode tokens/s, median run:\n\n{md}\n\nDecode tokens/s, fastest run (least disturbed by "
        f"the other load):\n\n{md_best}\n\nDecode tokens per CPU-second (median run's process CPU "
        f"time):\n\n{md_cpu}\n\n{meta['note']}.\n")
    plot(records, out / "decode.png")
    print(md)
    print(md_best)
    print(md_cpu)
    print(f"wrote {out}/decode.{{json,csv,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
