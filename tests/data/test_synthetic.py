"""The synthetic log generator: exact size, heavy-tailed popularity and activity, sessions with a learnable
signal, time order, raw ids the reader maps back, and no file left by an interrupted write."""

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from recgpt_jax.data import io, synthetic
from recgpt_jax.errors import UserError

SHAPE = synthetic.LogShape(interactions=60_000, items=3_000, seed=3)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
  path = tmp_path_factory.mktemp("syn") / "log.parquet"
  summary = synthetic.write_log(path, SHAPE, chunk_rows=7_000)  # several chunks and row groups
  return path, summary, pq.read_table(path).to_pydict()


def test_user_lengths_sum_to_the_total_within_bounds():
  rng = np.random.default_rng(0)
  for total in (5, 6, 999, 100_003):
    lengths = synthetic.user_lengths(synthetic.LogShape(interactions=total, items=10), rng)
    assert lengths.sum() == total
    assert lengths.min() >= 5 and lengths.max() <= 2000


def test_log_shape(log):
  path, summary, cols = log
  assert summary["interactions"] == len(cols["user"]) == SHAPE.interactions
  assert len(set(cols["user"])) == summary["users"]
  items, counts = np.unique(cols["item"], return_counts=True)
  assert len(items) <= SHAPE.items
  counts = np.sort(counts)[::-1]
  # Zipf(1) over 3000 items: the top item has ~1/H_3000 ~ 11.5% of the popularity draws (about half the rows are
  # popularity draws, the rest walk the topic order), the top 1% of items far more than 1% of the rows.
  assert 0.03 < counts[0] / counts.sum() < 0.12
  assert counts[: SHAPE.items // 100].sum() / counts.sum() > 0.15
  per_user = np.unique(cols["user"], return_counts=True)[1]
  assert per_user.min() >= 5 and per_user.max() > 10 * np.median(per_user)  # heavy-tailed activity


def test_rows_are_not_sorted_but_each_user_is_in_time(log):
  _, _, cols = log
  users, stamps = np.asarray(cols["user"]), np.asarray(cols["timestamp"])
  assert (users[1:] != users[:-1]).mean() > 0.9  # shuffled within chunks
  order = np.lexsort((stamps, users))
  gaps = np.diff(stamps[order])[users[order][1:] == users[order][:-1]]
  assert (gaps >= 0).all()
  # Sessions: most gaps are minutes, some are days.
  assert np.median(gaps) < 600 and (gaps > 24 * 3600).mean() > 0.05


def test_the_reader_maps_raw_ids_back(log, tmp_path):
  """Written as CSV, the log reads back through ``io.read_interactions`` with its default columns: every
  interaction, every user, and each user's sequence in time order."""
  _, _, cols = log
  csv_path = tmp_path / "log.csv"
  synthetic.write_log(csv_path, SHAPE, chunk_rows=7_000)
  data = io.read_interactions(csv_path)
  assert sum(len(s) for s in data.sequences) == SHAPE.interactions
  assert data.num_users == len(set(cols["user"]))
  inverse = {v: k for k, v in data.item_map.items()}
  first_user = min(data.user_map, key=data.user_map.get)
  rows = [i for i, u in enumerate(cols["user"]) if u == first_user]
  want = [cols["item"][i] for i in sorted(rows, key=lambda i: cols["timestamp"][i])]
  got = [inverse[i] for i in data.sequences[0].tolist()]
  assert sorted(got) == sorted(want)  # equal up to the order of equal timestamps


def test_sessions_carry_a_sequential_signal(log):
  """Within a session, about ``coherence`` of the next items are within 4 places of the previous one in the hidden
  topic order; across the catalogue a random pair is that close with probability 8/3000."""
  _, _, cols = log
  rng = np.random.default_rng(SHAPE.seed)
  synthetic.user_lengths(SHAPE, rng)
  cat = synthetic._Catalogue(SHAPE, rng)  # the same draws as write_log: the same hidden order
  index = {f"i{raw}": i for i, raw in enumerate(cat.raw.tolist())}
  users, stamps = np.asarray(cols["user"]), np.asarray(cols["timestamp"])
  items = np.array([index[i] for i in cols["item"]])
  order = np.lexsort((stamps, users))
  same_user = users[order][1:] == users[order][:-1]
  minutes_apart = np.diff(stamps[order]) < 3600
  pos = cat.position[items[order]]
  dist = np.abs(np.diff(pos))
  dist = np.minimum(dist, SHAPE.items - dist)
  near = (dist >= 1) & (dist <= 4)
  rate = near[same_user & minutes_apart].mean()
  assert 0.35 < rate < 0.6, rate


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
  path = tmp_path / "log.parquet"

  def boom(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(synthetic, "_chunk", boom)
  with pytest.raises(KeyboardInterrupt):
    synthetic.write_log(path, SHAPE)
  assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_one_line_errors(tmp_path):
  with pytest.raises(UserError, match="extension"):
    synthetic.write_log(tmp_path / "log.json", SHAPE)
  with pytest.raises(UserError, match="at least 2 items"):
    synthetic.LogShape(interactions=100, items=1)
  out = subprocess.run(
    [sys.executable, "-m", "recgpt_jax.data.synthetic", "--items=10", f"--out={tmp_path / 'x.csv'}"],
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2 and out.stderr.strip() == "error: --interactions must be given"
