"""What left padding costs the PyTorch fallback: a batch of rows of different lengths, left-padded
to the longest with kv_start, against the same rows run one by one without padding.

    python -m bench.padding_cost [--lengths 1024 2048 3072 4096] [--global] [--repeats 5]

Forward only, fp32, CPU; H=8 heads, D=64, chunk path (64) + memory (S=64) + RoPE, the global
path only with --global. Prints the best time of each and their ratio (padded / one by one).
"""
from __future__ import annotations

import argparse
import time

import torch

import chunkmem


def best_times(fns, repeats: int) -> list:
    """Best wall time of each function, the runs interleaved (a, b, a, b, ...) so that both see
    the same load on a shared machine."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    p.add_argument("--global", dest="use_global", action="store_true", help="global path on too")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    B, T, H, D, S = len(a.lengths), max(a.lengths), a.heads, a.head_dim, 64
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    mem_k, mem_v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    kw = dict(chunk_size=64, rope_base=10000.0, use_global=a.use_global, backend="torch")
    kv_start = torch.tensor([T - n for n in a.lengths])

    def padded():
        with torch.no_grad():
            chunkmem.hybrid_attention(q, k, v, mem_k, mem_v, kv_start=kv_start, **kw)

    def one_by_one():
        with torch.no_grad():
            for b, n in enumerate(a.lengths):
                rows = slice(b, b + 1)
                chunkmem.hybrid_attention(q[rows, :, T - n:], k[rows, :, T - n:], v[rows, :, T - n:],
                                          mem_k[rows], mem_v[rows], **kw)

    t_pad, t_rows = best_times([padded, one_by_one], a.repeats)
    print(f"lengths {a.lengths} (left-padded to {T}), H={H}, D={D}, chunk 64 + memory 64 + RoPE"
          f"{' + global' if a.use_global else ''}, fp32 forward, {torch.get_num_threads()} threads")
    print(f"padded batch (kv_start): {t_pad * 1e3:.1f} ms   rows one by one: {t_rows * 1e3:.1f} ms   "
          f"ratio {t_pad / t_rows:.3f} (best of {a.repeats}, interleaved)")


if __name__ == "__main__":
    main()
