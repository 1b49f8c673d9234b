"""The command line: a real run, and every bad-input case gives one line, a non-zero exit, no damage."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import write_cyclic_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "default.py"
TINY = [
  "--config.max_len=12",
  "--config.model.hidden=16",
  "--config.model.num_layers=1",
  "--config.model.ffn=32",
  "--config.model.vocab_multiple=8",
  "--config.train.num_epochs=2",
  "--config.train.row_len=16",
  "--config.train.rows_per_batch=8",
  "--config.eval.rows_per_batch=48",
  "--config.eval.users_per_batch=64",
]


def cli(*args, check_rc=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-m", "recgpt_jax.main", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
  )
  if check_rc is not None:
    assert proc.returncode == check_rc, proc.stdout + proc.stderr
  return proc


def snapshot(directory: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }


def assert_one_line_error(proc, *fragments, rc=2):
  assert proc.returncode == rc, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  for f in fragments:
    assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run: (dataset path, workdir)."""
  base = tmp_path_factory.mktemp("cli")
  data = write_cyclic_dataset(base / "cyclic.txt")
  workdir = base / "run"
  proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--config.dataset={data}", *TINY, check_rc=0)
  assert "test  HR@5" in proc.stdout and "NDCG@20" in proc.stdout
  return data, workdir


def test_evaluate_mode_reproduces_results(trained):
  data, workdir = trained
  before = json.loads((workdir / "results.json").read_text())
  proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--config.dataset={data}", *TINY, "--mode=evaluate")
  assert proc.returncode == 0, proc.stderr
  after = json.loads((workdir / "evaluation.json").read_text())  # beside results.json, which stays as it is
  assert after["test"] == before["test"] and after["valid"] == before["valid"]
  assert json.loads((workdir / "results.json").read_text()) == before
  assert f"HR@10 {before['test']['HR@10']:.4f}" in next(ln for ln in proc.stdout.splitlines() if ln.startswith("test"))


def test_evaluate_without_checkpoint(tmp_path):
  data = write_cyclic_dataset(tmp_path / "d.txt")
  proc = cli(
    f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'none'}", f"--config.dataset={data}", *TINY, "--mode=evaluate"
  )
  assert_one_line_error(proc, "no checkpoint")


def test_malformed_data_line(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_text("1 3 4 5 6\n2 7 x8 9 10\n")
  proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}", f"--config.dataset={bad}", *TINY)
  assert_one_line_error(proc, "bad.txt:2:", "x8")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  ("args", "fragments"),
  [
    (["--config.no_such_field=1"], ["no_such_field"]),
    (["--config.model.hiden=32"], ["hiden"]),
    (["--config.model.hidden=abc"], ["hidden"]),
    (["--config.dataset=NoSuchSet"], ["unknown dataset", "NoSuchSet"]),
    (["--mode=serve"], ["--mode", "serve"]),
    (["--config.model.attention=linear"], ["attention", "linear"]),
    (["--config.model.num_heads=3"], ["divisible"]),
    (["--config.model.hidden_dropout=1.5"], ["hidden_dropout"]),
    (["--config.train.loss=hinge"], ["train.loss", "hinge"]),
    (["--config.train.row_len=8"], ["row_len"]),
    (["--config=experiments/configs/no_such_config.py"], ["config"]),
    (["--config.model.dtype=int32"], ["model.dtype", "int32", "float"]),
    (["--config.model.param_dtype=float128"], ["model.param_dtype", "float128"]),
    (["--config.model.attention_impl=flash"], ["attention_impl", "flash"]),
    # Implementations this CPU-only machine lacks.
    (
      ["--config.model.attention_impl=cudnn", "--config.model.dtype=bfloat16", "--config.model.attn_dropout=0"],
      ["gpu"],
    ),
    (["--config.model.attention_impl=chunked"], ["chunked", "not an implementation of softmax"]),
    (["--config.model.attention_impl=splash", "--config.model.attn_dropout=0"], ["splash", "tpu", "cpu"]),
  ],
)
def test_bad_flags_and_config(tmp_path, args, fragments):
  proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}", *args)
  assert_one_line_error(proc, *fragments)
  assert not (tmp_path / "run").exists()


def test_failed_runs_do_not_touch_a_finished_workdir(trained, tmp_path):
  data, workdir = trained
  before = snapshot(workdir)
  # A different model in the same workdir.
  proc = cli(
    f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--config.dataset={data}", *TINY, "--config.model.hidden=32"
  )
  assert_one_line_error(proc, "different", "model")
  # The data file became corrupt since the run.
  corrupt = tmp_path / "cyclic.txt"
  corrupt.write_text(data.read_text() + "121 5 0 7\n")
  proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--config.dataset={corrupt}", *TINY)
  assert_one_line_error(proc)  # the dataset path differs from the run's: refused before reading
  proc = cli(
    f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--config.dataset={data}", *TINY, "--config.train.loss=x"
  )
  assert_one_line_error(proc, "train.loss")
  assert snapshot(workdir) == before


def test_corrupt_data_on_resume_leaves_workdir_intact(trained, tmp_path):
  data, workdir = trained
  copy = tmp_path / "run"
  subprocess.run(["cp", "-r", str(workdir), str(copy)], check=True)
  before = snapshot(copy)
  original = data.read_text()
  try:
    data.write_text(original + "121 5 0 7\n")
    proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={copy}", f"--config.dataset={data}", *TINY)
    assert_one_line_error(proc, "cyclic.txt:121:", "0")
  finally:
    data.write_text(original)
  assert snapshot(copy) == before


def test_empty_dataset(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n")
  proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}", f"--config.dataset={empty}", *TINY)
  assert_one_line_error(proc, "empty.txt")


def test_failed_prompt_tuning_start_is_one_line(tmp_path):
  """A prompt-tuning start whose warm start fails: one line, no tensorboardX atexit traceback (Python 3.12)."""
  data = write_cyclic_dataset(tmp_path / "cyclic.txt")
  proc = cli(
    f"--config={DEFAULT_CONFIG}",
    f"--workdir={tmp_path / 'pt'}",
    "--mode=prompt_tune",
    f"--config.dataset={data}",
    f"--config.init_from={tmp_path / 'no_such_run'}",
    *TINY,
  )
  assert_one_line_error(proc, "init_from", "no_such_run")


@pytest.mark.parametrize(
  ("source", "fragments"),
  [
    ("import no_such_module_xyz\n", ["ModuleNotFoundError", "no_such_module_xyz"]),
    ("def get_config():\n  return undefined_name\n", ["NameError", "undefined_name"]),
    ("raise RuntimeError('boom')\n", ["RuntimeError", "boom"]),
    ("def get_config():\n  return 1 / 0\n", ["ZeroDivisionError"]),
  ],
)
def test_config_file_that_raises_is_one_line(tmp_path, cli_worker, source, fragments):
  """The config file is executed while the flags are parsed: whatever it raises used to be a traceback."""
  (tmp_path / "bad_config.py").write_text(source)
  proc = cli_worker(f"--config={tmp_path / 'bad_config.py'}", f"--workdir={tmp_path / 'run'}")
  assert_one_line_error(proc, "cannot load --config", *fragments)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["pretrain", "evaluate", "recommend"])
def test_workdir_that_is_a_file(tmp_path, cli_worker, mode):
  (tmp_path / "a_file").write_text("not a run\n")
  for workdir, fragment in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "run", "is below the file")):
    proc = cli_worker(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", f"--mode={mode}", "--users=1")
    assert_one_line_error(proc, str(workdir), fragment)
  assert (tmp_path / "a_file").read_text() == "not a run\n"


def test_extra_positional_argument_is_one_line(tmp_path):
  """A stray positional argument used to print absl's 39-line usage text (a real process: absl's app.run path)."""
  proc = cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}", "pretrain")
  assert_one_line_error(proc, "unexpected arguments: pretrain")
  assert not (tmp_path / "run").exists()


def test_evaluate_on_a_missing_workdir_creates_nothing(tmp_path, cli_worker):
  data = write_cyclic_dataset(tmp_path / "d.txt")
  proc = cli_worker(
    f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'none'}", f"--config.dataset={data}", *TINY, "--mode=evaluate"
  )
  assert_one_line_error(proc, "no checkpoint")
  assert not (tmp_path / "none").exists()
