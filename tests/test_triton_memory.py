"""Triton gated FIFO memory update (chunkmem.triton_memory) against the reference (SPEC §2).

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it when there is no CUDA): fp32 and
fp16 only, small shapes (the interpreter has no bf16 tl.dot; bf16 is compile-checked instead).
With CUDA the same tests run the compiled kernels on the GPU, bf16 included.

Expected values: chunkmem.reference.gated_memory_update_reference in float64 from the very same,
already rounded, inputs; gradients by autograd through it with the same upstream gradient.
Tolerances (|got - want| <= atol + rtol * |want|, elementwise):

- float32: out atol 2e-5 / rtol 1e-4 (fp32 math end to end, observed ~3e-7);
  gradients atol 1e-4 / rtol 1e-3 (sums over up to B*n rows and d columns of O(1) terms).
- float16: out atol 3e-3 / rtol 3e-3: the chunk means are rounded to fp16 before the GEMM (unit
  roundoff 2**-11 ~ 4.9e-4, times |W u| <= a few) and the output is rounded to fp16;
  gradients atol 1e-2 / rtol 1e-2: the pre-activation gradients are rounded to fp16 before the
  weight/input GEMMs (as an fp16 nn.Linear does), then summed over B*n rows.
- bfloat16 (GPU only): 8x the fp16 unit roundoff (2**-8): out atol/rtol 2.5e-2, gradients 8e-2.
"""
from __future__ import annotations

import pytest
import torch

from chunkmem.reference import gated_memory_update_reference
from chunkmem.triton_memory import (
    compile_variants, gated_memory_update_triton, unsupported_reason)

# A numpy RuntimeWarning inside the interpreter (e.g. "invalid value") usually means a kernel
# computed on garbage, e.g. memory read outside a tensor under a wrong mask: fail on it (a net
# with holes: garbage that happens to be finite passes, and masked lanes never reach outputs).
pytestmark = [pytest.mark.interpreter, pytest.mark.filterwarnings("error::RuntimeWarning")]

OUT_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
           torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float16: dict(atol=1e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=8e-2, rtol=8e-2)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
DTYPE_IDS = ["fp32", "fp16", "bf16"][:len(DTYPES)]
NAMES = ("memory", "x", "w_gate", "b_gate", "w_cand", "b_cand")


def make_inputs(B, S, T, d, mem_len, dtype, seed=0, garbage=False):
    """memory (B,S,d) with zeros (or, if garbage, random values) in the invalid slots, x (B,T,d),
    weights ~ N(0, 1/d), biases ~ N(0, 1), mem_len int64 (B,)."""
    gen = torch.Generator().manual_seed(seed)
    mem_len = torch.tensor(mem_len, dtype=torch.int64)
    memory = torch.randn(B, S, d, generator=gen)
    valid = torch.arange(S)[None, :] >= (S - mem_len)[:, None]
    if not garbage:
        memory = memory * valid[:, :, None]
    x = torch.randn(B, T, d, generator=gen)
    w_gate = torch.randn(d, d, generator=gen) / d ** 0.5
    w_cand = torch.randn(d, d, generator=gen) / d ** 0.5
    b_gate = torch.randn(d, generator=gen)
    b_cand = torch.randn(d, generator=gen)
    tensors = [t.to(device=DEVICE, dtype=dtype) for t in (memory, x, w_gate, b_gate, w_cand, b_cand)]
    return tensors, mem_len.to(DEVICE)


def assert_close(got, want, tol, what):
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bound = tol["atol"] + tol["rtol"] * want.abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, (f"{what}: max |err| {err.max().item():.3e} exceeds atol {tol['atol']} + "
                        f"rtol {tol['rtol']} * |want| (worst excess {worst:.3e})")


def check_case(B, S, T, d, chunk_size, mem_len, dtype, garbage=False, seed=0):
    """Forward and all six gradients against the float64 reference."""
    tensors, mem_len_t = make_inputs(B, S, T, d, mem_len, dtype, seed=seed, garbage=garbage)
    ins = [t.clone().requires_grad_() for t in tensors]
    out, new_len = gated_memory_update_triton(*ins, chunk_size=chunk_size, mem_len=mem_len_t)
    ref_ins = [t.detach().double().requires_grad_() for t in tensors]
    want, want_len = gated_memory_update_reference(
        *ref_ins, chunk_size=chunk_size, mem_len=mem_len_t, compute_dtype=torch.float64)

    assert out.shape == (B, S, d) and out.dtype == dtype
    assert new_len.dtype == torch.int64 and torch.equal(new_len, want_len.to(new_len.device))
    assert_close(out, want, OUT_TOL[dtype], "new_memory")

    upstream = torch.randn(B, S, d, generator=torch.Generator().manual_seed(seed + 1))
    upstream = upstream.to(device=DEVICE, dtype=dtype)
    grads = torch.autograd.grad(out, ins, upstream)
    want_grads = torch.autograd.grad(want, ref_ins, upstream.double())
    for name, g, wg, t in zip(NAMES, grads, want_grads, tensors):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close(g, wg, GRAD_TOL[dtype], f"d {name}")
    return out, grads


# (B, S, T, d, chunk_size, mem_len)
CASES = {
    "n_equals_S": (2, 4, 10, 24, 3, [0, 2]),
    "n_exceeds_S": (2, 3, 20, 24, 2, [3, 1]),  # 10 new states, only the newest 3 survive
    "partial_fill": (3, 8, 5, 40, 2, [0, 5, 8]),  # n = 3 < S; row 2 drops its 3 oldest slots
    "chunk_longer_than_T": (2, 1, 5, 16, 8, [0, 1]),  # n = 1, S = 1, one short chunk
    "chunk_size_1": (2, 4, 6, 20, 1, [4, 0]),
    "ragged_last_chunk": (1, 6, 11, 33, 4, [3]),  # chunks of 4, 4, 3
    "tiny_d": (2, 1, 9, 5, 2, [1, 0]),  # d = 5 < every block
    "single_token": (1, 2, 1, 8, 1, [2]),  # T = 1
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, dtype):
    check_case(*CASES[case], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_many_summaries_and_wide_d(dtype):
    """n = 70 > 64 carries the recurrence across row tiles; d = 136 spans several column and
    K blocks of every kernel, none of them full."""
    check_case(2, 5, 70, 136, 1, [5, 2], dtype)


def test_long_chunks():
    """C = 40 > the pooling kernel's token block: pooling and dx loop over token blocks."""
    check_case(2, 3, 90, 16, 40, [1, 3], torch.float32)


def test_invalid_slots_do_not_leak():
    """Random (non-zero) values in the invalid slots change nothing: output and gradients still
    match the reference, invalid output slots are exactly zero and get zero gradient."""
    B, S = 3, 6
    out, grads = check_case(B, S, 7, 24, 3, [0, 2, 6], torch.float32, garbage=True)
    new_len = torch.tensor([3, 5, 6])  # min(S, mem_len + 3)
    invalid = torch.arange(S)[None, :] < (S - new_len)[:, None]
    assert torch.all(out.detach().cpu()[invalid] == 0)
    # old slots that were invalid receive no gradient (d memory is zero there)
    old_invalid = torch.arange(S)[None, :] < (S - torch.tensor([0, 2, 6]))[:, None]
    assert torch.all(grads[0].cpu()[old_invalid] == 0)


def test_no_grad_path_matches_grad_path():
    """Without gradients the forward skips storing g, c, m: same output bits."""
    tensors, mem_len = make_inputs(2, 4, 9, 24, [1, 4], torch.float32)
    with torch.no_grad():
        plain, _ = gated_memory_update_triton(*tensors, chunk_size=2, mem_len=mem_len)
    ins = [t.clone().requires_grad_() for t in tensors]
    tracked, _ = gated_memory_update_triton(*ins, chunk_size=2, mem_len=mem_len)
    assert tracked.requires_grad
    assert torch.equal(plain, tracked.detach())


def test_backward_is_deterministic_and_partial():
    """Two backward passes give identical bits; with only x requiring grad, only dx is returned
    and it equals the full run's dx."""
    tensors, mem_len = make_inputs(2, 4, 12, 24, [2, 3], torch.float32)
    runs = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in tensors]
        out, _ = gated_memory_update_triton(*ins, chunk_size=3, mem_len=mem_len)
        runs.append(torch.autograd.grad(out.sum(), ins))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    x = tensors[1].clone().requires_grad_()
    out, _ = gated_memory_update_triton(tensors[0], x, *tensors[2:], chunk_size=3, mem_len=mem_len)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    assert torch.equal(dx, runs[0][1])


def test_unsupported_reason(monkeypatch):
    tensors, mem_len = make_inputs(1, 2, 3, 8, [1], torch.float32)
    kw = dict(chunk_size=2, mem_len=mem_len)
    assert unsupported_reason(*tensors, **kw) is None  # CUDA, or CPU under the interpreter
    bf16 = unsupported_reason(*[t.bfloat16() for t in tensors], **kw)
    if DEVICE == "cpu":
        assert "bfloat16" in bf16 and "interpreter" in bf16
    else:
        assert bf16 is None
    assert "float64" in unsupported_reason(*[t.double() for t in tensors], **kw)
    zero = torch.zeros((), device=DEVICE)
    wide = [zero.expand(*shape) for shape in ((1, 1, 4100), (1, 1, 4100), (4100, 4100), (4100,),
                                              (4100, 4100), (4100,))]
    assert "4096" in unsupported_reason(*wide, **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = [t.cpu() for t in tensors]
    assert "CUDA" in unsupported_reason(*cpu, **kw)


def test_compile_variants_describe_the_kernels():
    """Every variant names each argument of its kernel exactly once, with a type string or
    'constexpr' (and a value for each constexpr); dtypes and both STORE_CTX values appear."""
    variants = compile_variants()
    assert variants
    names = [v["name"] for v in variants]
    assert len(names) == len(set(names))
    for v in variants:
        assert set(v) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}
        assert list(v["signature"]) == list(v["fn"].arg_names), v["name"]
        const = {k for k, t in v["signature"].items() if t == "constexpr"}
        assert const == set(v["constexprs"]), v["name"]
    for tname in ("fp32", "fp16", "bf16"):
        assert any(f".{tname}." in n for n in names)
    fwd = [v for v in variants if ".fwd." in v["name"]]
    assert {v["constexprs"]["STORE_CTX"] for v in fwd} == {False, True}
    assert {v["constexprs"]["BLOCK_K"] for v in fwd} >= {16, 32, 64}  # small and large d
