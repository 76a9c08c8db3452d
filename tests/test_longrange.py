"""chunkmem.training.longrange: generated documents, answer alignment, checkpoints, the command.

Everything at tiny settings (the ``tiny`` preset, a few documents): seconds."""
import argparse
import json

import numpy as np
import pytest
import torch

from chunkmem.training import longrange as lr
from chunkmem.training.config import make_config
from chunkmem.training.data import BLOCK_FILL, KEY_LO, QUERY, VALUE_LO

CFG = make_config("tiny")  # segment 16, pool 4, 64 keys, 32 values


def test_mqar_document_layout():
    rng = np.random.default_rng(0)
    doc = lr.mqar_document(3, 5, CFG, lr.Filler("recall"), rng)
    L, P = CFG.segment_len, CFG.memory_pool
    assert len(doc) == 6 * L and doc.target_mask.sum() == 3 == len(doc.answers)
    keys = [k for _, k, _, _ in doc.answers]
    assert len(set(keys)) == 3
    seg0 = doc.tokens[:L]
    for pos, key, value, d in doc.answers:
        assert d == 5 and 5 * L <= pos - 2 and pos < 6 * L  # the whole question lies in segment 5
        assert doc.tokens[pos - 2] == QUERY and doc.tokens[pos - 1] == key and doc.tokens[pos] == value
        w = int(np.flatnonzero(seg0 == key)[0])  # the pair: key, value, '|' filling its pool window
        assert w % P == 0 and seg0[w + 1] == value and all(seg0[w + 2:w + P] == BLOCK_FILL)
        assert doc.target_mask[pos]
    # the pairs are stated nowhere else than in segment 0 and the questions
    assert ((doc.tokens >= KEY_LO) & (doc.tokens < VALUE_LO + CFG.recall_values)).sum() == 3 * 2 + 3 * 2
    with pytest.raises(ValueError, match="pairs"):
        lr.mqar_document(L // P + 1, 1, CFG, lr.Filler("recall"), rng)


def test_text_filler_holds_no_key_or_value_byte():
    text = np.array(list("é=1 # ü\n".encode("utf-8")) * 40, dtype=np.int64)
    doc = lr.passkey_document(3, CFG, lr.Filler("text", text=text), np.random.default_rng(1))
    high = doc.tokens >= KEY_LO
    assert high.sum() == 4  # key and value of the pair, key and value of the question


class _Lookup(torch.nn.Module):
    """A model without memory that answers from a table: logits at t = one-hot(table[token t])."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.arange(256)
        for k, v in table.items():
            self.table[k] = v

    def forward(self, tokens, state=None):
        return torch.nn.functional.one_hot(self.table[tokens], 256).float(), state


def test_accuracy_scores_the_logits_before_each_answer():
    docs = [lr.mqar_document(4, 2, CFG, lr.Filler("recall"), np.random.default_rng(i)) for i in range(3)]
    for doc in docs:
        right = {k: v for _, k, v, _ in doc.answers}
        assert lr.recall_accuracy(_Lookup(right), [doc], CFG) == 1.0
        wrong = {k: VALUE_LO + (v - VALUE_LO + 1) % CFG.recall_values for k, v in right.items()}
        assert lr.recall_accuracy(_Lookup(wrong), [doc], CFG) == 0.0
        half = dict(list(right.items())[:2]) | dict(list(wrong.items())[2:])
        assert lr.recall_accuracy(_Lookup(half), [doc], CFG) == 0.5


def _tiny_checkpoint(tmp_path, model, init_slots=0):
    from chunkmem.training import loop
    cfg = make_config("tiny", model=model, out_dir=str(tmp_path))
    if init_slots:
        real = loop.build_model
        loop.build_model = lambda c: lr.build_model_with_init(c, init_slots)
        try:
            trainer = loop.Trainer(cfg, train_docs=_few_docs())
        finally:
            loop.build_model = real
    else:
        trainer = loop.Trainer(cfg, train_docs=_few_docs())
    trainer.step()
    path = str(tmp_path / f"{model}{init_slots}.pt")
    trainer.save(path)
    return path, trainer.module


def _few_docs():
    from chunkmem.training.data import stdlib_documents
    return stdlib_documents("train")[:8]


def test_checkpoint_with_learned_initial_memory_loads_as_trained(tmp_path):
    path, trained = _tiny_checkpoint(tmp_path, "memory", init_slots=2)
    model, cfg, init = lr.load_checkpoint_model(path)
    assert init == 2 and model.blocks[0].attn.init_slots == 2
    tok = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tok)[0], trained.eval()(tok)[0], atol=0, rtol=0)


def test_file_start_bpb_counts_each_segment_index():
    docs = lr.file_start_documents("site-packages", 5, min_bytes=40)
    assert len(docs) == 5 and all(len(d) >= 40 and d.tokens.max() < 128 for d in docs)
    model = _Lookup({})  # predicts the current byte again: finite bpb
    out = lr.file_start_bpb(model, docs, CFG, n_segments=2)
    L = CFG.segment_len
    assert out["tokens"][0] == sum(min(len(d), L + 1) - 1 for d in docs)  # bytes 1..L of every file
    assert all(np.isfinite(out["bpb"])) and len(out["recall_mass"]) == 2


def test_command_writes_tables_and_heatmaps(tmp_path):
    mem, _ = _tiny_checkpoint(tmp_path, "memory")
    tr, _ = _tiny_checkpoint(tmp_path, "transformer")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    lr.add_parser(sub)
    out = str(tmp_path / "lr")
    args = parser.parse_args(["eval-longrange", "--ckpt", f"memory={mem}", "--ckpt", f"transformer={tr}",
                              "--distances", "1,2", "--pairs", "1,2", "--passkey-docs", "3", "--mqar-docs", "2",
                              "--file-starts", "3", "--start-segments", "2", "--prime", "--out", out])
    assert lr.main(args) == 0
    res = json.load(open(out + ".json"))
    assert set(res["models"]) == {"memory", "transformer"}
    r = res["models"]["memory"]
    assert set(r["passkey"]["text"]) == {"1", "2"} and set(r["mqar"]["recall"]) == {"1x1", "1x2", "2x1", "2x2"}
    assert r["fifo_segments"] == CFG.memory_slots * CFG.memory_pool / CFG.segment_len
    assert r["file_starts"]["site-packages"]["files"] == 3
    assert {"site-packages+prime-text", "stdlib-val+prime-recall"} <= set(r["file_starts"])
    assert set(res["models"]["transformer"]["file_starts"]) == {"site-packages", "stdlib-val"}
    md = open(out + ".md").read()
    assert "Passkey, text filler" in md and "MQAR, recall filler" in md and "site-packages" in md
    assert open(out + ".png", "rb").read(4) == b"\x89PNG"
