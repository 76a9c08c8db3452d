"""Triton kernels of the gated FIFO memory update (SPEC §2). ``@triton.jit`` code only.

The launch logic, block-size choice and autograd glue live in :mod:`chunkmem.triton_memory`.
Notation: B rows, T tokens, chunk size C, n = ceil(T / C) summaries, S memory slots, width d.
All row-major, contiguous. Pre-activations, the gate/candidate and the recurrence state are
always fp32; the GEMM operands are in the weights' dtype (fp32 dots take ``INPUT_PRECISION``).

Forward, two launches:

1. :func:`chunk_mean_kernel` — grid (B*n, cdiv(d, BLOCK_D)): u[b, j] = mean of x over chunk j.
   x is read exactly once; u (B*n, d) is 1/C of x and is kept for the backward (dW = dpre^T u).
2. :func:`gated_scan_fwd_kernel` — grid (B, cdiv(d, BLOCK_N)): for its column block of d, a
   program walks the summaries in tiles of BLOCK_M rows; per tile it computes both
   pre-activations with ``tl.dot`` (K-loop over d), the sigmoid/tanh epilogue, the recurrence
   m_j = (1 - g_j) m_{j-1} + g_j c_j as an associative scan over the tile's rows of the affine
   maps m -> a m + b (a = 1 - g, b = g c) with the state carried from tile to tile, and writes
   the states that survive straight into their FIFO slot. The same program copies the old slots
   that survive (shifted by n) and zeroes the slots that hold nothing.

Why the GEMM is fused with the scan rather than a separate (B*n)-row GEMM launch: the
recurrence consumes the GEMM tile in registers, so g and c never go to HBM on the inference
path (a (B, n, d) fp32 round trip each). The cost: the GEMM is parallel over (B, d/BLOCK_N)
only, not also over n; n = T / C is small next to T, so the GEMM is a small part of the op
(pooling x dominates). When the backward needs them (``STORE_CTX``), g, c and every state m_j
are written too: the reverse recurrence needs g_j, c_j and m_{j-1} for every j, and recovering
m_{j-1} from m_j would divide by (1 - g_j).
Why pooling is its own launch: fusing it into the GEMM's A-operand load re-reads x once per
column block (d / BLOCK_N times); x is the one large input.

Backward, three launches (all deterministic: no atomics, fixed-order reductions):

1. :func:`gated_scan_bwd_kernel` — grid (B, cdiv(d, BLOCK_D)): the reverse recurrence over j,
   again an associative scan over tiles of BLOCK_J rows (loaded newest first) with a carry,
   gives dpre_g, dpre_c (B*n, d) each and d m_{-1}; then it writes d memory (the shifted slot
   gradient plus the m_{-1} term on slot S-1).
2. :func:`weight_grad_kernel` — grid (cdiv(d, BLOCK_N), cdiv(d, BLOCK_K), 2):
   dW = dpre^T @ u, reduced over all B*n rows inside one program; the programs of the first
   column block also sum db.
3. :func:`input_grad_kernel` — grid (cdiv(B*n, BLOCK_M), cdiv(d, BLOCK_N)):
   du = dpre_g @ W_g + dpre_c @ W_c, written to every token of its chunk divided by its length.
   dpre is stored in the weights' dtype (as the gradient an fp16 ``nn.Linear`` receives).

Known limits (not yet measured on a GPU): pooling and dx give one program per (summary, column
block), so a few very long chunks (n small, C in the thousands) keep few SMs busy; both scans
walk their n / BLOCK rows sequentially per (row b, column block).
"""
import triton
import triton.language as tl


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """Compose m -> a1 m + b1, then m -> a2 m + b2 (the scan operator of the recurrence)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _tanh(z):
    """tanh of fp32 z, stable for any |z| (exp of a non-positive number only)."""
    t = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(z < 0, -r, r)


@triton.jit
def _scan_program(mem_ptr, mem_len_ptr, S, n, d, BLOCK: tl.constexpr):
    """What a program of either scan kernel (grid (B, cdiv(d, BLOCK))) knows of its row b.

    Returns (mem_row0, u_row0, offs, mask, mem_len, new_len, m_init): b's first memory row b*S
    and first summary row b*n (int64); its columns offs (BLOCK,) and their mask offs < d;
    mem_len[b] and new_len = min(S, mem_len + n); and m_{-1} (BLOCK,) fp32: the newest slot
    (memory row b*S + S - 1) if the row has a valid slot, else zeros.
    """
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    mem_len = tl.load(mem_len_ptr + b).to(tl.int32)
    new_len = tl.minimum(S, mem_len + n)
    mem_row0 = b.to(tl.int64) * S
    newest = tl.load(mem_ptr + (mem_row0 + S - 1) * d + offs, mask=mask, other=0.0)
    m_init = tl.where(mem_len > 0, newest.to(tl.float32), 0.0)
    return mem_row0, b.to(tl.int64) * n, offs, mask, mem_len, new_len, m_init


@triton.jit
def chunk_mean_kernel(
    x_ptr,  # (B, T, d)
    u_ptr,  # (B*n, d) out, in u's dtype
    T, n, d, C,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """u[b*n + j, :] = mean(x[b, j*C : min((j+1)*C, T), :]) accumulated in fp32."""
    r = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = r // n
    j = r - b * n
    t0 = j * C
    length = tl.minimum(C, T - t0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    offs_t = tl.arange(0, BLOCK_T)
    x_row0 = b.to(tl.int64) * T + t0
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t in range(0, length, BLOCK_T):
        rows = t + offs_t
        ptrs = x_ptr + (x_row0 + rows)[:, None] * d + offs_d[None, :]
        tile = tl.load(ptrs, mask=(rows < length)[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    u = acc / length.to(tl.float32)
    tl.store(u_ptr + r.to(tl.int64) * d + offs_d, u.to(u_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def gated_scan_fwd_kernel(
    mem_ptr,      # (B, S, d) old memory
    u_ptr,        # (B*n, d) chunk means, in the weights' dtype
    wg_ptr, bg_ptr, wc_ptr, bc_ptr,  # (d, d) [out, in], (d,)
    mem_len_ptr,  # (B,) int
    out_ptr,      # (B, S, d) new memory, memory's dtype
    g_ptr, c_ptr, m_ptr,  # (B*n, d) fp32 each: g, c, m (written only if STORE_CTX)
    S, n, d,
    STORE_CTX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Projections + epilogue + recurrence + FIFO push for one (row b, column block) pair."""
    # m_prev = m_{-1}: the newest slot if the row has one, else zeros.
    mem_row0, u_row0, offs_n, mask_n, mem_len, new_len, m_prev = _scan_program(
        mem_ptr, mem_len_ptr, S, n, d, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    out_ty = out_ptr.dtype.element_ty

    # Old slots that survive the push move n places towards slot 0; slot i < S - new_len is empty.
    for i0 in range(0, S - n, BLOCK_M):
        i = i0 + offs_m
        keep = i < S - n
        src_ok = keep & (i >= S - new_len)
        vals = tl.load(mem_ptr + (mem_row0 + i + n)[:, None] * d + offs_n[None, :],
                       mask=src_ok[:, None] & mask_n[None, :], other=0.0)
        tl.store(out_ptr + (mem_row0 + i)[:, None] * d + offs_n[None, :], vals,
                 mask=keep[:, None] & mask_n[None, :])

    bias_g = tl.load(bg_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    bias_c = tl.load(bc_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    w_off = offs_n[None, :] * d + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of W^T
    for j0 in range(0, n, BLOCK_M):
        rows = j0 + offs_m
        row_ok = rows < n
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_c = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_ptrs = u_ptr + (u_row0 + rows)[:, None] * d + offs_k[None, :]
        for k0 in range(0, d, BLOCK_K):
            k_ok = (k0 + offs_k) < d
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & mask_n[None, :]
            wg = tl.load(wg_ptr + w_off + k0, mask=w_mask, other=0.0)
            wc = tl.load(wc_ptr + w_off + k0, mask=w_mask, other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision=INPUT_PRECISION)
            acc_c = tl.dot(a, wc, acc_c, input_precision=INPUT_PRECISION)
        g = tl.sigmoid(acc_g + bias_g[None, :])
        c = _tanh(acc_c + bias_c[None, :])
        # Rows past n are the identity map, so the last row of the tile carries m_{n-1}.
        coef_a = tl.where(row_ok[:, None], 1.0 - g, 1.0)
        coef_b = tl.where(row_ok[:, None], g * c, 0.0)
        cum_a, cum_b = tl.associative_scan((coef_a, coef_b), 0, _affine_combine)
        m = cum_a * m_prev[None, :] + cum_b
        m_prev = tl.sum(tl.where((offs_m == BLOCK_M - 1)[:, None], m, 0.0), axis=0)
        slot = S - n + rows  # only the newest S states have a slot
        tl.store(out_ptr + (mem_row0 + slot)[:, None] * d + offs_n[None, :], m.to(out_ty),
                 mask=(row_ok & (slot >= 0))[:, None] & mask_n[None, :])
        if STORE_CTX:
            c_off = (u_row0 + rows)[:, None] * d + offs_n[None, :]
            c_mask = row_ok[:, None] & mask_n[None, :]
            tl.store(g_ptr + c_off, g, mask=c_mask)
            tl.store(c_ptr + c_off, c, mask=c_mask)
            tl.store(m_ptr + c_off, m, mask=c_mask)


@triton.jit
def gated_scan_bwd_kernel(
    dout_ptr,     # (B, S, d) gradient of the new memory
    mem_ptr,      # (B, S, d) old memory
    mem_len_ptr,  # (B,) int
    g_ptr, c_ptr, m_ptr,  # (B*n, d) fp32 each: g, c, m from the forward
    dpg_ptr, dpc_ptr,     # (B*n, d) out: gradients of the gate / candidate pre-activations
    dmem_ptr,     # (B, S, d) out: gradient of the old memory
    S, n, d,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Reverse recurrence for one (row b, column block) pair, then d memory.

    q_j, the gradient reaching state m_j, obeys q_j = e_j + (1 - g_{j+1}) q_{j+1} (e_j: the new
    memory's gradient at m_j's slot, if it has one). Tiles of BLOCK_J rows are loaded newest row
    first, so this reverse recurrence is a forward associative scan over the tile, carried from
    tile to tile like the forward pass: n / BLOCK_J sequential steps instead of n.
    """
    mem_row0, row0, offs_d, mask_d, mem_len, new_len, m_init = _scan_program(
        mem_ptr, mem_len_ptr, S, n, d, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_J)
    q = tl.zeros((BLOCK_D,), dtype=tl.float32)  # carry: q_{j+1} of the tile's newest row j
    for jt in range(0, n, BLOCK_J):
        j = n - 1 - jt - offs_j  # descending rows; j < 0 pads the oldest tile
        row_ok = j >= 0
        tile_ok = row_ok[:, None] & mask_d[None, :]
        off = (row0 + tl.maximum(j, 0))[:, None] * d + offs_d[None, :]
        g = tl.load(g_ptr + off, mask=tile_ok, other=0.0)
        c = tl.load(c_ptr + off, mask=tile_ok, other=0.0)
        prev_ok = (j > 0)[:, None] & mask_d[None, :]
        m_prev = tl.load(m_ptr + off - d, mask=prev_ok, other=0.0)
        m_prev = tl.where((j > 0)[:, None], m_prev, m_init[None, :])
        next_ok = (row_ok & (j + 1 < n))[:, None] & mask_d[None, :]
        g_next = tl.load(g_ptr + off + d, mask=next_ok, other=0.0)  # g_{j+1}; 0 past the end
        slot = S - n + j  # only the newest S states have a slot
        slot_ok = (row_ok & (slot >= 0))[:, None] & mask_d[None, :]
        e = tl.load(dout_ptr + (mem_row0 + tl.maximum(slot, 0))[:, None] * d + offs_d[None, :],
                    mask=slot_ok, other=0.0).to(tl.float32)
        # q_j = (1 - g_{j+1}) q_{j+1} + e_j; padding rows are the identity map.
        coef_a = tl.where(row_ok[:, None], 1.0 - g_next, 1.0)
        cum_a, cum_b = tl.associative_scan((coef_a, e), 0, _affine_combine)
        q_tile = cum_a * q[None, :] + cum_b
        q = tl.sum(tl.where((offs_j == BLOCK_J - 1)[:, None], q_tile, 0.0), axis=0)
        dpre_g = q_tile * (c - m_prev) * g * (1.0 - g)
        dpre_c = q_tile * g * (1.0 - c * c)
        tl.store(dpg_ptr + off, dpre_g.to(dpg_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dpc_ptr + off, dpre_c.to(dpc_ptr.dtype.element_ty), mask=tile_ok)
    # q is now q_0 (n >= 1); d m_{-1} = (1 - g_0) q_0.
    g0 = tl.load(g_ptr + row0 * d + offs_d, mask=mask_d, other=0.0)
    dm = (1.0 - g0) * q
    # dm is now d m_{-1}; it reaches the old memory's slot S-1 only if that slot was valid.
    dm_init = tl.where(mem_len > 0, dm, 0.0)
    for s0 in range(0, S, BLOCK_J):
        s = s0 + offs_j
        i = s - n  # where old slot s went; it survived if i >= 0 and the slot is valid
        src_ok = (s < S) & (i >= 0) & (i >= S - new_len)
        grad = tl.load(dout_ptr + (mem_row0 + i)[:, None] * d + offs_d[None, :],
                       mask=src_ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        grad += tl.where((s == S - 1)[:, None], dm_init[None, :], 0.0)
        tl.store(dmem_ptr + (mem_row0 + s)[:, None] * d + offs_d[None, :],
                 grad.to(dmem_ptr.dtype.element_ty), mask=(s < S)[:, None] & mask_d[None, :])


@triton.jit
def weight_grad_kernel(
    dpre_ptr,  # (2, M, d) gradients of the pre-activations, M = B*n
    u_ptr,     # (M, d) chunk means
    dw_ptr,    # (2, d, d) out: d w_gate, d w_cand  [out, in]
    db_ptr,    # (2, d) out: d b_gate, d b_cand
    M, d,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[w, o, i] = sum_r dpre[w, r, o] u[r, i] and db[w, o] = sum_r dpre[w, r, o], r in order."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    which = tl.program_id(2)
    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = pid_i * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_o = offs_o < d
    mask_i = offs_i < d
    dpre_base = dpre_ptr + which.to(tl.int64) * M * d
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + offs_m).to(tl.int64)
        row_ok = rows < M
        p = tl.load(dpre_base + rows[:, None] * d + offs_o[None, :],
                    mask=row_ok[:, None] & mask_o[None, :], other=0.0)
        a = tl.load(u_ptr + rows[:, None] * d + offs_i[None, :],
                    mask=row_ok[:, None] & mask_i[None, :], other=0.0)
        acc = tl.dot(tl.trans(p), a, acc, input_precision=INPUT_PRECISION)
        db += tl.sum(p.to(tl.float32), axis=0)
    dw_base = dw_ptr + which.to(tl.int64) * d * d
    tl.store(dw_base + offs_o[:, None].to(tl.int64) * d + offs_i[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_i[None, :])
    if pid_i == 0:
        tl.store(db_ptr + which * d + offs_o, db.to(db_ptr.dtype.element_ty), mask=mask_o)


@triton.jit
def input_grad_kernel(
    dpg_ptr, dpc_ptr,  # (M, d) gradients of the pre-activations, M = B*n
    wg_ptr, wc_ptr,    # (d, d) [out, in]
    dx_ptr,    # (B, T, d) out
    M, n, T, C, d,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """du = dpre_g @ W_g + dpre_c @ W_c; dx[b, t] = du[b, t // C] / (length of that chunk)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask_n = offs_n < d
    p_off = rows[:, None].to(tl.int64) * d + offs_k[None, :]
    w_off = offs_k[:, None] * d + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k_ok = (k0 + offs_k) < d
        p_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & mask_n[None, :]
        pg = tl.load(dpg_ptr + p_off + k0, mask=p_mask, other=0.0)
        pc = tl.load(dpc_ptr + p_off + k0, mask=p_mask, other=0.0)
        wg = tl.load(wg_ptr + w_off + k0 * d, mask=w_mask, other=0.0)
        wc = tl.load(wc_ptr + w_off + k0 * d, mask=w_mask, other=0.0)
        acc = tl.dot(pg, wg, acc, input_precision=INPUT_PRECISION)
        acc = tl.dot(pc, wc, acc, input_precision=INPUT_PRECISION)
    b = rows // n
    j = rows - b * n
    t0 = j * C
    length = tl.minimum(C, T - t0)
    du = (acc / tl.maximum(length, 1).to(tl.float32)[:, None]).to(dx_ptr.dtype.element_ty)
    x_row0 = b.to(tl.int64) * T + t0
    for t in range(0, tl.minimum(C, T)):
        tl.store(dx_ptr + (x_row0 + t)[:, None] * d + offs_n[None, :], du,
                 mask=(row_ok & (t < length))[:, None] & mask_n[None, :])
