"""torch.compile(fullgraph=True) through the chunkmem::hybrid_attention and
chunkmem::gated_memory_update custom ops (CPU: torch backend, and the Triton kernels in the
interpreter).

Compiled and eager runs execute the same backend code, so outputs and gradients agree to float32
rounding (atol=rtol=1e-5).
"""
import torch

import chunkmem
from chunkmem.library import gated_memory_update_op, hybrid_attention_op
from chunkmem.nn import HybridAttention

MEMORY_UPDATE = torch.ops.chunkmem.gated_memory_update.default


def attention_leaves(B, H, G, Tq, Tk, S, D, seed):
    """q (B, H, Tq, D), k, v (B, G, Tk, D), mem_k, mem_v (B, G, S, D), weights (H, 3): fp32
    leaves requiring grad."""
    torch.manual_seed(seed)
    shapes = [(B, H, Tq, D), (B, G, Tk, D), (B, G, Tk, D), (B, G, S, D), (B, G, S, D)]
    return [torch.randn(s, requires_grad=True) for s in shapes] + [torch.rand(H, 3, requires_grad=True)]


def test_custom_op_registration_passes_opcheck():
    q, k, v, mk, mv, w = attention_leaves(1, 4, 2, 6, 9, 3, 8, seed=0)
    mem_len = torch.tensor([2], dtype=torch.int32)
    torch.library.opcheck(hybrid_attention_op, (q, k, v, mk, mv, w, mem_len, 4, True, 10000.0, 3, 0.35, "torch"))
    torch.library.opcheck(hybrid_attention_op, (q, k, v, None, None, w, None, None, True, None, 0, 0.35, "torch"))


def test_module_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    layer = HybridAttention(32, 4, n_kv_heads=2, chunk_size=4, memory_slots=3, memory_pool=4)
    x = torch.randn(2, 12, 32, requires_grad=True)
    state = (torch.randn(2, 3, 32), torch.tensor([1, 3]))
    y_eager, (mem_eager, _) = layer(x, state)
    compiled = torch.compile(layer, fullgraph=True)
    y_comp, (mem_comp, _) = compiled(x, state)
    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mem_comp, mem_eager, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(y_eager)
    wrt = [x, layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.path_logits]
    grads_eager = torch.autograd.grad(y_eager, wrt, g)
    grads_comp = torch.autograd.grad(y_comp, wrt, g)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_op_call_matches_eager_for_decode_shape():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 2, 10, 8)
    v = torch.randn(1, 2, 10, 8)

    def f(q, k, v):
        return chunkmem.hybrid_attention(q, k, v, chunk_size=4, rope_base=10000.0, start_pos=5)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), atol=1e-5, rtol=1e-5)


def test_custom_op_with_ranges_passes_opcheck():
    """The SPEC §1b arguments through the op's schema: start_pos as a tensor, kv_start/kv_end,
    and packed documents with cu_seqlens / max_seqlen (torch backend)."""
    q, k, v, mk, mv, w = attention_leaves(2, 4, 2, 5, 9, 3, 8, seed=4)
    mem_len = torch.tensor([2, 0], dtype=torch.int32)
    ranges = dict(start_pos_t=torch.tensor([3, 0]), kv_start=torch.tensor([2, 0], dtype=torch.int32),
                  kv_end=torch.tensor([9, 4], dtype=torch.int32))
    torch.library.opcheck(hybrid_attention_op, (q, k, v, mk, mv, w, mem_len, 4, True, 10000.0, 0, 0.35, "torch"),
                          ranges)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    packed = dict(start_pos_t=torch.tensor([1, 6]), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  max_seqlen_q=3, max_seqlen_k=5)
    args = (q[:1], k[:1], v[:1], mk, mv, w, mem_len, 4, True, 10000.0, 0, 0.35, "torch")
    torch.library.opcheck(hybrid_attention_op, args, packed)


def test_compiled_call_with_ranges_and_start_pos_tensor_matches_eager():
    """fullgraph=True with kv_start/kv_end and a start_pos tensor (torch backend, all paths):
    output and gradients equal eager; the traced graph holds the custom op (no graph break)."""
    q, k, v, mk, mv, _ = attention_leaves(3, 4, 2, 6, 10, 3, 8, seed=5)
    kv_start, kv_end = torch.tensor([0, 3, 5]), torch.tensor([10, 8, 5])
    start_pos = torch.tensor([0, 7, 2])

    def f(q, k, v, mk, mv):
        return chunkmem.hybrid_attention(q, k, v, mk, mv, chunk_size=3, rope_base=10000.0, mem_len=2,
                                         start_pos=start_pos, kv_start=kv_start, kv_end=kv_end,
                                         backend="torch")

    graph_ops = []

    def record(gm, example_inputs):
        graph_ops.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    inputs = (q, k, v, mk, mv)
    torch.compile(f, backend=record, fullgraph=True)(*inputs)
    assert torch.ops.chunkmem.hybrid_attention.default in graph_ops
    out_eager = f(*inputs)
    out_comp = torch.compile(f, fullgraph=True)(*inputs)
    torch.testing.assert_close(out_comp, out_eager, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out_eager)
    for a, b in zip(torch.autograd.grad(out_comp, inputs, g), torch.autograd.grad(out_eager, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_packed_call_matches_eager():
    """fullgraph=True with cu_seqlens and no max_seqlen (the op gets Tq / Tk as bounds)."""
    torch.manual_seed(6)
    q = torch.randn(1, 2, 7, 8, requires_grad=True)
    k = torch.randn(1, 2, 11, 8, requires_grad=True)
    v = torch.randn(1, 2, 11, 8, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 3, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 6, 11], dtype=torch.int32)

    def f(q, k, v):
        return chunkmem.hybrid_attention(q, k, v, chunk_size=2, rope_base=100.0, start_pos=1,
                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")

    out_eager = f(q, k, v)
    out_comp = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out_comp, out_eager, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out_eager)
    for a, b in zip(torch.autograd.grad(out_comp, (q, k, v), g), torch.autograd.grad(out_eager, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_op_with_triton_kernels_in_the_interpreter_matches_eager(monkeypatch):
    """The same registration with the Triton backend (interpreter on CPU): output and gradients.

    Eager and compiled runs call the same kernels, so they agree to float32 rounding. The
    compiled backward starts from the LSE that the forward op returned: it launches no forward
    kernel (counted).
    """
    from chunkmem import triton_attention

    forward_launches = []
    real_forward = triton_attention._forward_impl
    monkeypatch.setattr(triton_attention, "_forward_impl",
                        lambda *a: forward_launches.append(1) or real_forward(*a))
    torch.manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(1, 2, 10, 32), (1, 1, 12, 32), (1, 1, 12, 32), (1, 1, 4, 32), (1, 1, 4, 32)]
    inputs = tuple(torch.randn(s, device=dev, requires_grad=True) for s in shapes)
    inputs += (torch.rand(2, 3, device=dev, requires_grad=True),)
    mem_len = torch.tensor([3], device=dev)

    def f(q, k, v, mk, mv, w):
        return chunkmem.hybrid_attention(q, k, v, mk, mv, weights=w, chunk_size=4, rope_base=10000.0,
                                         mem_len=mem_len, backend="triton")

    out_eager = f(*inputs)
    out_comp = torch.compile(f, fullgraph=True)(*inputs)
    torch.testing.assert_close(out_comp, out_eager, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out_eager)
    launches_before_backward = len(forward_launches)
    grads_comp = torch.autograd.grad(out_comp, inputs, g)
    assert len(forward_launches) == launches_before_backward
    for a, b in zip(grads_comp, torch.autograd.grad(out_eager, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_op_with_triton_backend_passes_opcheck():
    """opcheck of the op with the Triton kernels (interpreter on CPU): its fake implementation
    gives the (B, H, 3, Tq) LSE output, and its autograd registration is consistent."""
    torch.manual_seed(3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 2, 5, 32, device=dev, requires_grad=True)
    k = torch.randn(1, 1, 7, 32, device=dev, requires_grad=True)
    v = torch.randn(1, 1, 7, 32, device=dev, requires_grad=True)
    mk = torch.randn(1, 1, 3, 32, device=dev, requires_grad=True)
    mv = torch.randn(1, 1, 3, 32, device=dev, requires_grad=True)
    w = torch.rand(2, 3, device=dev, requires_grad=True)
    mem_len = torch.tensor([2], dtype=torch.int32, device=dev)
    out, lse = hybrid_attention_op(q, k, v, mk, mv, w, mem_len, 4, True, 10000.0, 2, 0.2, "triton")
    assert lse.shape == (1, 2, 3, 5)
    torch.library.opcheck(hybrid_attention_op,
                          (q, k, v, mk, mv, w, mem_len, 4, True, 10000.0, 2, 0.2, "triton"))
    # paths off: their LSE rows are outputs too and must be deterministic (zeros)
    w_global = torch.tensor([[1.0, 0.0, 0.0]] * 2, device=dev, requires_grad=True)
    args = (q, k, v, None, None, w_global, None, None, True, None, 0, 0.2, "triton")
    out, lse = hybrid_attention_op(*args)
    assert torch.equal(lse[:, :, 1:], torch.zeros_like(lse[:, :, 1:]))
    torch.library.opcheck(hybrid_attention_op, args)


def memory_update_inputs(B, S, T, d, mem_len, device="cpu", seed=0):
    """memory (B, S, d) with zeros in the invalid slots, x (B, T, d), w_gate (d, d), b_gate (d,),
    w_cand (d, d), b_cand (d,), all fp32 and requiring grad; mem_len int64 (B,)."""
    gen = torch.Generator().manual_seed(seed)
    mem_len = torch.tensor(mem_len)
    valid = torch.arange(S)[None, :] >= (S - mem_len)[:, None]
    memory = torch.randn(B, S, d, generator=gen) * valid[:, :, None]
    shapes = [(B, T, d), (d, d), (d,), (d, d), (d,)]
    tensors = [memory] + [torch.randn(s, generator=gen) for s in shapes]
    return [t.to(device).requires_grad_() for t in tensors], mem_len.to(device)


def test_memory_update_op_registration_passes_opcheck():
    # mem_len with an empty row (m_{-1} = 0), a partial and a full one (int32 and int64); first
    # n = 3 > S = 2, so states fall out of the FIFO as they are pushed, then n = 3 < S = 5.
    tensors, mem_len = memory_update_inputs(3, 2, 10, 8, [0, 1, 2])
    torch.library.opcheck(gated_memory_update_op, (*tensors, mem_len.int(), 4, "torch"))
    torch.library.opcheck(gated_memory_update_op, (*tensors, mem_len, 4, "torch"))
    tensors, mem_len = memory_update_inputs(2, 5, 7, 8, [0, 3])
    torch.library.opcheck(gated_memory_update_op, (*tensors, mem_len, 3, "torch"))


def check_compiled_memory_update(backend, device, B, S, T, d, chunk_size, mem_len):
    """Compile a function that calls chunkmem.gated_memory_update with fullgraph=True: the
    traced graph holds the custom op; new memory, new_mem_len and all six gradients match eager."""
    tensors, mem_len = memory_update_inputs(B, S, T, d, mem_len, device=device)

    def f(*tensors):
        new_memory, new_len = chunkmem.gated_memory_update(
            *tensors, chunk_size=chunk_size, mem_len=mem_len, backend=backend)
        return new_memory * 2.0, new_len  # work around the op, for the compiler to fuse

    graph_ops = []

    def record(gm, example_inputs):
        graph_ops.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.compile(f, backend=record, fullgraph=True)(*tensors)
    assert MEMORY_UPDATE in graph_ops

    out_eager, len_eager = f(*tensors)
    out_comp, len_comp = torch.compile(f, fullgraph=True)(*tensors)
    torch.testing.assert_close(out_comp, out_eager, atol=1e-5, rtol=1e-5)
    assert len_comp.dtype == torch.int64 and torch.equal(len_comp, len_eager)
    assert torch.equal(len_eager.cpu(), torch.clamp(mem_len.cpu() + -(-T // chunk_size), max=S))
    g = torch.randn_like(out_eager)
    grads_comp = torch.autograd.grad(out_comp, tensors, g)
    grads_eager = torch.autograd.grad(out_eager, tensors, g)
    for name, a, b in zip(("memory", "x", "w_gate", "b_gate", "w_cand", "b_cand"),
                          grads_comp, grads_eager):
        assert a.abs().sum() > 0, f"d {name} is all zeros"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d {name}: {m}")


def test_compiled_memory_update_matches_eager():
    """Torch backend on CPU; n = 4 > S = 3 and a row with an empty memory."""
    check_compiled_memory_update("torch", "cpu", B=2, S=3, T=13, d=16, chunk_size=4, mem_len=[0, 2])


def test_compiled_memory_update_with_triton_kernels_in_the_interpreter_matches_eager():
    """The same registration with the Triton backend (interpreter on CPU; n = 4 > S = 3, a short
    last chunk): the compiled backward runs gated_memory_update_triton_vjp (recompute + backward
    kernels), eager the autograd Function that saved its context, so they agree to float32
    rounding."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    check_compiled_memory_update("triton", dev, B=2, S=3, T=14, d=16, chunk_size=4, mem_len=[0, 2])
