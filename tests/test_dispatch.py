"""Backend dispatch edge cases: empty memory, and the Triton fallback with its one-time warning.

On a machine without CUDA the "triton" backend runs in the interpreter (tests/conftest.py).
"""
import warnings

import pytest
import torch

import chunkmem
from chunkmem import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_memory_only_with_zero_slots_gives_zeros(backend):
    q = torch.randn(1, 2, 5, 32, device=DEVICE)
    k = torch.randn(1, 2, 5, 32, device=DEVICE)
    empty = torch.zeros(1, 2, 0, 32, device=DEVICE)
    out = chunkmem.hybrid_attention(q, k, k, empty, empty, use_global=False, backend=backend)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))


def test_unsupported_triton_call_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, device=DEVICE) for _ in range(3))  # D=8: no kernel for it
    with pytest.warns(RuntimeWarning, match="head dim 8"):
        out = chunkmem.hybrid_attention(q, k, v, chunk_size=4, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second identical call must not warn again
        again = chunkmem.hybrid_attention(q, k, v, chunk_size=4, backend="triton")
    expected = chunkmem.hybrid_attention(q, k, v, chunk_size=4, backend="torch")
    assert torch.equal(out, expected) and torch.equal(again, expected)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU rule of 'triton' without the interpreter")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        chunkmem.hybrid_attention(q, q, q, backend="triton")
