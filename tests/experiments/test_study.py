"""The study runner: run plan, resume and stale-result checks, paired bootstrap, the report, bad input."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import study
from experiments.configs import study as study_config
from recgpt_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bootstrap_of_a_constant_difference_is_that_constant():
  mean, lo, hi = study.paired_bootstrap(np.full((3, 500), 0.25), 200)
  assert (mean, lo, hi) == pytest.approx((0.25, 0.25, 0.25))


def test_bootstrap_interval_matches_the_normal_interval():
  """One seed, 20,000 users with sd 1: the 95% interval is mean +- 1.96 / sqrt(20000) = +- 0.0139."""
  rng = np.random.default_rng(1)
  diff = rng.normal(0.05, 1.0, (1, 20_000))
  mean, lo, hi = study.paired_bootstrap(diff, 1000)
  half = 1.96 * diff.std() / np.sqrt(diff.shape[1])
  assert mean == pytest.approx(diff.mean())
  assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
  assert lo < mean < hi


def test_bootstrap_carries_the_spread_between_seeds():
  """Seeds that disagree in sign give an interval that contains zero, however many users."""
  diff = np.stack([np.full(5000, 0.02), np.full(5000, -0.03), np.full(5000, 0.02)])
  _, lo, hi = study.paired_bootstrap(diff, 500)
  assert lo < 0 < hi


def test_tune_plan(tmp_path):
  runs = study.tune_runs(["Beauty", "Yelp"], tmp_path, tmp_path)
  names = [r.name for r in runs]
  assert names[:2] == ["Beauty__base", "Yelp__base"] and "Yelp__user" not in names and "Beauty__user_l2_1" in names
  only = study.tune_runs(["Beauty", "Yelp"], tmp_path, tmp_path, ["user", "lr2e-3"])
  assert [r.name for r in only] == ["Beauty__user", "Beauty__lr2e-3", "Yelp__lr2e-3"]
  assert dict(only[0].overrides) == {"train.patience": 5, "model.user_module": True, "seed": 0}


def test_grid_plan_puts_parents_first(tmp_path):
  runs = study.grid_runs(["Beauty", "Yelp"], ["aligned", "authors_recgpt"], [0, 1], tmp_path / "r", tmp_path / "o")
  names = [r.name for r in runs]
  assert names[:4] == ["Beauty__ce__s0", "Beauty__aligned__s0", "Beauty__authors_bce__s0", "Beauty__authors_recgpt__s0"]
  assert len(names) == 2 * 2 * 4 and len(set(names)) == len(names)
  assert names.index("Yelp__ce__s0") < names.index("Beauty__ce__s1")  # seed by seed
  aligned = runs[1]
  settings = dict(aligned.overrides)
  config = aligned.expected_config()
  assert aligned.stage == "prompt_tune" and config["prompt"]["aligned"] is True and config["seed"] == 0
  assert config["recall"]["quotas"] == [18, 2] and config["optimizer"]["learning_rate"] == 5e-4
  assert settings["init_from"] == str(tmp_path / "r" / "grid" / "Beauty__ce__s0")
  cmd = aligned.command()
  assert f"--config={study.CONFIG}:Beauty,aligned" in cmd and "--config.seed=0" in cmd
  assert f"--config.results_dir={tmp_path / 'o' / 'grid'}" in cmd


def _fake_run(results: pathlib.Path, spec, test: dict, per_user: dict | None = None):
  config = spec.expected_config() | {"name": spec.name}
  record = {"name": spec.name, "recipe": {"stage": spec.stage, "config": config}, "test": test, "valid": test}
  record |= {"epochs": 3, "wall_time_s": 10.0, "machine": "test", "date": "2026-12-01"}
  spec.result().parent.mkdir(parents=True, exist_ok=True)
  spec.result().write_text(json.dumps(record))
  if per_user is not None:
    np.savez(results / "grid" / f"{spec.name}{study.PER_USER_SUFFIX}", **per_user)


def test_finished_runs_are_skipped_and_stale_ones_refused(tmp_path, monkeypatch):
  started = []
  monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: started.append(cmd) or 1)
  runs = study.grid_runs(["Beauty"], ["ce"], [0], tmp_path / "r", tmp_path / "o")
  assert not runs[0].finished()
  _fake_run(tmp_path / "o", runs[0], {"HR@10": 0.1})
  assert runs[0].finished()
  study.execute(runs)  # nothing to do: no process is started
  # A results file made with another config is never reused, nor overwritten.
  record = json.loads(runs[0].result().read_text())
  record["recipe"]["config"]["model"]["hidden"] = 32
  runs[0].result().write_text(json.dumps(record))
  before = runs[0].result().read_bytes()
  with pytest.raises(UserError, match="model.hidden: 32 != 64"):
    study.execute(runs)
  assert runs[0].result().read_bytes() == before
  # Bookkeeping fields do not make a result stale.
  record["recipe"]["config"]["model"]["hidden"] = 64
  record["recipe"]["config"]["train"]["checkpoint_every_steps"] = 7
  runs[0].result().write_text(json.dumps(record))
  assert runs[0].finished()
  # A workdir left by a run with another config is refused before anything starts (it would be resumed).
  runs[0].result().unlink()
  runs[0].workdir().mkdir(parents=True)
  config = runs[0].config()
  config.optimizer.learning_rate = 0.01
  (runs[0].workdir() / "config.json").write_text(config.to_json())
  with pytest.raises(UserError, match="holds a run with another config .*learning_rate"):
    study.execute(runs)
  assert started == []


def test_report_from_results_files(tmp_path):
  """Three seeds of three recipes on 4,000 hand-made users: means, spreads and verdicts as constructed."""
  out = tmp_path / "o"
  users = np.arange(1, 4001, dtype=np.int32)
  rng = np.random.default_rng(0)
  specs = {r.name: r for r in study.grid_runs(["Beauty"], ["ce", "ce_finetune", "recgpt"], [0, 1, 2], tmp_path, out)}
  for seed in (0, 1, 2):
    base = (rng.random(4000) < 0.2).astype(np.float32)  # HR@20 hits
    ndcg = base * 0.5
    better = np.maximum(base, (rng.random(4000) < 0.1).astype(np.float32))  # a strict gain: never worse
    for recipe, hits in (("ce", base), ("ce_finetune", base), ("recgpt", better)):
      metrics = {"HR@20": hits, "NDCG@10": hits * 0.5 if recipe != "ce" else ndcg}
      test = {m: float(v.mean()) for m, v in metrics.items()} | {"HR@10": 0.1 + seed * 0.01, "NDCG@20": 0.05}
      _fake_run(out, specs[study.grid_name("Beauty", recipe, seed)], test, {"users": users, **metrics})
  study.report(out, replicates=300)
  summary = json.loads((out / "report.json").read_text())
  cell = summary["cells"]["Beauty/ce"]["HR@10"]
  assert cell["mean"] == pytest.approx(0.11) and cell["sd"] == pytest.approx(np.std([0.1, 0.11, 0.12], ddof=1))
  gain = summary["pairs"]["Beauty/recgpt/vs_ce/HR@20"]
  assert gain["verdict"] == "gain" and gain["ci95"][0] > 0 and gain["seeds"] == 3 and gain["users"] == 4000
  same = summary["pairs"]["Beauty/ce_finetune/vs_ce/NDCG@10"]
  assert same["mean_diff"] == 0 and same["ci95"] == [0, 0] and same["verdict"] == "no significant difference"
  assert not any(k.startswith("Beauty/ce/") for k in summary["pairs"])  # the baseline has no control
  text = (out / "report.md").read_text()
  assert "| `recgpt` | `ce` | HR@20 | 3 |" in text and "gain" in text
  # The overview: recgpt has the best NDCG@10 (bold), and its HR@20 gain over ce is in the verdict table.
  overview = text[text.index("## Overview") : text.index("## Beauty")]
  assert "| `recgpt` | **" in overview and "| `recgpt` | `ce` | " in overview
  assert next(ln for ln in overview.splitlines() if ln.startswith("| `recgpt` | `ce` |")).endswith("gain |  |  |  |")
  # With fewer seeds there is no verdict, whatever the users say.
  for name in [n for n in specs if n.endswith("__s2")]:
    specs[name].result().unlink()
  study.report(out, replicates=100)
  summary = json.loads((out / "report.json").read_text())
  assert summary["pairs"]["Beauty/recgpt/vs_ce/HR@20"]["verdict"] == "pending (2 of 3 seeds)"
  assert (out / "report.png").stat().st_size > 0 and (out / "tune.md").exists()


def test_missed_bar_lists_what_was_tried():
  """Below 90% of the published figure the report names the missed bar, the sweep's points with the one valid
  chose and the best test HR@10 of any point (as a share of the published), and the recipes run; at the bar,
  nothing."""
  sweep = {
    "base": {"HR@10": 0.0909, "NDCG@10": 0.0553, "valid NDCG@10": 0.0699},
    "layers3": {"HR@10": 0.0931, "NDCG@10": 0.0566, "valid NDCG@10": 0.0697},
  }
  lines = study._tried_lines("Beauty", 0.88, 0.92, ["ce", "ce_cl"], sweep)
  text = "\n".join(lines)
  assert "The HR@10 bar is not reached" in text and "NDCG@10 bar" not in text
  assert "Valid chose base" in text and "layers3's, is 89% of the published" in text  # 0.0931 / 0.1041
  assert "`ce`, `ce_cl`" in text
  assert "HR@10 and NDCG@10 bars are not reached" in "\n".join(study._tried_lines("Yelp", 0.8, 0.85, ["ce"], {}))
  assert study._tried_lines("Toys_and_Games", 0.9, 0.95, ["ce"], sweep) == []


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["grid", "--recipes=ce,nope"], "unknown recipe 'nope'"),
    (["grid", "--seeds=0,one"], "--seeds must be integers"),
    (["grid", "--datasets=Beauty,Movies"], "unknown dataset 'Movies'"),
    (["launch"], "usage: python -m experiments.study"),
    (["grid", "--bootstrap=many"], "bootstrap"),
    (["tune", "--points=base,huge"], "unknown sweep point 'huge'"),
  ],
)
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, args, message):
  spec = study.grid_runs(["Beauty"], ["ce"], [0], tmp_path / "r", tmp_path / "o")[0]
  _fake_run(tmp_path / "o", spec, {"HR@10": 0.1})
  before = spec.result().read_bytes()
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.study", *args, f"--runs={tmp_path / 'r'}", f"--results={tmp_path / 'o'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
  assert spec.result().read_bytes() == before


def test_study_config_per_dataset_and_recipe():
  for ds in study_config.DATASETS:
    c = study_config.get_config(ds)
    assert c.dataset == ds and c.train.loss == "ce" and not c.model.user_module
  authors = study_config.get_config("Yelp,authors_recgpt")
  assert authors.dataset == "Yelp" and authors.model.hidden == 256 and authors.model.attention == "flow"
  assert authors.train.head == "untied" and authors.eval.head == "tied" and authors.prompt.gen_dropout
  with pytest.raises(ValueError, match="unknown study dataset"):
    study_config.get_config("Movies")
  with pytest.raises(ValueError, match="unknown study recipe 'paper'"):
    study_config.get_config("Beauty,paper")


def test_recall_analysis_of_a_trained_run(tmp_path, capsys):
  """On a small trained run: the plain setting reproduces the run's own test metrics, every two-step setting
  keeps the plain list's first m items, and the rank buckets agree with the plain HR@10 / HR@20."""
  from recgpt_jax.train import loop
  from tests.helpers import write_cyclic_dataset

  data = write_cyclic_dataset(tmp_path / "cyclic.txt", num_items=80)
  small = {
    "dataset": str(data),
    "max_len": 12,
    "model.hidden": 16,
    "model.num_layers": 1,
    "model.ffn": 32,
    "model.vocab_multiple": 8,
    "model.hidden_dropout": 0.1,
    "model.attn_dropout": 0.0,
    "train.num_epochs": 2,
    "train.row_len": 16,
    "train.rows_per_batch": 8,
    "optimizer.learning_rate": 1e-2,
    "eval.users_per_batch": 64,
    "eval.rows_per_batch": 48,
    "seed": 0,
  }
  spec = study.RunSpec(
    "Beauty__ce__s0", "Beauty", "pretrain", tuple(small.items()), "grid", tmp_path / "r", tmp_path / "o"
  )
  c = spec.config()
  c.name, c.results_dir = spec.name, str(spec.result().parent)
  own = loop.train_and_evaluate(c, str(spec.workdir()))
  assert spec.finished()
  study.run_recall([spec], tmp_path / "o")
  record = json.loads((tmp_path / "o" / "recall" / f"{spec.name}.json").read_text())
  q = record["quotas"]
  for m in ("HR@10", "NDCG@10", "HR@20"):
    assert q["20"]["test"][m] == pytest.approx(own["test"][m], abs=1e-6), m
  for key in ("18+2", "14+6", "10+10", "14+3+3"):
    assert q[key]["test"]["HR@10"] == pytest.approx(own["test"]["HR@10"], abs=1e-6), key  # the first m >= 10 items
  ranks = record["test_answer_rank"]
  assert sum(ranks.values()) == pytest.approx(1.0)
  assert ranks["1-10"] == pytest.approx(own["test"]["HR@10"], abs=1e-6)
  assert ranks["1-10"] + ranks["11-20"] == pytest.approx(own["test"]["HR@20"], abs=1e-6)
  per_user = np.load(tmp_path / "o" / "recall" / f"{spec.name}{study.PER_USER_SUFFIX}")
  assert per_user["10+10/HR@20"].shape == per_user["users"].shape
  # The history left in the ranking: the cyclic walks never repeat an item, so the exclusion only removes
  # competitors of the answer and the kept ranking cannot score higher.
  study.run_repeats([spec], tmp_path / "o")
  rep = json.loads((tmp_path / "o" / "repeats" / f"{spec.name}.json").read_text())
  assert rep["test_answers_in_history"] == 0 and rep["users"] == own["test_users"]
  for m in ("HR@10", "NDCG@10", "HR@20"):
    assert rep["excluded"][m] == pytest.approx(own["test"][m], abs=1e-6), m
    assert rep["kept"][m] <= rep["excluded"][m] + 1e-9, m
  study.report(tmp_path / "o", replicates=50)
  text = (tmp_path / "o" / "report.md").read_text()
  assert "## Multi-interest recall settings" in text and "## Repeated items" in text
  # A finished run whose workdir is gone (results kept, model not): reported and skipped, nothing written.
  spec.workdir().rename(tmp_path / "moved")
  (tmp_path / "o" / "recall" / f"{spec.name}.json").unlink()
  capsys.readouterr()
  study.run_recall([spec], tmp_path / "o")
  out = capsys.readouterr().out
  assert f"{spec.name}: skipped, no saved model in" in out and "recall analysis of 0 runs" in out
  assert not (tmp_path / "o" / "recall" / f"{spec.name}.json").exists()


def test_runners_share_a_study(tmp_path, capsys, monkeypatch):
  """A run whose parent is unfinished waits; a run locked by another runner is left to it; nothing starts."""
  import fcntl

  started = []
  monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: started.append(cmd) or 1)
  runs = study.grid_runs(["Beauty"], ["ce_finetune"], [0], tmp_path / "r", tmp_path / "o")
  assert runs[1].parent is runs[0]
  (tmp_path / "r" / "logs").mkdir(parents=True)
  with open(tmp_path / "r" / "logs" / "grid__Beauty__ce__s0.lock", "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    study.execute(runs)
  out = capsys.readouterr().out
  assert "Beauty__ce__s0: running in another process" in out
  assert "Beauty__ce_finetune__s0: waits for Beauty__ce__s0" in out
  assert started == []
