"""Tests of the training pipeline: data split, recall generator, streams, baseline, loop, resume.

Tolerances: resuming must reproduce the uninterrupted run's next losses to 1e-6 (float32 on CPU,
same ops in the same order: in practice bit-identical). Bits per byte of a uniform model must be
8 to 1e-5.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from chunkmem.baselines import CausalTransformer
from chunkmem.nn import ChunkMemLM
from chunkmem.training import data
from chunkmem.training import (Trainer, evaluate_recall, evaluate_text, make_config, recall_eval_documents,
                               run_segments)
from chunkmem.training.data import (BLOCK_FILL, QUERY, RecallSpec, list_stdlib_files, recall_document,
                                    segment_arrays, split_of, stdlib_documents, text_stream)


@pytest.fixture(scope="module")
def train_docs():
    return stdlib_documents("train")[:40]


@pytest.fixture(scope="module")
def val_docs():
    return stdlib_documents("val")


# ------------------------------------------------------------------------------------- split

def test_split_is_deterministic_and_disjoint(val_docs):
    train = {d.name for d in stdlib_documents("train")}
    val = {d.name for d in val_docs}
    assert val and train
    assert not train & val
    # every file long enough to be a document is in exactly one split
    assert train | val == {r for r in list_stdlib_files() if os.path.getsize(os.path.join(data.stdlib_root(), r)) >= 2}
    # the split does not depend on the process (e.g. Python's salted str hash)
    # (data.py loaded alone, without importing torch, to keep the test fast)
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('d', sys.argv[1]); "
            "d = u.module_from_spec(s); sys.modules['d'] = d; s.loader.exec_module(d); "
            "print('\\n'.join(r for r in d.list_stdlib_files() if d.split_of(r) == 'val'))")
    out = subprocess.run([sys.executable, "-c", code, data.__file__], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.split()
    assert [r for r in out if r in val] == [d.name for d in val_docs]
    assert set(out) - val <= {r for r in out if os.path.getsize(os.path.join(data.stdlib_root(), r)) < 2}
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.10  # val_fraction 0.05
    with pytest.raises(ValueError):
        split_of("a.py", 1.5)


# ------------------------------------------------------------------------------------ recall

@pytest.mark.parametrize("spec", [RecallSpec(), RecallSpec(segment_len=16, pool=4, n_pairs=3),
                                  RecallSpec(segment_len=64, pool=2, n_pairs=9, distances=(1, 3))])
def test_recall_generator_puts_each_answer_where_it_says(spec):
    L, P = spec.segment_len, spec.pool
    for seed in range(20):
        doc = recall_document(spec, np.random.default_rng(seed))
        tok = doc.tokens
        assert tok.shape == (spec.n_segments * L,)
        assert len(doc.answers) == spec.n_pairs
        assert sorted(np.flatnonzero(doc.target_mask).tolist()) == [a[0] for a in doc.answers]
        seg0 = tok[:L]
        keys = [a[1] for a in doc.answers]
        assert len(set(keys)) == spec.n_pairs
        for pos, key, value, d in doc.answers:
            assert tok[pos] == value and tok[pos - 1] == key and tok[pos - 2] == QUERY
            assert (pos - 2) // L == pos // L == d  # the whole query lies in segment d
            # the pair sits alone in one pool-aligned window of segment 0
            (where,) = np.nonzero(seg0 == key)
            assert where.tolist() and len(where) == 1 and where[0] % P == 0
            w = where[0]
            assert seg0[w + 1] == value and (seg0[w + 2: w + P] == BLOCK_FILL).all()
            # the key is not repeated between the pair and its query
            assert (tok[L: pos - 1] != key).all()
        assert {a[3] for a in doc.answers} == set(spec.distances)
    with pytest.raises(ValueError):
        RecallSpec(segment_len=16, pool=4, n_pairs=5)


def test_segment_arrays_shift_and_mask():
    doc = data.Document(np.arange(1, 11), np.array([False] + [True] * 9))
    x, y, m = segment_arrays(doc, 4)
    assert x.shape == y.shape == m.shape == (3, 4)
    assert x.reshape(-1)[:10].tolist() == list(range(1, 11)) and (x.reshape(-1)[10:] == data.PAD).all()
    assert y.reshape(-1)[:9].tolist() == list(range(2, 11))
    assert m.reshape(-1).tolist() == [True] * 9 + [False] * 3


def test_stream_resets_at_document_starts_and_resumes(train_docs):
    s = text_stream(train_docs, n_rows=3, segment_len=64, seed=5)
    windows = [s.next_window(4) for _ in range(3)]
    sd = s.state_dict()
    after = s.next_window(4)
    s2 = text_stream(train_docs, n_rows=3, segment_len=64, seed=5)
    s2.load_state_dict(sd)
    again = s2.next_window(4)
    for a, b in zip(after, again):
        np.testing.assert_array_equal(a, b)
    # reading the stream back: a reset flag exactly where a document's first segment is
    x = np.concatenate([w[0] for w in windows], axis=1)
    reset = np.concatenate([w[3] for w in windows], axis=1)
    row0 = [d for k in range(50) for d in [s.doc_fn(0, k)]]
    expect_x, expect_reset = [], []
    for d in row0:
        xs, _, _ = segment_arrays(d, 64)
        for j in range(xs.shape[0]):
            expect_x.append(xs[j])
            expect_reset.append(j == 0)
    np.testing.assert_array_equal(x[0], np.stack(expect_x[:12]))
    assert reset[0].tolist() == expect_reset[:12]


# ------------------------------------------------------------------------ models and helpers

def test_memory_state_reset_empties_only_flagged_rows():
    model = ChunkMemLM(256, 16, 2, 2, chunk_size=4, memory_slots=4, memory_pool=4, segment_len=8)
    _, state = model(torch.randint(0, 256, (3, 16)))
    out = state.reset(torch.tensor([False, True, False]))
    for (m0, l0), (m1, l1) in zip(state.layers, out.layers):
        assert (m1[1] == 0).all() and l1[1] == 0
        assert torch.equal(m1[[0, 2]], m0[[0, 2]]) and torch.equal(l1[[0, 2]], l0[[0, 2]])
        assert l0[1] > 0


def test_transformer_baseline_is_causal_and_segment_local():
    torch.manual_seed(0)
    model = CausalTransformer(256, 32, 2, 4, segment_len=8)
    tok = torch.randint(0, 256, (2, 20))
    logits, state = model(tok)
    assert logits.shape == (2, 20, 256) and state is None
    alone, _ = model(tok[:, 8:16])  # segment 1 does not see segment 0
    torch.testing.assert_close(logits[:, 8:16], alone, rtol=1e-5, atol=1e-5)
    tok2 = tok.clone()
    tok2[:, 12] = (tok2[:, 12] + 1) % 256
    logits2, _ = model(tok2)
    torch.testing.assert_close(logits2[:, :12], logits[:, :12], rtol=0, atol=0)
    assert not torch.allclose(logits2[:, 12:16], logits[:, 12:16])


class _Uniform(torch.nn.Module):
    def forward(self, tokens, state=None):
        return torch.zeros(*tokens.shape, 256), None


def test_uniform_model_has_8_bits_per_byte(val_docs):
    cfg = make_config("tiny")
    docs = val_docs[:6]
    ev = evaluate_text(_Uniform(), docs, cfg, torch.device("cpu"))
    assert abs(ev["bpb_first"] - 8.0) < 1e-5 and abs(ev["bpb_after"] - 8.0) < 1e-5
    seg = {k: v for k, v in ev.items() if k.startswith("bpb_seg")}
    assert set(seg) == {"bpb_seg0", "bpb_seg1", "bpb_seg2-3"}  # tiny: eval_max_segments 4
    assert all(abs(v - 8.0) < 1e-5 for v in seg.values())
    L, n = cfg.segment_len, cfg.eval_max_segments
    assert ev["tokens_first"] == sum(min(len(d), L + 1) - 1 for d in docs)
    assert ev["tokens_first"] + ev["tokens_after"] == sum(min(len(d), n * L + 1) - 1 for d in docs)


class _LookupRecall(torch.nn.Module):
    """Answers ``? key`` with the token that followed ``key`` where it first appeared in what the
    model has seen (its "state": every token so far); ``see_past=False`` forgets earlier segments."""

    def __init__(self, see_past=True):
        super().__init__()
        self.see_past = see_past

    def forward(self, tokens, state=None):
        hist = tokens if state is None or not self.see_past else torch.cat([state, tokens], 1)
        off = hist.shape[1] - tokens.shape[1]
        logits = torch.zeros(*tokens.shape, 256)
        for b in range(tokens.shape[0]):
            for i in range(1, tokens.shape[1]):
                if tokens[b, i - 1] == QUERY:
                    where = (hist[b, : off + i] == tokens[b, i]).nonzero()
                    if len(where):
                        logits[b, i, hist[b, where[0, 0] + 1]] = 1.0
        return logits, hist


def test_evaluate_recall_scores_the_answers():
    cfg = make_config("tiny")
    docs = recall_eval_documents(cfg, 6)
    ev = evaluate_recall(_LookupRecall(), docs, cfg, torch.device("cpu"))
    assert all(ev[f"acc_d{d}"] == 1.0 for d in cfg.recall_distances)
    assert sum(ev[f"n_d{d}"] for d in cfg.recall_distances) == 6 * cfg.recall_pairs
    blind = evaluate_recall(_LookupRecall(see_past=False), docs, cfg, torch.device("cpu"))
    assert all(blind[f"acc_d{d}"] < 0.5 for d in cfg.recall_distances)


# ------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("model", ["memory", "transformer"])
def test_tiny_run_lowers_the_loss(model, train_docs, val_docs):
    cfg = make_config("tiny", model=model, steps=40, lr=1e-2, warmup=4)
    tr = Trainer(cfg, train_docs=train_docs)
    before = evaluate_text(tr.model, val_docs[:4], cfg, tr.device)["bpb_all"]
    for _ in range(cfg.steps):
        tr.step()
    after = evaluate_text(tr.model, val_docs[:4], cfg, tr.device)["bpb_all"]
    assert before > 7.5  # ~8 bits at init
    assert after < before - 2.0, (before, after)
    assert all(math.isfinite(r["loss"]) for r in tr.log)


def test_resume_gives_the_same_next_losses(tmp_path, train_docs):
    cfg = make_config("tiny", model="memory", steps=6)
    a = Trainer(cfg, train_docs=train_docs)
    full = [a.step()["loss"] for _ in range(5)]

    b = Trainer(cfg, train_docs=train_docs)
    for _ in range(3):
        b.step()
    path = str(tmp_path / "ckpt.pt")
    b.save(path)
    assert b.state is not None and int(b.state.layers[0][1].max()) > 0  # memory mid-document
    c = Trainer(cfg, train_docs=train_docs)
    c.load(path)
    assert c.step_count == 3 and c.streams["text"].state_dict() == b.streams["text"].state_dict()
    resumed = [c.step()["loss"] for _ in range(2)]
    np.testing.assert_allclose(resumed, full[3:], rtol=0, atol=1e-6)

    # the memory state is part of it: dropping it changes the next loss
    d = Trainer(cfg, train_docs=train_docs)
    d.load(path)
    d.state = None
    assert abs(d.step()["loss"] - full[3]) > 1e-6


def test_run_segments_equals_one_long_forward():
    torch.manual_seed(0)
    model = ChunkMemLM(256, 16, 2, 2, chunk_size=4, memory_slots=8, memory_pool=4, segment_len=8)
    tok = torch.randint(0, 256, (2, 24))
    ref, _ = model(tok)
    out, _ = run_segments(model, tok.view(2, 3, 8))
    torch.testing.assert_close(out.reshape(2, 24, 256), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------- where the memory is emptied in training

def _short_docs(n=5, length=40):
    rng = np.random.default_rng(0)
    return [data.Document(rng.integers(97, 123, size=length), np.array([False] + [True] * (length - 1)),
                          name=f"short{i}") for i in range(n)]


def _mem_len(trainer, rows):
    return [trainer.state.layers[i][1][rows].tolist() for i in range(len(trainer.state.layers))]


@pytest.mark.parametrize("carry", [False, True])
def test_recall_carry_keeps_recall_memory_across_documents_but_not_text(carry):
    # tiny: 4 memory slots per 16-token segment; 64 slots hold 16 segments, recall documents are
    # 5 segments (one per step), the 40-byte text documents 3 segments
    cfg = make_config("tiny", memory_slots=64, recall_carry=carry, steps=3)
    tr = Trainer(cfg, train_docs=_short_docs())
    for _ in range(3):
        tr.step()
    text, recall = slice(0, cfg.text_rows), slice(cfg.text_rows, None)
    # 15 segments read: text rows are in the 3rd segment of a document (emptied at each file start)
    assert _mem_len(tr, text) == [[12] * cfg.text_rows] * cfg.n_layers
    # recall rows: one document per step; with carry the memory holds all 15 segments' summaries
    want = 60 if carry else 20
    assert _mem_len(tr, recall) == [[want] * cfg.recall_rows] * cfg.n_layers
    # the recall stream still marks its document starts; only the batch's reset flags drop them
    assert tr.streams["recall"].next_window(5)[3][:, 0].all()
    *_, reset, is_text = tr._next_batch()
    assert bool(reset[~is_text].any()) is (not carry)


def test_text_reset_prob_empties_mid_file_segments_deterministically(train_docs):
    s = text_stream(train_docs, n_rows=4, segment_len=16, seed=3, reset_prob=0.25)
    flags = np.concatenate([s.next_window(10)[3] for _ in range(20)], axis=1)
    plain = text_stream(train_docs, n_rows=4, segment_len=16, seed=3)
    starts = np.concatenate([plain.next_window(10)[3] for _ in range(20)], axis=1)
    assert flags[starts].all()  # every file start still empties the memory
    extra = flags & ~starts
    assert 0.15 < extra.sum() / (~starts).sum() < 0.35, extra.mean()
    # a function of the position only: the same for a process reading row 2 alone, and after resuming
    one = text_stream(train_docs, n_rows=4, segment_len=16, seed=3, rows=[2], reset_prob=0.25)
    part = np.concatenate([one.next_window(10)[3] for _ in range(10)], axis=1)
    sd = one.state_dict()
    rest = text_stream(train_docs, n_rows=4, segment_len=16, seed=3, rows=[2], reset_prob=0.25)
    rest.load_state_dict(sd)
    part = np.concatenate([part] + [rest.next_window(10)[3] for _ in range(10)], axis=1)
    np.testing.assert_array_equal(part[0], flags[2])
    with pytest.raises(ValueError):
        text_stream(train_docs, n_rows=4, segment_len=16, seed=3, reset_prob=1.0)


def test_text_reset_prob_empties_the_trainers_memory(train_docs):
    cfg = make_config("tiny", memory_slots=64, recall_rows=0, text_rows=4, text_reset_prob=0.3, steps=4)
    tr = Trainer(cfg, train_docs=train_docs)
    seen = []
    inner = tr.streams["text"].next_window

    def spy(n_seg):
        out = inner(n_seg)
        seen.append(out[3])
        return out

    tr.streams["text"].next_window = spy
    for _ in range(4):
        tr.step()
    flags = np.concatenate(seen, axis=1)  # (rows, 20)
    plain = text_stream(train_docs, 4, cfg.segment_len, cfg.seed)
    starts = np.concatenate([plain.next_window(5)[3] for _ in range(4)], axis=1)
    assert (flags & ~starts).any() and flags[starts].all()  # file starts and some mid-file resets
    last = np.array([np.flatnonzero(f)[-1] if f.any() else -1 for f in flags])
    want = np.minimum(4 * (flags.shape[1] - np.maximum(last, 0)), 64)
    for layer in tr.state.layers:
        assert layer[1].tolist() == want.tolist()


def test_init_slots_round_trips_through_a_checkpoint(tmp_path, train_docs):
    from chunkmem.training.checkpoint import CheckpointError
    from chunkmem.training.longrange import load_checkpoint_model

    cfg = make_config("tiny", init_slots=4, recall_carry=True, text_reset_prob=0.1, steps=2)
    tr = Trainer(cfg, train_docs=train_docs)
    assert tr.module.blocks[0].attn.init_slots == 4
    for _ in range(2):
        tr.step()
    path = str(tmp_path / "ckpt.pt")
    tr.save(path)
    model, got, init = load_checkpoint_model(path)
    assert init == 4 and got.init_slots == 4 and got.recall_carry and got.text_reset_prob == 0.1
    for a, b in zip(model.blocks, tr.module.blocks):
        assert torch.equal(a.attn.memory_init, b.attn.memory_init)
    again = Trainer(cfg, train_docs=train_docs)
    again.load(path)
    assert torch.equal(again.module.blocks[1].attn.memory_init, tr.module.blocks[1].attn.memory_init)
    for other in (dict(init_slots=0), dict(recall_carry=False), dict(text_reset_prob=0.0)):
        with pytest.raises(CheckpointError, match=next(iter(other))):
            Trainer(make_config("tiny", **{**dict(init_slots=4, recall_carry=True, text_reset_prob=0.1), **other}),
                    train_docs=train_docs).load(path)
    # other models ignore the option; impossible values are refused
    assert make_config("tiny", model="nomem", init_slots=4).init_slots == 0
    for bad in (dict(init_slots=99), dict(init_slots=-1), dict(text_reset_prob=1.0)):
        with pytest.raises(ValueError):
            make_config("tiny", **bad)


def test_checkpoint_without_the_new_fields_loads_with_their_defaults(tmp_path, train_docs):
    from chunkmem.training.longrange import load_checkpoint_model

    cfg = make_config("tiny", steps=1)
    tr = Trainer(cfg, train_docs=train_docs)
    tr.step()
    path = str(tmp_path / "ckpt.pt")
    tr.save(path)
    ckpt = torch.load(path, weights_only=False)
    for k in ("init_slots", "recall_carry", "text_reset_prob", "recall_text_prefix"):
        del ckpt["config"][k]
    torch.save(ckpt, path)
    Trainer(cfg, train_docs=train_docs).load(path)  # resumes: the missing fields are the defaults
    _, got, init = load_checkpoint_model(path)
    assert (init, got.init_slots, got.recall_carry, got.text_reset_prob, got.recall_text_prefix) == (0, 0, False, 0.0,
                                                                                                    False)


def test_cli_passes_the_memory_options(tmp_path):
    from chunkmem.training.cli import main

    main(["train", "--preset", "tiny", "--steps", "1", "--init-slots", "2", "--recall-carry",
          "--text-reset-prob", "0.05", "--recall-text-prefix", "--out-dir", str(tmp_path), "--no-progress"])
    saved = torch.load(str(tmp_path / "tiny" / "memory" / "ckpt.pt"), weights_only=False)["config"]
    assert (saved["init_slots"], saved["recall_carry"], saved["text_reset_prob"], saved["recall_text_prefix"]) == (
        2, True, 0.05, True)


def test_recall_text_prefix_puts_one_unscored_text_segment_before_each_recall_document(train_docs):
    from chunkmem.training.data import recall_stream

    spec = RecallSpec(segment_len=16, pool=4, n_pairs=3)
    plain = recall_stream(spec, n_rows=2, seed=4)
    pre = recall_stream(spec, n_rows=2, seed=4, prefix_docs=train_docs)
    n = spec.n_segments  # 5 segments; with the prefix 6
    x0, y0, m0, r0 = plain.next_window(2 * n)
    x1, y1, m1, r1 = pre.next_window(2 * (n + 1))
    assert r1[:, [0, n + 1]].all() and r1.sum() == 4  # the memory is emptied before the prefix only
    texts = {d.tokens[j:j + 16].tobytes() for d in train_docs for j in range(0, len(d) - 15, 16)}
    for row in range(2):
        for doc in range(2):
            a, b = doc * n, doc * (n + 1)
            assert x1[row, b].tobytes() in texts and not m1[row, b].any()  # a segment of text, unscored
            np.testing.assert_array_equal(x1[row, b + 1: b + n + 1], x0[row, a: a + n])  # then the document
            np.testing.assert_array_equal(m1[row, b + 1: b + n + 1], m0[row, a: a + n])
    doc = pre.doc_fn(1, 3)
    assert all(doc.tokens[pos] == v and doc.target_mask[pos] for pos, _, v, _ in doc.answers)
    assert doc.target_mask.sum() == len(doc.answers) == spec.n_pairs
    # the Trainer: recall rows read their pairs with one text segment in memory
    cfg = make_config("tiny", recall_text_prefix=True, steps=1)
    tr = Trainer(cfg, train_docs=train_docs)
    tr.step()
    assert len(tr.streams["recall"].doc_fn(0, 0)) == (cfg.recall_spec().n_segments + 1) * cfg.segment_len
