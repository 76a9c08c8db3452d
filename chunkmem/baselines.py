"""A plain causal transformer (PyTorch SDPA) to compare ChunkMemLM against.

Same skeleton as :class:`chunkmem.nn.ChunkMemLM` (embedding, Pre-LN blocks with a
``Linear(d,4d)-GELU-Linear(4d,d)`` FFN, final LN, tied head, rotate-half RoPE on q and k) but the
attention is ``F.scaled_dot_product_attention(..., is_causal=True)`` over one segment and nothing is
carried between segments: a sequence longer than ``segment_len`` is cut into segments that are run
independently. Its forward has the ChunkMemLM signature, ``forward(tokens, state=None) ->
(logits, None)``, so the training loop treats both alike.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from chunkmem.reference import apply_rope, rope_cos_sin

__all__ = ["CausalSelfAttention", "TransformerBlock", "CausalTransformer"]


class CausalSelfAttention(nn.Module):
    """Multi-head (optionally grouped-query) causal self-attention with RoPE and SDPA.

    forward(x (B, T, d)) -> (B, T, d)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, rope_base: float | None = 10000.0):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"need d_model % n_heads == 0 and n_heads % n_kv_heads == 0, got "
                             f"{d_model}, {n_heads}, {n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        if rope_base is not None and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        self.rope_base = rope_base
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)
        if self.rope_base is not None:
            cos, sin = rope_cos_sin(torch.arange(T, device=x.device), D, self.rope_base, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * D))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``h = x + attn(LN(x))``, ``y = h + FFN(LN(h))``. (B, T, d) -> (B, T, d)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, rope_base: float | None = 10000.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, n_kv_heads, rope_base)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.ln1(x))
        return h + self.ffn(self.ln2(h))


class CausalTransformer(nn.Module):
    """Causal byte/token LM: embedding, ``n_layers`` blocks, final LN, head tied to the embedding.

    forward(tokens (B, T) long, state=None) -> (logits (B, T, vocab_size), None). ``state`` is
    accepted for API parity with ChunkMemLM and must be None; segments of ``segment_len`` tokens
    (None: the whole sequence) are run independently.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 n_kv_heads: int | None = None, rope_base: float | None = 10000.0,
                 segment_len: int | None = None):
        super().__init__()
        self.segment_len = segment_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, n_kv_heads, rope_base) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # as ChunkMemLM; Linear layers keep torch's init

    def forward(self, tokens: torch.Tensor, state=None):
        if state is not None:
            raise ValueError("CausalTransformer carries no state between calls; pass state=None")
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise TypeError(f"tokens must be a (B, T) int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        B, T = tokens.shape
        L = self.segment_len or T
        n_seg = -(-T // L)
        pad = n_seg * L - T
        x = self.embed(F.pad(tokens, (0, pad)) if pad else tokens)
        x = x.view(B * n_seg, L, -1)  # independent segments
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.embed.weight)
        return logits.view(B, n_seg * L, -1)[:, :T], None
