"""pytest-benchmark regression cases: ``pytest bench/ --benchmark-only``.

Small CPU fp32 points of bench/cases.py, kept out of the default test run (pyproject's
``testpaths = ["tests"]``). Before timing, each chunkmem case checks that the benchmarked output
matches the reference backend on the same inputs (fp32: atol 2e-5, rtol 1e-4), so a regression
benchmark never times a wrong result; so does FlexAttention's op chunk (the same function: its
block mask is checked that way); other peers check shape and finiteness.
"""
from __future__ import annotations

import pytest
import torch

from bench.cases import Shape, build_case, make_step
from bench.flops import attention_flops

ATOL, RTOL = 2e-5, 1e-4  # fp32 against the fp32 reference
SHAPE = dict(B=1, H=8, D=64, chunk_size=64, S=64)
ATTENTION_CASES = [
    ("chunk+memory", "chunkmem-torch", "fwd", 2048),
    ("chunk+memory", "chunkmem-torch", "fwd+bwd", 1024),
    ("global+chunk+memory", "chunkmem-torch", "fwd", 1024),
    ("global+chunk+memory", "chunkmem-torch", "fwd+bwd", 512),
    ("chunk", "chunkmem-torch", "fwd", 2048),
    ("causal", "sdpa", "fwd", 1024),
    ("chunk", "flex", "fwd", 1024),  # compiled FlexAttention: the same function as chunkmem's op chunk
]


def _case(op, impl, pass_, T):
    return build_case(op, impl, Shape(T=T, **SHAPE), device="cpu", dtype=torch.float32, pass_=pass_)


@pytest.mark.parametrize("op,impl,pass_,T", ATTENTION_CASES,
                         ids=[f"{i}-{o}-{p}-T{t}" for o, i, p, t in ATTENTION_CASES])
def test_attention(benchmark, op, impl, pass_, T):
    case = _case(op, impl, pass_, T)
    with torch.no_grad():
        out = case.forward()
    assert out.shape == (SHAPE["B"], SHAPE["H"], T, SHAPE["D"])
    assert torch.isfinite(out).all()
    if impl.startswith("chunkmem-") or (impl, op) == ("flex", "chunk"):
        with torch.no_grad():
            expected = _case(op, "chunkmem-reference", pass_, T).forward()  # same seed, same inputs
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    benchmark.extra_info["flops"] = attention_flops(op, pass_, T=T, **{k: SHAPE[k] for k in ("B", "H", "D", "chunk_size", "S")})
    benchmark(make_step(case, pass_))


@pytest.mark.parametrize("impl", ["chunkmem-lm", "chunkmem-lm-noglobal", "sdpa-transformer"])
def test_model_fwd_bwd(benchmark, impl):
    shape = Shape(B=1, H=4, D=32, T=512, chunk_size=64, S=16, n_layers=2, vocab_size=256, segment_len=256)
    case = build_case("model", impl, shape, device="cpu", dtype=torch.float32, pass_="fwd+bwd")
    loss = case.forward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in case.leaves)
    for p in case.leaves:
        p.grad = None
    benchmark(make_step(case, "fwd+bwd"))
    assert all(p.grad is None for p in case.leaves)  # a step leaves no gradients behind
