"""Modules (SPEC §3): the hybrid attention layer, the Pre-LN block and the segment-recurrent LM.

The memory is functional state: every ``forward`` takes the state it starts from and returns a
new one; inputs are never modified, so a call that fails leaves the caller's memory as it was.

Generation (SPEC §4): ``ChunkMemLM.generate(tokens, max_new_tokens, *, state=None,
temperature=1.0, top_k=None, top_p=None, generator=None) -> (new_tokens, state)``.

- Segmentation is that of ``forward`` over the whole document: segments of ``segment_len``
  tokens counted from the document's first token, RoPE positions and chunks counted from each
  segment's start. Each layer keeps the keys/values of the current segment's tokens; a token
  runs its queries (Tq = 1, bottom-right aligned) over them with the layer's memory. With the
  global path off only the keys of the query's chunk are passed (``start_pos`` keeps their
  positions): a token costs O(chunk_size + S) attention, O(segment_len) with the global path on,
  whatever the length of the document. When a segment is complete each layer writes it into its
  memory with ``gated_memory_update`` (exactly as ``forward`` does) and its cache is emptied.
- The returned :class:`MemoryState` covers every token so far, the last sampled one included:
  ``layers`` (the memory after the last complete segment), ``cache`` (per layer k, v and the
  LN'd block inputs of the P < segment_len tokens of the unfinished segment; None at a boundary)
  and ``next_logits`` (what the next token is sampled from). So ``a, s = generate(p, 20);
  b, _ = generate(p[:, :0], 20, state=s)`` gives ``cat(a, b) == generate(p, 40)[0]``, and new
  text can be passed as ``tokens`` with that state. A state is never modified after it is
  returned (each call copies the cache into its own buffers), so one state can be continued
  several ways. ``state_dict`` / ``from_state_dict`` / ``to`` / ``detach`` carry the cache;
  ``reset`` needs a boundary; ``forward`` refuses a state with a cache (``extend`` is the
  forward of this convention: logits of every position, the unfinished segment kept in the
  cache). A state from ``forward`` counts as a segment boundary.
- Sampling: :func:`sample_logits` (greedy at temperature 0; top-k, then top-p on what is left).

Learned initial memory (``init_slots=K``, 0 < K <= memory_slots; default 0 = off, the SPEC §3
math): each layer with memory gets a parameter ``memory_init`` (K, d_model). A row whose memory
is empty (``mem_len == 0``: nothing written since its document started, as after ``init_state``
or ``MemoryState.reset``) READS those K slots: its memory path attends over them (k/v
projections, no RoPE, as any slot) instead of contributing 0, which, with path weights learned
on segments that have memory content, shrinks the attention output of a document's first
segment. The write is unchanged (``gated_memory_update`` of the empty memory: ``m_{-1}`` = 0,
the FIFO holds only the document's own summaries), so from the second segment of a document on
the math is exactly that of ``init_slots=0``. (A variant that also pushed the learned slots into
the FIFO, as recurrent memory transformers carry learned initial memory tokens, kept them as
extra slots during the next segments and cut recall one segment later from 0.99 to 0.33 on the
cpu-small preset: the queries attended to them.)

A state keeps its representation (an empty memory is zeros with mem_len 0, so ``reset``,
``state_dict`` and checkpoints are unchanged); the substitution happens where a layer reads the
memory, in ``forward`` and in the cached path of ``generate``/``extend`` alike, so the two stay
equal. Off by default: with K > 0 the model has new parameters (old checkpoints lack
``memory_init``) and different first-segment math. Training: ``TrainConfig.init_slots``
(``python -m chunkmem.train train --init-slots K``), saved in the checkpoint's config. Measured
(cpu-small, ``bench/results/cpu-amd-epyc/lm_compare_v3.md``): K = 8 helps a document's first
segment in text-only training and, in joint text + recall training, only together with
``recall_carry`` (otherwise the learned slots mark a recall document start as an empty memory did).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chunkmem.ops import gated_memory_update, hybrid_attention

__all__ = ["MemoryState", "HybridAttention", "Block", "ChunkMemLM", "sample_logits", "filter_logits"]

LayerMemory = tuple  # (memory (B, S, d), mem_len (B,) int64), or None for a layer without memory


@dataclass
class MemoryState:
    """Everything a :class:`ChunkMemLM` carries from one call to the next.

    - ``layers[i]``: layer i's memory, (memory (B, S, d), mem_len (B,)), or None where the memory
      is off. :meth:`ChunkMemLM.forward` reads and writes only this.
    - ``cache``: None, or per layer (k (B, G, P, Dh), v (B, G, P, Dh), x (B, P, d) or None): the
      keys, values (RoPE not applied) and LN'd block inputs (kept for the memory write; None where
      the memory is off) of the P tokens of the current, unfinished segment. Written by
      :meth:`ChunkMemLM.generate` / :meth:`ChunkMemLM.extend`; None at a segment boundary.
    - ``next_logits``: None, or (B, vocab) logits of the token after the last one seen (what
      ``generate`` samples from when it is given no new tokens).

    A state without cache is at a segment boundary: the next token starts a new segment. Save it
    beside the model to stop mid-document: ``torch.save({"model": model.state_dict(), "memory":
    state.state_dict()}, path)`` and ``MemoryState.from_state_dict(ckpt["memory"])``.
    """

    layers: list = field(default_factory=list)
    cache: list | None = None
    next_logits: torch.Tensor | None = None

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    @property
    def cache_len(self) -> int:
        """P, the number of tokens of the current segment held in the cache (0 at a boundary)."""
        return 0 if self.cache is None else int(self.cache[0][0].shape[2])

    def _map(self, fn):
        def opt(t):
            return None if t is None else fn(t)

        return MemoryState(
            [None if lm is None else (fn(lm[0]), fn(lm[1])) for lm in self.layers],
            None if self.cache is None else [tuple(opt(t) for t in c) for c in self.cache],
            opt(self.next_logits),
        )

    def detach(self) -> "MemoryState":
        """The same state cut from the autograd graph (truncated backprop through segments)."""
        return self._map(torch.Tensor.detach)

    def reset(self, rows: torch.Tensor) -> "MemoryState":
        """The same state with the memory of the rows where ``rows`` (B,) bool is True emptied
        (memory zeros, mem_len 0), e.g. where a new document starts in a batch of streams. Only at
        a segment boundary (no cache); ``next_logits`` is dropped (a new document needs a prompt)."""
        if self.cache is not None:
            raise ValueError(f"reset needs a state at a segment boundary; this one holds {self.cache_len} "
                             "tokens of an unfinished segment")
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
        for i, c in enumerate(self.cache or ()):
            for name, t in zip(("k", "v", "x"), c):
                if t is not None:
                    out[f"{i}.cache_{name}"] = t.detach().clone()
        if self.next_logits is not None:
            out["next_logits"] = self.next_logits.detach().clone()
        return out

    @classmethod
    def from_state_dict(cls, sd: dict) -> "MemoryState":
        n = int(sd["n_layers"])
        layers = [(sd[f"{i}.memory"], sd[f"{i}.mem_len"]) if f"{i}.memory" in sd else None for i in range(n)]
        cache = None
        if "0.cache_k" in sd:
            cache = [tuple(sd.get(f"{i}.cache_{name}") for name in ("k", "v", "x")) for i in range(n)]
        return cls(layers, cache, sd.get("next_logits"))


class HybridAttention(nn.Module):
    """Multi-head hybrid attention with a gated FIFO memory (SPEC §3).

    ``forward(x (B, T, d_model), state=None) -> (y (B, T, d_model), new_state)`` where ``state`` is
    this layer's (memory (B, S, d_model), mem_len (B,)) or None (empty memory). The memory keys and
    values are the layer's own k/v projections of the memory states, without RoPE. Path weights
    are a softmax of learned logits over the paths that are on: one set per head
    (``fusion="head"``) or one per layer (``fusion="scalar"``). ``init_slots=K > 0``: a row with
    an empty memory reads K learned slots ``memory_init`` (K, d_model) instead (see the module
    docstring).
    """

    def __init__(self, d_model, n_heads, n_kv_heads=None, chunk_size=64, memory_slots=64,
                 memory_pool=None, use_global=True, rope_base=10000.0, fusion="head", backend="auto",
                 init_slots=0):
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
        if isinstance(init_slots, bool) or not isinstance(init_slots, int) or not (
                0 <= init_slots <= memory_slots):
            raise ValueError(f"init_slots must be an int in [0, memory_slots={memory_slots}], got {init_slots!r}")
        if not (use_global or chunk_size is not None or memory_slots > 0):
            raise ValueError("at least one path must be on (use_global, chunk_size or memory_slots > 0)")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.chunk_size, self.memory_slots, self.use_global = chunk_size, memory_slots, use_global
        self.memory_pool = memory_pool or chunk_size or 64
        self.rope_base, self.fusion, self.backend = rope_base, fusion, backend
        self.init_slots = init_slots

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
        if init_slots > 0:
            # random (identical slots would get identical gradients forever), at the scale of a
            # written slot (a tanh candidate of LN'd inputs: entries of magnitude ~0.5)
            self.memory_init = nn.Parameter(torch.randn(init_slots, d_model) * 0.5)

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

    def fill_empty(self, memory, mem_len):
        """(memory, mem_len) as the memory path reads them: with ``init_slots`` = K > 0, rows with
        mem_len 0 get the learned slots right-aligned and mem_len K; otherwise unchanged."""
        if self.init_slots == 0:
            return memory, mem_len
        empty = mem_len == 0
        init = F.pad(self.memory_init.to(memory.dtype), (0, 0, self.memory_slots - self.init_slots, 0))
        memory = torch.where(empty[:, None, None], init, memory)
        return memory, torch.where(empty, torch.full_like(mem_len, self.init_slots), mem_len)

    def _heads(self, x, n):  # (B, T, n*Dh) -> (B, n, T, Dh)
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def _memory_kv(self, memory, dtype):
        """The memory path's keys and values: this layer's k/v projections of the memory, no RoPE."""
        m = memory.to(dtype)
        return self._heads(self.k_proj(m), self.n_kv_heads), self._heads(self.v_proj(m), self.n_kv_heads)

    def _attend(self, q, k, v, mem_k, mem_v, mem_len, start_pos=0):
        B, _, T, _ = q.shape
        y = hybrid_attention(
            q, k, v, mem_k, mem_v, weights=self.path_weights(), chunk_size=self.chunk_size,
            use_global=self.use_global, mem_len=mem_len, rope_base=self.rope_base, start_pos=start_pos,
            backend=self.backend,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.d_model))

    def _write_memory(self, memory, mem_len, x):
        """The memory after writing the segment x (B, T, d): ``gated_memory_update``."""
        dt = memory.dtype
        return gated_memory_update(
            memory, x.to(dt), self.w_gate.to(dt), self.b_gate.to(dt), self.w_cand.to(dt), self.b_cand.to(dt),
            chunk_size=self.memory_pool, mem_len=mem_len, backend=self.backend,
        )

    def forward(self, x, state=None):
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        mem_k = mem_v = read_len = None
        if self.memory_slots > 0:
            memory, mem_len = state if state is not None else self.init_state(B, x.device, x.dtype)
            if memory.shape != (B, self.memory_slots, self.d_model):
                raise ValueError(f"memory state must have shape (B, S, d) = ({B}, {self.memory_slots}, "
                                 f"{self.d_model}), got {tuple(memory.shape)}")
            read, read_len = self.fill_empty(memory, mem_len)
            mem_k, mem_v = self._memory_kv(read, x.dtype)
        y = self._attend(q, k, v, mem_k, mem_v, read_len)
        if self.memory_slots == 0:
            return y, None
        return y, self._write_memory(memory, mem_len, x)

    def forward_cached(self, x, cache: "_LayerCache"):
        """Continue the current segment by the n tokens x (B, n, d_model) (LN'd block inputs):
        appends their keys/values/inputs to ``cache`` (in place) and attends over the cached
        segment with Tq = n (bottom-right aligned). Returns y (B, n, d_model). The memory is
        written by ``cache.write_memory()`` once the segment is full."""
        B, n, _ = x.shape
        p = cache.length
        q = self._heads(self.q_proj(x), self.n_heads)
        cache.append(self._heads(self.k_proj(x), self.n_kv_heads), self._heads(self.v_proj(x), self.n_kv_heads), x)
        # keys the queries can reach: the whole segment with the global path, else from the start
        # of the first query's chunk (start_pos keeps their positions, so the math is the same)
        if self.use_global:
            lo = 0
        elif self.chunk_size is not None:
            lo = p // self.chunk_size * self.chunk_size
        else:
            lo = p
        end = p + n
        return self._attend(q, cache.k[:, :, lo:end], cache.v[:, :, lo:end], cache.mem_k, cache.mem_v,
                            cache.read_len, start_pos=lo)


class _LayerCache:
    """One layer's working buffers while :meth:`ChunkMemLM.generate` runs (mutable; a returned
    :class:`MemoryState` holds views of them, which nothing writes afterwards): k/v/x of the
    current segment preallocated to ``segment_len`` tokens, the memory as the state carries it
    (``memory``, ``mem_len``), and the projected k/v and slot count of the memory the layer reads
    (``fill_empty``: the learned initial slots in an empty row)."""

    def __init__(self, attn: HybridAttention, layer_state, cached, batch_size, capacity, device, dtype):
        self.attn = attn
        G, Dh = attn.n_kv_heads, attn.head_dim
        self.k = torch.empty(batch_size, G, capacity, Dh, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.x = None
        self.length = 0
        if attn.memory_slots > 0:
            self.x = torch.empty(batch_size, capacity, attn.d_model, device=device, dtype=dtype)
            self._set_memory(*(layer_state if layer_state is not None else attn.init_state(batch_size, device, dtype)))
        else:
            self.memory = self.mem_len = self.mem_k = self.mem_v = self.read_len = None
        if cached is not None:
            self.append(*cached)

    def _set_memory(self, memory, mem_len):
        self.memory, self.mem_len = memory, mem_len
        read, self.read_len = self.attn.fill_empty(memory, mem_len)
        self.mem_k, self.mem_v = self.attn._memory_kv(read, self.k.dtype)

    def append(self, k, v, x):
        p, n = self.length, k.shape[2]
        self.k[:, :, p:p + n] = k
        self.v[:, :, p:p + n] = v
        if self.x is not None:
            self.x[:, p:p + n] = x
        self.length = p + n

    def write_memory(self):
        """End of segment: write the cached segment into the memory, empty the cache."""
        if self.memory is not None:
            self._set_memory(*self.attn._write_memory(self.memory, self.mem_len, self.x[:, :self.length]))
        self.length = 0

    def layer_state(self):
        return None if self.memory is None else (self.memory, self.mem_len)

    def cached(self):
        p = self.length
        return (self.k[:, :, :p], self.v[:, :, :p], None if self.x is None else self.x[:, :p])


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

    def _residual(self, x, a):
        h = x + a
        return h + self.ffn(self.ln2(h))

    def forward(self, x, state=None):
        a, new_state = self.attn(self.ln1(x), state)
        return self._residual(x, a), new_state

    def forward_cached(self, x, cache: _LayerCache):
        """The block over n more tokens of the current segment (see HybridAttention.forward_cached)."""
        return self._residual(x, self.attn.forward_cached(self.ln1(x), cache))


class ChunkMemLM(nn.Module):
    """Segment-recurrent language model: embedding, :class:`Block` s, final LN, tied output head.

    ``forward(tokens (B, T) long, state=None) -> (logits (B, T, vocab_size) float, MemoryState)``.
    A sequence longer than ``segment_len`` runs segment by segment, each layer's memory carried
    from one segment to the next; ``detach_every=k`` cuts the memory's autograd graph every k
    segments (truncated backprop through time; None keeps the whole graph). Attention keyword
    arguments (n_kv_heads, chunk_size, memory_slots, memory_pool, use_global, rope_base, fusion,
    backend, init_slots) are passed to every :class:`HybridAttention`; :meth:`set_backend` changes the backend
    later. :meth:`generate` samples with a KV cache of the current segment (see the module
    docstring); :meth:`extend` is the forward pass of that cached convention.
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

    def set_backend(self, backend: str) -> "ChunkMemLM":
        """Use ``backend`` ("auto", "triton", "torch", "reference") for every attention and memory
        update from now on (e.g. "triton" on CPU tensors under TRITON_INTERPRET=1). Returns self."""
        from chunkmem.ops import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for block in self.blocks:
            block.attn.backend = backend
        return self

    def _check(self, tokens, state, min_len=1):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32):
            raise TypeError("tokens must be an int64/int32 tensor of shape (B, T)")
        if tokens.dim() != 2 or tokens.shape[1] < min_len:
            raise ValueError(f"tokens must have shape (B, T) with T >= {min_len}, got {tuple(tokens.shape)}")
        if state is not None:
            if not isinstance(state, MemoryState) or len(state) != len(self.blocks):
                raise ValueError(f"state must be a MemoryState with {len(self.blocks)} layers")
            B = tokens.shape[0]
            sizes = [lm[0].shape[0] for lm in state.layers if lm is not None]
            sizes += [c[0].shape[0] for c in state.cache or ()]
            sizes += [] if state.next_logits is None else [state.next_logits.shape[0]]
            for size in sizes:
                if size != B:
                    raise ValueError(f"state batch size {size} does not match tokens' {B}")
            if state.cache is not None and (len(state.cache) != len(self.blocks)
                                            or not 0 < state.cache_len < self.segment_len):
                raise ValueError(f"state.cache must hold 1..{self.segment_len - 1} tokens for each of "
                                 f"the {len(self.blocks)} layers")

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
        if state is not None and state.cache is not None:
            raise ValueError(f"state holds {state.cache_len} tokens of an unfinished segment (a state from "
                             "generate/extend); continue it with extend() or generate()")
        state = state if state is not None else self.init_state(tokens.shape[0], tokens.device)
        logits = []
        for i, start in enumerate(range(0, tokens.shape[1], self.segment_len)):
            if self.detach_every and i > 0 and i % self.detach_every == 0:
                state = state.detach()
            seg_logits, state = self.forward_segment(tokens[:, start: start + self.segment_len], state)
            logits.append(seg_logits)
        return torch.cat(logits, dim=1), state

    # ------------------------------------------------------------------------ cached decoding
    def _open(self, state: MemoryState | None, batch_size, device) -> list:
        dtype = self.embed.weight.dtype
        state = state if state is not None else MemoryState([None] * len(self.blocks))
        cached = state.cache or [None] * len(self.blocks)
        return [_LayerCache(b.attn, ls, c, batch_size, self.segment_len, device, dtype)
                for b, ls, c in zip(self.blocks, state.layers, cached)]

    @staticmethod
    def _close(caches, next_logits) -> MemoryState:
        cache = None if caches[0].length == 0 else [c.cached() for c in caches]
        return MemoryState([c.layer_state() for c in caches], cache, next_logits)

    def _run_cached(self, tokens, caches, last_only):
        """tokens (B, T) through the model, continuing the cached segment; returns the logits of
        every position (B, T, V), or of the last one (B, 1, V) when ``last_only``."""
        out, i, T = [], 0, tokens.shape[1]
        while i < T:  # pieces that end at a segment boundary at the latest
            n = min(self.segment_len - caches[0].length, T - i)
            h = self.embed(tokens[:, i:i + n])
            for block, cache in zip(self.blocks, caches):
                h = block.forward_cached(h, cache)
            if caches[0].length == self.segment_len:
                for cache in caches:
                    cache.write_memory()
            out.append(h[:, -1:] if last_only else h)
            i += n
        h = out[-1] if last_only else torch.cat(out, dim=1)
        return F.linear(self.ln_f(h), self.embed.weight)

    def extend(self, tokens, state: MemoryState | None = None):
        """``forward`` for generation: ``extend(tokens (B, T), state=None) -> (logits (B, T, V), state)``
        continues the document that ``state`` covers (None: a new one) with the same segmentation
        as ``forward`` over the whole document, keeping an unfinished segment in the state's cache
        (the memory is written when a segment is complete) and the last logits in
        ``state.next_logits``. Runs without autograd."""
        self._check(tokens, state)
        with torch.no_grad():
            caches = self._open(state, tokens.shape[0], tokens.device)
            logits = self._run_cached(tokens, caches, last_only=False)
        return logits, self._close(caches, logits[:, -1].clone())

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, *, state=None, temperature=1.0, top_k=None, top_p=None,
                 generator=None):
        """Sample ``max_new_tokens`` tokens after ``tokens`` (SPEC §4).

        Args:
            tokens: (B, T) int tokens not yet seen by ``state`` (a prompt; T = 0 allowed when
                ``state`` came from ``generate``/``extend``). Rows are decoded together, so
                they have the same length.
            max_new_tokens: int >= 0.
            state: None (a new document) or a :class:`MemoryState` (from ``generate``/``extend``,
                or from ``forward``, which counts as a segment boundary).
            temperature: 0 -> greedy (argmax); > 0 divides the logits before sampling.
            top_k, top_p, generator: see :func:`sample_logits`.

        Returns:
            (new_tokens (B, max_new_tokens) int64, state covering the prompt and every sampled
            token, the last one included: memory, the current segment's cache, next_logits).
        """
        self._check(tokens, state, min_len=0)
        _check_sampling(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        B, T = tokens.shape
        if T == 0 and (state is None or state.next_logits is None):
            raise ValueError("tokens is empty: pass a prompt, or a state from generate/extend (it carries "
                             "the next-token logits)")
        caches = self._open(state, B, tokens.device)
        logits = self._run_cached(tokens, caches, last_only=True)[:, -1] if T else state.next_logits
        new = torch.empty(B, max_new_tokens, dtype=torch.long, device=tokens.device)
        for i in range(max_new_tokens):
            new[:, i] = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=generator)
            logits = self._run_cached(new[:, i:i + 1], caches, last_only=True)[:, -1]
        return new, self._close(caches, logits)


def _check_sampling(temperature, top_k, top_p):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits, top_k=None, top_p=None):
    """logits (B, V) with the tokens outside the top-k / top-p set at -inf (top-k first).

    top_k keeps the k largest (ties with the k-th included); top_p keeps, of the softmax of what is
    left, the smallest set of most likely tokens whose probabilities sum to >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p  # the first token is always kept (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits, *, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): argmax at temperature 0, else a sample of
    softmax(filter_logits(logits / temperature, top_k, top_p)) drawn with ``generator``
    (a torch.Generator on the logits' device, or None for the global one). Returns (B,) int64."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
