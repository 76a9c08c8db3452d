"""A plain causal transformer (PyTorch SDPA) to compare ChunkMemLM against.

Same skeleton as :class:`chunkmem.nn.ChunkMemLM` (embedding, Pre-LN blocks with a
``Linear(d,4d)-GELU-Linear(4d,d)`` FFN, final LN, tied head, rotate-half RoPE on q and k) but the
attention is ``F.scaled_dot_product_attention(..., is_causal=True)`` over one segment and nothing is
carried between segments: a sequence longer than ``segment_len`` is cut into segments that are run
independently. Its forward has the ChunkMemLM signature, ``forward(tokens, state=None) ->
(logits, None)``, so the training loop treats both alike. ``forward_cached(tokens, cache)`` decodes
with a growing :class:`KVCache` (the decoding peer of ``ChunkMemLM.generate``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.attention.bias import causal_lower_right

from chunkmem.reference import apply_rope, rope_cos_sin

__all__ = ["CausalSelfAttention", "TransformerBlock", "CausalTransformer", "KVCache"]


class KVCache:
    """Keys (RoPE applied) and values of every layer for the tokens of the current segment (the
    whole sequence when ``segment_len`` is None), in buffers that double when full. Updated in
    place by :meth:`CausalTransformer.forward_cached`. ``k[i]``/``v[i]``: (B, G, capacity, D);
    ``length``: tokens held."""

    def __init__(self, n_layers: int):
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers
        self.length = 0

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Store layer i's new k/v (B, G, n, D) after the ``length`` held ones; returns the layer's
        valid keys and values (B, G, length + n, D). The last layer's call advances ``length``."""
        p, n = self.length, k.shape[2]
        if self.k[i] is None or self.k[i].shape[2] < p + n:
            cap = max(p + n, 2 * (0 if self.k[i] is None else self.k[i].shape[2]), 16)
            for buf in (self.k, self.v):
                new = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
                if p:
                    new[:, :, :p] = buf[i][:, :, :p]
                buf[i] = new
        self.k[i][:, :, p:p + n] = k
        self.v[i][:, :, p:p + n] = v
        if i == len(self.k) - 1:
            self.length = p + n
        return self.k[i][:, :, :p + n], self.v[i][:, :, :p + n]


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

    def forward_cached(self, x: torch.Tensor, cache: KVCache, i: int) -> torch.Tensor:
        """x (B, n, d): n more tokens after the ``cache.length`` cached ones (layer i of cache)."""
        B, T, _ = x.shape
        D, p = self.head_dim, cache.length
        q = self.q_proj(x).view(B, T, self.n_heads, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, D).transpose(1, 2)
        if self.rope_base is not None:
            cos, sin = rope_cos_sin(torch.arange(p, p + T, device=x.device), D, self.rope_base, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = cache.append(i, k, v)
        mask = None if T == 1 else causal_lower_right(T, p + T)  # bottom-right aligned queries
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
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

    def forward_cached(self, x: torch.Tensor, cache: KVCache, i: int) -> torch.Tensor:
        h = x + self.attn.forward_cached(self.ln1(x), cache, i)
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

    @torch.no_grad()
    def forward_cached(self, tokens: torch.Tensor, cache: KVCache | None = None):
        """Decoding with a KV cache: tokens (B, T) after the ones ``cache`` holds (None: a new
        sequence) -> (logits (B, T, V), cache), equal to ``forward`` over the whole sequence. The
        cache is updated in place; with ``segment_len`` set it is emptied at each segment start."""
        cache = cache if cache is not None else KVCache(len(self.blocks))
        out, i, T = [], 0, tokens.shape[1]
        while i < T:
            if self.segment_len and cache.length == self.segment_len:
                cache.length = 0  # segments are independent
            n = T - i if not self.segment_len else min(T - i, self.segment_len - cache.length)
            x = self.embed(tokens[:, i:i + n])
            for j, blk in enumerate(self.blocks):
                x = blk.forward_cached(x, cache, j)
            out.append(x)
            i += n
        return F.linear(self.ln_f(torch.cat(out, dim=1)), self.embed.weight), cache
