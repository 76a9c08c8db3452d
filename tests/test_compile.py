"""torch.compile(fullgraph=True) through the chunkmem::hybrid_attention custom op (CPU, torch backend).

Compiled and eager runs execute the same backend code, so outputs and gradients agree to float32
rounding (atol=rtol=1e-5).
"""
import torch

import chunkmem
from chunkmem.library import hybrid_attention_op
from chunkmem.nn import HybridAttention


def test_custom_op_registration_passes_opcheck():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, requires_grad=True)
    v = torch.randn(1, 2, 9, 8, requires_grad=True)
    mk = torch.randn(1, 2, 3, 8, requires_grad=True)
    mv = torch.randn(1, 2, 3, 8, requires_grad=True)
    w = torch.rand(4, 3, requires_grad=True)
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


def test_compiled_op_with_triton_kernels_in_the_interpreter_matches_eager():
    """The same registration with the Triton backend (interpreter on CPU): output and gradients.

    Eager and compiled runs call the same kernels (the compiled backward recomputes the forward),
    so they agree to float32 rounding.
    """
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
    for a, b in zip(torch.autograd.grad(out_comp, inputs, g), torch.autograd.grad(out_eager, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
