"""A plain causal flash-attention (forward and backward) as a yardstick for the static cost report.

Written in the style of Triton's fused-attention tutorial (FlashAttention-2): the forward
splits each query block's keys into an unmasked off-diagonal loop and a masked diagonal loop;
the backward is a preprocess kernel (delta = rowsum(O * dO)) and one kernel whose programs
each compute dK/dV of a key block (masked diagonal loop over half-height query tiles, then an
unmasked loop) and dQ of a query block (masked diagonal loop over half-width key tiles, then
an unmasked loop), with K pre-scaled by sm_scale / ln 2 so that the loops use exp2 directly.
Single head layout (B, H, T, D) contiguous, T a multiple of the block sizes, no GQA, no
dropout; statistics in fp32.

The configurations (CONFIGS) are the tutorial's Hopper choices, adjusted where they spill at
D = 128 (see CONFIGS); smaller blocks can be passed for the Triton interpreter.
``compile_variants`` gives the kernels in the format of
:func:`chunkmem.triton_attention.compile_variants` and ``LOOP_DOTS`` the matrix products each
loop function performs per iteration (for ``python -m chunkmem.compile_check --cost``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per compile target, at D = 128, bf16/fp16; each compiles without spills under Triton 3.9.
# sm_90: the tutorial's forward pick for Hopper (128 x 128 tiles, 8 warps, 3 stages) and its
# backward tiles (dK/dV: 32 queries x 128 keys, dQ: 128 x 32, slice factor 2, 5 stages) with
# 8 warps instead of its 4, which spill 1136 bytes at D = 128 (the tutorial benchmarks D = 64).
# sm_80: the forward config of the tutorial's search space (BLOCK_M 64/128, BLOCK_N 32/64/128,
# 4/8 warps, 2-4 stages) that is spill-free under Triton 3.9 and 3.6 and has the fewest
# warp-instructions per useful MFLOP in the cost report: 128 x 64, 8 warps, 2 stages (896; the
# 64 x 64 / 4 warps / 3 stages picked before: 1268; 128 x 128 spills 8 bytes), and its backward
# chosen the same way: 64 x 64 blocks in both loops, 8 warps, 2 stages (unmasked dK/dV loop 792,
# dQ 844; the 32 x 64 / 64 x 32 blocks at 4 warps picked before: 906 / 1002; 128-query dQ
# blocks spill 8 bytes).
CONFIGS = {
    90: dict(fwd=dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
             bwd=dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, BLK_SLICE_FACTOR=2,
                      num_warps=8, num_stages=5)),
    80: dict(fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
             bwd=dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, BLK_SLICE_FACTOR=2,
                      num_warps=8, num_stages=2)),
}
FWD_CONFIG = CONFIGS[90]["fwd"]
BWD_CONFIG = CONFIGS[90]["bwd"]
PRE_BLOCK = 128
_RCP_LN2 = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471824645996)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, rows, lo, hi, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax of a (BLOCK_M, HEAD_DIM) query tile over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_t = tl.load(k_ptr + cols[None, :] * HEAD_DIM + offs_d[:, None])
        s = tl.dot(q, k_t)
        if MASKED:
            s = s * qk_scale + tl.where(rows[:, None] >= cols[None, :], 0.0, -1.0e6)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            s = s - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            s = s * qk_scale - m_new[:, None]
        p = tl.math.exp2(s)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + cols[:, None] * HEAD_DIM + offs_d[None, :])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(Q, K, V, sm_scale, LSE, OUT, N_CTX,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, batch * head): causal attention output and LSE (log2)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * N_CTX * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    # keys strictly left of the block's diagonal tile: no mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + base, V + base, rows, 0, start_m, qk_scale,
                               BLOCK_N, HEAD_DIM, False)
    # the diagonal tile: causal mask
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + base, V + base, rows, start_m,
                               start_m + BLOCK_M, qk_scale, BLOCK_N, HEAD_DIM, True)
    m_i += tl.math.log2(l_i)
    tl.store(LSE + bh * N_CTX + rows, m_i)
    out = (acc / l_i[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + base + rows[:, None] * HEAD_DIM + offs_d[None, :], out)


@triton.jit
def flash_bwd_preprocess_kernel(OUT, DO, DELTA, N_CTX,
                                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(O * dO) per query row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    offs = (bh.to(tl.int64) * N_CTX * HEAD_DIM + rows[:, None] * HEAD_DIM
            + tl.arange(0, HEAD_DIM)[None, :])
    o = tl.load(OUT + offs).to(tl.float32)
    do = tl.load(DO + offs).to(tl.float32)
    tl.store(DELTA + bh * N_CTX + rows, tl.sum(o * do, 1))


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, start_n, start_m, num_steps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    MASKED: tl.constexpr):
    """dK, dV of a (BLOCK_N, HEAD_DIM) key block over num_steps query tiles from start_m, in
    transposed (key-major) form; k is pre-scaled by sm_scale / ln 2."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    curr_m = start_m
    for _ in range(num_steps):
        offs_m = curr_m + tl.arange(0, BLOCK_M)
        q_t = tl.load(Q + offs_m[None, :] * HEAD_DIM + offs_d[:, None])
        lse = tl.load(LSE + offs_m)
        p_t = tl.math.exp2(tl.dot(k, q_t) - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        delta = tl.load(DELTA + offs_m)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk += tl.dot(ds_t, tl.trans(q_t))
        curr_m += BLOCK_M
    return dk, dv


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, start_m, start_n, num_steps,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr):
    """dQ of a (BLOCK_M, HEAD_DIM) query block over num_steps key tiles from start_n (K is
    pre-scaled: the caller multiplies dq by ln 2)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    curr_n = start_n
    for _ in range(num_steps):
        offs_n = curr_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(K + offs_n[None, :] * HEAD_DIM + offs_d[:, None])
        v_t = tl.load(V + offs_n[None, :] * HEAD_DIM + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, k_t) - lse)
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, v_t)
        ds = (p * (dp - delta[:, None])).to(k_t.dtype)
        dq += tl.dot(ds, tl.trans(k_t))
        curr_n += BLOCK_N
    return dq


@triton.jit
def flash_bwd_kernel(Q, K, V, sm_scale, DO, DQ, DK, DV, LSE, DELTA, N_CTX,
                     HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                     BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                     BLK_SLICE_FACTOR: tl.constexpr):
    """One program per (block index, batch * head): dK/dV of key block pid (BLOCK_N1 keys),
    then dQ of query block pid (BLOCK_M2 queries). K is pre-scaled by sm_scale / ln 2."""
    pid = tl.program_id(0)
    bh = tl.program_id(2)
    base = bh.to(tl.int64) * N_CTX * HEAD_DIM
    Q += base
    K += base
    V += base
    DO += base
    DQ += base
    DK += base
    DV += base
    LSE += bh * N_CTX
    DELTA += bh * N_CTX
    offs_d = tl.arange(0, HEAD_DIM)

    start_n = pid * BLOCK_N1
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    k = tl.load(K + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
    v = tl.load(V + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    # diagonal: query tiles of BLOCK_M1 // BLK_SLICE_FACTOR rows, masked
    steps = BLOCK_N1 // (BLOCK_M1 // BLK_SLICE_FACTOR)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, start_n, start_n, steps,
                             BLOCK_M1 // BLK_SLICE_FACTOR, BLOCK_N1, HEAD_DIM, True)
    # queries below the diagonal block: unmasked
    start_m = start_n + BLOCK_N1
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, start_n, start_m,
                             (N_CTX - start_m) // BLOCK_M1, BLOCK_M1, BLOCK_N1, HEAD_DIM, False)
    tl.store(DV + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty))
    dk *= sm_scale
    tl.store(DK + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty))

    start_m = pid * BLOCK_M2
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    q = tl.load(Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    do = tl.load(DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    lse = tl.load(LSE + offs_m)[:, None]
    delta = tl.load(DELTA + offs_m)
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
    # diagonal: key tiles of BLOCK_N2 // BLK_SLICE_FACTOR columns, masked
    steps = BLOCK_M2 // (BLOCK_N2 // BLK_SLICE_FACTOR)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, start_m, start_m, steps,
                       BLOCK_M2, BLOCK_N2 // BLK_SLICE_FACTOR, HEAD_DIM, True)
    # keys left of the diagonal block: unmasked
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, start_m, 0, start_m // BLOCK_N2,
                       BLOCK_M2, BLOCK_N2, HEAD_DIM, False)
    dq *= _LN2
    tl.store(DQ + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty))


def flash_forward(q, k, v, sm_scale, block_m=None, block_n=None, num_warps=None, num_stages=None):
    """Causal attention of contiguous (B, H, T, D) q, k, v -> (out, lse (B, H, T) fp32, log2)."""
    B, H, T, D = q.shape
    bm = block_m or FWD_CONFIG["BLOCK_M"]
    bn = block_n or FWD_CONFIG["BLOCK_N"]
    assert T % bm == 0 and bm % bn == 0, "T must be a multiple of BLOCK_M, BLOCK_M of BLOCK_N"
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    flash_fwd_kernel[(T // bm, B * H)](q, k, v, sm_scale, lse, out, T, HEAD_DIM=D, BLOCK_M=bm,
                                       BLOCK_N=bn,
                                       num_warps=num_warps or FWD_CONFIG["num_warps"],
                                       num_stages=num_stages or FWD_CONFIG["num_stages"])
    return out, lse


def flash_backward(q, k, v, out, lse, dout, sm_scale, config=None):
    """Gradients (dq, dk, dv) of flash_forward; config overrides BWD_CONFIG entries."""
    cfg = dict(BWD_CONFIG, **(config or {}))
    B, H, T, D = q.shape
    pre = min(PRE_BLOCK, cfg["BLOCK_M2"])
    assert T % cfg["BLOCK_N1"] == 0 and T % cfg["BLOCK_M2"] == 0 and T % pre == 0
    delta = torch.empty_like(lse)
    flash_bwd_preprocess_kernel[(T // pre, B * H)](out, dout, delta, T, BLOCK_M=pre, HEAD_DIM=D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    k_scaled = (k * (sm_scale * _RCP_LN2)).to(k.dtype)
    flash_bwd_kernel[(T // cfg["BLOCK_N1"], 1, B * H)](
        q, k_scaled, v, sm_scale, dout, dq, dk, dv, lse, delta, T, HEAD_DIM=D,
        BLOCK_M1=cfg["BLOCK_M1"], BLOCK_N1=cfg["BLOCK_N1"], BLOCK_M2=cfg["BLOCK_M2"],
        BLOCK_N2=cfg["BLOCK_N2"], BLK_SLICE_FACTOR=cfg["BLK_SLICE_FACTOR"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Static cost report
# ----------------------------------------------------------------------------------------------
def _dots_fwd(a):
    """Per iteration: S = Q K^T and O += P V, (BLOCK_M x BLOCK_N) x HEAD_DIM each."""
    tile = (a["BLOCK_M"], a["BLOCK_N"], a["HEAD_DIM"])
    return [("QK^T",) + tile, ("PV",) + tile]


def _dots_bwd(a, rows: str, cols: str, names):
    tile = (a[rows], a[cols], a["HEAD_DIM"])
    return [(n,) + tile for n in names]


# loop function -> (bound constexpr arguments of its call, merged over the kernel's) -> list of
# (dot, M, N, K) computed per iteration; FLOPs = 2 M N K each.
LOOP_DOTS = {
    "_fwd_inner": _dots_fwd,
    # the call's BLOCK_M / BLOCK_N are the loop's query / key tile
    "_bwd_dkdv_inner": lambda a: _dots_bwd(a, "BLOCK_M", "BLOCK_N", ("KQ^T", "dV", "dP^T", "dK")),
    "_bwd_dq_inner": lambda a: _dots_bwd(a, "BLOCK_M", "BLOCK_N", ("QK^T", "dP", "dQ")),
}


def compile_variants(dtype: str = "bf16", head_dim: int = 128, arch: int = 90) -> list:
    """The yardstick kernels at CONFIGS[arch] as triton.compile variants (keys as in
    chunkmem.triton_attention.compile_variants, plus kind: fwd, bwd_preprocess or bwd)."""
    d = head_dim
    fcfg, bcfg = CONFIGS[arch]["fwd"], CONFIGS[arch]["bwd"]
    fwd = dict(name=f"flash_fwd_{dtype}_d{d}_m{fcfg['BLOCK_M']}n{fcfg['BLOCK_N']}",
               fn=flash_fwd_kernel,
               signature=dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", sm_scale="fp32",
                              LSE="*fp32", OUT=f"*{dtype}", N_CTX="i32", HEAD_DIM="constexpr",
                              BLOCK_M="constexpr", BLOCK_N="constexpr"),
               constexprs=dict(HEAD_DIM=d, BLOCK_M=fcfg["BLOCK_M"], BLOCK_N=fcfg["BLOCK_N"]),
               num_warps=fcfg["num_warps"], num_stages=fcfg["num_stages"], kind="fwd")
    pre = dict(name=f"flash_bwd_preprocess_{dtype}_d{d}_m{PRE_BLOCK}",
               fn=flash_bwd_preprocess_kernel,
               signature=dict(OUT=f"*{dtype}", DO=f"*{dtype}", DELTA="*fp32", N_CTX="i32",
                              BLOCK_M="constexpr", HEAD_DIM="constexpr"),
               constexprs=dict(BLOCK_M=PRE_BLOCK, HEAD_DIM=d), num_warps=4, num_stages=1,
               kind="bwd_preprocess")
    blocks = {k: v for k, v in bcfg.items() if k.isupper()}
    sig = {n: f"*{dtype}" for n in ("Q", "K", "V")}
    sig.update(sm_scale="fp32", DO=f"*{dtype}", DQ=f"*{dtype}", DK=f"*{dtype}", DV=f"*{dtype}",
               LSE="*fp32", DELTA="*fp32", N_CTX="i32", HEAD_DIM="constexpr",
               **{k: "constexpr" for k in blocks})
    bwd = dict(name=f"flash_bwd_{dtype}_d{d}_kv{blocks['BLOCK_M1']}x{blocks['BLOCK_N1']}"
                    f"_q{blocks['BLOCK_M2']}x{blocks['BLOCK_N2']}",
               fn=flash_bwd_kernel, signature=sig, constexprs=dict(HEAD_DIM=d, **blocks),
               num_warps=bcfg["num_warps"], num_stages=bcfg["num_stages"], kind="bwd")
    return [fwd, pre, bwd]


def reference_attention(q, k, v, sm_scale):
    """torch SDPA, causal (the check that the yardstick computes flash attention)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            scale=sm_scale)


__all__ = ["flash_forward", "flash_backward", "compile_variants", "LOOP_DOTS", "CONFIGS",
           "FWD_CONFIG", "BWD_CONFIG", "reference_attention"]
