"""The PyTorch fallback backend: blockwise, differentiable through autograd, no Tq x Tk matrix.

Each attention path is one call of ``F.scaled_dot_product_attention`` on a layout that keeps its
cost and memory linear in T where the math allows it:

- global: SDPA with a causal mask (``is_causal`` when Tq == Tk, the lower-right ``CausalBias``
  for Tq < Tk, i.e. bottom-right alignment) — the fused SDPA kernels keep only O(T) statistics;
- chunk: keys and queries are cut into the non-overlapping chunks of ``chunk_size`` keys and
  stacked into the batch dimension, then causal SDPA runs inside each chunk: O(T * C) work;
- memory: SDPA of the un-rotated queries against the S slots with a (B, 1, 1, S) validity mask.

On CPU, fp16/bf16 inputs are computed in fp32 (statistics and accumulation in fp32, as SPEC §1
asks); on CUDA each path runs SDPA in the input dtype (its kernels accumulate in fp32) and the
weighted sum of the paths is taken in fp32. The output is cast back to the input dtype. The
memory update always computes in fp32 (float64 stays float64).

The gated memory update runs its recurrence as a parallel (Hillis–Steele) associative scan over
the n chunk summaries: m_j = a_j * m_{j-1} + b_j composes as (a, b) pairs, so log2(n) vectorised
steps replace n sequential ones, with no log/exp of the gates (a log-space cumulative sum would
break down when a gate saturates at 1, since log(1 - g) -> -inf).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from chunkmem.reference import apply_rope, fifo_push, rope_cos_sin

__all__ = ["hybrid_attention_torch", "gated_memory_update_torch", "gated_scan"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def _causal_sdpa(q, k, v, scale):
    """Causal SDPA with bottom-right alignment; q (N, H, Tq, D), k/v (N, G, Tk, D), Tq <= Tk."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = causal_lower_right(Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _chunk_attention(q, k, v, chunk_size, scale):
    """Causal attention inside non-overlapping key chunks of ``chunk_size`` (bottom-right aligned).

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

    def fold(x):  # (B, H, n*C, D) -> (B, H*n, C, D)
        return x.reshape(B, H * n_chunks, C, D)

    o = _causal_sdpa(fold(q), fold(k), fold(v), scale)
    return o.reshape(B, H, n_chunks * C, D)[:, :, lead: lead + Tq]


def _memory_attention(q, mem_k, mem_v, mem_len, scale):
    """Attention of q (B, H, Tq, D) over the last mem_len[b] of the S slots of mem_k/mem_v (B, G, S, D).

    Rows with no valid slot give exactly 0 (their mask is opened to keep softmax finite and the
    result is multiplied by 0, which also zeroes their gradients).
    """
    S = mem_k.shape[2]
    slot = torch.arange(S, device=q.device)
    valid = slot[None, :] >= (S - mem_len.long())[:, None]  # (B, S)
    has_slot = mem_len > 0
    mask = (valid | ~has_slot[:, None])[:, None, None, :]
    gqa = q.shape[1] != mem_k.shape[1]
    o = F.scaled_dot_product_attention(q, mem_k, mem_v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o * has_slot.to(o.dtype).view(-1, 1, 1, 1)


def hybrid_attention_torch(
    q, k, v, mem_k, mem_v, weights, mem_len, *,
    chunk_size, use_global, rope_base, start_pos, scale,
):
    """Hybrid attention (SPEC §1), blockwise. Arguments in the normalized form of :mod:`chunkmem.ops`.

    q: (B, H, Tq, D); k, v: (B, G, Tk, D); mem_k, mem_v: (B, G, S, D) or None; weights: (H, 3);
    mem_len: (B,) int or None. Returns (B, H, Tq, D) in q's dtype.
    """
    H, Tq, D = q.shape[1], q.shape[2], q.shape[3]
    Tk = k.shape[2]
    cdt = _compute_dtype(q)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    sum_dtype = torch.promote_types(cdt, torch.float32)
    w = weights.to(sum_dtype).view(1, H, 3, 1, 1)
    out = torch.zeros(q.shape, dtype=sum_dtype, device=q.device)  # stays 0 if no path is left

    if use_global or chunk_size is not None:
        qr, kr = qc, kc
        if rope_base is not None:
            pos = torch.arange(start_pos, start_pos + Tk, device=q.device)
            cos, sin = rope_cos_sin(pos, D, rope_base, cdt)
            qr = apply_rope(qc, cos[Tk - Tq:], sin[Tk - Tq:])
            kr = apply_rope(kc, cos, sin)
        if use_global:
            out = out + w[:, :, 0] * _causal_sdpa(qr, kr, vc, scale)
        if chunk_size is not None:
            out = out + w[:, :, 1] * _chunk_attention(qr, kr, vc, chunk_size, scale)
    if mem_k is not None:
        o_m = _memory_attention(qc, mem_k.to(cdt), mem_v.to(cdt), mem_len, scale)
        out = out + w[:, :, 2] * o_m
    return out.to(q.dtype)


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
