"""Numerical tests of chunkmem.gated_memory_update (SPEC §2) for the "torch" and "reference" backends.

Shapes: memory (B, S, d) with valid slots right-aligned; x (B, T, d); w_gate, w_cand (d, d);
b_gate, b_cand (d,); mem_len (B,). The expected values come from ``loop_update`` below: a plain
per-row, per-chunk Python loop in float64 written from the SPEC (independent of chunkmem.reference).
Tolerances per dtype: tests/helpers.OUT_TOL / GRAD_TOL.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import chunkmem
from helpers import (GRAD_TOL, MEM_GRAD_NAMES, OUT_TOL, assert_close_tol, assert_grads_close,
                     call_memory_update, leaves, make_memory_inputs)

BACKENDS = ["torch", "reference"]


def loop_update(memory, x, w_gate, b_gate, w_cand, b_cand, chunk_size, mem_len):
    """SPEC §2, one row and one chunk at a time, in float64.

    memory (B, S, d); x (B, T, d); mem_len (B,) or None (all S valid). Returns
    (new_memory (B, S, d) float64, new_mem_len list of B ints); differentiable in the tensors.
    """
    B, S, d = memory.shape
    T = x.shape[1]
    f = lambda t: t.to(torch.float64)  # noqa: E731
    wg, bg, wc, bc = f(w_gate), f(b_gate), f(w_cand), f(b_cand)
    lens = [S] * B if mem_len is None else [int(n) for n in mem_len]
    rows, new_lens = [], []
    for b in range(B):
        slots = [f(memory[b, s]) for s in range(S - lens[b], S)]  # oldest first
        m = slots[-1] if slots else torch.zeros(d, dtype=torch.float64)
        for start in range(0, T, chunk_size):
            u = f(x[b, start:start + chunk_size]).mean(dim=0)
            g = torch.sigmoid(wg @ u + bg)
            c = torch.tanh(wc @ u + bc)
            m = (1 - g) * m + g * c
            slots.append(m)
        slots = slots[-S:]
        pad = [torch.zeros(d, dtype=torch.float64)] * (S - len(slots))
        rows.append(torch.stack(pad + slots))
        new_lens.append(len(slots))
    return torch.stack(rows), new_lens


def loop_of(t, chunk_size):
    return loop_update(t["memory"], t["x"], t["w_gate"], t["b_gate"], t["w_cand"], t["b_cand"],
                       chunk_size, t["mem_len"])


# (B, S, d, T, chunk_size, mem_len)
CASES = {
    "empty_start": (2, 4, 5, 8, 4, (0, 0)),
    "full": (2, 4, 5, 8, 2, (4, 4)),
    "mixed_T_not_multiple": (3, 5, 3, 7, 3, (0, 2, 5)),
    "n_gt_S": (2, 3, 4, 10, 1, (1, 3)),
    "n_eq_S": (2, 3, 4, 9, 3, (0, 3)),
    "chunk_ge_T": (2, 4, 4, 5, 8, (1, 0)),
    "chunk_1": (1, 6, 3, 4, 1, (2,)),
    "S_1": (2, 1, 3, 5, 2, (0, 1)),
    "mem_len_none": (2, 4, 3, 6, 4, None),
}


def check_against_loop(B, S, d, T, C, mem_len, backend, seed=0):
    """Output, new_mem_len and gradients of all six float32 inputs vs loop_update in float64."""
    t = make_memory_inputs(B, S, d, T, mem_len, torch.float32, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    lv = leaves(t, MEM_GRAD_NAMES)
    new_mem, new_len = call_memory_update(lv, C, backend)
    new_mem.backward(dout.to(new_mem.dtype))
    ref = leaves(t, MEM_GRAD_NAMES, torch.float64)
    exp_mem, exp_len = loop_of(ref, C)
    exp_mem.backward(dout)

    assert new_mem.dtype == torch.float32 and new_mem.shape == (B, S, d)
    assert not new_len.is_floating_point() and new_len.shape == (B,)
    assert new_len.tolist() == exp_len
    assert_close_tol(new_mem.detach(), exp_mem.detach(), OUT_TOL[torch.float32], "new_memory")
    assert_grads_close({n: lv[n].grad for n in MEM_GRAD_NAMES},
                       {n: ref[n].grad for n in MEM_GRAD_NAMES}, GRAD_TOL[torch.float32])


# Without CUDA the kernels also run here, in the interpreter, on this test's CPU tensors (on a
# GPU host they are checked on CUDA tensors by test_triton_memory.py).
@pytest.mark.parametrize("backend", BACKENDS + ([] if torch.cuda.is_available() else ["triton"]))
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_loop_grid(backend, case_id):
    check_against_loop(*CASES[case_id], backend)


@st.composite
def memory_cases(draw):
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    d, T = draw(st.integers(1, 6)), draw(st.integers(1, 20))
    C = draw(st.integers(1, T + 3))
    mem_len = draw(st.one_of(st.none(), st.lists(st.integers(0, S), min_size=B, max_size=B)))
    return B, S, d, T, C, mem_len


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(case=memory_cases(), seed=st.integers(0, 2**16))
def test_matches_loop_fuzz(backend, case, seed):
    check_against_loop(*case, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", ["mixed_T_not_multiple", "n_gt_S", "empty_start"])
def test_low_precision(backend, dtype, case_id):
    """fp16/bf16: new_memory in memory's dtype within OUT_TOL[dtype] of the float64 loop."""
    B, S, d, T, C, mem_len = CASES[case_id]
    t = make_memory_inputs(B, S, d, T, mem_len, dtype, seed=2)
    new_mem, new_len = call_memory_update(t, C, backend)
    exp_mem, exp_len = loop_of(t, C)
    assert new_mem.dtype == dtype
    assert new_len.tolist() == exp_len
    assert_close_tol(new_mem, exp_mem, OUT_TOL[dtype], f"{case_id} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", ["mixed_T_not_multiple", "n_gt_S", "full"])
def test_gradcheck(backend, case_id):
    """float64 gradcheck in memory, x, w_gate, b_gate, w_cand and b_cand."""
    B, S, d, T, C, mem_len = CASES[case_id]
    t = make_memory_inputs(B, S, d, T, mem_len, torch.float64, seed=4)

    def fn(*xs):
        return chunkmem.gated_memory_update(*xs, chunk_size=C, mem_len=t["mem_len"], backend=backend)[0]

    inputs = tuple(t[n].detach().requires_grad_(True) for n in MEM_GRAD_NAMES)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fifo_order_and_eviction(backend):
    """With gates saturated at 1 (m_j = c_j) the n new states are c_0..c_{n-1} in order, the
    newest in the last slot, and the n oldest slots fall out unchanged-shifted."""
    B, S, d, C = 2, 5, 3, 2
    n = 3
    vals = torch.tensor([0.1, 0.2, 0.3])  # chunk j of x is filled with vals[j] (chunk mean = vals[j])
    x = vals.repeat_interleave(C)[None, :, None].expand(B, n * C, d).contiguous()
    memory = torch.arange(B * S * d, dtype=torch.float32).view(B, S, d) / 10
    w_gate, b_gate = torch.zeros(d, d), torch.full((d,), 40.0)  # sigmoid(40) == 1.0 in fp32
    w_cand, b_cand = torch.eye(d), torch.zeros(d)
    new_mem, new_len = chunkmem.gated_memory_update(memory, x, w_gate, b_gate, w_cand, b_cand,
                                                    chunk_size=C, mem_len=torch.tensor([S, S]),
                                                    backend=backend)
    assert new_len.tolist() == [S, S]
    assert torch.equal(new_mem[:, : S - n], memory[:, n:])  # oldest n evicted, rest shifted left
    expected_new = torch.tanh(vals)[None, :, None].expand(B, n, d)
    assert_close_tol(new_mem[:, S - n:], expected_new, OUT_TOL[torch.float32], "new states")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mem_len_grows_and_saturates(backend):
    """Starting from an empty memory, repeated pushes of n states give mem_len n, 2n, ... capped
    at S; the slots not yet written stay exactly zero; the result matches the loop each time."""
    B, S, d, T, C = 2, 7, 3, 6, 2  # n = 3 per push
    t = make_memory_inputs(B, S, d, T, (0, 0), seed=5)
    t["memory"] = torch.zeros(B, S, d)
    for step, expected_len in enumerate([3, 6, 7, 7]):
        t["x"] = torch.randn(B, T, d, generator=torch.Generator().manual_seed(step))
        exp_mem, exp_len = loop_of(t, C)
        new_mem, new_len = call_memory_update(t, C, backend)
        assert new_len.tolist() == [expected_len] * B == exp_len
        assert torch.equal(new_mem[:, : S - expected_len], torch.zeros(B, S - expected_len, d))
        assert_close_tol(new_mem, exp_mem, OUT_TOL[torch.float32], f"step {step}")
        t["memory"], t["mem_len"] = new_mem, new_len


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_row_starts_from_zero_state(backend):
    """A row with mem_len 0 starts the recurrence from m_{-1} = 0, whatever its slots hold:
    its new states equal those computed from an all-zero memory."""
    B, S, d, T, C = 2, 4, 3, 6, 3
    t = make_memory_inputs(B, S, d, T, (0, 0), seed=6)
    zero_mem, _ = call_memory_update({**t, "memory": torch.zeros(B, S, d)}, C, backend)
    garbage = torch.randn(B, S, d, generator=torch.Generator().manual_seed(1))
    new_mem, new_len = call_memory_update({**t, "memory": garbage}, C, backend)
    assert new_len.tolist() == [2, 2]
    assert_close_tol(new_mem[:, -2:], zero_mem[:, -2:], OUT_TOL[torch.float32], "states")
    # and the loop (zero m_{-1}) agrees
    assert_close_tol(zero_mem, loop_of(t, C)[0], OUT_TOL[torch.float32], "zero memory vs loop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mem_len_none_means_all_slots_valid(backend):
    """mem_len=None (the default) reads as all S slots valid, as in SPEC §1."""
    B, S, d, T, C = 2, 4, 3, 5, 2
    t = make_memory_inputs(B, S, d, T, None, seed=7)
    a_mem, a_len = call_memory_update(t, C, backend)
    b_mem, b_len = call_memory_update({**t, "mem_len": torch.tensor([S, S])}, C, backend)
    assert a_len.tolist() == b_len.tolist() == [S, S]
    assert torch.equal(a_mem, b_mem)


def test_auto_is_torch_on_cpu():
    t = make_memory_inputs(2, 4, 3, 7, (1, 4), seed=8)
    a_mem, a_len = call_memory_update(t, 3, "auto")
    b_mem, b_len = call_memory_update(t, 3, "torch")
    assert torch.equal(a_mem, b_mem) and torch.equal(a_len, b_len)
