"""The prepared store (recgpt_jax.data.store): what it holds equals what the log reader gives, training input read
record by record from it equals the in-memory input (also per process), and a build is all or nothing."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from recgpt_jax.data import io, pipeline, split, store, synthetic
from recgpt_jax.errors import ConfigError, DataError

SHAPE = synthetic.LogShape(interactions=20_000, items=1_500, seed=5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("store")
  log = root / "log.parquet"
  synthetic.write_log(log, SHAPE)
  meta = store.build(log, root / "s", progress=False)
  return log, root / "s", meta, io.load_dataset(log)


def test_store_holds_the_log(built):
  log, path, meta, data = built
  s = store.open_store(path)
  assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (
    len(data.users),
    data.num_items,
    data.num_interactions,
  )
  np.testing.assert_array_equal(s.lengths, [len(q) for q in data.sequences])
  items, lengths = s.record_source().gather(np.arange(s.num_users))
  np.testing.assert_array_equal(items, np.concatenate(data.sequences))
  np.testing.assert_array_equal(lengths, s.lengths)
  # A random subset, out of order.
  pick = np.random.default_rng(0).permutation(s.num_users)[:50]
  items, _ = s.record_source().gather(pick)
  np.testing.assert_array_equal(items, np.concatenate([data.sequences[i] for i in pick]))
  # Training-split item counts: items[:-2] of every user with a train example.
  seen = np.concatenate([q[:-2] for q in data.sequences if len(q) >= split.MIN_ITEMS])
  expect = np.bincount(seen, minlength=data.num_items + 1)
  expect[0] = 0
  np.testing.assert_array_equal(s.item_counts, expect)
  assert json.loads((path / io.USER_MAP_FILE).read_text()) == data.user_map


@pytest.mark.parametrize("prompt_mode", [None, "interleave"])
def test_train_input_from_the_store_equals_in_memory(built, prompt_mode):
  """Batches assembled from records read on demand equal those of the in-memory source; with two processes each
  process reads only its rows, and together they make up the same global batch."""
  _, path, _, data = built
  kw = dict(max_len=20, row_len=32, rows_per_batch=8, seed=1, prompt_mode=prompt_mode, prompt_width=2)
  memory = pipeline.TrainInput(pipeline.ArraySource.from_data(data), **kw)
  disk = pipeline.TrainInput(store.open_store(path).record_source(), **kw)
  halves = [
    pipeline.TrainInput(store.open_store(path).record_source(), **kw, process_index=p, process_count=2)
    for p in range(2)
  ]
  assert (disk.num_users, disk.num_tokens) == (memory.num_users, memory.num_tokens)
  for epoch in (0, 1):
    assert disk.steps_per_epoch(epoch) == memory.steps_per_epoch(epoch)
    for b in (0, 3, disk.steps_per_epoch(epoch) - 1):
      want, got = memory.assembler(epoch)(b), disk.assembler(epoch)(b)
      parts = [h.assembler(epoch)(b) for h in halves]
      assert want.keys() == got.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k], err_msg=k)


def test_num_tokens_counts_the_loss_tokens(built):
  """``num_tokens`` comes from the lengths alone; it must equal the loss tokens of a whole epoch's batches."""
  _, path, _, _ = built
  for mode, key in ((None, "targets"), ("last", "p_targets"), ("interleave", "p_targets")):
    ti = pipeline.TrainInput(
      store.open_store(path).record_source(),
      max_len=12,
      row_len=40,
      rows_per_batch=16,
      seed=0,
      prompt_mode=mode,
      prompt_width=3,
    )
    assemble = ti.assembler(0)
    assert ti.num_tokens == sum(int(np.count_nonzero(assemble(b)[key])) for b in range(ti.steps_per_epoch(0)))


def test_an_existing_store_is_never_overwritten(built):
  log, path, _, _ = built
  before = sorted(p.name for p in path.iterdir())
  with pytest.raises(DataError, match="already exists"):
    store.build(log, path, progress=False)
  assert sorted(p.name for p in path.iterdir()) == before
  store.open_store(path)


def test_a_failed_build_leaves_nothing(built, tmp_path, monkeypatch):
  log = built[0]

  def fail(data_dir, *args):
    os.makedirs(data_dir / "half", exist_ok=True)
    raise RuntimeError("disk full")

  monkeypatch.setattr(store, "_write_tfds", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    store.build(log, tmp_path / "s", progress=False)
  assert os.listdir(tmp_path) == [".s.lock"]


def _kill_when(cmd: list[str], root, pattern: str) -> None:
  """Runs ``cmd`` and SIGKILLs it as soon as ``root.glob(pattern)`` finds something (the build is midway)."""
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not list(root.glob(pattern)) and time.time() < deadline:
    assert proc.poll() is None, "the build ended before it could be killed"
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def test_a_killed_build_leaves_no_store_and_the_next_build_cleans_up(tmp_path):
  log = tmp_path / "log.parquet"
  synthetic.write_log(log, synthetic.LogShape(interactions=300_000, items=20_000, seed=1))
  out = tmp_path / "s"
  _kill_when(
    [sys.executable, "-m", "recgpt_jax.data.store", f"--log={log}", f"--out={out}"], tmp_path, ".s.staging-*/input"
  )
  assert not out.exists()
  assert list(tmp_path.glob(".s.staging-*"))  # the half-written build, which no reader opens
  with pytest.raises(DataError, match="not a readable store"):
    store.open_store(next(tmp_path.glob(".s.staging-*")))
  store.build(log, out, progress=False)
  assert not list(tmp_path.glob(".s.staging-*"))
  assert store.open_store(out).meta["num_interactions"] == 300_000


def test_a_record_that_does_not_match_the_index_is_an_error(built, tmp_path):
  _, path, _, _ = built
  s = store.open_store(path)
  shifted = store.Store(path=s.path, meta=s.meta, lengths=s.lengths + 1, item_counts=s.item_counts)
  with pytest.raises(DataError, match="record 0 holds user 1 with .* the index says user 1 with"):
    shifted.record_source().gather(np.array([0]))


def _bad_logs(tmp_path, good_log) -> dict:
  """name -> (path, what the error line must contain) for the bad inputs of the acceptance."""
  import gzip

  import pyarrow as pa
  import pyarrow.parquet as pq

  bad = {}
  p = tmp_path / "no_time.csv"
  p.write_text("user,item\n1,2\n")
  bad["missing column"] = (p, "no time column 'timestamp'")
  p = tmp_path / "stamps.csv"
  p.write_text("user,item,timestamp\nu1,a,1\nu1,b,2\nu2,a,yesterday\n")
  bad["unparsable timestamp"] = (p, f"{p}:4: timestamp")
  p = tmp_path / "latin1.csv"
  p.write_bytes("user,item,timestamp\nu1,a,1\nu\xe9,b,2\n".encode("latin-1"))
  bad["non-UTF-8 bytes"] = (p, f"{p}:3:")
  p = tmp_path / "truncated.parquet"
  whole = pa.BufferOutputStream()
  pq.write_table(pq.read_table(good_log), whole)
  data = whole.getvalue().to_pybytes()
  p.write_bytes(data[: len(data) // 2])
  bad["truncated Parquet"] = (p, str(p))
  p = tmp_path / "truncated.csv.gz"
  p.write_bytes(gzip.compress(b"user,item,timestamp\n" + b"u1,a,1\n" * 20000)[:-200])
  bad["truncated gzip"] = (p, str(p))
  return bad


def test_cli_bad_input_is_one_line_exit_2_and_damages_nothing(built, tmp_path):
  """Each bad log: one line naming the file (and the line, where there is one), exit 2, no store created; a build
  that targets an existing store is refused, and that store is untouched throughout."""
  log, path, _, _ = built
  before = {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
  cases = [(what, bad, expect, tmp_path / "new") for what, (bad, expect) in _bad_logs(tmp_path, log).items()]
  cases.append(("existing store", cases[0][1], "already exists", path))  # refused before the log is read
  cases.append(("unwritable output", log, "cannot build /sys/recgpt/s", pathlib.Path("/sys/recgpt/s")))
  for what, bad, expect, out in cases:
    proc = subprocess.run(
      [sys.executable, "-m", "recgpt_jax.data.store", f"--log={bad}", f"--out={out}"], capture_output=True, text=True
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (what, proc.stderr)
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), (what, proc.stderr)
    assert expect in lines[-1] and (str(bad) in lines[-1] or str(out) in lines[-1]), (what, lines[-1])
    assert len([ln for ln in lines if ln.startswith("error")]) == 1, (what, proc.stderr)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.staging-*"))
  assert {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} == before


def _beam_build_cmd(log, out):
  return [sys.executable, "-m", "recgpt_jax.data.store", f"--log={log}", f"--out={out}", "--beam_runner=DirectRunner"]


def test_beam_build_equals_the_plain_build(built, tmp_path):
  """With Apache Beam installed (``make test-beam``: Python 3.11), the DirectRunner build writes the same records in
  the same order and the same index; a Beam build killed midway leaves no store."""
  pytest.importorskip("apache_beam")
  log, path, _, _ = built
  out = tmp_path / "beam"
  proc = subprocess.run(_beam_build_cmd(log, out), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  plain, beam = store.open_store(path), store.open_store(out)
  assert beam.meta["builder"] == "beam:DirectRunner"
  np.testing.assert_array_equal(beam.lengths, plain.lengths)
  np.testing.assert_array_equal(beam.item_counts, plain.item_counts)
  every = np.arange(plain.num_users)
  for got, want in zip(beam.record_source().gather(every), plain.record_source().gather(every), strict=True):
    np.testing.assert_array_equal(got, want)

  killed = tmp_path / "killed"
  _kill_when(_beam_build_cmd(log, killed), tmp_path, ".killed.staging-*/tfds")
  assert not killed.exists()


def test_a_run_on_the_store_sees_the_data_of_the_log(built):
  """``--config.dataset=<store>`` gives the run what the log itself gives (training input, evaluation sets, item
  counts); ``eval.max_users`` evaluates a fixed sample of the users, the same every time."""
  from recgpt_jax.train import loop, stages
  from tests.helpers import tiny_config

  log, path, _, _ = built
  pre = stages.get("pretrain")
  from_log = loop.build_data(tiny_config(log), pre)
  from_store = loop.build_data(tiny_config(path), pre)
  assert from_store.train_input.num_tokens == from_log.train_input.num_tokens
  np.testing.assert_array_equal(from_store.item_counts, from_log.item_counts)
  for name in split.STAGES:
    a, b = from_log.eval_sets[name], from_store.eval_sets[name]
    np.testing.assert_array_equal(a.users, b.users)
    np.testing.assert_array_equal(a.answers, b.answers)
    assert all(np.array_equal(x, y) for x, y in zip(a.histories, b.histories, strict=True))
  sampled = [loop.build_data(tiny_config(path, **{"eval.max_users": 100}), pre).eval_sets["test"] for _ in range(2)]
  np.testing.assert_array_equal(sampled[0].users, sampled[1].users)
  assert len(sampled[0].users) == 100 and set(sampled[0].users) <= set(from_log.eval_sets["test"].users.tolist())
  test = from_log.eval_sets["test"]
  full = dict(zip(test.users.tolist(), test.answers.tolist(), strict=True))
  assert [full[u] for u in sampled[0].users.tolist()] == sampled[0].answers.tolist()
  with pytest.raises(ConfigError, match="k_core and data_format apply"):
    loop.build_data(tiny_config(path, k_core=5), pre)


def test_recommendations_from_a_model_trained_on_the_store(built, tmp_path):
  """Serving from a store: raw ids map through the store's id maps and histories are read from its records."""
  from recgpt_jax import recommend
  from recgpt_jax.train import loop
  from tests.helpers import tiny_config

  _, path, _, data = built
  cfg = tiny_config(path, **{"train.max_steps": 2, "eval.max_users": 64, "recall.quotas": (8, 4)})
  loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  rec = recommend.Recommender(cfg, tmp_path / "run")
  raw = sorted(data.user_map)[:3]
  dense = [data.user_map[r] for r in raw]
  assert [rec.user_id(r) for r in raw] == dense
  out = rec.for_users(raw)
  assert out.items.shape == (3, 12)
  for u, items in zip(dense, out.items, strict=True):
    history = data.sequences[u - 1]
    np.testing.assert_array_equal(rec._sequences[u], history)
    assert len(set(items.tolist())) == 12 and not set(items.tolist()) & set(history.tolist())
