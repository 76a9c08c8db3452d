"""Fused Triton hybrid attention vs the reference, forward and every gradient.

Runs in the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 when there is no
GPU), in fp32 and fp16 with small shapes; bf16 is not testable there (interpreter bf16 dots are
wrong), it is covered by `python -m chunkmem.compile_check` only.

Tolerance (FlashAttention's rule): for the output and each gradient,
    max|kernel - ref64| <= 2 * max|ref_low - ref64| + FLOOR[dtype] * max(1, max|ref64|)
where ref64 is the reference computed in float64 and ref_low the reference computed entirely in
the test dtype (fp32 or fp16) -- the error a plain PyTorch implementation makes in that precision
(the torch backend is not that comparator on CPU: it computes fp16 inputs in fp32 there).
test_weight_mixes applies the rule to path-weight mixes that stress the backward's derived
row statistic: one path at 0.9 or at 0.01, rows whose paths see a single key, global off.
FLOOR: fp32 2e-6, fp16 2e-3, bf16 1.6e-2 (8x fp16's: 3 fewer mantissa bits), relative to the
magnitude of the reference. bf16 runs on a GPU only (test_bf16_on_gpu).
"""
import math
import os

import pytest
import torch

from chunkmem import triton_attention as ta
from chunkmem.reference import hybrid_attention_reference
from chunkmem.triton_env import TRITON_DTYPE

pytestmark = pytest.mark.interpreter

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_NAMES = ("q", "k", "v", "mem_k", "mem_v", "weights")


def make_inputs(dtype, B, H, G, Tq, Tk, D, S, mem_len, chunk_size, use_global, seed=0):
    """Random normalized arguments; weights zero for paths that are off (as chunkmem.ops gives)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEVICE, dtype)

    q, k, v = rnd(B, H, Tq, D), rnd(B, G, Tk, D), rnd(B, G, Tk, D)
    mem_k = mem_v = ml = None
    if S > 0:
        mem_k, mem_v = rnd(B, G, S, D), rnd(B, G, S, D)
        ml = torch.tensor(mem_len, dtype=torch.int64, device=DEVICE)
    on = torch.tensor([use_global, chunk_size is not None, S > 0], dtype=torch.float32)
    weights = (torch.rand(H, 3, generator=gen) + 0.25) * on
    return [q, k, v, mem_k, mem_v, weights.to(DEVICE), ml]


def run(fn, args, kwargs, dout, **extra):
    """Output and the gradients of (out * dout).sum() w.r.t. the six differentiable inputs
    (zeros for an input that does not reach the output, None for an absent one); with
    dout=None, the output alone (no gradients: six Nones)."""
    if dout is None:
        with torch.no_grad():
            return fn(*args, **kwargs, **extra), [None] * 6
    leaves = [a.detach().clone().requires_grad_(True) if i < 6 and a is not None else a
              for i, a in enumerate(args)]
    out = fn(*leaves, **kwargs, **extra)
    diff = [a for a in leaves[:6] if a is not None]
    grads = iter(torch.autograd.grad((out.float() * dout.float()).sum(), diff, allow_unused=True))
    res = []
    for a in leaves[:6]:
        g = next(grads) if a is not None else None
        res.append(torch.zeros_like(a) if (a is not None and g is None) else g)
    return out, res


def check_case(dtype, B, H, G, Tq, Tk, D, S=0, mem_len=None, chunk_size=None, use_global=True,
               rope_base=None, start_pos=0, seed=0, weights=None):
    args = make_inputs(dtype, B, H, G, Tq, Tk, D, S, mem_len, chunk_size, use_global, seed)
    if weights is not None:  # (w_g, w_c, w_m) for every head
        args[5] = torch.tensor([weights] * H, dtype=torch.float32, device=DEVICE)
    kwargs = dict(chunk_size=chunk_size, use_global=use_global, rope_base=rope_base,
                  start_pos=start_pos, scale=1.0 / math.sqrt(D))
    assert ta.unsupported_reason(*args, **kwargs) is None
    dout = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    # On a GPU, D = 256 has a forward kernel but no spill-free backward: calls that need
    # gradients are routed to the torch backend (asserted here), so only the forward is compared.
    leaves = [a.detach().requires_grad_(True) if i < 6 and a is not None else a for i, a in enumerate(args)]
    if DEVICE == "cpu" or all(ta.has_gpu_config(kind, dtype, D) for kind in ta.BACKWARD_KINDS):
        assert ta.unsupported_reason(*leaves, **kwargs) is None
    else:
        assert "backward" in ta.unsupported_reason(*leaves, **kwargs)
        dout = None
    out, _grads = check_against_reference(args, kwargs, dout)
    assert out.dtype == dtype and out.shape == (B, H, Tq, D)


def check_against_reference(args, kwargs, dout):
    """Kernel output and gradients (see run) vs the reference, by the rule of the module
    docstring, for the dtype of q = args[0]; returns the kernel's (out, grads)."""
    dtype = args[0].dtype
    out, grads = run(ta.hybrid_attention_triton, args, kwargs, dout)
    ref64, g64 = run(hybrid_attention_reference, args, kwargs, dout, compute_dtype=torch.float64)
    refl, gl = run(hybrid_attention_reference, args, kwargs, dout, compute_dtype=dtype)
    pairs = [("out", out, ref64, refl)] + [
        (n, g, r, l) for n, g, r, l in zip(GRAD_NAMES, grads, g64, gl) if g is not None]
    for name, got, r64, rlow in pairs:
        assert got.shape == r64.shape and got.dtype == r64.dtype, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        err = (got.double() - r64.double()).abs().max().item()
        err_low = (rlow.double() - r64.double()).abs().max().item()
        bound = 2 * err_low + FLOOR[dtype] * max(1.0, r64.double().abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (low-precision ref {err_low:.3g})"
    return out, grads


# (dtype, B, H, G, Tq, Tk, D, S, mem_len, chunk_size, use_global, rope_base, start_pos)
# Interpreter blocks are 16 x 16, so T = 37 spans three partial blocks, chunk_size 16/32 is a
# multiple of the block and 5/7/12 is not.
F32, F16 = torch.float32, torch.float16
CASES = {
    "all_paths_f32": (F32, 2, 4, 2, 37, 37, 32, 20, (0, 13), 7, True, 10000.0, 3),
    "all_paths_f16": (F16, 2, 4, 2, 37, 37, 32, 20, (0, 13), 7, True, 10000.0, 3),
    "d64_chunk_block_multiple_f16": (F16, 1, 2, 2, 40, 40, 64, 0, None, 16, True, 10000.0, 0),
    "d128_tq_lt_tk_local_f32": (F32, 1, 2, 1, 20, 33, 128, 8, (8,), 5, False, 500.0, 7),
    "d128_all_paths_f16": (F16, 1, 2, 1, 21, 21, 128, 6, (4,), 12, True, 10000.0, 0),
    "d256_global_mem_f16": (F16, 1, 1, 1, 24, 24, 256, 5, (3,), None, True, None, 0),
    "d256_local_rope_f32": (F32, 1, 1, 1, 18, 18, 256, 0, None, 8, False, 10000.0, 2),
    "decode_f16": (F16, 2, 2, 1, 1, 50, 32, 12, (0, 12), 16, True, 10000.0, 100),
    "decode_local_only_f32": (F32, 1, 2, 2, 1, 45, 64, 0, None, 32, False, 10000.0, 5),
    "chunk1_local_only_f32": (F32, 1, 2, 1, 19, 19, 32, 0, None, 1, False, None, 0),
    "chunk1_global_f16": (F16, 1, 2, 2, 19, 19, 32, 0, None, 1, True, 10000.0, 0),
    "chunk_ge_tk_local_only_f16": (F16, 1, 2, 1, 23, 30, 32, 0, None, 100, False, 10000.0, 0),
    "global_only_gqa3_f32": (F32, 1, 6, 2, 35, 35, 32, 0, None, None, True, None, 0),
    "global_only_f16": (F16, 2, 2, 2, 33, 33, 64, 0, None, None, True, None, 0),
    "chunked_prefill_f16": (F16, 1, 4, 1, 19, 50, 32, 3, (2,), 12, True, 10000.0, 30),
    "chunk32_mqa_f32": (F32, 1, 4, 1, 48, 48, 32, 0, None, 32, True, 10000.0, 0),
    "memory_only_s1024_f32": (F32, 3, 2, 1, 5, 5, 32, 1024, (1024, 0, 500), None, False, None, 0),
    "memory_only_s1024_f16": (F16, 2, 2, 2, 3, 3, 32, 1024, (1000, 17), None, False, None, 0),
    "memory_all_empty_f32": (F32, 2, 2, 1, 17, 17, 32, 4, (0, 0), 4, True, None, 0),
    "memory_one_slot_f16": (F16, 2, 2, 1, 17, 20, 32, 1, (1, 0), 6, False, 10000.0, 0),
    # without the global path, key (query) blocks inside every row's chunk run unmasked: chunks
    # of 2-3 blocks, aligned (32) or not (40, start_pos 13, Tq < Tk), decode
    "linear_interior_f32": (F32, 1, 2, 1, 70, 70, 32, 5, (5,), 32, False, 10000.0, 0),
    "linear_interior_phase_f16": (F16, 2, 4, 2, 61, 75, 32, 4, (4, 0), 40, False, 10000.0, 13),
    "linear_interior_decode_f32": (F32, 1, 2, 1, 1, 75, 32, 0, None, 50, False, 10000.0, 9),
    # dmem splits the query blocks over programs (2 and 3 splits, the last one short)
    "memory_query_split_f32": (F32, 1, 2, 1, 70, 70, 32, 6, (5,), 9, False, 10000.0, 0),
    "memory_query_split_gqa_f16": (F16, 1, 4, 2, 100, 100, 32, 5, (5,), None, True, None, 0),
    # RoPE angles are exact fixed point in the kernel: far positions stay as accurate as near ones
    "far_positions_f32": (F32, 1, 2, 1, 20, 26, 64, 3, (2,), 6, True, 10000.0, 10 ** 6),
    "int32_limit_positions_f32": (F32, 1, 2, 2, 9, 9, 32, 0, None, 4, True, 500000.0, 2 ** 31 - 10),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients(case):
    dtype, B, H, G, Tq, Tk, D, S, ml, C, glob, rope, sp = CASES[case]
    check_case(dtype, B, H, G, Tq, Tk, D, S, ml, C, glob, rope, sp)


# Path weight mixes (the backward derives one path's row statistic from the output, so a path
# with a small weight, a dominant one, or rows with a single key stress its precision), fp16:
# (B, H, G, Tq, Tk, D, S, mem_len, chunk_size, use_global, rope_base, weights)
WEIGHT_CASES = {
    "dominant_global": (1, 2, 1, 37, 37, 32, 8, (6,), 7, True, 10000.0, (0.9, 0.08, 0.02)),
    "dominant_memory": (1, 2, 1, 37, 37, 32, 8, (6,), 7, True, 10000.0, (0.02, 0.08, 0.9)),
    "global_at_0.01": (1, 2, 1, 37, 37, 32, 8, (6,), 7, True, 10000.0, (0.01, 0.5, 0.49)),
    "chunk_at_0.01": (1, 2, 1, 37, 37, 32, 8, (6,), 7, True, 10000.0, (0.5, 0.01, 0.49)),
    "memory_at_0.01": (1, 2, 1, 37, 37, 32, 8, (6,), 7, True, 10000.0, (0.5, 0.49, 0.01)),
    # chunk_size 1: every row's chunk path sees one key; Tq = Tk = 1: so does the global path
    "single_key_rows": (1, 2, 1, 1, 1, 32, 4, (3,), 1, True, None, (0.4, 0.3, 0.3)),
    "chunk1_rows": (1, 2, 1, 19, 19, 32, 4, (3,), 1, True, None, (0.4, 0.3, 0.3)),
    "no_global_t256": (1, 1, 1, 256, 256, 32, 16, (16,), 16, False, None, (0.0, 0.05, 0.95)),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_weight_mixes(case):
    B, H, G, Tq, Tk, D, S, ml, C, glob, rope, w = WEIGHT_CASES[case]
    check_case(F16, B, H, G, Tq, Tk, D, S, ml, C, glob, rope, 0, seed=3, weights=w)


@pytest.mark.parametrize("case", ["all_paths_f16", "d128_all_paths_f16", "d256_global_mem_f16",
                                  "decode_f16", "chunked_prefill_f16", "memory_only_s1024_f16"])
def test_bf16_on_gpu(case):
    """bf16 against the same bound (FLOOR[bf16]); the interpreter's bf16 tl.dot is wrong, so on
    CPU bf16 is only compile-checked (python -m chunkmem.compile_check)."""
    if DEVICE != "cuda":
        pytest.skip("bf16 needs a GPU: the Triton interpreter's bf16 tl.dot is wrong")
    _, *shape = CASES[case]
    check_case(torch.bfloat16, *shape)


@pytest.mark.parametrize("blocks, key_major", [((32, 16), False), ((16, 32), True)])
def test_rectangular_blocks(monkeypatch, blocks, key_major):
    """GPU configs use BLOCK_M != BLOCK_N: check the block-range logic with both shapes (and the
    key-major dk/dv tiles of the sm_90 configurations), with 16-wide tiles in the masked loops
    (BLOCK_W: 16 keys in the forward against BLOCK_N = 16 / 32, 16 queries in dk/dv against
    BLOCK_M = 32 / 16)."""
    bm, bn = blocks
    monkeypatch.setattr(ta, "block_config", lambda kind, dtype, d, interpret=None, arch=80, **kw: dict(
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1, KEY_MAJOR=key_major, BLOCK_W=16))
    check_case(F32, 1, 2, 1, 45, 53, 32, 37, (21,), 12, True, 10000.0, 1)
    check_case(F16, 1, 2, 2, 40, 40, 32, 0, None, 20, False, 10000.0, 0)


@pytest.mark.parametrize("dtype, D, T, arch", [
    (F16, 32, 70, 80), (F16, 64, 150, 80), (F32, 128, 40, 80), (F16, 128, 140, 80),
    (F16, 32, 150, 90), (F16, 64, 150, 90), (F16, 128, 100, 90)])
def test_gpu_block_configs(monkeypatch, dtype, D, T, arch):
    """The GPU launch configurations of an arch in the interpreter (their tile shapes exercise
    the block-range logic): fp16 at D = 32 (sm_80's 64 x 32 tiles), the 128-row tiles of sm_80
    at D = 64 / 128 and of sm_90 at D = 32 / 64 / 128 over two query tiles where T > 128, and
    fp32 at D = 128; with and without the global path."""
    real = ta.block_config
    monkeypatch.setattr(ta, "block_config", lambda kind, dt, d, interpret=None, arch=80, layout="",
                        mode="", _arch=arch: real(kind, dt, d, interpret=False, arch=_arch,
                                                  layout=layout, mode=mode))
    check_case(dtype, 1, 2, 1, T, T + 5, D, 40, (33,), 24, True, 10000.0, 0)
    # linear-cost mode (its own tiles): chunks of 48 hold whole 16- and 32-key blocks
    check_case(dtype, 1, 2, 1, T, T + 5, D, 40, (33,), 48, False, 10000.0, 3)


def test_gpu_config_tables():
    """Every spill-free GPU configuration is a compile variant; every kernel has one for every
    dtype and D except the backward at D = 256."""
    names = {v["name"] for v in ta.compile_variants()}
    for kind in ta.KERNEL_KINDS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for D in ta.SUPPORTED_HEAD_DIMS:
                listed = any(n.startswith(f"attn_{kind}_{TRITON_DTYPE[dtype]}_d{D}_") for n in names)
                expected = not (kind in ta.BACKWARD_KINDS and D == 256)
                assert listed == ta.has_gpu_config(kind, dtype, D) == expected, (kind, dtype, D)
    for v in ta.compile_variants():
        assert list(v["signature"]) == [n for n, _ in ta._kernel_args(v["fn"])]
        assert all(v["signature"][k] == "constexpr" for k in v["constexprs"])


def test_deterministic_and_strided_inputs():
    """Same inputs (one of them a transposed view) -> bitwise-identical outputs and gradients."""
    dtype = torch.float32
    args = make_inputs(dtype, 1, 4, 2, 33, 33, 32, 9, (7,), 8, True)
    kwargs = dict(chunk_size=8, use_global=True, rope_base=10000.0, start_pos=0, scale=0.2)
    dout = torch.randn(1, 4, 33, 32).to(DEVICE, dtype)
    out1, g1 = run(ta.hybrid_attention_triton, args, kwargs, dout)
    strided = list(args)
    strided[0] = args[0].transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) storage
    assert not strided[0].is_contiguous()
    out2, g2 = run(ta.hybrid_attention_triton, strided, kwargs, dout)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    ref = hybrid_attention_reference(*args, **kwargs, compute_dtype=torch.float64)
    assert (out1.double() - ref.double()).abs().max().item() < 1e-4


def test_partial_requires_grad():
    """Only some inputs require grad: the backward skips the other kernels, the rest is exact."""
    args = make_inputs(torch.float32, 2, 2, 1, 21, 21, 32, 6, (3, 6), 5, True)
    kwargs = dict(chunk_size=5, use_global=True, rope_base=10000.0, start_pos=0, scale=0.2)
    dout = torch.randn(2, 2, 21, 32).to(DEVICE)
    grads = {}
    for name, fn, extra in (("kernel", ta.hybrid_attention_triton, {}),
                            ("ref", hybrid_attention_reference, dict(compute_dtype=torch.float64))):
        leaves = list(args)
        leaves[0] = args[0].clone().requires_grad_(True)  # q
        leaves[4] = args[4].clone().requires_grad_(True)  # mem_v
        out = fn(*leaves, **kwargs, **extra)
        grads[name] = torch.autograd.grad((out.double() * dout.double()).sum(), (leaves[0], leaves[4]))
    for got, ref in zip(grads["kernel"], grads["ref"]):
        assert (got.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("paths", ["all", "chunk_mem", "mem_only", "global_only"])
def test_weights_only_gradient(paths):
    """Only the path weights require grad: dweights still needs the dq kernel (it sums the
    derived path's rowsum(dO * O_p)); checked for each choice of derived path."""
    glob, chunk, S = {"all": (True, 5, 6), "chunk_mem": (False, 5, 6), "mem_only": (False, None, 6),
                      "global_only": (True, None, 0)}[paths]
    args = make_inputs(torch.float32, 2, 2, 1, 21, 21, 32, S, (3, 6) if S else None, chunk, glob)
    kwargs = dict(chunk_size=chunk, use_global=glob, rope_base=10000.0, start_pos=0, scale=0.2)
    dout = torch.randn(2, 2, 21, 32).to(DEVICE)
    grads = {}
    for name, fn, extra in (("kernel", ta.hybrid_attention_triton, {}),
                            ("ref", hybrid_attention_reference, dict(compute_dtype=torch.float64))):
        leaves = list(args)
        leaves[5] = args[5].clone().requires_grad_(True)
        out = fn(*leaves, **kwargs, **extra)
        grads[name], = torch.autograd.grad((out.double() * dout.double()).sum(), leaves[5])
    assert (grads["kernel"].double() - grads["ref"]).abs().max().item() < 1e-4


def test_saved_activations_are_per_row_statistics():
    """SPEC §1: beyond inputs and output, the backward keeps O(B*H*Tq) memory: the only saved
    tensor that is not an input or the output is the (B, H, 3, Tq) fp32 LSE."""
    B, H, Tq = 1, 4, 37
    args = make_inputs(torch.float16, B, H, 2, Tq, Tq, 32, 20, (13,), 7, True)
    leaves = [a.detach().clone().requires_grad_(True) if i < 6 and a is not None else a
              for i, a in enumerate(args)]
    kwargs = dict(chunk_size=7, use_global=True, rope_base=10000.0, start_pos=0, scale=0.2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ta.hybrid_attention_triton(*leaves, **kwargs)
    known = {a.data_ptr() for a in leaves if a is not None} | {out.data_ptr()}
    extra = [t for t in saved if t.data_ptr() not in known]
    assert [tuple(t.shape) for t in extra] == [(B, H, 3, Tq)]
    assert extra[0].dtype == torch.float32


def test_forward_backward_without_autograd():
    """hybrid_attention_triton_forward/_backward (for the torch.library ops) give the autograd
    output and gradients, bitwise."""
    args = make_inputs(torch.float32, 1, 4, 2, 23, 23, 32, 5, (4,), 6, True)
    kwargs = dict(chunk_size=6, use_global=True, rope_base=10000.0, start_pos=2, scale=0.2)
    dout = torch.randn(1, 4, 23, 32).to(DEVICE)
    out, lse = ta.hybrid_attention_triton_forward(*args, **kwargs)
    assert lse.shape == (1, 4, 3, 23) and lse.dtype == torch.float32
    grads = ta.hybrid_attention_triton_backward(dout, *args, out, lse, **kwargs)
    expected_out, expected = run(ta.hybrid_attention_triton, args, kwargs, dout)
    assert torch.equal(out, expected_out)
    for got, exp in zip(grads, expected):
        assert torch.equal(got, exp)


def test_unsupported_reason():
    kwargs = dict(chunk_size=4, use_global=True, rope_base=None, start_pos=0, scale=0.3)
    ok = make_inputs(torch.float32, 1, 2, 1, 8, 8, 32, 0, None, 4, True)
    assert ta.unsupported_reason(*ok, **kwargs) is None
    for D in (16, 48, 512):
        bad = make_inputs(torch.float32, 1, 2, 1, 8, 8, D, 0, None, 4, True)
        assert "head dim" in ta.unsupported_reason(*bad, **kwargs)
    f64 = [a.double() if a is not None and a.is_floating_point() else a for a in ok]
    assert "dtype" in ta.unsupported_reason(*f64, **kwargs)
    if DEVICE == "cpu":
        bf16 = [a.bfloat16() if i < 5 and a is not None else a for i, a in enumerate(ok)]
        assert "interpreter" in ta.unsupported_reason(*bf16, **kwargs)
    # The grid is (blocks, B, H): B * H may exceed 65535 (the limit of one CUDA grid axis);
    # B or H alone may not.
    many = make_inputs(torch.float32, 700, 100, 100, 1, 1, 32, 0, None, 4, True)
    assert ta.unsupported_reason(*many, **kwargs) is None
    too_many = make_inputs(torch.float32, 65536, 1, 1, 1, 1, 32, 0, None, 4, True)
    assert "65535" in ta.unsupported_reason(*too_many, **kwargs)
