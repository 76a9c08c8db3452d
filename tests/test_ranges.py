"""Rows with key ranges, per-row start_pos and packed documents (SPEC §1b) for the "reference"
and "torch" backends.

The SPEC defines a padded row, and a packed document, as that row computed alone on its valid
keys. The tests hold every backend to that: expected values are the rows / documents run one by
one without ranges, in float64 by chunkmem.reference (its range-free form is checked against
SDPA oracles in test_hybrid_attention.py), and the reference's ranged form is itself checked
against tests/helpers.ranged_sdpa_oracle, the SPEC's §1b masks written out with SDPA.

Tolerances (tests/helpers.py): float32 outputs atol 2e-5 / rtol 1e-4, gradients atol 1e-4 /
rtol 1e-3; float16 outputs 2e-3, bfloat16 1.6e-2; float64 1e-10 / 1e-8. Zeros the SPEC demands
(padding queries' outputs and gradients, gradients of keys outside the range or of a document
without queries) are checked to be exactly zero.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import pytest
import torch

import chunkmem
from helpers import GRAD_TOL, OUT_TOL, assert_close_tol, ranged_sdpa_oracle

BACKENDS = ["torch", "reference"]
GRAD_NAMES = ("q", "k", "v", "mem_k", "mem_v", "weights")


@dataclasses.dataclass(frozen=True)
class Ranged:
    """A hybrid_attention call: q (B, H, Tq, D), k/v (B, G, Tk, D), mem (Bm, G, S, D) when S is
    set (Bm = B, or the number of documents with cu_seqlens), weights (H, 3)."""

    B: int = 4
    H: int = 4
    G: int = 2
    Tq: int = 6
    Tk: int = 10
    D: int = 8
    chunk_size: Optional[int] = None
    S: Optional[int] = None
    mem_len: Optional[Sequence[int]] = None
    use_global: bool = True
    rope_base: Optional[float] = None
    start_pos: Union[int, Sequence[int]] = 0
    kv_start: Optional[Sequence[int]] = None
    kv_end: Optional[Sequence[int]] = None
    cu_q: Optional[Sequence[int]] = None
    cu_k: Optional[Sequence[int]] = None

    def replace(self, **kw) -> "Ranged":
        return dataclasses.replace(self, **kw)

    @property
    def n_rows(self) -> int:  # rows of memory / start_pos: B, or N documents
        return self.B if self.cu_q is None else len(self.cu_q) - 1

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.D)

    def starts(self) -> list:
        sp = self.start_pos
        return [sp] * self.n_rows if isinstance(sp, int) else list(sp)

    def bounds(self) -> list:
        """(kv_start, kv_end) of every row."""
        lo = self.kv_start or [0] * self.B
        hi = self.kv_end or [self.Tk] * self.B
        return list(zip(lo, hi))


def make_inputs(c: Ranged, dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    t = dict(q=rnd(c.B, c.H, c.Tq, c.D), k=rnd(c.B, c.G, c.Tk, c.D), v=rnd(c.B, c.G, c.Tk, c.D),
             mem_k=None, mem_v=None,
             weights=(0.5 + 0.5 * torch.randn(c.H, 3, generator=g)).to(
                 torch.float64 if dtype == torch.float64 else torch.float32))
    if c.S is not None:
        t["mem_k"], t["mem_v"] = rnd(c.n_rows, c.G, c.S, c.D), rnd(c.n_rows, c.G, c.S, c.D)
    return t


def _int_tensor(x, dtype=torch.int32):
    return None if x is None else torch.tensor(list(x), dtype=dtype)


def call(c: Ranged, t: dict, backend: str, **extra) -> torch.Tensor:
    """chunkmem.hybrid_attention with the ranges of ``c`` (start_pos a tensor when a list)."""
    sp = c.start_pos if isinstance(c.start_pos, int) else torch.tensor(list(c.start_pos))
    kw = dict(chunk_size=c.chunk_size, use_global=c.use_global, rope_base=c.rope_base,
              start_pos=sp, kv_start=_int_tensor(c.kv_start), kv_end=_int_tensor(c.kv_end),
              cu_seqlens_q=_int_tensor(c.cu_q), cu_seqlens_k=_int_tensor(c.cu_k),
              mem_len=_int_tensor(c.mem_len, torch.int64), backend=backend)
    kw.update(extra)
    return chunkmem.hybrid_attention(t["q"], t["k"], t["v"], t["mem_k"], t["mem_v"],
                                     weights=t["weights"], **kw)


def _alone(c: Ranged, t: dict, q, k, v, m: int, sp: int, backend="reference"):
    """Row / document ``m`` of the memory alone: q (1, H, n, D), k/v (1, G, L, D), no ranges."""
    mem = {}
    if c.S is not None:
        mem = dict(mem_len=None if c.mem_len is None else torch.tensor([c.mem_len[m]]))
        mk, mv = t["mem_k"][m:m + 1], t["mem_v"][m:m + 1]
    else:
        mk = mv = None
    return chunkmem.hybrid_attention(q, k, v, mk, mv, weights=t["weights"], chunk_size=c.chunk_size,
                                     use_global=c.use_global, rope_base=c.rope_base, start_pos=sp,
                                     backend=backend, **mem)


def expected_rows_alone(c: Ranged, t: dict) -> torch.Tensor:
    """Every row b run alone on its valid keys and its real queries (the last
    min(Tq, kv_end - kv_start)), at start_pos[b]; zeros for the padding queries. Differentiable
    in t's tensors (slices of them), so one backward gives the expected gradients."""
    rows = []
    for b, ((lo, hi), sp) in enumerate(zip(c.bounds(), c.starts())):
        n = min(c.Tq, hi - lo)
        row = torch.zeros(1, c.H, c.Tq, c.D, dtype=t["q"].dtype)
        if n > 0:
            part = _alone(c, t, t["q"][b:b + 1, :, c.Tq - n:], t["k"][b:b + 1, :, lo:hi],
                          t["v"][b:b + 1, :, lo:hi], b, sp)
            row = torch.cat((row[:, :, :c.Tq - n], part), dim=2)
        rows.append(row)
    return torch.cat(rows)


def expected_documents_alone(c: Ranged, t: dict) -> torch.Tensor:
    """Every packed document with queries run alone (a batch row of its own), concatenated."""
    parts = []
    for d, sp in enumerate(c.starts()):
        q0, q1, k0, k1 = c.cu_q[d], c.cu_q[d + 1], c.cu_k[d], c.cu_k[d + 1]
        if q1 > q0:
            parts.append(_alone(c, t, t["q"][:, :, q0:q1], t["k"][:, :, k0:k1], t["v"][:, :, k0:k1], d, sp))
    return torch.cat(parts, dim=2)


def run_with_grads(fn, t: dict, dout: torch.Tensor, dtype=None):
    """fn(leaves) -> out; returns (out, {name: grad}) for the floating inputs of t."""
    lv = dict(t)
    for n in GRAD_NAMES:
        if t.get(n) is not None:
            x = t[n].detach()
            lv[n] = (x.to(dtype) if dtype is not None else x.clone()).requires_grad_(True)
    out = fn(lv)
    out.backward(dout.to(out.dtype))
    return out.detach(), {n: lv[n].grad for n in GRAD_NAMES if lv.get(n) is not None}


def _dout(c: Ranged, seed=7):
    return torch.randn(c.B, c.H, c.Tq, c.D, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def check_against(c: Ranged, backend: str, expected_fn, dtype=torch.float32, seed=0):
    """Outputs and gradients of ``backend`` on dtype inputs vs ``expected_fn`` in float64."""
    t = make_inputs(c, dtype, seed)
    dout = _dout(c)
    want, want_g = run_with_grads(lambda lv: expected_fn(c, lv), t, dout, torch.float64)
    got, got_g = run_with_grads(lambda lv: call(c, lv, backend), t, dout)
    assert_close_tol(got, want, OUT_TOL[dtype], "output")
    for n, e in want_g.items():
        a = got_g.get(n)
        if e is None or not e.any():  # no path reaches it: no gradient or exact zeros
            assert a is None or not a.any(), f"grad {n}: expected zeros"
        else:
            assert_close_tol(a, e, GRAD_TOL[dtype], f"grad {n}")
    return got, got_g


# ----------------------------------------------------------------------------- per-row ranges

PATHS = {
    "all_paths_gqa_rope": dict(chunk_size=3, S=3, mem_len=(1, 3, 0, 2), rope_base=100.0),
    "global_only": dict(G=4),
    "chunk_only_rope_mqa": dict(G=1, chunk_size=4, use_global=False, rope_base=10000.0),
    "memory_only": dict(S=4, mem_len=(4, 0, 2, 1), use_global=False),
    "chunk_memory": dict(chunk_size=2, S=2, use_global=False),
    "global_memory_rope": dict(S=3, rope_base=50.0),
}
# Tq = 6, Tk = 10. Row kinds: all keys valid; fewer valid keys than queries (padding queries);
# no valid key (every query is padding); more valid keys than queries; rows with equal ranges.
RANGES = {
    "both": dict(kv_start=(0, 3, 5, 2), kv_end=(10, 8, 5, 10)),
    "kv_end_only": dict(kv_end=(10, 4, 0, 7)),
    "kv_start_only": dict(kv_start=(0, 6, 10, 1)),
    "repeated": dict(kv_start=(2, 0, 2, 0), kv_end=(9, 5, 9, 5)),  # rows 0, 2 and 1, 3 alike
}
STARTS = {"int": 5, "tensor": (0, 7, 3, 130)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", list(STARTS))
@pytest.mark.parametrize("ranges", list(RANGES))
@pytest.mark.parametrize("paths", list(PATHS))
def test_padded_rows_equal_rows_alone(backend, paths, ranges, start):
    c = Ranged(**PATHS[paths], **RANGES[ranges], start_pos=STARTS[start])
    got, grads = check_against(c, backend, expected_rows_alone)
    for b, (lo, hi) in enumerate(c.bounds()):
        pad = c.Tq - min(c.Tq, hi - lo)
        assert torch.equal(got[b, :, :pad], torch.zeros_like(got[b, :, :pad])), f"row {b}: padding output"
        assert not grads["q"][b, :, :pad].any(), f"row {b}: dq of padding queries"
        for n in ("k", "v"):
            if grads[n] is not None:  # None when only the memory path is on
                assert not grads[n][b, :, :lo].any() and not grads[n][b, :, hi:].any(), f"row {b}: d{n} outside"
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padded_rows_low_precision(backend, dtype):
    c = Ranged(**PATHS["all_paths_gqa_rope"], **RANGES["both"], start_pos=STARTS["tensor"])
    t = make_inputs(c, dtype, seed=2)
    got = call(c, t, backend)
    assert got.dtype == dtype
    want = expected_rows_alone(c, {n: x.to(torch.float64) if x is not None else None for n, x in t.items()})
    assert_close_tol(got, want, OUT_TOL[dtype], str(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_in_static_cache(backend):
    """Tq = 1 in a pre-allocated cache: kv_end = each row's length, chunk boundaries by position."""
    c = Ranged(B=3, Tq=1, Tk=16, chunk_size=4, S=2, mem_len=(2, 1, 0), rope_base=1000.0,
               kv_end=(16, 5, 9), start_pos=(0, 2, 11))
    check_against(c, backend, expected_rows_alone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_ranges_equal_no_ranges(backend):
    c = Ranged(**PATHS["all_paths_gqa_rope"], start_pos=3)
    t = make_inputs(c, seed=3)
    plain = call(c, t, backend)
    full = call(c.replace(kv_start=(0,) * 4, kv_end=(10,) * 4, start_pos=(3,) * 4), t, backend)
    assert_close_tol(full, plain, OUT_TOL[torch.float32], "full ranges")


def test_reference_ranges_match_independent_oracle():
    """chunkmem.reference with ranges and per-row start_pos vs the SPEC §1b masks with SDPA
    (float64: atol 1e-10 / rtol 1e-8), output and gradients."""
    c = Ranged(**PATHS["all_paths_gqa_rope"], **RANGES["both"], start_pos=STARTS["tensor"])
    t = make_inputs(c, torch.float64, seed=4)
    dout = _dout(c)

    def oracle(lv):
        w = lv["weights"] * torch.tensor([float(c.use_global), float(c.chunk_size is not None),
                                          float(c.S is not None)], dtype=torch.float64)
        return ranged_sdpa_oracle(lv["q"], lv["k"], lv["v"], lv["mem_k"], lv["mem_v"], w,
                                  list(c.mem_len), chunk_size=c.chunk_size, use_global=c.use_global,
                                  rope_base=c.rope_base, scale=c.scale, start_pos=c.starts(),
                                  kv_start=list(c.kv_start), kv_end=list(c.kv_end))

    want, want_g = run_with_grads(oracle, t, dout)
    got, got_g = run_with_grads(lambda lv: call(c, lv, "reference"), t, dout)
    assert_close_tol(got, want, OUT_TOL[torch.float64], "output")
    for n in GRAD_NAMES:
        assert_close_tol(got_g[n], want_g[n], GRAD_TOL[torch.float64], f"grad {n}")


# ----------------------------------------------------------------------------- packed documents

# Four documents: 3 queries / 4 keys, 0 / 2 (no queries), 4 / 7, 1 / 1.
PACKED = dict(B=1, Tq=8, Tk=14, cu_q=(0, 3, 3, 7, 8), cu_k=(0, 4, 6, 13, 14))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", ["int", "tensor"])
@pytest.mark.parametrize("paths", ["all_paths_gqa_rope", "chunk_only_rope_mqa", "global_only",
                                   "memory_only"])
def test_packed_documents_equal_separate_calls(backend, paths, start):
    c = Ranged(**PATHS[paths], **PACKED, start_pos=3 if start == "int" else (0, 2, 5, 9))
    if c.mem_len is not None:
        c = c.replace(mem_len=c.mem_len[:4])
    got, grads = check_against(c, backend, expected_documents_alone)
    for n in ("k", "v"):  # document 1 has keys but no queries
        assert grads[n] is None or not grads[n][:, :, 4:6].any(), f"d{n} of a document without queries"


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_accepts_int64_and_max_seqlen(backend):
    c = Ranged(**PATHS["all_paths_gqa_rope"], **PACKED, start_pos=(0, 2, 5, 9))
    c = c.replace(mem_len=c.mem_len[:4])
    t = make_inputs(c, seed=5)
    base = call(c, t, backend)
    cu64 = dict(cu_seqlens_q=_int_tensor(c.cu_q, torch.int64), cu_seqlens_k=_int_tensor(c.cu_k, torch.int64))
    assert torch.equal(call(c, t, backend, **cu64), base)
    assert torch.equal(call(c, t, backend, max_seqlen_q=4, max_seqlen_k=7), base)


# ----------------------------------------------------------------------------- positions

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P", [8, 12, 6, 11])
@pytest.mark.parametrize("s0", [0, 3])
def test_cache_that_dropped_keys_chunks_like_the_full_sequence(backend, P, s0):
    """Chunk-only attention (C = 4) of the last 5 queries over a cache that dropped its first P
    keys, at start_pos = s0 + P, equals those rows of the full call at start_pos = s0 whenever the
    dropped keys lie in earlier chunks than the queries' (P a multiple of C or not). The same
    holds with the keys kept but masked off by kv_start = P."""
    c = Ranged(B=2, Tq=5, Tk=20, chunk_size=4, use_global=False, rope_base=10000.0, S=2,
               start_pos=s0)
    if (s0 + c.Tk - c.Tq) // 4 * 4 < s0 + P:  # the first query's chunk would lose keys
        pytest.skip("the first query's chunk starts before the cut")
    t = make_inputs(c, seed=P)
    full = call(c, t, backend)
    dropped = call(c.replace(Tk=c.Tk - P, start_pos=s0 + P),
                   {**t, "k": t["k"][:, :, P:], "v": t["v"][:, :, P:]}, backend)
    assert_close_tol(dropped, full, OUT_TOL[torch.float32], "dropped cache")
    masked = call(c.replace(kv_start=(P, P), start_pos=(s0 + P, s0 + P)), t, backend)
    assert_close_tol(masked, full, OUT_TOL[torch.float32], "kv_start = P")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_counted_by_position_differ_from_key_index(backend):
    """start_pos not a multiple of chunk_size moves the boundaries: the chunk path then differs
    from the same keys at start_pos = 0 (a check that the shift is not ignored)."""
    c = Ranged(B=1, Tq=10, Tk=10, chunk_size=4, use_global=False)
    t = make_inputs(c, seed=8)
    a, b = call(c, t, backend), call(c.replace(start_pos=2), t, backend)
    assert not torch.allclose(a, b, atol=1e-3)
    assert_close_tol(a[:, :, :1], b[:, :, :1], OUT_TOL[torch.float32], "first query")  # alone either way


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_per_row_shift_leaves_global_attention_unchanged(backend):
    """Global attention with RoPE depends on relative positions only: per-row start_pos
    (0, 13, 1000, 2) gives the start_pos = 0 output (atol/rtol 1e-4: positions up to ~1000), with
    and without left padding (a padded row is its valid part at the row's own start_pos)."""
    c = Ranged(rope_base=10000.0, D=16)
    t = make_inputs(c, seed=9)
    base = call(c, t, backend)
    assert_close_tol(call(c.replace(start_pos=(0, 13, 1000, 2)), t, backend), base,
                     dict(atol=1e-4, rtol=1e-4), "shifted")
    cp = c.replace(kv_start=(0, 3, 5, 2), kv_end=(10, 8, 9, 10))
    assert_close_tol(call(cp.replace(start_pos=(7, 100, 3, 0)), t, backend), call(cp, t, backend),
                     dict(atol=1e-4, rtol=1e-4), "shifted, padded")


# ----------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("layout", ["ranges", "packed"])
def test_gradcheck_torch_backend_ranged(layout):
    """float64 gradcheck of the torch backend (all paths, RoPE, GQA) on a tiny ranged / packed
    call, in q, k, v, mem_k, mem_v and weights."""
    if layout == "ranges":
        c = Ranged(B=2, H=2, G=1, Tq=3, Tk=5, D=4, chunk_size=2, S=2, mem_len=(1, 2), rope_base=10.0,
                   kv_start=(1, 0), kv_end=(5, 2), start_pos=(3, 1))
    else:
        c = Ranged(B=1, H=2, G=1, Tq=4, Tk=7, D=4, chunk_size=2, S=2, mem_len=(1, 2), rope_base=10.0,
                   cu_q=(0, 3, 4), cu_k=(0, 3, 7), start_pos=(1, 0))
    t = make_inputs(c, torch.float64, seed=10)
    names = GRAD_NAMES

    def f(*xs):
        return call(c, {**t, **dict(zip(names, xs))}, "torch")

    inputs = tuple(t[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
