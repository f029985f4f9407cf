"""Packing several documents into fixed-length rows, in numpy.

A tokenised split is one flat token array plus document offsets. It is cut into
pieces that each fit a row (`chunk_documents`), pieces are assigned to rows once
(`pack_plan`, greedy first fit), and a batch of rows is assembled on demand
(`pack_rows`) with segment ids (1, 2, ... per piece, 0 = padding) and positions that
restart at 0 in every piece, so attention masks keep documents apart:

    pieces   [a b c] [d e] [f]          row length 8
    values   a b c d e f 0 0
    segments 1 1 1 2 2 3 0 0
    position 0 1 2 0 1 0 0 0
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def chunk_documents(doc_starts: np.ndarray, chunk_length: int,
                    min_length: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Cuts every document into pieces of `chunk_length` tokens (the last one shorter).

  Args:
    doc_starts: [D + 1] offsets of the documents in the flat token array (the last one
      is its length).
    chunk_length: the longest piece.
    min_length: pieces shorter than this are dropped (e.g. a lone EOS).
  Returns:
    (start [N], length [N]) of the pieces, in document order.
  """
  doc_starts = np.asarray(doc_starts, np.int64)
  lengths = np.diff(doc_starts)
  counts = -(-lengths // chunk_length)                                 # ceil, 0 for empty docs
  doc = np.repeat(np.arange(len(lengths)), counts)                     # [N] document of each piece
  first = np.cumsum(counts) - counts                                   # [D] first piece of each doc
  offset = (np.arange(len(doc)) - first[doc]) * chunk_length           # [N] offset inside its doc
  start = doc_starts[doc] + offset
  length = np.minimum(chunk_length, lengths[doc] - offset)
  keep = length >= min_length
  return start[keep], length[keep]


def pack_plan(lengths: np.ndarray, capacity: Sequence[int], *, pack: bool = True,
              max_open: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Assigns pieces to rows: greedy first fit over at most `max_open` open rows.

  Args:
    lengths: [N, F] each piece's length in each of F features (F = 1 for causal LM;
      inputs and targets for span corruption); pieces are placed in this order.
    capacity: [F] row length per feature.
    pack: False puts every piece in a row of its own.
    max_open: rows still accepting pieces; the oldest closes when one more opens
      (bounded work per piece, as T5X / MaxText packers do).
  Returns:
    (row_ptr [R + 1], items [N]) in CSR form: row r holds pieces
    items[row_ptr[r]:row_ptr[r + 1]], in the order they were placed.
  """
  lengths = np.asarray(lengths, np.int64).reshape(len(lengths), -1)
  capacity = np.asarray(capacity, np.int64)
  if (lengths > capacity).any() or (lengths < 1).any():
    raise ValueError(f'piece lengths must lie in [1, {capacity.tolist()}].')
  row_of = np.empty(len(lengths), np.int64)
  if not pack:
    row_of[:] = np.arange(len(lengths))
  else:
    smallest = lengths.min(0) if len(lengths) else capacity
    full = (lengths == capacity).any(1)      # nothing else fits beside such a piece
    open_rows: list[list] = []               # [row id, remaining per feature]
    num_rows = 0
    for i, (piece, alone) in enumerate(zip(lengths.tolist(), full.tolist())):
      if alone:
        row_of[i], num_rows = num_rows, num_rows + 1
        continue
      for slot in open_rows:
        if all(p <= r for p, r in zip(piece, slot[1])):
          break
      else:
        slot = [num_rows, capacity.tolist()]
        num_rows += 1
        open_rows.append(slot)
        if len(open_rows) > max_open:
          open_rows.pop(0)
      row_of[i] = slot[0]
      slot[1] = [r - p for p, r in zip(piece, slot[1])]
      if any(r < s for r, s in zip(slot[1], smallest.tolist())):
        open_rows.remove(slot)
  items = np.argsort(row_of, kind='stable')
  row_ptr = np.searchsorted(row_of[items], np.arange(int(row_of.max(initial=-1)) + 2))
  return row_ptr, items


def pack_rows(pieces: Sequence[Sequence[np.ndarray]], length: int,
              dtype=np.int32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Concatenates each row's pieces and pads it to `length`.

  Args:
    pieces: for each of R rows, a list of 1-D arrays whose lengths sum to <= length.
  Returns:
    (values, segment_ids, positions), each [R, length] int32; padding is 0 in all three.
  """
  values = np.zeros((len(pieces), length), dtype)
  segment_ids = np.zeros((len(pieces), length), np.int32)
  positions = np.zeros((len(pieces), length), np.int32)
  for r, row in enumerate(pieces):
    sizes = np.array([len(p) for p in row], np.int64)
    n = int(sizes.sum())
    if n > length:
      raise ValueError(f'row {r} holds {n} tokens, more than {length}.')
    if not n:
      continue
    values[r, :n] = np.concatenate(row)
    segment_ids[r, :n] = np.repeat(np.arange(1, len(row) + 1), sizes)
    positions[r, :n] = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
  return values, segment_ids, positions
