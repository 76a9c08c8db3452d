"""How the work of a data-parallel run is split between processes.

Training: the global batch is ``text_rows`` text rows and ``recall_rows`` recall rows; process
``rank`` of ``world`` reads the contiguous slice :func:`row_slice` of each kind of rows, so the
processes read disjoint documents and together exactly the rows one process would read.

Evaluation: :func:`eval_batches` cuts the (length-sorted) documents into global batches of
``world * batch`` documents, deals each one out round-robin, and gives every process the same
number of batches with the same segment count, so model calls (and the collectives FSDP2 makes in
them) line up across processes; a process with no document in a batch runs an all-padding row.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["row_slice", "eval_batches"]


def row_slice(n_rows: int, rank: int, world: int) -> range:
    """The rows of ``n_rows`` that process ``rank`` of ``world`` reads (contiguous, equal sizes)."""
    if n_rows % world:
        raise ValueError(f"{n_rows} rows cannot be split evenly over {world} processes; choose "
                         f"text_rows and recall_rows divisible by the number of processes")
    per = n_rows // world
    return range(rank * per, (rank + 1) * per)


def eval_batches(lengths: Sequence[int], batch: int, rank: int, world: int, segment_len: int,
                 max_segments: int | None = None) -> list[tuple[list[int], int]]:
    """This process's evaluation batches: a list of (document indices, n_seg).

    Documents are sorted by length (similar lengths share a batch); every global batch of
    ``world * batch`` documents is dealt round-robin; ``n_seg`` is the segment count of the
    longest document of the global batch (capped at ``max_segments``), the same on every process.
    An index list may be empty (the process runs padding only). With world == 1 this is the
    one-process batching."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    step = batch * world
    out = []
    for i in range(0, len(order), step):
        group = order[i: i + step]
        n_seg = max(-(-lengths[j] // segment_len) for j in group)
        if max_segments is not None:
            n_seg = min(n_seg, max_segments)
        out.append((group[rank::world], max(n_seg, 1)))
    return out
