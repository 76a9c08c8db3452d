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


def _require_int_tensor(name, x, shape, layout, device, dtypes=None):
    """x is an integer tensor of ``shape`` (described by ``layout``) on ``device``."""
    _require_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must be an int32 (or int64) tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")


def _mem_len_tensor(mem_len, B, S, device, rows="B"):
    """mem_len (None, an int, or an int tensor (B,)) -> int32 tensor (B,) on device.

    Type, shape and device are checked here, the range of a tensor's values by the caller (it
    needs the data); an int is checked against [0, S] here."""
    if mem_len is None:
        return torch.full((B,), S, dtype=torch.int32, device=device)
    if isinstance(mem_len, bool):
        raise TypeError("mem_len must be None, an int or an integer tensor, got bool")
    if isinstance(mem_len, int):
        if not 0 <= mem_len <= S:
            raise ValueError(f"mem_len must lie in [0, S] = [0, {S}], got {mem_len}")
        return torch.full((B,), mem_len, dtype=torch.int32, device=device)
    if not isinstance(mem_len, torch.Tensor):
        raise TypeError(f"mem_len must be None, an int or an integer tensor ({rows},), got {type(mem_len).__name__}")
    _require_int_tensor("mem_len", mem_len, (B,), f"({rows},)", device)
    return mem_len.to(torch.int32)


def _check_mem_len_values(lo, hi, S):
    if lo < 0 or hi > S:
        raise ValueError(f"mem_len values must lie in [0, S] = [0, {S}], got min {lo}, max {hi}")


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
    scale=None, kv_start=None, kv_end=None, cu_seqlens_q=None, cu_seqlens_k=None,
    max_seqlen_q=None, max_seqlen_k=None, backend="auto",
):
    """Hybrid global + chunked + memory attention (SPEC §1, §1b), in PyTorch's SDPA layout.

    Args:
        q: (B, H, Tq, D) queries. k, v: (B, G, Tk, D) keys/values, H % G == 0, 1 <= Tq <= Tk;
            query i sits at key index kv_end[b] - Tq + i (bottom-right alignment, so decoding is
            Tq = 1).
        mem_k, mem_v: (B, G, S, D) memory keys/values ((N, G, S, D) with packed documents) or
            None (no memory path). S = 0 is allowed: the path is then on (it takes its share of
            default weights) but contributes 0.
        weights: (3,) or (H, 3) = (w_global, w_chunk, w_mem), a tensor (differentiable) or a
            sequence; None -> equal weights over the paths that are on. Weights of off paths are
            ignored.
        chunk_size: int >= 1 or None (no chunk path); chunks are counted by position (key j of
            row b is in chunk (start_pos[b] + j - kv_start[b]) // chunk_size).
        use_global: False skips the global path.
        mem_len: None (all S slots valid), an int (the same for every row) or an int tensor (B,)
            ((N,) with packed documents), in [0, S]; valid slots are the last mem_len[b]. A row
            with none gives 0 from the memory path.
        rope_base: None (no rotation) or float; RoPE on q/k of the global and chunk paths only.
        start_pos: int >= 0, or an int tensor (B,) ((N,) with packed documents) >= 0: the
            position of each row's first valid key (RoPE and chunk boundaries).
        scale: None -> 1/sqrt(D).
        kv_start, kv_end: None or int tensors (B,) with 0 <= kv_start <= kv_end <= Tk: row b's
            valid keys are kv_start[b] <= j < kv_end[b] (a missing one defaults to 0 / Tk). A
            query with kv_end[b] - Tq + i < kv_start[b] is padding: its output is 0.
        cu_seqlens_q, cu_seqlens_k: packed documents (both or neither; B must be 1, no
            kv_start/kv_end): int32 (int64 accepted) tensors (N+1,), non-decreasing from 0 to Tq
            (resp. Tk); document d owns queries cu_seqlens_q[d]:cu_seqlens_q[d+1] and keys
            cu_seqlens_k[d]:cu_seqlens_k[d+1], at most as many queries as keys, and is computed
            as a batch row of its own (memory row d, start_pos[d]).
        max_seqlen_q, max_seqlen_k: optional ints with cu_seqlens, >= the longest document's
            query (resp. key) count; computed when None.
        backend: "auto" (CUDA -> "triton", CPU -> "torch"), "triton", "torch" or "reference".
            A call the kernels do not cover falls back to "torch" with a one-time warning, for
            "triton" too. Every backend is deterministic (the kernels use no atomics).

    Checks that need tensor values (the ranges of mem_len, kv_start/kv_end, start_pos and
    cu_seqlens, and computing max_seqlen_*) are batched into one device-to-host transfer per
    call in eager mode. Under torch.compile they are skipped (a sync would break the traced
    graph): the values are then the caller's to get right, and max_seqlen_* default to Tq / Tk.

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
    dev = q.device

    packed = _check_packing(cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q,
                            max_seqlen_k, B, dev)
    rows, n_rows = ("N", cu_seqlens_q.shape[0] - 1) if packed else ("B", B)

    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must be given together (both tensors or both None)")
    mem_len_given = isinstance(mem_len, torch.Tensor)
    if mem_k is not None:
        for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
            _require_tensor(name, t)
            _require_rank(name, t, 4, f"({rows}, G, S, D)")
        _require_same({"q": q, "mem_k": mem_k, "mem_v": mem_v}, "q")
        if mem_k.shape != mem_v.shape:
            raise ValueError(f"mem_k and mem_v must have the same shape, got {tuple(mem_k.shape)} and {tuple(mem_v.shape)}")
        if (mem_k.shape[0], mem_k.shape[1], mem_k.shape[3]) != (n_rows, G, D):
            raise ValueError(f"mem_k/mem_v must have shape ({rows}, G, S, D) = ({n_rows}, {G}, S, {D}), "
                             f"got {tuple(mem_k.shape)}")
        S = mem_k.shape[2]
        mem_len = _mem_len_tensor(mem_len, n_rows, S, dev, rows)
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
    if isinstance(start_pos, torch.Tensor):
        _require_int_tensor("start_pos", start_pos, (n_rows,), f"({rows},)", dev)
        start_pos = start_pos.to(torch.int64)
    else:
        _require_int("start_pos", start_pos, minimum=0)
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is not None:
            _require_int_tensor(name, t, (B,), "(B,)", dev)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite float, got {scale!r}")
    paths_on = (float(use_global), float(chunk_size is not None), float(mem_k is not None))
    if not any(paths_on):
        raise ValueError("no attention path is on: set use_global=True, a chunk_size, or pass mem_k/mem_v")
    weights = _normalize_weights(weights, H, paths_on, dev)

    if kv_start is not None or kv_end is not None:
        kv_start = (torch.zeros(B, dtype=torch.int32, device=dev) if kv_start is None
                    else kv_start.to(torch.int32))
        kv_end = torch.full((B,), Tk, dtype=torch.int32, device=dev) if kv_end is None else kv_end.to(torch.int32)
    if packed:
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        values = _check_values(Tq, Tk, mem_len if mem_len_given else None,
                               mem_k.shape[2] if mem_k is not None else 0, start_pos, kv_start,
                               kv_end, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        if values.get("all_keys_valid"):
            kv_start = kv_end = None  # every row sees all Tk keys: the v1 fast path
        max_seqlen_q = values.get("max_seqlen_q", max_seqlen_q)
        max_seqlen_k = values.get("max_seqlen_k", max_seqlen_k)
    elif packed:
        max_seqlen_q = Tq if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = Tk if max_seqlen_k is None else max_seqlen_k

    if mem_k is not None and mem_k.shape[2] == 0:  # an empty memory contributes exactly 0
        mem_k = mem_v = mem_len = None
    args = (q, k, v, mem_k, mem_v, weights, mem_len)
    kwargs = dict(chunk_size=chunk_size, use_global=use_global, rope_base=rope_base,
                  start_pos=start_pos, scale=float(scale), kv_start=kv_start, kv_end=kv_end,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    name = _resolve_backend(backend, dev, triton_attention_module, args, kwargs)
    if compiling:
        from chunkmem.library import call_hybrid_attention_op

        return call_hybrid_attention_op(*args, **kwargs, backend=name)
    return attention_backend(name)(*args, **kwargs)


def _check_packing(cu_seqlens_q, cu_seqlens_k, kv_start, kv_end, max_seqlen_q, max_seqlen_k, B, device):
    """Type/shape checks of the packed-document arguments; returns whether the call is packed."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        for name, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if x is not None:
                raise ValueError(f"{name} is only used with cu_seqlens_q/cu_seqlens_k (packed documents)")
        return False
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (both tensors or both None)")
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _require_tensor(name, x)
        if x.dim() != 1 or x.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N+1,) with N >= 1 documents, got {tuple(x.shape)}")
        _require_int_tensor(name, x, x.shape, "(N+1,)", device, dtypes=(torch.int32, torch.int64))
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have shape (N+1,), got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    if B != 1:
        raise ValueError(f"with cu_seqlens_q/cu_seqlens_k (packed documents) the batch size B must be 1, got B={B}")
    if kv_start is not None or kv_end is not None:
        raise ValueError("kv_start/kv_end cannot be combined with cu_seqlens_q/cu_seqlens_k "
                         "(each packed document already has its own key range)")
    for name, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        _require_int(name, x, minimum=0, allow_none=True)
    return True


def _check_values(Tq, Tk, mem_len, S, start_pos, kv_start, kv_end, cu_q, cu_k, max_seqlen_q,
                  max_seqlen_k) -> dict:
    """The checks that need tensor values, with ONE device-to-host transfer for all of them.

    Returns {"all_keys_valid": every row's range is (0, Tk)} with kv ranges, and the longest
    document's query/key counts {"max_seqlen_q", "max_seqlen_k"} with cu_seqlens.
    """
    names, parts = [], []  # names of the values, 1-D tensors holding them

    def add(tensor, *value_names):
        names.extend(value_names)
        parts.append(tensor.reshape(-1))  # torch.cat promotes int32/int64 to int64

    if mem_len is not None and mem_len.numel():
        add(torch.stack(torch.aminmax(mem_len)), "mem_len_min", "mem_len_max")
    if isinstance(start_pos, torch.Tensor) and start_pos.numel():
        add(start_pos.min(), "start_pos_min")
    if kv_start is not None and kv_start.numel():
        add(torch.stack((*torch.aminmax(kv_start), *torch.aminmax(kv_end), (kv_end - kv_start).min())),
            "kv_start_min", "kv_start_max", "kv_end_min", "kv_end_max", "kv_len_min")
    if cu_q is not None:
        for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            add(cu[[0, -1]], name + "_first", name + "_last")
            add(torch.stack(torch.aminmax(cu[1:] - cu[:-1])), name + "_step_min", name + "_step_max")
        add(((cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])).min(), "doc_keys_minus_queries_min")
    if not parts:
        return {}
    got = dict(zip(names, (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()))  # the one sync

    if "mem_len_min" in got:
        _check_mem_len_values(got["mem_len_min"], got["mem_len_max"], S)
    if got.get("start_pos_min", 0) < 0:
        raise ValueError(f"start_pos values must be >= 0, got min {got['start_pos_min']}")
    out = {}
    if "kv_start_min" in got:
        if got["kv_start_min"] < 0:
            raise ValueError(f"kv_start values must be >= 0, got min {got['kv_start_min']}")
        if got["kv_end_max"] > Tk:
            raise ValueError(f"kv_end values must be <= Tk = {Tk}, got max {got['kv_end_max']}")
        if got["kv_len_min"] < 0:
            raise ValueError(f"kv_start must be <= kv_end in every row, got kv_end - kv_start = "
                             f"{got['kv_len_min']} in some row")
        out["all_keys_valid"] = got["kv_start_max"] == 0 and got["kv_end_min"] == Tk
    if cu_q is not None:
        for name, total, limit in (("cu_seqlens_q", Tq, max_seqlen_q), ("cu_seqlens_k", Tk, max_seqlen_k)):
            first, last = got[name + "_first"], got[name + "_last"]
            if first != 0 or last != total:
                raise ValueError(f"{name} must run from 0 to the packed length {total}, got {first} .. {last}")
            if got[name + "_step_min"] < 0:
                raise ValueError(f"{name} must be non-decreasing")
            longest = got[name + "_step_max"]
            short = "max_seqlen_" + name[-1]
            if limit is not None and limit < longest:
                raise ValueError(f"{short}={limit} is less than the longest document ({longest})")
            out[short] = longest if limit is None else limit
        if got["doc_keys_minus_queries_min"] < 0:
            raise ValueError("every packed document needs at least as many keys as queries "
                             "(cu_seqlens_q step <= cu_seqlens_k step)")
    return out


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
        mem_len: None (all S slots valid), an int (the same for every row) or an int tensor (B,),
            in [0, S]. Checking a tensor's values reads it to the host (one device sync in eager
            mode); under torch.compile they are not checked, as for :func:`hybrid_attention`.
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
    given = isinstance(mem_len, torch.Tensor)
    mem_len = _mem_len_tensor(mem_len, B, S, memory.device)
    if given and B > 0 and not torch.compiler.is_compiling():  # a value check needs the data
        _check_mem_len_values(*(int(x) for x in torch.aminmax(mem_len)), S)

    args = (memory, x, w_gate, b_gate, w_cand, b_cand)
    kwargs = dict(chunk_size=chunk_size, mem_len=mem_len)
    name = _resolve_backend(backend, memory.device, triton_memory_module, args, kwargs)
    if torch.compiler.is_compiling():
        from chunkmem.library import gated_memory_update_op

        return gated_memory_update_op(*args, mem_len, chunk_size, name)
    return memory_update_backend(name)(*args, **kwargs)
