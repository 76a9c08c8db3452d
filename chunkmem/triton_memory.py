"""Triton backend of the gated FIFO memory update (SPEC §2): autograd wrapper and launches.

Public (for :mod:`chunkmem.ops` and the compile check):

- :func:`gated_memory_update_triton` — same math as
  :func:`chunkmem.reference.gated_memory_update_reference`; memory (B, S, d), x (B, T, d),
  w_gate/w_cand (d, d), b_gate/b_cand (d,), mem_len int tensor (B,) ->
  (new_memory (B, S, d) in memory.dtype, new_mem_len int64 (B,)). Differentiable in the six
  tensors; the backward is deterministic.
- :func:`gated_memory_update_triton_vjp` — the six gradients for a given gradient of new_memory,
  without autograd (recompute the forward, then the backward kernels), for the backward custom
  op of :mod:`chunkmem.library`.
- :func:`unsupported_reason` — None if the kernels take these arguments, else a string saying
  why (the caller then falls back to the torch backend).
- :func:`compile_variants` — the kernel variants the launcher can pick, for ahead-of-time
  compilation checks (``python -m chunkmem.compile_check``).

The kernels are in ``kernels/memory_update.py`` (their docstring gives the launch plan and its
trade-offs: two launches forward — chunk means, then projections + recurrence + FIFO push fused —
and three backward — reverse recurrence, weight/bias gradients, input gradient; all
deterministic). Block sizes come from :func:`_launch_config`, shared by the
launcher and :func:`compile_variants` so that what is checked is what runs.

Precision: the chunk means u are rounded to the weights' dtype (the GEMM operand, as an fp16
``nn.Linear`` would see them); pre-activations, g, c and the recurrence state are fp32; fp32
dots use IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as torch).
Extra memory: u (B*n, d) in the weights' dtype; with gradients on, also g, c, m (B*n, d) fp32
each (the reverse recurrence needs g_j, c_j and m_{j-1} for every j), n = ceil(T / chunk_size).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from chunkmem.triton_env import TRITON_DTYPE, interpreting

__all__ = ["gated_memory_update_triton", "gated_memory_update_triton_vjp", "unsupported_reason",
           "compile_variants"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_D = 4096  # widest model dimension whose block choices were compile-checked


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def unsupported_reason(memory, x, w_gate, b_gate, w_cand, b_cand, *, chunk_size, mem_len
                       ) -> Optional[str]:
    """None if the Triton kernels can run these arguments, else why not.

    The arguments are already validated by :func:`chunkmem.gated_memory_update` (shapes, one
    dtype, one device); this only says what the kernels cover.
    """
    dtype, device = memory.dtype, memory.device
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported (float32, float16, bfloat16)"
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the kernels need an sm_80 or newer GPU"
    elif not interpreting():
        return f"tensors on {device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    elif dtype == torch.bfloat16:
        return "bfloat16 is not supported by the Triton interpreter (its tl.dot gives garbage)"
    d = memory.shape[-1]
    if d > MAX_D:
        return f"d={d} > {MAX_D}: no compile-checked block sizes for it"
    return None


# ---------------------------------------------------------------------------------------------
# block sizes
# ---------------------------------------------------------------------------------------------

def _pow2(x: int, lo: int, hi: int) -> int:
    """Next power of two >= x, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, int(x) - 1).bit_length()))


def _launch_config(kernel: str, dtype: torch.dtype, d: int, rows: int = 1) -> dict:
    """Constexpr block sizes plus num_warps / num_stages of one kernel.

    kernel: "pool" | "fwd" | "bwd_scan" | "dw" | "dx"; rows: the number of summary rows the
    kernel's M dimension walks (n for "fwd", B*n for "dw"/"dx").
    """
    wide = 2 if dtype == torch.float32 else 1  # bytes relative to 16-bit
    # The tiles below were chosen by compiling for sm_80 and sm_90 with and without 16-byte
    # alignment of d and the pointers (unaligned loads are scalar and staged in registers, the
    # worst case), and with integer arguments that are multiples of 16, under Triton 3.9 and
    # 3.6: none spills (cuobjdump STACK 0) and all stay far below the shared-memory cap.
    if kernel == "pool":
        return dict(BLOCK_T=16, BLOCK_D=_pow2(d, 16, 256), num_warps=4, num_stages=1)
    if kernel == "fwd":
        # Two (BLOCK_M, BLOCK_N) fp32 accumulators plus the scan's temporaries: 8 warps and a
        # narrow column block; fp32 runs single-stage (staged fp32 tiles spill). 16 or 64 rows:
        # 32-row fp32 tiles spilled a few bytes on some targets.
        # d <= 16: 16 rows too (fp32 64 x 16 tiles put 8 bytes on the stack with some stage
        # counts and integer hints; the tiny width makes the row count irrelevant to speed).
        block_n = _pow2(d, 16, 32)
        return dict(BLOCK_M=16 if rows <= 16 or block_n == 16 else 64, BLOCK_N=block_n,
                    BLOCK_K=_pow2(d, 16, 64 // wide), num_warps=8, num_stages=3 if wide == 1 else 1)
    if kernel == "bwd_scan":  # a 16-column block is one warp's work (4 warps: 8 B of stack, sm_90)
        block_d = _pow2(d, 16, 64)
        return dict(BLOCK_J=16, BLOCK_D=block_d, num_warps=1 if block_d == 16 else 4,
                    num_stages=1)
    if kernel == "dw":  # BLOCK_M: summary rows reduced over; BLOCK_N x BLOCK_K: the dW tile
        return dict(BLOCK_M=_pow2(rows, 16, 64), BLOCK_N=_pow2(d, 16, 64),
                    BLOCK_K=_pow2(d, 16, 64 // wide), num_warps=8, num_stages=2)
    if kernel == "dx":  # BLOCK_M: summary rows; BLOCK_K: the reduced (output) dimension of W
        return dict(BLOCK_M=_pow2(rows, 16, 64 // wide), BLOCK_N=_pow2(d, 16, 64),
                    BLOCK_K=_pow2(d, 16, 32), num_warps=8 // wide, num_stages=3 - wide)
    raise ValueError(f"unknown kernel {kernel!r}")


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # TF32 for fp32 when torch allows it; ignored by 16-bit dots


def _launch(kernel_fn, grid, cfg: dict, *args, **constexprs):
    """kernel_fn[grid](*args, **constexprs, **block sizes of cfg); empty grids launch nothing."""
    if any(g == 0 for g in grid):
        return
    kernel_fn[grid](*args, **constexprs, **cfg)


# ---------------------------------------------------------------------------------------------
# forward / backward
# ---------------------------------------------------------------------------------------------

def _forward(memory, x, w_gate, b_gate, w_cand, b_cand, mem_len, chunk_size, store_ctx):
    """Run the two forward launches. Returns new_memory and (u, g, c, m) (g, c, m None unless
    store_ctx); u is (B*n, d) in the weights' dtype, g/c/m (B*n, d) fp32."""
    from chunkmem.kernels.memory_update import chunk_mean_kernel, gated_scan_fwd_kernel

    B, S, d = memory.shape
    T = x.shape[1]
    n = -(-T // chunk_size)
    dev = memory.device
    u = torch.empty(B * n, d, dtype=w_gate.dtype, device=dev)
    cfg = _launch_config("pool", x.dtype, d)
    _launch(chunk_mean_kernel, (B * n, math.ceil(d / cfg["BLOCK_D"])), cfg,
            x, u, T, n, d, chunk_size)
    new_memory = torch.empty_like(memory)
    if store_ctx:
        g, c, m = torch.empty(3, B * n, d, dtype=torch.float32, device=dev).unbind(0)
    else:
        g = c = m = torch.empty(0, dtype=torch.float32, device=dev)
    cfg = _launch_config("fwd", w_gate.dtype, d, rows=n)
    _launch(gated_scan_fwd_kernel, (B, math.ceil(d / cfg["BLOCK_N"])), cfg,
            memory, u, w_gate, b_gate, w_cand, b_cand, mem_len, new_memory, g, c, m, S, n, d,
            STORE_CTX=store_ctx, INPUT_PRECISION=_dot_precision(w_gate.dtype))
    return new_memory, (u, g, c, m) if store_ctx else (u, None, None, None)


def _backward(d_new, memory, w_gate, w_cand, mem_len, u, g, c, m, T, chunk_size, needs):
    """The three backward launches; returns the six gradients (None where not needed)."""
    from chunkmem.kernels.memory_update import (
        gated_scan_bwd_kernel, input_grad_kernel, weight_grad_kernel)

    B, S, d = memory.shape
    n = -(-T // chunk_size)
    M = B * n
    dev = memory.device
    wdt = w_gate.dtype
    prec = _dot_precision(wdt)
    d_new = d_new.contiguous()
    dpre = torch.empty(2, M, d, dtype=wdt, device=dev)
    dmem = torch.empty_like(memory)
    cfg = _launch_config("bwd_scan", memory.dtype, d)
    _launch(gated_scan_bwd_kernel, (B, math.ceil(d / cfg["BLOCK_D"])), cfg,
            d_new, memory, mem_len, g, c, m, dpre[0], dpre[1], dmem, S, n, d)

    dx = dwg = dbg = dwc = dbc = None
    if needs[2] or needs[3] or needs[4] or needs[5]:
        dw = torch.empty(2, d, d, dtype=wdt, device=dev)
        db = torch.empty(2, d, dtype=wdt, device=dev)
        cfg = _launch_config("dw", wdt, d, rows=M)
        _launch(weight_grad_kernel,
                (math.ceil(d / cfg["BLOCK_N"]), math.ceil(d / cfg["BLOCK_K"]), 2), cfg,
                dpre, u, dw, db, M, d, INPUT_PRECISION=prec)
        dwg, dwc = dw[0], dw[1]
        dbg, dbc = db[0], db[1]
    if needs[1]:
        dx = torch.empty(B, T, d, dtype=wdt, device=dev)
        cfg = _launch_config("dx", wdt, d, rows=M)
        _launch(input_grad_kernel, (math.ceil(M / cfg["BLOCK_M"]), math.ceil(d / cfg["BLOCK_N"])),
                cfg, dpre[0], dpre[1], w_gate, w_cand, dx, M, n, T, chunk_size, d,
                INPUT_PRECISION=prec)
    return (dmem if needs[0] else None), dx, dwg, dbg, dwc, dbc


class _GatedMemoryUpdate(torch.autograd.Function):
    """new_memory = FIFO push of the gated recurrence; inputs are contiguous, valid, one dtype."""

    @staticmethod
    def forward(ctx, memory, x, w_gate, b_gate, w_cand, b_cand, mem_len, chunk_size):
        new_memory, (u, g, c, m) = _forward(memory, x, w_gate, b_gate, w_cand, b_cand,
                                            mem_len, chunk_size, store_ctx=True)
        ctx.save_for_backward(memory, w_gate, w_cand, mem_len, u, g, c, m)
        ctx.T = x.shape[1]
        ctx.chunk_size = chunk_size
        return new_memory

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_new):
        memory, w_gate, w_cand, mem_len, u, g, c, m = ctx.saved_tensors
        grads = _backward(d_new, memory, w_gate, w_cand, mem_len, u, g, c, m,
                          ctx.T, ctx.chunk_size, ctx.needs_input_grad[:6])
        return (*grads, None, None)


def _contiguous_inputs(memory, x, w_gate, b_gate, w_cand, b_cand, mem_len):
    """The six tensors contiguous, and mem_len as a contiguous int32 tensor (B,) on their device."""
    args = [t.contiguous() for t in (memory, x, w_gate, b_gate, w_cand, b_cand)]
    return args, mem_len.to(device=memory.device, dtype=torch.int32).contiguous()


def gated_memory_update_triton(memory, x, w_gate, b_gate, w_cand, b_cand, *, chunk_size, mem_len):
    """Gated FIFO memory update (SPEC §2) with the Triton kernels.

    memory: (B, S, d), valid slots right-aligned; x: (B, T, d); w_gate, w_cand: (d, d);
    b_gate, b_cand: (d,); mem_len: int tensor (B,) with 0 <= mem_len <= S. The arguments are
    validated by :func:`chunkmem.gated_memory_update`, not re-checked here.
    Returns (new_memory (B, S, d) in memory.dtype, new_mem_len = min(S, mem_len + n) int64 (B,)).
    """
    reason = unsupported_reason(memory, x, w_gate, b_gate, w_cand, b_cand, chunk_size=chunk_size,
                                mem_len=mem_len)
    if reason is not None:
        raise ValueError(f"gated_memory_update_triton: {reason}")
    B, S, d = memory.shape
    n = -(-x.shape[1] // chunk_size)
    new_mem_len = torch.clamp(mem_len.to(device=memory.device, dtype=torch.int64) + n, max=S)
    args, mem_len = _contiguous_inputs(memory, x, w_gate, b_gate, w_cand, b_cand, mem_len)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        new_memory = _GatedMemoryUpdate.apply(*args, mem_len, chunk_size)
    else:
        new_memory, _ = _forward(*args, mem_len, chunk_size, store_ctx=False)
    return new_memory, new_mem_len


def gated_memory_update_triton_vjp(grad_new_memory, memory, x, w_gate, b_gate, w_cand, b_cand, *,
                                   chunk_size, mem_len):
    """Gradients of gated_memory_update_triton without autograd: recompute the forward (saving
    u, g, c, m), then run the backward kernels.

    grad_new_memory: (B, S, d), the gradient of new_memory; the other arguments as for
    :func:`gated_memory_update_triton`. Returns (d memory, d x, d w_gate, d b_gate, d w_cand,
    d b_cand), shaped and typed like those inputs. For callers that cannot use autograd (a
    torch.library backward op): torch.func transforms cannot run the kernels, whose tensors must
    be plain.
    """
    args, mem_len = _contiguous_inputs(memory, x, w_gate, b_gate, w_cand, b_cand, mem_len)
    memory, x, w_gate, _, w_cand, _ = args
    _, (u, g, c, m) = _forward(*args, mem_len, chunk_size, store_ctx=True)
    return _backward(grad_new_memory, memory, w_gate, w_cand, mem_len, u, g, c, m, x.shape[1],
                     chunk_size, (True,) * 6)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile variants
# ---------------------------------------------------------------------------------------------

def _signature(kernel: str, fn, dtype: torch.dtype, constexpr_names) -> dict:
    """triton.compiler.ASTSource signature (arg name -> type string) of one kernel, in the
    order of ``fn``'s arguments."""
    t = "*" + TRITON_DTYPE[dtype]
    f32 = "*fp32"
    i32 = "i32"
    types = {
        "pool": dict(x_ptr=t, u_ptr=t, T=i32, n=i32, d=i32, C=i32),
        "fwd": dict(mem_ptr=t, u_ptr=t, wg_ptr=t, bg_ptr=t, wc_ptr=t, bc_ptr=t,
                    mem_len_ptr="*i32", out_ptr=t, g_ptr=f32, c_ptr=f32, m_ptr=f32,
                    S=i32, n=i32, d=i32),
        "bwd_scan": dict(dout_ptr=t, mem_ptr=t, mem_len_ptr="*i32", g_ptr=f32, c_ptr=f32,
                         m_ptr=f32, dpg_ptr=t, dpc_ptr=t, dmem_ptr=t, S=i32, n=i32, d=i32),
        "dw": dict(dpre_ptr=t, u_ptr=t, dw_ptr=t, db_ptr=t, M=i32, d=i32),
        "dx": dict(dpg_ptr=t, dpc_ptr=t, wg_ptr=t, wc_ptr=t, dx_ptr=t,
                   M=i32, n=i32, T=i32, C=i32, d=i32),
    }[kernel]
    types.update({name: "constexpr" for name in constexpr_names})
    return {name: types[name] for name in fn.arg_names}


def compile_variants(full: bool = False) -> list:
    """Kernel variants for ahead-of-time compilation checks.

    One dict per distinct compiled kernel the launcher can pick: keys name, fn (the @triton.jit
    function), signature (arg -> triton type string, as ``triton.compiler.ASTSource`` expects),
    constexprs (name -> value), num_warps, num_stages. Covers fp32 (IEEE and TF32 dots), fp16
    and bf16, both values of the forward's STORE_CTX, and the smallest (d = 16, one summary row)
    and largest (d >= 64 up to 4096, >= 64 rows) block choices of :func:`_launch_config`;
    ``full=True`` adds every block choice in between (d = 32; 32 rows).
    """
    from chunkmem.kernels import memory_update as K

    fns = {"pool": K.chunk_mean_kernel, "fwd": K.gated_scan_fwd_kernel,
           "bwd_scan": K.gated_scan_bwd_kernel, "dw": K.weight_grad_kernel,
           "dx": K.input_grad_kernel}
    out, seen = [], set()
    for dtype in _SUPPORTED_DTYPES:
        tname = TRITON_DTYPE[dtype]
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
        for d in ((16, 32, MAX_D) if full else (16, MAX_D)):
            for rows in ((1, 32, 4096) if full else (1, 4096)):
                for kernel, fn in fns.items():
                    cfg = _launch_config(kernel, dtype, d, rows=rows)
                    constexprs = {k: v for k, v in cfg.items() if k.isupper()}
                    if kernel == "fwd":
                        extra = [dict(STORE_CTX=s, INPUT_PRECISION=p)
                                 for s in (False, True) for p in precisions]
                    elif kernel in ("dw", "dx"):
                        extra = [dict(INPUT_PRECISION=p) for p in precisions]
                    else:
                        extra = [{}]
                    for ex in extra:
                        ce = dict(constexprs, **ex)
                        key = (kernel, tname, tuple(sorted(ce.items())), cfg["num_warps"],
                               cfg["num_stages"])
                        if key in seen:
                            continue
                        seen.add(key)
                        tag = "_".join(f"{k}{v}" for k, v in sorted(ce.items()))
                        out.append(dict(
                            name=f"memory_update.{kernel}.{tname}.{tag}",
                            fn=fn, signature=_signature(kernel, fn, dtype, ce.keys()),
                            constexprs=ce, num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"]))
    return out
