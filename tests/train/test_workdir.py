"""The workdir contract (recgpt_jax/train/workdir.py): each defect of issue 12 reproduced on a tiny run."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal

import jax
import numpy as np
import pytest

from recgpt_jax.config import base_config
from recgpt_jax.errors import UserError
from recgpt_jax.train import loop
from recgpt_jax.train import workdir as workdir_lib
from recgpt_jax.train.checkpoint import RunCheckpoints
from tests.helpers import tiny_config, write_cyclic_dataset

EPOCHS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return write_cyclic_dataset(tmp_path_factory.mktemp("data") / "cyclic.txt")


def config(dataset, **overrides):
  return tiny_config(dataset, **{"train.num_epochs": EPOCHS, **overrides})


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
  """A finished 2-epoch pre-training workdir and its results record."""
  wd = tmp_path_factory.mktemp("finished") / "run"
  record = loop.train_and_evaluate(config(dataset), str(wd))
  return wd, record


@pytest.fixture
def copy(finished, tmp_path):
  """A private copy of the finished workdir (tests may damage it)."""
  dest = tmp_path / "run"
  shutil.copytree(finished[0], dest)
  return dest


def tree_hashes(root: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file() and p.name != workdir_lib.LOCK_FILE
  }


def final_params(wd: pathlib.Path, dataset) -> list[np.ndarray]:
  run = loop.Run(config(dataset), wd, writer=False)
  state, _ = run.ckpt.restore(run.state)
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def steps(wd: pathlib.Path, sub: str = "checkpoints") -> list[int]:
  return sorted(int(p.name) for p in (wd / sub).iterdir() if p.name.isdigit())


def truncate_a_file(step_dir: pathlib.Path) -> pathlib.Path:
  """Truncates the largest array file of a checkpoint step (a disk-full or a killed copy)."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and "meta" not in p.parts]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:7])
  return victim


# 1. A corrupt latest checkpoint falls back to the newest intact one.
def test_corrupt_latest_checkpoint_falls_back(dataset, finished, copy, capfd):
  latest = steps(copy)[-1]
  truncate_a_file(copy / "checkpoints" / str(latest))
  record = loop.train_and_evaluate(config(dataset), str(copy))
  err = capfd.readouterr().err
  assert f"checkpoint {copy / 'checkpoints'}/{latest} is unreadable" in err and "falling back to step" in err
  # The damaged step is kept, aside; retraining from the older step reproduces the run exactly.
  assert [p.name.split("-")[:2] for p in (copy / "corrupt").iterdir()] == [["checkpoints", str(latest)]]
  assert record["test"] == finished[1]["test"] and record["best_step"] == finished[1]["best_step"]
  for a, b in zip(final_params(copy, dataset), final_params(finished[0], dataset), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("victim", ["state/_METADATA", "meta/metadata"])
def test_deleted_metadata_falls_back(dataset, finished, copy, capfd, victim):
  latest = steps(copy)[-1]
  (copy / "checkpoints" / str(latest) / victim).unlink()
  record = loop.train_and_evaluate(config(dataset), str(copy))
  assert "is unreadable" in capfd.readouterr().err
  assert record["test"] == finished[1]["test"]


def test_corrupt_best_falls_back_to_previous_best(dataset, copy, capfd):
  bests = steps(copy, "best")
  assert len(bests) == 2  # two best models are kept
  truncate_a_file(copy / "best" / str(bests[-1]))
  loop.evaluate_only(config(dataset), str(copy))
  err = capfd.readouterr().err
  assert f"{bests[-1]} is unreadable" in err and f"falling back to step {bests[0]}" in err
  record = json.loads((copy / loop.EVALUATION_FILE).read_text())
  assert record["best_step"] == bests[0]


def test_no_readable_checkpoint_is_one_line_error(dataset, copy):
  for step in steps(copy, "best"):
    truncate_a_file(copy / "best" / str(step))
  with pytest.raises(UserError, match="no readable checkpoint"):
    loop.evaluate_only(config(dataset), str(copy))


# 2. Another stage never continues a workdir; nothing is written when it is refused.
def test_prompt_tune_refuses_a_pretraining_workdir(dataset, copy):
  before = tree_hashes(copy)
  cfg = config(dataset, **{"init_from": str(copy), "prompt.mode": "last"})
  with pytest.raises(UserError, match="holds a pretrain run; --mode=prompt_tune needs its own --workdir"):
    loop.train_and_evaluate(cfg, str(copy), "prompt_tune")
  with pytest.raises(UserError, match="holds a pretrain run; --mode=finetune needs its own --workdir"):
    loop.train_and_evaluate(cfg, str(copy), "finetune")
  with pytest.raises(UserError, match="is the workdir itself"):
    loop.train_and_evaluate(cfg, str(copy), "pretrain")
  assert tree_hashes(copy) == before
  assert json.loads((copy / workdir_lib.RUN_FILE).read_text())["stage"] == "pretrain"


# 3. One writer at a time.
def test_busy_workdir_is_refused(dataset, copy):
  before = tree_hashes(copy)
  with workdir_lib._lock(copy, primary=True):
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by another run \\(pid {os.getpid()}\\)"):
      loop.train_and_evaluate(config(dataset), str(copy))
    with pytest.raises(workdir_lib.WorkdirBusy):
      loop.evaluate_only(config(dataset), str(copy))
  assert tree_hashes(copy) == before
  loop.evaluate_only(config(dataset), str(copy))  # released: usable again


# 4. Evaluation is written beside the training record, never over it.
def test_evaluate_writes_beside_results(dataset, copy, tmp_path):
  results = (copy / "results.json").read_bytes()
  cfg = config(dataset, **{"recall.quotas": (10,), "results_dir": str(tmp_path / "res")})
  record = loop.evaluate_only(cfg, str(copy))
  assert (copy / "results.json").read_bytes() == results
  assert json.loads((copy / loop.EVALUATION_FILE).read_text()) == record
  assert "HR@20" not in record["test"] and record["recipe"]["stage"] == "pretrain"
  assert (tmp_path / "res" / "tiny.evaluation.json").is_file() and not (tmp_path / "res" / "tiny.json").exists()


# 5. A rejected resume writes nothing, says what differs in one short line; an unreadable config.json is an error.
def test_rejected_resume_writes_nothing(dataset, copy):
  before = tree_hashes(copy)
  with pytest.raises(UserError) as e:
    loop.train_and_evaluate(config(dataset, **{"train.rows_per_batch": 4}), str(copy))
  msg = str(e.value)
  assert "train.rows_per_batch: 8 -> 4" in msg and "\n" not in msg and len(msg) < 300
  assert tree_hashes(copy) == before


def test_empty_config_json_is_an_error(dataset, copy):
  (copy / "config.json").write_text("")
  before = tree_hashes(copy)
  with pytest.raises(UserError, match="config.json .* is unreadable"):
    loop.train_and_evaluate(config(dataset), str(copy))
  with pytest.raises(UserError, match="config.json .* is unreadable"):
    loop.evaluate_only(config(dataset), str(copy))
  assert tree_hashes(copy) == before


def test_resume_may_change_free_fields(dataset, copy):
  """Logging cadence, names and a longer constant-rate schedule are not training-relevant."""
  cfg = config(dataset, **{"name": "other", "train.log_every_steps": 5, "train.num_epochs": EPOCHS + 1})
  record = loop.train_and_evaluate(cfg, str(copy))
  assert record["name"] == "other"
  with pytest.raises(UserError, match="train.num_epochs"):
    loop.train_and_evaluate(config(dataset, **{"optimizer.schedule": "cosine"}), str(copy))


# 6. Evaluating a workdir that does not exist creates nothing.
def test_evaluate_missing_workdir_creates_nothing(dataset, tmp_path):
  with pytest.raises(UserError, match="no checkpoint in"):
    loop.evaluate_only(config(dataset), str(tmp_path / "none"))
  assert not (tmp_path / "none").exists()


def test_workdir_that_is_a_file(dataset, tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(UserError, match="is below the file .*, not a directory"):
    loop.train_and_evaluate(config(dataset), str(f / "run"))
  assert f.read_text() == "x"


# 13. A finished run is not trained further; the epoch-end record is saved even when a periodic save fell on
# the epoch's last step; leftovers of killed saves are removed.
def test_finished_run_is_not_trained_again(dataset, finished, copy, capsys):
  before = steps(copy)
  record = loop.train_and_evaluate(config(dataset), str(copy))
  out = capsys.readouterr().out
  assert "training finished (all 2 epochs done)" in out and "epoch 3" not in out
  assert steps(copy) == before and record["test"] == finished[1]["test"]


def test_epoch_end_record_when_a_save_falls_on_the_last_step(dataset, tmp_path):
  run = loop.Run(config(dataset), tmp_path / "probe", writer=False)
  per_epoch = run.train_input.steps_per_epoch(0)
  assert per_epoch == run.train_input.steps_per_epoch(1)
  wd = tmp_path / "run"
  loop.train_and_evaluate(config(dataset, **{"train.checkpoint_every_steps": per_epoch}), str(wd))
  ckpt = RunCheckpoints(wd, writer=False)
  _, meta = ckpt.restore(run.state)
  assert meta["epoch"] == EPOCHS and meta["iterator"] is None  # the latest record is the end of the last epoch


def test_partial_saves_are_removed(dataset, copy):
  leftover = copy / "checkpoints" / "999.orbax-checkpoint-tmp-1234"
  leftover.mkdir()
  (leftover / "x").write_text("partial")
  loop.train_and_evaluate(config(dataset), str(copy))
  assert not leftover.exists()


# SIGTERM (a preempted TPU VM): save after the step in flight, exit 143, resume exactly: mid-epoch, at an epoch's
# last step (the epoch-end record must be the one saved) and at train.max_steps (the stop must be validated).
def latest(wd: pathlib.Path, dataset, **overrides) -> tuple[list[np.ndarray], dict]:
  run = loop.Run(config(dataset, **overrides), wd)
  state, meta = run.ckpt.restore(run.state)
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))], meta


def per_epoch(dataset, tmp_path) -> int:
  return loop.Run(config(dataset), tmp_path / "probe").train_input.steps_per_epoch(0)


# The epoch-end and max-steps edges are marked slow (make test-slow) to keep make test under its time budget.
@pytest.mark.parametrize(
  "when",
  ["mid_epoch", pytest.param("epoch_end", marks=pytest.mark.slow), pytest.param("max_steps", marks=pytest.mark.slow)],
)
def test_sigterm_saves_and_resumes_exactly(dataset, finished, tmp_path, monkeypatch, when):
  import contextlib
  import threading

  n = per_epoch(dataset, tmp_path)
  at = {"mid_epoch": 5, "epoch_end": n, "max_steps": n + 3}[when]
  overrides = {"train.max_steps": n + 3} if when == "max_steps" else {}
  reference = tmp_path / "reference"
  if overrides:
    loop.train_and_evaluate(config(dataset, **overrides), str(reference))
  else:
    reference = finished[0]
  event, steps_done = threading.Event(), [0]
  real_batch = loop.Run.global_batch

  def counting(self, local):  # the signal arrives while step `at` runs
    steps_done[0] += 1
    if steps_done[0] == at:
      event.set()
    return real_batch(self, local)

  wd = tmp_path / "run"
  with monkeypatch.context() as m:
    m.setattr(loop, "_sigterm_saves", contextlib.contextmanager(lambda: (yield event)))
    m.setattr(loop.Run, "global_batch", counting)
    with pytest.raises(loop.Preempted, match=f"received SIGTERM: saved step {at} ") as e:
      loop.train_and_evaluate(config(dataset, **overrides), str(wd))
  assert e.value.exit_code == 143 and steps(wd)[-1] == at
  record = loop.train_and_evaluate(config(dataset, **overrides), str(wd))
  assert record["test"] == json.loads((reference / "results.json").read_text())["test"]
  (a, meta_a), (b, meta_b) = latest(wd, dataset, **overrides), latest(reference, dataset, **overrides)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert meta_a == meta_b


def test_sigterm_handler_sets_the_event():
  before = signal.getsignal(signal.SIGTERM)
  with loop._sigterm_saves() as event:
    assert not event.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    assert event.wait(5)
  assert signal.getsignal(signal.SIGTERM) is before


def test_refused_warm_start_writes_nothing(dataset, finished, tmp_path):
  cfg = config(dataset, **{"init_from": str(finished[0]), "model.hidden": 32})
  with pytest.raises(UserError, match="was trained with a different model"):
    loop.train_and_evaluate(cfg, str(tmp_path / "ft"), "finetune")
  assert not (tmp_path / "ft").exists()


def test_results_without_checkpoints_are_not_overwritten(dataset, copy):
  shutil.rmtree(copy / "checkpoints")
  shutil.rmtree(copy / "best")
  before = tree_hashes(copy)
  with pytest.raises(UserError, match="results.json but no checkpoint"):
    loop.train_and_evaluate(config(dataset), str(copy))
  assert tree_hashes(copy) == before


def test_rerun_of_a_finished_run_keeps_its_record(dataset, copy):
  results = (copy / "results.json").read_bytes()
  cfg = config(dataset, **{"train.num_epochs": 1})  # a shorter constant-rate schedule: finished as well
  loop.train_and_evaluate(cfg, str(copy))
  assert (copy / "results.json").read_bytes() == results and (copy / loop.EVALUATION_FILE).is_file()
  assert json.loads((copy / "config.json").read_text())["train"]["num_epochs"] == EPOCHS


def test_resume_differences_of_fields_added_later_and_of_other_losses():
  """A config saved before ``train.negatives``/``train.logq``/``train.ce_block`` existed resumes under today's
  defaults, except a sampled-softmax run (it had no logQ correction); fields only another loss reads may differ."""
  new = json.loads(base_config().to_json())
  old = json.loads(base_config().to_json())
  for field in ("negatives", "logq", "ce_block"):
    del old["train"][field]
  assert workdir_lib.resume_differences(old, new) == []
  old["train"]["num_negatives"] = 7  # read by sampled_softmax only
  assert workdir_lib.resume_differences(old, new) == []
  old["train"]["loss"] = new["train"]["loss"] = "sampled_softmax"
  new["train"]["num_negatives"] = 7
  assert workdir_lib.resume_differences(old, new) == ["train.logq: False -> True"]
