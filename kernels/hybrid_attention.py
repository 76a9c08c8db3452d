"""Fused Triton kernels of hybrid attention (SPEC §1, §1b): forward and backward, ``@triton.jit`` only.

Launch, block sizes and autograd live in :mod:`chunkmem.triton_attention`. Layout (all tensors
contiguous): q, its rotation qr, out, do, dq (B, H, Tq, D); k, its rotation kr, v, dk, dv
(B, G, Tk, D); mem_k, mem_v, dmem_k, dmem_v
(Bm, G, S, D); weights (H, 3) fp32; mem_len (Bm,) int32; rope_step (D/2,) int64
(``rope_base ** (-2t/D) / (2 pi)`` in units of 2**-48 turns); the per-row statistics LSE, DI and
DW (B, H, 3, Tq) fp32, path index 0 = global, 1 = chunk, 2 = memory.

Rows (SPEC §1b; see ``_row_geometry``). The second grid axis runs over rows r: batch rows
(Bm = B), or with ``PACKED`` the N documents of batch row 0 (Bm = N; cu_seqlens_q/_k (N+1,)
int32), whose programs past the document's length return at once. A row has nq queries and
valid keys [k_lo, k_hi); query i sits at key index ``a_i = i + off`` (off = k_hi - nq) and key
j at position ``j + shift``. By default (no flag) k_lo = 0, k_hi = Tk, shift = start_pos (an
int32 argument), the v1 code path. ``RANGES``: per-row kv_start / kv_end (int32 (B,)). With
either flag, each row's chunk phase (int32 (Bm,), computed by the launcher on the device from
the start positions) is read from a device tensor, and RoPE rotates at the row's key indices
(shift = 0: RoPE depends on relative positions only, see _row_geometry). A query with
``a_i < k_lo`` (a padding query) gets output 0, empty-row LSEs and no gradient; keys outside
[k_lo, k_hi) load as 0, are masked, and get dk = dv = 0. Tiles without a valid key are
skipped (loop bounds from k_lo, k_hi).

Backward statistics, with O_p the normalized output of path p and out = sum_p w_p O_p:
``DW_p = rowsum(dO * O_p)`` (its sum over rows is dweights[p]) and ``DI_p = w_p * DW_p``, so that
path p's score gradient is ``dS_p = P_p * (w_p dP - DI_p)`` with ``dP = dO V^T``. The path outputs
are not saved (that would be up to 3x the output): since ``sum_p DI_p = rowsum(dO * out)``, the
most expensive path that is on (global, else chunk, else memory: the "derived" path) takes its
DI from that identity, the others (memory slots, chunk window) are recomputed by the
preprocess kernel as ``rowsum_j P_ij dP_ij``, and the derived path's DW is summed by the dq
kernel, which recomputes its P and dP anyway.

Conventions:
- Softmax statistics live in log2 units: with ``qk_scale = scale * log2(e)`` the tiles hold the
  unscaled ``q . k`` and ``P = exp2(q . k * qk_scale - m)`` is one FFMA and one exp2 per score.
  The saved LSE is ``m + log2(l)`` in the same units, so the backward recomputes
  ``P = exp2(q . k * qk_scale - LSE)``.
- RoPE runs once per call, outside the attention loops: ``rope_rotate_kernel`` writes the rotated
  q and k (qr, kr, in the input dtype: the rounding a tensor-core dot needs anyway) that the
  global and chunk paths read; the memory path reads the un-rotated q. The backward rotates
  again (nothing extra is saved) and rotates dq and dk back once per program (by -angle: RoPE is
  orthogonal). Every vector is handled as two halves ``x[:D/2], x[D/2:]`` so that rotate-half
  RoPE is ``x1 c - x2 s``, ``x2 c + x1 s`` in registers, and ``q . k = q1 . k1 + q2 . k2``.
- Masked scores are ``-inf``; the running max starts at a finite sentinel, so a row without any
  valid key keeps ``l = 0`` and gives output 0 and ``LSE = _EMPTY_LSE`` (finite), never NaN.
  In the forward, preprocess and dq kernels only the tiles that need it are masked: key tiles
  below the diagonal and before the chunk window of every row of a query block run unmasked
  (``MASKED=False``; with RANGES, the first key tile of a row is masked below k_lo). The dk/dv
  kernel likewise runs the query tiles that see its key block through the global path only
  without masks, and zeroes the gradients of keys outside the row's range at the end. Without
  the global path (linear cost) the chunk path takes the same unmasked code inside the chunks:
  key tiles in every row's chunk and below its diagonal (``_chunk_interior``), query tiles
  whose rows see the whole key block in their chunk (``_chunk_interior_queries``).
- Chunks are counted by position: key j is in chunk ``(j + shift) // chunk_size``; the kernels
  work in key indices with ``phase = shift mod chunk_size`` (``_chunk_start``).
- Padded query rows (i >= nq) and padding queries are not masked in the backward's score tiles:
  their q, dO, LSE and DI load as 0, so they contribute exactly 0 to dk/dv, and the rows past
  nq are never stored.
- RoPE angles are computed exactly in fixed point (see ``_rope``), so their accuracy does not
  degrade with the position.
- One generic loop per direction serves every path: "state 1" / "state 2" are (global, chunk)
  over the causal key range, or (memory, unused) over the memory slots (``MEM=True``), so the
  chunk path reuses the global path's QK^T tile. The forward runs one state per loop (the
  chunk's state is merged into the global one, see the forward kernel); the backward derives
  both paths' P from one exp2 per score (``_global_and_chunk_grads``).
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
def _load_halves(ptr, idx, ok, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MASK: tl.constexpr = True):
    """Rows idx (R,) of a (T, HEAD_DIM) matrix as two halves (R, HALF); rows where ok (R,) is
    False load as 0 (MASK=False: every row is loaded, ok is ignored)."""
    offs = idx[:, None] * HEAD_DIM + tl.arange(0, HALF)[None, :]
    if MASK:
        x1 = tl.load(ptr + offs, mask=ok[:, None], other=0.0)
        x2 = tl.load(ptr + offs + HALF, mask=ok[:, None], other=0.0)
    else:
        x1 = tl.load(ptr + offs)
        x2 = tl.load(ptr + offs + HALF)
    return x1, x2


@triton.jit
def _load_rows(ptr, idx, ok, HEAD_DIM: tl.constexpr, MASK: tl.constexpr = True):
    """Rows idx (R,) of a (T, HEAD_DIM) matrix -> (R, HEAD_DIM) (ok, MASK as in _load_halves)."""
    offs = idx[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    if MASK:
        x = tl.load(ptr + offs, mask=ok[:, None], other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x


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
def _scores(q1, q2, k1, k2, DOT_PREC: tl.constexpr):
    """q . k for halves q (M, HALF) and k (N, HALF) -> (M, N) fp32, unscaled: the callers fold
    qk_scale into the exponent (one FFMA per score, s * qk_scale - max)."""
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
    return tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)


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
def _chunk_start(a, phase, chunk_size):
    """Key index of the first key of the chunk of key index a (M,): chunks are counted by
    position, pos(j) = j + shift, with phase = shift mod chunk_size (int32: both are below
    Tk + 2, see _row_geometry). Meaningless for a < 0 (padding queries, masked anyway)."""
    return ((a + phase) // chunk_size) * chunk_size - phase


@triton.jit
def _chunk_end(j, phase, chunk_size, limit):
    """One past the last key index of key index j's chunk (j >= 0), at most limit."""
    return tl.minimum(((j + phase) // chunk_size + 1) * chunk_size - phase, limit)


@triton.jit
def _mask_scores(s, rows, cols, off, n_keys, first_key, q_lo, chunk_size, phase,
                 MEM: tl.constexpr, MASKED: tl.constexpr, DO_2, KEY_MAJOR: tl.constexpr,
                 RANGES: tl.constexpr, PRE: tl.constexpr = False):
    """Scores of states 1 and 2 with invalid pairs set to -inf; s is (M, N) (queries rows,
    keys cols), or (N, M) when KEY_MAJOR.

    MEM: state 1 = memory slots [first_key, n_keys) (and, with RANGES, only for the rows
    i >= q_lo: padding queries see no slot). Otherwise state 1 = global (key j <= a_i,
    a_i = i + off, and with RANGES j >= first_key, the row's first valid key; not masked when
    not MASKED: the caller knows the whole tile is valid, but for RANGES' lower bound) and
    state 2 = chunk (global and j >= the start of a_i's chunk, see _chunk_start). PRE: state 1 =
    the keys before a_i's chunk (the global path's other keys; with RANGES from first_key on).
    Padded query
    rows (i >= Tq) and padding queries (a_i < first valid key) need no mask in the backward:
    their q, dO and statistics load as 0, so they contribute exactly 0.
    """
    if MEM:
        ok = _along_keys((cols >= first_key) & (cols < n_keys), KEY_MAJOR)
        if RANGES:
            ok = ok & _along_queries(rows >= q_lo, KEY_MAJOR)
        s1 = tl.where(ok, s, float("-inf"))
        s2 = s1
    else:
        a = rows + off
        key = _along_keys(cols, KEY_MAJOR)
        if PRE:
            ok = key < _along_queries(_chunk_start(a, phase, chunk_size), KEY_MAJOR)
            if RANGES:
                ok = ok & (key >= first_key)
            s1 = tl.where(ok, s, float("-inf"))
        elif MASKED:
            ok = key <= _along_queries(a, KEY_MAJOR)
            if RANGES:
                ok = ok & (key >= first_key)
            s1 = tl.where(ok, s, float("-inf"))
        elif RANGES:
            s1 = tl.where(key >= first_key, s, float("-inf"))
        else:
            s1 = s
        if DO_2:
            start = _chunk_start(a, phase, chunk_size)
            s2 = tl.where(key >= _along_queries(start, KEY_MAJOR), s1, float("-inf"))
        else:
            s2 = s1
    return s1, s2


@triton.jit
def _key_range(m0, nq, off, k_lo, chunk_size, phase, HAS_CHUNK: tl.constexpr,
               RANGES: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key blocks of query block [m0, m0 + BLOCK_M) of a row with nq queries and valid keys
    from k_lo: [lo, split) lie below every row's diagonal and before every row's chunk
    (global path only, no mask but RANGES' lower bound k_lo); [split, hi) need masks. Keys at
    or after hi are above the diagonal of every row; keys before lo are not valid. A block
    holding a padding query (a_i < k_lo) has no unmasked block; one of padding queries only
    has none at all."""
    hi = tl.minimum(m0 + BLOCK_M, nq) + off
    first = m0 + off  # key index a of the block's first row
    if RANGES:
        first = tl.maximum(first, k_lo)
    if HAS_CHUNK:
        first = _chunk_start(first, phase, chunk_size)
    split = (first // BLOCK_N) * BLOCK_N
    if RANGES:
        lo = (k_lo // BLOCK_N) * BLOCK_N
        split = tl.maximum(split, lo)
        hi = tl.where(hi > k_lo, hi, split)
    else:
        lo = 0
    return lo, split, hi


@triton.jit
def _first_full_tile(lo, split, k_lo, RANGES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Start of the unmasked key tiles [lo, split) of _key_range that hold no key before k_lo:
    with RANGES the first tile may start before the row's first valid key (its keys below k_lo
    need a mask); lo otherwise."""
    if RANGES:
        return tl.minimum(tl.maximum(tl.cdiv(k_lo, BLOCK_N) * BLOCK_N, lo), split)
    else:
        return lo


@triton.jit
def _chunk_interior(m0, nq, off, k_lo, chunk_size, phase, split, hi, RANGES: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [c_lo, c_hi) of _key_range's masked blocks [split, hi) (BLOCK_N-aligned) that
    every row of query block [m0, m0 + BLOCK_M) sees through its chunk: at or after the chunk
    start of its last row (chunk starts grow with the row), at or below the diagonal of its
    first row and, with RANGES, from k_lo on (so none when the block holds a padding query).
    They need no mask for the chunk state; [split, c_lo) and [c_hi, hi) do. Without such
    blocks c_lo == c_hi, inside [split, hi)."""
    last = tl.minimum(m0 + BLOCK_M, nq) - 1 + off
    c_lo = tl.cdiv(_chunk_start(last, phase, chunk_size), BLOCK_N) * BLOCK_N
    if RANGES:
        c_lo = tl.maximum(c_lo, tl.cdiv(k_lo, BLOCK_N) * BLOCK_N)
    c_hi = ((m0 + off + 1) // BLOCK_N) * BLOCK_N
    c_lo = tl.minimum(tl.maximum(c_lo, split), hi)
    c_hi = tl.maximum(tl.minimum(c_hi, hi), c_lo)
    return c_lo, c_hi


@triton.jit
def _chunk_interior_queries(n0, off, chunk_size, phase, lo, split, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """Query blocks [q_a, q_b) of _query_range's masked blocks [lo, split) (BLOCK_M-aligned)
    whose every row sees all of key block [n0, n0 + BLOCK_N) through its chunk: at or after
    the diagonal of the block's last key, and before the end of the chunk of its first key (none
    when the key block straddles a chunk boundary). Keys outside the row's valid range are
    the caller's to zero; [lo, q_a) and [q_b, split) need masks. Without such blocks q_a == q_b,
    inside [lo, split)."""
    q_a = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    chunk_end = _chunk_start(n0, phase, chunk_size) + chunk_size
    q_b = (tl.maximum(chunk_end - off, 0) // BLOCK_M) * BLOCK_M
    q_a = tl.minimum(tl.maximum(q_a, lo), split)
    q_b = tl.maximum(tl.minimum(q_b, split), q_a)
    return q_a, q_b


@triton.jit
def _query_range(n0, nq, off, k_lo, k_hi, chunk_size, phase, HAS_CHUNK: tl.constexpr,
                 RANGES: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Query blocks that see key block [n0, n0 + BLOCK_N) of a row with nq queries and valid
    keys [k_lo, k_hi): [lo, split) need masks (diagonal, chunk window), [split, hi) see every
    valid key of the block through the global path only. Empty when the block holds no valid
    key."""
    first = n0
    if RANGES:
        first = tl.maximum(n0, k_lo)
    lo = (tl.maximum(first - off, 0) // BLOCK_M) * BLOCK_M
    q_hi = n0 + BLOCK_N - off  # rows with a_i >= n0 + BLOCK_N see the whole block
    if HAS_CHUNK:
        last = tl.minimum(n0 + BLOCK_N, k_hi) - 1
        q_hi = tl.maximum(q_hi, _chunk_end(last, phase, chunk_size, k_hi) - off)
    q_hi = tl.minimum(q_hi, nq)
    split = lo + tl.cdiv(tl.maximum(q_hi - lo, 0), BLOCK_M) * BLOCK_M
    hi = nq
    if RANGES:
        empty = (n0 + BLOCK_N <= k_lo) | (n0 >= k_hi)
        split = tl.where(empty, lo, split)
        hi = tl.where(empty, lo, hi)
    return lo, split, hi


@triton.jit
def _row_geometry(r, Tq, Tk, chunk_phase, start_pos, KV_START, KV_END, CU_Q, CU_K, PHASE,
                  RANGES: tl.constexpr, PACKED: tl.constexpr):
    """Where row r (batch row, or document with PACKED) lives and what it sees.

    Returns b (batch index of its q, k, v), q0 / k0 (its first query / key along the Tq / Tk
    axis), nq (its queries), k_lo, k_hi (its valid keys, key indices relative to k0), off
    (a_i = i + off), shift (position of key index j = j + shift) and phase (shift mod
    chunk_size, see _chunk_start). With neither flag: the whole (Tq, Tk) row, positions from
    the start_pos argument, phase from chunk_phase. RANGES: keys [KV_START[r], KV_END[r]).
    PACKED: document r of row 0, queries CU_Q[r]:CU_Q[r+1], keys CU_K[r]:CU_K[r+1]. Either:
    phase PHASE[r] (int32, computed by the launcher on the device from the row's start
    position, reduced like chunk_size to values below Tk + 2) and shift = 0: RoPE at the key
    indices. RoPE scores depend on relative positions only (R(s + a)^T R(s + j) = R(j - a), and
    so do the gradients), so the row's start position matters only for chunk membership; this
    keeps every position in int32 (and the fixed-point angles at their most accurate).
    """
    if PACKED:
        b = 0
        q0 = tl.load(CU_Q + r)
        nq = tl.load(CU_Q + r + 1) - q0
        k0 = tl.load(CU_K + r)
        k_hi = tl.load(CU_K + r + 1) - k0
    else:
        b = r
        q0 = 0
        nq = Tq
        k0 = 0
        k_hi = Tk
    if RANGES:
        k_lo = tl.load(KV_START + r)
        k_hi = tl.load(KV_END + r)
    else:
        k_lo = 0
    off = k_hi - nq
    if RANGES or PACKED:
        shift = 0
        phase = tl.load(PHASE + r)
    else:
        shift = start_pos
        phase = chunk_phase
    return b, q0, nq, k0, k_lo, k_hi, off, shift, phase


# ----------------------------------------------------------------------------------------------
# RoPE, once per call
# ----------------------------------------------------------------------------------------------
@triton.jit
def rope_rotate_kernel(X, XR, ROPE_STEP, KV_START, KV_END, CU_Q, CU_K, PHASE,
                       T, Tq, Tk, start_pos,
                       HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, QUERIES: tl.constexpr,
                       RANGES: tl.constexpr, PACKED: tl.constexpr):
    """XR = RoPE(X), in X's dtype, at the positions the attention kernels give the queries
    (QUERIES: X = q (B, H, Tq, D), T = Tq; query i of a row at shift + off + i) or the keys
    (X = k (B, G, Tk, D), T = Tk; key j at shift + j), see _row_geometry. One program per
    (block of BLOCK rows, row or document, head). Only the rows the attention kernels read are
    written: not padding queries, nor keys outside a row's range, nor rows past a document."""
    HALF: tl.constexpr = HEAD_DIM // 2
    r = tl.program_id(1)
    b, q0, nq, k0, k_lo, k_hi, off, shift, _phase = _row_geometry(
        r, Tq, Tk, 0, start_pos, KV_START, KV_END, CU_Q, CU_K, PHASE, RANGES, PACKED)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if QUERIES:
        t0 = q0
        pos = shift + off + idx
        ok = idx < nq
        if RANGES:
            ok = ok & (idx >= k_lo - off)
    else:
        t0 = k0
        pos = shift + idx
        ok = _key_mask(idx, k_hi, k_lo, RANGES)
    base = ((b * tl.num_programs(2) + tl.program_id(2)).to(tl.int64) * T + t0) * HEAD_DIM
    x1, x2 = _load_halves(X + base, idx, ok, HALF, HEAD_DIM)
    r1, r2 = _rope(x1, x2, pos, ROPE_STEP, HALF, 1)
    _store_halves(XR + base, idx, ok, r1, r2, HALF, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _online_softmax_step(m_i, l_i, acc, s, v, qk_scale, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax; s (M, N) the unscaled scores q . k, -inf where
    masked; m_i, l_i in log2 units (qk_scale > 0 includes log2(e), so max(s) * qk_scale is
    the max of the scaled scores)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
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
def _merge_states(m1, l1, acc1, m2, l2, acc2):
    """The online-softmax state of the union of two disjoint key sets from theirs."""
    m = tl.maximum(m1, m2)
    a1 = tl.exp2(m1 - m)
    a2 = tl.exp2(m2 - m)
    return m, l1 * a1 + l2 * a2, acc1 * a1[:, None] + acc2 * a2[:, None]


@triton.jit
def _key_mask(cols, n_keys, first_key, RANGES: tl.constexpr):
    """Keys (or slots) of a block that are loaded: below n_keys and, with RANGES, from
    first_key on (keys outside a row's range load as 0: a pre-allocated cache may hold
    anything there). The loops load the unmasked tiles of a full row (neither MASKED nor
    RANGES) without a mask: every key of those lies below the diagonal."""
    ok = cols < n_keys
    if RANGES:
        ok = ok & (cols >= first_key)
    return ok


@triton.jit
def _past_gap(i, gap_lo, gap_hi, GAP: tl.constexpr):
    """Block start i of a loop over [lo, hi) that skips the blocks [gap_lo, gap_hi) (GAP; the
    loop then runs to hi - (gap_hi - gap_lo)): i, moved past the gap from gap_lo on."""
    if GAP:
        return i + tl.where(i >= gap_lo, gap_hi - gap_lo, 0)
    else:
        return i


@triton.jit
def _fwd_loop(m1, l1, acc1, m2, l2, acc2, q1, q2, rows, k_ptr, v_ptr,
              off, n_keys, first_key, q_lo, chunk_size, phase, qk_scale, lo, hi,
              HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              DO_1: tl.constexpr, DO_2: tl.constexpr, MASKED: tl.constexpr, MEM: tl.constexpr,
              RANGES: tl.constexpr, DOT_PREC: tl.constexpr, gap_lo=0, gap_hi=0,
              GAP: tl.constexpr = False, PRE: tl.constexpr = False):
    """Online softmax of states 1 and 2 over key blocks [lo, hi) (but [gap_lo, gap_hi) with
    GAP), one QK^T tile per block; PRE: state 1 over the keys before each row's chunk (see
    _mask_scores)."""
    for i in range(lo, hi - (gap_hi - gap_lo) if GAP else hi, BLOCK_N):
        cols = _past_gap(i, gap_lo, gap_hi, GAP) + tl.arange(0, BLOCK_N)
        col_ok = _key_mask(cols, n_keys, first_key, RANGES)
        k1, k2 = _load_halves(k_ptr, cols, col_ok, HALF, HEAD_DIM, MASK=MASKED or RANGES)
        v = _load_rows(v_ptr, cols, col_ok, HEAD_DIM, MASK=MASKED or RANGES)
        s = _scores(q1, q2, k1, k2, DOT_PREC)
        s1, s2 = _mask_scores(s, rows, cols, off, n_keys, first_key, q_lo, chunk_size, phase,
                              MEM, MASKED, DO_2, False, RANGES, PRE)
        if DO_1:
            m1, l1, acc1 = _online_softmax_step(m1, l1, acc1, s1, v, qk_scale, DOT_PREC)
        if DO_2:
            m2, l2, acc2 = _online_softmax_step(m2, l2, acc2, s2, v, qk_scale, DOT_PREC)
    return m1, l1, acc1, m2, l2, acc2


@triton.jit
def _finish_path(out, m_i, l_i, acc, w, lse_ptr, rows, row_in):
    """Add w * O_p to out and save the path's LSE."""
    o, lse = _finish(m_i, l_i, acc)
    tl.store(lse_ptr + rows, lse, mask=row_in)
    return out + w * o


@triton.jit
def _query_program(H, G, Tq, Tk, chunk_phase, start_pos, KV_START, KV_END, CU_Q, CU_K, PHASE,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   RANGES: tl.constexpr, PACKED: tl.constexpr):
    """Indices of a (query block, row r, head h) program (see _row_geometry): the kv row
    bg = b * G + g and memory row mg = r * G + g (int64), the block's first query m0, its
    rows (BLOCK_M,), row_in (rows < nq: rows to store) and row_ok (row_in and, with RANGES, not
    a padding query: rows to load), the offset of this head's first (query, D) row and of its
    (3, Tq) statistics, and the row geometry."""
    r = tl.program_id(1)
    h = tl.program_id(2)
    b, q0, nq, k0, k_lo, k_hi, off, shift, phase = _row_geometry(
        r, Tq, Tk, chunk_phase, start_pos, KV_START, KV_END, CU_Q, CU_K, PHASE, RANGES,
        PACKED)
    g = h // (H // G)
    bh = (b * H + h).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_in = rows < nq
    row_ok = row_in
    if RANGES:
        row_ok = row_ok & (rows >= k_lo - off)
    return (h, (b * G + g).to(tl.int64), (r * G + g).to(tl.int64), m0, rows, row_in, row_ok,
            (bh * Tq + q0) * HEAD_DIM, bh * 3 * Tq + q0, r, nq, k0, k_lo, k_hi, off, shift, phase)


@triton.jit
def _mem_range(m0, first, S, q_lo, RANGES: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """First slot block of the memory loop of query block m0 (S, an empty loop, when the block
    holds padding queries only)."""
    lo = (first // BLOCK_N) * BLOCK_N
    if RANGES:
        lo = tl.where(m0 + BLOCK_M > q_lo, lo, S)
    return lo


@triton.jit
def hybrid_attention_fwd_kernel(
    Q, QR, KR, V, MK, MV, W, MEMLEN, OUT, LSE, KV_START, KV_END, CU_Q, CU_K, PHASE,
    H, G, Tq, Tk, S, chunk_size, chunk_phase, start_pos, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_S: tl.constexpr, USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr,
    HAS_MEM: tl.constexpr, RANGES: tl.constexpr, PACKED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query block, row or document, h): out = w_g O_g + w_c O_c + w_m O_m
    and the LSE of each path. Key tiles: BLOCK_N keys in the global path's loops and in the
    chunk path's without it, BLOCK_W (a divisor of BLOCK_N) in the chunk path's beside the
    global path; BLOCK_S slots in the memory loop. QR, KR: q and k rotated by rope_rotate_kernel (q, k
    themselves without RoPE); the memory path reads the un-rotated Q."""
    HALF: tl.constexpr = HEAD_DIM // 2
    (h, bg, mg, m0, rows, row_in, row_ok, q_off, stats_off, r, nq, k0, k_lo, k_hi, off, shift,
     phase) = _query_program(H, G, Tq, Tk, chunk_phase, start_pos, KV_START, KV_END, CU_Q, CU_K,
                             PHASE, HEAD_DIM, BLOCK_M, RANGES, PACKED)
    if PACKED:
        if m0 >= nq:
            return
    q_lo = k_lo - off
    lse_ptr = LSE + stats_off
    # Every loop carries one online-softmax state. The global path's keys are split in two
    # disjoint sets: those before each row's chunk (the long unmasked loop, then masked tiles
    # where a row's chunk starts), one accumulator, BLOCK_N-key tiles; and the row's chunk,
    # which is the chunk path's key set: its state (BLOCK_W-key tiles beside the held global
    # accumulator) is merged into the global one afterwards, so the chunk's keys cost one QK^T
    # and one PV. The memory path last (BLOCK_S-slot tiles), beside the output accumulator.
    # Without the global path (linear cost) the chunk state alone takes BLOCK_N-key tiles.
    q1, q2 = _load_halves(QR + q_off, rows, row_ok, HALF, HEAD_DIM)
    m_g = tl.full([BLOCK_M], _EMPTY_LSE, dtype=tl.float32)
    l_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_ptr = KR + (bg * Tk + k0) * HEAD_DIM
    v_ptr = V + (bg * Tk + k0) * HEAD_DIM
    lo, split, hi = _key_range(m0, nq, off, k_lo, chunk_size, phase, HAS_CHUNK, RANGES,
                               BLOCK_M, BLOCK_N)
    if USE_GLOBAL:  # tiles fully below the diagonal and before the chunks: no mask...
        full = _first_full_tile(lo, split, k_lo, RANGES, BLOCK_N)
        if RANGES:  # ...but for the keys before k_lo in the first tile
            m_g, l_g, acc_g, _m, _l, _acc = _fwd_loop(
                m_g, l_g, acc_g, m_g, l_g, acc_g, q1, q2, rows, k_ptr, v_ptr,
                off, k_hi, k_lo, q_lo, chunk_size, phase, qk_scale, lo, full,
                HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False, MASKED=False, MEM=False,
                RANGES=True, DOT_PREC=DOT_PREC)
        m_g, l_g, acc_g, _m, _l, _acc = _fwd_loop(
            m_g, l_g, acc_g, m_g, l_g, acc_g, q1, q2, rows, k_ptr, v_ptr,
            off, k_hi, k_lo, q_lo, chunk_size, phase, qk_scale, full, split,
            HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False, MASKED=False, MEM=False,
            RANGES=False, DOT_PREC=DOT_PREC)
    if USE_GLOBAL:  # the masked rest of the global state's own keys, BLOCK_N-key tiles: the
        # diagonal, or with the chunk path the keys before each row's chunk
        if HAS_CHUNK:
            last = tl.minimum(m0 + BLOCK_M, nq) - 1 + off
            pre_hi = tl.minimum(tl.cdiv(_chunk_start(last, phase, chunk_size), BLOCK_N) * BLOCK_N,
                                hi)
        else:
            pre_hi = hi
        m_g, l_g, acc_g, _m, _l, _acc = _fwd_loop(
            m_g, l_g, acc_g, m_g, l_g, acc_g, q1, q2, rows, k_ptr, v_ptr,
            off, k_hi, k_lo, q_lo, chunk_size, phase, qk_scale, split, pre_hi,
            HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False, MASKED=True, MEM=False,
            RANGES=RANGES, DOT_PREC=DOT_PREC, PRE=HAS_CHUNK)
    m_c = tl.full([BLOCK_M], _EMPTY_LSE, dtype=tl.float32)
    l_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_CHUNK:  # the chunk state: unmasked inside every row's chunk, masked on either side;
        # BLOCK_N-key tiles alone (linear cost), BLOCK_W beside the held global state
        TILE: tl.constexpr = BLOCK_W if USE_GLOBAL else BLOCK_N
        c_lo, c_hi = _chunk_interior(m0, nq, off, k_lo, chunk_size, phase, split, hi, RANGES,
                                     BLOCK_M, TILE)
        m_c, l_c, acc_c, _m, _l, _acc = _fwd_loop(
            m_c, l_c, acc_c, m_c, l_c, acc_c, q1, q2, rows, k_ptr, v_ptr,
            off, k_hi, k_lo, q_lo, chunk_size, phase, qk_scale, c_lo, c_hi,
            HALF, HEAD_DIM, TILE, DO_1=True, DO_2=False, MASKED=False, MEM=False,
            RANGES=False, DOT_PREC=DOT_PREC)
        _m, _l, _acc, m_c, l_c, acc_c = _fwd_loop(
            m_c, l_c, acc_c, m_c, l_c, acc_c, q1, q2, rows, k_ptr, v_ptr,
            off, k_hi, k_lo, q_lo, chunk_size, phase, qk_scale, split, hi,
            HALF, HEAD_DIM, TILE, DO_1=False, DO_2=True, MASKED=True, MEM=False,
            RANGES=RANGES, DOT_PREC=DOT_PREC, gap_lo=c_lo, gap_hi=c_hi, GAP=True)
        if USE_GLOBAL:  # the chunk's keys are the global state's other keys
            m_g, l_g, acc_g = _merge_states(m_g, l_g, acc_g, m_c, l_c, acc_c)
    out = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if USE_GLOBAL:
        w_g = tl.load(W + h * 3)
        out = _finish_path(out, m_g, l_g, acc_g, w_g, lse_ptr, rows, row_in)
    if HAS_CHUNK:
        w_c = tl.load(W + h * 3 + 1)
        out = _finish_path(out, m_c, l_c, acc_c, w_c, lse_ptr + Tq, rows, row_in)
    if HAS_MEM:  # un-rotated q against the valid (right-aligned) slots of memory row r
        q1, q2 = _load_halves(Q + q_off, rows, row_ok, HALF, HEAD_DIM)
        first = S - tl.load(MEMLEN + r)
        m_m = tl.full([BLOCK_M], _EMPTY_LSE, dtype=tl.float32)
        l_m = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_m = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_m, l_m, acc_m, _m, _l, _acc = _fwd_loop(
            m_m, l_m, acc_m, m_m, l_m, acc_m, q1, q2, rows, MK + mg * S * HEAD_DIM,
            MV + mg * S * HEAD_DIM, off, S, first, q_lo, chunk_size, phase, qk_scale,
            _mem_range(m0, first, S, q_lo, RANGES, BLOCK_M, BLOCK_S), S,
            HALF, HEAD_DIM, BLOCK_S, DO_1=True, DO_2=False, MASKED=True, MEM=True, RANGES=RANGES,
            DOT_PREC=DOT_PREC)
        w_m = tl.load(W + h * 3 + 2)
        out = _finish_path(out, m_m, l_m, acc_m, w_m, lse_ptr + 2 * Tq, rows, row_in)
    _store_rows(OUT + q_off, rows, row_in, out, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _path_grad(pw, ds, s, dp, lse, di, w, qk_scale, KEY_MAJOR: tl.constexpr):
    """Add path p's w_p * P_p to pw and its score gradient P_p * (w_p dP - DI_p) to ds; also
    return rowsum(P_p * dP) = rowsum(dO * O_p) (M,). s is -inf where masked; tiles are (M, N),
    or (N, M) when KEY_MAJOR; s unscaled (q . k), lse in log2 units."""
    p = tl.exp2(s * qk_scale - _along_queries(lse, KEY_MAJOR))
    wp = w * p
    ds = ds + (wp * dp - p * _along_queries(di, KEY_MAJOR))
    if KEY_MAJOR:
        r = tl.sum(p * dp, 0)
    else:
        r = tl.sum(p * dp, 1)
    return pw + wp, ds, r


@triton.jit
def _global_and_chunk_grads(s1, s2, dp, lse_g, di_g, w_g, lse_c, di_c, w_c, qk_scale,
                            KEY_MAJOR: tl.constexpr):
    """_path_grad of the global (s1) and chunk (s2) paths together, with one exp2 per score:
    on the chunk's keys (s2 > -inf) P_g = P_c * f with f = 2^(LSE_c - LSE_g) <= 1 (the chunk's
    keys are a subset of the global path's), elsewhere P_g from LSE_g. Returns pw, ds (M, N)
    and the rowsums r_g, r_c as _path_grad (in this order)."""
    in_chunk = s2 > float("-inf")
    lse_g = _along_queries(lse_g, KEY_MAJOR)
    lse_c = _along_queries(lse_c, KEY_MAJOR)
    p = tl.exp2(s1 * qk_scale - tl.where(in_chunk, lse_c, lse_g))  # P_c in the chunk, else P_g
    g = tl.where(in_chunk, tl.exp2(lse_c - lse_g), 1.0)  # P_g / p
    c = tl.where(in_chunk, 1.0, 0.0)  # P_c / p
    w = w_g * g + w_c * c
    pw = w * p
    ds = pw * dp - p * (_along_queries(di_g, KEY_MAJOR) * g + _along_queries(di_c, KEY_MAJOR) * c)
    pdp = p * dp
    if KEY_MAJOR:
        return pw, ds, tl.sum(pdp * g, 0), tl.sum(pdp * c, 0)
    else:
        return pw, ds, tl.sum(pdp * g, 1), tl.sum(pdp * c, 1)


@triton.jit
def _row_stat(x, row_ok, LOAD: tl.constexpr):
    """x itself (M,), or, when LOAD, the rows that the (M,) pointers x point to (0 where not
    row_ok)."""
    if LOAD:
        x = tl.load(x, mask=row_ok, other=0.0)
    return x


@triton.jit
def _tile_grads(q1, q2, k1, k2, do, v, rows, cols, row_ok, lse1, di1, w1, lse2, di2, w2,
                off, n_keys, first_key, q_lo, chunk_size, phase, qk_scale,
                DO_1: tl.constexpr, DO_2: tl.constexpr, MASKED: tl.constexpr, MEM: tl.constexpr,
                LOAD_STATS: tl.constexpr, KEY_MAJOR: tl.constexpr, RANGES: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Recompute one (query tile, key tile) of states 1 and 2 (as in _fwd_loop).

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
        s = _scores(k1, k2, q1, q2, DOT_PREC)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    else:
        s = _scores(q1, q2, k1, k2, DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    s1, s2 = _mask_scores(s, rows, cols, off, n_keys, first_key, q_lo, chunk_size, phase, MEM,
                          MASKED, DO_2, KEY_MAJOR, RANGES)
    if DO_1 and DO_2 and not MEM:  # global and chunk: one exp2 per score
        return _global_and_chunk_grads(
            s1, s2, dp, _row_stat(lse1, row_ok, LOAD_STATS), _row_stat(di1, row_ok, LOAD_STATS),
            w1, _row_stat(lse2, row_ok, LOAD_STATS), _row_stat(di2, row_ok, LOAD_STATS), w2,
            qk_scale, KEY_MAJOR)
    pw = tl.zeros_like(dp)
    ds = tl.zeros_like(dp)
    r1 = tl.zeros([do.shape[0]], dtype=tl.float32)
    r2 = r1
    if DO_1:
        pw, ds, r1 = _path_grad(pw, ds, s1, dp, _row_stat(lse1, row_ok, LOAD_STATS),
                                _row_stat(di1, row_ok, LOAD_STATS), w1, qk_scale, KEY_MAJOR)
    if DO_2:
        pw, ds, r2 = _path_grad(pw, ds, s2, dp, _row_stat(lse2, row_ok, LOAD_STATS),
                                _row_stat(di2, row_ok, LOAD_STATS), w2, qk_scale, KEY_MAJOR)
    return pw, ds, r1, r2


@triton.jit
def _bwd_q_loop(dq1, dq2, r1, r2, q1, q2, do, rows, k_ptr, v_ptr,
                lse1, di1, w1, lse2, di2, w2,
                off, n_keys, first_key, q_lo, chunk_size, phase, qk_scale, lo, hi,
                HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                DO_1: tl.constexpr, DO_2: tl.constexpr, MASKED: tl.constexpr, MEM: tl.constexpr,
                GRAD_Q: tl.constexpr, RANGES: tl.constexpr, DOT_PREC: tl.constexpr, gap_lo=0,
                gap_hi=0, GAP: tl.constexpr = False):
    """Over key blocks [lo, hi) (but [gap_lo, gap_hi) with GAP): add rowsum(P dP) of states 1/2
    (as in _fwd_loop) to r1, r2 and, when GRAD_Q, the query block's dq halves (w.r.t. the q
    used in the scores) to dq1, dq2."""
    for i in range(lo, hi - (gap_hi - gap_lo) if GAP else hi, BLOCK_N):
        cols = _past_gap(i, gap_lo, gap_hi, GAP) + tl.arange(0, BLOCK_N)
        col_ok = _key_mask(cols, n_keys, first_key, RANGES)
        k1, k2 = _load_halves(k_ptr, cols, col_ok, HALF, HEAD_DIM, MASK=MASKED or RANGES)
        v = _load_rows(v_ptr, cols, col_ok, HEAD_DIM, MASK=MASKED or RANGES)
        pw, ds, t1, t2 = _tile_grads(q1, q2, k1, k2, do, v, rows, cols, None, lse1, di1, w1,
                                     lse2, di2, w2, off, n_keys, first_key, q_lo, chunk_size,
                                     phase, qk_scale, DO_1, DO_2, MASKED, MEM, False, False,
                                     RANGES, DOT_PREC)
        r1 += t1
        r2 += t2
        if GRAD_Q:
            ds = ds.to(k1.dtype)
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
            dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2, r1, r2


@triton.jit
def _store_derived(ptr, rows, row_in, Tq, x, USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Store x (M,) into the statistics row of the derived path (global, else chunk, else
    memory) of a (3, Tq) block."""
    if USE_GLOBAL:
        tl.store(ptr + rows, x, mask=row_in)
    elif HAS_CHUNK:
        tl.store(ptr + Tq + rows, x, mask=row_in)
    else:
        tl.store(ptr + 2 * Tq + rows, x, mask=row_in)


@triton.jit
def hybrid_attention_bwd_preprocess_kernel(
    Q, QR, KR, V, MK, MV, OUT, DO, W, MEMLEN, LSE, DI, DW, KV_START, KV_END, CU_Q, CU_K,
    PHASE, H, G, Tq, Tk, S, chunk_size, chunk_phase, start_pos, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_MEM: tl.constexpr,
    RANGES: tl.constexpr, PACKED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query block, row or document, h): DI of every path that is on, and DW
    of every path but the derived one (see the module docstring). The memory path (S slots)
    and, with the global path on, the chunk path (the keys of the rows' chunks) are
    recomputed; the derived path's DI is rowsum(dO * out) minus the others'."""
    HALF: tl.constexpr = HEAD_DIM // 2
    (h, bg, mg, m0, rows, row_in, row_ok, q_off, stats_off, r, nq, k0, k_lo, k_hi, off, shift,
     phase) = _query_program(H, G, Tq, Tk, chunk_phase, start_pos, KV_START, KV_END, CU_Q, CU_K,
                             PHASE, HEAD_DIM, BLOCK_M, RANGES, PACKED)
    if PACKED:
        if m0 >= nq:
            return
    q_lo = k_lo - off
    lse_ptr = LSE + stats_off
    di_ptr = DI + stats_off
    dw_ptr = DW + stats_off
    do = _load_rows(DO + q_off, rows, row_ok, HEAD_DIM)
    o = _load_rows(OUT + q_off, rows, row_ok, HEAD_DIM)
    di = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    no_dq = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    if HAS_MEM and (USE_GLOBAL or HAS_CHUNK):
        q1, q2 = _load_halves(Q + q_off, rows, row_ok, HALF, HEAD_DIM)
        lse = tl.load(lse_ptr + 2 * Tq + rows, mask=row_ok, other=0.0)
        first = S - tl.load(MEMLEN + r)
        _dq1, _dq2, rs, _r = _bwd_q_loop(
            no_dq, no_dq, zero, zero, q1, q2, do, rows, MK + mg * S * HEAD_DIM,
            MV + mg * S * HEAD_DIM, lse, zero, 0.0, lse, zero, 0.0,
            off, S, first, q_lo, 1, 0, qk_scale,
            _mem_range(m0, first, S, q_lo, RANGES, BLOCK_M, BLOCK_N), S,
            HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False, MASKED=True, MEM=True,
            GRAD_Q=False, RANGES=RANGES, DOT_PREC=DOT_PREC)
        w = tl.load(W + h * 3 + 2)
        tl.store(dw_ptr + 2 * Tq + rows, rs, mask=row_in)
        tl.store(di_ptr + 2 * Tq + rows, w * rs, mask=row_in)
        di -= w * rs
    if HAS_CHUNK and USE_GLOBAL:
        q1, q2 = _load_halves(QR + q_off, rows, row_ok, HALF, HEAD_DIM)
        lse = tl.load(lse_ptr + Tq + rows, mask=row_ok, other=0.0)
        _lo, split, hi = _key_range(m0, nq, off, k_lo, chunk_size, phase, True, RANGES,
                                    BLOCK_M, BLOCK_N)
        _dq1, _dq2, _r, rs = _bwd_q_loop(
            no_dq, no_dq, zero, zero, q1, q2, do, rows, KR + (bg * Tk + k0) * HEAD_DIM,
            V + (bg * Tk + k0) * HEAD_DIM, lse, zero, 0.0, lse, zero, 0.0,
            off, k_hi, k_lo, q_lo, chunk_size, phase, qk_scale, split, hi,
            HALF, HEAD_DIM, BLOCK_N, DO_1=False, DO_2=True, MASKED=True, MEM=False,
            GRAD_Q=False, RANGES=RANGES, DOT_PREC=DOT_PREC)
        w = tl.load(W + h * 3 + 1)
        tl.store(dw_ptr + Tq + rows, rs, mask=row_in)
        tl.store(di_ptr + Tq + rows, w * rs, mask=row_in)
        di -= w * rs
    _store_derived(di_ptr, rows, row_in, Tq, di, USE_GLOBAL, HAS_CHUNK)


@triton.jit
def hybrid_attention_bwd_dq_kernel(
    Q, QR, KR, V, MK, MV, DO, W, MEMLEN, ROPE_STEP, LSE, DI, DW, DQ, KV_START, KV_END, CU_Q, CU_K,
    PHASE, H, G, Tq, Tk, S, chunk_size, chunk_phase, start_pos, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_MEM: tl.constexpr,
    ROPE: tl.constexpr, RANGES: tl.constexpr, PACKED: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query block, row or document, h): dq of all three paths (no atomics),
    and the derived path's DW. The global and chunk paths' dq, w.r.t. the rotated q, is rotated
    back once (ROPE: by -angle at the query positions) before the memory path's is added."""
    HALF: tl.constexpr = HEAD_DIM // 2
    (h, bg, mg, m0, rows, row_in, row_ok, q_off, stats_off, r, nq, k0, k_lo, k_hi, off, shift,
     phase) = _query_program(H, G, Tq, Tk, chunk_phase, start_pos, KV_START, KV_END, CU_Q, CU_K,
                             PHASE, HEAD_DIM, BLOCK_M, RANGES, PACKED)
    if PACKED:
        if m0 >= nq:
            return
    q_lo = k_lo - off
    lse_ptr = LSE + stats_off
    di_ptr = DI + stats_off
    do = _load_rows(DO + q_off, rows, row_ok, HEAD_DIM)
    dq1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    r_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_m = tl.zeros([BLOCK_M], dtype=tl.float32)

    q1, q2 = _load_halves(QR + q_off, rows, row_ok, HALF, HEAD_DIM)
    lse_g = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    di_g = tl.load(di_ptr + rows, mask=row_ok, other=0.0)
    lse_c = tl.load(lse_ptr + Tq + rows, mask=row_ok, other=0.0)
    di_c = tl.load(di_ptr + Tq + rows, mask=row_ok, other=0.0)
    w_g = tl.load(W + h * 3)
    w_c = tl.load(W + h * 3 + 1)
    k_ptr = KR + (bg * Tk + k0) * HEAD_DIM
    v_ptr = V + (bg * Tk + k0) * HEAD_DIM
    lo, split, hi = _key_range(m0, nq, off, k_lo, chunk_size, phase, HAS_CHUNK, RANGES,
                               BLOCK_M, BLOCK_N)
    if USE_GLOBAL:  # same tile split as the forward
        full = _first_full_tile(lo, split, k_lo, RANGES, BLOCK_N)
        if RANGES:
            dq1, dq2, r_g, r_c = _bwd_q_loop(
                dq1, dq2, r_g, r_c, q1, q2, do, rows, k_ptr, v_ptr,
                lse_g, di_g, w_g, lse_c, di_c, w_c, off, k_hi, k_lo, q_lo, chunk_size, phase,
                qk_scale, lo, full, HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False,
                MASKED=False, MEM=False, GRAD_Q=True, RANGES=True, DOT_PREC=DOT_PREC)
        dq1, dq2, r_g, r_c = _bwd_q_loop(
            dq1, dq2, r_g, r_c, q1, q2, do, rows, k_ptr, v_ptr,
            lse_g, di_g, w_g, lse_c, di_c, w_c, off, k_hi, k_lo, q_lo, chunk_size, phase,
            qk_scale, full, split, HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False, MASKED=False,
            MEM=False, GRAD_Q=True, RANGES=False, DOT_PREC=DOT_PREC)
    if USE_GLOBAL:
        dq1, dq2, r_g, r_c = _bwd_q_loop(
            dq1, dq2, r_g, r_c, q1, q2, do, rows, k_ptr, v_ptr,
            lse_g, di_g, w_g, lse_c, di_c, w_c, off, k_hi, k_lo, q_lo, chunk_size, phase,
            qk_scale, split, hi, HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=HAS_CHUNK,
            MASKED=True, MEM=False, GRAD_Q=True, RANGES=RANGES, DOT_PREC=DOT_PREC)
    elif HAS_CHUNK:  # as the forward: unmasked inside every row's chunk, masked around it
        c_lo, c_hi = _chunk_interior(m0, nq, off, k_lo, chunk_size, phase, split, hi, RANGES,
                                     BLOCK_M, BLOCK_N)
        dq1, dq2, r_c, _r = _bwd_q_loop(
            dq1, dq2, r_c, r_c, q1, q2, do, rows, k_ptr, v_ptr,
            lse_c, di_c, w_c, lse_c, di_c, w_c, off, k_hi, k_lo, q_lo, chunk_size, phase,
            qk_scale, c_lo, c_hi, HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False,
            MASKED=False, MEM=False, GRAD_Q=True, RANGES=False, DOT_PREC=DOT_PREC)
        dq1, dq2, r_g, r_c = _bwd_q_loop(
            dq1, dq2, r_g, r_c, q1, q2, do, rows, k_ptr, v_ptr,
            lse_g, di_g, w_g, lse_c, di_c, w_c, off, k_hi, k_lo, q_lo, chunk_size, phase,
            qk_scale, split, hi, HALF, HEAD_DIM, BLOCK_N, DO_1=False, DO_2=True,
            MASKED=True, MEM=False, GRAD_Q=True, RANGES=RANGES, DOT_PREC=DOT_PREC,
            gap_lo=c_lo, gap_hi=c_hi, GAP=True)
    if ROPE:
        dq1, dq2 = _rope(dq1, dq2, shift + off + rows, ROPE_STEP, HALF, -1)

    if HAS_MEM:
        q1, q2 = _load_halves(Q + q_off, rows, row_ok, HALF, HEAD_DIM)
        lse_m = tl.load(lse_ptr + 2 * Tq + rows, mask=row_ok, other=0.0)
        di_m = tl.load(di_ptr + 2 * Tq + rows, mask=row_ok, other=0.0)
        w_m = tl.load(W + h * 3 + 2)
        first = S - tl.load(MEMLEN + r)
        dq1, dq2, r_m, _r = _bwd_q_loop(
            dq1, dq2, r_m, r_m, q1, q2, do, rows, MK + mg * S * HEAD_DIM, MV + mg * S * HEAD_DIM,
            lse_m, di_m, w_m, lse_m, di_m, w_m, off, S, first, q_lo, 1, 0,
            qk_scale, _mem_range(m0, first, S, q_lo, RANGES, BLOCK_M, BLOCK_N), S,
            HALF, HEAD_DIM, BLOCK_N, DO_1=True, DO_2=False, MASKED=True, MEM=True, GRAD_Q=True,
            RANGES=RANGES, DOT_PREC=DOT_PREC)
    _store_halves(DQ + q_off, rows, row_in, dq1 * scale, dq2 * scale, HALF, HEAD_DIM)
    if USE_GLOBAL:
        rs = r_g
    elif HAS_CHUNK:
        rs = r_c
    else:
        rs = r_m
    _store_derived(DW + stats_off, rows, row_in, Tq, rs, USE_GLOBAL, HAS_CHUNK)


@triton.jit
def _keys_first(x, KEY_MAJOR: tl.constexpr):
    """A tile of _tile_grads as (N, M), keys first: itself when KEY_MAJOR, else transposed."""
    if KEY_MAJOR:
        return x
    else:
        return tl.trans(x)


@triton.jit
def _bwd_kv_loop(dk1, dk2, dv, k1, k2, v, cols, Q, DO, LSE, DI, W, b, H, g, rep,
                 Tq, q0, nq, off, n_keys, first_key, q_lo, chunk_size, phase,
                 qk_scale, lo, hi,
                 P1: tl.constexpr, P2: tl.constexpr,
                 HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 DO_1: tl.constexpr, DO_2: tl.constexpr, MASKED: tl.constexpr,
                 MEM: tl.constexpr, KEY_MAJOR: tl.constexpr, RANGES: tl.constexpr,
                 DOT_PREC: tl.constexpr, gap_lo=0, gap_hi=0, GAP: tl.constexpr = False):
    """Accumulate the key block's (rotated) dk halves and dv over the query blocks [lo, hi) of
    each of the rep query heads g * rep + j of the group, as one flat loop over (head, query
    block). The row's queries are q0 .. q0 + nq of the Tq axis; rows past nq and, with
    RANGES, padding queries (before q_lo) load as 0 (and so contribute 0). States 1/2 are the
    paths P1/P2 (rows of LSE/DI, columns of W). MASKED=False: the query blocks see every key
    of the block through state 1 only, and the scores get no mask at all (the caller zeroes
    the rows of keys outside the row's range afterwards). KEY_MAJOR: see _tile_grads (the
    launcher sets it with the sm_90 tiles; elsewhere the transposes are cheaper in
    registers). GAP: the query blocks [gap_lo, gap_hi) are skipped."""
    n_blocks = tl.cdiv(hi - lo - (gap_hi - gap_lo) if GAP else hi - lo, BLOCK_M)
    for t in range(0, rep * n_blocks):
        j = t // n_blocks
        start_m = _past_gap(lo + (t - j * n_blocks) * BLOCK_M, gap_lo, gap_hi, GAP)
        h = g * rep + j
        bh = (b * H + h).to(tl.int64)
        q_off = (bh * Tq + q0) * HEAD_DIM
        stats = LSE + bh * 3 * Tq + q0
        dstats = DI + bh * 3 * Tq + q0
        w1 = tl.load(W + h * 3 + P1)
        w2 = tl.load(W + h * 3 + P2)
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < nq
        if RANGES:
            row_ok = row_ok & (rows >= q_lo)
        q1, q2 = _load_halves(Q + q_off, rows, row_ok, HALF, HEAD_DIM)
        do = _load_rows(DO + q_off, rows, row_ok, HEAD_DIM)
        pw, ds, _r1, _r2 = _tile_grads(
            q1, q2, k1, k2, do, v, rows, cols, row_ok, stats + P1 * Tq + rows,
            dstats + P1 * Tq + rows, w1, stats + P2 * Tq + rows, dstats + P2 * Tq + rows, w2,
            off, n_keys, first_key, q_lo, chunk_size, phase, qk_scale, DO_1=DO_1, DO_2=DO_2,
            MASKED=MASKED, MEM=MEM, LOAD_STATS=True, KEY_MAJOR=KEY_MAJOR,
            RANGES=RANGES and MASKED, DOT_PREC=DOT_PREC)
        dv = tl.dot(_keys_first(pw.to(do.dtype), KEY_MAJOR), do, dv, input_precision=DOT_PREC)
        ds = _keys_first(ds.to(q1.dtype), KEY_MAJOR)
        dk1 = tl.dot(ds, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(ds, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit
def hybrid_attention_bwd_dkdv_kernel(
    QR, KR, V, DO, W, ROPE_STEP, LSE, DI, DK, DV, KV_START, KV_END, CU_Q, CU_K, PHASE,
    H, G, Tq, Tk, chunk_size, chunk_phase, start_pos, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    USE_GLOBAL: tl.constexpr, HAS_CHUNK: tl.constexpr, ROPE: tl.constexpr,
    RANGES: tl.constexpr, PACKED: tl.constexpr, KEY_MAJOR: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program per (key block, row or document, g): dk, dv of the global and chunk paths,
    summed over the H/G query heads of the group in a fixed order (deterministic, no atomics).
    Keys outside the row's valid range get exact zeros. QR, KR: rotated q and k; dk, w.r.t. the
    rotated k, is rotated back once (ROPE) before the store. Query tiles: BLOCK_W queries (a
    divisor of BLOCK_M) in the masked loops (diagonal and chunk windows), BLOCK_M in the
    unmasked ones (the global path alone; without it, the chunk path inside the key block's
    chunk)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    n0 = tl.program_id(0) * BLOCK_N
    r = tl.program_id(1)
    g = tl.program_id(2)
    b, q0, nq, k0, k_lo, k_hi, off, shift, phase = _row_geometry(
        r, Tq, Tk, chunk_phase, start_pos, KV_START, KV_END, CU_Q, CU_K, PHASE, RANGES,
        PACKED)
    if PACKED:
        if n0 >= k_hi:
            return
        n_store = k_hi
    else:
        n_store = Tk
    bg = (b * G + g).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = _key_mask(cols, k_hi, k_lo, RANGES)
    kv_off = (bg * Tk + k0) * HEAD_DIM
    k1, k2 = _load_halves(KR + kv_off, cols, col_ok, HALF, HEAD_DIM)
    v = _load_rows(V + kv_off, cols, col_ok, HEAD_DIM)
    dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Query blocks [lo, split) hold the block's diagonal and chunk windows; later queries see
    # the whole block through the global path only.
    lo, split, hi = _query_range(n0, nq, off, k_lo, k_hi, chunk_size, phase, HAS_CHUNK, RANGES,
                                 BLOCK_M, BLOCK_N)
    if USE_GLOBAL:
        dk1, dk2, dv = _bwd_kv_loop(
            dk1, dk2, dv, k1, k2, v, cols, QR, DO, LSE, DI, W, b, H, g, H // G,
            Tq, q0, nq, off, k_hi, k_lo, k_lo - off, chunk_size, phase, qk_scale,
            lo, split, P1=0, P2=1, HALF=HALF, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_W,
            DO_1=True, DO_2=HAS_CHUNK, MASKED=True, MEM=False, KEY_MAJOR=KEY_MAJOR,
            RANGES=RANGES, DOT_PREC=DOT_PREC)
        dk1, dk2, dv = _bwd_kv_loop(
            dk1, dk2, dv, k1, k2, v, cols, QR, DO, LSE, DI, W, b, H, g, H // G,
            Tq, q0, nq, off, k_hi, k_lo, k_lo - off, chunk_size, phase, qk_scale,
            split, hi, P1=0, P2=1, HALF=HALF, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
            DO_1=True, DO_2=False, MASKED=False, MEM=False, KEY_MAJOR=KEY_MAJOR,
            RANGES=RANGES, DOT_PREC=DOT_PREC)
    elif HAS_CHUNK:  # the chunk path alone (linear cost): the query blocks inside the key
        # block's chunk unmasked (BLOCK_M queries), the diagonal and the chunk's end masked
        q_a, q_b = _chunk_interior_queries(n0, off, chunk_size, phase, lo, split, BLOCK_M,
                                           BLOCK_N)
        dk1, dk2, dv = _bwd_kv_loop(
            dk1, dk2, dv, k1, k2, v, cols, QR, DO, LSE, DI, W, b, H, g, H // G,
            Tq, q0, nq, off, k_hi, k_lo, k_lo - off, chunk_size, phase, qk_scale,
            lo, split, P1=0, P2=1, HALF=HALF, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_W,
            DO_1=False, DO_2=True, MASKED=True, MEM=False, KEY_MAJOR=KEY_MAJOR,
            RANGES=RANGES, DOT_PREC=DOT_PREC, gap_lo=q_a, gap_hi=q_b, GAP=True)
        dk1, dk2, dv = _bwd_kv_loop(
            dk1, dk2, dv, k1, k2, v, cols, QR, DO, LSE, DI, W, b, H, g, H // G,
            Tq, q0, nq, off, k_hi, k_lo, k_lo - off, chunk_size, phase, qk_scale,
            q_a, q_b, P1=1, P2=1, HALF=HALF, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
            DO_1=True, DO_2=False, MASKED=False, MEM=False, KEY_MAJOR=KEY_MAJOR,
            RANGES=RANGES, DOT_PREC=DOT_PREC)
    # keys outside the row's range (the last block's tail; with RANGES, also before k_lo) got
    # contributions in the unmasked loops: their gradients are exact zeros
    dk1 = tl.where(col_ok[:, None], dk1, 0.0)
    dk2 = tl.where(col_ok[:, None], dk2, 0.0)
    dv = tl.where(col_ok[:, None], dv, 0.0)
    st_ok = cols < n_store
    _store_rows(DV + kv_off, cols, st_ok, dv, HEAD_DIM)  # first: frees its registers for RoPE
    if ROPE:
        dk1, dk2 = _rope(dk1, dk2, shift + cols, ROPE_STEP, HALF, -1)
    _store_halves(DK + kv_off, cols, st_ok, dk1 * scale, dk2 * scale, HALF, HEAD_DIM)


@triton.jit
def hybrid_attention_bwd_dmem_kernel(
    Q, MK, MV, DO, W, MEMLEN, LSE, DI, DMK, DMV, KV_START, KV_END, CU_Q, CU_K, PHASE,
    H, G, Tq, Tk, S, n_split, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RANGES: tl.constexpr, PACKED: tl.constexpr, KEY_MAJOR: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program per (slot block x query split, row or document, g): the partial dmem_k,
    dmem_v of the split-th of n_split contiguous ranges of the row's query blocks, over the
    group's heads (every query but a padding one sees every valid slot), stored in fp32 at
    DMK/DMV[split] of (n_split, rows, G, S, D) buffers that the wrapper sums in a fixed order
    (deterministic). Splitting the queries keeps the grid wide when B * G * S is small and Tq
    long. Blocks of invalid slots get zeros."""
    HALF: tl.constexpr = HEAD_DIM // 2
    n_slot_blocks = tl.cdiv(S, BLOCK_N)
    split = tl.program_id(0) // n_slot_blocks
    n0 = (tl.program_id(0) - split * n_slot_blocks) * BLOCK_N
    r = tl.program_id(1)
    g = tl.program_id(2)
    b, q0, nq, _k0, k_lo, _k_hi, off, _shift, _phase = _row_geometry(
        r, Tq, Tk, 0, 0, KV_START, KV_END, CU_Q, CU_K, PHASE, RANGES, PACKED)
    q_lo = k_lo - off
    first = S - tl.load(MEMLEN + r)
    mg = (r * G + g).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    kv_off = mg * S * HEAD_DIM
    k1, k2 = _load_halves(MK + kv_off, cols, col_ok, HALF, HEAD_DIM)
    v = _load_rows(MV + kv_off, cols, col_ok, HEAD_DIM)
    dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if RANGES:
        lo = (tl.maximum(q_lo, 0) // BLOCK_M) * BLOCK_M
    hi = tl.where(n0 + BLOCK_N > first, nq, lo)
    part = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M), n_split) * BLOCK_M
    lo = lo + split * part
    hi = tl.maximum(tl.minimum(hi, lo + part), lo)
    dk1, dk2, dv = _bwd_kv_loop(
        dk1, dk2, dv, k1, k2, v, cols, Q, DO, LSE, DI, W, b, H, g, H // G,
        Tq, q0, nq, 0, S, first, q_lo, 1, 0, qk_scale, lo, hi, P1=2, P2=2,
        HALF=HALF, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, DO_1=True, DO_2=False, MASKED=True,
        MEM=True, KEY_MAJOR=KEY_MAJOR, RANGES=RANGES, DOT_PREC=DOT_PREC)
    part_off = split.to(tl.int64) * tl.num_programs(1) * G * S * HEAD_DIM + kv_off
    _store_halves(DMK + part_off, cols, col_ok, dk1 * scale, dk2 * scale, HALF, HEAD_DIM)
    _store_rows(DMV + part_off, cols, col_ok, dv, HEAD_DIM)
