"""Naive, obviously-correct reference implementations (SPEC §1 and §2).

Everything here is written for clarity, not speed: dense masks, full score matrices, a Python
loop for the memory recurrence. Tests compare every other backend against these functions.

Both functions take *normalized* arguments (see :mod:`chunkmem.ops`, which validates the public
arguments and converts them):

- ``weights`` is a float tensor of shape (H, 3) holding (w_global, w_chunk, w_mem) per query head,
  with zeros for paths that are off;
- ``mem_k``/``mem_v`` are None when there is no memory path; ``mem_len`` is then None, otherwise
  an integer tensor of shape (B,);
- the attention's ``start_pos`` is an int or an int64 tensor (B,), ``kv_start``/``kv_end`` are
  None or int32 tensors (B,), ``cu_seqlens_q``/``cu_seqlens_k`` None or int32 tensors (N+1,)
  (packed documents, B == 1, memory and start_pos per document), as SPEC §1b describes.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "rope_cos_sin",
    "apply_rope",
    "hybrid_attention_reference",
    "gated_memory_update_reference",
    "fifo_push",
]


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float, dtype=torch.float32):
    """cos/sin tables of the rotate-half RoPE for integer ``positions`` (T,) -> two (T, dim/2)."""
    half = dim // 2
    t = torch.arange(half, device=positions.device, dtype=torch.float64)
    theta = base ** (-2.0 * t / dim)
    angle = positions.to(torch.float64)[:, None] * theta[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (..., T, D) with cos/sin (T, D/2) (GPT-NeoX / Llama convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _default_compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _masked_softmax_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale) v over the True entries of mask; rows with no True entry give 0.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); mask broadcastable to (B, H, Tq, Tk).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    any_valid = mask.any(dim=-1, keepdim=True)
    scores = torch.where(any_valid, scores, torch.zeros_like(scores))
    probs = torch.softmax(scores, dim=-1) * mask
    return torch.matmul(probs, v)


def _as_row_tensor(x, B, default, device):
    """None / int / (B,) tensor -> an int64 tensor (B,) on device."""
    if x is None:
        x = default
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.long).reshape(B)
    return torch.full((B,), int(x), dtype=torch.long, device=device)


def hybrid_attention_reference(
    q, k, v, mem_k, mem_v, weights, mem_len, *,
    chunk_size, use_global, rope_base, start_pos, scale,
    kv_start=None, kv_end=None, cu_seqlens_q=None, cu_seqlens_k=None,
    max_seqlen_q=None, max_seqlen_k=None, compute_dtype=None,
):
    """Hybrid attention (SPEC §1, §1b) with dense masks.

    q: (B, H, Tq, D); k, v: (B, G, Tk, D); mem_k, mem_v: (Bm, G, S, D) or None; weights: (H, 3);
    mem_len: (Bm,) int or None; start_pos: int or int tensor (Bm,); kv_start, kv_end: None or
    int tensors (B,); cu_seqlens_q, cu_seqlens_k: None or int tensors (N+1,) with B == 1 (packed
    documents, Bm = N; each document is computed on its own, as a batch row of its own).
    max_seqlen_q/max_seqlen_k are accepted and ignored. Computes in ``compute_dtype`` (default:
    float64 for float64 inputs, float32 otherwise) and returns (B, H, Tq, D) in q's dtype.
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q)
    common = dict(chunk_size=chunk_size, use_global=use_global, rope_base=rope_base, scale=scale,
                  compute_dtype=compute_dtype)
    if cu_seqlens_q is None:
        return _rows_reference(q, k, v, mem_k, mem_v, weights, mem_len, start_pos=start_pos,
                               kv_start=kv_start, kv_end=kv_end, **common).to(q.dtype)
    cu_q = [int(x) for x in cu_seqlens_q.cpu()]
    cu_k = [int(x) for x in cu_seqlens_k.cpu()]
    N = len(cu_q) - 1
    starts = _as_row_tensor(start_pos, N, 0, q.device)
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    for d in range(N):
        q0, q1, k0, k1 = cu_q[d], cu_q[d + 1], cu_k[d], cu_k[d + 1]
        if q1 == q0:
            continue
        mem = (None, None, None) if mem_k is None else (mem_k[d:d + 1], mem_v[d:d + 1], mem_len[d:d + 1])
        out[:, :, q0:q1] = _rows_reference(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], *mem[:2],
                                           weights, mem[2], start_pos=starts[d:d + 1],
                                           kv_start=None, kv_end=None, **common)
    return out.to(q.dtype)


def _rows_reference(q, k, v, mem_k, mem_v, weights, mem_len, *, chunk_size, use_global, rope_base,
                    start_pos, scale, kv_start, kv_end, compute_dtype):
    """The per-row semantics of SPEC §1b with (B, Tq, Tk) masks; returns compute_dtype."""
    B, H, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    rep = H // G
    dev = q.device
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc = kc.repeat_interleave(rep, dim=1)
    vc = vc.repeat_interleave(rep, dim=1)
    w = weights.to(compute_dtype)
    out = torch.zeros(B, H, Tq, D, dtype=compute_dtype, device=dev)

    lo = _as_row_tensor(kv_start, B, 0, dev)[:, None]  # (B, 1)
    hi = _as_row_tensor(kv_end, B, Tk, dev)[:, None]
    sp = _as_row_tensor(start_pos, B, 0, dev)[:, None]
    key_idx = torch.arange(Tk, device=dev)[None, :]  # (1, Tk)
    query_idx = hi - Tq + torch.arange(Tq, device=dev)[None, :]  # (B, Tq): key index a_i
    key_pos = sp + key_idx - lo  # (B, Tk)
    query_pos = sp + query_idx - lo  # (B, Tq)
    real_query = query_idx >= lo  # (B, Tq): False for padding queries
    valid_key = (key_idx >= lo) & (key_idx < hi)  # (B, Tk)
    causal = (valid_key[:, None, :] & (key_idx[:, None, :] <= query_idx[:, :, None])
              & real_query[:, :, None])  # (B, Tq, Tk)

    if use_global or chunk_size is not None:
        qr, kr = qc, kc
        if rope_base is not None:
            cos_q, sin_q = rope_cos_sin(query_pos.reshape(-1), D, rope_base, compute_dtype)
            cos_k, sin_k = rope_cos_sin(key_pos.reshape(-1), D, rope_base, compute_dtype)
            qr = apply_rope(qc, cos_q.view(B, 1, Tq, -1), sin_q.view(B, 1, Tq, -1))
            kr = apply_rope(kc, cos_k.view(B, 1, Tk, -1), sin_k.view(B, 1, Tk, -1))
        if use_global:
            o_g = _masked_softmax_attention(qr, kr, vc, causal[:, None], scale)
            out = out + w[:, 0].view(1, H, 1, 1) * o_g
        if chunk_size is not None:
            same_chunk = (torch.div(key_pos[:, None, :], chunk_size, rounding_mode="floor")
                          == torch.div(query_pos[:, :, None], chunk_size, rounding_mode="floor"))
            o_c = _masked_softmax_attention(qr, kr, vc, (causal & same_chunk)[:, None], scale)
            out = out + w[:, 1].view(1, H, 1, 1) * o_c

    if mem_k is not None:
        S = mem_k.shape[2]
        mk = mem_k.to(compute_dtype).repeat_interleave(rep, dim=1)
        mv = mem_v.to(compute_dtype).repeat_interleave(rep, dim=1)
        slot = torch.arange(S, device=dev)
        valid = slot[None, :] >= (S - mem_len.to(dev).long())[:, None]  # (B, S), right-aligned
        mask = valid[:, None, :] & real_query[:, :, None]  # (B, Tq, S)
        o_m = _masked_softmax_attention(qc, mk, mv, mask[:, None], scale)
        out = out + w[:, 2].view(1, H, 1, 1) * o_m
    return out


def gated_memory_update_reference(
    memory, x, w_gate, b_gate, w_cand, b_cand, *, chunk_size, mem_len, compute_dtype=None,
):
    """Gated FIFO memory update (SPEC §2), one recurrence step at a time.

    memory: (B, S, d), valid slots right-aligned; x: (B, T, d); w_*: (d, d); b_*: (d,);
    mem_len: (B,) int. Computes in ``compute_dtype`` (default as for the attention). Returns
    new_memory (B, S, d) in memory's dtype and new_mem_len (B,) int64.
    """
    compute_dtype = compute_dtype or _default_compute_dtype(memory)
    B, S, d = memory.shape
    T = x.shape[1]
    n = math.ceil(T / chunk_size)
    mem = memory.to(compute_dtype)
    xc = x.to(compute_dtype)
    wg, bg, wc, bc = (t.to(compute_dtype) for t in (w_gate, b_gate, w_cand, b_cand))
    mem_len = mem_len.to(memory.device).long()

    has_prev = (mem_len > 0).to(compute_dtype)[:, None]
    m = mem[:, S - 1] * has_prev  # newest valid slot, or zeros
    states = []
    for j in range(n):
        u = xc[:, j * chunk_size: min((j + 1) * chunk_size, T)].mean(dim=1)
        g = torch.sigmoid(u @ wg.T + bg)
        c = torch.tanh(u @ wc.T + bc)
        m = (1 - g) * m + g * c
        states.append(m)
    new_memory, new_mem_len = fifo_push(mem, torch.stack(states, dim=1), mem_len)
    return new_memory.to(memory.dtype), new_mem_len


def fifo_push(memory, states, mem_len):
    """Append ``states`` (B, n, d) to ``memory`` (B, S, d) first-in first-out.

    Returns the last S rows of cat(memory, states) with the slots beyond the new valid length
    zeroed, and new_mem_len = min(S, mem_len + n) (B,) int64.
    """
    S, n = memory.shape[1], states.shape[1]
    new_memory = torch.cat((memory, states), dim=1)[:, -S:]
    new_mem_len = torch.clamp(mem_len.long() + n, max=S)
    valid = torch.arange(S, device=memory.device)[None, :] >= (S - new_mem_len)[:, None]
    return new_memory * valid[:, :, None].to(new_memory.dtype), new_mem_len
