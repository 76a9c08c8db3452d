"""Triton backend of hybrid attention (SPEC §1, §1b): autograd wrapper, block sizes, compile variants.

The kernels are in :mod:`chunkmem.kernels.hybrid_attention`; arguments arrive in the normalized
form of :mod:`chunkmem.ops` (q (B, H, Tq, D); k, v (B, G, Tk, D); mem_k, mem_v (Bm, G, S, D) or
None; weights (H, 3) fp32; mem_len (Bm,) int or None; start_pos an int or an int64 tensor (Bm,);
kv_start, kv_end int32 (B,) or None; cu_seqlens_q, cu_seqlens_k int32 (N+1,) or None, with
B = 1 and Bm = N, and max_seqlen_q / max_seqlen_k ints).

Rows. The grids' second axis runs over the R rows: the B batch rows, or the N packed documents.
The per-row key ranges and document bounds, and the chunk phases that the wrapper derives from
the start positions on the device, are read by the kernels from device tensors (no host sync,
no .item()); the kernels skip the key tiles without a valid key and, for documents, the blocks
past the document's length. With none of them (kv ranges None,
not packed, start_pos an int) the kernels compile without that code (the RANGES and PACKED
constexprs off): the v1 code path. A start_pos tensor alone runs the ranged code with the full
range (0, Tk).

Launches:
- RoPE (when rope_base is set): rope_rotate_kernel writes the rotated q and k once per call
  (grid (cdiv(T, 4096 // D), R, heads)), so no RoPE math runs inside the attention loops; the backward
  rotates them again rather than saving them (two elementwise passes against keeping
  (B, H, Tq, D) + (B, G, Tk, D) alive between forward and backward).
- forward: one kernel, grid (cdiv(Tq, BLOCK_M), R, H) (max_seqlen_q instead of Tq when packed).
  All three paths in one pass; the chunk path reuses the global path's QK^T tiles.
- backward: four kernels, all deterministic (no atomics):
  1. preprocess, grid (cdiv(Tq, BLOCK_M), R, H): the per-row statistics DI_p = w_p rowsum(dO * O_p)
     of each path, from rowsum(dO * out) and a recomputation of the cheap paths (memory slots,
     chunk window), and DW_p = rowsum(dO * O_p) of those cheap paths;
  2. dq, grid (cdiv(Tq, BLOCK_M), R, H), all paths, plus DW of the remaining ("derived") path;
  3. dk/dv, grid (cdiv(Tk, BLOCK_N), R, G) (max_seqlen_k when packed), looping over the H/G
     query heads of the group;
  4. dmem_k/dmem_v, grid (cdiv(S, BLOCK_N) * n_split, R, G): each program takes one of n_split
     contiguous ranges of query blocks (_dmem_split: about 264 programs when rows are long) and
     writes fp32 partials that are summed in a fixed order (deterministic).
  dweights[h, p] = sum_{b,i} DW[b, h, p, i] (a small torch reduction of the (B, H, 3, Tq) DW).

Entry points: ``hybrid_attention_triton`` (autograd); ``hybrid_attention_triton_forward`` and
``hybrid_attention_triton_backward`` (the same two halves without autograd, for the torch.library
ops, which save the forward's LSE themselves); ``unsupported_reason`` (the caller falls back to the
torch backend when it returns a string), ``block_config`` / ``compile_variants`` (launch
configurations, shared by the launches and ``python -m chunkmem.compile_check``).

Precision: softmax statistics and accumulators in fp32; fp16/bf16 tiles feed the tensor cores,
fp32 inputs use exact fp32 dots. RoPE angles are exact fixed-point (see the kernels' ``_rope``).
Unsupported (-> torch backend): head dims other than 32/64/128/256, the backward at D = 256
on a GPU (no spill-free configuration), bf16 in the interpreter, pre-sm_80 GPUs, rows (B, or
N documents) or H above 65535 (CUDA grid axes), T * D >= 2**31; with an int start_pos and
neither kv ranges nor documents, positions start_pos + Tk outside int32 (the v1 code path
computes positions in int32). The ranged and packed code needs no such check (which, for a
start_pos tensor, would cost a device sync): RoPE depends on relative positions only, so the
kernels rotate at each row's key indices, and the start positions enter only through each
row's chunk phase, computed here on the device in int64.

Activation memory saved for the backward, beyond the inputs and the output: LSE (B, H, 3, Tq)
fp32 (log2 units), 12 bytes per query row and head, O(B*H*Tq) as SPEC §1 asks. The per-path
outputs are not saved; the backward gets what it needs of them (rowsum(dO * O_p) per row) from
the output and a recomputation of the memory and chunk paths, whose cost is O(Tq * (S + C))
against the global path's O(Tq * Tk) (see the kernels' docstring). The backward allocates two
more (B, H, 3, Tq) fp32 buffers, DI and DW, while it runs.
"""
from __future__ import annotations

import itertools
import math

import torch

from chunkmem.triton_env import TRITON_DTYPE, interpreting

__all__ = [
    "hybrid_attention_triton",
    "hybrid_attention_triton_forward",
    "hybrid_attention_triton_backward",
    "unsupported_reason",
    "block_config",
    "compile_variants",
    "SUPPORTED_HEAD_DIMS",
]

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_KINDS = ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv", "bwd_dmem")
BACKWARD_KINDS = KERNEL_KINDS[1:]


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, BLOCK_W[, BLOCK_S]]) per kernel kind, element size
# (2 or 4 bytes) and D: the launch configurations of sm_80, and of sm_90 where _SM90_CONFIGS has
# no entry (fp32). BLOCK_M indexes queries, BLOCK_N keys (or memory slots); the optional entries
# are block_config's BLOCK_W and BLOCK_S. Every entry compiles with no spill, with Triton 3.6 (the
# GPU machine's) and with the newest Triton, as launches on 16-byte-aligned tensors compile it,
# with and without the divisible-by-16 hints that integer arguments such as T get (these hints
# change the code, and the spills), and with shared memory under the sm_90 limit and, for sm_80
# (whose entries also launch on sm_86/sm_89), under those GPUs' 99 KB:
# `python -m chunkmem.compile_check` (.ci/run runs it under both). The registers ptxas
# allocates jump erratically with the configuration and the Triton version (a neighbour of a
# spill-free entry often spills), so each entry was picked from a sweep, not by timing (no GPU
# was available). fp16/bf16 at D = 64 and 128: the spill-free candidate with the lowest cost in
# the static report (`--cost --arch 80 --set ...`); at D = 128 the forward takes 128 queries x
# 32 keys on 8 warps (16-key chunk tiles and 16 memory slots beside the global accumulator;
# 64-key tiles spill 8-32 bytes there), dq 128 x 32, dk/dv 64 queries x 32 keys on 4 warps
# (64-key blocks spill 24-100 bytes at 4 and 8 warps); at D = 64 the forward 128 x 64, dk/dv
# 64 x 64. The fp16/bf16 D = 32 and the fp32 entries were swept for spills only. fp32 uses exact
# ("ieee") dots, which run on FMA units: small tiles, many warps. The backward at D = 256 has no
# entries, in any dtype, and goes to the torch backend (unsupported_reason): its dq and dk/dv
# kernels spill at every configuration tried (fp16: 16 x 16 to 32 x 32 tiles, 2-16 warps, 1-2
# stages; at best 8 bytes, or spill-free under one Triton version only).
_GPU_CONFIGS = {
    ("fwd", 2): {32: (64, 32, 4, 2), 64: (128, 64, 8, 2, 64, 32), 128: (128, 32, 8, 3, 16, 16),
                 256: (16, 32, 8, 1)},
    ("bwd_preprocess", 2): {32: (64, 32, 4, 2), 64: (128, 32, 8, 2), 128: (64, 32, 4, 2)},
    ("bwd_dq", 2): {32: (64, 32, 4, 2), 64: (128, 32, 8, 2), 128: (128, 32, 8, 2)},
    ("bwd_dkdv", 2): {32: (32, 32, 4, 2), 64: (64, 64, 4, 1, 64), 128: (64, 32, 4, 2, 32)},
    ("bwd_dmem", 2): {32: (32, 32, 4, 1), 64: (64, 32, 2, 1), 128: (32, 32, 4, 1)},
    ("fwd", 4): {32: (16, 16, 4, 1), 64: (16, 16, 8, 1), 128: (16, 16, 4, 1), 256: (16, 16, 8, 1)},
    ("bwd_preprocess", 4): {32: (16, 16, 4, 2), 64: (16, 16, 4, 2), 128: (16, 16, 8, 2)},
    ("bwd_dq", 4): {32: (16, 16, 8, 2), 64: (16, 16, 8, 2), 128: (16, 16, 8, 2)},
    ("bwd_dkdv", 4): {32: (16, 16, 4, 2), 64: (16, 16, 8, 2), 128: (32, 16, 16, 1)},
    ("bwd_dmem", 4): {32: (16, 16, 8, 1), 64: (16, 16, 2, 1), 128: (16, 16, 8, 1)},
}


# Hopper (sm_90) replacements of _GPU_CONFIGS entries. On sm_90 Triton lowers a tl.dot to
# wgmma (the warpgroup MMA; HGMMA in SASS) only when the dot's M dimension is at least 64;
# smaller tiles get Ampere's mma.sync, a slower path on Hopper. A warpgroup (4 warps) owns 64
# rows of an MMA: with 8 warps a 64-row tile is computed twice (both warpgroups), so the tiles
# here give each warpgroup its own 64 rows (128 rows with 8 warps, 64 with 4). D = 128, the
# shape of the static cost report (python -m chunkmem.compile_check --cost): forward 128
# queries x 128 keys in its unmasked loop (one accumulator) and 16-key tiles (BLOCK_W, the 5th
# entry) in its masked and memory loops, which carry two accumulators; dq 128 x 64; dk/dv
# key-major (KEY_MAJOR: the key block is every dot's M dimension) 128 keys x 64 queries in the
# unmasked loop, 16 queries in the masked one; dmem 64 slots x 32 queries, 4 warps (memories
# are short: 128-slot tiles would be mostly padding). Where no 64-row tile fits (the forward
# at D = 256) sm_90 keeps the 16 x 32 tile, with 3 stages: with 1 (the sm_80 entry) the bf16
# kernel spills 8 bytes on sm_90 under Triton 3.6 (16 x 16 / 4 warps fits there but spills
# under 3.9; swept 2-16 warps, 16-64 keys, 1-3 stages). Every entry is spill-free under both
# Tritons in every row layout (or replaced in _SM90_LAYOUT_CONFIGS); not timed. At D = 64 the
# same shapes fit with wider key tiles (forward: 128-key chunk tiles, 64 memory slots; dk/dv
# 32-query masked tiles; dmem 64 x 64), picked with the cost report at --head-dim 64 (before,
# the generic 64-row tiles at 8 warps replicated MMA work, 1.5-1.67x, and ran 3.1-5.7x the
# yardstick); D = 32 takes the same forward, preprocess and dq tiles (before: 64 x 32 tiles on
# 4 warps, main loops 1.6-1.8x the yardstick).
_SM90_CONFIGS = {
    ("fwd", 2): {32: (128, 128, 8, 2, 128, 64), 64: (128, 128, 8, 2, 128, 64),
                 128: (128, 128, 8, 2, 64, 16), 256: (16, 32, 8, 3)},
    ("bwd_preprocess", 2): {32: (128, 64, 8, 2), 64: (128, 64, 8, 2), 128: (128, 64, 8, 2)},
    ("bwd_dq", 2): {32: (128, 64, 8, 2), 64: (128, 64, 8, 2), 128: (128, 64, 8, 2)},
    ("bwd_dkdv", 2): {32: (32, 64, 4, 2), 64: (64, 128, 8, 2, 32), 128: (64, 128, 8, 2, 16)},
    ("bwd_dmem", 2): {32: (32, 64, 4, 1), 64: (64, 64, 4, 1), 128: (32, 64, 4, 1)},
}


# Replacements of _SM90_CONFIGS entries for one row layout (a ROW_LAYOUTS suffix) whose code
# needs more registers, under Triton 3.9: the per-row key ranges' forward spills 72 bytes at
# 128 x 128 and its dq 8 bytes at 128 x 64; the packed documents' dk/dv 72 bytes at 64 queries;
# at D = 32 the ranges' forward 8 bytes at 128 x 128.
_SM90_LAYOUT_CONFIGS = {
    ("fwd", 2, "_ranges"): {32: (128, 64, 8, 2, 64, 64), 128: (128, 64, 8, 2, 64, 16)},
    ("bwd_dq", 2, "_ranges"): {128: (128, 32, 8, 2)},
    ("bwd_dkdv", 2, "_packed"): {128: (32, 128, 8, 2, 16)},
}


# Replacements by arch family (80 or 90) and launch variant: row layout + path set, the name
# suffix of compile_variants ("_packed", "_linear" = no global path, "_ranges_linear", ...).
# The linear-cost mode has its own code (the chunk path alone takes BLOCK_N-key / BLOCK_M-query
# tiles inside the chunks; without the held global state the sm_90 memory loop takes 64-slot
# tiles); until it had variants the compile check did not compile it, and its fp32 code spilled
# 8-16 bytes in 12 compiles. Each entry replaces one that spilled (8-56 bytes) under Triton 3.9
# or 3.6, found by a sweep under both; the fp32 dq with per-row ranges on sm_90 (8 bytes under
# 3.6 once the backward derived the global P from the chunk's) takes 3 stages instead of 2.
# sm_80 at D = 128, fp16/bf16: the linear-mode forward (no held global accumulator) fits
# 128 x 64 tiles and 32 memory slots; dq with per-row ranges spills 16 bytes at 2 stages, the
# linear-mode dk/dv 8 bytes (without the integer hints, under 3.9) at 2; at D = 64 dk/dv spills
# 8 bytes with per-row ranges at 1 stage and with packed documents at 64 keys (its 32-key
# blocks compile to 1.5x the useful MMA work).
_VARIANT_CONFIGS = {
    ("fwd", 4, 80, "_packed"): {128: (16, 16, 4, 2)},
    ("fwd", 4, 90, "_ranges"): {64: (16, 16, 8, 2)},
    ("fwd", 2, 90, "_linear"): {128: (128, 128, 8, 2, 64, 64)},
    ("fwd", 2, 90, "_ranges_linear"): {128: (128, 128, 8, 2, 64, 64)},
    ("fwd", 2, 90, "_packed_linear"): {128: (128, 128, 8, 2, 64, 64)},
    ("fwd", 2, 80, "_linear"): {128: (128, 64, 8, 2, 64, 32), 256: (16, 32, 8, 2)},
    ("fwd", 2, 80, "_ranges_linear"): {128: (128, 64, 8, 2, 64, 32), 256: (16, 32, 8, 2)},
    ("fwd", 2, 80, "_packed_linear"): {128: (128, 64, 8, 2, 64, 32), 256: (16, 32, 8, 2)},
    ("bwd_dq", 2, 80, "_ranges"): {128: (128, 32, 8, 1)},
    ("bwd_dq", 2, 80, "_ranges_linear"): {128: (128, 32, 8, 1)},
    ("bwd_dkdv", 2, 80, "_linear"): {128: (64, 32, 4, 1, 32)},
    ("fwd", 4, 80, "_ranges_linear"): {128: (16, 16, 4, 2), 256: (16, 16, 8, 2)},
    ("fwd", 4, 90, "_ranges_linear"): {128: (16, 16, 4, 2)},
    ("fwd", 4, 80, "_packed_linear"): {256: (16, 16, 8, 2)},
    ("bwd_dq", 4, 80, "_packed_linear"): {32: (16, 16, 8, 1), 64: (16, 16, 8, 3)},
    ("bwd_dq", 4, 90, "_ranges"): {128: (16, 16, 8, 3)},
    ("bwd_dkdv", 2, 90, "_linear"): {128: (32, 128, 8, 2, 16)},
    ("bwd_dkdv", 2, 80, "_ranges"): {64: (64, 64, 4, 3, 64)},
    ("bwd_dkdv", 2, 80, "_packed"): {64: (64, 32, 4, 2, 64)},
    ("bwd_dkdv", 2, 80, "_packed_linear"): {64: (64, 32, 4, 2, 64)},
    ("bwd_dkdv", 4, 90, "_linear"): {32: (16, 16, 4, 1), 64: (16, 16, 8, 3)},
    ("bwd_dkdv", 4, 90, "_ranges_linear"): {64: (16, 16, 8, 3)},
}


def gpu_arch(device) -> int:
    """The configuration family of a CUDA device: 90 for Hopper and newer, else 80."""
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def has_gpu_config(kind: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `kind` has a spill-free GPU launch configuration for this dtype and D."""
    return head_dim in _GPU_CONFIGS[(kind, 4 if dtype == torch.float32 else 2)]


def block_config(kind: str, dtype: torch.dtype, head_dim: int, interpret: bool | None = None,
                 arch: int = 80, layout: str = "", mode: str = ""):
    """Launch configuration of one kernel: dict(BLOCK_M, BLOCK_N, num_warps, num_stages,
    KEY_MAJOR, and for the forward BLOCK_W, the key tile of the chunk path beside the global
    one, and BLOCK_S, the memory loop's slot tile; for dk/dv BLOCK_W, the masked loops' query
    tile);
    KEY_MAJOR (dk/dv and dmem kernels) goes with the sm_90 entries. layout: the launch's row
    layout (a ROW_LAYOUTS suffix); mode: its path set (a PATH_SETS suffix, see path_mode).

    kind: one of KERNEL_KINDS; dtype: q's dtype; head_dim: D; arch: 80 or 90 (gpu_arch). Under
    the Triton interpreter the blocks are 16 x 16 (smallest tl.dot size) so that small test
    shapes span several blocks.
    """
    if interpret is None:
        interpret = interpreting()
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, KEY_MAJOR=False,
                    **({"BLOCK_W": 16} if kind in ("fwd", "bwd_dkdv") else {}),
                    **({"BLOCK_S": 16} if kind == "fwd" else {}))
    if not has_gpu_config(kind, dtype, head_dim):
        raise ValueError(f"no spill-free GPU configuration of kernel {kind} for {dtype}, D={head_dim} "
                         "(unsupported_reason reports this case)")
    key = (kind, 4 if dtype == torch.float32 else 2)
    hopper = _SM90_CONFIGS.get(key, {}) if arch >= 90 else {}
    if arch >= 90:
        hopper = {**hopper, **_SM90_LAYOUT_CONFIGS.get(key + (layout,), {})}
    entry = hopper.get(head_dim, _GPU_CONFIGS[key][head_dim])
    variant = _VARIANT_CONFIGS.get(key + (90 if arch >= 90 else 80, layout + mode), {})
    entry = variant.get(head_dim, entry)
    bm, bn, warps, stages, *tiles = entry
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
               KEY_MAJOR=kind in ("bwd_dkdv", "bwd_dmem") and head_dim in hopper)
    if kind == "fwd":  # key tiles of the forward's chunk loops (beside the global path) and
        # memory loop: the 5th and 6th entries, by default BLOCK_N and the 5th
        cfg["BLOCK_W"] = tiles[0] if tiles else bn
        cfg["BLOCK_S"] = tiles[1] if len(tiles) > 1 else cfg["BLOCK_W"]
    elif kind == "bwd_dkdv":  # query tile of the dk/dv kernel's masked loop
        cfg["BLOCK_W"] = tiles[0] if tiles else bm
    return cfg


def unsupported_reason(q, k, v, mem_k, mem_v, weights, mem_len, *, chunk_size, use_global,
                       rope_base, start_pos, scale, kv_start=None, kv_end=None, cu_seqlens_q=None,
                       cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """None when the kernels handle these (normalized) arguments, else a string saying why not.
    Reads shapes and Python ints only (no device sync)."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported (fp32, fp16, bf16)"
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head dim {D} is not supported by the kernels (one of {SUPPORTED_HEAD_DIMS})"
    if q.device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            return "the kernels need an sm_80 or newer GPU"
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, mem_k, mem_v, weights))
        if needs_grad and not all(has_gpu_config(kind, q.dtype, D) for kind in BACKWARD_KINDS):
            return (f"no spill-free backward kernel configuration for {q.dtype} at head dim {D} "
                    "(the backward kernels need D <= 128)")
    elif q.device.type == "cpu":
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        if q.dtype == torch.bfloat16:
            return "bf16 tl.dot is not supported by the Triton interpreter"
    else:
        return f"device {q.device.type} is not supported"
    if max(q.shape[2], k.shape[2], mem_k.shape[2] if mem_k is not None else 0) * D >= 2 ** 31:
        return "sequence too long for 32-bit in-head offsets (T * D >= 2**31)"
    packed = cu_seqlens_q is not None
    rows = cu_seqlens_q.shape[0] - 1 if packed else q.shape[0]
    if max(rows, q.shape[1]) > 65535:
        return "B (or documents) or H > 65535 exceeds the CUDA grid's second or third axis"
    if not _wide(start_pos, kv_start, cu_seqlens_q) and start_pos + k.shape[2] >= 2 ** 31:
        return "positions start_pos .. start_pos + Tk must fit in int32"
    return None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rope_step(head_dim: int, rope_base: float | None, device):
    """RoPE frequencies for the kernels' fixed-point angles: (D/2,) int64, theta_t / (2 pi) in
    units of 2**-48 turns, theta_t = rope_base ** (-2t/D) computed in float64."""
    if rope_base is None:
        return torch.zeros(head_dim // 2, dtype=torch.int64, device=device)
    t = torch.arange(head_dim // 2, dtype=torch.float64)
    theta = rope_base ** (-2.0 * t / head_dim)
    return torch.round(theta / (2 * math.pi) * 2.0 ** 48).to(torch.int64).to(device)


def _arch(q) -> int:
    """block_config's arch for q's device (80 for CPU tensors: the interpreter ignores it)."""
    return gpu_arch(q.device) if q.device.type == "cuda" else 80


def _wide(start_pos, kv_start, cu_seqlens_q) -> bool:
    """Whether a call runs the kernels' per-row code (RANGES or PACKED): kv ranges, packed
    documents or a start_pos tensor."""
    return kv_start is not None or cu_seqlens_q is not None or isinstance(start_pos, torch.Tensor)


def _kernel_chunk(chunk_size, Tk: int) -> int:
    """The chunk_size kernel argument: 1 (unused) without a chunk path, else chunk_size, or
    Tk + 1 when chunk_size > Tk (see _kernel_phase), which keeps the kernels' chunk arithmetic
    in int32."""
    if chunk_size is None:
        return 1
    return int(chunk_size) if chunk_size <= Tk else Tk + 1


def _kernel_phase(shift, chunk_size, Tk: int):
    """Chunk phase for the kernels, of shift = the position of key index 0 (an int, or an int64
    tensor of one per row, computed on its device). Chunks are counted by position (key j is in
    chunk (shift + j) // chunk_size); the kernels work in key indices with chunks of
    _kernel_chunk keys and this phase. chunk_size > Tk: at most one chunk boundary among the
    keys 0 .. Tk - 1, the first at or after key 0 (or none, when that one is at Tk or later),
    kept as the boundary of chunks of Tk + 1 keys."""
    if chunk_size is None:
        return shift * 0
    C = int(chunk_size)
    phase = shift % C  # Python's and torch's remainder: in [0, C)
    if C <= Tk:
        return phase
    first = (C - phase) % C
    first = first.clamp(max=Tk) if isinstance(first, torch.Tensor) else min(first, Tk)
    return (Tk + 1 - first) % (Tk + 1)


_DUMMIES = {}


def _dummy(device, dtype):
    """A one-element tensor for a pointer argument that the launched code never reads."""
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


def _row_args(q, k, chunk_size, start_pos, kv_start, kv_end, cu_q, cu_k, max_sq, max_sk):
    """The kernels' row arguments -> dict(ptrs=(KV_START, KV_END, CU_Q, CU_K, PHASE),
    ints=(chunk_size, chunk_phase, start_pos), flags=dict(RANGES, PACKED), R (grid rows),
    nq, nk (the longest row's queries and keys, for the grids)). Tensors stay on the device:
    a start_pos tensor alone gets kv ranges (0, Tk), and the rows' chunk phases are computed
    there (a few small elementwise ops, no sync)."""
    dev = q.device
    Tq, Tk = q.shape[2], k.shape[2]
    packed = cu_q is not None
    wide = _wide(start_pos, kv_start, cu_q)
    R = cu_q.shape[0] - 1 if packed else q.shape[0]
    i32 = _dummy(dev, torch.int32)
    ranges = wide and not packed
    if ranges and kv_start is None:
        kv_start = torch.zeros(R, dtype=torch.int32, device=dev)
        kv_end = torch.full((R,), Tk, dtype=torch.int32, device=dev)
    phases = None
    if wide:  # the position of key index 0 of each row, in int64
        shift = (start_pos.to(device=dev, dtype=torch.int64) if isinstance(start_pos, torch.Tensor)
                 else torch.full((R,), int(start_pos), dtype=torch.int64, device=dev))
        if ranges:
            shift = shift - kv_start.to(device=dev, dtype=torch.int64)
        phases = _kernel_phase(shift, chunk_size, Tk)

    def i32c(t):
        return i32 if t is None else t.to(device=dev, dtype=torch.int32).contiguous()

    return dict(
        ptrs=(i32c(kv_start if ranges else None), i32c(kv_end if ranges else None),
              i32c(cu_q), i32c(cu_k), i32c(phases)),
        ints=(_kernel_chunk(chunk_size, Tk),
              0 if wide else _kernel_phase(int(start_pos), chunk_size, Tk),
              0 if wide else int(start_pos)),
        flags=dict(RANGES=ranges, PACKED=packed), R=R,
        nq=Tq if not packed or max_sq is None else int(max_sq),
        nk=Tk if not packed or max_sk is None else int(max_sk))


def _mem_len_i32(mem_len, device):
    """mem_len (B,) as contiguous int32 on the device; a dummy when there is no memory."""
    if mem_len is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return mem_len.to(device=device, dtype=torch.int32).contiguous()


def _dot_precision(dtype) -> str:
    """tl.dot input precision: exact products for fp32 ("ieee", as torch with TF32 off; TF32 and
    3xTF32 variants spilled registers at every tile size tried); fp16/bf16 dots ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def path_mode(kind: str, constexprs: dict) -> str:
    """The PATH_SETS suffix of a launch of kernel `kind` with these constexprs: "_linear" for
    the LINEAR_KINDS without the global path but with the chunk path, else ""."""
    linear = (kind in LINEAR_KINDS and not constexprs.get("USE_GLOBAL", True)
              and constexprs.get("HAS_CHUNK", False))
    return "_linear" if linear else ""


def _launch(kernel, kind, q, n, rows, heads, *args, **constexprs):
    """Launch `kernel`, of KERNEL_KINDS `kind`, with block_config's configuration for q's dtype,
    head dim and device: grid (cdiv(n, block), rows, heads), the block being BLOCK_N for the kernels
    over key (or slot) blocks, which also take KEY_MAJOR, else BLOCK_M. HEAD_DIM, the block sizes
    and DOT_PREC join the other constexprs."""
    D = q.shape[-1]
    layout = "_ranges" if constexprs["RANGES"] else "_packed" if constexprs["PACKED"] else ""
    cfg = block_config(kind, q.dtype, D, arch=_arch(q), layout=layout,
                       mode=path_mode(kind, constexprs))
    over_keys = kind in ("bwd_dkdv", "bwd_dmem")
    if over_keys:
        constexprs["KEY_MAJOR"] = cfg["KEY_MAJOR"]
    if kind in ("fwd", "bwd_dkdv"):
        constexprs["BLOCK_W"] = cfg["BLOCK_W"]
    if kind == "fwd":
        constexprs["BLOCK_S"] = cfg.get("BLOCK_S", cfg["BLOCK_W"])
    grid = (triton_cdiv(n, cfg["BLOCK_N" if over_keys else "BLOCK_M"]), rows, heads)
    kernel[grid](*args, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 DOT_PREC=_dot_precision(q.dtype), **constexprs,
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# Warps of the RoPE kernel, and its rows per program on a GPU (16 under the interpreter): 4096
# elements per program (its fixed-point angles are int64 per element; 64 rows at D = 256
# spilled).
_ROPE_WARPS = 4


def _rope_block(head_dim: int) -> int:
    return 4096 // head_dim


def _rotated(x, queries: bool, ra, rope_base, Tq: int, Tk: int):
    """RoPE of q (queries) or k at the positions the attention kernels use (see the kernels'
    rope_rotate_kernel), as a new tensor of x's dtype; x itself when rope_base is None."""
    from chunkmem.kernels.hybrid_attention import rope_rotate_kernel

    if rope_base is None or x.numel() == 0:
        return x
    B, heads, T, D = x.shape
    block = 16 if interpreting() else _rope_block(D)
    n = ra["nq"] if queries else ra["nk"]
    xr = torch.empty_like(x)
    rope_rotate_kernel[(triton_cdiv(n, block), ra["R"], heads)](
        x, xr, _rope_step(D, rope_base, x.device), *ra["ptrs"], T, Tq, Tk, ra["ints"][2],
        HEAD_DIM=D, BLOCK=block, QUERIES=queries, **ra["flags"], num_warps=_ROPE_WARPS)
    return xr


def _forward_impl(q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base,
                  start_pos, scale, kv_start, kv_end, cu_q, cu_k, max_sq, max_sk):
    """Launch the forward kernel -> (out (B, H, Tq, D), lse (B, H, 3, Tq) fp32)."""
    from chunkmem.kernels.hybrid_attention import hybrid_attention_fwd_kernel

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    has_mem = mem_k is not None
    has_chunk = chunk_size is not None
    if has_mem:
        mem_k, mem_v = mem_k.contiguous(), mem_v.contiguous()
        S = mem_k.shape[2]
    else:
        mem_k = mem_v = q  # dummy pointers, never read
        S = 0
    mem_len = _mem_len_i32(mem_len, q.device)
    w = weights.detach().to(device=q.device, dtype=torch.float32).contiguous()
    out = torch.empty_like(q)
    # Rows of paths that are off stay 0 (lse is an output of the torch.library op: no junk).
    lse = torch.zeros(B, H, 3, Tq, dtype=torch.float32, device=q.device)
    if out.numel() > 0:
        ra = _row_args(q, k, chunk_size, start_pos, kv_start, kv_end, cu_q, cu_k, max_sq, max_sk)
        qr = _rotated(q, True, ra, rope_base, Tq, Tk)
        kr = _rotated(k, False, ra, rope_base, Tq, Tk)
        _launch(hybrid_attention_fwd_kernel, "fwd", q, ra["nq"], ra["R"], H,
                q, qr, kr, v, mem_k, mem_v, w, mem_len, out, lse,
                *ra["ptrs"], H, G, Tq, Tk, S, *ra["ints"], float(scale) * math.log2(math.e),
                USE_GLOBAL=bool(use_global), HAS_CHUNK=has_chunk, HAS_MEM=has_mem,
                **ra["flags"])
    return out, lse


class _HybridAttentionFn(torch.autograd.Function):
    """Autograd of the fused kernels: forward returns (out, lse); lse is a non-differentiable
    statistic saved, with out, for the backward."""

    @staticmethod
    def forward(*args):
        return _forward_impl(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global, rope_base, start_pos,
         scale, kv_start, kv_end, cu_q, cu_k, max_sq, max_sk) = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        # The row tensors are inputs (no extra memory); a start_pos tensor travels with them.
        sp_tensor = start_pos if isinstance(start_pos, torch.Tensor) else None
        ctx.save_for_backward(q, k, v, mem_k, mem_v, weights, mem_len, out, lse,
                              kv_start, kv_end, cu_q, cu_k, sp_tensor)
        ctx.meta = _meta(mem_k, chunk_size, use_global, rope_base,
                         None if sp_tensor is not None else start_pos, scale, max_sq, max_sk)

    @staticmethod
    def backward(ctx, dout, _dlse):
        *saved, kv_start, kv_end, cu_q, cu_k, sp_tensor = ctx.saved_tensors
        meta = dict(ctx.meta, kv_start=kv_start, kv_end=kv_end, cu_q=cu_q, cu_k=cu_k)
        if sp_tensor is not None:
            meta["start_pos"] = sp_tensor
        grads = _backward_impl(dout, *saved, meta, ctx.needs_input_grad)
        return (*grads, None) + (None,) * 11


# Programs the dmem kernel aims for: two per SM of an H100/H200 (132 SMs).
_DMEM_TARGET_PROGRAMS = 264


def _dmem_split(q, S: int, n_queries: int, rows_x_groups: int) -> tuple:
    """(n_split, padded slot count) of the dmem launch: its grid is (cdiv(S, BLOCK_N) * n_split,
    rows, G), each program taking one of n_split contiguous ranges of (at least two) query
    blocks, so that B * G * slot blocks programs too few for the GPU (8 at B=1, G=8, S=64) become
    about _DMEM_TARGET_PROGRAMS when the rows are long."""
    cfg = block_config("bwd_dmem", q.dtype, q.shape[-1], arch=_arch(q))
    slot_blocks = triton_cdiv(S, cfg["BLOCK_N"])
    wanted = triton_cdiv(_DMEM_TARGET_PROGRAMS, slot_blocks * rows_x_groups)
    n_split = max(1, min(wanted, triton_cdiv(n_queries, cfg["BLOCK_M"]) // 2))
    return n_split, slot_blocks * cfg["BLOCK_N"]


def _meta(mem_k, chunk_size, use_global, rope_base, start_pos, scale, max_sq, max_sk, **rows):
    """The forward's non-tensor arguments for _backward_impl (rows: kv_start, kv_end, cu_q,
    cu_k)."""
    return dict(chunk_size=chunk_size, use_global=bool(use_global),
                has_chunk=chunk_size is not None, has_mem=mem_k is not None,
                rope_base=rope_base, start_pos=start_pos, scale=float(scale), max_sq=max_sq,
                max_sk=max_sk, **rows)


def _backward_impl(dout, q, k, v, mem_k, mem_v, weights, mem_len, out, lse, m, need):
    """Launch the backward kernels -> (dq, dk, dv, dmem_k, dmem_v, dweights); m: the forward's
    meta dict (see _meta), need: which of the six gradients are wanted (others may be zeros or
    None)."""
    from chunkmem.kernels.hybrid_attention import (
        hybrid_attention_bwd_dkdv_kernel,
        hybrid_attention_bwd_dmem_kernel,
        hybrid_attention_bwd_dq_kernel,
        hybrid_attention_bwd_preprocess_kernel,
    )

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    S = mem_k.shape[2] if m["has_mem"] else 0
    if m["has_mem"]:
        mem_k, mem_v = mem_k.contiguous(), mem_v.contiguous()
    else:
        mem_k = mem_v = q
    mem_len = _mem_len_i32(mem_len, q.device)
    w = weights.detach().to(device=q.device, dtype=torch.float32).contiguous()
    rope_step = _rope_step(D, m["rope_base"], q.device)
    ra = _row_args(q, k, m["chunk_size"], m["start_pos"], m["kv_start"], m["kv_end"], m["cu_q"],
                   m["cu_k"], m["max_sq"], m["max_sk"])
    ptrs, R = ra["ptrs"], ra["R"]
    dout = dout.contiguous()
    paths = dict(USE_GLOBAL=m["use_global"], HAS_CHUNK=m["has_chunk"], **ra["flags"])
    rope = dict(ROPE=m["rope_base"] is not None)
    qk_scale = m["scale"] * math.log2(math.e)
    run = dout.numel() > 0
    run_dq = run and (need[0] or need[5])  # the dq kernel also sums the derived path's DW
    run_dkdv = run and (need[1] or need[2]) and (m["use_global"] or m["has_chunk"])
    run_dmem = run and (need[3] or need[4])  # need[3] implies memory is on
    # The kernels write every valid row of the gradients they compute.
    dq = torch.empty_like(q) if run_dq else torch.zeros_like(q)
    dk = torch.empty_like(k) if run_dkdv else torch.zeros_like(k)
    dv = torch.empty_like(v) if run_dkdv else torch.zeros_like(v)
    dmk = dmv = None
    if m["has_mem"]:
        dmk = torch.empty_like(mem_k) if run_dmem else torch.zeros_like(mem_k)
        dmv = torch.empty_like(mem_v) if run_dmem else torch.zeros_like(mem_v)
    # Rows of paths that are off stay 0: DI is read for them, DW is summed into dweights.
    di = torch.zeros(B, H, 3, Tq, dtype=torch.float32, device=q.device)
    dw_rows = torch.zeros(B, H, 3, Tq, dtype=torch.float32, device=q.device)
    if run:  # q and k rotated again (not saved by the forward), once for the three kernels
        qr = _rotated(q, True, ra, m["rope_base"], Tq, Tk)
        kr = _rotated(k, False, ra, m["rope_base"], Tq, Tk)
        _launch(hybrid_attention_bwd_preprocess_kernel, "bwd_preprocess", q, ra["nq"], R, H,
                q, qr, kr, v, mem_k, mem_v, out.contiguous(), dout, w, mem_len, lse, di,
                dw_rows, *ptrs, H, G, Tq, Tk, S, *ra["ints"], qk_scale,
                HAS_MEM=m["has_mem"], **paths)
    if run_dq:
        _launch(hybrid_attention_bwd_dq_kernel, "bwd_dq", q, ra["nq"], R, H,
                q, qr, kr, v, mem_k, mem_v, dout, w, mem_len, rope_step, lse, di, dw_rows, dq,
                *ptrs, H, G, Tq, Tk, S, *ra["ints"], qk_scale, m["scale"],
                HAS_MEM=m["has_mem"], **paths, **rope)
    if run_dkdv:
        _launch(hybrid_attention_bwd_dkdv_kernel, "bwd_dkdv", q, ra["nk"], R, G,
                qr, kr, v, dout, w, rope_step, lse, di, dk, dv, *ptrs,
                H, G, Tq, Tk, *ra["ints"], qk_scale, m["scale"], **paths, **rope)
    if run_dmem:
        n_split, n_slots = _dmem_split(q, S, ra["nq"], R * G)
        part_k = torch.empty((n_split,) + tuple(mem_k.shape), dtype=torch.float32, device=q.device)
        part_v = torch.empty_like(part_k)
        _launch(hybrid_attention_bwd_dmem_kernel, "bwd_dmem", q, n_slots * n_split, R, G,
                q, mem_k, mem_v, dout, w, mem_len, lse, di, part_k, part_v, *ptrs,
                H, G, Tq, Tk, S, n_split, qk_scale, m["scale"], **ra["flags"])
        dmk.copy_(part_k.sum(0))  # a fixed-order reduction over the query splits
        dmv.copy_(part_v.sum(0))
    dw = dw_rows.sum(dim=(0, 3)).to(weights.dtype) if need[5] else None  # (H, 3)
    return dq, dk, dv, dmk, dmv, dw


def hybrid_attention_triton(q, k, v, mem_k, mem_v, weights, mem_len, *, chunk_size, use_global,
                            rope_base, start_pos, scale, kv_start=None, kv_end=None,
                            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                            max_seqlen_k=None):
    """Fused Triton hybrid attention on normalized arguments (see module docstring) -> (B, H, Tq, D).

    Differentiable in q, k, v, mem_k, mem_v and weights. Every kernel is deterministic (no
    atomics): the same inputs give bitwise-identical outputs and gradients.
    """
    return _HybridAttentionFn.apply(q, k, v, mem_k, mem_v, weights, mem_len, chunk_size,
                                    use_global, rope_base, start_pos, scale, kv_start, kv_end,
                                    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)[0]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (used by `python -m chunkmem.compile_check`)
# ----------------------------------------------------------------------------------------------
_FP32_PTRS = {"W", "LSE", "DI", "DW", "DMK", "DMV"}
_I32_PTRS = {"MEMLEN", "KV_START", "KV_END", "CU_Q", "CU_K", "PHASE"}
_I64_PTRS = {"ROPE_STEP"}
_I32_ARGS = {"n_split", "H", "G", "T", "Tq", "Tk", "S", "chunk_size", "chunk_phase", "start_pos"}
_F32_ARGS = {"qk_scale", "scale"}


def _kernel_args(fn) -> list:
    """(name, is_constexpr) of each kernel argument, from the Python signature (works for the
    JITFunction and for the interpreter's wrapper)."""
    import inspect

    import triton.language as tl

    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    return [(p.name, p.annotation is tl.constexpr) for p in params]


def _signature(fn, dtype: str) -> dict:
    """triton.compile signature of a kernel: every argument's type string ("constexpr" for
    constexprs); tensor pointers take the data dtype, statistics fp32, mem_len int32."""
    sig = {}
    for name, is_constexpr in _kernel_args(fn):
        if is_constexpr:
            sig[name] = "constexpr"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name in _I64_PTRS:
            sig[name] = "*i64"
        elif name in _I32_ARGS:
            sig[name] = "i32"
        elif name in _F32_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "*" + dtype
    return sig


# The row layouts a launch compiles (see _row_args): name suffix -> (RANGES, PACKED). Launches
# never combine the two flags.
ROW_LAYOUTS = {"": dict(RANGES=False, PACKED=False), "_ranges": dict(RANGES=True, PACKED=False),
               "_packed": dict(RANGES=False, PACKED=True)}


# The path sets compiled for each kernel: every path on (name suffix ""), and for the kernels
# whose loops differ without the global path (LINEAR_KINDS: the chunk path alone takes wider,
# partly unmasked tiles there), the linear-cost mode (suffix _linear).
PATH_SETS = {"": dict(USE_GLOBAL=True, HAS_CHUNK=True, HAS_MEM=True, ROPE=True),
             "_linear": dict(USE_GLOBAL=False, HAS_CHUNK=True, HAS_MEM=True, ROPE=True)}
LINEAR_KINDS = ("fwd", "bwd_dq", "bwd_dkdv")


def compile_variants() -> list:
    """Every kernel x dtype (fp32/fp16/bf16) x D (32/64/128/256) that has a launch configuration
    (all but the backward at D = 256) with that configuration; one variant per arch
    (name suffix _sm80 / _sm90) where sm_90 has its own; each in the three row layouts that
    launches compile (ROW_LAYOUTS: plain rows, per-row key ranges, packed documents; name
    suffix "", _ranges, _packed), with all paths on and RoPE (the largest code of each layout)
    and, for LINEAR_KINDS, also without the global path (PATH_SETS, suffix _linear).
    The RoPE kernel likewise, for queries and keys (rope_q_*, rope_k_*).

    Returns dicts with keys name, fn, signature, constexprs, num_warps, num_stages, archs (the
    compile targets it is launched on), layout (the ROW_LAYOUTS suffix), mode (the PATH_SETS
    suffix, attention kernels only) and, for the RoPE
    kernel, int_hints (compiled with the integer-argument hints only).
    """
    from chunkmem.kernels import hybrid_attention as kern

    fns = {
        "fwd": kern.hybrid_attention_fwd_kernel,
        "bwd_preprocess": kern.hybrid_attention_bwd_preprocess_kernel,
        "bwd_dq": kern.hybrid_attention_bwd_dq_kernel,
        "bwd_dkdv": kern.hybrid_attention_bwd_dkdv_kernel,
        "bwd_dmem": kern.hybrid_attention_bwd_dmem_kernel,
    }
    variants = []
    for layout, rows in ROW_LAYOUTS.items():
        for dtype in _DTYPES:
            tdt = TRITON_DTYPE[dtype]
            for D in SUPPORTED_HEAD_DIMS:
                for (kind, fn), (mode, paths) in itertools.product(fns.items(), PATH_SETS.items()):
                    if not has_gpu_config(kind, dtype, D) or (mode and kind not in LINEAR_KINDS):
                        continue  # unsupported_reason sends these cases to the torch backend
                    cfgs = {arch: block_config(kind, dtype, D, interpret=False, arch=arch,
                                               layout=layout, mode=mode) for arch in (80, 90)}
                    groups = [(80, 90)] if cfgs[80] == cfgs[90] else [(80,), (90,)]
                    for archs in groups:
                        cfg = cfgs[archs[0]]
                        values = dict(HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                      BLOCK_W=cfg.get("BLOCK_W"), BLOCK_S=cfg.get("BLOCK_S"),
                                      KEY_MAJOR=cfg["KEY_MAJOR"],
                                      DOT_PREC=_dot_precision(dtype), **paths, **rows)
                        constexprs = {n: values[n] for n, is_cx in _kernel_args(fn) if is_cx}
                        suffix = f"_sm{archs[0]}" if len(archs) == 1 else ""
                        variants.append(dict(
                            name=(f"attn_{kind}_{tdt}_d{D}_m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}"
                                  f"{suffix}{layout}{mode}"),
                            fn=fn, signature=_signature(fn, tdt), constexprs=constexprs,
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                            archs=archs, layout=layout, mode=mode))
                for queries in (True, False):
                    fn = kern.rope_rotate_kernel
                    variants.append(dict(
                        name=f"rope_{'q' if queries else 'k'}_{tdt}_d{D}{layout}",
                        fn=fn, signature=_signature(fn, tdt),
                        constexprs=dict(HEAD_DIM=D, BLOCK=_rope_block(D), QUERIES=queries, **rows),
                        num_warps=_ROPE_WARPS, num_stages=1, archs=(80, 90), layout=layout,
                        int_hints=(True,)))  # 64-76 registers: far from a spill either way
    return variants


def hybrid_attention_triton_forward(q, k, v, mem_k, mem_v, weights, mem_len, *, chunk_size,
                                    use_global, rope_base, start_pos, scale, kv_start=None,
                                    kv_end=None, cu_seqlens_q=None, cu_seqlens_k=None,
                                    max_seqlen_q=None, max_seqlen_k=None):
    """The forward kernel without autograd -> (out (B, H, Tq, D), lse (B, H, 3, Tq) fp32).

    For callers that keep the statistics themselves (the torch.library op): pass both to
    :func:`hybrid_attention_triton_backward`.
    """
    return _forward_impl(q, k, v, mem_k, mem_v, weights, mem_len, chunk_size, use_global,
                         rope_base, start_pos, scale, kv_start, kv_end, cu_seqlens_q,
                         cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def hybrid_attention_triton_backward(dout, q, k, v, mem_k, mem_v, weights, mem_len, out, lse, *,
                                     chunk_size, use_global, rope_base, start_pos, scale,
                                     kv_start=None, kv_end=None, cu_seqlens_q=None,
                                     cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """The backward kernels without autograd, from the forward's out and lse.

    dout: (B, H, Tq, D). Returns (dq, dk, dv, dmem_k, dmem_v, dweights), the memory gradients
    None without memory. For callers that cannot use autograd (a torch.library backward op):
    torch.func transforms cannot run the kernels, whose tensors must be plain.
    """
    meta = _meta(mem_k, chunk_size, use_global, rope_base, start_pos, scale, max_seqlen_q,
                 max_seqlen_k, kv_start=kv_start, kv_end=kv_end, cu_q=cu_seqlens_q,
                 cu_k=cu_seqlens_k)
    has_mem = mem_k is not None
    need = (True, True, True, has_mem, has_mem, True)
    return _backward_impl(dout, q, k, v, mem_k, mem_v, weights, mem_len, out, lse, meta, need)
