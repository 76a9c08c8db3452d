"""The "torch" backend's fast paths (chunkmem/torch_backend.py) against the plain forms they
replace and the float64 reference:

- the cached RoPE tables hold exactly chunkmem.reference.rope_cos_sin's values, at any start
  position, after the cache grew or dropped entries; the fused rotation equals apply_rope and
  its gradient is the inverse rotation (gradcheck);
- the memory path without a mask (every slot valid) equals the masked path with an all-True mask,
  and folding the weights into the slot values equals weighting the output;
- the no-gradient CPU forward by tiles (batch row, kv heads, query rows) equals the reference (and the unblocked
  forward) over the layouts that move block boundaries around: Tq < Tk, start_pos off a chunk
  boundary, GQA, rows without memory, the global path on, a chunk longer than the sequence.

Tolerances are tests/helpers.OUT_TOL (float32 outputs atol 2e-5 / rtol 1e-4, float64 1e-10 /
1e-8); the blocked and unblocked forwards compute every row with the same operations, so they are
compared at float32 rounding (atol 1e-6).
"""
from __future__ import annotations

import pytest
import torch

import chunkmem.torch_backend as tb
from chunkmem.reference import apply_rope, rope_cos_sin
from helpers import OUT_TOL, AttnCase, assert_close_tol, call_hybrid, make_attn_inputs, reference_fp64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_tables_equal_reference(dtype):
    tb._ROPE_TABLES.clear()
    for start, T in [(0, 5), (3, 17), (1000, 40), (5000, 3), (0, 2048)]:  # the table grows twice
        cos_full, sin = tb._rope_tables(start, T, 8, 500.0, dtype, torch.device("cpu"))
        cos, sin_ref = rope_cos_sin(torch.arange(start, start + T), 8, 500.0, dtype)
        assert torch.equal(sin, sin_ref)
        assert torch.equal(cos_full, torch.cat((cos, cos), dim=-1))
    for base in (10.0, 20.0, 30.0, 40.0, 50.0):  # more (D, base, ...) keys than the cache keeps
        tb._rope_tables(0, 4, 4, base, dtype, torch.device("cpu"))
    assert len(tb._ROPE_TABLES) == tb._ROPE_TABLES_KEPT
    cos_full, sin = tb._rope_tables(7, 9, 4, 10.0, dtype, torch.device("cpu"))  # rebuilt
    cos, sin_ref = rope_cos_sin(torch.arange(7, 16), 4, 10.0, dtype)
    assert torch.equal(sin, sin_ref) and torch.equal(cos_full, torch.cat((cos, cos), dim=-1))


def test_rotation_equals_apply_rope_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64)
    cos_full, sin = tb._rope_tables(5, 11, 8, 100.0, torch.float64, torch.device("cpu"))
    cos = cos_full[:, :4]
    torch.testing.assert_close(tb._Rope.apply(x, cos_full, sin, 1), apply_rope(x, cos, sin),
                               atol=1e-14, rtol=0)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous input
    out = tb._Rope.apply(x_t, cos_full, sin, 1)
    assert out.is_contiguous()
    torch.testing.assert_close(out, apply_rope(x, cos, sin), atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(lambda t: tb._Rope.apply(t, cos_full, sin, 1),
                                    (x.clone().requires_grad_(),))


def test_tables_built_in_inference_mode_serve_autograd():
    tb._ROPE_TABLES.clear()
    case = AttnCase(B=1, H=2, G=2, Tq=6, Tk=6, D=8, chunk_size=4, rope_base=123.0)
    t = make_attn_inputs(case)
    with torch.inference_mode():
        call_hybrid(case, t, "torch")
    q = t["q"].clone().requires_grad_()
    call_hybrid(case, dict(t, q=q), "torch").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("G", [4, 2])
def test_memory_path_without_mask_and_folded_weights(G):
    g = torch.Generator().manual_seed(1)
    B, H, T, S, D = 2, 4, 9, 5, 8
    q = torch.randn(B, H, T, D, generator=g)
    mem_k, mem_v = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
    w = torch.rand(H, generator=g)
    full = torch.full((B,), S)
    ops = tb._memory_operands(mem_k, mem_v, full, w, H, fold=True)
    assert ops[2] is None and ops[3] is None  # no mask, no row factor
    fast = tb._memory_attention(q, ops, w, 0.3, True, q.dtype)
    mk, mv = (x.repeat_interleave(H // G, dim=1) for x in (mem_k, mem_v))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    masked = torch.nn.functional.scaled_dot_product_attention(q, mk, mv, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(fast, masked * w.view(1, H, 1, 1), atol=1e-6, rtol=1e-5)
    unfolded = tb._memory_attention(q, tb._memory_operands(mem_k, mem_v, full, w, H, fold=False),
                                    w, 0.3, False, q.dtype)
    torch.testing.assert_close(fast, unfolded, atol=1e-6, rtol=1e-5)


BLOCK_CASES = {
    "rope_mem": AttnCase(B=2, H=4, G=4, Tq=200, Tk=200, D=8, chunk_size=16, S=5, use_global=False,
                         weights="H3", rope_base=10000.0),
    "rope_mem_offsets_gqa": AttnCase(B=2, H=4, G=2, Tq=150, Tk=231, D=8, chunk_size=16, S=5,
                                     mem_len=(0, 3), use_global=False, weights="H3",
                                     rope_base=500.0, start_pos=37),
    "global_rope_mem": AttnCase(B=1, H=2, G=1, Tq=97, Tk=130, D=8, chunk_size=8, S=3,
                                weights="H3", rope_base=100.0, start_pos=5),
    "chunk_no_rope": AttnCase(B=2, H=2, G=2, Tq=190, Tk=190, D=4, chunk_size=12, use_global=False,
                              start_pos=7),
    "mem_only": AttnCase(B=2, H=2, G=1, Tq=120, Tk=120, D=8, S=4, mem_len=(4, 2), use_global=False),
    "chunk_longer_than_T": AttnCase(B=1, H=2, G=2, Tq=60, Tk=70, D=8, chunk_size=256, S=2,
                                    use_global=False, rope_base=100.0, start_pos=3),
}


@pytest.fixture
def one_thread():
    """The tiled forward runs with one intra-op thread only."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case_id", list(BLOCK_CASES))
def test_blocked_forward_matches_reference(monkeypatch, one_thread, case_id, dtype):
    case = BLOCK_CASES[case_id]
    t = make_attn_inputs(case, dtype=dtype, seed=3)
    elt = t["q"].element_size()
    tiles = [  # (_BLOCK_BYTES, _MAX_TILES, what a tile is)
        (1, 10**9, "one chunk of rows of one kv group"),
        (case.Tq * case.H // case.G * case.D * elt * 5 // 2, 10**9, "whole sequences of two kv groups"),
        (case.H // case.G * case.D * elt * 40, 10**9, "row ranges (or whole sequences) of one kv group"),
        (1, 3, "a third of the queries (the cap on the number of tiles)"),
    ]
    with torch.no_grad():
        whole = call_hybrid(case, t, "torch")  # no tiles (small tensors): the unblocked forward
        got = {}
        for size, most, what in tiles:
            monkeypatch.setattr(tb, "_BLOCK_BYTES", size)
            monkeypatch.setattr(tb, "_MAX_TILES", most)
            got[what] = call_hybrid(case, t, "torch")
    expected = reference_fp64(case, t).to(dtype)
    assert_close_tol(whole, expected, OUT_TOL[dtype], case_id)
    atol = 1e-6 if dtype == torch.float32 else 1e-13
    for what, out in got.items():
        assert_close_tol(out, expected, OUT_TOL[dtype], f"{case_id}, tiles: {what}")
        torch.testing.assert_close(out, whole, atol=atol, rtol=0, msg=f"{case_id}, tiles: {what}")

def test_blocked_forward_only_without_gradients(monkeypatch, one_thread):
    """With a tensor that needs a gradient the forward is the unblocked one (same values), and the
    gradients flow."""
    case = BLOCK_CASES["rope_mem_offsets_gqa"]
    t = make_attn_inputs(case, seed=4)
    monkeypatch.setattr(tb, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(tb, "_MAX_TILES", 10**9)
    with torch.no_grad():
        blocked = call_hybrid(case, t, "torch")
    k = t["k"].clone().requires_grad_()
    out = call_hybrid(case, dict(t, k=k), "torch")
    torch.testing.assert_close(out.detach(), blocked, atol=1e-6, rtol=0)
    out.sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0
