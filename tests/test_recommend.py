"""Serving: recommendations from a trained run, exports, and rejected requests."""

import csv

import numpy as np
import pytest

from recgpt_jax import recommend
from recgpt_jax.errors import UserError
from recgpt_jax.train import loop
from tests.helpers import tiny_config, write_cyclic_dataset
from tests.test_cli import DEFAULT_CONFIG, TINY, assert_one_line_error, cli


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  base = tmp_path_factory.mktemp("serve")
  data = write_cyclic_dataset(base / "cyclic.txt")
  cfg = tiny_config(data, **{"train.num_epochs": 3, "recall.quotas": (8, 4)})
  loop.train_and_evaluate(cfg, str(base / "run"))
  return data, base / "run", cfg


def test_known_users_get_k_distinct_new_items(served):
  data, workdir, cfg = served
  rec = recommend.Recommender(cfg, workdir)
  out = rec.for_users([1, 2, 3, 120])
  sequences = {int(ln.split()[0]): {int(x) for x in ln.split()[1:]} for ln in data.read_text().splitlines()}
  assert out.items.shape == (4, 12)
  for u, items, steps in zip(out.users, out.items, out.steps, strict=True):
    assert len(set(items.tolist())) == 12
    assert not set(items.tolist()) & sequences[int(u)]
    assert ((items >= 1) & (items <= 30)).all()
    assert steps.tolist() == [1] * 8 + [2] * 4
  # The cyclic data: the next item after the last one is (last % 30) + 1, learned by the model.
  last = {u: int(ln.split()[-1]) for u, ln in enumerate(data.read_text().splitlines(), start=1)}
  hits = [last[int(u)] % 30 + 1 in items[:3].tolist() for u, items in zip(out.users, out.items, strict=True)]
  assert sum(hits) >= 3


def test_raw_histories_and_bad_requests(served):
  _, workdir, cfg = served
  rec = recommend.Recommender(cfg, workdir)
  out = rec.for_histories([[5, 6, 7], [30]])
  assert out.users.tolist() == [0, 0]
  assert not {5, 6, 7} & set(out.items[0].tolist())
  with pytest.raises(UserError, match="history 2 is empty"):
    rec.for_histories([[1], []])
  with pytest.raises(UserError, match="item id 31 is out of range"):
    rec.for_histories([[1, 31]])
  with pytest.raises(UserError, match="unknown user id"):
    rec.for_users([1, 999])


def test_export_all_users(served, tmp_path):
  _, workdir, cfg = served
  rec = recommend.Recommender(cfg, workdir)
  n = rec.export(tmp_path / "recs.csv")
  with open(tmp_path / "recs.csv") as f:
    rows = list(csv.DictReader(f))
  assert n == 120 and len(rows) == 120 * 12
  first = rec.for_users([1])
  mine = [r for r in rows if r["user"] == "1"]
  assert [int(r["item"]) for r in mine] == first.items[0].tolist()
  np.testing.assert_allclose([float(r["score"]) for r in mine], first.scores[0], rtol=1e-5)


def test_cli_recommend(served, tmp_path):
  data, workdir, _ = served
  args = [f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--config.dataset={data}", *TINY]
  args = [a for a in args if not a.startswith("--config.train.num_epochs")] + [
    "--config.train.num_epochs=3",
    "--config.recall.quotas=(8,4)",
    "--config.model.user_module=True",
    "--mode=recommend",
  ]
  proc = cli(*args, "--users=1,2", "--history=3,4,5")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[-3].startswith("user 1: ") and lines[-1].startswith("history 1: ")
  assert len(lines[-1].split()) == 2 + 12
  assert_one_line_error(cli(*args, "--users=7,12345"), "unknown user id", "12345")
  assert_one_line_error(cli(*args, "--history=3,0"), "out of range")
  assert_one_line_error(cli(*args), "--users")


def test_export_uses_raw_ids_of_an_interaction_log(tmp_path):
  data = write_cyclic_dataset(tmp_path / "cyclic.txt", num_users=40)
  rows = []
  for line in data.read_text().splitlines():
    user, *items = line.split()
    rows += [f"user-{user},sku{i},{t}" for t, i in enumerate(items)]
  log = tmp_path / "log.csv"
  log.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
  cfg = tiny_config(log, **{"train.num_epochs": 1, "recall.quotas": (4, 2), "eval.metric": "NDCG@5"})
  loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  rec = recommend.Recommender(cfg, tmp_path / "run")
  out = rec.for_users(["user-7"])
  assert out.items.shape == (1, 6)
  with pytest.raises(UserError, match="unknown user id 'user-999'"):
    rec.for_users(["user-999"])
  rec.export(tmp_path / "recs.csv")
  with open(tmp_path / "recs.csv") as f:
    exported = list(csv.DictReader(f))
  assert len(exported) == 40 * 6
  assert all(r["user"].startswith("user-") and r["item"].startswith("sku") for r in exported)
  mine = [r["item"] for r in exported if r["user"] == "user-7"]
  assert mine == [rec.raw_item(i) for i in out.items[0]]
