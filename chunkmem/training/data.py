"""Training and evaluation data with no downloads: byte-level Python stdlib text and a synthetic
associative-recall task across segments.

Everything is a *document*: ``tokens`` (n,) int64 bytes in [0, 256) and ``target_mask`` (n,) bool,
where ``target_mask[i]`` says whether predicting ``tokens[i]`` from ``tokens[:i]`` counts in the loss
and in the metrics. Documents are cut into segments of ``segment_len`` tokens counted from the
document's first token (a document never shares a segment with another one; the tail is padded with
``PAD`` and masked), so "the first segment of a document" is well defined and the memory of a row
is reset exactly when a new document starts.

Text (:func:`stdlib_documents`): every ``*.py`` file under the running interpreter's stdlib
(``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded), one document per file, split
into train and validation by a hash of the file's relative path (:func:`split_of`), so the split is
the same on every machine with the same Python and no file is in both.

Recall (:func:`recall_document`): key–value pairs in segment 0, each pair alone in one memory pool
window; queries ``? key`` for each pair ``d`` segments later (d in ``distances``), each followed by
its value, the only scored tokens.

Streams (:class:`DocStream`): ``n_rows`` independent rows, each reading its own deterministic
sequence of documents; ``next_window(n_seg)`` returns the next ``n_seg`` segments of every row plus a
per-segment flag telling where the row's memory must be emptied (a new document starts, or,
optionally, at random mid-file text segments: ``text_stream(reset_prob=...)``). The stream position is a small dict
(:meth:`DocStream.state_dict`) saved in checkpoints. A stream may read a subset of its rows (one
process's share of a data-parallel run).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "VOCAB_SIZE", "PAD", "Document", "stdlib_root", "list_stdlib_files", "split_of",
    "stdlib_documents", "RecallSpec", "recall_document", "segment_arrays", "pack_documents",
    "DocStream", "text_stream", "recall_stream", "text_prefixed",
]

VOCAB_SIZE = 256
PAD = 0  # padding byte (never scored); NUL does not occur in the stdlib sources we read

# Recall task alphabet (bytes); the ranges are disjoint so a generated document is unambiguous.
FILLER_LO, FILLER_HI = ord("a"), ord("z") + 1  # filler: uniform random letters from a..
KEY_LO = 128  # keys: KEY_LO .. KEY_LO + n_keys - 1
VALUE_LO = 192  # values: VALUE_LO .. VALUE_LO + n_values - 1
QUERY = ord("?")  # query marker, followed by a key, then the key's value
BLOCK_FILL = ord("|")  # fills a pair's pool window after "key value"


@dataclass
class Document:
    """One document: tokens (n,) int64 and target_mask (n,) bool (scored positions).

    ``answers`` (recall documents only): list of (position, key, value, distance) with
    ``tokens[position] == value`` the scored answer to the query for ``key``.
    """

    tokens: np.ndarray
    target_mask: np.ndarray
    name: str = ""
    answers: list = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


# ----------------------------------------------------------------------------------- stdlib text

def stdlib_root() -> str:
    """The running interpreter's stdlib folder."""
    return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: str | None = None) -> list[str]:
    """Sorted relative POSIX paths of every ``*.py`` file under ``root`` (site-packages and
    __pycache__ excluded)."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def split_of(relpath: str, val_fraction: float = 0.05) -> str:
    """"train" or "val" for a file, from the SHA-1 of its relative POSIX path (deterministic)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2.0**64 < val_fraction else "train"


@lru_cache(maxsize=4)
def _read_stdlib(root: str) -> tuple[tuple[str, bytes], ...]:
    files = []
    for rel in list_stdlib_files(root):
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read().replace(bytes([PAD]), b" ")  # keep PAD unique to padding
        if len(data) >= 2:
            files.append((rel, data))
    return tuple(files)


def stdlib_documents(split: str, root: str | None = None, val_fraction: float = 0.05) -> list[Document]:
    """The stdlib text documents of ``split`` ("train" | "val"), sorted by relative path.

    Every byte but the first is scored (the first has no context)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    docs = []
    for rel, data in _read_stdlib(root or stdlib_root()):
        if split_of(rel, val_fraction) != split:
            continue
        tok = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        mask = np.ones(tok.shape[0], dtype=bool)
        mask[0] = False
        docs.append(Document(tok, mask, name=rel))
    return docs


# ------------------------------------------------------------------------------ recall task

@dataclass(frozen=True)
class RecallSpec:
    """Shape of a recall document.

    segment_len: tokens per segment; pool: tokens per memory slot (the model's ``memory_pool``),
    each key–value pair is written alone in one pool window ``[key, value, '|' * (pool - 2)]``;
    n_pairs: pairs in segment 0; distances: segments between the pairs and their queries (each
    pair is queried once, at one of them); n_keys / n_values: alphabet sizes (chance = 1/n_values);
    filler_size: how many letters the random filler is drawn from (1: a constant filler).
    """

    segment_len: int = 128
    pool: int = 4
    n_pairs: int = 8
    distances: tuple = (1, 2, 4)
    n_keys: int = 64
    n_values: int = 32
    filler_size: int = 26

    def __post_init__(self):
        L, P = self.segment_len, self.pool
        if P < 2:
            raise ValueError(f"pool must be >= 2 (a pair needs 2 tokens), got {P}")
        if self.n_pairs * P > L:
            raise ValueError(f"n_pairs * pool = {self.n_pairs * P} does not fit in segment_len {L}")
        if not self.distances or min(self.distances) < 1:
            raise ValueError(f"distances must be >= 1, got {self.distances}")
        if self.n_pairs > self.n_keys or KEY_LO + self.n_keys > VALUE_LO:
            raise ValueError(f"need n_pairs <= n_keys <= {VALUE_LO - KEY_LO}, got {self.n_pairs}, {self.n_keys}")
        if not 1 <= self.filler_size <= FILLER_HI - FILLER_LO:
            raise ValueError(f"filler_size must be in [1, {FILLER_HI - FILLER_LO}], got {self.filler_size}")
        if VALUE_LO + self.n_values > VOCAB_SIZE:
            raise ValueError(f"n_values must be <= {VOCAB_SIZE - VALUE_LO}, got {self.n_values}")
        per_seg = -(-self.n_pairs // len(self.distances))
        if 3 * per_seg > L:
            raise ValueError("too many queries for one segment")

    @property
    def n_segments(self) -> int:
        """Segments in a document: the pairs' segment plus the farthest distance."""
        return max(self.distances) + 1


def recall_document(spec: RecallSpec, rng: np.random.Generator) -> Document:
    """One recall document of ``spec.n_segments * spec.segment_len`` tokens.

    Segment 0: ``n_pairs`` pairs at random pool-aligned windows (distinct keys, random values),
    filler elsewhere. Pair i is queried once in segment ``d_i`` as ``? key value`` at a random
    place inside that segment; only the value tokens of queries are scored.
    """
    L, P = spec.segment_len, spec.pool
    n = spec.n_segments * L
    tok = rng.integers(FILLER_LO, FILLER_LO + spec.filler_size, size=n, dtype=np.int64)
    mask = np.zeros(n, dtype=bool)
    keys = KEY_LO + rng.choice(spec.n_keys, size=spec.n_pairs, replace=False)
    values = VALUE_LO + rng.integers(0, spec.n_values, size=spec.n_pairs)
    windows = np.sort(rng.choice(L // P, size=spec.n_pairs, replace=False))
    for w, k, v in zip(windows, keys, values):
        tok[w * P: (w + 1) * P] = BLOCK_FILL
        tok[w * P], tok[w * P + 1] = k, v
    dist = np.array([spec.distances[i % len(spec.distances)] for i in range(spec.n_pairs)])
    rng.shuffle(dist)
    answers = []
    for d in sorted(set(dist.tolist())):
        idx = np.flatnonzero(dist == d)
        # non-overlapping 3-token query slots inside segment d, in random order
        slots = rng.choice(L // 3, size=idx.shape[0], replace=False)
        for i, s in zip(idx, slots):
            pos = d * L + 3 * int(s)
            tok[pos], tok[pos + 1], tok[pos + 2] = QUERY, keys[i], values[i]
            mask[pos + 2] = True
            answers.append((pos + 2, int(keys[i]), int(values[i]), int(d)))
    answers.sort()
    return Document(tok, mask, name="recall", answers=answers)


# ------------------------------------------------------------------------ segments and packing

def segment_arrays(doc: Document, segment_len: int):
    """A document as inputs x, targets y and target mask m, each (n_seg, segment_len).

    ``y[s, t]`` is the token after ``x[s, t]`` (the last one may lie in the next segment) and
    ``m[s, t]`` whether it is scored; padding after the end is ``PAD`` with m False.
    """
    n = len(doc)
    n_seg = max(1, -(-n // segment_len))
    total = n_seg * segment_len
    x = np.full(total, PAD, dtype=np.int64)
    y = np.full(total, PAD, dtype=np.int64)
    m = np.zeros(total, dtype=bool)
    x[:n] = doc.tokens
    y[: n - 1] = doc.tokens[1:]
    m[: n - 1] = doc.target_mask[1:]
    shape = (n_seg, segment_len)
    return x.reshape(shape), y.reshape(shape), m.reshape(shape)


def pack_documents(docs: Sequence[Document], segment_len: int, n_seg: int):
    """The first ``n_seg`` segments of each document from its start, as a batch.

    Returns x, y (B, n_seg, segment_len) int64 and m (B, n_seg, segment_len) bool; documents
    shorter than ``n_seg`` segments are padded (m False)."""
    B = len(docs)
    x = np.full((B, n_seg, segment_len), PAD, dtype=np.int64)
    y = np.full_like(x, PAD)
    m = np.zeros(x.shape, dtype=bool)
    for b, doc in enumerate(docs):
        xs, ys, ms = segment_arrays(doc, segment_len)
        k = min(n_seg, xs.shape[0])
        x[b, :k], y[b, :k], m[b, :k] = xs[:k], ys[:k], ms[:k]
    return x, y, m


class DocStream:
    """``n_rows`` rows, each reading documents ``doc_fn(row, k)`` for k = 0, 1, 2, ... segment by
    segment. Deterministic: the position (per row: document counter and segment offset) is all the
    state, see :meth:`state_dict`.

    ``rows`` (default: all of ``range(n_rows)``) are the rows this stream reads: a process of a
    data-parallel run reads its own disjoint slice of the rows (:mod:`chunkmem.training.sharding`),
    so the processes together read exactly what one process reading every row would.

    ``extra_reset(row, k, j)`` (optional): True to also empty the row's memory before segment
    ``j > 0`` of its document ``k`` (a function of the position only, so resuming and the split
    of the rows over processes do not change it)."""

    def __init__(self, doc_fn: Callable[[int, int], Document], n_rows: int, segment_len: int,
                 rows: Sequence[int] | None = None, extra_reset: Callable[[int, int, int], bool] | None = None):
        if n_rows < 1 or segment_len < 1:
            raise ValueError(f"n_rows and segment_len must be >= 1, got {n_rows}, {segment_len}")
        self.rows = list(range(n_rows)) if rows is None else [int(r) for r in rows]
        if not all(0 <= r < n_rows for r in self.rows):
            raise ValueError(f"rows must lie in [0, {n_rows}), got {self.rows}")
        self.doc_fn = doc_fn
        self.extra_reset = extra_reset
        self.n_rows = n_rows
        self.segment_len = segment_len
        self.doc_index = [0] * len(self.rows)
        self.seg_offset = [0] * len(self.rows)
        self._cache: dict[int, tuple] = {}

    def _segments(self, i: int):
        k = self.doc_index[i]
        cached = self._cache.get(i)
        if cached is None or cached[0] != k:
            cached = (k, segment_arrays(self.doc_fn(self.rows[i], k), self.segment_len))
            self._cache[i] = cached
        return cached[1]

    def next_window(self, n_seg: int):
        """The next ``n_seg`` segments of every row this stream reads.

        Returns x, y (R, n_seg, L) int64, m (R, n_seg, L) bool and reset (R, n_seg) bool, with
        R = ``len(rows)``: True where the segment is the first one of a document (the row's memory
        must be emptied before it)."""
        R, L = len(self.rows), self.segment_len
        x = np.empty((R, n_seg, L), dtype=np.int64)
        y = np.empty_like(x)
        m = np.empty(x.shape, dtype=bool)
        reset = np.zeros((R, n_seg), dtype=bool)
        for r in range(R):
            for s in range(n_seg):
                xs, ys, ms = self._segments(r)
                j = self.seg_offset[r]
                reset[r, s] = j == 0 or (self.extra_reset is not None
                                         and bool(self.extra_reset(self.rows[r], self.doc_index[r], j)))
                x[r, s], y[r, s], m[r, s] = xs[j], ys[j], ms[j]
                if j + 1 == xs.shape[0]:
                    self.doc_index[r] += 1
                    self.seg_offset[r] = 0
                else:
                    self.seg_offset[r] = j + 1
        return x, y, m, reset

    def state_dict(self) -> dict:
        """The position of the rows this stream reads (lists of ints, in the order of ``rows``)."""
        return {"doc_index": list(self.doc_index), "seg_offset": list(self.seg_offset)}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["doc_index"]) != len(self.rows) or len(sd["seg_offset"]) != len(self.rows):
            raise ValueError(f"stream state has {len(sd['doc_index'])} rows, expected {len(self.rows)}")
        self.doc_index = [int(v) for v in sd["doc_index"]]
        self.seg_offset = [int(v) for v in sd["seg_offset"]]
        self._cache.clear()


def text_stream(docs: Sequence[Document], n_rows: int, segment_len: int, seed: int,
                rows: Sequence[int] | None = None, reset_prob: float = 0.0) -> DocStream:
    """Rows reading ``docs`` in a fresh seeded permutation per epoch; row r reads documents
    r, r + n_rows, r + 2 n_rows, ... of the endless sequence of epochs (so no two rows read the
    same document in an epoch). ``rows``: the rows to read (default all).

    ``reset_prob`` > 0: the memory is also emptied before a segment that is not a file's first
    one, with this probability, drawn from rng([seed, 9, row, k, j]) for segment j of the row's
    document k (deterministic), so an empty memory is as common in text as wanted while the
    file's bytes are read as usual."""
    if not 0.0 <= reset_prob < 1.0:
        raise ValueError(f"reset_prob must be in [0, 1), got {reset_prob}")
    if not docs:
        raise ValueError("text_stream needs at least one document")
    N = len(docs)
    perms: dict[int, np.ndarray] = {}

    def doc_fn(row: int, k: int) -> Document:
        g = k * n_rows + row
        epoch, i = divmod(g, N)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(N)
        return docs[int(perms[epoch][i])]

    def extra_reset(row: int, k: int, j: int) -> bool:
        return bool(np.random.default_rng([seed, 9, row, k, j]).random() < reset_prob)

    return DocStream(doc_fn, n_rows, segment_len, rows, extra_reset if reset_prob > 0 else None)


def text_prefixed(doc: Document, prefix: np.ndarray) -> Document:
    """``doc`` preceded by the tokens ``prefix`` (unscored; ``answers`` shifted)."""
    n = len(prefix)
    return Document(np.concatenate([prefix.astype(np.int64), doc.tokens]),
                    np.concatenate([np.zeros(n, dtype=bool), doc.target_mask]), name=doc.name + "+prefix",
                    answers=[(pos + n, k, v, d) for pos, k, v, d in doc.answers])


def recall_stream(spec: RecallSpec, n_rows: int, seed: int, rows: Sequence[int] | None = None,
                  prefix_docs: Sequence[Document] | None = None) -> DocStream:
    """Rows of fresh recall documents; document k of row r is drawn from rng([seed, r, k]).
    ``rows``: the rows to read (default all).

    ``prefix_docs``: each recall document is preceded by one segment of text (unscored): the
    segment-aligned segment of a document of ``prefix_docs`` (both drawn from rng([seed, 13, r, k]);
    files shorter than a segment are skipped), so the document's first segment, read from an
    empty memory, is text, and its pairs are read with one segment of text in memory."""
    L = spec.segment_len
    long_docs = [d for d in prefix_docs if len(d) >= L] if prefix_docs is not None else None
    if prefix_docs is not None and not long_docs:
        raise ValueError(f"prefix_docs needs a document of at least {L} tokens")

    def doc_fn(row: int, k: int) -> Document:
        doc = recall_document(spec, np.random.default_rng([seed, row, k]))
        if long_docs is None:
            return doc
        rng = np.random.default_rng([seed, 13, row, k])
        src = long_docs[int(rng.integers(len(long_docs)))]
        j = int(rng.integers(len(src) // L))
        return text_prefixed(doc, src.tokens[j * L:(j + 1) * L])

    return DocStream(doc_fn, n_rows, spec.segment_len, rows)
