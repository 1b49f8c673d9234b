"""Packing of short user sequences into fixed-shape rows (pure numpy).

Users average ~9 items against ``max_len=50``, so instead of padding every user to ``max_len`` several
users share one row of ``row_len`` positions. A batch is ``rows_per_batch`` rows; users are placed in
their given order by *first fit* (the first row of the current batch with enough room) and a batch is
closed as soon as the next user fits in no row (or, if bounded, the batch has no free user slot). So
every batch holds a contiguous run of the input order and a user is never split across rows.

Packed layout, all ``[rows, row_len]`` int32 (0 on padding):

* ``positions``: 0-based position within the user's sequence (restarts for every user);
* ``segments``: 0 for real items (1 is reserved for model-generated prompt items);
* ``seq_ids``: 1..k, the user slot within the row (users are contiguous in a row);
* ``users``: the user id of every token; plus the per-token value arrays (``items``, ``targets``, ...).
"""

from __future__ import annotations

import array
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from recgpt_jax import errors
from recgpt_jax.data import split

# The history (exclusion set) width of an evaluation batch is this times a power of two (see history_width).
HISTORY_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where first-fit put each sequence; all arrays are int32 ``[N]`` in input order.

  Attributes:
    batch: batch index (non-decreasing: batches are contiguous runs of the input).
    row: row within the batch.
    col: first column of the sequence within the row.
    seq_id: 1-based slot of the sequence within its row.
    bounds: ``[num_batches + 1]``; batch ``b`` holds sequences ``bounds[b]:bounds[b + 1]``.
  """

  batch: np.ndarray
  row: np.ndarray
  col: np.ndarray
  seq_id: np.ndarray
  bounds: np.ndarray

  @property
  def num_batches(self) -> int:
    return len(self.bounds) - 1


def first_fit(
  lengths: Sequence[int] | np.ndarray,
  *,
  row_len: int,
  rows_per_batch: int,
  users_per_batch: int | None = None,
) -> Placement:
  """Packs sequences, in order, into batches of ``rows_per_batch`` rows of ``row_len`` by first fit.

  Args:
    lengths: ``[N]`` sequence lengths, each in ``1..row_len``.
    row_len: positions per row.
    rows_per_batch: rows per batch.
    users_per_batch: optional cap on the number of sequences per batch.

  Returns:
    The ``Placement`` of every sequence.

  Raises:
    errors.ConfigError: on non-positive sizes or a sequence longer than ``row_len``.
  """
  lengths = np.asarray(lengths, dtype=np.int64)  # [N]
  if row_len < 1 or rows_per_batch < 1 or (users_per_batch is not None and users_per_batch < 1):
    raise errors.ConfigError(
      f"packing sizes must be positive: row_len={row_len}, rows_per_batch={rows_per_batch},"
      f" users_per_batch={users_per_batch}"
    )
  if lengths.size and (lengths.min() < 1 or lengths.max() > row_len):
    raise errors.ConfigError(f"sequence lengths must be in 1..row_len={row_len}; got {lengths.min()}..{lengths.max()}")
  cap = users_per_batch if users_per_batch is not None else len(lengths) + 1
  n = len(lengths)
  # A list scan of the batch's few dozen rows is ~4x faster than numpy calls per sequence (7M sequences, the users
  # of a 10^8-interaction log, in ~8 s); the outputs are int32 arrays from the start (half the memory of lists).
  batch, row, col, seq_id = (array.array("i", bytes(4 * n)) for _ in range(4))
  free = [row_len] * rows_per_batch  # free positions per row
  count = [0] * rows_per_batch  # sequences per row
  b, in_batch = 0, 0
  for i, length in enumerate(lengths.tolist()):
    for r in range(rows_per_batch):
      if free[r] >= length:
        break
    else:
      r = -1
    if r < 0 or in_batch == cap:
      b, in_batch, r = b + 1, 0, 0
      free = [row_len] * rows_per_batch
      count = [0] * rows_per_batch
    col[i] = row_len - free[r]
    free[r] -= length
    count[r] += 1
    seq_id[i] = count[r]
    row[i] = r
    batch[i] = b
    in_batch += 1
  batch, row, col, seq_id = (np.frombuffer(x, dtype=np.int32) for x in (batch, row, col, seq_id))
  num_batches = b + 1 if n else 0
  bounds = np.searchsorted(batch, np.arange(num_batches + 1), side="left").astype(np.int32)
  return Placement(batch=batch, row=row, col=col, seq_id=seq_id, bounds=bounds)


def scatter_rows(
  lengths: np.ndarray,
  row: np.ndarray,
  col: np.ndarray,
  seq_id: np.ndarray,
  tokens: Mapping[str, np.ndarray],
  per_sequence: Mapping[str, np.ndarray],
  *,
  rows_per_batch: int,
  row_len: int,
) -> dict[str, np.ndarray]:
  """Writes the sequences of one batch into ``[rows_per_batch, row_len]`` arrays.

  Args:
    lengths: ``[k]`` lengths of the batch's sequences.
    row: ``[k]`` row of each sequence.
    col: ``[k]`` first column of each sequence.
    seq_id: ``[k]`` slot of each sequence within its row.
    tokens: name -> ``[sum(lengths)]`` per-token values, the sequences concatenated in order.
    per_sequence: name -> ``[k]`` per-sequence values, broadcast to all of a sequence's tokens.
    rows_per_batch: rows of the output.
    row_len: columns of the output.

  Returns:
    name -> int32 ``[rows_per_batch, row_len]`` for every key of ``tokens`` and ``per_sequence`` plus
    ``positions``, ``segments`` and ``seq_ids``; 0 on padding.
  """
  lengths = np.asarray(lengths, dtype=np.int64)  # [k]
  owner = np.repeat(np.arange(len(lengths)), lengths)  # [T] sequence of each token
  starts = np.cumsum(lengths) - lengths  # [k] offset of each sequence in the token arrays
  within = np.arange(owner.size) - starts[owner]  # [T] position within the sequence
  dest = (np.asarray(row, np.int64) * row_len + col)[owner] + within  # [T] flat index in [R * row_len]

  def scatter(values_t: np.ndarray) -> np.ndarray:
    out = np.zeros(rows_per_batch * row_len, dtype=np.int32)
    out[dest] = values_t
    return out.reshape(rows_per_batch, row_len)

  out = {name: scatter(values_t) for name, values_t in tokens.items()}
  out.update({name: scatter(np.asarray(values_k)[owner]) for name, values_k in per_sequence.items()})
  out["positions"] = scatter(within)
  out["segments"] = np.zeros((rows_per_batch, row_len), dtype=np.int32)
  out["seq_ids"] = scatter(np.asarray(seq_id)[owner])
  return out


def history_width(histories: Sequence[np.ndarray]) -> int:
  """Width ``H`` of one batch's history array: ``HISTORY_MULTIPLE * 2**j``, the smallest that holds the longest of
  ``histories``.

  Each batch gets its own width, so one user with a long history widens only their own batch, never the whole
  set; the power-of-two ladder keeps the number of distinct batch shapes (one compilation each) logarithmic in
  the longest history, and every batch within 2x of its own need.
  """
  longest = max((len(h) for h in histories), default=0)
  width = HISTORY_MULTIPLE
  while width < longest:
    width *= 2
  return width


def pack_eval_batches(
  eval_set: split.EvalSet,
  *,
  row_len: int,
  rows_per_batch: int,
  users_per_batch: int,
) -> list[dict[str, np.ndarray]]:
  """Packs the users of an evaluation set, in order, into fixed-shape batches.

  A batch is closed when the next user's window fits in no row or all ``users_per_batch`` slots are
  used; the last batch is padded with empty rows and empty slots.

  Args:
    eval_set: users with their model windows, answers and full histories.
    row_len: positions per row (at least the longest window).
    rows_per_batch: rows ``R`` per batch.
    users_per_batch: user slots ``U_b`` per batch.

  Returns:
    One dict per batch with int32 arrays ``items``, ``positions``, ``segments``, ``seq_ids``, ``users``
    of shape ``[R, row_len]``; ``last_row``, ``last_col`` (where each slot's last window item sits) and
    ``answer`` (0 = empty slot) of shape ``[U_b]``; ``history`` ``[U_b, H_b]`` right-padded with 0, with
    ``H_b`` the batch's own width (``history_width`` of the batch's histories: the padding is never scored, so
    the width does not change any result).
  """
  lengths = np.array([len(w) for w in eval_set.windows], dtype=np.int64)  # [U]
  place = first_fit(lengths, row_len=row_len, rows_per_batch=rows_per_batch, users_per_batch=users_per_batch)
  users = np.asarray(eval_set.users, dtype=np.int32)  # [U]
  answers = np.asarray(eval_set.answers, dtype=np.int32)  # [U]
  batches = []
  for b in range(place.num_batches):
    lo, hi = int(place.bounds[b]), int(place.bounds[b + 1])
    rows = scatter_rows(
      lengths[lo:hi],
      place.row[lo:hi],
      place.col[lo:hi],
      place.seq_id[lo:hi],
      {"items": np.concatenate(eval_set.windows[lo:hi])},
      {"users": users[lo:hi]},
      rows_per_batch=rows_per_batch,
      row_len=row_len,
    )
    k = hi - lo
    last_row = np.zeros(users_per_batch, dtype=np.int32)  # [U_b]
    last_col = np.zeros(users_per_batch, dtype=np.int32)  # [U_b]
    answer = np.zeros(users_per_batch, dtype=np.int32)  # [U_b]
    history = np.zeros((users_per_batch, history_width(eval_set.histories[lo:hi])), dtype=np.int32)  # [U_b, H_b]
    last_row[:k] = place.row[lo:hi]
    last_col[:k] = place.col[lo:hi] + lengths[lo:hi] - 1
    answer[:k] = answers[lo:hi]
    for slot, hist in enumerate(eval_set.histories[lo:hi]):
      history[slot, : len(hist)] = hist
    batches.append({**rows, "last_row": last_row, "last_col": last_col, "answer": answer, "history": history})
  return batches


def real_fraction(batches: Sequence[Mapping[str, np.ndarray]]) -> float:
  """Fraction of computed positions (all ``seq_ids`` cells of all batches) that hold a real token."""
  real = sum(int(np.count_nonzero(b["seq_ids"])) for b in batches)
  total = sum(int(b["seq_ids"].size) for b in batches)
  return real / total if total else 0.0
