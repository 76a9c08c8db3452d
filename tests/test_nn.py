"""chunkmem.nn: segment recurrence, training signal, state save/load, failure atomicity.

Tolerances: models run in float32; "same computation, different segmentation" comparisons use
atol=1e-5 (the two paths run the identical ops in the same order, so they agree to rounding).
"""
import pytest
import torch
import torch.nn.functional as F

from chunkmem.nn import Block, ChunkMemLM, HybridAttention, MemoryState

VOCAB = 64


def small_lm(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, segment_len=16,
               chunk_size=8, memory_slots=4, memory_pool=4)
    cfg.update(kw)
    return ChunkMemLM(**cfg)


def tokens(B=2, T=32, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_two_segments_in_one_call_equal_two_calls_with_carried_state():
    model, tok = small_lm(), tokens()
    logits, state = model(tok)
    la, sa = model(tok[:, :16])
    lb, sb = model(tok[:, 16:], sa)
    torch.testing.assert_close(logits, torch.cat([la, lb], dim=1), atol=1e-5, rtol=1e-5)
    for (m1, l1), (m2, l2) in zip(state.layers, sb.layers):
        torch.testing.assert_close(m1, m2, atol=1e-5, rtol=1e-5)
        assert torch.equal(l1, l2)
    assert [int(x) for x in state.layers[0][1]] == [4, 4]  # 32 tokens / pool 4 = 8 states, S = 4


def test_memory_changes_the_second_segment():
    model, tok = small_lm(), tokens()
    with_memory, _ = model(tok)
    fresh, _ = model(tok[:, 16:])
    assert (with_memory[:, 16:] - fresh).abs().max() > 1e-4


def test_loss_decreases_on_a_tiny_batch():
    model, tok = small_lm(), tokens(T=48)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        logits, _ = model(tok)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_state_save_load_round_trip(tmp_path):
    model, tok = small_lm(), tokens()
    _, state = model(tok[:, :16])
    torch.save({"model": model.state_dict(), "memory": state.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2 = small_lm(memory_slots=4)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # make sure loading really overwrites
    model2.load_state_dict(ckpt["model"])
    restored = MemoryState.from_state_dict(ckpt["memory"])
    expected, _ = model(tok[:, 16:], state)
    got, _ = model2(tok[:, 16:], restored)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_detach_every_cuts_the_graph_between_segments():
    model, tok = small_lm(detach_every=1), tokens()
    _, state = model(tok)
    assert all(lm[0].grad_fn is not None for lm in state.layers)  # last segment's graph only
    logits, _ = model(tok)
    logits[:, 16:].sum().backward()
    # with the memory detached, segment-2 logits do not reach the memory-write parameters
    # through segment 1; only through segment 2's own write, which feeds nothing: zero grad
    assert all(b.attn.w_gate.grad is None or b.attn.w_gate.grad.abs().max() == 0 for b in model.blocks)
    model.zero_grad()
    model_full = small_lm(detach_every=None)
    logits, _ = model_full(tok)
    logits[:, 16:].sum().backward()
    assert model_full.blocks[0].attn.w_gate.grad.abs().max() > 0


def test_failed_call_leaves_state_untouched():
    model, tok = small_lm(), tokens()
    _, state = model(tok[:, :16])
    before = [(m.clone(), n.clone()) for m, n in state.layers]
    with pytest.raises(ValueError, match="batch size"):
        model(tokens(B=3, T=16), state)
    with pytest.raises(TypeError, match="tokens"):
        model(tok.float(), state)
    for (m, n), (m0, n0) in zip(state.layers, before):
        assert torch.equal(m, m0) and torch.equal(n, n0)


def test_global_only_layer_is_causal_self_attention():
    torch.manual_seed(0)
    attn = HybridAttention(32, 4, chunk_size=None, memory_slots=0, rope_base=None)
    x = torch.randn(2, 10, 32)
    y, state = attn(x)
    assert state is None
    q = attn.q_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    v = attn.v_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(y, attn.o_proj(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion,shape", [("head", (4, 3)), ("scalar", (3,))])
def test_path_weights_are_a_softmax_over_paths_that_are_on(fusion, shape):
    attn = HybridAttention(32, 4, chunk_size=None, memory_slots=4, fusion=fusion)
    w = attn.path_weights()
    assert w.shape == shape
    torch.testing.assert_close(w.sum(-1), torch.ones(shape[:-1]))
    assert torch.all(w[..., 1] == 0)  # chunk path off


def test_block_is_pre_ln_residual():
    torch.manual_seed(0)
    block = Block(32, 4, chunk_size=8, memory_slots=0)
    x = torch.randn(1, 12, 32)
    y, _ = block(x)
    h = x + block.attn(block.ln1(x))[0]
    torch.testing.assert_close(y, h + block.ffn(block.ln2(h)))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="n_heads"):
        HybridAttention(30, 4)
    with pytest.raises(ValueError, match="fusion"):
        HybridAttention(32, 4, fusion="mean")
    with pytest.raises(ValueError, match="path"):
        HybridAttention(32, 4, chunk_size=None, memory_slots=0, use_global=False)


# ------------------------------------------------------------------ learned initial memory

def _learned_state(model, B):
    """The memory an empty row reads with init_slots=K: each layer's K learned slots right-aligned
    (the other slots zero), mem_len K."""
    layers = []
    for block in model.blocks:
        a = block.attn
        mem = torch.zeros(B, a.memory_slots, a.d_model)
        mem[:, a.memory_slots - a.init_slots:] = a.memory_init.detach()
        layers.append((mem, torch.full((B,), a.init_slots, dtype=torch.long)))
    return MemoryState(layers)


def test_empty_state_reads_the_learned_initial_slots():
    model, tok = small_lm(init_slots=3), tokens()
    assert model.blocks[0].attn.memory_init.shape == (3, 32)
    plain = small_lm()  # the same weights without the learned slots
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "memory_init" not in k})
    with torch.no_grad():
        from_empty, empty_end = model(tok)  # None: the empty state of init_state
        explicit, _ = model(tok[:, :16], _learned_state(model, 2))
        from_zeros, zeros_end = plain(tok)
    # the first segment reads the learned slots as a memory of K valid slots ...
    torch.testing.assert_close(from_empty[:, :16], explicit, atol=0, rtol=0)
    assert (from_empty[:, :16] - from_zeros[:, :16]).abs().max() > 1e-3
    # ... but they are never written: layer 0 (whose inputs are the embeddings) writes what it
    # writes with init_slots=0; in a one-layer model every later segment is that of init_slots=0
    torch.testing.assert_close(empty_end.layers[0][0], zeros_end.layers[0][0], atol=0, rtol=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(empty_end.layers, zeros_end.layers))
    one, one_plain = small_lm(init_slots=3, n_layers=1), small_lm(n_layers=1)
    one_plain.load_state_dict({k: v for k, v in one.state_dict().items() if "memory_init" not in k})
    with torch.no_grad():
        torch.testing.assert_close(one(tok)[0][:, 16:], one_plain(tok)[0][:, 16:], atol=0, rtol=0)
    # reset empties a row: it reads the learned slots again, the other row keeps its memory
    _, s1 = model(tok[:, :16])
    with torch.no_grad():
        after_reset, _ = model(tok[:, 16:], s1.reset(torch.tensor([True, False])))
        fresh, _ = model(tok[:, 16:])
        carried, _ = model(tok[:, 16:], s1)
    torch.testing.assert_close(after_reset[0], fresh[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after_reset[1], carried[1], atol=1e-6, rtol=1e-6)


def test_learned_initial_slots_get_gradients_only_from_empty_rows():
    model, tok = small_lm(init_slots=2), tokens()
    _, state = model(tok[:, :16])
    state = state.detach().reset(torch.tensor([True, False]))
    logits, _ = model(tok[:, 16:], state)
    logits[0].sum().backward()
    assert model.blocks[0].attn.memory_init.grad.abs().sum() > 0
    model.zero_grad()
    logits, _ = model(tok[:, 16:], state)
    logits[1].sum().backward()  # row 1 has memory: the learned slots are not read
    assert model.blocks[0].attn.memory_init.grad is None or model.blocks[0].attn.memory_init.grad.abs().sum() == 0


def test_learned_initial_memory_state_dict_round_trip(tmp_path):
    model, tok = small_lm(init_slots=4), tokens()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    assert {f"blocks.{i}.attn.memory_init" for i in range(2)} <= set(sd)
    model2 = small_lm(init_slots=4)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    model2.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model2(tok)[0], model(tok)[0], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="memory_init"):
        small_lm().load_state_dict(sd)  # a model without learned slots refuses these weights


def test_bad_init_slots():
    with pytest.raises(ValueError, match="init_slots"):
        HybridAttention(32, 4, memory_slots=4, init_slots=5)
    with pytest.raises(ValueError, match="init_slots"):
        HybridAttention(32, 4, memory_slots=0, init_slots=1)
    with pytest.raises(ValueError, match="init_slots"):
        HybridAttention(32, 4, memory_slots=4, init_slots=True)
