"""chunkmem as a transformers attention implementation (SPEC §5), against attn_implementation="sdpa"
on the same tiny random-init models (fp32, CPU, nothing downloaded).

Tolerance: logits of these models are O(10); sdpa and chunkmem sum in different orders, so they
agree to fp32 rounding, not bitwise: ATOL = 5e-5 (about 10x the largest difference measured).
The init std is 10x transformers' default so that greedy decoding is not decided by near-ties;
no EOS token, so every generate() runs its full length.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening,  # noqa: E402
                          Llama4ForCausalLM, Llama4TextConfig, LlamaConfig, LlamaForCausalLM)

import chunkmem.integrations.transformers as cm_hf  # noqa: E402

ATOL = 5e-5
VOCAB = 97
CHUNK = 8  # Llama 4's attention_chunk_size here


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert cm_hf.register() == "chunkmem"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # models this small run faster on one intra-op thread (and do not fight a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama_config(**overrides):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=0.2, pad_token_id=0, eos_token_id=None, **overrides)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config()).eval()


@pytest.fixture(scope="module")
def llama4():
    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           attention_chunk_size=CHUNK, num_local_experts=2, num_experts_per_tok=1,
                           moe_layers=[], interleave_moe_layer_step=0, max_position_embeddings=256,
                           initializer_range=0.2, pad_token_id=0, eos_token_id=None)
    assert cfg.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    return Llama4ForCausalLM(cfg).eval()


def _logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _tokens(*shape, seed=1):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _generate(model, impl, ids, mask, cache, n):
    model.set_attn_implementation(impl)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         cache_implementation=cache, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


# ----------------------------------------------------------------------------- Llama
def test_register_from_config_and_set_attn_implementation(llama):
    model = AutoModelForCausalLM.from_config(_llama_config(), attn_implementation="chunkmem")
    assert model.config._attn_implementation == "chunkmem"
    llama.set_attn_implementation("chunkmem")
    assert llama.config._attn_implementation == "chunkmem"


def test_logits_unpadded(llama):
    ids = _tokens(2, 12)
    assert _max_diff(_logits(llama, "chunkmem", input_ids=ids), _logits(llama, "sdpa", input_ids=ids)) < ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_padded(llama, side):
    ids = _tokens(3, 12)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :3] = mask[2, :7] = 0
    else:
        mask[1, -4:] = mask[2, -1:] = 0
    ours = _logits(llama, "chunkmem", input_ids=ids, attention_mask=mask)
    ref = _logits(llama, "sdpa", input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    assert _max_diff(ours[valid], ref[valid]) < ATOL
    # and each valid row equals the same tokens run alone
    alone = _logits(llama, "chunkmem", input_ids=ids[2:3][valid[2:3]][None])
    assert _max_diff(ours[2][valid[2]], alone[0]) < ATOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_left_padded(llama, cache):
    ids = _tokens(2, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    tok, logits = _generate(llama, "chunkmem", ids, mask, cache, 12)
    ref_tok, ref_logits = _generate(llama, "sdpa", ids, mask, cache, 12)
    assert torch.equal(tok, ref_tok)
    assert _max_diff(logits, ref_logits) < ATOL


def test_generate_static_cache_compiled_decoding(llama):
    # what generate() does on a GPU with a static cache: the decoding step is torch.compile'd,
    # with the masks built ahead of it (here on the CPU with the aot_eager backend: no C++ build)
    from torch._dynamo.utils import counters
    from transformers.generation import CompileConfig

    config = CompileConfig(backend="aot_eager", mode=None, fullgraph=False)
    config._compile_all_devices = True
    ids = _tokens(2, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ref_tok, ref_logits = _generate(llama, "sdpa", ids, mask, "static", 6)
    try:
        llama.generation_config.compile_config = config
        torch._dynamo.reset()
        counters.clear()
        tok, logits = _generate(llama, "chunkmem", ids, mask, "static", 6)
        assert counters["stats"]["calls_captured"] > 0  # the decoding step was compiled
        assert not counters["graph_break"], dict(counters["graph_break"])  # in one graph
    finally:
        llama.generation_config.compile_config = None
        torch._dynamo.reset()
    assert torch.equal(tok, ref_tok)
    assert _max_diff(logits, ref_logits) < ATOL


def test_4d_mask_causal_with_left_padding_is_accepted(llama):
    ids = _tokens(2, 9, seed=3)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :3] = False
    mask4d = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    mask4d[1, 0, :3] = False  # the padding queries see nothing
    ours = _logits(llama, "chunkmem", input_ids=ids, attention_mask=mask4d)
    ref = _logits(llama, "sdpa", input_ids=ids, attention_mask=mask4d)
    assert _max_diff(ours[pad], ref[pad]) < ATOL


# ----------------------------------------------------------------------------- packed sequences
def _packed_batch(lengths, seed):
    docs = [_tokens(n, seed=seed + i).tolist() for i, n in enumerate(lengths)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    batch.pop("labels")
    return docs, batch


@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_packed_sequences_match_each_document_alone(llama, llama4, family):
    model = llama if family == "llama" else llama4
    docs, batch = _packed_batch([5, 11, 1, 13], seed=10)  # 11, 13 > CHUNK: chunks inside documents
    assert batch["position_ids"].tolist()[0][5:7] == [0, 1]
    ours = _logits(model, "chunkmem", **batch)
    assert _max_diff(ours, _logits(model, "sdpa", **batch)) < ATOL
    alone = torch.cat([_logits(model, "sdpa", input_ids=torch.tensor([d])) for d in docs], 1)
    assert _max_diff(ours, alone) < ATOL


def test_packed_rows_from_position_ids(llama):
    ids = _tokens(2, 12, seed=4)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    ours = _logits(llama, "chunkmem", input_ids=ids, position_ids=pos)
    assert _max_diff(ours, _logits(llama, "sdpa", input_ids=ids, position_ids=pos)) < ATOL
    assert _max_diff(ours[1, 3:], _logits(llama, "sdpa", input_ids=ids[1:, 3:])[0]) < ATOL


def test_packed_kwargs_with_a_cache_raise(llama):
    # with use_cache=True transformers does not pack the mask (sdpa attends across documents)
    _, batch = _packed_batch([5, 7], seed=20)
    llama.set_attn_implementation("chunkmem")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="cu_seq_lens"):
        llama(**batch, use_cache=True)


# ----------------------------------------------------------------------------- Llama 4 chunked layers
def test_llama4_chunked_layers_run_the_chunk_path(llama4, monkeypatch):
    calls = []
    op = cm_hf.hybrid_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["chunk_size"], kwargs["use_global"]))
        return op(*args, **kwargs)

    monkeypatch.setattr(cm_hf, "hybrid_attention", spy)
    ids = _tokens(1, 3 * CHUNK + 2, seed=5)
    ours = _logits(llama4, "chunkmem", input_ids=ids)
    assert calls == [(CHUNK, False)] * 3 + [(None, True)]
    assert _max_diff(ours, _logits(llama4, "sdpa", input_ids=ids)) < ATOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_llama4_generate_prompt_longer_than_a_chunk(llama4, cache):
    pad = 3
    ids = _tokens(2, 21, seed=6)  # 21 > CHUNK = 8: the sliding cache drops keys, chunks roll over
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    tok, logits = _generate(llama4, "chunkmem", ids, mask, cache, 20)
    ref_tok, ref_logits = _generate(llama4, "sdpa", ids, mask, cache, 20)
    assert tok.shape == (2, 20)
    assert torch.equal(tok, ref_tok)
    assert _max_diff(logits, ref_logits) < ATOL
    # the padded row generates what the same row does without padding
    alone_tok, alone_logits = _generate(llama4, "chunkmem", ids[:1, pad:], None, cache, 20)
    assert torch.equal(tok[:1], alone_tok)
    assert _max_diff(logits[:1], alone_logits) < ATOL


def test_plain_causal_and_chunked_masks_skip_the_full_check(llama4, monkeypatch):
    # transformers' own causal/chunked masks are checked through the padding alone (O(B*Tk));
    # other patterns (here packed sequences) are compared entry by entry with transformers' mask
    import transformers.masking_utils as mu

    built = []
    full_mask = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: built.append(1) or full_mask(*a, **k))
    ids = _tokens(2, 21, seed=6)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    _generate(llama4, "chunkmem", ids, mask, "dynamic", 3)
    assert not built
    _, batch = _packed_batch([5, 11], seed=10)
    _logits(llama4, "chunkmem", **batch)
    assert built


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_llama4_cache_continuation_in_pieces(llama4, cache):
    # several tokens at a time on a cache that already dropped keys (kv_offset > 0 with Tq > 1)
    from transformers import DynamicCache, StaticCache

    ids = _tokens(2, 30, seed=9)
    full = _logits(llama4, "sdpa", input_ids=ids)
    llama4.set_attn_implementation("chunkmem")
    kv = DynamicCache(config=llama4.config) if cache == "dynamic" else StaticCache(config=llama4.config, max_cache_len=40)
    pieces = []
    with torch.no_grad():
        for a, b in [(0, 13), (13, 18), (18, 19), (19, 30)]:
            out = llama4(input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None], cache=kv, use_cache=True)
            kv = out.cache
            pieces.append(out.logits)
    assert _max_diff(torch.cat(pieces, 1), full) < ATOL


def test_llama4_left_padding_logits(llama4):
    ids = _tokens(2, 19, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ours = _logits(llama4, "chunkmem", input_ids=ids, attention_mask=mask)
    ref = _logits(llama4, "sdpa", input_ids=ids, attention_mask=mask)
    assert _max_diff(ours[mask.bool()], ref[mask.bool()]) < ATOL
    assert _max_diff(ours[1, 5:], _logits(llama4, "sdpa", input_ids=ids[1:, 5:])[0]) < ATOL


# ----------------------------------------------------------------------------- what raises
def test_arbitrary_4d_float_mask_raises(llama):
    ids = _tokens(1, 6, seed=8)
    bias = torch.randn(1, 1, 6, 6) + torch.triu(torch.full((6, 6), float("-inf")), 1)
    llama.set_attn_implementation("chunkmem")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="bias"):
        llama(input_ids=ids, attention_mask=bias, use_cache=False)


def test_4d_bool_mask_with_a_hole_raises(llama):
    mask4d = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].clone()
    mask4d[..., 4:, 2] = False  # key 2 hidden from the last queries only
    llama.set_attn_implementation("chunkmem")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="contiguous"):
        llama(input_ids=_tokens(1, 6), attention_mask=mask4d, use_cache=False)


def test_padding_between_tokens_raises(llama):
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 3] = 0
    llama.set_attn_implementation("chunkmem")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="padding between"):
        llama(input_ids=_tokens(1, 8), attention_mask=mask, use_cache=False)


def test_softcap_sinks_and_noncausal_raise(llama):
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    module = llama.model.layers[0].self_attn
    for kwargs, match in [({"softcap": 30.0}, "softcap"), ({"s_aux": torch.zeros(4)}, "sinks"),
                          ({"is_causal": False}, "non-causal"), ({"dropout": 0.1}, "dropout")]:
        with pytest.raises(NotImplementedError, match=match):
            cm_hf.chunkmem_attention_forward(module, q, k, k, None, **kwargs)


def test_dropout_in_training_raises():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(attention_dropout=0.1))
    model.set_attn_implementation("chunkmem")
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=_tokens(1, 5), use_cache=False)
    model.eval()  # dropout is 0 in eval: runs
    assert model(input_ids=_tokens(1, 5), use_cache=False).logits.isfinite().all()


def test_sliding_window_wider_than_the_keys_runs_narrower_raises():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                        initializer_range=0.2)
    model = MistralForCausalLM(cfg).eval()
    short = _tokens(1, 6)
    assert _max_diff(_logits(model, "chunkmem", input_ids=short), _logits(model, "sdpa", input_ids=short)) < ATOL
    model.set_attn_implementation("chunkmem")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="sliding-window"):
        model(input_ids=_tokens(1, 12), use_cache=False)
