"""Bad inputs of chunkmem.hybrid_attention (SPEC §1) and chunkmem.gated_memory_update (SPEC §2)
raise ValueError or TypeError whose message names the offending argument.

Each case starts from a valid call and changes one thing. Valid shapes: hybrid_attention
q (2, 4, 5, 8), k/v (2, 2, 6, 8), mem_k/mem_v (2, 2, 3, 8), mem_len (2,), weights (4, 3); packed
documents (SPEC §1b) q (1, 4, 5, 8), k/v (1, 2, 9, 8), cu_seqlens_q/cu_seqlens_k (3,), memory,
mem_len and start_pos per document (2, ...);
gated_memory_update memory (2, 4, 3), x (2, 5, 3), w_* (3, 3), b_* (3,), mem_len (2,).
"""
from __future__ import annotations

import pytest
import torch

import chunkmem

BACKENDS = ["torch", "reference"]
ERRORS = (ValueError, TypeError)


def _w(*names: str) -> str:
    """Regex matching any of ``names`` as a whole word (so "k" does not match inside "mem_k")."""
    return "|".join(rf"(?<![\w.]){n}(?!\w)" for n in names)


def attn_args() -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(2, 4, 5, 8), k=r(2, 2, 6, 8), v=r(2, 2, 6, 8), mem_k=r(2, 2, 3, 8),
                mem_v=r(2, 2, 3, 8), weights=r(4, 3), chunk_size=2, mem_len=torch.tensor([1, 3]),
                rope_base=10000.0, start_pos=3)


def call_attn(a: dict, backend: str):
    a = dict(a)
    return chunkmem.hybrid_attention(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("mem_k"),
                                     a.pop("mem_v"), backend=a.pop("backend", backend), **a)


def _odd_d(a):
    return {n: a[n][..., :7] for n in ("q", "k", "v", "mem_k", "mem_v")}


# id -> (function of the valid args returning the changed args, regex the message must match)
ATTN_BAD = {
    "q_rank": (lambda a: dict(q=a["q"][0]), _w("q")),
    "k_rank": (lambda a: dict(k=a["k"][0], v=a["v"][0]), _w("k", "v")),
    "v_rank": (lambda a: dict(v=a["v"][0]), _w("v")),
    "mem_k_rank": (lambda a: dict(mem_k=a["mem_k"][0], mem_v=a["mem_v"][0]), _w("mem_k", "mem_v")),
    "kv_batch": (lambda a: dict(k=a["k"][:1], v=a["v"][:1]), _w("k", "v")),
    "v_batch": (lambda a: dict(v=a["v"][:1]), _w("v")),
    "v_len_differs_from_k": (lambda a: dict(v=a["v"][:, :, :5]), _w("v")),
    "v_heads_differ_from_k": (lambda a: dict(v=a["v"][:, :1]), _w("v")),
    "H_not_multiple_of_G": (lambda a: dict(q=a["q"][:, :3]), _w("q", "k", "H", "G")),
    "k_D_differs": (lambda a: dict(k=a["k"][..., :4]), _w("k")),
    "kv_D_differs_from_q": (lambda a: dict(k=a["k"][..., :4], v=a["v"][..., :4]), _w("k", "v")),
    "v_D_differs": (lambda a: dict(v=a["v"][..., :4]), _w("v")),
    "Tq_gt_Tk": (lambda a: dict(q=torch.randn(2, 4, 7, 8)), _w("q", "k", "Tq", "Tk")),
    "odd_D_with_rope": (_odd_d, _w("rope_base", "D", "q")),
    "k_dtype": (lambda a: dict(k=a["k"].half()), _w("k")),
    "v_dtype": (lambda a: dict(v=a["v"].double()), _w("v")),
    "mem_k_dtype": (lambda a: dict(mem_k=a["mem_k"].bfloat16()), _w("mem_k")),
    "mem_v_dtype": (lambda a: dict(mem_v=a["mem_v"].half()), _w("mem_v")),
    "chunk_size_0": (lambda a: dict(chunk_size=0), _w("chunk_size")),
    "chunk_size_negative": (lambda a: dict(chunk_size=-3), _w("chunk_size")),
    "chunk_size_float": (lambda a: dict(chunk_size=2.5), _w("chunk_size")),
    "weights_2": (lambda a: dict(weights=torch.ones(2)), _w("weights")),
    "weights_H2": (lambda a: dict(weights=torch.ones(4, 2)), _w("weights")),
    "weights_wrong_H": (lambda a: dict(weights=torch.ones(5, 3)), _w("weights")),
    "weights_3x1": (lambda a: dict(weights=torch.ones(3, 1)), _w("weights")),
    "weights_rank3": (lambda a: dict(weights=torch.ones(4, 3, 1)), _w("weights")),
    "mem_len_negative": (lambda a: dict(mem_len=torch.tensor([-1, 2])), _w("mem_len")),
    "mem_len_gt_S": (lambda a: dict(mem_len=torch.tensor([1, 4])), _w("mem_len")),
    "mem_len_wrong_shape": (lambda a: dict(mem_len=torch.tensor([1, 2, 3])), _w("mem_len")),
    "mem_len_float": (lambda a: dict(mem_len=torch.tensor([1.0, 2.0])), _w("mem_len")),
    "mem_k_without_mem_v": (lambda a: dict(mem_v=None), _w("mem_k", "mem_v")),
    "mem_v_without_mem_k": (lambda a: dict(mem_k=None), _w("mem_k", "mem_v")),
    "mem_k_batch": (lambda a: dict(mem_k=a["mem_k"][:1], mem_v=a["mem_v"][:1]), _w("mem_k", "mem_v")),
    "mem_k_heads": (lambda a: dict(mem_k=a["mem_k"][:, :1], mem_v=a["mem_v"][:, :1]), _w("mem_k", "mem_v")),
    "mem_k_D": (lambda a: dict(mem_k=a["mem_k"][..., :4], mem_v=a["mem_v"][..., :4]), _w("mem_k", "mem_v")),
    "mem_v_slots_differ": (lambda a: dict(mem_v=a["mem_v"][:, :, :2]), _w("mem_v")),
    "unknown_backend": (lambda a: dict(backend="cuda_magic"), _w("backend")),
    # SPEC §1b: per-row key ranges and start_pos (Tk = 6)
    "kv_start_float": (lambda a: dict(kv_start=torch.tensor([0.0, 1.0])), _w("kv_start")),
    "kv_start_bool": (lambda a: dict(kv_start=torch.tensor([False, True])), _w("kv_start")),
    "kv_end_list": (lambda a: dict(kv_end=[6, 6]), _w("kv_end")),
    "kv_start_shape": (lambda a: dict(kv_start=torch.tensor([0, 1, 2])), _w("kv_start")),
    "kv_end_rank0": (lambda a: dict(kv_end=torch.tensor(6)), _w("kv_end")),
    "kv_start_negative": (lambda a: dict(kv_start=torch.tensor([-1, 0])), _w("kv_start")),
    "kv_end_gt_Tk": (lambda a: dict(kv_end=torch.tensor([6, 7])), _w("kv_end")),
    "kv_end_gt_Tk_alone": (lambda a: dict(kv_start=torch.tensor([0, 7]), kv_end=None),
                           _w("kv_start", "kv_end")),
    "kv_start_gt_kv_end": (lambda a: dict(kv_start=torch.tensor([3, 0]), kv_end=torch.tensor([2, 6])),
                           _w("kv_start", "kv_end")),
    "start_pos_negative": (lambda a: dict(start_pos=-1), _w("start_pos")),
    "start_pos_float": (lambda a: dict(start_pos=2.0), _w("start_pos")),
    "start_pos_tensor_negative": (lambda a: dict(start_pos=torch.tensor([0, -2])), _w("start_pos")),
    "start_pos_tensor_shape": (lambda a: dict(start_pos=torch.tensor([1, 2, 3])), _w("start_pos")),
    "start_pos_tensor_float": (lambda a: dict(start_pos=torch.tensor([1.0, 2.0])), _w("start_pos")),
    "mem_len_int_gt_S": (lambda a: dict(mem_len=4), _w("mem_len")),
    "mem_len_int_negative": (lambda a: dict(mem_len=-1), _w("mem_len")),
    "mem_len_bool": (lambda a: dict(mem_len=True), _w("mem_len")),
    "mem_len_list": (lambda a: dict(mem_len=[1, 2]), _w("mem_len")),
    "max_seqlen_q_without_cu_seqlens": (lambda a: dict(max_seqlen_q=5), _w("max_seqlen_q")),
    "max_seqlen_k_without_cu_seqlens": (lambda a: dict(max_seqlen_k=6), _w("max_seqlen_k")),
    "cu_seqlens_with_B_2": (lambda a: dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32),
                                           cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32)),
                            _w("cu_seqlens_q", "cu_seqlens_k", "B")),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_baseline_runs(backend):
    """The unchanged arguments are accepted (so every failure below comes from the change)."""
    out = call_attn(attn_args(), backend)
    assert out.shape == (2, 4, 5, 8) and torch.isfinite(out).all()


def check_bad_attn(a: dict, change, pattern: str, backend: str):
    """The valid arguments ``a`` changed by ``change`` raise an error matching ``pattern``."""
    a.update(change(a))
    with pytest.raises(ERRORS, match=pattern):
        call_attn(a, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", list(ATTN_BAD))
def test_hybrid_attention_bad_input(backend, case_id):
    check_bad_attn(attn_args(), *ATTN_BAD[case_id], backend)


def _second_device():
    try:
        torch.empty(1, device="meta")
        return "meta"
    except Exception:  # pragma: no cover - meta exists in every supported torch
        return None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["k", "v", "mem_k", "mem_v", "q", "weights", "mem_len"])
def test_hybrid_attention_mixed_devices(backend, name):
    dev = _second_device()
    if dev is None:
        pytest.skip("no second device")
    a = attn_args()
    a[name] = a[name].to(dev)
    pattern = _w("q", "k") if name == "q" else _w(name)
    with pytest.raises(ERRORS, match=pattern):
        call_attn(a, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["kv_start", "kv_end", "start_pos"])
def test_range_tensors_on_another_device(backend, name):
    dev = _second_device()
    if dev is None:
        pytest.skip("no second device")
    a = attn_args()
    a[name] = torch.tensor([0, 1], device=dev)
    with pytest.raises(ERRORS, match=_w(name)):
        call_attn(a, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mem_len_int_equals_tensor(backend):
    a = attn_args()
    as_int = call_attn({**a, "mem_len": 2}, backend)
    assert torch.equal(as_int, call_attn({**a, "mem_len": torch.tensor([2, 2])}, backend))
    assert not torch.equal(as_int, call_attn({**a, "mem_len": 3}, backend))


# ----------------------------------------------------------------------------- packed documents

def packed_args() -> dict:
    """B = 1; two documents: 2 queries / 4 keys and 3 / 5 (Tq = 5, Tk = 9); memory per document."""
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(1, 4, 5, 8), k=r(1, 2, 9, 8), v=r(1, 2, 9, 8), mem_k=r(2, 2, 3, 8),
                mem_v=r(2, 2, 3, 8), weights=r(4, 3), chunk_size=2, mem_len=torch.tensor([1, 3]),
                rope_base=10000.0, start_pos=torch.tensor([0, 3]),
                cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32))


def _cu(*x, dtype=torch.int32):
    return torch.tensor(x, dtype=dtype)


PACKED_BAD = {
    "cu_seqlens_q_only": (lambda a: dict(cu_seqlens_k=None), _w("cu_seqlens_q", "cu_seqlens_k")),
    "cu_seqlens_k_only": (lambda a: dict(cu_seqlens_q=None), _w("cu_seqlens_q", "cu_seqlens_k")),
    "cu_seqlens_q_float": (lambda a: dict(cu_seqlens_q=_cu(0, 2, 5, dtype=torch.float32)), _w("cu_seqlens_q")),
    "cu_seqlens_k_int16": (lambda a: dict(cu_seqlens_k=_cu(0, 4, 9, dtype=torch.int16)), _w("cu_seqlens_k")),
    "cu_seqlens_q_list": (lambda a: dict(cu_seqlens_q=[0, 2, 5]), _w("cu_seqlens_q")),
    "cu_seqlens_q_rank2": (lambda a: dict(cu_seqlens_q=_cu(0, 2, 5)[None]), _w("cu_seqlens_q")),
    "cu_seqlens_k_one_entry": (lambda a: dict(cu_seqlens_k=_cu(0)), _w("cu_seqlens_k")),
    "cu_seqlens_lengths_differ": (lambda a: dict(cu_seqlens_k=_cu(0, 4, 6, 9)), _w("cu_seqlens_q", "cu_seqlens_k")),
    "cu_seqlens_q_not_from_0": (lambda a: dict(cu_seqlens_q=_cu(1, 2, 5)), _w("cu_seqlens_q")),
    "cu_seqlens_q_not_to_Tq": (lambda a: dict(cu_seqlens_q=_cu(0, 2, 4)), _w("cu_seqlens_q")),
    "cu_seqlens_k_not_to_Tk": (lambda a: dict(cu_seqlens_k=_cu(0, 4, 10)), _w("cu_seqlens_k")),
    "cu_seqlens_k_decreasing": (lambda a: dict(cu_seqlens_k=_cu(0, 10, 9)), _w("cu_seqlens_k")),
    "document_more_queries_than_keys": (lambda a: dict(cu_seqlens_k=_cu(0, 1, 9)),
                                        _w("cu_seqlens_q", "cu_seqlens_k")),
    "with_kv_start": (lambda a: dict(kv_start=torch.tensor([0])), _w("kv_start")),
    "with_kv_end": (lambda a: dict(kv_end=torch.tensor([9])), _w("kv_end")),
    "mem_k_per_row_not_per_document": (lambda a: dict(mem_k=a["mem_k"][:1], mem_v=a["mem_v"][:1]),
                                       _w("mem_k", "mem_v")),
    "mem_len_per_row": (lambda a: dict(mem_len=torch.tensor([1])), _w("mem_len")),
    "start_pos_per_row": (lambda a: dict(start_pos=torch.tensor([0])), _w("start_pos")),
    "start_pos_negative": (lambda a: dict(start_pos=torch.tensor([0, -1])), _w("start_pos")),
    "max_seqlen_q_too_small": (lambda a: dict(max_seqlen_q=2), _w("max_seqlen_q")),
    "max_seqlen_k_too_small": (lambda a: dict(max_seqlen_k=4), _w("max_seqlen_k")),
    "max_seqlen_k_float": (lambda a: dict(max_seqlen_k=5.0), _w("max_seqlen_k")),
    "max_seqlen_q_negative": (lambda a: dict(max_seqlen_q=-1), _w("max_seqlen_q")),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_valid_baseline_runs(backend):
    out = call_attn(packed_args(), backend)
    assert out.shape == (1, 4, 5, 8) and torch.isfinite(out).all()
    assert torch.equal(call_attn({**packed_args(), "max_seqlen_q": 3, "max_seqlen_k": 5}, backend), out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", list(PACKED_BAD))
def test_packed_bad_input(backend, case_id):
    check_bad_attn(packed_args(), *PACKED_BAD[case_id], backend)


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_on_another_device(name):
    dev = _second_device()
    if dev is None:
        pytest.skip("no second device")
    a = packed_args()
    a[name] = a[name].to(dev)
    with pytest.raises(ERRORS, match=_w(name)):
        call_attn(a, "torch")


@pytest.mark.parametrize("packed", [False, True])
def test_value_checks_read_the_device_once(monkeypatch, packed):
    """Every check that needs tensor values (mem_len, kv ranges, start_pos, cu_seqlens) and the
    max_seqlen_* computation share one device-to-host transfer (counted on the Tensor methods
    that read values; the backend is replaced by a stub so only validation runs)."""
    from chunkmem import ops

    a = packed_args() if packed else {**attn_args(), "kv_start": torch.tensor([0, 2]),
                                      "kv_end": torch.tensor([6, 5]), "start_pos": torch.tensor([1, 2])}
    reads = []
    for method in ("tolist", "item", "__int__", "__bool__", "__index__", "cpu", "numpy"):
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *x, _real=real, _m=method: reads.append(_m) or _real(self, *x))
    seen = {}
    monkeypatch.setattr(ops, "attention_backend",
                        lambda name: lambda *args, **kw: seen.update(kw) or args[0])
    call_attn(a, "torch")
    assert reads == ["tolist"]
    if packed:
        assert (seen["max_seqlen_q"], seen["max_seqlen_k"]) == (3, 5)
        assert seen["cu_seqlens_q"].dtype == torch.int32
    else:
        assert seen["kv_start"].dtype == torch.int32 and seen["start_pos"].dtype == torch.int64


# ----------------------------------------------------------------------------- gated_memory_update

def mem_args() -> dict:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    memory = r(2, 4, 3)
    memory[0, :3] = 0  # row 0 holds one valid slot
    return dict(memory=memory, x=r(2, 5, 3), w_gate=r(3, 3), b_gate=r(3), w_cand=r(3, 3),
                b_cand=r(3), chunk_size=2, mem_len=torch.tensor([1, 4]))


def call_mem(a: dict, backend: str):
    a = dict(a)
    pos = [a.pop(n) for n in ("memory", "x", "w_gate", "b_gate", "w_cand", "b_cand")]
    return chunkmem.gated_memory_update(*pos, backend=a.pop("backend", backend), **a)


MEM_BAD = {
    "memory_rank": (lambda a: dict(memory=a["memory"][0]), _w("memory")),
    "x_rank": (lambda a: dict(x=a["x"][0]), _w("x")),
    "x_batch": (lambda a: dict(x=a["x"][:1]), _w("x", "memory")),
    "x_d": (lambda a: dict(x=torch.randn(2, 5, 4)), _w("x", "memory")),
    "w_gate_shape": (lambda a: dict(w_gate=torch.randn(3, 4)), _w("w_gate")),
    "w_gate_rank": (lambda a: dict(w_gate=torch.randn(3)), _w("w_gate")),
    "b_gate_shape": (lambda a: dict(b_gate=torch.randn(4)), _w("b_gate")),
    "w_cand_shape": (lambda a: dict(w_cand=torch.randn(4, 3)), _w("w_cand")),
    "b_cand_shape": (lambda a: dict(b_cand=torch.randn(3, 1)), _w("b_cand")),
    "chunk_size_0": (lambda a: dict(chunk_size=0), _w("chunk_size")),
    "chunk_size_negative": (lambda a: dict(chunk_size=-2), _w("chunk_size")),
    "chunk_size_float": (lambda a: dict(chunk_size=1.5), _w("chunk_size")),
    "mem_len_negative": (lambda a: dict(mem_len=torch.tensor([-1, 0])), _w("mem_len")),
    "mem_len_gt_S": (lambda a: dict(mem_len=torch.tensor([1, 5])), _w("mem_len")),
    "mem_len_wrong_shape": (lambda a: dict(mem_len=torch.tensor([1])), _w("mem_len")),
    "unknown_backend": (lambda a: dict(backend="cuda_magic"), _w("backend")),
    "mem_len_int_gt_S": (lambda a: dict(mem_len=5), _w("mem_len")),
    "mem_len_int_negative": (lambda a: dict(mem_len=-1), _w("mem_len")),
    "mem_len_float": (lambda a: dict(mem_len=2.0), _w("mem_len")),
    "mem_len_float_tensor": (lambda a: dict(mem_len=torch.tensor([1.0, 2.0])), _w("mem_len")),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_update_mem_len_int_equals_tensor(backend):
    a = mem_args()
    a["memory"][1, :2] = 0  # both rows hold 2 valid slots
    new_int, len_int = call_mem({**a, "mem_len": 2}, backend)
    new_t, len_t = call_mem({**a, "mem_len": torch.tensor([2, 2])}, backend)
    assert torch.equal(new_int, new_t) and torch.equal(len_int, len_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_valid_baseline_runs(backend):
    new_mem, new_len = call_mem(mem_args(), backend)
    assert new_mem.shape == (2, 4, 3) and new_len.tolist() == [4, 4]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id", list(MEM_BAD))
def test_gated_memory_update_bad_input(backend, case_id):
    change, pattern = MEM_BAD[case_id]
    a = mem_args()
    a.update(change(a))
    with pytest.raises(ERRORS, match=pattern):
        call_mem(a, backend)
