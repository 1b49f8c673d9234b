"""Tests of the packed training pipeline, the TFDS builder and packed eval input (recgpt_jax.data)."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pytest

from recgpt_jax import errors
from recgpt_jax.data import packing, pipeline, split, tfds_builder

BUNDLED_DIR = pathlib.Path(tfds_builder.__file__).parent / "bundled"
MAX_LEN, ROW_LEN, ROWS, SEED = 50, 64, 23, 7


def read_bundled(name: str) -> tuple[np.ndarray, list[np.ndarray]]:
  """Reads ``users [U], sequences`` straight from a bundled ``.txt.gz`` file."""
  users, sequences = [], []
  with gzip.open(BUNDLED_DIR / f"{name}.txt.gz", "rt") as f:
    for line in f:
      user, *items = line.split()
      users.append(int(user))
      sequences.append(np.array(items, dtype=np.int32))
  return np.array(users, dtype=np.int32), sequences


@pytest.fixture(scope="module")
def beauty() -> tuple[np.ndarray, list[np.ndarray]]:
  return read_bundled("Beauty")


@pytest.fixture(scope="module")
def train_input(beauty) -> pipeline.TrainInput:
  source = tfds_builder.InMemorySource(*beauty)
  return pipeline.TrainInput(source, max_len=MAX_LEN, row_len=ROW_LEN, rows_per_batch=ROWS, seed=SEED)


def unpack(batches: list[dict[str, np.ndarray]], rows: int, row_len: int) -> dict[int, tuple]:
  """Checks the packed layout and returns ``user -> (items, targets)`` of every packed user."""
  found = {}
  for batch in batches:
    assert set(batch) == set(pipeline.TRAIN_KEYS)
    for value in batch.values():
      assert value.shape == (rows, row_len) and value.dtype == np.int32
    assert not batch["segments"].any()
    real = batch["seq_ids"] > 0
    for key in ("items", "targets", "users", "positions"):
      assert not batch[key][~real].any(), f"{key} must be 0 on padding"
    assert batch["items"][real].all() and batch["targets"][real].all() and batch["users"][real].all()
    for r in range(rows):
      seq_ids_r = batch["seq_ids"][r]
      num_real = int(np.count_nonzero(seq_ids_r))
      assert not seq_ids_r[num_real:].any(), "padding must only trail the row"
      if not num_real:
        continue
      starts = [0] + [c for c in range(1, num_real) if seq_ids_r[c] != seq_ids_r[c - 1]]
      np.testing.assert_array_equal(seq_ids_r[starts], np.arange(1, len(starts) + 1))
      for start, stop in zip(starts, starts[1:] + [num_real], strict=True):
        users = batch["users"][r, start:stop]
        assert np.all(users == users[0])
        np.testing.assert_array_equal(batch["positions"][r, start:stop], np.arange(stop - start))
        assert int(users[0]) not in found, "a user appears twice in one epoch"
        found[int(users[0])] = (batch["items"][r, start:stop], batch["targets"][r, start:stop])
  return found


def test_epoch_has_every_user_once_in_order(beauty, train_input):
  users, sequences = beauty
  batches = list(train_input.epoch_iterator(0))
  found = unpack(batches, ROWS, ROW_LEN)
  assert sorted(found) == sorted(users.tolist())
  for user, seq in zip(users.tolist(), sequences, strict=True):
    inputs, targets = split.train_example(seq, MAX_LEN)
    np.testing.assert_array_equal(found[user][0], inputs)
    np.testing.assert_array_equal(found[user][1], targets)
  assert train_input.num_users == len(users)
  assert train_input.num_tokens == sum(len(split.train_example(s, MAX_LEN)[1]) for s in sequences)
  assert sum(int((b["seq_ids"] > 0).sum()) for b in batches) == train_input.num_tokens
  assert train_input.steps_per_epoch(0) == len(batches)
  assert packing.real_fraction(batches) > 0.95


def test_short_users_dropped_and_last_batch_padded():
  lengths = [1, 2, 3, 4, 5, 6, 12, 3, 9, 4, 7, 8]
  sequences = [np.arange(1, n + 1, dtype=np.int32) + 10 * u for u, n in enumerate(lengths)]
  users = np.arange(100, 100 + len(lengths))
  source = tfds_builder.InMemorySource(users, sequences)
  train = pipeline.TrainInput(source, max_len=6, row_len=6, rows_per_batch=2, seed=0)
  kept = {int(u): s for u, s in zip(users, sequences, strict=True) if len(s) >= split.MIN_ITEMS}
  assert train.num_users == len(kept)
  for epoch in range(3):
    batches = list(train.epoch_iterator(epoch))
    found = unpack(batches, rows=2, row_len=6)
    assert sorted(found) == sorted(kept)
    for user, (inputs, targets) in found.items():
      want = split.train_example(kept[user], 6)
      np.testing.assert_array_equal(inputs, want[0])
      np.testing.assert_array_equal(targets, want[1])
    assert len(batches) == train.steps_per_epoch(epoch)


def test_determinism_and_epoch_orders(beauty, train_input):
  again = pipeline.TrainInput(
    tfds_builder.InMemorySource(*beauty), max_len=MAX_LEN, row_len=ROW_LEN, rows_per_batch=ROWS, seed=SEED
  )
  first = list(train_input.epoch_iterator(1))
  second = list(again.epoch_iterator(1))
  assert len(first) == len(second)
  for a, b in zip(first, second, strict=True):
    for key in pipeline.TRAIN_KEYS:
      np.testing.assert_array_equal(a[key], b[key])
  other_epoch = next(train_input.epoch_iterator(2))
  assert not np.array_equal(first[0]["users"], other_epoch["users"])
  other_seed = pipeline.TrainInput(
    tfds_builder.InMemorySource(*beauty), max_len=MAX_LEN, row_len=ROW_LEN, rows_per_batch=ROWS, seed=SEED + 1
  )
  assert not np.array_equal(first[0]["users"], next(other_seed.epoch_iterator(1))["users"])


@pytest.mark.parametrize("consumed", [0, 5, 60])
def test_resume_mid_epoch(beauty, train_input, consumed):
  iterator = train_input.epoch_iterator(3)
  for _ in range(consumed):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # Must survive a JSON round trip.
  rest = list(iterator)
  # A fresh pipeline, as after a restart.
  fresh = pipeline.TrainInput(
    tfds_builder.InMemorySource(*beauty), max_len=MAX_LEN, row_len=ROW_LEN, rows_per_batch=ROWS, seed=SEED
  )
  resumed = fresh.epoch_iterator(3)
  resumed.set_state(state)
  resumed_rest = list(resumed)
  assert len(rest) == len(resumed_rest) == train_input.steps_per_epoch(3) - consumed
  for a, b in zip(rest, resumed_rest, strict=True):
    for key in pipeline.TRAIN_KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def test_resume_rejects_other_epoch(train_input):
  iterator = train_input.epoch_iterator(3)
  next(iterator)
  with pytest.raises(errors.ConfigError):
    train_input.epoch_iterator(4).set_state(iterator.get_state())


def test_config_errors(beauty):
  source = tfds_builder.InMemorySource(*beauty)
  with pytest.raises(errors.ConfigError):
    pipeline.TrainInput(source, max_len=50, row_len=40, rows_per_batch=8, seed=0)
  with pytest.raises(errors.DataError):
    tfds_builder.InMemorySource([1, 2], [np.array([1, 2, 3, 4])])


def test_tfds_build_and_read_back(tmp_path, beauty, train_input):
  # The leftover of a build killed midway is removed by the next build (which holds the build lock).
  leftover = tmp_path / "rec_sequences" / "beauty" / "incomplete.ABC123_1.0.0"
  leftover.mkdir(parents=True)
  (leftover / "part").write_text("partial")
  source, info = tfds_builder.data_source("beauty", data_dir=tmp_path)
  assert not leftover.exists()
  assert info.name == "rec_sequences" and info.config_name == "beauty"
  users, sequences = beauty
  assert len(source) == len(users)
  got_users, got_sequences = pipeline.read_source(source)
  order = np.argsort(users)
  np.testing.assert_array_equal(got_users, users[order])
  for got, i in zip(got_sequences, order, strict=True):
    np.testing.assert_array_equal(got, sequences[i])
  # Reopening reuses the build; the pipeline does not depend on the source's record order.
  again, _ = tfds_builder.data_source("BEAUTY", data_dir=tmp_path)
  from_tfds = pipeline.TrainInput(again, max_len=MAX_LEN, row_len=ROW_LEN, rows_per_batch=ROWS, seed=SEED)
  a, b = next(from_tfds.epoch_iterator(0)), next(train_input.epoch_iterator(0))
  for key in pipeline.TRAIN_KEYS:
    np.testing.assert_array_equal(a[key], b[key])


def test_tfds_dataset_names():
  assert tfds_builder.canonical_name("toys") == "Toys_and_Games"
  assert tfds_builder.canonical_name("SPORTS_and_outdoors") == "Sports_and_Outdoors"
  assert tfds_builder.canonical_name("yelp") == "Yelp"


def test_tfds_rejects_unknown_dataset(tmp_path):
  with pytest.raises(errors.DataError, match="bundled"):
    tfds_builder.data_source("/data/my_file.txt", data_dir=tmp_path)


def test_eval_batches_from_source(beauty):
  users, sequences = beauty
  source = tfds_builder.InMemorySource(users[:500], sequences[:500])
  got = pipeline.eval_batches(source, "valid", max_len=20, row_len=32, rows_per_batch=8, users_per_batch=64)
  order = np.argsort(users[:500])
  eval_set = split.make_eval_set(users[:500][order], [sequences[i] for i in order], "valid", 20)
  want = packing.pack_eval_batches(eval_set, row_len=32, rows_per_batch=8, users_per_batch=64)
  assert len(got) == len(want)
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("prompt_mode", [None, "interleave"])
def test_process_local_rows_make_up_the_global_batch(beauty, prompt_mode):
  """Each of 4 processes assembles its own block of rows; stacked, they are the 1-process batch."""
  source = tfds_builder.InMemorySource(*beauty)
  kwargs = dict(max_len=MAX_LEN, row_len=ROW_LEN, rows_per_batch=24, seed=SEED, prompt_mode=prompt_mode)
  whole = pipeline.TrainInput(source, **kwargs).dataset(1)
  parts = [pipeline.TrainInput(source, **kwargs, process_index=p, process_count=4).dataset(1) for p in range(4)]
  for b in (0, 5, len(whole) - 1):
    local = [part[b] for part in parts]
    assert {x["items"].shape for x in local} == {(6, ROW_LEN)}
    for name, value in whole[b].items():
      np.testing.assert_array_equal(np.concatenate([x[name] for x in local]), value, err_msg=name)
  with pytest.raises(errors.ConfigError, match="split evenly over 5 processes"):
    pipeline.TrainInput(source, **kwargs, process_index=0, process_count=5)
