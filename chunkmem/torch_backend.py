"""The PyTorch fallback backend: blockwise, differentiable through autograd, no Tq x Tk matrix.

Each attention path is one call of ``F.scaled_dot_product_attention`` on a layout that keeps its
cost and memory linear in T where the math allows it:

- global: SDPA with a causal mask (``is_causal`` when Tq == Tk, the lower-right ``CausalBias``
  for Tq < Tk, i.e. bottom-right alignment) — the fused SDPA kernels keep only O(T) statistics;
- chunk: keys and queries are cut into the non-overlapping chunks of ``chunk_size`` positions
  (counted from position 0, so with start_pos % chunk_size != 0 the first chunk is partial) and
  folded into the head dimension, then causal SDPA runs inside each chunk: O(T * C) work;
- memory: SDPA of the un-rotated queries against the S slots with a (B, 1, 1, S) validity mask.

On CPU, fp16/bf16 inputs are computed in fp32 (statistics and accumulation in fp32, as SPEC §1
asks); on CUDA each path runs SDPA in the input dtype (its kernels accumulate in fp32) and the
weighted sum of the paths is taken in fp32. The output is cast back to the input dtype. The
memory update always computes in fp32 (float64 stays float64).

Padded rows (kv_start/kv_end), packed documents (cu_seqlens) and per-row start_pos read their
ranges to the host once per call and run each row or document on its valid tokens alone, so
their cost is that of the valid tokens.

The gated memory update runs its recurrence as a parallel (Hillis–Steele) associative scan over
the n chunk summaries: m_j = a_j * m_{j-1} + b_j composes as (a, b) pairs, so log2(n) vectorised
steps replace n sequential ones, with no log/exp of the gates (a log-space cumulative sum would
break down when a gate saturates at 1, since log(1 - g) -> -inf).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from chunkmem.reference import fifo_push, rope_cos_sin

__all__ = ["hybrid_attention_torch", "gated_memory_update_torch", "gated_scan"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


_ROPE_TABLES: OrderedDict = OrderedDict()  # (D, base, dtype, device) -> (cos_full, sin)
_ROPE_TABLES_KEPT = 4


def _rope_tables(start_pos: int, T: int, D: int, base: float, dtype, device):
    """RoPE tables for positions start_pos .. start_pos + T - 1 as views of a cached table:
    cos_full (T, D) (the cos table twice, to rotate both halves in one product) and sin (T, D/2),
    each position's values exactly :func:`chunkmem.reference.rope_cos_sin`'s.

    The cache keeps the last few (D, base, dtype, device) tables (least recently used dropped),
    each grown to a power of two of positions as calls need, so a decode loop reuses one table.
    They are built outside inference mode and autograd, so any later call may read them.
    """
    key = (D, float(base), dtype, str(device))
    end = start_pos + T
    entry = _ROPE_TABLES.get(key)
    if entry is None or entry[0].shape[0] < end:
        n = max(1024, 1 << (end - 1).bit_length())
        with torch.inference_mode(False), torch.no_grad():
            cos, sin = rope_cos_sin(torch.arange(n, device=device), D, base, dtype)
            entry = (torch.cat((cos, cos), dim=-1), sin)
        _ROPE_TABLES[key] = entry
        while len(_ROPE_TABLES) > _ROPE_TABLES_KEPT:
            _ROPE_TABLES.popitem(last=False)
    _ROPE_TABLES.move_to_end(key)
    return entry[0][start_pos:end], entry[1][start_pos:end]


def _rotate(x, cos_full, sin, sign, out=None):
    """Rotate-half RoPE of x (..., T, D) by ``sign`` * the angles of the tables, into ``out`` or
    one new contiguous tensor: out = x * cos, then each half gets -+ sin * (the other half) added
    in place (no other temporary)."""
    h = x.shape[-1] // 2
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, cos_full, out=out)
    out[..., :h].addcmul_(x[..., h:], sin, value=-sign)
    out[..., h:].addcmul_(x[..., :h], sin, value=sign)
    return out


class _Rope(torch.autograd.Function):
    """apply_rope(x, cos, sin) with the tables held as constants (not saved for backward, so
    tables built under inference mode are fine); the gradient is the inverse rotation."""

    @staticmethod
    def forward(x, cos_full, sin, sign):
        return _rotate(x, cos_full, sin, sign)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.tables = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        cos_full, sin, sign = ctx.tables
        return _Rope.apply(grad, cos_full, sin, -sign), None, None, None


def _sdpa(q, k, v, scale, **kw):
    """``F.scaled_dot_product_attention`` of q (N, H, Tq, D) and k/v (N, G, Tk, D), with the heads
    folded into the batch dimension when that is a free view (G == H, (N, H) mergeable in each).

    On CPU the SDPA kernels lay their output out as (N, Tq, H, D) and return it transposed, so a
    later reshape of the heads (the chunk fold below) or a sum with a (N, H, Tq, D) tensor would
    copy; with one head per batch entry that layout is the contiguous (N, H, Tq, D) one, and the
    gradients come back contiguous too. A mask is given as (N or 1, 1, Tq or 1, Tk)."""
    N, H = q.shape[:2]
    mask = kw.pop("attn_mask", None)
    if k.shape[1] != H:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True, **kw)
    mergeable = all(x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1) for x in (q, k, v))
    if not mergeable or (mask is not None and type(mask) is not torch.Tensor):  # e.g. a CausalBias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
    if mask is not None:
        mask = mask.expand(N, H, *mask.shape[2:]).reshape(N * H, 1, *mask.shape[2:])

    def flat(x):
        return x.reshape(N * H, 1, *x.shape[2:])
    o = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask, scale=scale, **kw)
    return o.view(q.shape[:3] + v.shape[3:])


class _WeightedAdd(torch.autograd.Function):
    """base + o * w for o (B, H, T, D) and per-head weights w (1, H, 1, 1): ``addcmul`` whose
    backward takes w's gradient as per-head dot products (batched matrix products) instead of
    autograd's full-size g * o temporary, and passes base's gradient through as is."""

    @staticmethod
    def forward(base, o, w):
        return torch.addcmul(base, o, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad):
        o, w = ctx.saved_tensors
        d_o = grad * w if ctx.needs_input_grad[1] else None
        d_w = None
        if ctx.needs_input_grad[2]:
            H = o.shape[1]
            d_w = torch.zeros(H, 1, 1, dtype=w.dtype, device=w.device)
            for b in range(o.shape[0]):
                d_w = d_w + torch.bmm(grad[b].reshape(H, 1, -1), o[b].reshape(H, -1, 1))
            d_w = d_w.view(w.shape)
        return grad, d_o, d_w


def _causal_sdpa(q, k, v, scale):
    """Causal SDPA with bottom-right alignment; q (N, H, Tq, D), k/v (N, G, Tk, D), Tq <= Tk."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return _sdpa(q, k, v, scale, is_causal=True)
    return _sdpa(q, k, v, scale, attn_mask=causal_lower_right(Tq, Tk))


def _aligned_chunk_attention(q, k, v, chunk_size, scale):
    """Causal attention inside non-overlapping key chunks of ``chunk_size`` that start at key 0
    (bottom-right aligned).

    q: (B, H, Tq, D); k, v: (B, G, Tk, D) -> (B, H, Tq, D). Only the chunks that hold a query are
    computed: the query block is padded in front to the start of its first chunk, and both sides
    are padded at the end to whole chunks (padded keys lie after every real query, so the causal
    mask hides them; padded query rows are dropped). The chunks are then folded into the head
    dimension, (B, H, n*C, D) -> (B, H*n, C, D), a free view, so one causal SDPA call runs them all
    (GQA's k/v are expanded to H heads first, since folding breaks SDPA's head grouping).
    """
    B, H, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    C = chunk_size
    first = (Tk - Tq) // C * C  # key index where the first chunk holding a query starts
    lead = Tk - Tq - first  # keys of that chunk before the first query
    n_chunks = math.ceil((Tk - first) / C)
    tail = n_chunks * C - (Tk - first)
    if G != H:
        k = k.repeat_interleave(H // G, dim=1)
        v = v.repeat_interleave(H // G, dim=1)
    k, v = k[:, :, first:], v[:, :, first:]
    if lead or tail:
        q = F.pad(q, (0, 0, lead, tail))
    if tail:
        k, v = F.pad(k, (0, 0, 0, tail)), F.pad(v, (0, 0, 0, tail))

    def fold(x):  # (B, H, n*C, D) -> (B*H*n, 1, C, D): a view, and SDPA's output layout is free
        return x.reshape(B * H * n_chunks, 1, C, D)

    o = _causal_sdpa(fold(q), fold(k), fold(v), scale)
    return o.reshape(B, H, n_chunks * C, D)[:, :, lead: lead + Tq]


def _chunk_attention(q, k, v, chunk_size, scale, start_pos):
    """Chunk path with chunks counted by position: key j (position start_pos + j) is in chunk
    (start_pos + j) // chunk_size, so the first chunk boundary is at key index
    b0 = (-start_pos) % chunk_size. The keys before b0 (a partial first chunk) and the queries
    sitting on them are one causal block; the rest is chunked from b0 by
    :func:`_aligned_chunk_attention`. Both sides stay bottom-right aligned."""
    Tq, Tk = q.shape[2], k.shape[2]
    b0 = min((-start_pos) % chunk_size, Tk)
    if b0 == 0:
        return _aligned_chunk_attention(q, k, v, chunk_size, scale)
    n1 = min(max(b0 - (Tk - Tq), 0), Tq)  # queries whose key index is < b0
    parts = []
    if n1:
        parts.append(_causal_sdpa(q[:, :, :n1], k[:, :, :b0], v[:, :, :b0], scale))
    if n1 < Tq:
        parts.append(_aligned_chunk_attention(q[:, :, n1:], k[:, :, b0:], v[:, :, b0:], chunk_size, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _memory_operands(mem_k, mem_v, mem_len, w_mem, H, fold):
    """The keys, values and mask of the memory path, for :func:`_memory_attention`.

    mem_k/mem_v (B, G, S, D), w_mem (H,). With ``fold`` the weights go into the (small) slot
    values (then (B, H, S, D), GQA's slots repeated to H heads), so SDPA's output is already
    weighted. Rows with no valid slot must give exactly 0: their mask is opened to keep softmax
    finite, and their folded values (or, without folding, their output) are multiplied by 0, which
    also zeroes their gradients. When every slot of every row is valid (read on the host for CPU
    tensors, where that is free) there is no mask, which lets SDPA take its fastest kernel.
    Returns (mem_k, mem_v, mask or None, has_slot (B, 1, 1, 1) or None).
    """
    G, S = mem_k.shape[1], mem_k.shape[2]
    all_valid = mem_len.device.type == "cpu" and bool((mem_len == S).all())
    has_slot = None if all_valid else (mem_len > 0).to(mem_v.dtype).view(-1, 1, 1, 1)
    if fold:
        if G != H:
            mem_k = mem_k.repeat_interleave(H // G, dim=1)
            mem_v = mem_v.repeat_interleave(H // G, dim=1)
        w = w_mem.view(1, H, 1, 1)
        mem_v = mem_v * (w if has_slot is None else w * has_slot)
    mask = None
    if not all_valid:
        valid = torch.arange(S, device=mem_k.device)[None, :] >= (S - mem_len.long())[:, None]
        mask = (valid | (mem_len <= 0)[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return mem_k, mem_v, mask, has_slot


def _memory_attention(q, operands, w_mem, scale, fold, out_dtype):
    """``w_mem[h] *`` the attention of q (B, H, Tq, D) over the memory slots (``operands`` from
    :func:`_memory_operands`), in out_dtype."""
    mem_k, mem_v, mask, has_slot = operands
    o = _sdpa(q, mem_k, mem_v, scale, attn_mask=mask)
    if fold:
        return o
    o = o.to(out_dtype) * w_mem.view(1, -1, 1, 1)
    return o if has_slot is None else o * has_slot.to(out_dtype)


def hybrid_attention_torch(
    q, k, v, mem_k, mem_v, weights, mem_len, *,
    chunk_size, use_global, rope_base, start_pos, scale,
    kv_start=None, kv_end=None, cu_seqlens_q=None, cu_seqlens_k=None,
    max_seqlen_q=None, max_seqlen_k=None,
):
    """Hybrid attention (SPEC §1, §1b), blockwise. Arguments in the normalized form of
    :mod:`chunkmem.ops`.

    q: (B, H, Tq, D); k, v: (B, G, Tk, D); mem_k, mem_v: (Bm, G, S, D) or None; weights: (H, 3);
    mem_len: (Bm,) int or None; start_pos: int or int tensor (Bm,); kv_start/kv_end: None or int
    tensors (B,); cu_seqlens_q/cu_seqlens_k: None or int tensors (N+1,) (B == 1, Bm = N).
    Returns (B, H, Tq, D) in q's dtype.

    With ranges, packed documents or a start_pos tensor, the ranges are read to the host once
    (one device sync) and each row / document runs alone on its valid keys and non-padding
    queries (rows with the same range and start_pos together), so a padded or packed call costs
    what its valid tokens cost; padding queries get exact zeros. max_seqlen_* are not needed.
    """
    run = dict(chunk_size=chunk_size, use_global=use_global, rope_base=rope_base, scale=scale)
    if cu_seqlens_q is not None:
        return _packed(q, k, v, mem_k, mem_v, weights, mem_len, start_pos, cu_seqlens_q,
                       cu_seqlens_k, run)
    if kv_start is None and not isinstance(start_pos, torch.Tensor):
        return _hybrid_dense(q, k, v, mem_k, mem_v, weights, mem_len, start_pos=start_pos, **run)
    return _ranged(q, k, v, mem_k, mem_v, weights, mem_len, start_pos, kv_start, kv_end, run)


# Tiles of the no-gradient single-thread CPU forward (:func:`_blocked_chunk_memory`): bytes of
# queries per tile, and at most this many tiles (larger tiles past that).
_BLOCK_BYTES = 1 << 22
_MAX_TILES = 64


def _hybrid_dense(q, k, v, mem_k, mem_v, weights, mem_len, *, chunk_size, use_global, rope_base,
                  start_pos, scale):
    """Every key valid, one int start_pos for all rows (the v1 layout).

    The paths are summed with one fused multiply-add each (``addcmul``, in place when nothing
    needs a gradient) onto the memory path's output, which comes out already weighted: no
    zero-filled accumulator and no separate full-size products. On CPU with one intra-op thread
    and nothing to differentiate, the chunk and memory paths run by tiles instead
    (:func:`_blocked_chunk_memory`): only the output is new full-size memory. With several threads
    every op of a tile is a parallel region whose threads must all be scheduled before it ends;
    on a busy machine (this project's 2-core CPU at load ~5-10) the tiles' extra regions cost more
    than the page faults they save (chunk + memory + RoPE, 16k tokens, H=8, against
    FlexAttention's chunk-only forward: one thread, 1.08x best / 1.14x median with 4 MB tiles,
    1.18x / 1.49x without; two threads, 2.0x / 3.2x with 8 MB tiles, 1.85x / 1.85x without), so
    there the paths run whole."""
    H, Tq, D = q.shape[1], q.shape[2], q.shape[3]
    Tk = k.shape[2]
    cdt = _compute_dtype(q)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    sum_dtype = torch.promote_types(cdt, torch.float32)
    fold = cdt == sum_dtype
    w = weights.to(sum_dtype).t().reshape(3, 1, H, 1, 1)
    mem = None
    if mem_k is not None:
        mem = _memory_operands(mem_k.to(cdt), mem_v.to(cdt), mem_len, w[2].view(H), H, fold)
    tables = None
    if rope_base is not None and (use_global or chunk_size is not None):
        tables = _rope_tables(start_pos, Tk, D, rope_base, cdt, q.device)
    tensors = (q, k, v, weights) + (() if mem_k is None else (mem_k, mem_v))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    blocked = (q.device.type == "cpu" and not grad and fold and torch.get_num_threads() == 1
               and (chunk_size is not None or mem is not None)
               and q.numel() * q.element_size() > _BLOCK_BYTES)

    def add(out, o, w_path):  # o: a path's fresh output
        if out is None:
            return o.mul_(w_path) if not grad and o.dtype == sum_dtype else o.to(sum_dtype) * w_path
        if o.dtype != out.dtype:
            return torch.addcmul(out, o, w_path)
        if out.requires_grad or o.requires_grad or w_path.requires_grad:
            return _WeightedAdd.apply(out, o, w_path)
        return out.addcmul_(o, w_path)  # a fresh tensor nothing differentiates through

    out = None
    if mem is not None and not blocked:
        out = _memory_attention(qc, mem, w[2].view(H), scale, fold, sum_dtype)
    if use_global or (chunk_size is not None and not blocked):
        qr, kr = qc, kc
        if tables is not None:
            qr = _Rope.apply(qc, tables[0][Tk - Tq:], tables[1][Tk - Tq:], 1)
            kr = _Rope.apply(kc, *tables, 1)
        if use_global:
            out = add(out, _causal_sdpa(qr, kr, vc, scale), w[0])
        if chunk_size is not None and not blocked:
            out = add(out, _chunk_attention(qr, kr, vc, chunk_size, scale, start_pos), w[1])
    if blocked:
        out = _blocked_chunk_memory(qc, kc, vc, mem, w, out, tables, chunk_size=chunk_size,
                                    start_pos=start_pos, scale=scale)
    if out is None:  # no path left
        out = torch.zeros(q.shape, dtype=sum_dtype, device=q.device)
    return out.to(q.dtype)


def _blocked_chunk_memory(q, k, v, mem, w, out, tables, *, chunk_size, start_pos, scale):
    """The chunk and memory paths of :func:`_hybrid_dense`, weighted and added into ``out`` (the
    global path's weighted output, or None: then a new tensor), tile by tile.

    No gradient: each tile's rotated q/k, chunk and memory outputs are small temporaries, so the
    allocator hands the same memory back tile after tile, and only ``out`` is new full-size memory
    (on CPU a fresh large tensor costs a page fault per page, as much as an attention pass). A
    tile is one batch row, a group of kv heads (with their query heads) and a range of query rows
    that ends on a chunk boundary, about ``_BLOCK_BYTES`` of queries: whole sequences of several
    heads when they fit, else row ranges of one kv group. Each is a contiguous slice of the
    (B, H, T, D) inputs whenever the whole sequence or one head is taken, so the chunk fold stays
    a view; each tile's keys start at the chunk of its first query. Every query row gets the
    same arithmetic as in the unblocked paths.
    """
    B, H, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    r = H // G
    off = Tk - Tq  # query i sits at key index off + i
    C = chunk_size if chunk_size is not None else 1
    group_bytes = r * D * q.element_size()  # one query row of one kv group
    tile = max(_BLOCK_BYTES, B * G * Tq * group_bytes // _MAX_TILES)
    if Tq * group_bytes <= tile:
        gb, rows = max(1, tile // (Tq * group_bytes)), Tq
    else:
        gb, rows = 1, max(C, tile // group_bytes // C * C)
    first = (-(start_pos + off)) % C  # the first query on a chunk boundary
    bounds = [0, Tq] if rows >= Tq else sorted({0, Tq} | set(range(first, Tq, rows)))
    accumulate = out is not None
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tables is not None:  # rotated tiles land in these two buffers, tile after tile
        q_buf = torch.empty(gb * r * rows * D, dtype=q.dtype, device=q.device)
        k_buf = torch.empty(gb * min(Tk, rows + C) * D, dtype=q.dtype, device=q.device)
    for b in range(B):
        for g0 in range(0, G, gb):
            g1 = min(G, g0 + gb)
            heads, kv = slice(g0 * r, g1 * r), slice(g0, g1)
            w_c = w[1][:, heads]
            mem_b = None if mem is None else (mem[0][b:b + 1, heads], mem[1][b:b + 1, heads],
                                               None if mem[2] is None else mem[2][b:b + 1], None)
            for i0, i1 in zip(bounds[:-1], bounds[1:]):
                dst = out[b:b + 1, heads, i0:i1]
                qb = q[b:b + 1, heads, i0:i1]
                o_m = None if mem is None else _memory_attention(qb, mem_b, None, scale, True, q.dtype)
                if chunk_size is None:
                    dst.add_(o_m) if accumulate else dst.copy_(o_m)
                    continue
                a0, a1 = off + i0, off + i1
                j0 = max(0, a0 - (start_pos + a0) % C)  # key index where the first query's chunk starts
                kb = k[b:b + 1, kv, j0:a1]
                if tables is not None:
                    qb = _rotate(qb, tables[0][a0:a1], tables[1][a0:a1], 1, q_buf[:qb.numel()].view(qb.shape))
                    kb = _rotate(kb, tables[0][j0:a1], tables[1][j0:a1], 1, k_buf[:kb.numel()].view(kb.shape))
                o_c = _chunk_attention(qb, kb, v[b:b + 1, kv, j0:a1], C, scale, start_pos + j0)
                if accumulate:
                    dst.addcmul_(o_c, w_c)
                    if o_m is not None:
                        dst.add_(o_m)
                elif o_m is not None:
                    torch.addcmul(o_m, o_c, w_c, out=dst)
                else:
                    torch.mul(o_c, w_c, out=dst)
    return out


def _memory_rows(mem_k, mem_v, mem_len, rows):
    """mem_k, mem_v, mem_len restricted to ``rows`` (a slice or an index tensor), or Nones."""
    if mem_k is None:
        return None, None, None
    return mem_k[rows], mem_v[rows], mem_len[rows]


def _ranged(q, k, v, mem_k, mem_v, weights, mem_len, start_pos, kv_start, kv_end, run):
    """Per-row key ranges and/or per-row start_pos: one host sync, then one dense call per group
    of rows sharing (kv_start, kv_end, start_pos), on their valid keys and real queries only."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    cols = []
    if kv_start is not None:
        cols += [kv_start.long(), kv_end.long()]
    if isinstance(start_pos, torch.Tensor):
        cols.append(start_pos.long())
    host = torch.stack(cols, dim=1).tolist() if cols else [[] for _ in range(B)]  # the one sync
    groups: dict[tuple, list[int]] = {}
    for b, row in enumerate(host):
        lo, hi = (row[0], row[1]) if kv_start is not None else (0, Tk)
        sp = row[-1] if isinstance(start_pos, torch.Tensor) else start_pos
        groups.setdefault((lo, hi, sp), []).append(b)
    if len(groups) == 1 and next(iter(groups))[:2] == (0, Tk):  # one group, every key valid
        return _hybrid_dense(q, k, v, mem_k, mem_v, weights, mem_len, start_pos=next(iter(groups))[2], **run)
    parts, order = [], []
    for (lo, hi, sp), rows in groups.items():
        n = min(Tq, hi - lo)  # the real queries: the last n
        if rows == list(range(rows[0], rows[-1] + 1)):
            sel = slice(rows[0], rows[-1] + 1)  # a view, no copy
        else:
            sel = torch.tensor(rows, device=q.device)
        if n == 0:
            o = q.new_zeros(len(rows), H, Tq, D)
        else:
            mk, mv, ml = _memory_rows(mem_k, mem_v, mem_len, sel)
            o = _hybrid_dense(q[sel, :, Tq - n:], k[sel, :, lo:hi], v[sel, :, lo:hi], mk, mv,
                              weights, ml, start_pos=sp, **run)
            if n < Tq:
                o = F.pad(o, (0, 0, Tq - n, 0))
        parts.append(o)
        order += rows
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != list(range(B)):  # back to the batch order
        inverse = [0] * B
        for i, b in enumerate(order):
            inverse[b] = i
        out = out[torch.tensor(inverse, device=q.device)]
    return out


def _packed(q, k, v, mem_k, mem_v, weights, mem_len, start_pos, cu_seqlens_q, cu_seqlens_k, run):
    """Packed documents (B == 1): one host sync, then one dense call per document with queries."""
    N = cu_seqlens_q.shape[0] - 1
    cols = [cu_seqlens_q.long(), cu_seqlens_k.long()]
    if isinstance(start_pos, torch.Tensor):
        cols.append(start_pos.long())
    host = torch.cat(cols).tolist()  # the one sync
    cu_q, cu_k = host[:N + 1], host[N + 1: 2 * N + 2]
    starts = host[2 * N + 2:] if isinstance(start_pos, torch.Tensor) else [start_pos] * N
    parts = []
    for d in range(N):
        q0, q1, k0, k1 = cu_q[d], cu_q[d + 1], cu_k[d], cu_k[d + 1]
        if q1 == q0:
            continue
        mk, mv, ml = _memory_rows(mem_k, mem_v, mem_len, slice(d, d + 1))
        parts.append(_hybrid_dense(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], mk, mv, weights,
                                   ml, start_pos=starts[d], **run))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def gated_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states of h_j = a_j * h_{j-1} + b_j for j = 0..n-1 as an associative scan.

    a, b: (B, n, d); h0: (B, d). Returns (B, n, d). Hillis–Steele doubling: after the step with
    offset s, (a_j, b_j) composes the 2s steps ending at j; log2(n) steps in all.
    """
    n = a.shape[1]
    s = 1
    while s < n:
        a_prev = F.pad(a[:, :-s], (0, 0, s, 0), value=1.0)  # identity element (1, 0) before the start
        b_prev = F.pad(b[:, :-s], (0, 0, s, 0), value=0.0)
        a, b = a * a_prev, a * b_prev + b
        s *= 2
    return a * h0[:, None, :] + b


def gated_memory_update_torch(memory, x, w_gate, b_gate, w_cand, b_cand, *, chunk_size, mem_len):
    """Gated FIFO memory update (SPEC §2) with the recurrence as a parallel scan.

    memory: (B, S, d); x: (B, T, d); w_*: (d, d); b_*: (d,); mem_len: (B,) int.
    Returns new_memory (B, S, d) in memory's dtype and new_mem_len (B,) int64.
    """
    B, S, d = memory.shape
    T = x.shape[1]
    C = chunk_size
    n = math.ceil(T / C)
    cdt = torch.promote_types(memory.dtype, torch.float32)
    mem = memory.to(cdt)
    full = T // C  # chunk means as views of x (no padded copy); a shorter last chunk on its own
    means = [x[:, : full * C].reshape(B, full, C, d).mean(dim=2, dtype=cdt)] if full else []
    if T % C:
        means.append(x[:, full * C:].mean(dim=1, keepdim=True, dtype=cdt))
    u = torch.cat(means, dim=1) if len(means) > 1 else means[0]  # (B, n, d)
    g = torch.sigmoid(F.linear(u, w_gate.to(cdt), b_gate.to(cdt)))
    c = torch.tanh(F.linear(u, w_cand.to(cdt), b_cand.to(cdt)))
    mem_len = mem_len.long()
    m_prev = mem[:, S - 1] * (mem_len > 0).to(cdt)[:, None]
    new_memory, new_mem_len = fifo_push(mem, gated_scan(1 - g, g * c, m_prev), mem_len)
    return new_memory.to(memory.dtype), new_mem_len
