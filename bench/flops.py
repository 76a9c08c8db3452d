"""FLOP counts of the attention patterns (the formula the README states).

Only the (query, key) pairs an implementation is asked to compute count, per batch row and head:

- global causal: T(T+1)/2 pairs (key j <= query i);
- chunk (causal inside non-overlapping chunks of C keys counted from key 0): for each chunk of
  length c (C, and a shorter last one) c(c+1)/2 pairs, i.e. ~T*C/2 in total;
- memory: T*S pairs (mem_len full; S slots).

Each pair costs 2*D FLOPs for q.k and 2*D for p.v, so forward FLOPs = 4*B*H*D*pairs.
Forward+backward = 3.5 x forward (the backward recomputes q.k and computes dV, dP, dQ, dK:
2.5 x forward; FlashAttention's convention). Softmax, RoPE, masking and the weighted sum of the
paths are not counted. The same counts serve every implementation of a pattern, so TFLOP/s
compares implementations of the same op on equal terms; a blockwise kernel that computes whole
diagonal blocks does more work than it is credited with.
"""
from __future__ import annotations

__all__ = ["PATHS_OF_OP", "pairs", "attention_flops"]

# op name -> (global, chunk, memory) paths that are on
PATHS_OF_OP = {
    "global+chunk+memory": (True, True, True),
    "chunk+memory": (False, True, True),
    "chunk": (False, True, False),
    "causal": (True, False, False),
}
BWD_FACTOR = 3.5


def _chunk_pairs(T: int, C: int) -> int:
    full, rest = divmod(T, C)
    return full * C * (C + 1) // 2 + rest * (rest + 1) // 2


def pairs(op: str, T: int, chunk_size: int | None, S: int | None) -> int:
    """(query, key) pairs per (batch row, head) computed by ``op`` at sequence length T."""
    use_global, use_chunk, use_mem = PATHS_OF_OP[op]
    n = 0
    if use_global:
        n += T * (T + 1) // 2
    if use_chunk:
        n += _chunk_pairs(T, chunk_size)
    if use_mem:
        n += T * S
    return n


def attention_flops(op: str, pass_: str, *, B: int, H: int, D: int, T: int,
                    chunk_size: int | None, S: int | None) -> float:
    """4*B*H*D*pairs for "fwd"; 3.5x that for "fwd+bwd"."""
    fwd = 4.0 * B * H * D * pairs(op, T, chunk_size, S)
    if pass_ == "fwd":
        return fwd
    if pass_ == "fwd+bwd":
        return BWD_FACTOR * fwd
    raise ValueError(f"pass must be 'fwd' or 'fwd+bwd', got {pass_!r}")
