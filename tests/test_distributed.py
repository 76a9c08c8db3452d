"""Data-parallel training on CPU (gloo, 2 processes spawned here): DDP and FSDP2 give the losses
and parameters of one process on the same global batch, a 2-process run interrupted and resumed
equals the uninterrupted one, its checkpoint resumes on one process, DDP under torch.compile runs
without graph breaks and gives the same losses, and evaluation reduced over the processes equals
the one-process evaluation.

Tolerances (float32): the processes compute the same per-row math on half the rows each and sum
the gradients in another order, so losses agree to rtol 1e-5 and parameters after 5 AdamW steps
to atol 2e-5 (observed: ~1e-7 and ~1e-6); the gradient norms before clipping (the gradient's
scale, which AdamW and clipping would hide in the weights) to rtol 1e-5. Resuming is bit-exact on the same number of processes
(checked to 1e-6). Evaluation: the per-token NLL is float32, computed on batches of another shape,
summed in float64: bits per byte to rtol 1e-6, recall counts exact.
"""
from __future__ import annotations

import os
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from chunkmem.training import Trainer, make_config
from chunkmem.training.data import stdlib_documents

WORLD = 2
STEPS, SPLIT = 5, 3  # run STEPS steps; the resumed runs stop and save after SPLIT
COMPILED_STEPS = 2
TIMEOUT_S = 240


def _cfg(model="memory", **kw):
    # 4 text + 4 recall rows: 2 + 2 per process
    return make_config("tiny", model=model, text_rows=4, recall_rows=4, steps=STEPS, threads=1, device="cpu", **kw)


def _docs():
    return stdlib_documents("train")[:40]


def _full_params(trainer) -> dict:
    sd = trainer.module.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in sd.items()}


def _scenario(parallel, ckpt_path, docs):
    """Losses and final parameters of an uninterrupted run and of a run saved after SPLIT steps
    and resumed by a fresh Trainer (same processes)."""
    from chunkmem.training.distributed import init_distributed
    ctx = init_distributed("cpu")
    cfg = _cfg()
    full = Trainer(cfg, train_docs=docs, ctx=ctx, parallel=parallel)
    rows = [full.step() for _ in range(STEPS)]
    losses, gnorms = [r["loss"] for r in rows], [r["grad_norm"] for r in rows]
    params = _full_params(full)
    first = Trainer(cfg, train_docs=docs, ctx=ctx, parallel=parallel)
    for _ in range(SPLIT):
        first.step()
    first.save(ckpt_path)
    second = Trainer(cfg, train_docs=docs, ctx=ctx, parallel=parallel)
    second.load(ckpt_path)
    resumed = [second.step()["loss"] for _ in range(STEPS - SPLIT)]
    return {"losses": losses, "grad_norms": gnorms, "params": params, "resumed": resumed,
            "resumed_params": _full_params(second)}


def _compiled(docs):
    """DDP around the model compiled with fullgraph=True (aot_eager: Dynamo capture and AOT autograd
    through the chunkmem custom ops, without inductor's C++ code generation, which takes minutes
    on a 2-core CPU): no graph break, the eager DDP losses."""
    from torch._dynamo.utils import counters

    from chunkmem.training.distributed import init_distributed
    ctx = init_distributed("cpu")
    counters.clear()
    t = Trainer(_cfg(), train_docs=docs, ctx=ctx, parallel="ddp", compile="aot_eager")
    losses = [t.step()["loss"] for _ in range(COMPILED_STEPS)]
    return {"losses": losses, "graph_breaks": dict(counters["graph_break"]),
            "graphs": counters["stats"]["unique_graphs"]}


def _evaluation(docs_val):
    from chunkmem.training.distributed import init_distributed
    ctx = init_distributed("cpu")
    t = Trainer(_cfg(), train_docs=docs_val[:8], ctx=ctx)
    for _ in range(2):
        t.step()
    return t.evaluate(7, 9, docs_val), _full_params(t)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    result = {}
    try:
        docs = _docs()
        result["ddp"] = _scenario("ddp", os.path.join(out_dir, "ddp.pt"), docs)
        result["fsdp"] = _scenario("fsdp", os.path.join(out_dir, "fsdp"), docs)
        result["eval"] = _evaluation(stdlib_documents("val"))
        result["compiled"] = _compiled(docs)
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if "error" not in result:  # (after an error the other rank may never reach the barrier)
            from chunkmem.training.distributed import shutdown
            shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the scenarios on 2 spawned processes (gloo, localhost); their results per rank."""
    out = str(tmp_path_factory.mktemp("ranks"))
    ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    import time
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process run did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return out, results


@pytest.fixture(scope="module")
def one_process():
    """The uninterrupted one-process run on the same global batch."""
    t = Trainer(_cfg(), train_docs=_docs())
    rows = [t.step() for _ in range(STEPS)]
    return [r["loss"] for r in rows], _full_params(t), [r["grad_norm"] for r in rows]


def _assert_params_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(parallel, two_ranks, one_process):
    _, results = two_ranks
    losses, params, gnorms = one_process
    for res in results:  # every rank logs the global loss and holds the same (gathered) weights
        np.testing.assert_allclose(res[parallel]["losses"], losses, rtol=1e-5, atol=0)
        # the gradient itself (AdamW and clipping would hide a wrong scale in the weights)
        np.testing.assert_allclose(res[parallel]["grad_norms"], gnorms, rtol=1e-5, atol=0)
        _assert_params_close(res[parallel]["params"], params, atol=2e-5)
    assert losses[-1] < losses[0]  # it trained


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_interrupt_and_resume(parallel, two_ranks):
    _, results = two_ranks
    for res in results:
        r = res[parallel]
        np.testing.assert_allclose(r["resumed"], r["losses"][SPLIT:], rtol=0, atol=1e-6)
        _assert_params_close(r["resumed_params"], r["params"], atol=1e-6)


def test_two_rank_checkpoint_resumes_on_one_process(two_ranks, one_process):
    """Data position and memory are stored in global row order: one process continues the
    2-process run where it stopped."""
    out, _ = two_ranks
    losses, params, _ = one_process
    for path in (os.path.join(out, "ddp.pt"), os.path.join(out, "fsdp")):
        t = Trainer(_cfg(), train_docs=_docs())
        t.load(path)
        assert t.step_count == SPLIT and t.state is not None and t.state.layers[0][0].shape[0] == 8
        resumed = [t.step()["loss"] for _ in range(STEPS - SPLIT)]
        np.testing.assert_allclose(resumed, losses[SPLIT:], rtol=1e-5, atol=0)
        _assert_params_close(_full_params(t), params, atol=2e-5)


def test_ddp_with_torch_compile(two_ranks, one_process):
    _, results = two_ranks
    losses = one_process[0]
    for res in results:
        c = res["compiled"]
        assert not c["graph_breaks"]
        assert c["graphs"] >= 1
        np.testing.assert_allclose(c["losses"], losses[:COMPILED_STEPS], rtol=1e-5, atol=0)


def test_evaluation_is_reduced_over_ranks(two_ranks):
    """7 text files and 9 recall documents dealt over 2 processes (one gets an empty share in some
    batches): both report the metrics of the whole set, equal to one process's."""
    _, results = two_ranks
    val = stdlib_documents("val")
    (ev0, params), (ev1, _) = results[0]["eval"], results[1]["eval"]
    assert ev0 == ev1
    t = Trainer(_cfg(), train_docs=val[:8])
    t.module.load_state_dict(params)
    t.step_count = 2
    ref = t.evaluate(7, 9, val)
    assert ev0.keys() == ref.keys()
    for k in ref:
        assert ev0[k] == pytest.approx(ref[k], rel=1e-6, abs=0), k
    assert sum(ref[f"n_d{d}"] for d in t.cfg.recall_distances) == 9 * t.cfg.recall_pairs


# ------------------------------------------------------------------ sharding (no processes)

def test_row_shards_read_what_one_process_reads():
    from chunkmem.training.data import RecallSpec, recall_stream, text_stream
    from chunkmem.training.sharding import row_slice
    docs = _docs()
    spec = RecallSpec(segment_len=16, pool=4, n_pairs=3)
    for make in (lambda rows: text_stream(docs, 6, 16, 7, rows), lambda rows: recall_stream(spec, 6, 7, rows)):
        full = make(None)
        shards = [make(row_slice(6, r, 3)) for r in range(3)]
        for _ in range(4):
            expect = full.next_window(5)
            got = [s.next_window(5) for s in shards]
            for i, a in enumerate(expect):
                np.testing.assert_array_equal(np.concatenate([g[i] for g in got]), a)
    with pytest.raises(ValueError, match="evenly"):
        row_slice(6, 0, 4)


def test_eval_batches_deal_every_document_once():
    from chunkmem.training.sharding import eval_batches
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=23).tolist()
    plans = [eval_batches(lengths, 4, r, 3, 16, 8) for r in range(3)]
    assert len({len(p) for p in plans}) == 1  # same number of batches on every process
    for batches in zip(*plans):
        assert len({n for _, n in batches}) == 1  # and the same segment count in each
        assert all(len(idx) <= 4 for idx, _ in batches)
    dealt = [i for p in plans for idx, _ in p for i in idx]
    assert sorted(dealt) == list(range(23))
    # one process: length-sorted batches of 4
    order = sorted(range(23), key=lambda i: lengths[i])
    one = eval_batches(lengths, 4, 0, 1, 16, 8)
    assert [idx for idx, _ in one] == [order[i: i + 4] for i in range(0, 23, 4)]
    assert [n for _, n in one] == [min(8, max(-(-lengths[j] // 16) for j in order[i: i + 4])) for i in range(0, 23, 4)]
