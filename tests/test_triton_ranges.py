"""Fused Triton hybrid attention with per-row key ranges, start positions and packed documents
(SPEC §1b), forward and every gradient, in the Triton interpreter (fp32, fp16).

Oracles: chunkmem.reference (the 2x-plus-floor rule of tests/test_triton_attention.py), and the
kernels' own default code path on each row (document) alone, which the ranged (packed) call must
reproduce: rows are independent. Exact zeros where SPEC §1b asks for them: outputs of padding
queries, gradients of keys outside a row's range.

Interpreter blocks are 16 x 16: Tq = 20 and Tk = 40 span 2 and 3 blocks per row.
"""
import math

import pytest
import torch

from chunkmem import triton_attention as ta
from test_triton_attention import DEVICE, FLOOR, check_against_reference, run

pytestmark = pytest.mark.interpreter

F32, F16 = torch.float32, torch.float16


def make_args(dtype, B, H, G, Tq, Tk, D, S, mem_len, seed=0, Bm=None):
    """Random normalized positional arguments (q, k, v, mem_k, mem_v, weights, mem_len), every
    path on (memory when S > 0); memory rows Bm (default B)."""
    gen = torch.Generator().manual_seed(seed)
    Bm = B if Bm is None else Bm

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    mem = (None, None, None)
    if S:
        mem = (rnd(Bm, G, S, D), rnd(Bm, G, S, D), torch.tensor(mem_len, device=DEVICE))
    weights = (torch.rand(H, 3, generator=gen) + 0.25) * torch.tensor([1.0, 1.0, float(S > 0)])
    return [rnd(B, H, Tq, D), rnd(B, G, Tk, D), rnd(B, G, Tk, D), mem[0], mem[1],
            weights.to(DEVICE), mem[2]]


def i32(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def i64(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


def dout_like(q, seed=1):
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, q.dtype)


def assert_close(got, exp, name, rtol=2e-5):
    """fp32 kernel vs fp32 kernel (same math, other tiling): |got - exp| <= rtol * max(1, |exp|)."""
    err = (got.double() - exp.double()).abs().max().item() if got.numel() else 0.0
    bound = rtol * max(1.0, exp.double().abs().max().item() if exp.numel() else 0.0)
    assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"


def check_rows_alone(args, kwargs, out, grads, dout, kv_start, kv_end, start_pos):
    """The ranged call's output and gradients vs the default code path on each row's valid keys
    and non-padding queries alone (start_pos = the row's start position); padding queries and
    keys outside the range exactly 0."""
    q, k = args[0], args[1]
    Tq = q.shape[2]
    dw = torch.zeros_like(grads[5])
    for b in range(q.shape[0]):
        lo, hi = int(kv_start[b]), int(kv_end[b])
        n = min(Tq, hi - lo)  # non-padding queries: the last n
        assert torch.all(out[b, :, :Tq - n] == 0) and torch.all(grads[0][b, :, :Tq - n] == 0)
        for g in (grads[1], grads[2]):
            assert torch.all(g[b, :, :lo] == 0) and torch.all(g[b, :, hi:] == 0)
        if n == 0:
            assert all(torch.all(g[b] == 0) for g in grads[1:5] if g is not None)
            continue
        row = [q[b:b + 1, :, Tq - n:], k[b:b + 1, :, lo:hi], args[2][b:b + 1, :, lo:hi]]
        row += [None if a is None else a[b:b + 1] for a in (args[3], args[4])]
        row += [args[5], None if args[6] is None else args[6][b:b + 1]]
        sp = int(start_pos[b]) if isinstance(start_pos, torch.Tensor) else start_pos
        row_kwargs = {k: v for k, v in kwargs.items() if k not in ("kv_start", "kv_end")}
        r_out, r_grads = run(ta.hybrid_attention_triton, row, dict(row_kwargs, start_pos=sp),
                             dout[b:b + 1, :, Tq - n:])
        assert_close(out[b:b + 1, :, Tq - n:], r_out, f"out[{b}]")
        assert_close(grads[0][b:b + 1, :, Tq - n:], r_grads[0], f"dq[{b}]")
        assert_close(grads[1][b:b + 1, :, lo:hi], r_grads[1], f"dk[{b}]")
        assert_close(grads[2][b:b + 1, :, lo:hi], r_grads[2], f"dv[{b}]")
        for i in (3, 4):
            if grads[i] is not None:
                assert_close(grads[i][b:b + 1], r_grads[i], f"grad {i} [{b}]")
        dw += r_grads[5]
    assert_close(grads[5], dw, "dweights")


# Rows of a (B = 4, Tq = 20, Tk = 40) batch: no padding query (35 keys), a static cache holding
# 29 keys, left padding with 7 padding queries (13 keys), and an empty row (kv_start == kv_end).
RANGES = ((5, 0, 12, 17), (40, 29, 25, 17))


@pytest.mark.parametrize("dtype", [F32, F16])
def test_ranged_batch(dtype):
    """GQA, all paths, RoPE, chunks of 6, memory with per-row lengths, several tiles per row;
    fp32: int start_pos 3 and the rows alone; fp16: a start_pos tensor."""
    args = make_args(dtype, 4, 4, 2, 20, 40, 32, 6, (6, 0, 3, 5))
    kv_start, kv_end = i32(*RANGES[0]), i32(*RANGES[1])
    start_pos = 3 if dtype == F32 else i64(0, 7, 100, 2)
    kwargs = dict(chunk_size=6, use_global=True, rope_base=10000.0, start_pos=start_pos,
                  scale=1 / math.sqrt(32), kv_start=kv_start, kv_end=kv_end)
    assert ta.unsupported_reason(*args, **kwargs) is None
    dout = dout_like(args[0])
    out, grads = check_against_reference(args, kwargs, dout)
    if dtype == F32:
        check_rows_alone(args, kwargs, out, grads, dout, RANGES[0], RANGES[1], start_pos)
    else:  # exact zeros (the fp32 case checks them in check_rows_alone)
        assert torch.all(out[2, :, :7] == 0) and torch.all(out[3] == 0)
        assert torch.all(grads[1][0, :, :5] == 0) and torch.all(grads[2][1, :, 29:] == 0)
        assert torch.all(grads[3][3] == 0) and torch.all(grads[0][3] == 0)


def test_padding_never_read():
    """Keys outside the ranges, padding queries and their output gradients hold NaN (a
    pre-allocated cache may hold anything): outputs and gradients are bitwise those of zeros
    there, the padding rows' statistics are the finite empty-row LSE."""
    args = make_args(F32, 4, 2, 1, 20, 40, 32, 4, (4, 1, 0, 2), seed=3)
    kv_start, kv_end = i32(*RANGES[0]), i32(*RANGES[1])
    kwargs = dict(chunk_size=5, use_global=True, rope_base=10000.0, start_pos=0, scale=0.2,
                  kv_start=kv_start, kv_end=kv_end)
    dout = dout_like(args[0])
    dirty, dirty_dout = [a.clone() if a is not None else None for a in args], dout.clone()
    for b, (lo, hi) in enumerate(zip(*RANGES)):
        n = min(20, hi - lo)
        for t in (dirty[1], dirty[2]):
            t[b, :, :lo] = float("nan")
            t[b, :, hi:] = float("nan")
        dirty[0][b, :, :20 - n] = float("nan")
        dirty_dout[b, :, :20 - n] = float("nan")
        args[0][b, :, :20 - n] = 0
        dout[b, :, :20 - n] = 0
        for t in (args[1], args[2]):
            t[b, :, :lo] = 0
            t[b, :, hi:] = 0
    out, grads = run(ta.hybrid_attention_triton, args, kwargs, dout)
    out2, grads2 = run(ta.hybrid_attention_triton, dirty, kwargs, dirty_dout)
    assert torch.equal(out, out2)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2)
    _out, lse = ta.hybrid_attention_triton_forward(*dirty, **kwargs)
    assert torch.isfinite(lse).all() and torch.all(lse[3] == -1.0e30)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_packed_documents(dtype):
    """Four packed documents, one without queries and one of equal query and key counts, memory
    and start position per document; fp32 also against each document alone and with the
    max_seqlen bounds left to the wrapper (Tq, Tk)."""
    tq, tk = (5, 0, 17, 3), (9, 4, 30, 3)
    cu_q, cu_k = [0], [0]
    for a, b in zip(tq, tk):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    args = make_args(dtype, 1, 2, 1, cu_q[-1], cu_k[-1], 32, 5, (5, 2, 0, 3), seed=5, Bm=4)
    start_pos = i64(0, 3, 9, 1)
    kwargs = dict(chunk_size=4, use_global=True, rope_base=10000.0, start_pos=start_pos,
                  scale=0.2, cu_seqlens_q=i32(*cu_q), cu_seqlens_k=i32(*cu_k))
    if dtype == F16:
        kwargs.update(max_seqlen_q=max(tq), max_seqlen_k=max(tk))
    assert ta.unsupported_reason(*args, **kwargs) is None
    dout = dout_like(args[0])
    out, grads = check_against_reference(args, kwargs, dout)
    if dtype == F16:
        return
    assert torch.all(grads[1][:, :, cu_k[1]:cu_k[2]] == 0)
    dw = torch.zeros_like(grads[5])
    for d in range(4):
        if tq[d] == 0:
            assert torch.all(grads[3][d] == 0) and torch.all(grads[4][d] == 0)
            continue
        qs, ks = slice(cu_q[d], cu_q[d + 1]), slice(cu_k[d], cu_k[d + 1])
        doc = [args[0][:, :, qs], args[1][:, :, ks], args[2][:, :, ks], args[3][d:d + 1],
               args[4][d:d + 1], args[5], args[6][d:d + 1]]
        doc_kwargs = dict(chunk_size=4, use_global=True, rope_base=10000.0,
                          start_pos=int(start_pos[d]), scale=0.2)
        d_out, d_grads = run(ta.hybrid_attention_triton, doc, doc_kwargs, dout[:, :, qs])
        assert_close(out[:, :, qs], d_out, f"out doc {d}")
        for i, sl in ((0, qs), (1, ks), (2, ks)):
            assert_close(grads[i][:, :, sl], d_grads[i], f"grad {i} doc {d}")
        assert_close(grads[3][d:d + 1], d_grads[3], f"dmem_k doc {d}")
        assert_close(grads[4][d:d + 1], d_grads[4], f"dmem_v doc {d}")
        dw += d_grads[5]
    assert_close(grads[5], dw, "dweights")


@pytest.mark.parametrize("sp_tensor", [False, True])
def test_dropped_prefix_cache(sp_tensor):
    """A cache that dropped its first P = 11 keys (not a multiple of chunk_size 8) and passes
    start_pos = P: with the chunk and memory paths only, and queries whose chunks start after
    P, it equals the full call (chunks counted by position, RoPE at the same positions). As an
    int (default code path, phase from the wrapper) and as a tensor (ranged code path)."""
    P, T, Tq = 11, 40, 16
    args = make_args(F32, 1, 2, 1, Tq, T, 64, 3, (2,), seed=7)
    args[5][:, 0] = 0  # no global path
    kwargs = dict(chunk_size=8, use_global=False, rope_base=10000.0, start_pos=0, scale=0.15)
    dout = dout_like(args[0])
    full_out, full_grads = run(ta.hybrid_attention_triton, args, kwargs, dout)
    cache = list(args)
    cache[1], cache[2] = args[1][:, :, P:], args[2][:, :, P:]
    sp = i64(P) if sp_tensor else P
    out, grads = run(ta.hybrid_attention_triton, cache, dict(kwargs, start_pos=sp), dout)
    assert_close(out, full_out, "out")
    for i, name in enumerate(("q", "k", "v", "mem_k", "mem_v", "weights")):
        exp = full_grads[i][:, :, P:] if i in (1, 2) else full_grads[i]
        assert_close(grads[i], exp, name)
    assert torch.all(full_grads[1][:, :, :P] == 0)


@pytest.mark.parametrize("Tq, chunk_size, start_pos, rope", [
    (3, 50, 45, 10000.0), (1, 50, 2 ** 31 - 20, 10000.0), (3, 50, (45, 47), 10000.0),
    (4, 2 ** 40, (2 ** 40 - 4, 2 ** 41), None)])
def test_chunk_larger_than_keys(Tq, chunk_size, start_pos, rope):
    """chunk_size > Tk = 10: the wrapper's reduced chunk arguments keep the one boundary among
    the keys (position 50: key 5, key 3) or none, on the default code path (int start_pos) and
    on the ranged one (a tensor, positions and chunks beyond int32); fp16, every gradient."""
    args = make_args(F16, 2, 2, 2, Tq, 10, 32, 0, None, seed=11)
    kwargs = dict(chunk_size=chunk_size, use_global=True, rope_base=rope,
                  start_pos=start_pos if isinstance(start_pos, int) else i64(*start_pos),
                  scale=0.2)
    assert ta.unsupported_reason(*args, **kwargs) is None
    check_against_reference(args, kwargs, dout_like(args[0]))


@pytest.mark.parametrize("blocks, key_major", [((32, 16), False), ((16, 32), True)])
def test_ranges_rectangular_blocks(monkeypatch, blocks, key_major):
    """Rectangular tiles (as the GPU configurations) and the key-major dk/dv tiles of sm_90 with
    ranges (fp32) and packed documents (fp16), against the reference."""
    bm, bn = blocks
    monkeypatch.setattr(ta, "block_config", lambda kind, dtype, d, interpret=None, arch=80, **kw: dict(
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1, KEY_MAJOR=key_major, BLOCK_W=16))
    args = make_args(F32, 3, 2, 1, 37, 53, 32, 9, (9, 4, 0), seed=13)
    kwargs = dict(chunk_size=12, use_global=True, rope_base=10000.0, start_pos=i64(5, 0, 40),
                  scale=0.2, kv_start=i32(3, 20, 0), kv_end=i32(53, 41, 37))
    check_against_reference(args, kwargs, dout_like(args[0]))
    args = make_args(F16, 1, 2, 2, 40, 60, 32, 4, (4, 3), seed=17, Bm=2)
    kwargs = dict(chunk_size=7, use_global=False, rope_base=10000.0, start_pos=2, scale=0.2,
                  cu_seqlens_q=i32(0, 33, 40), cu_seqlens_k=i32(0, 35, 60), max_seqlen_q=33,
                  max_seqlen_k=35)
    check_against_reference(args, kwargs, dout_like(args[0]))


@pytest.mark.parametrize("D, arch", [(32, 90), (64, 80), (128, 80)])
def test_ranges_gpu_block_configs(monkeypatch, D, arch):
    """The GPU launch configurations of the ranged and packed row layouts (their own entries in
    _SM90_LAYOUT_CONFIGS / _VARIANT_CONFIGS: sm_90's 128 x 64 ranged forward at D = 32, sm_80's
    ranged / packed dk/dv at D = 64 and ranged dq at D = 128), fp16, with and without the
    global path, over two 128-row tiles, against the reference."""
    real = ta.block_config
    monkeypatch.setattr(ta, "block_config", lambda kind, dt, d, interpret=None, arch=80, layout="",
                        mode="", _arch=arch: real(kind, dt, d, interpret=False, arch=_arch,
                                                  layout=layout, mode=mode))
    args = make_args(F16, 2, 2, 1, 150, 160, D, 6, (6, 2), seed=29)
    for use_global in (True, False):
        kwargs = dict(chunk_size=40, use_global=use_global, rope_base=10000.0,
                      start_pos=i64(3, 0), scale=0.2, kv_start=i32(2, 30), kv_end=i32(160, 150))
        check_against_reference(args, kwargs, dout_like(args[0]))
    args = make_args(F16, 1, 2, 1, 150, 160, D, 4, (4, 3), seed=31, Bm=2)
    for use_global in (True, False):
        kwargs = dict(chunk_size=40, use_global=use_global, rope_base=10000.0, start_pos=2,
                      scale=0.2, cu_seqlens_q=i32(0, 130, 150), cu_seqlens_k=i32(0, 135, 160),
                      max_seqlen_q=130, max_seqlen_k=135)
        check_against_reference(args, kwargs, dout_like(args[0]))


@pytest.mark.parametrize("blocks, key_major", [((16, 16), False), ((32, 16), False),
                                               ((16, 32), True)])
def test_linear_interior_rows(monkeypatch, blocks, key_major):
    """Without the global path the chunk path runs unmasked key (query) blocks inside every
    row's chunk: per-row key ranges with padding queries and start positions (fp32), packed
    documents (fp16), chunks of 2-3 blocks; square, rectangular and key-major tiles."""
    bm, bn = blocks
    monkeypatch.setattr(ta, "block_config", lambda kind, dtype, d, interpret=None, arch=80, **kw: dict(
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1, KEY_MAJOR=key_major, BLOCK_W=16))
    args = make_args(F32, 3, 2, 1, 70, 90, 32, 5, (5, 2, 0), seed=19)
    kwargs = dict(chunk_size=33, use_global=False, rope_base=10000.0, start_pos=i64(7, 0, 40),
                  scale=0.2, kv_start=i32(3, 30, 0), kv_end=i32(90, 85, 70))
    check_against_reference(args, kwargs, dout_like(args[0]))
    args = make_args(F16, 1, 2, 2, 100, 110, 32, 4, (4, 3), seed=23, Bm=2)
    kwargs = dict(chunk_size=32, use_global=False, rope_base=10000.0, start_pos=5, scale=0.2,
                  cu_seqlens_q=i32(0, 70, 100), cu_seqlens_k=i32(0, 75, 110), max_seqlen_q=70,
                  max_seqlen_k=75)
    check_against_reference(args, kwargs, dout_like(args[0]))


def test_unsupported_reason_rows():
    """Positions: an int start_pos beyond int32 is refused on the default code path only (the
    ranged and packed code computes positions in int64, and a start_pos tensor is not read on
    the host); any chunk_size is supported."""
    args = make_args(F32, 2, 2, 1, 4, 8, 32, 0, None)
    kwargs = dict(chunk_size=4, use_global=True, rope_base=None, scale=0.3)
    ranges = dict(kv_start=i32(0, 2), kv_end=i32(8, 8))
    assert "int32" in ta.unsupported_reason(*args, **kwargs, start_pos=2 ** 31)
    assert ta.unsupported_reason(*args, **kwargs, start_pos=2 ** 31, **ranges) is None
    assert ta.unsupported_reason(*args, **kwargs, start_pos=i64(2 ** 40, 0)) is None
    big = dict(kwargs, chunk_size=2 ** 31)
    assert ta.unsupported_reason(*args, **big, start_pos=0) is None
    assert ta.unsupported_reason(*args, **big, start_pos=i64(0, 1)) is None
