"""Fused Triton kernels of hybrid attention (SPEC §1): forward and backward, ``@triton.jit`` only.

Launch, block sizes and autograd live in :mod:`chunkmem.triton_attention`. Layout (all tensors
contiguous): q, out, do, dq (B, H, Tq, D); k, v, dk, dv (B, G, Tk, D); mem_k, mem_v, dmem_k, dmem_v
(B, G, S, D); weights (H, 3) fp32; mem_len (B,) int32; rope_step (D/2,) int64
(``rope_base ** (-2t/D) / (2 pi)`` in units of 2**-48 turns); the per-row statistics LSE, DI and
DW (B, H, 3, Tq) fp32, path index 0 = global, 1 = chunk, 2 = memory.

Backward statistics, with O_p the normalized output of path p and out = sum_p w_p O_p:
``DW_p = rowsum(dO * O_p)`` (its sum over rows is dweights[p]) and ``DI_p = w_p * DW_p``, so that
path p's score gradient is ``dS_p = P_p * (w_p dP - DI_p)`` with ``dP = dO V^T``. The path outputs
are not saved (that would be up to 3x the output): since ``sum_p DI_p = rowsum(dO * out)``, the
most expensive path that is on (global, else chunk, else memory: the "derived" path) takes its
DI from that identity, the others (memory slots, chunk window) are recomputed by the
preprocess kernel as ``rowsum_j P_ij dP_ij``, and the derived path's DW is summed by the dq
kernel, which recomputes its P and dP anyway.

Conventions:
- Scores live in log2 units: ``s = (q . k) * scale * log2(e)``, softmax with ``exp2``. The saved
  LSE is ``m + log2(l)`` in the same units, so the backward recomputes ``P = exp2(s - LSE)``.
- Every vector is handled as two halves ``x[:D/2], x[D/2:]`` so that rotate-half RoPE is applied
  in registers (``x1 c - x2 s``, ``x2 c + x1 s``) and ``q . k = q1 . k1 + q2 . k2`` is two dots.
  No rotated copy of q or k is ever written to HBM.
- Masked scores are ``-inf``; the running max starts at a finite sentinel, so a row without any
  valid key keeps ``l = 0`` and gives output 0 and ``LSE = _EMPTY_LSE`` (finite), never NaN.
  In the forward, preprocess and dq kernels only the tiles that need it are masked: key tiles
  below the diagonal and before the chunk window of every row of a query block run unmasked
  (``MASKED=False``). The dk/dv kernel masks every tile (a few integer compares) so that its
  loop has a single body, and computes the chunk path only for the query tiles in the key
  block's chunk windows (a runtime branch).
- Padded query rows (i >= Tq) are not masked in the score tiles: their q, dO, LSE and DI load
  as 0, so they contribute exactly 0 to dk/dv, and their outputs are never stored.
- RoPE angles are computed exactly in fixed point (see ``_rope``), so their accuracy does not
  degrade with the position.
- One generic loop per direction serves every path: "state 1" / "state 2" are (global, chunk)
  over the causal key range, or (memory, unused) over the memory slots (``MEM=True``), so the
  chunk path reuses the global path's QK^T tile.
"""
import triton
import triton.language as tl

# Running-max start and LSE of a row with no valid key (finite, so exp2(-inf - x) stays 0).
_EMPTY_LSE = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cos_sin_turns(t):
    """cos and sin of 2*pi*t for t in [0, 1), branch-free: t*4 - nearest integer is exact, so
    the reduced angle r in [-pi/4, pi/4] carries only t's own rounding; Taylor polynomials on
    that range (truncation < 2e-9). tl.cos/tl.sin are avoided on purpose: they lower to
    libdevice, whose Payne-Hanek slow path puts a local array on the stack (cuobjdump
    STACK > 0) of every kernel that uses them."""
    t4 = t * 4.0
    k = tl.floor(t4 + 0.5)
    r = (t4 - k) * 1.5707963267948966
    r2 = r * r
    sn = r + r * r2 * (-1.6666666666666666e-01 + r2 * (8.333333333333333e-03 + r2 * (
        -1.984126984126984e-04 + r2 * (2.7557319223985893e-06 + r2 * -2.505210838544172e-08))))
    cs = 1.0 + r2 * (-0.5 + r2 * (4.1666666666666664e-02 + r2 * (-1.388888888888889e-03 + r2 * (
        2.48015873015873e-05 + r2 * -2.755731922398589e-07))))
    quad = k.to(tl.int32) & 3
    c = tl.where(quad == 0, cs, tl.where(quad == 1, -sn, tl.where(quad == 2, -cs, sn)))
    s = tl.where(quad == 0, sn, tl.where(quad == 1, cs, tl.where(quad == 2, -sn, -cs)))
    return c, s


@triton.jit
def _rope(x1, x2, pos, ROPE_STEP, HALF: tl.constexpr, SIGN: tl.constexpr):
    """Rotate-half RoPE of (R, HALF) halves at integer positions pos (R,), fp32 result.

    The angle pos * theta_t is formed exactly, in fixed point: ROPE_STEP[t] (int64) is
    theta_t / (2 pi) in units of 2**-48 turns, so (pos * ROPE_STEP[t]) mod 2**48 (int64
    wrap-around, then a mask) is the angle's fraction of a turn; the errors are ROPE_STEP's
    rounding (pos * 2**-49 turns) and the fp32 conversion (2**-25 turns): |angle error| < 4e-7
    rad for every position below 2**24, instead of ~ulp(pos * theta) for an fp32 product.
    SIGN=1 rotates by +angle (the forward map), SIGN=-1 by -angle (its transpose, for gradients).
    """
    step = tl.load(ROPE_STEP + tl.arange(0, HALF))
    frac = (pos.to(tl.int64)[:, None] * step[None, :]) & 0xFFFFFFFFFFFF
    c, s = _cos_sin_turns(frac.to(tl.float32) * 3.552713678800501e-15)  # * 2**-48
    s = s * SIGN
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _load_rot(ptr, idx, ok, pos, ROPE_STEP, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
              ROPE: tl.constexpr):
    """Rows idx (R,) of a (T, HEAD_DIM) matrix as two halves (R, HALF), RoPE'd at pos if ROPE."""
    offs = idx[:, None] * HEAD_DIM + tl.arange(0, HALF)[None, :]
    x1 = tl.load(ptr + offs, mask=ok[:, None], other=0.0)
    x2 = tl.load(ptr + offs + HALF, mask=ok[:, None], other=0.0)
    if ROPE:
        r1, r2 = _rope(x1, x2, pos, ROPE_STEP, HALF, 1)
        x1 = r1.to(x1.dtype)
        x2 = r2.to(x2.dtype)
    return x1, x2


@triton.jit
def _load_rows(ptr, idx, ok, HEAD_DIM: tl.constexpr):
    """Rows idx (R,) of a (T, HEAD_DIM) matrix -> (R, HEAD_DIM)."""
    offs = idx[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    return tl.load(ptr + offs, mask=ok[:, None], other=0.0)


@triton.jit
def _store_rows(ptr, idx, ok, x, HEAD_DIM: tl.constexpr):
    offs = idx[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _store_halves(ptr, idx, ok, x1, x2, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs = idx[:, None] * HEAD_DIM + tl.arange(0, HALF)[None, :]
    tl.store(ptr + offs, x1.to(ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(ptr + offs + HALF, x2.to(ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _scores(q1, q2, k1, k2, qk_scale, DOT_PREC: tl.constexpr):
    """(q . k) * qk_scale for halves q (M, HALF) and k (N, HALF) -> (M, N) fp32."""
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
    return s * qk_scale


@triton.jit
def _along_queries(x, KEY_MAJOR: tl.constexpr):
    """A per-query vector x broadcast over a tile: (M, 1), or (1, M) for a key-major (N, M) tile."""
    if KEY_MAJOR:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _along_keys(x, KEY_MAJOR: tl.constexpr):
    """A per-key vector x broadcast over a tile: (1, N), or (N, 1) for a key-major (N, M) tile."""
    if KEY_MAJOR:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _mask_scores(s, rows, cols, off, n_keys, first_key, chunk_size, MEM: tl.constexpr,
                 MASKED: tl.constexpr, DO_2, KEY_MAJOR: tl.constexpr):
    """Scores of states 1 and 2 with invalid pairs set to -inf; s is (M, N) (queries rows,
    keys cols), or (N, M) when KEY_MAJOR.

    MEM: state 1 = memory slots [first_key, n_keys). Otherwise state 1 = global (key j <= a_i,
    a_i = i + off; no mask when not MASKED: the caller knows the whole tile is valid) and
    state 2 = chunk (global and j >= the start of a_i's chunk). Padded query rows (i >= Tq) are
    not masked: their q, dO and statistics load as 0, so they contribute exactly 0.
    """
    if MEM:
        s1 = tl.where(_along_keys((cols >= first_key) & (cols < n_keys), KEY_MAJOR), s,
                      float("-inf"))
        s2 = s1
    else:
        a = rows + off
        key = _along_keys(cols, KEY_MAJOR)
        if MASKED:
            s1 = tl.where(key <= _along_queries(a, KEY_MAJOR), s, float("-inf"))
        else:
            s1 = s
        if DO_2:
            s2 = tl.where(key >= _along_queries((a // chunk_size) * chunk_size, KEY_MAJOR), s1,
                          float("-inf"))
        else:
            s2 = s1
    return s1, s2


@triton.jit
def _key_range(m0, Tq, off, chunk_size, HAS_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key blocks of query block [m0, m0 + BLOCK_M): [0, split) lie below every row's diagonal
    and before every row's chunk (global path only, no mask); [split, hi) need masks. Keys at
    or after hi are above the diagonal of every row."""
    hi = tl.minimum(m0 + BLOCK_M, Tq) + off
    first = m0 + off  # key index a of the block's first row
    if HAS_CHUNK:
        first = (first // chunk_size) * chunk_size
    return (first // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(n0, Tq, Tk, off, chunk_size, HAS_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Query blocks that see key block [n0, n0 + BLOCK_N): [lo, split) need masks (diagonal,
    chunk window), [split, Tq) see every key of the block through the global path only."""
    lo = (tl.maximum(n0 - off, 0) // BLOCK_M) * BLOCK_M
    q_hi = n0 + BLOCK_N - off  # rows with a_i >= n0 + BLOCK_N see the whole block
    if HAS_CHUNK:
        last = tl.minimum(n0 + BLOCK_N, Tk) - 1
        q_hi = tl.maximum(q_hi, (last // chunk_size + 1) * chunk_size - off)
    q_hi = tl.minimum(q_hi, Tq)
    return lo, lo + tl.cdiv(tl.maximum(q_hi - lo, 0), BLOCK_M) * BLOCK_M


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _online_softmax_step(m_i, l_i, acc, s, v, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax; s (M, N) in log2 units, -inf where masked."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """Normalized output (M, D) fp32 and LSE (M,) of an online-softmax state; empty rows -> 0."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, _EMPTY_LSE, m_i + tl.log2(l_safe))
    return acc / l_safe[:, None], lse


@triton.jit
def _fwd_loop(m1, l1, acc1, m2, l2, acc2, q1, q2, rows, k_ptr, v_ptr, ROPE_STEP,
              off, n_keys, first_key, chunk_size, start_pos, qk_scale, lo, hi,
              HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              DO_1: tl.constexpr, DO_2: tl.constexpr, MASKED: tl.constexpr, MEM: tl.constexpr,
              ROPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax of states 1 and 2 over key blocks [lo, hi), one QK^T tile per block."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_keys
        k1, k2 = _load_rot(k_ptr, cols, col_ok, start_pos + cols, ROPE_STEP, HALF, HEAD_DIM, ROPE)
        v = _load_rows(v_ptr, cols, col_ok, HEAD_DIM)
        s = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
        s1, s2 = _mask_scores(s, rows, cols, off, n_keys, first_key, chunk_size, MEM, MASKED, DO_2,
                              False)
        if DO_1:
            m1, l1, acc1 = _online_softmax_step(m1, l1, acc1, s1, v, DOT_PREC)
        if DO_2:
            m2, l2, acc2 = _online_softmax_step(m2, l2, acc2, s2, v, DOT_PREC)
    return m1, l1, acc1, m2, l2, acc2


@triton.jit
def _finish_path(out, m_i, l_i, acc, w, lse_ptr, rows, row_ok):
    """Add w * O_p to out and save the path's LSE."""
    o, lse = _finish(m_i, l_i, acc)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    return out + w * o


@triton.jit
def _query_program(H, G, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Indices of a (query block, b, h) program: batch b, head h, its kv row bg = b * G + g,
    the block's first row m0, its rows (BLOCK_M,) and their mask, the offset of this head's
    (Tq, D) rows and of its (3, Tq) per-path statistics."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    bh = b * H + h
    bg = (b * G + h // (H // G)).to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    return b, h, bg, m0, rows, rows < Tq, bh.to(tl.int64) * Tq * HEAD_DIM, bh.to(tl.int64) * 3 * Tq


@triton.jit
def hybrid_attention_fwd_kernel(
    Q, K, V, MK, MV, W, MEMLEN, ROPE_STEP, OUT, LSE,
    H, G, Tq, Tk, S, chunk_size, start_pos, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_MEM: tl.constexpr,
    ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query block, b, h): out = w_g O_g + w_c O_c + w_m O_m and the LSE of
    each path."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h, bg, m0, rows, row_ok, q_off, stats_off = _query_program(H, G, Tq, HEAD_DIM, BLOCK_M)
    off = Tk - Tq
    lse_ptr = LSE + stats_off
    out = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Memory path first (fewer live accumulators during the long key loop that follows):
    # un-rotated q against the valid (right-aligned) slots of row b.
    if HAS_MEM:
        q1, q2 = _load_rot(Q + q_off, rows, row_ok, rows, ROPE_STEP, HALF, HEAD_DIM, False)
        first = S - tl.load(MEMLEN + b)
        m_m = tl.full([BLOCK_M], _EMPTY_LSE, dtype=tl.float32)
        l_m = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_m = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        mk_ptr = MK + bg * S * HEAD_DIM
        mv_ptr = MV + bg * S * HEAD_DIM
        m_m, l_m, acc_m, _m, _l, _acc = _fwd_loop(
            m_m, l_m, acc_m, m_m, l_m, acc_m, q1, q2, rows, mk_ptr, mv_ptr, ROPE_STEP,
            off, S, first, chunk_size, start_pos, qk_scale, (first // BLOCK_N) * BLOCK_N, S,
            HALF, HEAD_DIM, BLOCK_N, True, False, True, True, False, DOT_PREC)
        w_m = tl.load(W + h * 3 + 2)
        out = _finish_path(out, m_m, l_m, acc_m, w_m, lse_ptr + 2 * Tq, rows, row_ok)
    # Global and chunk paths: one pass over the key blocks up to the diagonal (RoPE'd q).
    q1, q2 = _load_rot(Q + q_off, rows, row_ok, start_pos + off + rows, ROPE_STEP, HALF, HEAD_DIM,
                       ROPE)
    m_g = tl.full([BLOCK_M], _EMPTY_LSE, dtype=tl.float32)
    l_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_c = tl.full([BLOCK_M], _EMPTY_LSE, dtype=tl.float32)
    l_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_ptr = K + bg * Tk * HEAD_DIM
    v_ptr = V + bg * Tk * HEAD_DIM
    split, hi = _key_range(m0, Tq, off, chunk_size, HAS_CHUNK, BLOCK_M, BLOCK_N)
    if USE_GLOBAL:  # tiles fully below the diagonal and before the chunks: no mask
        m_g, l_g, acc_g, m_c, l_c, acc_c = _fwd_loop(
            m_g, l_g, acc_g, m_c, l_c, acc_c, q1, q2, rows, k_ptr, v_ptr, ROPE_STEP,
            off, Tk, 0, chunk_size, start_pos, qk_scale, 0, split,
            HALF, HEAD_DIM, BLOCK_N, True, False, False, False, ROPE, DOT_PREC)
    if USE_GLOBAL or HAS_CHUNK:  # chunk window and diagonal: masked, one QK^T per tile
        m_g, l_g, acc_g, m_c, l_c, acc_c = _fwd_loop(
            m_g, l_g, acc_g, m_c, l_c, acc_c, q1, q2, rows, k_ptr, v_ptr, ROPE_STEP,
            off, Tk, 0, chunk_size, start_pos, qk_scale, split, hi,
            HALF, HEAD_DIM, BLOCK_N, USE_GLOBAL, HAS_CHUNK, True, False, ROPE, DOT_PREC)
    if USE_GLOBAL:
        w_g = tl.load(W + h * 3)
        out = _finish_path(out, m_g, l_g, acc_g, w_g, lse_ptr, rows, row_ok)
    if HAS_CHUNK:
        w_c = tl.load(W + h * 3 + 1)
        out = _finish_path(out, m_c, l_c, acc_c, w_c, lse_ptr + Tq, rows, row_ok)

    _store_rows(OUT + q_off, rows, row_ok, out, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _path_grad(pw, ds, s, dp, lse, di, w, KEY_MAJOR: tl.constexpr):
    """Add path p's w_p * P_p to pw and its score gradient P_p * (w_p dP - DI_p) to ds; also
    return rowsum(P_p * dP) = rowsum(dO * O_p) (M,). s is -inf where masked; tiles are (M, N),
    or (N, M) when KEY_MAJOR."""
    p = tl.exp2(s - _along_queries(lse, KEY_MAJOR))
    wp = w * p
    ds = ds + (wp * dp - p * _along_queries(di, KEY_MAJOR))
    if KEY_MAJOR:
        r = tl.sum(p * dp, 0)
    else:
        r = tl.sum(p * dp, 1)
    return pw + wp, ds, r


@triton.jit
def _row_stat(x, row_ok, LOAD: tl.constexpr):
    """x itself (M,), or, when LOAD, the rows that the (M,) pointers x point to (0 past Tq)."""
    if LOAD:
        x = tl.load(x, mask=row_ok, other=0.0)
    return x


@triton.jit
def _tile_grads(q1, q2, k1, k2, do, v, rows, cols, row_ok, lse1, di1, w1, lse2, di2, w2,
                off, n_keys, first_key, chunk_size, qk_scale,
                DO_1: tl.constexpr, DO_2, MASKED: tl.constexpr, MEM: tl.constexpr,
                LOAD_STATS: tl.constexpr, KEY_MAJOR: tl.constexpr, DOT_PREC: tl.constexpr):
    """Recompute one (query tile, key tile) of states 1 and 2 (as in _fwd_loop).

    DO_2 is a constexpr, or a runtime scalar bool (the dk/dv loop's "tile in a chunk window").

    q halves (M, HALF), do (M, D), k halves (N, HALF), v (N, D); lse*, di* (M,) and the weights
    w* of the two states; with LOAD_STATS, lse* and di* are (M,) pointers, loaded after the dots
    (loaded before them, they stay live across the dots: the D = 256 dk/dv kernel then spills).
    Returns pw = sum_p w_p P_p (M, N), the weights of dV; ds = sum_p P_p (w_p dP - DI_p) (M, N),
    the gradient of the scores (in units of q.k * scale); and r1, r2 = rowsum(P dP) (M,) of each
    state, 0 for a state that is off. KEY_MAJOR computes the transposed tiles, (N, M), for the
    dk/dv loops: their dots (K Q^T, V dO^T, P^T dO, dS^T Q) then all have the key block as their
    M dimension, which is what lets a small query block still use Hopper's wgmma.
    """
    if KEY_MAJOR:
        s = _scores(k1, k2, q1, q2, qk_scale, DOT_PREC)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    else:
        s = _scores(q1, q2, k1, k2, qk_scale, DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    s1, s2 = _mask_scores(s, rows, cols, off, n_keys, first_key, chunk_size, MEM, MASKED, DO_2,
                          KEY_MAJOR)
    pw = tl.zeros_like(dp)
    ds = tl.zeros_like(dp)
    r1 = tl.zeros([do.shape[0]], dtype=tl.float32)
    r2 = r1
    if DO_1:
        pw, ds, r1 = _path_grad(pw, ds, s1, dp, _row_stat(lse1, row_ok, LOAD_STATS),
                                _row_stat(di1, row_ok, LOAD_STATS), w1, KEY_MAJOR)
    if DO_2:
        pw, ds, r2 = _path_grad(pw, ds, s2, dp, _row_stat(lse2, row_ok, LOAD_STATS),
                                _row_stat(di2, row_ok, LOAD_STATS), w2, KEY_MAJOR)
    return pw, ds, r1, r2


@triton.jit
def _bwd_q_loop(dq1, dq2, r1, r2, q1, q2, do, rows, k_ptr, v_ptr, ROPE_STEP,
                lse1, di1, w1, lse2, di2, w2,
                off, n_keys, first_key, chunk_size, start_pos, qk_scale, lo, hi,
                HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                DO_1: tl.constexpr, DO_2: tl.constexpr, MASKED: tl.constexpr, MEM: tl.constexpr,
                ROPE: tl.constexpr, GRAD_Q: tl.constexpr, DOT_PREC: tl.constexpr):
    """Over key blocks [lo, hi): add rowsum(P dP) of states 1/2 (as in _fwd_loop) to r1, r2 and,
    when GRAD_Q, the query block's dq halves (w.r.t. the q used in the scores) to dq1, dq2."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_keys
        k1, k2 = _load_rot(k_ptr, cols, col_ok, start_pos + cols, ROPE_STEP, HALF, HEAD_DIM, ROPE)
        v = _load_rows(v_ptr, cols, col_ok, HEAD_DIM)
        pw, ds, t1, t2 = _tile_grads(q1, q2, k1, k2, do, v, rows, cols, None, lse1, di1, w1,
                                     lse2, di2, w2, off, n_keys, first_key, chunk_size, qk_scale,
                                     DO_1, DO_2, MASKED, MEM, False, False, DOT_PREC)
        r1 += t1
        r2 += t2
        if GRAD_Q:
            ds = ds.to(k1.dtype)
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
            dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2, r1, r2


@triton.jit
def _store_derived(ptr, rows, row_ok, Tq, x, USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Store x (M,) into the statistics row of the derived path (global, else chunk, else
    memory) of a (3, Tq) block."""
    if USE_GLOBAL:
        tl.store(ptr + rows, x, mask=row_ok)
    elif HAS_CHUNK:
        tl.store(ptr + Tq + rows, x, mask=row_ok)
    else:
        tl.store(ptr + 2 * Tq + rows, x, mask=row_ok)


@triton.jit
def hybrid_attention_bwd_preprocess_kernel(
    Q, K, V, MK, MV, OUT, DO, W, MEMLEN, ROPE_STEP, LSE, DI, DW,
    H, G, Tq, Tk, S, chunk_size, start_pos, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_MEM: tl.constexpr,
    ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query block, b, h): DI of every path that is on, and DW of every
    path but the derived one (see the module docstring). The memory path (S slots) and, with the
    global path on, the chunk path (the keys of the rows' chunks) are recomputed; the derived
    path's DI is rowsum(dO * out) minus the others'."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h, bg, m0, rows, row_ok, q_off, stats_off = _query_program(H, G, Tq, HEAD_DIM, BLOCK_M)
    off = Tk - Tq
    lse_ptr = LSE + stats_off
    di_ptr = DI + stats_off
    dw_ptr = DW + stats_off
    do = _load_rows(DO + q_off, rows, row_ok, HEAD_DIM)
    o = _load_rows(OUT + q_off, rows, row_ok, HEAD_DIM)
    di = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    no_dq = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    if HAS_MEM and (USE_GLOBAL or HAS_CHUNK):
        q1, q2 = _load_rot(Q + q_off, rows, row_ok, rows, ROPE_STEP, HALF, HEAD_DIM, False)
        lse = tl.load(lse_ptr + 2 * Tq + rows, mask=row_ok, other=0.0)
        first = S - tl.load(MEMLEN + b)
        _dq1, _dq2, r, _r = _bwd_q_loop(
            no_dq, no_dq, zero, zero, q1, q2, do, rows, MK + bg * S * HEAD_DIM,
            MV + bg * S * HEAD_DIM, ROPE_STEP, lse, zero, 0.0, lse, zero, 0.0,
            off, S, first, 1, 0, qk_scale, (first // BLOCK_N) * BLOCK_N, S,
            HALF, HEAD_DIM, BLOCK_N, True, False, True, True, False, False, DOT_PREC)
        w = tl.load(W + h * 3 + 2)
        tl.store(dw_ptr + 2 * Tq + rows, r, mask=row_ok)
        tl.store(di_ptr + 2 * Tq + rows, w * r, mask=row_ok)
        di -= w * r
    if HAS_CHUNK and USE_GLOBAL:
        q1, q2 = _load_rot(Q + q_off, rows, row_ok, start_pos + off + rows, ROPE_STEP, HALF,
                           HEAD_DIM, ROPE)
        lse = tl.load(lse_ptr + Tq + rows, mask=row_ok, other=0.0)
        split, hi = _key_range(m0, Tq, off, chunk_size, True, BLOCK_M, BLOCK_N)
        _dq1, _dq2, _r, r = _bwd_q_loop(
            no_dq, no_dq, zero, zero, q1, q2, do, rows, K + bg * Tk * HEAD_DIM,
            V + bg * Tk * HEAD_DIM, ROPE_STEP, lse, zero, 0.0, lse, zero, 0.0,
            off, Tk, 0, chunk_size, start_pos, qk_scale, split, hi,
            HALF, HEAD_DIM, BLOCK_N, False, True, True, False, ROPE, False, DOT_PREC)
        w = tl.load(W + h * 3 + 1)
        tl.store(dw_ptr + Tq + rows, r, mask=row_ok)
        tl.store(di_ptr + Tq + rows, w * r, mask=row_ok)
        di -= w * r
    _store_derived(di_ptr, rows, row_ok, Tq, di, USE_GLOBAL, HAS_CHUNK)


@triton.jit
def hybrid_attention_bwd_dq_kernel(
    Q, K, V, MK, MV, DO, W, MEMLEN, ROPE_STEP, LSE, DI, DW, DQ,
    H, G, Tq, Tk, S, chunk_size, start_pos, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_MEM: tl.constexpr,
    ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query block, b, h): dq of all three paths (no atomics), and the
    derived path's DW."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b, h, bg, m0, rows, row_ok, q_off, stats_off = _query_program(H, G, Tq, HEAD_DIM, BLOCK_M)
    off = Tk - Tq
    lse_ptr = LSE + stats_off
    di_ptr = DI + stats_off
    do = _load_rows(DO + q_off, rows, row_ok, HEAD_DIM)
    dq1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    r_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_m = tl.zeros([BLOCK_M], dtype=tl.float32)

    q1, q2 = _load_rot(Q + q_off, rows, row_ok, start_pos + off + rows, ROPE_STEP, HALF, HEAD_DIM,
                       ROPE)
    lse_g = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    di_g = tl.load(di_ptr + rows, mask=row_ok, other=0.0)
    lse_c = tl.load(lse_ptr + Tq + rows, mask=row_ok, other=0.0)
    di_c = tl.load(di_ptr + Tq + rows, mask=row_ok, other=0.0)
    w_g = tl.load(W + h * 3)
    w_c = tl.load(W + h * 3 + 1)
    k_ptr = K + bg * Tk * HEAD_DIM
    v_ptr = V + bg * Tk * HEAD_DIM
    split, hi = _key_range(m0, Tq, off, chunk_size, HAS_CHUNK, BLOCK_M, BLOCK_N)
    if USE_GLOBAL:  # same tile split as the forward
        dq1, dq2, r_g, r_c = _bwd_q_loop(
            dq1, dq2, r_g, r_c, q1, q2, do, rows, k_ptr, v_ptr, ROPE_STEP,
            lse_g, di_g, w_g, lse_c, di_c, w_c, off, Tk, 0, chunk_size, start_pos, qk_scale,
            0, split, HALF, HEAD_DIM, BLOCK_N, True, False, False, False, ROPE, True, DOT_PREC)
    if USE_GLOBAL or HAS_CHUNK:
        dq1, dq2, r_g, r_c = _bwd_q_loop(
            dq1, dq2, r_g, r_c, q1, q2, do, rows, k_ptr, v_ptr, ROPE_STEP,
            lse_g, di_g, w_g, lse_c, di_c, w_c, off, Tk, 0, chunk_size, start_pos, qk_scale,
            split, hi, HALF, HEAD_DIM, BLOCK_N, USE_GLOBAL, HAS_CHUNK, True, False, ROPE, True,
            DOT_PREC)
    if ROPE:
        dq1, dq2 = _rope(dq1, dq2, start_pos + off + rows, ROPE_STEP, HALF, -1)

    if HAS_MEM:
        q1, q2 = _load_rot(Q + q_off, rows, row_ok, rows, ROPE_STEP, HALF, HEAD_DIM, False)
        lse_m = tl.load(lse_ptr + 2 * Tq + rows, mask=row_ok, other=0.0)
        di_m = tl.load(di_ptr + 2 * Tq + rows, mask=row_ok, other=0.0)
        w_m = tl.load(W + h * 3 + 2)
        first = S - tl.load(MEMLEN + b)
        dq1, dq2, r_m, _r = _bwd_q_loop(
            dq1, dq2, r_m, r_m, q1, q2, do, rows, MK + bg * S * HEAD_DIM, MV + bg * S * HEAD_DIM,
            ROPE_STEP, lse_m, di_m, w_m, lse_m, di_m, w_m, off, S, first, 1, 0, qk_scale,
            (first // BLOCK_N) * BLOCK_N, S, HALF, HEAD_DIM, BLOCK_N, True, False, True, True,
            False, True, DOT_PREC)
    _store_halves(DQ + q_off, rows, row_ok, dq1 * scale, dq2 * scale, HALF, HEAD_DIM)
    if USE_GLOBAL:
        r = r_g
    elif HAS_CHUNK:
        r = r_c
    else:
        r = r_m
    _store_derived(DW + stats_off, rows, row_ok, Tq, r, USE_GLOBAL, HAS_CHUNK)


@triton.jit
def _kv_program(G, BLOCK_N: tl.constexpr):
    """Indices of a (key block, b, g) program: the block's first key n0, batch b, kv head g and
    the kv row bg = b * G + g (int64)."""
    b = tl.program_id(1)
    g = tl.program_id(2)
    return tl.program_id(0) * BLOCK_N, b, g, (b * G + g).to(tl.int64)


@triton.jit
def _keys_first(x, KEY_MAJOR: tl.constexpr):
    """A tile of _tile_grads as (N, M), keys first: itself when KEY_MAJOR, else transposed."""
    if KEY_MAJOR:
        return x
    else:
        return tl.trans(x)


@triton.jit
def _bwd_kv_loop(dk1, dk2, dv, k1, k2, v, cols, Q, DO, LSE, DI, W, b, H, g, rep,
                 ROPE_STEP, Tq, off, n_keys, first_key, chunk_size, start_pos, qk_scale,
                 lo, split, hi,
                 P1: tl.constexpr, P2: tl.constexpr,
                 HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 DO_1: tl.constexpr, DO_2: tl.constexpr, MEM: tl.constexpr,
                 ROPE: tl.constexpr, KEY_MAJOR: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate the key block's (rotated) dk halves and dv over the query blocks [lo, hi) of
    each of the rep query heads g * rep + j of the group, as one flat loop (one loop body: the
    registers of a second copy of the tile code would stay allocated across the first).
    States 1/2 are the paths P1/P2 (rows of LSE/DI, columns of W); state 2 is computed only
    for the query blocks before split (the chunk window: past it, no row sees the key block
    through state 2). KEY_MAJOR: see _tile_grads (the launcher sets it with the sm_90 tiles;
    elsewhere the transposes are cheaper in registers)."""
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    for t in range(0, rep * n_blocks):
        j = t // n_blocks
        start_m = lo + (t - j * n_blocks) * BLOCK_M
        h = g * rep + j
        bh = (b * H + h).to(tl.int64)
        q_off = bh * Tq * HEAD_DIM
        stats = LSE + bh * 3 * Tq
        dstats = DI + bh * 3 * Tq
        w1 = tl.load(W + h * 3 + P1)
        w2 = tl.load(W + h * 3 + P2)
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        q1, q2 = _load_rot(Q + q_off, rows, row_ok, start_pos + off + rows, ROPE_STEP, HALF,
                           HEAD_DIM, ROPE)
        do = _load_rows(DO + q_off, rows, row_ok, HEAD_DIM)
        pw, ds, _r1, _r2 = _tile_grads(
            q1, q2, k1, k2, do, v, rows, cols, row_ok, stats + P1 * Tq + rows,
            dstats + P1 * Tq + rows, w1, stats + P2 * Tq + rows, dstats + P2 * Tq + rows, w2,
            off, n_keys, first_key, chunk_size, qk_scale, DO_1, (start_m < split) & DO_2, True,
            MEM, True, KEY_MAJOR, DOT_PREC)
        dv = tl.dot(_keys_first(pw.to(do.dtype), KEY_MAJOR), do, dv, input_precision=DOT_PREC)
        ds = _keys_first(ds.to(q1.dtype), KEY_MAJOR)
        dk1 = tl.dot(ds, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(ds, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit
def hybrid_attention_bwd_dkdv_kernel(
    Q, K, V, DO, W, ROPE_STEP, LSE, DI, DK, DV,
    H, G, Tq, Tk, chunk_size, start_pos, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr, ROPE: tl.constexpr,
    KEY_MAJOR: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (key block, b, g): dk, dv of the global and chunk paths, summed over
    the H/G query heads of the group in a fixed order (deterministic, no atomics)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    n0, b, g, bg = _kv_program(G, BLOCK_N)
    off = Tk - Tq
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    kv_off = bg * Tk * HEAD_DIM
    k1, k2 = _load_rot(K + kv_off, cols, col_ok, start_pos + cols, ROPE_STEP, HALF, HEAD_DIM, ROPE)
    v = _load_rows(V + kv_off, cols, col_ok, HEAD_DIM)
    dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Query blocks [lo, split) hold the block's diagonal and chunk windows; later queries see
    # the whole block through the global path only.
    lo, split = _query_range(n0, Tq, Tk, off, chunk_size, HAS_CHUNK, BLOCK_M, BLOCK_N)
    if USE_GLOBAL:
        hi = Tq
    else:
        hi = split
    dk1, dk2, dv = _bwd_kv_loop(
        dk1, dk2, dv, k1, k2, v, cols, Q, DO, LSE, DI, W, b, H, g, H // G,
        ROPE_STEP, Tq, off, Tk, 0, chunk_size, start_pos, qk_scale, lo, split, hi, 0, 1,
        HALF, HEAD_DIM, BLOCK_M, USE_GLOBAL, HAS_CHUNK, False, ROPE, KEY_MAJOR, DOT_PREC)
    if ROPE:
        dk1, dk2 = _rope(dk1, dk2, start_pos + cols, ROPE_STEP, HALF, -1)
    _store_halves(DK + kv_off, cols, col_ok, dk1 * scale, dk2 * scale, HALF, HEAD_DIM)
    _store_rows(DV + kv_off, cols, col_ok, dv, HEAD_DIM)


@triton.jit
def hybrid_attention_bwd_dmem_kernel(
    Q, MK, MV, DO, W, MEMLEN, ROPE_STEP, LSE, DI, DMK, DMV,
    H, G, Tq, S, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KEY_MAJOR: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (slot block, b, g): dmem_k, dmem_v over all queries of the group's
    heads (every query sees every valid slot). Blocks of invalid slots get zeros."""
    HALF: tl.constexpr = HEAD_DIM // 2
    n0, b, g, bg = _kv_program(G, BLOCK_N)
    first = S - tl.load(MEMLEN + b)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    kv_off = bg * S * HEAD_DIM
    k1, k2 = _load_rot(MK + kv_off, cols, col_ok, cols, ROPE_STEP, HALF, HEAD_DIM, False)
    v = _load_rows(MV + kv_off, cols, col_ok, HEAD_DIM)
    dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    hi = tl.where(n0 + BLOCK_N > first, Tq, 0)
    dk1, dk2, dv = _bwd_kv_loop(
        dk1, dk2, dv, k1, k2, v, cols, Q, DO, LSE, DI, W, b, H, g, H // G,
        ROPE_STEP, Tq, 0, S, first, 1, 0, qk_scale, 0, 0, hi, 2, 2,
        HALF, HEAD_DIM, BLOCK_M, True, False, True, False, KEY_MAJOR, DOT_PREC)
    _store_halves(DMK + kv_off, cols, col_ok, dk1 * scale, dk2 * scale, HALF, HEAD_DIM)
    _store_rows(DMV + kv_off, cols, col_ok, dv, HEAD_DIM)
