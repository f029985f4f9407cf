"""Cutting documents into pieces, packing pieces into rows, and assembling rows."""
import numpy as np
import pytest

from moe_jax.data.text_packing import chunk_documents, pack_plan, pack_rows


def test_chunk_documents_matches_slicing():
  rng = np.random.default_rng(0)
  sizes = rng.integers(0, 40, 30)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  got = list(zip(*chunk_documents(starts, 8, min_length=2)))
  want = [(s + o, min(8, n - o)) for s, n in zip(starts[:-1], sizes)
          for o in range(0, n, 8) if min(8, n - o) >= 2]
  assert got == want


@pytest.mark.parametrize('features', [1, 2])
def test_pack_plan_keeps_every_piece_within_capacity(features):
  rng = np.random.default_rng(features)
  capacity = np.array([32, 9][:features])
  lengths = rng.integers(1, capacity + 1, (500, features))
  row_ptr, items = pack_plan(lengths, capacity)
  assert sorted(items.tolist()) == list(range(500))          # every piece exactly once
  for r in range(len(row_ptr) - 1):
    row = items[row_ptr[r]:row_ptr[r + 1]]
    assert len(row) and (lengths[row].sum(0) <= capacity).all()
    assert (np.diff(row) > 0).all()                           # pieces keep their order
  used = lengths[:, 0].sum() / ((len(row_ptr) - 1) * capacity[0])
  assert used > (0.85 if features == 1 else 0.6)              # packing actually packs


def test_pack_plan_without_packing_and_full_pieces():
  lengths = np.array([[4], [2], [1], [4]])
  row_ptr, items = pack_plan(lengths, [4], pack=False)
  assert row_ptr.tolist() == [0, 1, 2, 3, 4] and items.tolist() == [0, 1, 2, 3]
  row_ptr, items = pack_plan(lengths, [4])
  rows = [items[a:b].tolist() for a, b in zip(row_ptr[:-1], row_ptr[1:])]
  assert rows == [[0], [1, 2], [3]]
  with pytest.raises(ValueError, match='piece lengths'):
    pack_plan(np.array([[5]]), [4])


def test_pack_rows_segments_positions_and_padding():
  pieces = [[np.array([7, 8, 9]), np.array([4, 5]), np.array([6])], [np.array([3])], []]
  values, seg, pos = pack_rows(pieces, 8)
  np.testing.assert_array_equal(values, [[7, 8, 9, 4, 5, 6, 0, 0], [3] + [0] * 7, [0] * 8])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 3, 0, 0], [1] + [0] * 7, [0] * 8])
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 0, 0], [0] * 8, [0] * 8])
  assert values.dtype == seg.dtype == pos.dtype == np.int32
  with pytest.raises(ValueError, match='more than'):
    pack_rows([[np.arange(9)]], 8)
