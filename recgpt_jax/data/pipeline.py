"""Grain input pipelines: packed training batches per epoch and packed evaluation batches.

Training: source -> train example per user (``split.train_example``; users with fewer than
``split.MIN_ITEMS`` items dropped) -> per-epoch shuffle keyed by ``(seed, epoch)`` -> first-fit packing
into batches of ``rows_per_batch`` rows of ``row_len`` (``packing.first_fit``) -> one numpy dict per
batch (``items``, ``targets``, ``positions``, ``segments``, ``seq_ids``, ``users``, all int32
``[rows_per_batch, row_len]``).

Only the users' lengths are held: each epoch's packing plan is computed in numpy from them (first fit over the
shuffled order), and batch ``b`` reads just the records packed into this process's rows (``_EpochBatches``), so no
process holds the whole dataset when the source is a store on disk (``store.StoreSource``, with a lengths index).
A source without an index (the TFDS copy of a bundled dataset, a list of records) is read once into an
``ArraySource`` (one flat buffer; reading Beauty's TFDS source costs ~0.5 s). The batches are a
``grain.MapDataset`` over batch indices, so ``steps_per_epoch`` is exact and the Grain iterator state (the next
batch index) resumes a run at exactly the next batch. Grain's own ``FirstFitPackIterDataset`` packs equally well
(same first-fit rule) but costs ~4 s per Beauty epoch in per-element Python and cannot report the epoch length
before running it.

A source is anything with ``__len__`` and ``__getitem__`` returning ``{'user': int, 'items': int [n]}``:
``tfds_builder.data_source(...)[0]``, ``ArraySource`` or ``store.StoreSource``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from recgpt_jax import errors
from recgpt_jax.data import packing, prompts, split

TRAIN_KEYS = ("items", "targets", "positions", "segments", "seq_ids", "users")


class RecordSource(Protocol):
  """Random-access source of ``{'user': int, 'items': int [n]}`` records."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


def read_source(source: RecordSource) -> tuple[np.ndarray, list[np.ndarray]]:
  """Reads every record of ``source``, ordered by user id (independent of the source's record order).

  Args:
    source: the record source.

  Returns:
    ``(users [U] int32, sequences)`` with one int32 item array per user.
  """
  indices = list(range(len(source)))
  getitems = getattr(source, "__getitems__", None)  # Batched read: ~2x faster on TFDS ArrayRecord.
  records = getitems(indices) if getitems is not None else [source[i] for i in indices]
  users = np.array([int(r["user"]) for r in records], dtype=np.int32)  # [U]
  order = np.argsort(users, kind="stable")
  return users[order], [np.asarray(records[i]["items"], dtype=np.int32) for i in order]


class ArraySource:
  """In-memory random-access records held as one flat item buffer (``RecordSource`` with a lengths index).

  Args:
    users: ``[U]`` user ids.
    sequences: one int array of item ids per user (time order).

  Attributes:
    users: ``[U]`` int32 user ids, in the given order.
    lengths: ``[U]`` int32 sequence lengths.
  """

  def __init__(self, users: Sequence[int] | np.ndarray, sequences: Sequence[np.ndarray]):
    if len(users) != len(sequences):
      raise errors.DataError(f"{len(users)} users but {len(sequences)} sequences")
    self.users = np.asarray(users, dtype=np.int32)  # [U]
    self.lengths = np.fromiter((len(s) for s in sequences), np.int32, count=len(sequences))  # [U]
    self._offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])  # [U + 1]
    self._items = (
      np.concatenate([np.asarray(s) for s in sequences]).astype(np.int32) if len(sequences) else np.zeros(0, np.int32)
    )  # [T]

  @classmethod
  def from_data(cls, data: Any) -> ArraySource:
    """Wraps anything with ``users`` and ``sequences`` attributes (e.g. ``io.SequenceData``)."""
    return cls(data.users, data.sequences)

  def __len__(self) -> int:
    return len(self.users)

  def __getitem__(self, index: int) -> dict[str, Any]:
    lo, hi = self._offsets[index], self._offsets[index + 1]
    return {"user": np.int64(self.users[index]), "items": self._items[lo:hi].astype(np.int64)}

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(items [sum of lengths] int32, lengths [k])``: the sequences of records ``indices``, concatenated."""
    indices = np.asarray(indices, np.int64)
    lengths = self.lengths[indices]
    src = np.repeat(self._offsets[indices] - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
    return self._items[src], lengths


def _indexed(source: RecordSource) -> Any:
  """``source`` itself when it has a lengths index (``users``, ``lengths``, ``gather``), else its records read
  into an ``ArraySource``."""
  if all(hasattr(source, name) for name in ("users", "lengths", "gather")):
    return source
  return ArraySource(*read_source(source))


def _span_lengths(n: np.ndarray, max_len: int, prompt_mode: str | None, width: int) -> tuple[np.ndarray, np.ndarray]:
  """``(span, loss_tokens)``: every user's span in a packed row and its loss tokens, from the train example
  lengths ``n`` alone (as ``prompts.prompt_example`` lays them out)."""
  if prompt_mode != "interleave":
    return n, n
  total = n + (n - 1) * width  # real items and the slots between them
  kept = np.minimum(total, max_len)
  # Real items sit at multiples of (w + 1); those in the kept tail [total - kept, total) have targets.
  real = n - -(-(total - kept) // (width + 1))
  return np.maximum(n, kept), real


class _EpochBatches:
  """Assembles batch ``b`` of one epoch from its packing plan, reading only the records of this process's rows
  (picklable for Grain workers)."""

  def __init__(
    self,
    source: Any,
    records: np.ndarray,
    lengths: np.ndarray,
    users: np.ndarray,
    place: packing.Placement,
    *,
    max_len: int,
    rows_per_batch: int,
    row_len: int,
    prompt_mode: str | None = None,
    prompt_width: int = 1,
    row_range: tuple[int, int] | None = None,
  ):
    self._row_range = (0, rows_per_batch) if row_range is None else row_range
    self._source = source  # indexed record source (``gather``)
    self._records = records  # [N] epoch order: record index of each user in the source
    self._lengths = lengths  # [N] epoch order: span of each user
    self._users = users  # [N] epoch order
    self._place = place
    self._max_len = max_len
    self._rows_per_batch = rows_per_batch
    self._row_len = row_len
    self._prompt_mode, self._prompt_width = prompt_mode, prompt_width

  def _tokens(self, items: np.ndarray, n: np.ndarray) -> dict[str, np.ndarray]:
    """The concatenated train examples (or prompt examples) of sequences ``items`` (concatenated) of lengths ``n``."""
    n = n.astype(np.int64)
    m = np.minimum(n - 3, self._max_len)  # inputs x[:-3][-max_len:], targets x[1:-2][-max_len:]
    first = np.cumsum(n) - n + (n - 3 - m)  # [k] where each input window starts in ``items``
    src = np.repeat(first - (np.cumsum(m) - m), m) + np.arange(m.sum())
    inputs, targets = items[src], items[src + 1]
    if self._prompt_mode is None:
      return {"items": inputs, "targets": targets}
    ends = np.cumsum(m)
    parts = [
      prompts.prompt_example(inputs[a:b], targets[a:b], self._prompt_mode, self._prompt_width, self._max_len)
      for a, b in zip((ends - m).tolist(), ends.tolist(), strict=True)
    ]
    if not parts:
      return {k: np.zeros(0, np.int32) for k in prompts.PROMPT_TOKEN_KEYS}
    return {k: np.concatenate([p[k] for p in parts]) for k in prompts.PROMPT_TOKEN_KEYS}

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    lo, hi = int(self._place.bounds[b]), int(self._place.bounds[b + 1])
    first_row, end_row = self._row_range
    # Only the sequences packed into this process's rows are read and assembled.
    mine = np.flatnonzero((self._place.row[lo:hi] >= first_row) & (self._place.row[lo:hi] < end_row)) + lo
    items, n = self._source.gather(self._records[mine])
    tokens = self._tokens(items, np.asarray(n))
    per_sequence = {"users": self._users[mine]}
    if self._prompt_mode is not None:
      per_sequence["span_col"] = self._place.col[mine]
    batch = packing.scatter_rows(
      self._lengths[mine],
      self._place.row[mine] - first_row,
      self._place.col[mine],
      self._place.seq_id[mine],
      tokens,
      per_sequence,
      rows_per_batch=end_row - first_row,
      row_len=self._row_len,
    )
    return prompts.finish_prompt_batch(batch) if self._prompt_mode is not None else batch


class EpochIterator(Iterator[dict[str, np.ndarray]]):
  """Iterator over one epoch's batches with JSON-serialisable ``get_state``/``set_state``.

  The state records the pipeline configuration and epoch, so restoring it into an iterator of another
  epoch or configuration raises ``errors.ConfigError`` instead of silently yielding other batches.
  """

  def __init__(self, iterator: grain.DatasetIterator, fingerprint: dict[str, Any]):
    self._iterator = iterator
    self._fingerprint = fingerprint

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """Returns the position after the last yielded batch."""
    return {"pipeline": self._fingerprint, "grain": self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position from ``get_state`` of an iterator of the same epoch and configuration."""
    if state.get("pipeline") != self._fingerprint:
      raise errors.ConfigError(f"input state of {state.get('pipeline')} cannot resume the pipeline {self._fingerprint}")
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    """Releases worker processes, if any."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


class TrainInput:
  """Packed training batches, one deterministic order per ``(seed, epoch)``.

  Every user with at least ``split.MIN_ITEMS`` items appears exactly once per epoch; batches have the
  fixed shape ``[rows_per_batch, row_len]`` (the last one padded with empty rows).

  Args:
    source: record source (see ``RecordSource``).
    max_len: model window; each user's train example is cut to its last ``max_len`` items.
    row_len: positions per packed row, at least ``max_len``.
    rows_per_batch: rows per batch.
    seed: shuffle seed (non-negative).
    num_workers: Grain worker processes (0 = in-process; workers need absl flags parsed).
    prompt_mode: None for pre-training batches; ``'last'`` or ``'interleave'`` for prompt-tuning batches
      (see ``recgpt_jax.data.prompts``: each user's span holds a real and a prompted view).
    prompt_width: prompt width ``w`` of the prompt modes.
    process_index: this process (multi-host runs): every process computes the same packing plan of the
      whole batch and assembles only its block of ``rows_per_batch / process_count`` consecutive rows,
      the process-local part of the global batch (``jax.make_array_from_process_local_data``).
    process_count: number of processes; must divide ``rows_per_batch``.

  Attributes:
    num_users: users with a training example.
    num_tokens: real target tokens per epoch.
  """

  def __init__(
    self,
    source: RecordSource,
    *,
    max_len: int,
    row_len: int,
    rows_per_batch: int,
    seed: int,
    num_workers: int = 0,
    prompt_mode: str | None = None,
    prompt_width: int = 1,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if process_count < 1 or not 0 <= process_index < process_count or rows_per_batch % process_count:
      raise errors.ConfigError(
        f"rows_per_batch={rows_per_batch} must split evenly over {process_count} processes"
        f" (process_index={process_index})"
      )
    local_rows = rows_per_batch // process_count
    self.row_range = (process_index * local_rows, (process_index + 1) * local_rows)
    if prompt_mode is not None and (prompt_mode not in prompts.PROMPT_MODES or prompt_width < 1):
      raise errors.ConfigError(
        f"prompt mode must be one of {prompts.PROMPT_MODES} with width >= 1, got {prompt_mode!r}, {prompt_width}"
      )
    if max_len < 1 or row_len < max_len or rows_per_batch < 1 or seed < 0 or num_workers < 0:
      raise errors.ConfigError(
        f"invalid train input sizes: max_len={max_len}, row_len={row_len} (must be >= max_len),"
        f" rows_per_batch={rows_per_batch}, seed={seed}, num_workers={num_workers}"
      )
    self.max_len, self.row_len, self.rows_per_batch = max_len, row_len, rows_per_batch
    self.seed, self.num_workers = seed, num_workers
    self._source = _indexed(source)
    storage = np.argsort(self._source.users, kind="stable")  # storage order: by user id
    full = self._source.lengths[storage].astype(np.int64)  # [U] whole sequence lengths
    keep = full >= split.MIN_ITEMS
    self._records = storage[keep]  # [N] record index of each training user, storage order
    self._users = self._source.users[self._records].astype(np.int32)  # [N]
    self.prompt_mode, self.prompt_width = prompt_mode, prompt_width
    n = np.minimum(full[keep] - 3, max_len)  # [N] train example lengths
    self._lengths, loss_tokens = _span_lengths(n, max_len, prompt_mode, prompt_width)  # [N] span per user
    self.num_users = int(len(self._users))
    self.num_tokens = int(loss_tokens.sum())
    self._last_plan: tuple[int, np.ndarray, packing.Placement] | None = None

  def _fingerprint(self, epoch: int) -> dict[str, Any]:
    return {
      "seed": self.seed,
      "epoch": epoch,
      "max_len": self.max_len,
      "row_len": self.row_len,
      "rows_per_batch": self.rows_per_batch,
      "num_users": self.num_users,
      "num_workers": self.num_workers,
      "prompt_mode": self.prompt_mode,
      "prompt_width": self.prompt_width,  # The Grain state layout differs with worker processes.
    }

  def _plan(self, epoch: int) -> tuple[np.ndarray, packing.Placement]:
    """Returns ``(order [N], placement)``: the epoch's user order and where each user is packed."""
    if epoch < 0:
      raise errors.ConfigError(f"epoch must be non-negative, got {epoch}")
    if self._last_plan is None or self._last_plan[0] != epoch:
      order = np.random.default_rng([self.seed, epoch]).permutation(self.num_users)  # [N]
      place = packing.first_fit(self._lengths[order], row_len=self.row_len, rows_per_batch=self.rows_per_batch)
      self._last_plan = (epoch, order, place)
    return self._last_plan[1], self._last_plan[2]

  def steps_per_epoch(self, epoch: int) -> int:
    """Exact number of batches of ``epoch`` (computes its packing plan, ~50 ms for Beauty)."""
    return self._plan(epoch)[1].num_batches

  def assembler(self, epoch: int) -> _EpochBatches:
    """``assembler(b)`` is batch ``b`` of ``epoch`` (this process's rows), without Grain."""
    order, place = self._plan(epoch)
    return _EpochBatches(
      self._source,
      self._records[order],
      self._lengths[order],
      self._users[order],
      place,
      max_len=self.max_len,
      rows_per_batch=self.rows_per_batch,
      row_len=self.row_len,
      prompt_mode=self.prompt_mode,
      prompt_width=self.prompt_width,
      row_range=self.row_range,
    )

  def dataset(self, epoch: int) -> grain.MapDataset:
    """Random-access Grain dataset of the batches of ``epoch``."""
    return grain.MapDataset.range(self._plan(epoch)[1].num_batches).map(self.assembler(epoch))

  def epoch_iterator(self, epoch: int) -> EpochIterator:
    """Iterator over the batches of ``epoch``; deterministic given ``(seed, epoch)`` and resumable."""
    # In-memory data: reading threads would only contend for the GIL.
    ds = self.dataset(epoch).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if self.num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return EpochIterator(iter(ds), self._fingerprint(epoch))


def eval_batches(
  source: RecordSource,
  stage: str,
  *,
  max_len: int,
  row_len: int,
  rows_per_batch: int,
  users_per_batch: int,
) -> list[dict[str, np.ndarray]]:
  """Packed evaluation batches of ``stage`` (``'valid'`` or ``'test'``), users ordered by user id.

  Args:
    source: record source (see ``RecordSource``).
    stage: evaluation stage.
    max_len: model window.
    row_len: positions per packed row, at least ``max_len``.
    rows_per_batch: rows per batch.
    users_per_batch: user slots per batch.

  Returns:
    The batches of ``packing.pack_eval_batches``.
  """
  if row_len < max_len:
    raise errors.ConfigError(f"row_len={row_len} must be >= max_len={max_len}")
  users, sequences = read_source(source)
  eval_set = split.make_eval_set(users, sequences, stage, max_len)
  return packing.pack_eval_batches(
    eval_set, row_len=row_len, rows_per_batch=rows_per_batch, users_per_batch=users_per_batch
  )
