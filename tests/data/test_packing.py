"""Tests of first-fit packing and packed evaluation batches (recgpt_jax.data.packing)."""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest

from recgpt_jax import errors
from recgpt_jax.data import packing, split

BUNDLED_DIR = pathlib.Path(packing.__file__).parent / "bundled"


def read_bundled(name: str, limit: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
  """Reads ``users [U], sequences`` straight from a bundled ``.txt.gz`` file."""
  users, sequences = [], []
  with gzip.open(BUNDLED_DIR / f"{name}.txt.gz", "rt") as f:
    for line in f:
      if limit is not None and len(users) >= limit:
        break
      user, *items = line.split()
      users.append(int(user))
      sequences.append(np.array(items, dtype=np.int32))
  return np.array(users, dtype=np.int32), sequences


def row_segments(seq_ids_r: np.ndarray) -> list[tuple[int, int]]:
  """Checks one row's ``seq_ids`` are 1..k in contiguous runs then 0s; returns ``(start, stop)`` runs."""
  real = int(np.count_nonzero(seq_ids_r))
  assert not seq_ids_r[real:].any(), "padding must only trail the row"
  runs = []
  start = 0
  for col in range(1, real + 1):
    if col == real or seq_ids_r[col] != seq_ids_r[start]:
      assert seq_ids_r[start] == len(runs) + 1, "seq_ids must count 1, 2, ... along the row"
      runs.append((start, col))
      start = col
  return runs


def check_placement(lengths: np.ndarray, place: packing.Placement, row_len: int, rows: int, cap: int | None):
  """Asserts first-fit placement invariants."""
  n = len(lengths)
  assert place.bounds[0] == 0 and place.bounds[-1] == n
  assert np.all(np.diff(place.batch) >= 0)
  for b in range(place.num_batches):
    lo, hi = place.bounds[b], place.bounds[b + 1]
    assert hi > lo
    assert np.all(place.batch[lo:hi] == b)
    if cap is not None:
      assert hi - lo <= cap
    used = np.zeros((rows, row_len), dtype=np.int32)
    for i in range(lo, hi):
      r, c = place.row[i], place.col[i]
      assert 0 <= r < rows and c + lengths[i] <= row_len
      used[r, c : c + lengths[i]] += 1
    assert used.max() <= 1, "sequences overlap"
    if hi < n:  # The batch closed because the next sequence fit nowhere (or no slot was left).
      free = row_len - used.sum(axis=1)
      assert free.max() < lengths[hi] or (cap is not None and hi - lo == cap)


@pytest.mark.parametrize("cap", [None, 7])
def test_first_fit_invariants(cap):
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 21, size=500)
  place = packing.first_fit(lengths, row_len=20, rows_per_batch=4, users_per_batch=cap)
  check_placement(lengths, place, row_len=20, rows=4, cap=cap)


def test_first_fit_small_example():
  place = packing.first_fit([3, 4, 2, 5, 1], row_len=6, rows_per_batch=2)
  # Batch 0: 3 -> r0, 4 -> r1, 2 -> r0 (first row with room); 5 fits nowhere (free 1, 2) -> batch 1:
  # 5 -> r0, 1 -> r0.
  np.testing.assert_array_equal(place.row, [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(place.col, [0, 0, 3, 0, 5])
  np.testing.assert_array_equal(place.batch, [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(place.seq_id, [1, 1, 2, 1, 2])
  np.testing.assert_array_equal(place.bounds, [0, 3, 5])


def test_first_fit_empty_and_errors():
  assert packing.first_fit([], row_len=8, rows_per_batch=2).num_batches == 0
  with pytest.raises(errors.ConfigError):
    packing.first_fit([9], row_len=8, rows_per_batch=2)
  with pytest.raises(errors.ConfigError):
    packing.first_fit([0, 3], row_len=8, rows_per_batch=2)


def test_scatter_rows_layout():
  out = packing.scatter_rows(
    np.array([2, 3]),
    np.array([1, 1]),
    np.array([0, 2]),
    np.array([1, 2]),
    {"items": np.array([5, 6, 7, 8, 9])},
    {"users": np.array([11, 12])},
    rows_per_batch=2,
    row_len=6,
  )
  np.testing.assert_array_equal(out["items"], [[0] * 6, [5, 6, 7, 8, 9, 0]])
  np.testing.assert_array_equal(out["positions"], [[0] * 6, [0, 1, 0, 1, 2, 0]])
  np.testing.assert_array_equal(out["seq_ids"], [[0] * 6, [1, 1, 2, 2, 2, 0]])
  np.testing.assert_array_equal(out["users"], [[0] * 6, [11, 11, 12, 12, 12, 0]])
  np.testing.assert_array_equal(out["segments"], np.zeros((2, 6)))
  assert all(v.dtype == np.int32 for v in out.values())


@pytest.mark.parametrize("stage", split.STAGES)
def test_pack_eval_batches(stage):
  users, sequences = read_bundled("Beauty", limit=3000)
  max_len, row_len, rows, slots = 20, 32, 6, 40
  eval_set = split.make_eval_set(users, sequences, stage, max_len)
  batches = packing.pack_eval_batches(eval_set, row_len=row_len, rows_per_batch=rows, users_per_batch=slots)
  seen = 0  # Users must come in eval-set order.
  for batch in batches:
    num = int(np.count_nonzero(batch["answer"]))
    width = packing.history_width(eval_set.histories[seen : seen + num])  # the batch's own width
    assert width % 8 == 0 and width >= max(len(h) for h in eval_set.histories[seen : seen + num])
    for key in ("items", "positions", "segments", "seq_ids", "users"):
      assert batch[key].shape == (rows, row_len) and batch[key].dtype == np.int32
    for key in ("last_row", "last_col", "answer"):
      assert batch[key].shape == (slots,) and batch[key].dtype == np.int32
    assert batch["history"].shape == (slots, width)
    assert not batch["segments"].any()
    assert batch["answer"][:num].all() and not batch["answer"][num:].any()  # Filled slots come first.
    assert not batch["history"][num:].any() and not batch["last_row"][num:].any()
    assert num == sum(len(row_segments(r)) for r in batch["seq_ids"])
    for slot in range(num):
      u = seen + slot
      window, hist = eval_set.windows[u], eval_set.histories[u]
      r, c = batch["last_row"][slot], batch["last_col"][slot]
      start = c - len(window) + 1
      np.testing.assert_array_equal(batch["items"][r, start : c + 1], window)
      np.testing.assert_array_equal(batch["positions"][r, start : c + 1], np.arange(len(window)))
      assert np.all(batch["users"][r, start : c + 1] == eval_set.users[u])
      assert len(set(batch["seq_ids"][r, start : c + 1])) == 1
      assert c + 1 == row_len or batch["seq_ids"][r, c + 1] != batch["seq_ids"][r, c]  # Window ends here.
      assert batch["answer"][slot] == eval_set.answers[u]
      np.testing.assert_array_equal(batch["history"][slot, : len(hist)], hist)
      assert not batch["history"][slot, len(hist) :].any()
    seen += num
  assert seen == len(eval_set.users)
  assert 0.5 < packing.real_fraction(batches) <= 1.0


def test_pack_eval_batches_slot_limit_closes_batch():
  eval_set = split.EvalSet(
    users=np.arange(1, 6, dtype=np.int32),
    windows=[np.array([1, 2], dtype=np.int32)] * 5,
    answers=np.arange(10, 15, dtype=np.int32),
    histories=[np.array([1, 2], dtype=np.int32)] * 5,
  )
  batches = packing.pack_eval_batches(eval_set, row_len=8, rows_per_batch=4, users_per_batch=2)
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]["answer"], [14, 0])
  assert batches[-1]["history"].shape == (2, 8)
  assert packing.real_fraction(batches) == pytest.approx(10 / (3 * 4 * 8))


def test_real_fraction_empty():
  assert packing.real_fraction([]) == 0.0


def eval_set_with(histories: list[np.ndarray], max_len: int = 12) -> split.EvalSet:
  """An evaluation set whose windows are those of ``histories_of()`` (only the exclusion histories vary)."""
  rng = np.random.default_rng(1)
  return split.EvalSet(
    users=(np.arange(len(histories)) % 8 + 1).astype(np.int32),
    windows=[h[-max_len:] for h in histories_of(len(histories))],
    answers=rng.integers(1, 31, len(histories)).astype(np.int32),
    histories=histories,
  )


def histories_of(num_users: int = 40, long_user: int | None = None, long_len: int = 500) -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  histories = [rng.integers(1, 31, rng.integers(1, 13)).astype(np.int32) for _ in range(num_users)]
  if long_user is not None:  # a 500-item history (of items 1..10) ending with the user's own
    own = histories[long_user]
    histories[long_user] = np.concatenate([rng.integers(1, 11, long_len - len(own)), own]).astype(np.int32)
  return histories


def test_history_width_ladder():
  assert [packing.history_width([np.zeros(n)]) for n in (0, 1, 8, 9, 16, 17, 204, 5000)] == [
    8,
    8,
    8,
    16,
    16,
    32,
    256,
    8192,
  ]


def test_one_long_history_widens_only_its_own_batch():
  """One user with a 500-item history: only their batch's history array widens (it used to widen every batch)."""
  kw = {"row_len": 16, "rows_per_batch": 4, "users_per_batch": 8}
  plain = packing.pack_eval_batches(eval_set_with(histories_of()), **kw)
  long_set = eval_set_with(histories_of(long_user=13))
  batches = packing.pack_eval_batches(long_set, **kw)
  assert len(batches) == len(plain) > 3
  owner = next(b for b, batch in enumerate(batches) if (batch["history"] != 0).sum(axis=1).max() == 500)
  assert batches[owner]["history"].shape == (8, 512)
  for b, (got, want) in enumerate(zip(batches, plain, strict=True)):
    for key in want:
      if b == owner and key == "history":
        continue
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {b} {key}")
  assert all(b["history"].shape == (8, 16) for i, b in enumerate(batches) if i != owner)
  total = sum(b["history"].nbytes for b in batches)
  set_wide = len(batches) * 8 * 504 * 4  # the old layout: every batch as wide as the longest history
  assert total < set_wide / 3
