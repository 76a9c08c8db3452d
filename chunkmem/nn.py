"""Modules (SPEC §3): the hybrid attention layer, the Pre-LN block and the segment-recurrent LM.

The memory is functional state: every ``forward`` takes the state it starts from and returns a
new one; inputs are never modified, so a call that fails leaves the caller's memory as it was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chunkmem.ops import gated_memory_update, hybrid_attention

__all__ = ["MemoryState", "HybridAttention", "Block", "ChunkMemLM"]

LayerMemory = tuple  # (memory (B, S, d), mem_len (B,) int64), or None for a layer without memory


@dataclass
class MemoryState:
    """Per-layer memory of a :class:`ChunkMemLM`: ``layers[i]`` is (memory (B, S, d), mem_len (B,))
    or None for a layer whose memory is off.

    Save it beside the model to stop mid-document: ``torch.save({"model": model.state_dict(),
    "memory": state.state_dict()}, path)`` and ``MemoryState.from_state_dict(ckpt["memory"])``.
    """

    layers: list = field(default_factory=list)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def _map(self, fn):
        return MemoryState([None if lm is None else (fn(lm[0]), fn(lm[1])) for lm in self.layers])

    def detach(self) -> "MemoryState":
        """The same state cut from the autograd graph (truncated backprop through segments)."""
        return self._map(torch.Tensor.detach)

    def reset(self, rows: torch.Tensor) -> "MemoryState":
        """The same state with the memory of the rows where ``rows`` (B,) bool is True emptied
        (memory zeros, mem_len 0), e.g. where a new document starts in a batch of streams."""
        keep = ~rows
        return MemoryState([
            None if lm is None else (lm[0] * keep.to(lm[0].dtype)[:, None, None], lm[1] * keep.to(lm[1].dtype))
            for lm in self.layers
        ])

    def to(self, device) -> "MemoryState":
        """The same state on another device."""
        return self._map(lambda t: t.to(device))

    def state_dict(self) -> dict:
        """Plain tensors (loadable with ``torch.load(..., weights_only=True)``)."""
        out = {"n_layers": torch.tensor(len(self.layers))}
        for i, lm in enumerate(self.layers):
            if lm is not None:
                out[f"{i}.memory"] = lm[0].detach().clone()
                out[f"{i}.mem_len"] = lm[1].detach().clone()
        return out

    @classmethod
    def from_state_dict(cls, sd: dict) -> "MemoryState":
        n = int(sd["n_layers"])
        return cls([(sd[f"{i}.memory"], sd[f"{i}.mem_len"]) if f"{i}.memory" in sd else None for i in range(n)])


class HybridAttention(nn.Module):
    """Multi-head hybrid attention with a gated FIFO memory (SPEC §3).

    ``forward(x (B, T, d_model), state=None) -> (y (B, T, d_model), new_state)`` where ``state`` is
    this layer's (memory (B, S, d_model), mem_len (B,)) or None (empty memory). The memory keys and
    values are the layer's own k/v projections of the memory states, without RoPE. Path weights
    are a softmax of learned logits over the paths that are on: one set per head
    (``fusion="head"``) or one per layer (``fusion="scalar"``).
    """

    def __init__(self, d_model, n_heads, n_kv_heads=None, chunk_size=64, memory_slots=64,
                 memory_pool=None, use_global=True, rope_base=10000.0, fusion="head", backend="auto"):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if fusion not in ("head", "scalar"):
            raise ValueError(f"fusion must be 'head' or 'scalar', got {fusion!r}")
        if memory_slots < 0:
            raise ValueError(f"memory_slots must be >= 0, got {memory_slots}")
        if not (use_global or chunk_size is not None or memory_slots > 0):
            raise ValueError("at least one path must be on (use_global, chunk_size or memory_slots > 0)")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.chunk_size, self.memory_slots, self.use_global = chunk_size, memory_slots, use_global
        self.memory_pool = memory_pool or chunk_size or 64
        self.rope_base, self.fusion, self.backend = rope_base, fusion, backend

        kv_dim = n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.path_logits = nn.Parameter(torch.zeros(n_heads, 3) if fusion == "head" else torch.zeros(3))
        self.register_buffer(
            "paths_on",
            torch.tensor([use_global, chunk_size is not None, memory_slots > 0]),
            persistent=False,
        )
        if memory_slots > 0:
            bound = 1.0 / math.sqrt(d_model)
            self.w_gate = nn.Parameter(torch.empty(d_model, d_model).uniform_(-bound, bound))
            self.b_gate = nn.Parameter(torch.zeros(d_model))
            self.w_cand = nn.Parameter(torch.empty(d_model, d_model).uniform_(-bound, bound))
            self.b_cand = nn.Parameter(torch.zeros(d_model))

    def path_weights(self) -> torch.Tensor:
        """(H, 3) or (3,) softmax of the logits over the paths that are on (0 for paths that are off)."""
        return torch.softmax(self.path_logits.masked_fill(~self.paths_on, float("-inf")), dim=-1)

    def init_state(self, batch_size, device=None, dtype=None) -> LayerMemory | None:
        """An empty memory: zeros (B, S, d) and mem_len 0; None when the memory is off."""
        if self.memory_slots == 0:
            return None
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        return (torch.zeros(batch_size, self.memory_slots, self.d_model, device=device, dtype=dtype),
                torch.zeros(batch_size, dtype=torch.long, device=device))

    def _heads(self, x, n):  # (B, T, n*Dh) -> (B, n, T, Dh)
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def forward(self, x, state=None):
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        mem_k = mem_v = mem_len = None
        if self.memory_slots > 0:
            memory, mem_len = state if state is not None else self.init_state(B, x.device, x.dtype)
            if memory.shape != (B, self.memory_slots, self.d_model):
                raise ValueError(f"memory state must have shape (B, S, d) = ({B}, {self.memory_slots}, "
                                 f"{self.d_model}), got {tuple(memory.shape)}")
            mem_k = self._heads(self.k_proj(memory.to(x.dtype)), self.n_kv_heads)
            mem_v = self._heads(self.v_proj(memory.to(x.dtype)), self.n_kv_heads)
        y = hybrid_attention(
            q, k, v, mem_k, mem_v, weights=self.path_weights(), chunk_size=self.chunk_size,
            use_global=self.use_global, mem_len=mem_len, rope_base=self.rope_base, backend=self.backend,
        )
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.d_model))
        if self.memory_slots == 0:
            return y, None
        new_state = gated_memory_update(
            memory, x.to(memory.dtype), self.w_gate.to(memory.dtype), self.b_gate.to(memory.dtype),
            self.w_cand.to(memory.dtype), self.b_cand.to(memory.dtype),
            chunk_size=self.memory_pool, mem_len=mem_len, backend=self.backend,
        )
        return y, new_state


class Block(nn.Module):
    """Pre-LN transformer block: ``h = x + attn(LN(x))``, ``y = h + FFN(LN(h))``; FFN is
    Linear(d, 4d) - GELU - Linear(4d, d). The memory stores the LN'd block input.

    ``forward(x (B, T, d), state=None) -> (y (B, T, d), new_state)``.
    """

    def __init__(self, d_model, n_heads, **attn_kwargs):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = HybridAttention(d_model, n_heads, **attn_kwargs)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x, state=None):
        a, new_state = self.attn(self.ln1(x), state)
        h = x + a
        return h + self.ffn(self.ln2(h)), new_state


class ChunkMemLM(nn.Module):
    """Segment-recurrent language model: embedding, :class:`Block` s, final LN, tied output head.

    ``forward(tokens (B, T) long, state=None) -> (logits (B, T, vocab_size) float, MemoryState)``.
    A sequence longer than ``segment_len`` runs segment by segment, each layer's memory carried
    from one segment to the next; ``detach_every=k`` cuts the memory's autograd graph every k
    segments (truncated backprop through time; None keeps the whole graph). Attention keyword
    arguments (n_kv_heads, chunk_size, memory_slots, memory_pool, use_global, rope_base, fusion,
    backend) are passed to every :class:`HybridAttention`.
    """

    def __init__(self, vocab_size, d_model, n_layers, n_heads, *, segment_len=256, detach_every=None,
                 **attn_kwargs):
        super().__init__()
        if segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {segment_len}")
        if detach_every is not None and detach_every < 1:
            raise ValueError(f"detach_every must be None or >= 1, got {detach_every}")
        self.vocab_size, self.segment_len, self.detach_every = vocab_size, segment_len, detach_every
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, **attn_kwargs) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def init_state(self, batch_size, device=None) -> MemoryState:
        """An empty memory for every layer."""
        return MemoryState([b.attn.init_state(batch_size, device) for b in self.blocks])

    def _check(self, tokens, state):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32):
            raise TypeError("tokens must be an int64/int32 tensor of shape (B, T)")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
        if state is not None:
            if not isinstance(state, MemoryState) or len(state) != len(self.blocks):
                raise ValueError(f"state must be a MemoryState with {len(self.blocks)} layers")
            for lm in state.layers:
                if lm is not None and lm[0].shape[0] != tokens.shape[0]:
                    raise ValueError(f"state batch size {lm[0].shape[0]} does not match tokens' {tokens.shape[0]}")

    def forward_segment(self, tokens, state: MemoryState):
        """One segment (B, T <= segment_len) -> (logits, new MemoryState)."""
        h = self.embed(tokens)
        new_layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            h, new_layer_state = block(h, layer_state)
            new_layers.append(new_layer_state)
        logits = F.linear(self.ln_f(h), self.embed.weight)
        return logits, MemoryState(new_layers)

    def forward(self, tokens, state: MemoryState | None = None):
        self._check(tokens, state)
        state = state if state is not None else self.init_state(tokens.shape[0], tokens.device)
        logits = []
        for i, start in enumerate(range(0, tokens.shape[1], self.segment_len)):
            if self.detach_every and i > 0 and i % self.detach_every == 0:
                state = state.detach()
            seg_logits, state = self.forward_segment(tokens[:, start: start + self.segment_len], state)
            logits.append(seg_logits)
        return torch.cat(logits, dim=1), state
