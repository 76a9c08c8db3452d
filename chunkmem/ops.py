"""Public ops: argument validation, normalization and backend dispatch (SPEC §1, §2).

Every check here runs before any backend or kernel is called, and raises ``TypeError`` (wrong
kind of object or dtype) or ``ValueError`` (wrong shape, size or range) naming the argument.
The backends receive the *normalized* arguments described in :mod:`chunkmem.reference`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from chunkmem.backends import (attention_backend, memory_update_backend, triton_attention_module,
                               triton_memory_module)
from chunkmem.triton_env import interpreting

__all__ = ["hybrid_attention", "gated_memory_update", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_warned: set[str] = set()


# ----------------------------------------------------------------------------- validation helpers
def _require_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _require_rank(name, x, rank, layout):
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}, got shape {tuple(x.shape)}")


def _require_float(name, x):
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 for tests), got {x.dtype}")


def _require_same(tensors: dict, ref_name: str):
    ref = tensors[ref_name]
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all must match")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all must match")


def _require_int(name, x, minimum=None, allow_none=False):
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")


def _check_mem_len(mem_len, B, S, device):
    """Validate mem_len (None or int tensor (B,) in [0, S]); return it as an int tensor on device."""
    if mem_len is None:
        return torch.full((B,), S, dtype=torch.int32, device=device)
    _require_tensor("mem_len", mem_len)
    if mem_len.dtype.is_floating_point or mem_len.dtype.is_complex or mem_len.dtype == torch.bool:
        raise TypeError(f"mem_len must be an integer tensor, got {mem_len.dtype}")
    if tuple(mem_len.shape) != (B,):
        raise ValueError(f"mem_len must have shape (B,) = ({B},), got {tuple(mem_len.shape)}")
    if mem_len.device != device:
        raise ValueError(f"mem_len is on {mem_len.device} but the inputs are on {device}")
    if B > 0 and not torch.compiler.is_compiling():  # a value check would break the traced graph
        lo, hi = (int(x) for x in torch.aminmax(mem_len))
        if lo < 0 or hi > S:
            raise ValueError(f"mem_len values must lie in [0, S] = [0, {S}], got min {lo}, max {hi}")
    return mem_len.to(torch.int32)


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return interpreting() and device.type == "cpu"


def _resolve_backend(backend, device, triton_module, args, kwargs):
    """Pick the implementation: returns a backend name among "triton", "torch", "reference"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "reference"):
        return backend
    if backend == "auto" and device.type != "cuda":
        return "torch"
    if not _triton_usable(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )
    reason = triton_module().unsupported_reason(*args, **kwargs)
    if reason is not None:
        _warn_once(f"chunkmem: the Triton kernels do not support this call ({reason}); "
                   "falling back to the 'torch' backend")
        return "torch"
    return "triton"


# ----------------------------------------------------------------------------- hybrid attention
def _normalize_weights(weights, H, paths_on, device):
    """(3,) / (H, 3) / None -> float32 (float64 if given so) (H, 3), zeros for off paths (differentiable)."""
    on = torch.tensor(paths_on, dtype=torch.float32, device=device)
    if weights is None:
        return (on / on.sum()).expand(H, 3)
    if not isinstance(weights, torch.Tensor):
        if not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a tensor of shape (3,) or (H, 3), got {type(weights).__name__}")
        weights = torch.tensor(weights, dtype=torch.float32, device=device)
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but q is on {device}")
    if tuple(weights.shape) == (3,):
        weights = weights.expand(H, 3)
    elif tuple(weights.shape) != (H, 3):
        raise ValueError(f"weights must have shape (3,) or (H, 3) = ({H}, 3), got {tuple(weights.shape)}")
    dtype = torch.float64 if weights.dtype == torch.float64 else torch.float32  # fp64 for gradcheck
    return weights.to(dtype) * on.to(dtype)


def hybrid_attention(
    q, k, v, mem_k=None, mem_v=None, *,
    weights=None, chunk_size=None, use_global=True, mem_len=None, rope_base=None, start_pos=0,
    scale=None, backend="auto",
):
    """Hybrid global + chunked + memory attention (SPEC §1), in PyTorch's SDPA layout.

    Args:
        q: (B, H, Tq, D) queries. k, v: (B, G, Tk, D) keys/values, H % G == 0, Tq <= Tk; query i
            sits at key index Tk - Tq + i (bottom-right alignment, so decoding is Tq = 1).
        mem_k, mem_v: (B, G, S, D) memory keys/values or None (no memory path). S = 0 is allowed:
            the path is then on (it takes its share of default weights) but contributes 0.
        weights: (3,) or (H, 3) = (w_global, w_chunk, w_mem), a tensor (differentiable) or a
            sequence; None -> equal weights over the paths that are on. Weights of off paths are
            ignored.
        chunk_size: int >= 1 or None (no chunk path). use_global: False skips the global path.
        mem_len: None (all S slots valid) or int tensor (B,) in [0, S]; valid slots are the last
            mem_len[b]. A row with none gives 0 from the memory path. (Under torch.compile the
            range of its values is not checked: that would need a device sync and a graph break.)
        rope_base: None (no rotation) or float; RoPE on q/k of the global and chunk paths only.
        start_pos: absolute position of key 0 (RoPE only). scale: None -> 1/sqrt(D).
        backend: "auto" (CUDA -> "triton", CPU -> "torch"), "triton", "torch" or "reference".
            A call the kernels do not cover falls back to "torch" with a one-time warning, for
            "triton" too. Every backend is deterministic (the kernels use no atomics).

    Returns:
        (B, H, Tq, D) in q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, t)
        _require_rank(name, t, 4, "(B, H, T, D)" if name == "q" else "(B, G, T, D)")
        _require_float(name, t)
    _require_same({"q": q, "k": k, "v": v}, "q")
    B, H, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, G, Tk, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    _, G, Tk, Dk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size {k.shape[0]} does not match q's batch size {B}")
    if Dk != D:
        raise ValueError(f"k/v head dim D={Dk} does not match q's D={D}")
    if G < 1 or H % G != 0:
        raise ValueError(f"the number of query heads H={H} must be a multiple of the kv heads G={G}")
    if Tq < 1 or D < 1:
        raise ValueError(f"q must have Tq >= 1 and D >= 1, got shape {tuple(q.shape)}")
    if Tq > Tk:
        raise ValueError(f"q has Tq={Tq} queries but k/v only Tk={Tk} keys; Tq <= Tk is required")

    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must be given together (both tensors or both None)")
    if mem_k is not None:
        for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
            _require_tensor(name, t)
            _require_rank(name, t, 4, "(B, G, S, D)")
        _require_same({"q": q, "mem_k": mem_k, "mem_v": mem_v}, "q")
        if mem_k.shape != mem_v.shape:
            raise ValueError(f"mem_k and mem_v must have the same shape, got {tuple(mem_k.shape)} and {tuple(mem_v.shape)}")
        if (mem_k.shape[0], mem_k.shape[1], mem_k.shape[3]) != (B, G, D):
            raise ValueError(f"mem_k/mem_v must have shape (B, G, S, D) = ({B}, {G}, S, {D}), got {tuple(mem_k.shape)}")
        S = mem_k.shape[2]
        mem_len = _check_mem_len(mem_len, B, S, q.device)
    elif mem_len is not None:
        raise ValueError("mem_len was given without mem_k/mem_v")

    _require_int("chunk_size", chunk_size, minimum=1, allow_none=True)
    if not isinstance(use_global, bool):
        raise TypeError(f"use_global must be a bool, got {type(use_global).__name__}")
    if rope_base is not None:
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not rope_base > 0:
            raise ValueError(f"rope_base must be None or a positive float, got {rope_base!r}")
        if D % 2:
            raise ValueError(f"RoPE needs an even head dim D, got D={D}")
        rope_base = float(rope_base)
    _require_int("start_pos", start_pos)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    paths_on = (float(use_global), float(chunk_size is not None), float(mem_k is not None))
    if not any(paths_on):
        raise ValueError("no attention path is on: set use_global=True, a chunk_size, or pass mem_k/mem_v")
    weights = _normalize_weights(weights, H, paths_on, q.device)

    if mem_k is not None and mem_k.shape[2] == 0:  # an empty memory contributes exactly 0
        mem_k = mem_v = mem_len = None
    args = (q, k, v, mem_k, mem_v, weights, mem_len)
    kwargs = dict(chunk_size=chunk_size, use_global=use_global, rope_base=rope_base,
                  start_pos=start_pos, scale=float(scale))
    name = _resolve_backend(backend, q.device, triton_attention_module, args, kwargs)
    if torch.compiler.is_compiling():
        from chunkmem.library import hybrid_attention_op

        return hybrid_attention_op(*args, **kwargs, backend=name)[0]
    return attention_backend(name)(*args, **kwargs)


# ----------------------------------------------------------------------------- memory update
def gated_memory_update(
    memory, x, w_gate, b_gate, w_cand, b_cand, *, chunk_size, mem_len=None, backend="auto",
):
    """Gated FIFO memory update (SPEC §2).

    Args:
        memory: (B, S, d), S >= 1; valid slots right-aligned, invalid slots hold zeros.
        x: (B, T, d), T >= 1: the states of the segment to write.
        w_gate, w_cand: (d, d); b_gate, b_cand: (d,).
        chunk_size: int >= 1, tokens averaged into one summary (n = ceil(T / chunk_size)).
        mem_len: None (all S slots valid) or int tensor (B,) in [0, S]. (Under torch.compile the
            range of its values is not checked, as for :func:`hybrid_attention`.)
        backend: "auto" | "triton" | "torch" | "reference".

    Returns:
        new_memory (B, S, d) in memory's dtype, new_mem_len (B,) int64 = min(S, mem_len + n).
        Under torch.compile the call is one custom op, ``torch.ops.chunkmem.gated_memory_update``
        (:mod:`chunkmem.library`), so it compiles with fullgraph=True on every backend.
    """
    named = {"memory": memory, "x": x, "w_gate": w_gate, "b_gate": b_gate, "w_cand": w_cand, "b_cand": b_cand}
    for name, t in named.items():
        _require_tensor(name, t)
        _require_float(name, t)
    _require_rank("memory", memory, 3, "(B, S, d)")
    _require_rank("x", x, 3, "(B, T, d)")
    _require_same(named, "memory")
    B, S, d = memory.shape
    if S < 1:
        raise ValueError(f"memory must have S >= 1 slots, got shape {tuple(memory.shape)}")
    if x.shape[0] != B or x.shape[2] != d:
        raise ValueError(f"x must have shape (B, T, d) = ({B}, T, {d}), got {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError("x must hold at least one token (T >= 1)")
    for name in ("w_gate", "w_cand"):
        if tuple(named[name].shape) != (d, d):
            raise ValueError(f"{name} must have shape (d, d) = ({d}, {d}), got {tuple(named[name].shape)}")
    for name in ("b_gate", "b_cand"):
        if tuple(named[name].shape) != (d,):
            raise ValueError(f"{name} must have shape (d,) = ({d},), got {tuple(named[name].shape)}")
    _require_int("chunk_size", chunk_size, minimum=1)
    mem_len = _check_mem_len(mem_len, B, S, memory.device)

    args = (memory, x, w_gate, b_gate, w_cand, b_cand)
    kwargs = dict(chunk_size=chunk_size, mem_len=mem_len)
    name = _resolve_backend(backend, memory.device, triton_memory_module, args, kwargs)
    if torch.compiler.is_compiling():
        from chunkmem.library import gated_memory_update_op

        return gated_memory_update_op(*args, mem_len, chunk_size, name)
    return memory_update_backend(name)(*args, **kwargs)
