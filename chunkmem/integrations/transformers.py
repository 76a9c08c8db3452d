"""``hybrid_attention`` as an attention implementation of Hugging Face transformers (SPEC §5).

    import chunkmem.integrations.transformers as cm_hf
    cm_hf.register()                                   # name "chunkmem"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="chunkmem")
    # or: model.set_attn_implementation("chunkmem")

``register`` adds two functions to transformers' registries:

- a mask builder (``AttentionMaskInterface``). transformers calls it where it would build the
  4-D mask of a layer type, with the sizes of the cache (query/key lengths and offsets), the
  2-D padding mask and the layer's mask pattern (causal, chunked, packed sequences...). It
  turns them into the op's per-row key ranges (``kv_start``, ``kv_end``), ``start_pos`` and
  ``chunk_size``, or into packed documents (``cu_seqlens``), and checks that this plan gives
  exactly transformers' own mask on every query that is not itself padding: entry by entry,
  except for transformers' plain causal and chunked masks, where checking that each row's
  padding is one leading block is exact and O(B * Tk). It returns a :class:`ChunkmemMask`, not
  a tensor: no (Tq, Tk) mask is kept.
- an attention function (``AttentionInterface``) that runs ``hybrid_attention`` with that plan:
  the chunk path (``chunk_size = attention_chunk_size``, no global path) on layers whose mask is
  chunked (Llama 4's ``"chunked_attention"`` layers), the global path on the others. The model
  has applied RoPE already, so the op runs without ``rope_base``.

Where the attention would not be exactly what ``attn_implementation="sdpa"`` computes, it raises
``NotImplementedError`` naming the feature: dropout in training, logit soft-capping, attention
sinks, position biases, non-causal attention, sliding windows narrower than the keys, custom
mask functions, padding between valid tokens, 4-D masks other than causal with per-row padding
(per-head, additive biases, holes), packed-sequence kwargs (``cu_seq_lens_q/k``) that the mask
does not follow (transformers packs the mask only without a cache). Outputs at padding positions
(queries that are themselves padding) are not part of the contract: they are 0 for left
padding and whatever causal attention gives for right padding; transformers ignores them.

torch.compile: the mask builder reads tensor values (the padding, the cache's length) to build
and check its plan, so inside a compiled region it is a graph break (``fullgraph=True`` fails
there). ``generate()`` with a static cache builds the masks before its compiled decoding step,
which then runs in one graph (the plan's key ranges are tensors: Llama's decoding steps share
one graph, tested on the CPU with the aot_eager backend).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from chunkmem.ops import hybrid_attention

__all__ = ["register", "ChunkmemMask", "chunkmem_mask", "chunkmem_attention_forward"]

_VERIFY_BLOCK_ELEMENTS = 1 << 22  # mask entries compared per step when checking a plan


def _masking_utils():
    try:
        from transformers import masking_utils
    except ImportError as err:  # pragma: no cover - exercised only without transformers
        raise ImportError("chunkmem.integrations.transformers needs transformers: "
                          "pip install 'chunkmem[hf]'") from err
    return masking_utils


def register(name: str = "chunkmem", *, backend: str = "auto") -> str:
    """Register chunkmem's attention and mask builder in transformers under ``name``.

    After this, ``attn_implementation=name`` (``from_pretrained``, ``from_config``) or
    ``model.set_attn_implementation(name)`` runs every attention layer through
    :func:`chunkmem.hybrid_attention` (with ``backend``). Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    forward = chunkmem_attention_forward
    if backend != "auto":
        forward = functools.partial(chunkmem_attention_forward, backend=backend)
        functools.update_wrapper(forward, chunkmem_attention_forward)
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, chunkmem_mask)
    return name


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class _Plan:
    """How one layer type calls the op. Either per-row ranges (``cu_seqlens`` None) or packed
    documents over the batch rows laid end to end (``cu_seqlens`` over B * T tokens)."""

    chunk_size: int | None  # None: global path only; an int: chunk path only
    kv_start: torch.Tensor | None = None  # (B,) int32, None: 0 for every row
    kv_end: torch.Tensor | None = None  # (B,) int32, None: Tk for every row
    start_pos: int | torch.Tensor = 0  # int, or int64 (B,)
    cu_seqlens: torch.Tensor | None = None  # (N + 1,) int32
    max_seqlen: int | None = None


class ChunkmemMask:
    """The "mask" chunkmem's mask builder returns: a checked plan for the op, plus the sizes
    transformers built it for. Layers of the same type in one forward pass share it. It is not
    a tensor: code that expects a 4-D mask tensor gets ``ndim == 4`` and ``shape`` only."""

    ndim = 4

    def __init__(self, plan: _Plan, batch_size: int, q_length: int, kv_length: int,
                 q_offset: int, kv_offset: int):
        self.plan = plan
        self.shape = (batch_size, 1, q_length, kv_length)
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self._checked_cu = None  # the packed-sequence kwargs last found consistent with the plan

    @property
    def chunk_size(self) -> int | None:
        return self.plan.chunk_size

    def __repr__(self):
        p = self.plan
        kind = "packed" if p.cu_seqlens is not None else "rows"
        path = "global" if p.chunk_size is None else f"chunk({p.chunk_size})"
        return (f"ChunkmemMask(shape={self.shape}, q_offset={self.q_offset}, "
                f"kv_offset={self.kv_offset}, {kind}, {path})")


@dataclass
class _MaskInputs:
    """What transformers handed the mask builder, normalized."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: object
    padding: torch.Tensor | None  # (B, >= kv_offset + kv_length) bool, False = padding
    use_vmap: bool
    device: torch.device

    @functools.cached_property
    def real_queries(self) -> torch.Tensor | None:
        """(B, Tq) bool: the query token is not padding (None: every query is real)."""
        if self.padding is None:
            return None
        idx = torch.arange(self.q_length, device=self.device) + self.q_offset
        padded = self.padding
        if padded.shape[1] <= int(idx[-1]):
            padded = torch.nn.functional.pad(padded, (0, int(idx[-1]) + 1 - padded.shape[1]))
        return padded[:, idx]

    @functools.cached_property
    def left_padding(self) -> torch.Tensor:
        """(B,) int64: leading padding tokens of each row (absolute cache indices)."""
        if self.padding is None:
            return torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        return (self.padding.long().cumsum(-1) == 0).sum(-1)


def _rows_plan(m: _MaskInputs, chunk_size: int | None) -> _Plan | None:
    """Per-row key ranges: the keys a cache holds for this layer, left padding cut off, the
    dropped keys of a sliding cache counted in start_pos. None if the cache layout does not fit
    the op's bottom-right alignment."""
    kv_end = m.q_offset + m.q_length - m.kv_offset  # one past the key slot of the last query
    if not m.q_length <= kv_end <= m.kv_length:
        return None
    left = m.left_padding
    kv_start = (left - m.kv_offset).clamp(0, kv_end)
    start_pos = (m.kv_offset - left).clamp(min=0)
    lo, hi = (int(x) for x in torch.aminmax(start_pos))
    full = kv_end == m.kv_length and not bool(kv_start.any())
    return _Plan(
        chunk_size=chunk_size,
        kv_start=None if full else kv_start.to(torch.int32),
        kv_end=None if full else torch.full_like(kv_start, kv_end, dtype=torch.int32),
        start_pos=lo if lo == hi else start_pos,
    )


def _blocks_plan(m: _MaskInputs) -> _Plan | None:
    """Packed documents (a fresh sequence, no padding, no cache): a new document starts at every
    query that cannot see the key just before it. With the global path this reproduces any
    block-diagonal causal mask: packed sequences, and on chunked layers their chunks too."""
    if m.padding is not None or m.q_offset or m.kv_offset or m.q_length != m.kv_length or m.use_vmap:
        return None
    B, T, dev = m.batch_size, m.q_length, m.device
    new_doc = torch.ones(B, T, dtype=torch.bool, device=dev)
    if T > 1:
        idx = torch.arange(T, device=dev)[None, :]
        sees_previous = m.mask_function(torch.arange(B, device=dev)[:, None],
                                        torch.zeros(1, 1, dtype=torch.long, device=dev),
                                        idx[:, 1:], idx[:, :-1])
        new_doc[:, 1:] = ~torch.as_tensor(sees_previous, device=dev).expand(B, T - 1)
    starts = new_doc.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([starts, torch.tensor([B * T], device=dev)]).to(torch.int32)
    return _Plan(chunk_size=None, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))


def _plan_mask(plan: _Plan, B: int, Tq: int, Tk: int, i0: int, i1: int, device) -> torch.Tensor:
    """(B, i1 - i0, Tk) bool: which keys queries i0:i1 see under ``plan`` (the op's semantics,
    SPEC §1b), for comparison with transformers' mask."""
    i = torch.arange(i0, i1, device=device)
    j = torch.arange(Tk, device=device)
    if plan.cu_seqlens is not None:  # Tq == Tk; documents over the rows laid end to end
        flat_doc = torch.zeros(B * Tk, dtype=torch.long, device=device)
        flat_doc[plan.cu_seqlens[1:-1].long()] += 1
        doc = flat_doc.cumsum(0).view(B, Tk)
        return (doc[:, None, :] == doc[:, i0:i1, None]) & (j[None, None, :] <= i[None, :, None])
    ks = (plan.kv_start.long() if plan.kv_start is not None
          else torch.zeros(B, dtype=torch.long, device=device))[:, None]
    ke = (plan.kv_end.long() if plan.kv_end is not None
          else torch.full((B,), Tk, dtype=torch.long, device=device))[:, None]
    a = ke - Tq + i[None, :]  # (B, n): key index of each query
    seen = (j[None, None, :] >= ks[:, :, None]) & (j[None, None, :] <= a[:, :, None]) & (a >= ks)[:, :, None]
    if plan.chunk_size is not None:
        sp = plan.start_pos
        sp = (sp.long() if isinstance(sp, torch.Tensor) else torch.full((B,), sp, device=device))[:, None]
        key_chunk = torch.div(sp + j[None, :] - ks, plan.chunk_size, rounding_mode="floor")  # (B, Tk)
        query_chunk = torch.div(sp + a - ks, plan.chunk_size, rounding_mode="floor")  # (B, n)
        seen &= key_chunk[:, None, :] == query_chunk[:, :, None]
    return seen


def _padding_is_one_block(m: _MaskInputs, plan: _Plan) -> bool:
    """Exact check for a plain causal (or chunked) mask: transformers' mask is causal AND
    not-padding (AND same chunk), the plan's is causal within [kv_start, kv_end) (AND same
    chunk); they agree on every real query iff no padding lies between a row's first valid key
    and its last real query."""
    if m.padding is None:
        return True
    Tq, Tk, dev = m.q_length, m.kv_length, m.device
    pad = _masking_utils().prepare_padding_mask(m.padding, Tk, m.kv_offset)[:, m.kv_offset:m.kv_offset + Tk]
    slot = torch.arange(Tq, device=dev) + (m.q_offset - m.kv_offset)  # key slot of each query
    last = torch.where(m.real_queries, slot[None, :], -1).amax(-1)  # (B,)
    ks = plan.kv_start.long() if plan.kv_start is not None else torch.zeros_like(last)
    j = torch.arange(Tk, device=dev)[None, :]
    needed = (j >= ks[:, None]) & (j <= last[:, None])
    return bool((pad | ~needed).all())


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ())))


def _is_plain_chunked_mask(mask_function, chunk_size: int, left_padding: torch.Tensor) -> bool:
    """Is ``mask_function`` exactly transformers' chunked causal mask,
    ``and_masks(chunked_overlay(chunk_size, left_padding), causal_mask_function)``, with the
    same chunk size and left padding as the plan? (Recognized by code identity and captured
    values; anything else, e.g. a remapped packed-sequence mask, returns False.)"""
    mu = _masking_utils()
    try:
        if mask_function.__code__ is not mu.and_masks(mu.causal_mask_function).__code__:
            return False
        overlay, causal = _closure(mask_function)["mask_functions"]
        if causal is not mu.causal_mask_function or \
                overlay.__code__ is not mu.chunked_overlay(chunk_size, left_padding).__code__:
            return False
        captured = _closure(overlay)
        theirs = torch.as_tensor(captured["left_padding"], device=left_padding.device).long()
        return captured["chunk_size"] == chunk_size and theirs.shape == left_padding.shape and \
            bool((theirs == left_padding).all())
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


def _plan_matches(m: _MaskInputs, plan: _Plan) -> bool:
    """Does the op with ``plan`` see exactly the keys transformers' mask allows, for every query
    that is not padding? Compared block by block (bounded memory), except for transformers' plain
    causal and chunked masks, where a check of the padding alone is exact: their chunks are
    counted from each row's first valid token, as the plan's positions are (key j of row b at
    position start_pos[b] + j - kv_start[b] = its cache index minus the left padding)."""
    mu = _masking_utils()
    if plan.cu_seqlens is None and (
            (plan.chunk_size is None and m.mask_function is mu.causal_mask_function)
            or (plan.chunk_size is not None
                and _is_plain_chunked_mask(m.mask_function, plan.chunk_size, m.left_padding))):
        return _padding_is_one_block(m, plan)
    B, Tq, Tk = m.batch_size, m.q_length, m.kv_length
    step = max(1, _VERIFY_BLOCK_ELEMENTS // max(1, B * Tk))
    real = m.real_queries
    for i0 in range(0, Tq, step):
        i1 = min(Tq, i0 + step)
        theirs = mu.sdpa_mask(batch_size=B, q_length=i1 - i0, kv_length=Tk, q_offset=m.q_offset + i0,
                              kv_offset=m.kv_offset, mask_function=m.mask_function,
                              attention_mask=m.padding, allow_is_causal_skip=False,
                              use_vmap=m.use_vmap, device=m.device)[:, 0]
        differ = theirs != _plan_mask(plan, B, Tq, Tk, i0, i1, m.device)
        if real is not None:
            differ &= real[:, i0:i1, None]
        if bool(differ.any()):
            return False
    return True


def _unsupported_mask_reason(m: _MaskInputs, local_size, chunk_size) -> str:
    if m.use_vmap:
        return "a custom mask function (or_mask_function / and_mask_function)"
    if local_size is not None and chunk_size is None:
        return f"sliding-window attention (window {local_size}) over more keys than the window"
    if m.padding is not None:
        return "padding between valid tokens, or a mask pattern other than causal/chunked"
    return "a mask pattern other than causal, chunked or packed causal"


def chunkmem_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, local_size=None, use_vmap=False, device="cpu", config=None,
                  **kwargs) -> ChunkmemMask:
    """transformers' mask-builder interface (``AttentionMaskInterface``), chunkmem's version.

    Returns a :class:`ChunkmemMask` holding a checked plan for the op; raises
    ``NotImplementedError`` when no plan reproduces transformers' mask exactly.
    """
    mu = _masking_utils()
    if isinstance(attention_mask, ChunkmemMask):  # built by generate() already, passed back in
        # (the offsets are compared in eager mode only: reading a static cache's length
        # would break a compiled decoding step's graph)
        if attention_mask.shape != (batch_size, 1, q_length, kv_length) or (
                not torch.compiler.is_compiling()
                and (attention_mask.q_offset, attention_mask.kv_offset) != (int(q_offset), int(kv_offset))):
            raise NotImplementedError("chunkmem: a ChunkmemMask was passed for other sizes than the "
                                      f"current ones ({attention_mask!r})")
        return attention_mask
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if kwargs.get("allow_is_bidirectional_skip") or not getattr(config, "is_causal", True):
        raise NotImplementedError("chunkmem: non-causal (bidirectional) attention is not supported")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise NotImplementedError(f"chunkmem: unexpected padding mask {type(attention_mask).__name__}")
    m = _MaskInputs(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function or mu.causal_mask_function,
        padding=None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool),
        use_vmap=bool(use_vmap), device=torch.device(device),
    )
    chunk_size = local_size if (local_size is not None
                                and local_size == getattr(config, "attention_chunk_size", None)) else None
    candidates = [lambda: _rows_plan(m, chunk_size)]
    if chunk_size is not None:
        candidates.append(lambda: _rows_plan(m, None))  # a chunked layer that sees < one chunk
    candidates.append(lambda: _blocks_plan(m))
    for make in candidates:
        plan = make()
        if plan is not None and _plan_matches(m, plan):
            return ChunkmemMask(plan, batch_size, q_length, kv_length, q_offset, kv_offset)
    raise NotImplementedError(
        "chunkmem cannot express this attention mask exactly: "
        f"{_unsupported_mask_reason(m, local_size, chunk_size)}; use attn_implementation='sdpa' for it")


# ----------------------------------------------------------------------------- attention
def _check_packed_kwargs(mask: ChunkmemMask, kwargs):
    """FlashAttention-style packed kwargs (``cu_seq_lens_q/k``, e.g. from
    ``DataCollatorWithFlattening``) must agree with the mask: every document boundary they give
    must be one of the plan's. (transformers only packs the mask when no cache is used: with
    ``use_cache=True`` sdpa would attend across documents; chunkmem raises instead.)"""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    given = cu_q if cu_q is not None else cu_k
    if given is None or mask._checked_cu is given:
        return
    B, _, Tq, Tk = mask.shape
    if cu_k is not None and cu_q is not None and not torch.equal(cu_q, cu_k):
        raise NotImplementedError("chunkmem: packed sequences with different query and key "
                                  "documents (cu_seq_lens_q != cu_seq_lens_k) are not supported")
    cu = given.tolist()
    plan = mask.plan
    if plan.cu_seqlens is not None:
        bounds = set(plan.cu_seqlens.tolist())
    else:
        bounds = set(range(0, B * Tk + 1, Tk)) if Tq == Tk else {0, Tk}
    if B * Tq != cu[-1] or not set(cu) <= bounds:
        raise NotImplementedError(
            "chunkmem: the packed-sequence kwargs (cu_seq_lens_q/k) disagree with the attention "
            "mask transformers built (it packs documents only without a cache: pass use_cache=False)")
    mask._checked_cu = given


def _check_features(module, query, key, value, dropout, is_causal, kwargs):
    """Raise NotImplementedError for what the op does not compute."""
    if dropout:
        raise NotImplementedError(f"chunkmem: attention dropout ({dropout}) is not supported; "
                                  "call model.eval() or set the config's attention_dropout to 0")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("chunkmem: attention logit soft-capping (softcap) is not supported")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"chunkmem: attention sinks ({name}) are not supported")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("chunkmem: additive position biases are not supported")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise NotImplementedError("chunkmem: non-causal attention is not supported")
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        raise NotImplementedError("chunkmem: queries, keys and values must share one head dim, got "
                                  f"{query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]}")


def _plan_without_mask(query, key, kwargs) -> _Plan:
    Tq, Tk = query.shape[2], key.shape[2]
    if kwargs.get("cu_seq_lens_q") is not None:
        raise NotImplementedError("chunkmem: packed sequences (cu_seq_lens_q) need the mask from "
                                  "chunkmem's mask builder (register() installs it)")
    window = kwargs.get("sliding_window")
    if window is not None and Tk > window:
        raise NotImplementedError(f"chunkmem: sliding-window attention (window {window}) is not supported")
    if Tq not in (1, Tk):
        raise NotImplementedError(f"chunkmem: no attention mask with {Tq} queries and {Tk} keys: "
                                  "which keys are valid is ambiguous")
    return _Plan(chunk_size=None)


def _plan_from_tensor(mask: torch.Tensor, query, key) -> _Plan:
    """A 4-D mask given by the caller: accepted if it is causal with one contiguous range of
    valid keys per row (left padding, a static cache's empty slots), else NotImplementedError."""
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or tuple(mask.shape[2:]) != (Tq, Tk):
        raise NotImplementedError(f"chunkmem: an attention mask of shape {tuple(mask.shape)} "
                                  f"(expected 4-D (B, 1, {Tq}, {Tk}))")
    if mask.dtype == torch.bool:
        seen = mask
    elif mask.dtype.is_floating_point:
        seen = mask == 0
        if not bool((seen | (mask <= torch.finfo(mask.dtype).min)).all()):
            raise NotImplementedError("chunkmem: an additive float attention mask with values other "
                                      "than 0 and -inf (a bias) is not supported")
    else:
        raise NotImplementedError(f"chunkmem: an attention mask of dtype {mask.dtype}")
    if seen.shape[1] > 1 and not bool((seen == seen[:, :1]).all()):
        raise NotImplementedError("chunkmem: per-head attention masks are not supported")
    seen = seen[:, 0].expand(B, Tq, Tk)
    last = seen[:, -1]  # the last query's keys give the row's valid range
    has = last.any(-1)
    kv_end = torch.where(has, Tk - last.flip(-1).int().argmax(-1), Tk).to(torch.int32)
    kv_start = torch.where(has, last.int().argmax(-1), Tk).to(torch.int32)
    plan = _Plan(chunk_size=None, kv_start=kv_start, kv_end=kv_end)
    step = max(1, _VERIFY_BLOCK_ELEMENTS // max(1, B * Tk))
    ok = all(bool((_plan_mask(plan, B, Tq, Tk, i0, min(Tq, i0 + step), seen.device)
                   == seen[:, i0:i0 + step]).all()) for i0 in range(0, Tq, step))
    if not ok:
        raise NotImplementedError("chunkmem: this 4-D attention mask is not a causal mask with one "
                                  "contiguous range of valid keys per row")
    return plan


def _run(plan: _Plan, query, key, value, scale, backend):
    paths = dict(chunk_size=plan.chunk_size, use_global=plan.chunk_size is None, scale=scale,
                 backend=backend)
    if plan.cu_seqlens is None:
        return hybrid_attention(query, key, value, kv_start=plan.kv_start, kv_end=plan.kv_end,
                                start_pos=plan.start_pos, **paths)
    B, H, T, D = query.shape

    def flat(x):  # (B, h, T, D) -> (1, h, B * T, D): rows laid end to end
        return x if B == 1 else x.transpose(0, 1).reshape(1, x.shape[1], B * T, D)

    out = hybrid_attention(flat(query), flat(key), flat(value), cu_seqlens_q=plan.cu_seqlens,
                           cu_seqlens_k=plan.cu_seqlens, max_seqlen_q=plan.max_seqlen,
                           max_seqlen_k=plan.max_seqlen, **paths)
    return out if B == 1 else out.reshape(H, B, T, D).transpose(0, 1)


def chunkmem_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, backend="auto", **kwargs):
    """transformers' attention-function interface (``AttentionInterface``), chunkmem's version.

    query (B, H, Tq, D), key/value (B, G, Tk, D) as transformers passes them (RoPE applied, the
    cache's keys included); ``attention_mask`` a :class:`ChunkmemMask` from :func:`chunkmem_mask`,
    None (plain causal attention, Tq in {1, Tk}), or a 4-D causal mask with per-row padding.
    Returns (output (B, Tq, H, D), None): attention weights are never materialized.
    """
    _check_features(module, query, key, value, dropout, is_causal, kwargs)
    if isinstance(attention_mask, ChunkmemMask):
        B, _, Tq, Tk = attention_mask.shape
        if (query.shape[0], query.shape[2], key.shape[2]) != (B, Tq, Tk):
            raise NotImplementedError(
                f"chunkmem: the keys ({tuple(key.shape)}) or queries ({tuple(query.shape)}) do not "
                f"match the cache layout the mask was built for ({attention_mask!r})")
        _check_packed_kwargs(attention_mask, kwargs)
        plan = attention_mask.plan
    elif attention_mask is None:
        plan = _plan_without_mask(query, key, kwargs)
    elif isinstance(attention_mask, torch.Tensor):
        plan = _plan_from_tensor(attention_mask, query, key)
    else:
        raise NotImplementedError(f"chunkmem: an attention mask of type {type(attention_mask).__name__}")
    out = _run(plan, query, key, value, scaling, backend)
    return out.transpose(1, 2).contiguous(), None
