"""Training stages as objects: the no-prompt fine-tuning control, warm starts, the starting model as a
selection candidate, the evaluation head, and the per-user test metrics the study's paired tests read."""

import json

import jax
import numpy as np
import pytest

from recgpt_jax.errors import ConfigError
from recgpt_jax.train import loop, stages
from recgpt_jax.train.checkpoint import RunCheckpoints
from tests.helpers import tiny_config, write_cyclic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return write_cyclic_dataset(tmp_path_factory.mktemp("data") / "cyclic.txt")


@pytest.fixture(scope="module")
def pretrained(dataset, tmp_path_factory):
  wd = tmp_path_factory.mktemp("pre") / "pre"
  loop.train_and_evaluate(tiny_config(dataset, **{"train.num_epochs": 2}), str(wd))
  return wd


def test_stage_table():
  assert set(stages.STAGES) == {"pretrain", "finetune", "prompt_tune"}
  assert tuple(stages.STAGES) == loop.TRAIN_STAGES
  pre, fine, prompt = (stages.get(n) for n in ("pretrain", "finetune", "prompt_tune"))
  assert (pre.prompted, pre.needs_init, pre.targets_key) == (False, False, "targets")
  assert (fine.prompted, fine.needs_init, fine.targets_key) == (False, True, "targets")
  assert (prompt.prompted, prompt.needs_init, prompt.targets_key) == (True, True, "p_targets")
  with pytest.raises(ConfigError, match="unknown training stage 'pretune'"):
    stages.get("pretune")


@pytest.mark.parametrize("stage", ["finetune", "prompt_tune"])
def test_continuing_stages_need_init_from(dataset, tmp_path, stage):
  with pytest.raises(ConfigError, match=f"--mode={stage} starts from a trained model"):
    loop.train_and_evaluate(tiny_config(dataset), str(tmp_path / "run"), stage)
  assert not (tmp_path / "run").exists()


def test_finetune_trains_on_the_pretraining_view(dataset, pretrained, tmp_path):
  """The control sees exactly the batches pre-training sees (same seed): only the start differs."""
  cfg = tiny_config(dataset, **{"init_from": str(pretrained)})
  fine = loop.Run(cfg, tmp_path / "fine", "finetune")
  pre = loop.Run(tiny_config(dataset), tmp_path / "pre2", "pretrain")
  assert fine.prompt_cfg is None and fine.loss_targets_key == "targets"
  for a, b in zip(fine.train_input.epoch_iterator(0), pre.train_input.epoch_iterator(0), strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_a_harmful_stage_ends_with_its_starting_model(dataset, pretrained, tmp_path):
  """The warm-started model is validated as epoch 0; if no epoch beats it, it is the stage's result."""
  start = loop.Run(tiny_config(dataset), pretrained)
  best, _ = RunCheckpoints(pretrained).restore_best(start.state.params)
  expected = start.evaluate(best, "test")
  # A learning rate this large wrecks the model in one epoch.
  cfg = tiny_config(dataset, **{"init_from": str(pretrained), "train.num_epochs": 1, "optimizer.learning_rate": 3.0})
  record = loop.train_and_evaluate(cfg, str(tmp_path / "fine"), "finetune")
  assert record["epochs"] == 0 and record["best_step"] == 0
  for k in ("HR@10", "NDCG@10", "HR@20"):
    assert record["test"][k] == pytest.approx(expected[k], abs=1e-6), k
  history = [json.loads(ln) for ln in (tmp_path / "fine" / "metrics.jsonl").read_text().splitlines()]
  assert any("valid/NDCG@10" in r for r in history)


def test_a_helpful_stage_moves_on_from_epoch_0(dataset, tmp_path):
  weak = tmp_path / "weak"  # two steps of pre-training: no validation yet, so the warm start is the latest state
  loop.train_and_evaluate(tiny_config(dataset, **{"train.max_steps": 2}), str(weak))
  cfg = tiny_config(dataset, **{"init_from": str(weak), "train.num_epochs": 3})
  record = loop.train_and_evaluate(cfg, str(tmp_path / "fine"), "finetune")
  assert record["recipe"]["stage"] == "finetune"
  assert record["epochs"] >= 1
  run = loop.Run(cfg, tmp_path / "fine", "finetune")
  _, meta = run.ckpt.restore(run.state)
  assert [h["epoch"] for h in meta["history"]][:2] == [0, 1]
  assert record["valid"]["NDCG@10"] > meta["history"][0]["NDCG@10"]


def test_pretrain_can_start_from_init_from(dataset, pretrained, tmp_path):
  """Any stage warm-starts from init_from: a pre-training run then continues the given model."""
  run = loop.Run(tiny_config(dataset, **{"init_from": str(pretrained)}), tmp_path / "more", "pretrain", writer=True)
  state, meta = run.start()
  best, _ = RunCheckpoints(pretrained).restore_best(run.state.params)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(best), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert meta["best"]["epoch"] == 0 and meta["history"][0]["epoch"] == 0
  run.ckpt.wait()


def test_eval_head_is_separate_from_train_head(dataset, tmp_path):
  base = {"model.untied_head": True, "train.head": "untied", "train.num_epochs": 1}
  wd = tmp_path / "run"
  loop.train_and_evaluate(tiny_config(dataset, **base), str(wd))
  by_train = loop.Run(tiny_config(dataset, **base), wd)
  by_tied = loop.Run(tiny_config(dataset, **base, **{"eval.head": "tied"}), wd)
  assert (by_train.head, by_tied.head) == ("untied", "tied")
  params, _ = by_train.ckpt.restore_best(by_train.state.params)
  # The untied head and the item table score differently after training on the untied head alone.
  assert by_train.evaluate(params, "test")["NDCG@10"] != by_tied.evaluate(params, "test")["NDCG@10"]
  # Scoring the tied table by hand gives the tied evaluation.
  model_scores = by_tied.evaluate(params, "test")
  fresh = loop.Run(tiny_config(dataset, **{"train.num_epochs": 1}), tmp_path / "other")
  tied_only = {k: v for k, v in params.items() if k != "head"}
  assert fresh.evaluate(tied_only, "test")["NDCG@10"] == pytest.approx(model_scores["NDCG@10"], abs=1e-6)
  with pytest.raises(ConfigError, match="eval.head='untied' needs model.untied_head=True"):
    loop.Run(tiny_config(dataset, **{"eval.head": "untied"}), tmp_path / "bad")


def test_per_user_test_metrics(dataset, pretrained, tmp_path):
  """The per-user file holds every test user once; its means are the reported test metrics."""
  record = json.loads((pretrained / "results.json").read_text())
  per_user = np.load(pretrained / loop.PER_USER_FILE)
  run = loop.Run(tiny_config(dataset), pretrained)
  np.testing.assert_array_equal(per_user["users"], run.eval_sets["test"].users)
  assert len(per_user["users"]) == record["test_users"]
  for k in run.metric_names:
    assert float(np.mean(per_user[k], dtype=np.float64)) == pytest.approx(record["test"][k], abs=1e-7)
  # ... and equal what the summing evaluation computes.
  params, _ = run.ckpt.restore_best(run.state.params)
  means = run.evaluate(params, "test")
  for k in run.metric_names:
    assert means[k] == pytest.approx(record["test"][k], abs=1e-6), k
  hits = per_user["HR@10"]
  assert set(np.unique(hits)) <= {0.0, 1.0}
  assert np.all(per_user["NDCG@10"] <= hits)  # NDCG is 0 wherever the answer is not in the top 10


@pytest.mark.parametrize(
  "prompt",
  [{"prompt.source": "popularity"}, {"prompt.source": "sample", "prompt.gen_dropout": True, "prompt.aligned": True}],
)
def test_prompt_tuning_runs_with_every_prompt_setting(dataset, pretrained, tmp_path, prompt):
  """The loop hands the step what each setting needs (training-split item counts for 'popularity')."""
  cfg = tiny_config(dataset, **{"init_from": str(pretrained), "train.num_epochs": 1, **prompt})
  run = loop.Run(cfg, tmp_path / "pt", "prompt_tune")
  counts = np.zeros(run.data.num_items + 1, np.int64)
  for seq in run.data.sequences:
    np.add.at(counts, seq[:-2], 1)  # the training split: all but the valid and test answers
  np.testing.assert_array_equal(run.item_counts, counts)
  record = loop.train_and_evaluate(cfg, str(tmp_path / "pt"), "prompt_tune")
  assert record["test"]["HR@10"] > 0.8, record["test"]


def test_a_stage_stopped_by_max_steps_validates_its_last_state(dataset, tmp_path):
  """Stopped mid-epoch by train.max_steps, the trained state is a candidate too: it beats the weak start."""
  weak = tmp_path / "weak"
  loop.train_and_evaluate(tiny_config(dataset, **{"train.max_steps": 1}), str(weak))
  cfg = tiny_config(dataset, **{"init_from": str(weak), "train.max_steps": 12})
  record = loop.train_and_evaluate(cfg, str(tmp_path / "fine"), "finetune")
  assert record["best_step"] == 12
  start = json.loads((weak / "results.json").read_text())
  assert record["valid"]["NDCG@10"] > start["valid"]["NDCG@10"]
