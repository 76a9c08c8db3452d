"""Benchmark cases: what one point runs, as a ``step()`` callable, for every (op, impl).

Ops (attention patterns, see bench/flops.py): "global+chunk+memory" (the three-path op),
"chunk+memory" (use_global=False), "chunk" (the chunk path alone: causal attention inside
non-overlapping chunks, no memory) and "causal" (plain causal attention); plus "model" (whole LM,
forward+backward of a next-token loss).

Impls:
- "chunkmem-torch" / "chunkmem-reference" / "chunkmem-triton": ``chunkmem.hybrid_attention`` with
  that backend (ops global+chunk+memory, chunk+memory, and chunk: no memory, path weights
  (0, 1, 0));
- "sdpa": ``F.scaled_dot_product_attention(is_causal=True)`` (op causal);
- "flex": FlexAttention (compiled) with a block mask of the same pattern. Op chunk: the mask
  "same chunk and causal" at the sweep's chunk size, the same function as chunkmem's op chunk.
  Op chunk+memory: the S memory slots are prepended to the keys and the mask is "memory slot, or
  same chunk and causal": the same pairs as chunkmem's op but ONE softmax over their union
  instead of two softmaxes mixed by weights. (Plain causal attention is left to SDPA.)
- "chunkmem-lm" / "chunkmem-lm-noglobal": chunkmem.nn.ChunkMemLM with use_global True / False,
  run in segments of ``segment_len`` with the memory carried; "sdpa-transformer": the same-size
  plain causal transformer chunkmem.baselines.CausalTransformer (SDPA over the whole sequence).
  All three: op "model", next-token cross-entropy loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["IMPL_OPS", "MODEL_IMPLS", "Shape", "Case", "build_case", "make_step"]

ATTN_OPS_CHUNKMEM = ("global+chunk+memory", "chunk+memory", "chunk")
IMPL_OPS = {
    "chunkmem-torch": ATTN_OPS_CHUNKMEM,
    "chunkmem-triton": ATTN_OPS_CHUNKMEM,
    "chunkmem-reference": ATTN_OPS_CHUNKMEM,
    "sdpa": ("causal",),
    "flex": ("chunk+memory", "chunk"),
}
MODEL_IMPLS = ("chunkmem-lm", "chunkmem-lm-noglobal", "sdpa-transformer")


@dataclass(frozen=True)
class Shape:
    """B batch, H heads (= kv heads), D head dim, T sequence length, chunk_size, S memory slots.

    For op "model": d_model = H*D, plus n_layers, vocab_size and segment_len of the LM.
    """
    B: int
    H: int
    D: int
    T: int
    chunk_size: int = 64
    S: int = 64
    n_layers: int = 2
    vocab_size: int = 256
    segment_len: int = 1024


@dataclass
class Case:
    """forward() -> output tensor (or a scalar loss when grad_out is None).

    leaves: tensors/parameters whose .grad is dropped at the end of each forward+backward step.
    extra: fields added to the point's record (e.g. the parameter count of a model).
    compiled: the first call compiles (torch.compile), so it must be an untimed warm-up.
    """
    forward: Callable[[], torch.Tensor]
    leaves: list
    grad_out: torch.Tensor | None
    extra: dict = field(default_factory=dict)
    compiled: bool = False


def make_step(case: Case, pass_: str) -> Callable[[], None]:
    """The timed unit: "fwd" runs forward under no_grad; "fwd+bwd" runs forward then backward and
    drops the gradients of the leaves (they count in the call's peak memory, not in the next
    call's baseline)."""
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                case.forward()
    elif pass_ == "fwd+bwd":
        def step():
            out = case.forward()
            out.backward(case.grad_out)
            for t in case.leaves:  # leave no state behind: every call starts from the inputs
                t.grad = None
    else:
        raise ValueError(f"pass must be 'fwd' or 'fwd+bwd', got {pass_!r}")
    return step


def _randn(gen, shape, device, dtype, requires_grad):
    t = torch.randn(shape, generator=gen, device="cpu", dtype=torch.float32).to(device, dtype)
    return t.requires_grad_(requires_grad)


def _chunkmem_case(op, backend, s, device, dtype, grad, gen, rope_base):
    import chunkmem

    use_global, use_memory = op == "global+chunk+memory", op != "chunk"
    q, k, v = (_randn(gen, (s.B, s.H, s.T, s.D), device, dtype, grad) for _ in range(3))
    mem_k = mem_v = mem_len = None
    if use_memory:
        mem_k, mem_v = (_randn(gen, (s.B, s.H, s.S, s.D), device, dtype, grad) for _ in range(2))
        mem_len = torch.full((s.B,), s.S, dtype=torch.int64, device=device)
    on = torch.tensor([use_global, True, use_memory], dtype=torch.float32)
    weights = (on / on.sum()).repeat(s.H, 1).to(device).requires_grad_(grad)  # (H, 3)

    def forward():
        return chunkmem.hybrid_attention(
            q, k, v, mem_k, mem_v, weights=weights, chunk_size=s.chunk_size,
            use_global=use_global, mem_len=mem_len, rope_base=rope_base, backend=backend)

    return forward, [t for t in (q, k, v, mem_k, mem_v, weights) if t is not None]


def _sdpa_case(s, device, dtype, grad, gen):
    q, k, v = (_randn(gen, (s.B, s.H, s.T, s.D), device, dtype, grad) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]


_compiled_flex = None


def _flex_case(op, s, device, dtype, grad, gen):
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    q = _randn(gen, (s.B, s.H, s.T, s.D), device, dtype, grad)
    n_mem = s.S if op == "chunk+memory" else 0  # keys = [n_mem memory slots, T sequence keys]
    C = s.chunk_size

    def mask_mod(b, h, qi, kv):
        j = kv - n_mem
        return (kv < n_mem) | ((j <= qi) & (j // C == qi // C))
    k, v = (_randn(gen, (s.B, s.H, n_mem + s.T, s.D), device, dtype, grad) for _ in range(2))
    block_mask = create_block_mask(mask_mod, None, None, s.T, n_mem + s.T, device=device)
    return (lambda: _compiled_flex(q, k, v, block_mask=block_mask)), [q, k, v]


def _model_case(impl, s, device, dtype, grad, gen):
    d_model = s.H * s.D
    if impl == "sdpa-transformer":  # whole sequence in one causal SDPA (segment_len=None)
        from chunkmem.baselines import CausalTransformer

        model = CausalTransformer(s.vocab_size, d_model, s.n_layers, s.H)
    else:
        from chunkmem.nn import ChunkMemLM

        model = ChunkMemLM(s.vocab_size, d_model, s.n_layers, s.H, chunk_size=s.chunk_size,
                           memory_slots=s.S, use_global=(impl == "chunkmem-lm"),
                           segment_len=s.segment_len)
    model = model.to(device=device, dtype=dtype)
    tokens = torch.randint(0, s.vocab_size, (s.B, s.T + 1), generator=gen).to(device)
    inp, target = tokens[:, :-1], tokens[:, 1:]

    def forward():
        logits = model(inp)[0]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))

    params = list(model.parameters())
    if not grad:
        model.eval()
    extra = {"params": sum(p.numel() for p in params), "d_model": d_model,
             "n_layers": s.n_layers, "segment_len": s.segment_len if impl != "sdpa-transformer" else None}
    return forward, params, extra


def build_case(op: str, impl: str, shape: Shape, *, device: str, dtype: torch.dtype, pass_: str,
               rope_base: float | None = None, seed: int = 0) -> Case:
    """Allocate the inputs of one point and return its Case (nothing is run here but setup)."""
    grad = pass_ == "fwd+bwd"
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    if op == "model":
        if impl not in MODEL_IMPLS:
            raise ValueError(f"impl {impl!r} is not a model; expected one of {MODEL_IMPLS}")
        forward, leaves, extra = _model_case(impl, shape, device, dtype, grad, gen)
        return Case(forward, leaves, None, extra)
    if op not in IMPL_OPS.get(impl, ()):
        raise ValueError(f"impl {impl!r} does not implement op {op!r}")
    if impl.startswith("chunkmem-"):
        forward, leaves = _chunkmem_case(op, impl.split("-", 1)[1], shape, device, dtype, grad,
                                         gen, rope_base)
    elif impl == "sdpa":
        forward, leaves = _sdpa_case(shape, device, dtype, grad, gen)
    else:
        forward, leaves = _flex_case(op, shape, device, dtype, grad, gen)
    grad_out = None
    if grad:
        grad_out = _randn(gen, (shape.B, shape.H, shape.T, shape.D), device, dtype, False)
    return Case(forward, leaves, grad_out, extra, compiled=impl == "flex")
