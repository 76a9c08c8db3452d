"""Shared test utilities for the chunkmem core tests: tolerance tables, input builders, oracles.

Everything here is written from SPEC.md alone (not from chunkmem.reference), so that the oracles
below can also check the reference implementation itself.

Tolerances (per dtype of the inputs; the expected values are always computed in float64 from the
very same, already rounded, inputs):

- OUT_TOL: outputs. float32: the backends compute in fp32, error ~1e-6 relative, so atol 2e-5 /
  rtol 1e-4. float16: the output is rounded to fp16 (unit roundoff 2**-11 ~ 4.9e-4), atol/rtol 2e-3.
  bfloat16: unit roundoff 2**-8 ~ 3.9e-3, atol/rtol 1.6e-2. float64: 1e-10 / 1e-8.
- GRAD_TOL: gradients of float32 inputs against float64 gradients: atol 1e-4, rtol 1e-3 (gradients
  sum over up to Tk terms of size O(1)).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import chunkmem
from chunkmem.reference import hybrid_attention_reference

OUT_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
GRAD_TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-3),
}

ATTN_GRAD_NAMES = ("q", "k", "v", "mem_k", "mem_v", "weights")
MEM_GRAD_NAMES = ("memory", "x", "w_gate", "b_gate", "w_cand", "b_cand")


# --------------------------------------------------------------------------------------------
# hybrid_attention: cases, inputs, calls
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttnCase:
    """One configuration of hybrid_attention.

    Shapes: q (B, H, Tq, D); k, v (B, G, Tk, D); mem_k, mem_v (B, G, S, D) when S is not None.
    mem_len: per-row lengths (len B) or None (all S slots valid). weights: "none" (weights=None),
    "3" (shape (3,)) or "H3" (shape (H, 3)).
    """

    B: int = 2
    H: int = 2
    G: int = 2
    Tq: int = 8
    Tk: int = 8
    D: int = 8
    chunk_size: Optional[int] = None
    S: Optional[int] = None
    mem_len: Optional[Sequence[int]] = None
    use_global: bool = True
    weights: str = "none"
    rope_base: Optional[float] = None
    start_pos: int = 0
    scale: Optional[float] = None

    def replace(self, **kw) -> "AttnCase":
        return dataclasses.replace(self, **kw)

    @property
    def eff_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.D)


def make_attn_inputs(case: AttnCase, dtype=torch.float32, seed: int = 0) -> dict:
    """Random inputs of ``case``: dict q, k, v, mem_k, mem_v, weights (float32 or None), mem_len.

    Tensors are drawn in float32 and rounded to ``dtype``; weights stay float32 (float64 when
    dtype is float64); mem_len is an int64 tensor (B,) or None.
    """
    g = torch.Generator().manual_seed(seed)
    B, H, G, Tq, Tk, D = case.B, case.H, case.G, case.Tq, case.Tk, case.D

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    t = dict(q=rnd(B, H, Tq, D), k=rnd(B, G, Tk, D), v=rnd(B, G, Tk, D), mem_k=None, mem_v=None,
             weights=None, mem_len=None)
    if case.S is not None:
        t["mem_k"], t["mem_v"] = rnd(B, G, case.S, D), rnd(B, G, case.S, D)
        if case.mem_len is not None:
            assert len(case.mem_len) == B
            t["mem_len"] = torch.tensor(list(case.mem_len), dtype=torch.int64)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    if case.weights == "3":
        t["weights"] = (0.5 + 0.5 * torch.randn(3, generator=g)).to(wdt)
    elif case.weights == "H3":
        t["weights"] = (0.5 + 0.5 * torch.randn(H, 3, generator=g)).to(wdt)
    else:
        assert case.weights == "none"
    return t


def paths_on(case: AttnCase) -> torch.Tensor:
    """(3,) float64 mask of the paths that are on: (global, chunk, memory)."""
    return torch.tensor([float(case.use_global), float(case.chunk_size is not None),
                         float(case.S is not None)], dtype=torch.float64)


def normalized_weights(case: AttnCase, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """SPEC §1 weights as a float64 (H, 3) tensor: None -> equal over the paths that are on;
    (3,) -> the same for every head; off paths -> 0. Differentiable in ``weights``."""
    on = paths_on(case)
    if weights is None:
        return (on / on.sum()).expand(case.H, 3).clone()
    w = weights.to(torch.float64)
    if w.dim() == 1:
        w = w.expand(case.H, 3)
    return w * on


def call_hybrid(case: AttnCase, t: dict, backend: str) -> torch.Tensor:
    """chunkmem.hybrid_attention on the inputs ``t`` of ``case`` with ``backend``."""
    return chunkmem.hybrid_attention(
        t["q"], t["k"], t["v"], t["mem_k"], t["mem_v"],
        weights=t["weights"], chunk_size=case.chunk_size, use_global=case.use_global,
        mem_len=t["mem_len"], rope_base=case.rope_base, start_pos=case.start_pos,
        scale=case.scale, backend=backend,
    )


def reference_fp64(case: AttnCase, t: dict) -> torch.Tensor:
    """chunkmem.reference in float64 on float64 copies of ``t`` (differentiable in t's tensors).

    The public-argument normalization (weights, mem_len=None, scale=None) is done here, from the
    SPEC, independently of chunkmem.ops. Returns (B, H, Tq, D) float64.
    """
    f64 = {n: (x.to(torch.float64) if x is not None and x.is_floating_point() else x)
           for n, x in t.items()}
    mem_len = t["mem_len"]
    if case.S is not None and mem_len is None:
        mem_len = torch.full((case.B,), case.S, dtype=torch.int64)
    return hybrid_attention_reference(
        f64["q"], f64["k"], f64["v"], f64["mem_k"], f64["mem_v"],
        normalized_weights(case, f64["weights"]), mem_len,
        chunk_size=case.chunk_size, use_global=case.use_global, rope_base=case.rope_base,
        start_pos=case.start_pos, scale=case.eff_scale, compute_dtype=torch.float64,
    )


# --------------------------------------------------------------------------------------------
# Independent oracles written from the SPEC with F.scaled_dot_product_attention
# --------------------------------------------------------------------------------------------

def rope_spec(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """SPEC §1 rotate-half RoPE of x (..., T, D) at integer ``positions`` (T,), in float64."""
    D = x.shape[-1]
    half = D // 2
    x = x.to(torch.float64)
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    ang = positions.to(torch.float64)[:, None] * theta[None, :]
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def causal_mask(Tq: int, Tk: int, chunk_size: Optional[int] = None, start_pos: int = 0) -> torch.Tensor:
    """(Tq, Tk) bool: query i (key index a_i = Tk - Tq + i) sees key j <= a_i, and with
    ``chunk_size`` only keys in its own chunk, counted by position:
    (start_pos + j) // C == (start_pos + a_i) // C."""
    a = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    mask = j <= a
    if chunk_size is not None:
        mask = mask & ((j + start_pos) // chunk_size == (a + start_pos) // chunk_size)
    return mask


def sdpa_oracle(case: AttnCase, t: dict) -> torch.Tensor:
    """Hybrid attention assembled from SDPA calls in float64 (independent of chunkmem).

    Global and chunk paths: SDPA with explicit boolean masks (bottom-right), RoPE by rope_spec;
    memory path: one SDPA per batch row over its last mem_len[b] slots (0 if none).
    Returns (B, H, Tq, D) float64, differentiable in t's tensors.
    """
    B, H, Tq, Tk, S = case.B, case.H, case.Tq, case.Tk, case.S
    q, k, v = (t[n].to(torch.float64) for n in ("q", "k", "v"))
    w = normalized_weights(case, t["weights"]).view(1, H, 3, 1, 1)
    rep = H // case.G
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    qr, kr = q, kk
    if case.rope_base is not None:
        pos = torch.arange(Tk) + case.start_pos
        qr, kr = rope_spec(q, pos[Tk - Tq:], case.rope_base), rope_spec(kk, pos, case.rope_base)
    out = torch.zeros(B, H, Tq, case.D, dtype=torch.float64)
    if case.use_global:
        o = F.scaled_dot_product_attention(qr, kr, vv, attn_mask=causal_mask(Tq, Tk), scale=case.eff_scale)
        out = out + w[:, :, 0] * o
    if case.chunk_size is not None:
        o = F.scaled_dot_product_attention(qr, kr, vv, attn_mask=causal_mask(Tq, Tk, case.chunk_size, case.start_pos),
                                           scale=case.eff_scale)
        out = out + w[:, :, 1] * o
    if S is not None:
        mk = t["mem_k"].to(torch.float64).repeat_interleave(rep, 1)
        mv = t["mem_v"].to(torch.float64).repeat_interleave(rep, 1)
        lens = [S] * B if t["mem_len"] is None else [int(x) for x in t["mem_len"]]
        rows = []
        for b in range(B):
            if lens[b] == 0:
                rows.append(torch.zeros(H, Tq, case.D, dtype=torch.float64))
            else:
                rows.append(F.scaled_dot_product_attention(
                    q[b], mk[b, :, S - lens[b]:], mv[b, :, S - lens[b]:], scale=case.eff_scale))
        out = out + w[:, :, 2] * torch.stack(rows)
    return out


def ranged_sdpa_oracle(q, k, v, mem_k, mem_v, weights, mem_len, *, chunk_size, use_global,
                       rope_base, scale, start_pos, kv_start, kv_end) -> torch.Tensor:
    """SPEC §1b written out with explicit per-row masks and SDPA, in float64 (independent of
    chunkmem). start_pos, kv_start, kv_end: Python lists (B,); weights: (H, 3) (off paths 0);
    mem_len: list (B,) or None. Row b: valid keys kv_start <= j < kv_end, query i at key index
    a_i = kv_end - Tq + i, key j at position start_pos + j - kv_start; a query with
    a_i < kv_start is padding (output 0 on every path). Returns (B, H, Tq, D) float64."""
    B, H, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    rep = H // G
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    w = weights.to(torch.float64)
    rows = []
    for b in range(B):
        lo, hi, sp = kv_start[b], kv_end[b], start_pos[b]
        a = hi - Tq + torch.arange(Tq)[:, None]  # (Tq, 1) key index of each query
        j = torch.arange(Tk)[None, :]
        real = (a >= lo).to(torch.float64)  # (Tq, 1)
        mask = (j >= lo) & (j < hi) & (j <= a)
        open_mask = mask | (a < lo)  # padding queries: any finite row, zeroed below
        qb, kb = q[b], k[b]
        if rope_base is not None:
            qb = rope_spec(qb, sp + a[:, 0] - lo, rope_base)
            kb = rope_spec(kb, sp + j[0] - lo, rope_base)
        out = torch.zeros(H, Tq, D, dtype=torch.float64)
        if use_global:
            out = out + w[:, 0, None, None] * real * F.scaled_dot_product_attention(
                qb, kb, v[b], attn_mask=open_mask, scale=scale)
        if chunk_size is not None:
            same = torch.div(sp + j - lo, chunk_size, rounding_mode="floor") == torch.div(
                sp + a - lo, chunk_size, rounding_mode="floor")
            out = out + w[:, 1, None, None] * real * F.scaled_dot_product_attention(
                qb, kb, v[b], attn_mask=(mask & same) | (a < lo), scale=scale)
        if mem_k is not None and (mem_len is None or mem_len[b] > 0):
            S = mem_k.shape[2]
            n = S if mem_len is None else mem_len[b]
            mk = mem_k[b].to(torch.float64).repeat_interleave(rep, 0)[:, S - n:]
            mv = mem_v[b].to(torch.float64).repeat_interleave(rep, 0)[:, S - n:]
            out = out + w[:, 2, None, None] * real * F.scaled_dot_product_attention(
                q[b], mk, mv, scale=scale)
        rows.append(out)
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------

def leaves(t: dict, names: Sequence[str], dtype=None) -> dict:
    """Copy of ``t`` whose floating tensors named in ``names`` are fresh leaves requiring grad
    (cast to ``dtype`` first when given); other entries are passed through."""
    out = dict(t)
    for n in names:
        x = t.get(n)
        if x is not None:
            x = x.detach().to(dtype) if dtype is not None else x.detach().clone()
            out[n] = x.requires_grad_(True)
    return out


def out_and_grads(fn, t: dict, names: Sequence[str], dout: torch.Tensor, dtype=None):
    """Run ``fn(leaves)`` -> tensor, backprop ``dout``; return (out, {name: grad}) for ``names``.

    A leaf that got no gradient (path absent) is reported as None.
    """
    lv = leaves(t, names, dtype)
    out = fn(lv)
    out.backward(dout.to(out.dtype))
    grads = {n: lv[n].grad for n in names if lv.get(n) is not None}
    return out.detach(), grads


def assert_close_tol(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str = ""):
    """torch.testing.assert_close in float64 with ``tol``; also checks finiteness and shape."""
    assert actual is not None, f"{what}: no value"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               msg=lambda m: f"{what}: {m}", **tol)


def assert_grads_close(actual: dict, expected: dict, tol: dict):
    """Every expected gradient exists in ``actual`` and matches (None in expected -> zero or None)."""
    for n, e in expected.items():
        a = actual.get(n)
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0, f"grad {n}: expected none/zero"
            continue
        assert_close_tol(a, e, tol, f"grad {n}")


# --------------------------------------------------------------------------------------------
# gated_memory_update: inputs
# --------------------------------------------------------------------------------------------

def make_memory_inputs(B: int, S: int, d: int, T: int, mem_len: Optional[Sequence[int]],
                       dtype=torch.float32, seed: int = 0) -> dict:
    """Random inputs of gated_memory_update: memory (B, S, d) with zeros in the invalid (left)
    slots, x (B, T, d), w_gate/w_cand (d, d), b_gate/b_cand (d,), mem_len int64 (B,) or None."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g)).to(dtype)

    memory = rnd(B, S, d)
    lens = None
    if mem_len is not None:
        lens = torch.tensor(list(mem_len), dtype=torch.int64)
        valid = torch.arange(S)[None, :] >= (S - lens)[:, None]
        memory = memory * valid[:, :, None].to(dtype)
    return dict(memory=memory, x=rnd(B, T, d), w_gate=rnd(d, d, s=d ** -0.5), b_gate=rnd(d),
                w_cand=rnd(d, d, s=d ** -0.5), b_cand=rnd(d), mem_len=lens)


def call_memory_update(t: dict, chunk_size: int, backend: str):
    """chunkmem.gated_memory_update on the inputs ``t`` (see make_memory_inputs)."""
    return chunkmem.gated_memory_update(
        t["memory"], t["x"], t["w_gate"], t["b_gate"], t["w_cand"], t["b_cand"],
        chunk_size=chunk_size, mem_len=t["mem_len"], backend=backend)
