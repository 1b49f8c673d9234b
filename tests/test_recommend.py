"""Serving: recommendations from a trained run, exports, and rejected requests."""

import csv
import os
import pathlib

import numpy as np
import pytest

from recgpt_jax import recommend
from recgpt_jax.errors import ConfigError, RequestError, UserError
from recgpt_jax.train import loop
from tests.helpers import tiny_config, write_cyclic_dataset, write_cyclic_log
from tests.test_cli import DEFAULT_CONFIG, TINY, assert_one_line_error, cli, snapshot


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  base = tmp_path_factory.mktemp("serve")
  data = write_cyclic_dataset(base / "cyclic.txt")
  cfg = tiny_config(data, **{"train.num_epochs": 3, "recall.quotas": (8, 4)})
  loop.train_and_evaluate(cfg, str(base / "run"))
  return data, base / "run", cfg


def cli_args(served) -> list[str]:
  """Command-line flags that give the config of the ``served`` run, in recommend mode."""
  data, workdir, _ = served
  args = [f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--config.dataset={data}", *TINY]
  return [a for a in args if not a.startswith("--config.train.num_epochs")] + [
    "--config.train.num_epochs=3",
    "--config.recall.quotas=(8,4)",
    "--config.model.user_module=True",
    "--mode=recommend",
  ]


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


def test_cli_recommend(served):
  args = cli_args(served)
  proc = cli(*args, "--users=1,2", "--history=3,4,5")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[-3].startswith("user 1: ") and lines[-1].startswith("history 1: ")
  assert len(lines[-1].split()) == 2 + 12
  assert_one_line_error(cli(*args, "--users=7,12345"), "unknown user id", "12345")
  assert_one_line_error(cli(*args, "--history=3,0"), "out of range")
  assert_one_line_error(cli(*args), "--users")


def test_recommender_needs_a_run_directory_and_creates_nothing(served, tmp_path, cli_worker):
  """A missing workdir used to get best/ and checkpoints/ created before "no checkpoint" was said."""
  _, _, cfg = served
  with pytest.raises(UserError, match="no checkpoint in .*none: no such directory"):
    recommend.Recommender(cfg, tmp_path / "none")
  assert not (tmp_path / "none").exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no checkpoint in .*empty; train a model there first"):
    recommend.Recommender(cfg, tmp_path / "empty")
  assert not any((tmp_path / "empty").iterdir())
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="not a directory"):
    recommend.Recommender(cfg, tmp_path / "file")
  args = [a for a in cli_args(served) if not a.startswith("--workdir")]
  assert_one_line_error(cli_worker(*args, f"--workdir={tmp_path / 'none'}", "--users=1"), "no checkpoint", "none")
  assert not (tmp_path / "none").exists()


def test_recommender_refuses_a_model_of_another_config_without_touching_it(served):
  """Checked before anything is restored (a restore of other shapes could be taken for a corrupt checkpoint)."""
  _, workdir, cfg = served
  before = snapshot(workdir)
  other = tiny_config(cfg.dataset, **{"train.num_epochs": 3, "recall.quotas": (8, 4), "model.hidden": 32})
  with pytest.raises(ConfigError, match=r"holds a run with a different model \(hidden: 16 != 32\)"):
    recommend.Recommender(other, workdir)
  with pytest.raises(ConfigError, match="train.log_every_steps must be >= 1"):
    recommend.Recommender(tiny_config(cfg.dataset, **{"train.log_every_steps": 0}), workdir)
  assert snapshot(workdir) == before


def test_requests_are_validated(served):
  """Malformed ids are one RequestError (a UserError and a ValueError) naming the value, never a crash deep inside
  or a silent truncation."""
  _, workdir, cfg = served
  rec = recommend.Recommender(cfg, workdir)
  bad = [
    (lambda: rec.for_histories([5, 17]), "history 1 must be a list of item ids, got 5"),  # was: IndexError
    (lambda: rec.for_histories([[1.5, 2.7]]), "history 1: item id 1.5 is not an integer"),  # was: [1, 2]
    (lambda: rec.for_histories([[np.float32(3)]]), "item id np.float32(3.0) is not an integer"),
    (lambda: rec.for_histories([[None]]), "history 1: item id None is not an integer"),
    (lambda: rec.for_histories([[1], ["2"]]), "history 2: item id '2' is not an integer"),  # text data: int ids
    (lambda: rec.for_histories([[99999999999999999999]]), "item id 99999999999999999999 is out of range 1..30"),
    (lambda: rec.for_histories([[True]]), "item id True is not an integer"),
    (lambda: rec.for_histories("5,17"), "histories must be a list of item-id lists, got '5,17'"),
    (lambda: rec.for_histories([]), "no users to recommend for"),
    (lambda: rec.for_users([1.7]), "user id 1.7 is not an integer"),  # was: user 1
    (lambda: rec.for_users([None]), "user id None is not an integer"),  # was: TypeError
    (lambda: rec.for_users(["3"]), "user id '3' is not an integer"),
    (lambda: rec.for_users(7), "users must be a list of ids, got 7"),
    (lambda: rec.for_users("12"), "users must be a list of ids, got '12'"),
    (lambda: rec.for_users([0]), "unknown user id 0"),
  ]
  for call, message in bad:
    with pytest.raises(RequestError) as e:
      call()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)
  want = rec.for_histories([[5, 6, 7]])
  for same in ([np.array([5, 6, 7])], np.array([[5, 6, 7]]), [(np.int64(5), np.int32(6), 7)]):
    np.testing.assert_array_equal(rec.for_histories(same).items, want.items)
  np.testing.assert_array_equal(rec.for_users(np.array([1, 2])).items, rec.for_users([np.int64(1), 2]).items)


def test_export_destination_is_checked_before_computing(served, tmp_path, monkeypatch):
  """An export to a directory, below a file or to an unwritable place fails before any user is computed, and no
  export ever leaves a temporary file behind."""
  _, workdir, cfg = served
  rec = recommend.Recommender(cfg, workdir)
  (tmp_path / "a_dir").mkdir()
  (tmp_path / "a_file").write_text("x")
  before = snapshot(tmp_path)

  def no_compute(ids):
    raise AssertionError("computed before the destination was checked")

  monkeypatch.setattr(rec, "_for_ids", no_compute)
  for dest, message in (
    (tmp_path / "a_dir", "is a directory"),
    (tmp_path / "a_file" / "recs.csv", "a_file is not a directory"),
    (tmp_path / "a_file" / "sub" / "recs.csv", "a_file is not a directory"),
    (pathlib.Path("/sys/recs.csv"), "cannot export to /sys/recs.csv"),  # unwritable even for root
  ):
    with pytest.raises(RequestError, match=message):
      rec.export(dest)
  assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_dir", "a_file"]

  def fail(ids):
    raise RuntimeError("interrupted")

  (tmp_path / "recs.csv").write_text("old export\n")
  monkeypatch.setattr(rec, "_for_ids", fail)
  with pytest.raises(RuntimeError, match="interrupted"):
    rec.export(tmp_path / "recs.csv")
  assert (tmp_path / "recs.csv").read_text() == "old export\n"  # replaced only by a complete export
  assert sorted(os.listdir(tmp_path)) == ["a_dir", "a_file", "recs.csv"]  # no temporary file left


def test_cli_rejects_bad_requests_in_one_line(served, tmp_path, cli_worker):
  args = cli_args(served)
  (tmp_path / "a_file").write_text("x")
  for extra, fragments in (
    (["--history=99999999999999999999"], ["item id 99999999999999999999 is out of range 1..30"]),  # was: traceback
    (["--history=3,x"], ["--history='3,x'", "item id 'x' is not an integer"]),
    (["--history=,"], ["--history=','", "no item ids"]),
    (["--users=1.5"], ["user id '1.5' is not an integer"]),
    ([f"--export={tmp_path}"], ["is a directory"]),
    ([f"--export={tmp_path / 'a_file' / 'recs.csv'}"], ["a_file is not a directory"]),
    (["--export=/sys/recs.csv"], ["cannot export to /sys/recs.csv"]),
  ):
    assert_one_line_error(cli_worker(*args, *extra), *fragments)
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.fixture(scope="module")
def log_run(tmp_path_factory):
  """A run on an interaction log whose raw ids differ from the dense ids: users 'user-<n>', items the numbers
  1000 + <item> (numeric raw ids, as in many logs). Returns (config, workdir, path of a config file giving it)."""
  base = tmp_path_factory.mktemp("log")
  log = write_cyclic_log(base, "user-")
  overrides = {"train.num_epochs": 1, "recall.quotas": (4, 2), "eval.metric": "NDCG@5"}
  cfg = tiny_config(log, **overrides)
  loop.train_and_evaluate(cfg, str(base / "run"))
  config_file = base / "log_config.py"
  config_file.write_text(
    "import pathlib\n\nfrom tests.helpers import tiny_config\n\n\ndef get_config():\n"
    f"  return tiny_config(pathlib.Path({str(log)!r}), **{overrides!r})\n"
  )
  return cfg, base / "run", config_file


def test_export_uses_raw_ids_of_an_interaction_log(log_run, tmp_path):
  cfg, workdir, _ = log_run
  rec = recommend.Recommender(cfg, workdir)
  out = rec.for_users(["user-7"])
  assert out.items.shape == (1, 6)
  with pytest.raises(UserError, match="unknown user id 'user-999'"):
    rec.for_users(["user-999"])
  rec.export(tmp_path / "recs.csv")
  with open(tmp_path / "recs.csv") as f:
    exported = list(csv.DictReader(f))
  assert len(exported) == 40 * 6
  assert all(r["user"].startswith("user-") and 1001 <= int(r["item"]) <= 1030 for r in exported)
  mine = [r["item"] for r in exported if r["user"] == "user-7"]
  assert mine == [rec.raw_item(i) for i in out.items[0]]


def test_histories_take_the_raw_item_ids_that_are_printed(log_run, cli_worker):
  """--history and for_histories take raw ids, as --users and the output: the printed ids used to be rejected (or,
  when small, silently read as other items' dense ids)."""
  cfg, workdir, config_file = log_run
  rec = recommend.Recommender(cfg, workdir)
  raw = ["1005", "1006", "1007"]
  dense = [rec.item_id(i) for i in raw]
  assert dense == [rec.run.data.item_map[i] for i in raw] and dense != [5, 6, 7]
  assert [rec.item_id(int(i)) for i in raw] == dense  # an int is looked up as its text
  out = rec.for_histories([raw])
  np.testing.assert_array_equal(out.items, rec.for_histories([dense], dense=True).items)
  assert not set(out.items[0].tolist()) & set(dense)
  with pytest.raises(RequestError, match="history 1: unknown item id '5'"):
    rec.for_histories([[5]])
  with pytest.raises(RequestError, match="history 1: item id 31 is out of range 1..30"):
    rec.for_histories([[31]], dense=True)
  with pytest.raises(RequestError, match=r"history 1: item id 1\.5 must be a string or an integer"):
    rec.for_histories([[1.5]])

  args = [f"--config={config_file}", f"--workdir={workdir}", "--mode=recommend"]
  proc = cli_worker(*args, "--users=user-7", f"--history={','.join(raw)}")
  assert proc.returncode == 0, proc.stderr
  user_line, history_line = proc.stdout.strip().splitlines()[-2:]
  assert user_line.startswith("user user-7: ") and history_line.startswith("history 1: ")
  printed = [tok.split(":")[0] for tok in history_line.split()[2:]]
  assert printed == [rec.raw_item(i) for i in out.items[0]]
  proc = cli_worker(*args, f"--history={','.join(printed)}")  # the printed ids are accepted back
  assert proc.returncode == 0, proc.stderr
  assert_one_line_error(cli_worker(*args, "--history=5,6"), "unknown item id '5'")
  assert_one_line_error(cli_worker(*args, "--users=7"), "unknown user id '7'")
