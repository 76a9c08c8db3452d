"""ChunkMemLM.extend / generate (SPEC §4) and the baseline's cached decoding.

Tolerances: models run in float32. A cached step computes the same math as ``forward`` but with
Tq = 1 (or a few) queries against the cached keys instead of the whole segment at once, so the
sums run in another order: logits agree to fp32 rounding, checked with atol = rtol = 1e-5 (the
observed differences are ~3e-7 on logits of magnitude ~1). Token sequences are compared exactly.
"""
import warnings

import pytest
import torch

from chunkmem.baselines import CausalTransformer
from chunkmem.nn import ChunkMemLM, MemoryState, filter_logits, sample_logits

VOCAB = 64
TOL = dict(atol=1e-5, rtol=1e-5)
# segment_len 8, chunk_size 4 (chunk boundaries inside segments), memory_pool 3 (does not divide
# the segment: the last summary of a segment averages 2 tokens); prompt 5 + 20 new tokens cross
# three segment boundaries.
CONFIGS = {
    "global+chunk+memory": dict(),
    "chunk+memory": dict(use_global=False),
    "global+chunk": dict(memory_slots=0),
    "chunk": dict(use_global=False, memory_slots=0),
    "memory-only": dict(use_global=False, chunk_size=None),
    "global+memory": dict(chunk_size=None),
    "global+chunk+memory, learned initial memory": dict(init_slots=2),
    "chunk+memory, learned initial memory": dict(use_global=False, init_slots=3),
}


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=8,
               chunk_size=4, memory_slots=3, memory_pool=3)
    cfg.update(kw)
    return ChunkMemLM(**cfg).eval()


def tokens(B=2, T=5, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def forward_last(model, seq):
    """Logits of the last position of ``forward`` over the whole sequence from an empty state."""
    with torch.no_grad():
        return model(seq)[0][:, -1]


def greedy_reference(model, prompt, n):
    """Greedy decoding by re-running ``forward`` over everything at every step (no cache)."""
    seq = prompt
    for _ in range(n):
        logits = forward_last(model, seq)
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "near tie: pick another seed"
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("name", CONFIGS)
def test_each_cached_step_equals_forward_from_empty_state(name):
    model, seq = tiny_lm(**CONFIGS[name]), tokens(T=26)
    state = None
    for t in range(seq.shape[1]):
        logits, state = model.extend(seq[:, t:t + 1], state)
        torch.testing.assert_close(logits[:, -1], forward_last(model, seq[:, :t + 1]), **TOL)
        assert state.cache_len == (t + 1) % 8
        torch.testing.assert_close(state.next_logits, logits[:, -1], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["global+chunk+memory", "chunk+memory", "chunk+memory, learned initial memory"])
def test_extend_by_pieces_equals_forward(name):
    model, seq = tiny_lm(**CONFIGS[name]), tokens(T=30)
    expected, _ = model(seq)
    state, got = None, []
    for a, b in [(0, 3), (3, 14), (14, 15), (15, 30)]:  # pieces ending inside and across segments
        logits, state = model.extend(seq[:, a:b], state)
        got.append(logits)
    torch.testing.assert_close(torch.cat(got, dim=1), expected.detach(), **TOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generate_equals_forward_decoding(name):
    model, prompt = tiny_lm(**CONFIGS[name]), tokens()
    new, state = model.generate(prompt, 20, temperature=0)
    assert new.shape == (2, 20) and new.dtype == torch.long
    assert torch.equal(new, greedy_reference(model, prompt, 20))
    seq = torch.cat([prompt, new], dim=1)  # 25 tokens: 3 segments and 1 cached token
    assert state.cache_len == 1
    torch.testing.assert_close(state.next_logits, forward_last(model, seq), **TOL)
    # the memory the state carries is the memory forward wrote over the 3 complete segments
    if CONFIGS[name].get("memory_slots", 3):
        _, fwd_state = model(seq[:, :24])
        for got, want in zip(state.layers, fwd_state.layers):
            torch.testing.assert_close(got[0], want[0].detach(), **TOL)
            assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_continuation_equals_one_long_call(temperature):
    model, p = tiny_lm(), tokens()

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    g = gen(7)
    a, s = model.generate(p, 20, temperature=temperature, generator=g)
    b, s2 = model.generate(p[:, :0], 20, state=s, temperature=temperature, generator=g)
    c, s_long = model.generate(p, 40, temperature=temperature, generator=gen(7))
    assert torch.equal(torch.cat([a, b], dim=1), c)
    torch.testing.assert_close(s2.next_logits, s_long.next_logits, **TOL)
    if temperature == 0:  # the state is reusable: the call that continued it did not modify it
        again, _ = model.generate(p[:, :0], 20, state=s, temperature=0)
        assert torch.equal(again, b)


def test_new_user_text_after_a_state():
    model, p, user = tiny_lm(), tokens(), tokens(T=6, seed=3)
    a, s = model.generate(p, 10, temperature=0)
    b, s2 = model.generate(user, 9, temperature=0, state=s)
    history = torch.cat([p, a, user], dim=1)
    assert torch.equal(b, greedy_reference(model, history, 9))
    torch.testing.assert_close(s2.next_logits, forward_last(model, torch.cat([history, b], dim=1)), **TOL)


def test_generate_zero_new_tokens_is_a_prefill():
    model, p = tiny_lm(), tokens(T=13)
    new, s = model.generate(p, 0)
    assert new.shape == (2, 0) and s.cache_len == 5
    torch.testing.assert_close(s.next_logits, forward_last(model, p), **TOL)


def test_state_round_trip_mid_segment(tmp_path):
    model, p = tiny_lm(), tokens()
    a, s = model.generate(p, 6, temperature=0)  # 11 tokens: 3 in the cache
    assert s.cache_len == 3
    torch.save(s.state_dict(), tmp_path / "state.pt")
    restored = MemoryState.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.cache_len == 3
    want, _ = model.generate(p[:, :0], 12, state=s, temperature=0)
    for st in (restored, s.to("cpu"), s.detach()):
        got, _ = model.generate(p[:, :0], 12, state=st, temperature=0)
        assert torch.equal(got, want)
    # a state at a segment boundary (no cache) round-trips too, and forward accepts it
    _, s8 = model.generate(tokens(T=7), 1, temperature=0)
    assert s8.cache is None
    r8 = MemoryState.from_state_dict(s8.state_dict())
    assert r8.cache is None and r8.next_logits is not None
    model(tokens(T=4), r8)


def test_misuse_of_a_state_with_a_cache_raises():
    model, p = tiny_lm(), tokens()
    _, s = model.generate(p, 1)
    with pytest.raises(ValueError, match="unfinished segment"):
        model(p, s)
    with pytest.raises(ValueError, match="segment boundary"):
        s.reset(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="batch size"):
        model.generate(tokens(B=3), 2, state=s)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(p[:, :0], 2)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(p[:, :0], 2, state=model(p)[1])  # a forward state has no next_logits
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(p, 2, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(p, -1)


def test_seeded_sampling_is_deterministic():
    model, p = tiny_lm(), tokens()
    runs = [model.generate(p, 24, generator=torch.Generator().manual_seed(s))[0] for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_top_k_keeps_only_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.0]]).expand(4000, 6)
    assert torch.equal(torch.isfinite(filter_logits(logits[:1], top_k=3)), torch.tensor([[0, 1, 0, 1, 0, 1]]).bool())
    drawn = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 3, 5}


@pytest.mark.parametrize("top_p,kept", [(0.45, {0}), (0.75, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.15, 0.05, 0.5, 0.3])  # sorted: 2 (0.5), 3 (0.3), 0 (0.15), 1 (0.05)
    order = [2, 3, 0, 1]
    logits = probs.log()[None].expand(4000, 4)
    allowed = {order[i] for i in kept}
    finite = torch.isfinite(filter_logits(logits[:1], top_p=top_p))[0]
    assert {i for i in range(4) if finite[i]} == allowed
    drawn = sample_logits(logits, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == allowed


def test_top_k_1_and_tiny_top_p_are_greedy():
    model, p = tiny_lm(), tokens()
    greedy, _ = model.generate(p, 12, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        got, _ = model.generate(p, 12, temperature=1.5, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(got, greedy)


@pytest.mark.parametrize("use_global", [True, False])
def test_triton_kernels_in_the_interpreter(use_global):
    pytest.importorskip("triton")
    from chunkmem.triton_env import interpreting

    if torch.cuda.is_available() or not interpreting():
        pytest.skip("checks the kernels on CPU tensors under TRITON_INTERPRET=1")
    # head dim 32 (the kernels' smallest); 1 layer, 11 tokens: two segment boundaries
    model = tiny_lm(d_model=32, n_layers=1, n_heads=1, n_kv_heads=1, segment_len=4, chunk_size=2,
                    memory_slots=2, memory_pool=2, use_global=use_global)
    seq = tokens(B=1, T=11)
    expected, _ = model(seq)  # torch backend
    model.set_backend("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch would warn
        new, state = model.generate(seq[:, :3], 8, temperature=0)
        steps = [model.extend(seq[:, :1])]
        for t in range(1, 11):
            steps.append(model.extend(seq[:, t:t + 1], steps[-1][1]))
    torch.testing.assert_close(torch.cat([lg for lg, _ in steps], dim=1), expected.detach(), **TOL)
    model.set_backend("torch")
    assert torch.equal(new, greedy_reference(model, seq[:, :3], 8))


@pytest.mark.parametrize("segment_len", [None, 8])
def test_baseline_cached_decoding_equals_forward(segment_len):
    torch.manual_seed(0)
    model = CausalTransformer(VOCAB, 32, 2, 4, n_kv_heads=2, segment_len=segment_len)
    seq = tokens(T=21)
    expected, _ = model(seq)
    logits, cache = model.forward_cached(seq[:, :5])
    got = [logits]
    for t in range(5, 21):
        logits, cache = model.forward_cached(seq[:, t:t + 1], cache)
        got.append(logits)
    torch.testing.assert_close(torch.cat(got, dim=1), expected.detach(), **TOL)
    assert cache.length == (21 if segment_len is None else 21 - 16)
