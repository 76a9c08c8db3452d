"""``torch.library`` registration of the two public ops, for ``torch.compile``.

Eager calls of :func:`chunkmem.hybrid_attention` and :func:`chunkmem.gated_memory_update` run
the chosen backend directly, with its own autograd. While ``torch.compile`` traces, the call goes
through the custom op ``torch.ops.chunkmem.hybrid_attention`` or
``torch.ops.chunkmem.gated_memory_update`` instead: the compiler sees one opaque node with a
fake (meta) implementation for shapes, so a model using the ops compiles with
``fullgraph=True`` and no graph break, whatever the backend (Triton kernels or the PyTorch
fallback).

Each op's backward is a second custom op (``..._backward``), which keeps the compiled graph free
of backend internals. With the Triton attention kernels, the forward op also returns the
kernels' per-path log-sum-exp (B, H, 3, Tq), which autograd saves with the output, so the
backward op runs the backward kernels alone, as in eager mode. Every other case recomputes the
forward in the backward op and differentiates it (activation checkpointing of this one op: one
extra forward in compiled training).

The ops carry the SPEC §1b arguments as well: kv_start/kv_end, cu_seqlens_q/cu_seqlens_k and
max_seqlen_q/max_seqlen_k, and start_pos as an int plus an optional tensor ``start_pos_t`` (a
schema cannot take an int-or-tensor union); :func:`call_hybrid_attention_op` does that split.
The integer tensors are saved for the backward with the others; they get no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from chunkmem.backends import attention_backend, memory_update_backend

__all__ = ["hybrid_attention_op", "call_hybrid_attention_op", "gated_memory_update_op"]

_N_TENSORS = 7  # q, k, v, mem_k, mem_v, weights, mem_len: the op's leading arguments
_BACKEND = 12  # index of ``backend`` among the op's arguments


def _v2_kwargs(start_pos, start_pos_t, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
               max_seqlen_k):
    """The backends' keywords for the SPEC §1b arguments (start_pos: the tensor when given)."""
    return dict(start_pos=start_pos if start_pos_t is None else start_pos_t, kv_start=kv_start,
                kv_end=kv_end, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def _run(backend, q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base,
         scale, v2):
    return attention_backend(backend)(
        q, k, v, mem_k, mem_v, weights, mem_len, chunk_size=chunk_size, use_global=use_global,
        rope_base=rope_base, scale=scale, **v2,
    )


def call_hybrid_attention_op(q, k, v, mem_k, mem_v, weights, mem_len, *, chunk_size, use_global,
                             rope_base, start_pos, scale, kv_start, kv_end, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend):
    """The custom op called with the backends' normalized keywords (start_pos an int or a
    tensor, split here into the op's two arguments); returns the output alone."""
    start_pos_t = start_pos if isinstance(start_pos, torch.Tensor) else None
    return hybrid_attention_op(
        q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base,
        0 if start_pos_t is not None else start_pos, scale, backend, start_pos_t, kv_start, kv_end,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)[0]


@torch.library.custom_op("chunkmem::hybrid_attention", mutates_args=())
def hybrid_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: Optional[torch.Tensor],
    mem_v: Optional[torch.Tensor], weights: torch.Tensor, mem_len: Optional[torch.Tensor],
    chunk_size: Optional[int], use_global: bool, rope_base: Optional[float], start_pos: int,
    scale: float, backend: str, start_pos_t: Optional[torch.Tensor] = None,
    kv_start: Optional[torch.Tensor] = None, kv_end: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized arguments as in :mod:`chunkmem.reference`; ``backend`` already resolved.
    ``start_pos_t``, when given, is the per-row start_pos tensor (then ``start_pos`` is unused):
    the schema cannot take an int-or-tensor union.

    Returns (out (B, H, Tq, D), lse): lse is the Triton kernels' per-path log-sum-exp
    (B, H, 3, Tq) fp32 for ``backend="triton"``, an empty tensor for the other backends.
    """
    v2 = _v2_kwargs(start_pos, start_pos_t, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k)
    if backend == "triton":
        from chunkmem.triton_attention import hybrid_attention_triton_forward

        return hybrid_attention_triton_forward(
            q, k, v, mem_k, mem_v, weights, mem_len, chunk_size=chunk_size,
            use_global=use_global, rope_base=rope_base, scale=scale, **v2)
    out = _run(backend, q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global,
               rope_base, scale, v2)
    return out.contiguous(), q.new_empty(0, dtype=torch.float32)


@hybrid_attention_op.register_fake
def _(q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base, start_pos, scale,
      backend, *v2):
    B, H, Tq, _ = q.shape
    lse_shape = (B, H, 3, Tq) if backend == "triton" else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("chunkmem::hybrid_attention_backward", mutates_args=())
def hybrid_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mem_k: Optional[torch.Tensor], mem_v: Optional[torch.Tensor], weights: torch.Tensor,
    mem_len: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
    chunk_size: Optional[int], use_global: bool, rope_base: Optional[float], start_pos: int,
    scale: float, backend: str, start_pos_t: Optional[torch.Tensor] = None,
    kv_start: Optional[torch.Tensor] = None, kv_end: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
) -> list[torch.Tensor]:
    """Gradients (dq, dk, dv, dmem_k, dmem_v, dweights); empty tensors stand for absent memory.

    out, lse: the forward op's outputs. The Triton kernels' backward starts from them; the other
    backends recompute the forward and differentiate it with ``torch.func.vjp`` (a custom op's
    body runs below the autograd dispatch key; the Triton kernels cannot run on functorch's
    wrapped tensors, hence their autograd-free entry point).
    """
    has_mem = mem_k is not None
    v2 = _v2_kwargs(start_pos, start_pos_t, kv_start, kv_end, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k)
    if backend == "triton":
        from chunkmem.triton_attention import hybrid_attention_triton_backward

        dq, dk, dv, dmk, dmv, dw = hybrid_attention_triton_backward(
            grad_out, q, k, v, mem_k, mem_v, weights, mem_len, out, lse, chunk_size=chunk_size,
            use_global=use_global, rope_base=rope_base, scale=scale, **v2)
    else:
        def forward(q, k, v, weights, *mem):
            mk, mv = mem if has_mem else (None, None)
            return _run(backend, q, k, v, mk, mv, weights, mem_len, chunk_size, use_global,
                        rope_base, scale, v2)

        primals = (q, k, v, weights) + ((mem_k, mem_v) if has_mem else ())
        _, vjp = torch.func.vjp(forward, *primals)
        dq, dk, dv, dw, *mem_grads = vjp(grad_out)
        dmk, dmv = mem_grads if has_mem else (None, None)
    if not has_mem:
        dmk = dmv = q.new_empty(0)
    return [g.clone(memory_format=torch.contiguous_format) for g in (dq, dk, dv, dmk, dmv, dw)]


@hybrid_attention_backward_op.register_fake
def _(grad_out, q, k, v, mem_k, mem_v, weights, mem_len, out, lse, chunk_size, use_global,
      rope_base, start_pos, scale, backend, *v2):
    like = [q, k, v, mem_k, mem_v, weights]
    return [q.new_empty(0) if t is None else t.new_empty(t.shape) for t in like]


def _setup_context(ctx, inputs, output):
    # Tensors go through save_for_backward (the differentiable ones and the integer range
    # tensors alike); ctx.args keeps the non-tensor arguments with None in the tensors' places.
    ctx.args = [None if isinstance(a, torch.Tensor) else a for a in inputs[_N_TENSORS:]]
    ctx.present = [isinstance(a, torch.Tensor) for a in inputs]
    # out and lse only where the backward starts from them (the Triton kernels): the other
    # backends recompute, and keeping out alive for them would cost its memory for nothing.
    kept = output if inputs[_BACKEND] == "triton" else ()
    ctx.save_for_backward(*(a for a in inputs if isinstance(a, torch.Tensor)), *kept)


def _backward(ctx, grad_out, _grad_lse):
    saved = iter(ctx.saved_tensors)
    inputs = [next(saved) if present else None for present in ctx.present]
    out, lse = tuple(saved) or (grad_out.new_empty(0), grad_out.new_empty(0))
    rest = [t if t is not None else a for t, a in zip(inputs[_N_TENSORS:], ctx.args)]
    dq, dk, dv, dmk, dmv, dw = hybrid_attention_backward_op(grad_out, *inputs[:_N_TENSORS], out,
                                                            lse, *rest)
    has_mem = ctx.present[3]
    return (dq, dk, dv, dmk if has_mem else None, dmv if has_mem else None, dw) + (None,) * len(rest) + (None,)


hybrid_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- memory update
def _run_memory_update(backend, memory, x, w_gate, b_gate, w_cand, b_cand, mem_len, chunk_size):
    return memory_update_backend(backend)(memory, x, w_gate, b_gate, w_cand, b_cand,
                                          chunk_size=chunk_size, mem_len=mem_len)


@torch.library.custom_op("chunkmem::gated_memory_update", mutates_args=())
def gated_memory_update_op(
    memory: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor,
    w_cand: torch.Tensor, b_cand: torch.Tensor, mem_len: torch.Tensor, chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized arguments as in :mod:`chunkmem.reference` (memory (B, S, d), x (B, T, d),
    w_* (d, d), b_* (d,), mem_len int (B,)); ``backend`` already resolved.

    Returns (new_memory (B, S, d) in memory's dtype, new_mem_len int64 (B,)); new_mem_len is an
    integer output, so not differentiable.
    """
    new_memory, new_mem_len = _run_memory_update(backend, memory, x, w_gate, b_gate, w_cand,
                                                 b_cand, mem_len, chunk_size)
    return new_memory.contiguous(), new_mem_len


@gated_memory_update_op.register_fake
def _(memory, x, w_gate, b_gate, w_cand, b_cand, mem_len, chunk_size, backend):
    return memory.new_empty(memory.shape), mem_len.new_empty(mem_len.shape, dtype=torch.int64)


@torch.library.custom_op("chunkmem::gated_memory_update_backward", mutates_args=())
def gated_memory_update_backward_op(
    grad_new_memory: torch.Tensor, memory: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor,
    b_gate: torch.Tensor, w_cand: torch.Tensor, b_cand: torch.Tensor, mem_len: torch.Tensor,
    chunk_size: int, backend: str,
) -> list[torch.Tensor]:
    """Gradients (d memory, d x, d w_gate, d b_gate, d w_cand, d b_cand) for grad_new_memory
    (B, S, d); differentiated like :func:`hybrid_attention_backward_op` (``torch.func.vjp``, or
    the Triton kernels' autograd-free entry point)."""
    primals = (memory, x, w_gate, b_gate, w_cand, b_cand)
    if backend == "triton":
        from chunkmem.triton_memory import gated_memory_update_triton_vjp

        grads = gated_memory_update_triton_vjp(grad_new_memory, *primals, chunk_size=chunk_size,
                                               mem_len=mem_len)
    else:
        def forward(*tensors):
            return _run_memory_update(backend, *tensors, mem_len, chunk_size)[0]

        _, vjp = torch.func.vjp(forward, *primals)
        grads = vjp(grad_new_memory)
    return [g.clone(memory_format=torch.contiguous_format) for g in grads]


@gated_memory_update_backward_op.register_fake
def _(grad_new_memory, memory, x, w_gate, b_gate, w_cand, b_cand, mem_len, chunk_size, backend):
    return [t.new_empty(t.shape) for t in (memory, x, w_gate, b_gate, w_cand, b_cand)]


def _memory_update_setup_context(ctx, inputs, output):
    ctx.args = inputs[7:]  # chunk_size, backend
    ctx.save_for_backward(*inputs[:7])


def _memory_update_backward(ctx, grad_new_memory, grad_new_mem_len):
    grads = gated_memory_update_backward_op(grad_new_memory, *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None)


gated_memory_update_op.register_autograd(_memory_update_backward,
                                         setup_context=_memory_update_setup_context)
