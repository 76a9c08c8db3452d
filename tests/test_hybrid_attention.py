"""Numerical tests of chunkmem.hybrid_attention (SPEC §1) for the "torch" and "reference" backends.

Shapes follow the SPEC: q (B, H, Tq, D); k, v (B, G, Tk, D); mem_k, mem_v (B, G, S, D);
weights (3,) or (H, 3); mem_len (B,). Expected values are computed in float64 either by
F.scaled_dot_product_attention with explicit masks (tests/helpers.sdpa_oracle, independent of
chunkmem) or by chunkmem.reference in float64. Tolerances per dtype: tests/helpers.OUT_TOL and
GRAD_TOL (float32 outputs atol 2e-5 / rtol 1e-4; fp16 2e-3; bf16 1.6e-2; float32 gradients
atol 1e-4 / rtol 1e-3).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import chunkmem
from helpers import (ATTN_GRAD_NAMES, GRAD_TOL, OUT_TOL, AttnCase, assert_close_tol,
                     assert_grads_close, call_hybrid, make_attn_inputs,
                     out_and_grads, reference_fp64, sdpa_oracle)

BACKENDS = ["torch", "reference"]

# A grid covering the SPEC's corners: GQA, Tq < Tk (decode Tq=1), T not a multiple of chunk_size,
# chunk_size 1 and >= T, mem_len with zeros and full, (3,) and (H, 3) weights, RoPE with
# start_pos > 0, use_global on/off, a custom scale, odd D without RoPE.
CASES = {
    "global_mha": AttnCase(B=2, H=2, G=2, Tq=16, Tk=16, D=8),
    "global_gqa_decode": AttnCase(B=2, H=4, G=2, Tq=1, Tk=13, D=8),
    "global_gqa_prefill_tail": AttnCase(B=1, H=6, G=2, Tq=5, Tk=11, D=4, weights="3"),
    "chunk_not_multiple": AttnCase(Tq=13, Tk=13, chunk_size=4, weights="3"),
    "chunk_size_1": AttnCase(Tq=9, Tk=9, chunk_size=1, weights="H3"),
    "chunk_ge_T": AttnCase(Tq=13, Tk=13, chunk_size=20),
    "chunk_eq_T": AttnCase(Tq=12, Tk=12, chunk_size=12, use_global=False),
    "chunk_only_tq_lt_tk": AttnCase(H=4, G=1, Tq=7, Tk=19, chunk_size=5, use_global=False),
    "mem_zero_and_full": AttnCase(H=4, G=2, Tq=10, Tk=10, chunk_size=3, S=4, mem_len=(0, 4),
                                  weights="H3"),
    "mem_partial": AttnCase(B=3, Tq=6, Tk=6, S=5, mem_len=(2, 5, 1), weights="3"),
    "mem_len_none": AttnCase(Tq=6, Tk=9, chunk_size=4, S=3),
    "mem_only": AttnCase(B=3, Tq=5, Tk=5, S=6, mem_len=(0, 6, 3), use_global=False),
    "rope_start_pos": AttnCase(H=6, G=2, Tq=5, Tk=12, D=8, chunk_size=4, S=3, mem_len=(1, 3),
                               weights="H3", rope_base=10000.0, start_pos=37),
    "rope_small_base": AttnCase(Tq=10, Tk=10, D=6, rope_base=10.0, start_pos=3, chunk_size=3),
    "decode_no_global": AttnCase(H=4, G=2, Tq=1, Tk=14, chunk_size=3, S=4, mem_len=(2, 0),
                                 use_global=False, rope_base=500.0, start_pos=5, weights="H3"),
    "scale_custom": AttnCase(Tq=7, Tk=7, chunk_size=2, S=2, weights="3", scale=0.2),
    "odd_D_no_rope": AttnCase(Tq=6, Tk=8, D=5, chunk_size=3, S=2, mem_len=(1, 2)),
    "weights_on_off_path": AttnCase(Tq=6, Tk=6, S=3, mem_len=(3, 1), weights="3"),
}
CASE_IDS = list(CASES)


def _dout(case: AttnCase, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.B, case.H, case.Tq, case.D, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- peer checks (SDPA)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,G", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("T", [1, 7, 32])
def test_global_only_equals_sdpa_causal(backend, H, G, T):
    """Only the global path on: out == F.scaled_dot_product_attention(is_causal=True) (Tq == Tk)."""
    g = torch.Generator().manual_seed(T * 100 + H * 10 + G)
    q = torch.randn(2, H, T, 16, generator=g)
    k, v = torch.randn(2, G, T, 16, generator=g), torch.randn(2, G, T, 16, generator=g)
    out = chunkmem.hybrid_attention(q, k, v, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G != H)
    assert out.dtype == q.dtype
    assert_close_tol(out, expected, OUT_TOL[torch.float32], "global vs SDPA")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,C", [(16, 4), (13, 4), (9, 1), (7, 7), (5, 8)])
@pytest.mark.parametrize("H,G", [(2, 2), (4, 2)])
def test_chunk_only_equals_sdpa_block_diagonal(backend, T, C, H, G):
    """Only the chunk path on: out == SDPA with the block-diagonal causal boolean mask."""
    g = torch.Generator().manual_seed(T * 100 + C)
    q = torch.randn(2, H, T, 8, generator=g)
    k, v = torch.randn(2, G, T, 8, generator=g), torch.randn(2, G, T, 8, generator=g)
    out = chunkmem.hybrid_attention(q, k, v, chunk_size=C, use_global=False, backend=backend)
    block = torch.arange(T) // C
    mask = (block[:, None] == block[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G != H)
    assert_close_tol(out, expected, OUT_TOL[torch.float32], "chunk vs SDPA")


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_only_equals_sdpa_over_last_slots(backend):
    """Only the memory path on: row b attends over its LAST mem_len[b] slots (right-aligned),
    with the un-rotated q even when rope_base is set."""
    B, H, G, S, D = 3, 4, 2, 6, 8
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, 5, D, generator=g)
    k, v = torch.randn(B, G, 5, D, generator=g), torch.randn(B, G, 5, D, generator=g)
    mk, mv = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
    lens = [6, 2, 1]
    out = chunkmem.hybrid_attention(q, k, v, mk, mv, use_global=False, mem_len=torch.tensor(lens),
                                    rope_base=10000.0, start_pos=11, backend=backend)
    for b, L in enumerate(lens):
        expected = F.scaled_dot_product_attention(q[b], mk[b, :, S - L:], mv[b, :, S - L:],
                                                  enable_gqa=True)
        assert_close_tol(out[b], expected, OUT_TOL[torch.float32], f"memory row {b}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq,Tk,start_pos", [(9, 9, 0), (4, 9, 21), (1, 9, 1000)])
def test_rope_follows_spec_formula(backend, Tq, Tk, start_pos):
    """Global path with RoPE == SDPA over q, k rotated by the SPEC's rotate-half formula at
    positions start_pos + j (keys) and start_pos + Tk - Tq + i (queries)."""
    case = AttnCase(H=4, G=2, Tq=Tq, Tk=Tk, D=8, rope_base=100.0, start_pos=start_pos)
    t = make_attn_inputs(case, seed=start_pos)
    out = call_hybrid(case, t, backend)
    assert_close_tol(out, sdpa_oracle(case, t), OUT_TOL[torch.float32], "rope vs formula")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_reference_matches_sdpa_oracle(case_id):
    """chunkmem.reference in float64 equals the independent SDPA-based oracle (checks the
    reference itself, since all other comparisons trust it)."""
    case = CASES[case_id]
    t = make_attn_inputs(case, torch.float64, seed=1)
    assert_close_tol(reference_fp64(case, t), sdpa_oracle(case, t), OUT_TOL[torch.float64],
                     case_id)


# ----------------------------------------------------------------------------- backends vs reference

def check_against_reference(case: AttnCase, backend: str, seed: int = 0):
    """Outputs and gradients (q, k, v, mem_k, mem_v, weights) of float32 inputs through
    ``backend`` vs chunkmem.reference in float64 on the same inputs."""
    t = make_attn_inputs(case, torch.float32, seed)
    dout = _dout(case, seed + 1)
    out, grads = out_and_grads(lambda lv: call_hybrid(case, lv, backend), t, ATTN_GRAD_NAMES, dout)
    exp_out, exp_grads = out_and_grads(lambda lv: reference_fp64(case, lv), t, ATTN_GRAD_NAMES,
                                       dout, torch.float64)
    assert out.dtype == torch.float32
    assert_close_tol(out, exp_out, OUT_TOL[torch.float32], "out")
    assert_grads_close(grads, exp_grads, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_matches_reference_grid(backend, case_id):
    check_against_reference(CASES[case_id], backend)


@st.composite
def attn_cases(draw):
    """Random valid AttnCase: small shapes, every path and option drawn independently."""
    G = draw(st.sampled_from([1, 2]))
    H = G * draw(st.sampled_from([1, 2, 3]))
    Tk = draw(st.integers(1, 20))
    Tq = draw(st.sampled_from([1, Tk, draw(st.integers(1, Tk))]))
    rope = draw(st.booleans())
    D = draw(st.sampled_from([2, 4, 8, 16] if rope else [1, 3, 4, 8]))
    B = draw(st.integers(1, 2))
    chunk_size = draw(st.one_of(st.none(), st.integers(1, Tk + 3)))
    S = draw(st.one_of(st.none(), st.integers(1, 6)))
    mem_len = None
    if S is not None and draw(st.booleans()):
        mem_len = tuple(draw(st.lists(st.integers(0, S), min_size=B, max_size=B)))
    use_global = draw(st.booleans()) or (chunk_size is None and S is None)
    return AttnCase(B=B, H=H, G=G, Tq=Tq, Tk=Tk, D=D, chunk_size=chunk_size, S=S, mem_len=mem_len,
                    use_global=use_global, weights=draw(st.sampled_from(["none", "3", "H3"])),
                    rope_base=draw(st.sampled_from([100.0, 10000.0])) if rope else None,
                    start_pos=draw(st.integers(0, 50)),
                    scale=draw(st.sampled_from([None, 0.3])))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(case=attn_cases(), seed=st.integers(0, 2**16))
def test_matches_reference_fuzz(backend, case, seed):
    check_against_reference(case, backend, seed)


LOW_PRECISION_CASES = ["global_gqa_decode", "chunk_not_multiple", "mem_zero_and_full",
                       "rope_start_pos", "decode_no_global", "mem_only"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", LOW_PRECISION_CASES)
def test_low_precision_output(backend, dtype, case_id):
    """fp16/bf16 inputs: output in q's dtype, within OUT_TOL[dtype] of the float64 reference
    on the same (already rounded) inputs."""
    case = CASES[case_id]
    t = make_attn_inputs(case, dtype, seed=3)
    out = call_hybrid(case, t, backend)
    assert out.dtype == dtype
    assert_close_tol(out, reference_fp64(case, t), OUT_TOL[dtype], f"{case_id} {dtype}")


GRADCHECK_CASES = {
    "all_paths_rope_gqa": AttnCase(B=2, H=4, G=2, Tq=3, Tk=6, D=4, chunk_size=2, S=3, mem_len=(1, 3),
                                   weights="H3", rope_base=100.0, start_pos=5),
    "decode_no_global_empty_row": AttnCase(B=2, H=2, G=1, Tq=1, Tk=5, D=4, chunk_size=3, S=2,
                                           mem_len=(0, 2), use_global=False, weights="3"),
    "global_chunk_scale": AttnCase(B=1, H=2, G=2, Tq=5, Tk=5, D=4, chunk_size=2, weights="3",
                                   scale=0.3),
}


def gradcheck_torch_backend(case: AttnCase, names) -> bool:
    """float64 gradcheck of the torch backend in the inputs ``names`` (others held fixed)."""
    t = make_attn_inputs(case, torch.float64, seed=5)
    names = [n for n in names if t[n] is not None]

    def fn(*xs):
        return call_hybrid(case, {**t, **dict(zip(names, xs))}, "torch")

    inputs = tuple(t[n].detach().requires_grad_(True) for n in names)
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case_id", list(GRADCHECK_CASES))
def test_gradcheck_torch_backend_tensors(case_id):
    """float64 gradcheck in q, k, v, mem_k and mem_v (small shapes)."""
    assert gradcheck_torch_backend(GRADCHECK_CASES[case_id], ("q", "k", "v", "mem_k", "mem_v"))


@pytest.mark.parametrize("case_id", list(GRADCHECK_CASES))
def test_gradcheck_torch_backend_weights(case_id):
    """float64 gradcheck in the path weights ((3,) and (H, 3)): float64 weights must stay float64
    through the op, otherwise the output is only float32-accurate in them."""
    assert gradcheck_torch_backend(GRADCHECK_CASES[case_id], ("weights",))


# ----------------------------------------------------------------------------- properties

@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_is_torch_on_cpu(backend):
    """backend="auto" on CPU tensors is the PyTorch fallback: same output as "torch"."""
    case = CASES["rope_start_pos"]
    t = make_attn_inputs(case, seed=9)
    assert torch.equal(call_hybrid(case, t, "auto"), call_hybrid(case, t, "torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_weights_are_equal_over_paths_on(backend):
    """weights=None == the mean of the single-path outputs of the paths that are on, and a
    weight on a path that is off contributes nothing."""
    case = CASES["mem_zero_and_full"].replace(weights="none")
    t = make_attn_inputs(case, seed=2)
    args = (t["q"], t["k"], t["v"], t["mem_k"], t["mem_v"])
    kw = dict(mem_len=t["mem_len"], backend=backend)
    full = chunkmem.hybrid_attention(*args, chunk_size=3, **kw)
    og = chunkmem.hybrid_attention(*args, chunk_size=3, weights=torch.tensor([1.0, 0.0, 0.0]), **kw)
    oc = chunkmem.hybrid_attention(*args, chunk_size=3, weights=torch.tensor([0.0, 1.0, 0.0]), **kw)
    om = chunkmem.hybrid_attention(*args, chunk_size=3, weights=torch.tensor([0.0, 0.0, 1.0]), **kw)
    assert_close_tol(full, (og + oc + om) / 3, OUT_TOL[torch.float32], "equal weights")
    # chunk path off: its weight (here 5.0) must be ignored; the other two keep theirs
    off = chunkmem.hybrid_attention(*args, weights=torch.tensor([0.5, 5.0, 0.25]), **kw)
    assert_close_tol(off, 0.5 * og + 0.25 * om, OUT_TOL[torch.float32], "off path weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq,Tk", [(12, 12), (3, 12)])
def test_rope_invariant_to_start_pos(backend, Tq, Tk):
    """Global (and chunk) scores depend only on relative positions: shifting start_pos leaves
    the output unchanged (fp32 tolerance; positions up to ~3000). Chunks are counted by
    position, so with the chunk path on only shifts by whole chunks keep the same chunks."""
    case = AttnCase(H=4, G=2, Tq=Tq, Tk=Tk, D=16, chunk_size=5, rope_base=10000.0)
    t = make_attn_inputs(case, seed=4)
    for c, shifts in ((case, (5, 20, 3000)), (case.replace(chunk_size=None), (1, 17, 3001))):
        base = call_hybrid(c, t, backend)
        for sp in shifts:
            shifted = call_hybrid(c.replace(start_pos=sp), t, backend)
            assert_close_tol(shifted, base, dict(atol=1e-4, rtol=1e-4), f"start_pos={sp}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["global_mha", "chunk_not_multiple", "mem_zero_and_full",
                                     "rope_start_pos", "chunk_size_1"])
def test_decode_matches_last_rows_of_full_pass(backend, case_id):
    """Bottom-right alignment: the last m query rows of a Tq == Tk pass equal a call with only
    those m queries and the same keys (m = 1: decode; m = 3: chunked prefill)."""
    case = CASES[case_id].replace(Tq=CASES[case_id].Tk)
    t = make_attn_inputs(case, seed=6)
    full = call_hybrid(case, t, backend)
    for m in (1, 3):
        part = call_hybrid(case.replace(Tq=m), {**t, "q": t["q"][:, :, -m:]}, backend)
        assert_close_tol(part, full[:, :, -m:], OUT_TOL[torch.float32], f"last {m} rows")


# ----------------------------------------------------------------------------- fully masked rows

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_memory_only_empty_rows_are_exact_zeros(backend, dtype):
    """Memory path only, mem_len = 0 in some rows: those rows are exactly 0 (no NaN), the other
    rows are not; gradients are finite and zero for everything a fully masked row touches."""
    case = AttnCase(B=3, H=4, G=2, Tq=4, Tk=4, S=5, mem_len=(0, 3, 0), use_global=False,
                    weights="H3")
    t = make_attn_inputs(case, dtype, seed=8)
    lv = {n: (x.detach().requires_grad_(True) if n in ATTN_GRAD_NAMES and x is not None else x)
          for n, x in t.items()}
    out = call_hybrid(case, lv, backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.count_nonzero(out[1]) > 0
    out.float().sum().backward()
    for n in ("q", "mem_k", "mem_v", "weights"):
        assert torch.isfinite(lv[n].grad).all(), n
    for n in ("q", "mem_k", "mem_v"):
        assert torch.count_nonzero(lv[n].grad[0]) == 0 and torch.count_nonzero(lv[n].grad[2]) == 0, n
    assert torch.count_nonzero(lv["mem_v"].grad[1]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_without_memory_slots_are_finite(backend):
    """mem_len = 0 for every row with other paths on: finite output equal to the output with no
    memory path and the memory weight dropped, finite gradients."""
    case = AttnCase(H=4, G=2, Tq=6, Tk=6, chunk_size=2, S=3, mem_len=(0, 0), weights="H3")
    t = make_attn_inputs(case, seed=10)
    dout = _dout(case)
    out, grads = out_and_grads(lambda lv: call_hybrid(case, lv, backend), t, ATTN_GRAD_NAMES, dout)
    assert all(torch.isfinite(gr).all() for gr in grads.values())
    no_mem = call_hybrid(case.replace(S=None, mem_len=None),
                         {**t, "mem_k": None, "mem_v": None, "mem_len": None}, backend)
    assert_close_tol(out, no_mem, OUT_TOL[torch.float32], "mem_len=0 vs no memory")
