"""End-to-end training runs on a tiny learnable dataset: learning, outputs, exact resume."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recgpt_jax.train import loop
from recgpt_jax.train import step as step_lib
from recgpt_jax.train.checkpoint import RunCheckpoints
from tests.helpers import tiny_config, write_cyclic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return write_cyclic_dataset(tmp_path_factory.mktemp("data") / "cyclic.txt")


@pytest.mark.parametrize("attention", ["softmax", "flow"])
def test_trains_and_writes_outputs(dataset, tmp_path, attention):
  cfg = tiny_config(dataset, **{"model.attention": attention, "results_dir": str(tmp_path / "results")})
  record = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  # The next item is a deterministic function of the last: a trained model ranks it near the top, far
  # above a random ranking (HR@10 about 10/30).
  assert record["test"]["HR@10"] > 0.8, record["test"]
  assert record["test"]["NDCG@10"] > 0.5, record["test"]
  assert record["test_users"] == 120
  run = tmp_path / "run"
  for name in ("config.json", "metrics.jsonl", "results.json"):
    assert (run / name).is_file(), name
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "results" / "tiny.json").read_text())["test"] == record["test"]
  logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
  assert any("valid/NDCG@10" in r for r in logged) and any("train/loss" in r for r in logged)
  for key in (
    "name",
    "dataset",
    "recipe",
    "command",
    "git_commit",
    "date",
    "machine",
    "wall_time_s",
    "epochs",
  ):
    assert key in record


@pytest.mark.parametrize("loss", ["bce", "sampled_softmax"])
def test_other_losses_learn(dataset, tmp_path, loss):
  cfg = tiny_config(dataset, **{"train.loss": loss, "train.num_negatives": 8, "train.num_epochs": 8})
  record = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert record["test"]["HR@10"] > 0.6, record["test"]


def _final_state(workdir):
  mgr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta"))
  out = mgr.restore(
    mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  )
  return mgr.latest_step(), out.state


@pytest.mark.parametrize("stage", ["pretrain", "prompt_tune"])
def test_interrupted_run_resumes_exactly(dataset, tmp_path, monkeypatch, stage):
  cfg = tiny_config(dataset, **{"train.num_epochs": 3})
  if stage == "prompt_tune":
    loop.train_and_evaluate(tiny_config(dataset, **{"train.num_epochs": 1}), str(tmp_path / "pre"))
    cfg = tiny_config(
      dataset, **{"train.num_epochs": 3, "init_from": str(tmp_path / "pre"), "prompt.mode": "interleave"}
    )
  loop.train_and_evaluate(cfg, str(tmp_path / "straight"), stage)

  # Same command, killed at its 10th step (in the second epoch, after the checkpoint of step 9), then
  # run again: it resumes mid-epoch from the pipeline position saved with the checkpoint.
  real_jit = step_lib.jit_train_step

  def crashing_jit(*args, **kwargs):
    fn = real_jit(*args, **kwargs)
    calls = {"n": 0}

    def step(state, batch):
      calls["n"] += 1
      if calls["n"] == 10:
        raise KeyboardInterrupt
      return fn(state, batch)

    return step

  monkeypatch.setattr(step_lib, "jit_train_step", crashing_jit)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), stage)
  monkeypatch.setattr(step_lib, "jit_train_step", real_jit)
  assert _final_state(tmp_path / "resumed")[0] == 9
  loop.train_and_evaluate(cfg, str(tmp_path / "resumed"), stage)

  step_a, state_a = _final_state(tmp_path / "straight")
  step_b, state_b = _final_state(tmp_path / "resumed")
  assert step_a == step_b
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  results_a = json.loads((tmp_path / "straight" / "results.json").read_text())
  results_b = json.loads((tmp_path / "resumed" / "results.json").read_text())
  assert results_a["test"] == results_b["test"] and results_a["valid"] == results_b["valid"]


def test_interaction_log_run_saves_id_maps(dataset, tmp_path):
  # The same cyclic data as an interaction log with raw string ids, rows shuffled (sorting is by time).
  rows = []
  for line in dataset.read_text().split("\n"):
    if line:
      user, *items = line.split()
      rows += [(f"u{user}", f"item-{i}", t) for t, i in enumerate(items)]
  order = np.random.default_rng(0).permutation(len(rows))
  log = tmp_path / "log.csv"
  log.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in (rows[k] for k in order)))
  cfg = tiny_config(log, **{"train.num_epochs": 4})
  record = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert record["test"]["HR@10"] > 0.6, record["test"]
  user_map = json.loads((tmp_path / "run" / "user_map.json").read_text())
  item_map = json.loads((tmp_path / "run" / "item_map.json").read_text())
  assert len(user_map) == 120 and len(item_map) == 30
  assert sorted(item_map.values()) == list(range(1, 31))


def test_divergence_aborts_with_clear_error(tmp_path):
  log = loop.MetricsLog(tmp_path)

  class Bar:
    def set_postfix(self, **kwargs):
      pass

  cfg = tiny_config(tmp_path / "unused.txt")
  with pytest.raises(loop.TrainingDiverged, match="step 7"):
    loop._report((7, {"loss": np.float32("nan"), "grad_norm": np.float32(1.0)}), log, Bar(), 1.0, cfg)
  with pytest.raises(loop.TrainingDiverged, match="gradient norm inf"):
    loop._report((8, {"loss": np.float32(1.0), "grad_norm": np.float32("inf")}), log, Bar(), 1.0, cfg)
  assert loop._report((9, {"loss": np.float32(2.5), "grad_norm": np.float32(1.0)}), log, Bar(), 1.0, cfg) == 2.5
  log.close()


# The interleave variant is marked slow (make test-slow) to keep make test under its time budget.
@pytest.mark.parametrize(
  ("mode", "width", "hard"), [("last", 1, 0.0), pytest.param("interleave", 1, 0.5, marks=pytest.mark.slow)]
)
def test_prompt_tuning_warm_starts_and_learns(dataset, tmp_path, mode, width, hard):
  pre = tmp_path / "pre"
  loop.train_and_evaluate(tiny_config(dataset, **{"train.num_epochs": 4}), str(pre))
  cfg = tiny_config(
    dataset,
    **{
      "init_from": str(pre),
      "train.num_epochs": 2,
      "prompt.mode": mode,
      "prompt.width": width,
      "prompt.hard_negative_weight": hard,
      "optimizer.learning_rate": 3e-3,
    },
  )
  record = loop.train_and_evaluate(cfg, str(tmp_path / "pt"), "prompt_tune")
  assert record["recipe"]["stage"] == "prompt_tune"
  assert record["test"]["HR@10"] > 0.8, record["test"]
  logged = [json.loads(ln) for ln in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
  assert any("train/loss" in r for r in logged)


def test_prompt_tuning_needs_a_pretrained_run(dataset, tmp_path):
  with pytest.raises(loop.ConfigError, match="init_from"):
    loop.train_and_evaluate(tiny_config(dataset), str(tmp_path / "pt"), "prompt_tune")
  pre = tmp_path / "pre"
  loop.train_and_evaluate(tiny_config(dataset, **{"train.num_epochs": 1}), str(pre))
  # Warm start loads exactly the pre-training run's best parameters.
  run = loop.Run(tiny_config(dataset, **{"init_from": str(pre)}), tmp_path / "pt1", "prompt_tune")
  warm = run.warm_start_params(run.state.params)
  best, _ = RunCheckpoints(pre).restore_best(run.state.params)
  for a, b in zip(jax.tree.leaves(warm), jax.tree.leaves(best), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(loop.ConfigError, match="different model"):
    loop.train_and_evaluate(
      tiny_config(dataset, **{"init_from": str(pre), "model.hidden": 32}), str(tmp_path / "pt2"), "prompt_tune"
    )


def test_warm_start_adds_an_untied_head_as_a_copy_of_the_table(dataset, tmp_path):
  pre = tmp_path / "pre"
  loop.train_and_evaluate(tiny_config(dataset, **{"train.num_epochs": 1}), str(pre))
  overrides = {"init_from": str(pre), "model.untied_head": True, "train.head": "untied", "prompt.head": "untied"}
  run = loop.Run(tiny_config(dataset, **overrides), tmp_path / "pt", "prompt_tune")
  warm = run.warm_start_params(run.state.params)
  best, _ = RunCheckpoints(pre).restore_best({k: v for k, v in run.state.params.items() if k != "head"})
  np.testing.assert_array_equal(np.asarray(warm["head"]["kernel"]), np.asarray(best["item_embed"]["embedding"]).T)
  np.testing.assert_array_equal(np.asarray(warm["head"]["bias"]), 0.0)
  for a, b in zip(jax.tree.leaves({k: v for k, v in warm.items() if k != "head"}), jax.tree.leaves(best), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Scored by the untied head (train.head), the copied head ranks exactly like the pre-trained tied head.
  tied = loop.Run(tiny_config(dataset), pre)
  m_untied, m_tied = run.evaluate(warm, "test"), tied.evaluate(best, "test")
  for k in ("HR@10", "NDCG@10"):
    assert m_untied[k] == pytest.approx(m_tied[k], abs=1e-6), k
  # The reverse (dropping a head the pre-trained model has) is still an architecture change.
  loop.train_and_evaluate(
    tiny_config(dataset, **{"train.num_epochs": 1, "model.untied_head": True}), str(tmp_path / "pre_untied")
  )
  plain = loop.Run(tiny_config(dataset, **{"init_from": str(tmp_path / "pre_untied")}), tmp_path / "pt2", "prompt_tune")
  with pytest.raises(loop.ConfigError, match="untied_head"):
    plain.warm_start_params(plain.state.params)


def test_two_step_recall_evaluation(dataset, tmp_path):
  wd = tmp_path / "run"
  loop.train_and_evaluate(tiny_config(dataset, **{"train.num_epochs": 2}), str(wd))
  plain = loop.Run(tiny_config(dataset, **{"train.num_epochs": 2}), wd)
  params, _ = plain.ckpt.restore_best(plain.state.params)
  two = loop.Run(tiny_config(dataset, **{"train.num_epochs": 2, "recall.quotas": (18, 2)}), wd)
  small = loop.Run(
    tiny_config(dataset, **{"train.num_epochs": 2, "recall.quotas": (4, 2), "eval.metric": "NDCG@5"}), wd
  )
  m_plain, m_two, m_small = (r.evaluate(params, "test") for r in (plain, two, small))
  # The first 18 items of the two-step list are the plain top-18: every cut-off up to 10 agrees.
  for k in ("HR@5", "HR@10", "NDCG@5", "NDCG@10"):
    assert m_two[k] == pytest.approx(m_plain[k], abs=1e-7), k
  assert m_two["HR@20"] >= m_two["HR@10"]
  assert set(m_small) == {"HR@5", "NDCG@5", "users"}


def test_history_exclusion_can_be_turned_off(tmp_path):
  """``eval.exclude_history``: with the standard exclusion a test answer that repeats an item of its user's history
  is never ranked (HR@20 exactly 0); without it the same model can rank it, and for answers outside the history the
  exclusion only removes competitors, so their rank never gets worse with it (HR per user >=)."""
  rng = np.random.default_rng(0)
  lines = []
  for user in range(1, 41):
    items = rng.choice(np.arange(1, 31), size=8, replace=False)
    if user % 2:  # odd users: the test answer repeats their first item
      items = np.r_[items, items[0]]
    lines.append(" ".join(map(str, [user, *items])))
  data = tmp_path / "repeats.txt"
  data.write_text("\n".join(lines) + "\n")
  per_user = {}
  for exclude in (True, False):
    run = loop.Run(tiny_config(data, **{"eval.exclude_history": exclude}), tmp_path / f"run_{exclude}")
    per_user[exclude] = run.evaluate_per_user(run.state.params, "test")
  repeat = per_user[True]["users"] % 2 == 1
  assert repeat.sum() == 20
  assert (per_user[True]["HR@20"][repeat] == 0).all()
  assert per_user[False]["HR@20"][repeat].sum() > 0  # 20 of 30 items listed: an untrained model finds some
  for k in ("HR@5", "HR@10", "HR@20"):
    assert (per_user[True][k][~repeat] >= per_user[False][k][~repeat]).all(), k
  assert (per_user[True]["HR@20"][~repeat] > per_user[False]["HR@20"][~repeat]).any()
