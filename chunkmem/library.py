"""``torch.library`` registration of the hybrid attention op, for ``torch.compile``.

Eager calls of :func:`chunkmem.hybrid_attention` run the chosen backend directly, with its own
autograd. While ``torch.compile`` traces, the call goes through the custom op
``torch.ops.chunkmem.hybrid_attention`` instead: the compiler sees one opaque node with a
fake (meta) implementation for shapes, so a model using the op compiles with
``fullgraph=True`` and no graph break, whatever the backend (Triton kernels or the PyTorch
fallback).

The op's backward is a second custom op that recomputes the forward and differentiates it
(activation checkpointing of this one op): it keeps the compiled graph free of backend internals,
at the cost of one extra forward of the attention in compiled training.
"""
from __future__ import annotations

from typing import Optional

import torch

from chunkmem.backends import attention_backend

__all__ = ["hybrid_attention_op"]


def _run(backend, q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base,
         start_pos, scale):
    return attention_backend(backend)(
        q, k, v, mem_k, mem_v, weights, mem_len, chunk_size=chunk_size, use_global=use_global,
        rope_base=rope_base, start_pos=start_pos, scale=scale,
    )


@torch.library.custom_op("chunkmem::hybrid_attention", mutates_args=())
def hybrid_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: Optional[torch.Tensor],
    mem_v: Optional[torch.Tensor], weights: torch.Tensor, mem_len: Optional[torch.Tensor],
    chunk_size: Optional[int], use_global: bool, rope_base: Optional[float], start_pos: int,
    scale: float, backend: str,
) -> torch.Tensor:
    """Normalized arguments as in :mod:`chunkmem.reference`; ``backend`` already resolved."""
    return _run(backend, q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base,
                start_pos, scale).contiguous()


@hybrid_attention_op.register_fake
def _(q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base, start_pos, scale, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("chunkmem::hybrid_attention_backward", mutates_args=())
def hybrid_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: Optional[torch.Tensor], mem_v: Optional[torch.Tensor], weights: torch.Tensor,
    mem_len: Optional[torch.Tensor], chunk_size: Optional[int], use_global: bool,
    rope_base: Optional[float], start_pos: int, scale: float, backend: str,
) -> list[torch.Tensor]:
    """Gradients (dq, dk, dv, dmem_k, dmem_v, dweights); empty tensors stand for absent memory.

    A custom op's body runs below the autograd dispatch key, so the backends are differentiated
    with ``torch.func.vjp``, except the Triton kernels, which cannot run on functorch's wrapped
    tensors and have their own autograd-free entry point.
    """
    has_mem = mem_k is not None
    if backend == "triton":
        from chunkmem.triton_attention import hybrid_attention_triton_vjp

        dq, dk, dv, dmk, dmv, dw = hybrid_attention_triton_vjp(
            grad_out, q, k, v, mem_k, mem_v, weights, mem_len, chunk_size=chunk_size,
            use_global=use_global, rope_base=rope_base, start_pos=start_pos, scale=scale)
    else:
        def forward(q, k, v, weights, *mem):
            mk, mv = mem if has_mem else (None, None)
            return _run(backend, q, k, v, mk, mv, weights, mem_len, chunk_size, use_global,
                        rope_base, start_pos, scale)

        primals = (q, k, v, weights) + ((mem_k, mem_v) if has_mem else ())
        _, vjp = torch.func.vjp(forward, *primals)
        dq, dk, dv, dw, *mem_grads = vjp(grad_out)
        dmk, dmv = mem_grads if has_mem else (None, None)
    if not has_mem:
        dmk = dmv = q.new_empty(0)
    return [g.clone(memory_format=torch.contiguous_format) for g in (dq, dk, dv, dmk, dmv, dw)]


@hybrid_attention_backward_op.register_fake
def _(grad_out, q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base, start_pos,
      scale, backend):
    like = [q, k, v, mem_k, mem_v, weights]
    return [q.new_empty(0) if t is None else t.new_empty(t.shape) for t in like]


def _setup_context(ctx, inputs, output):
    ctx.args = inputs[7:]  # the non-tensor arguments; tensors go through save_for_backward
    ctx.save_for_backward(*(t for t in inputs[:7] if t is not None))
    ctx.present = [t is not None for t in inputs[:7]]


def _backward(ctx, grad_out):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    dq, dk, dv, dmk, dmv, dw = hybrid_attention_backward_op(grad_out, *tensors, *ctx.args)
    has_mem = ctx.present[3]
    return (dq, dk, dv, dmk if has_mem else None, dmv if has_mem else None, dw) + (None,) * 7


hybrid_attention_op.register_autograd(_backward, setup_context=_setup_context)
