"""Shared test fixtures: a tiny learnable dataset and a tiny config."""

from __future__ import annotations

import pathlib

import numpy as np

from recgpt_jax.config import base_config


def write_cyclic_dataset(path: pathlib.Path, num_users: int = 120, num_items: int = 30, seed: int = 0) -> pathlib.Path:
  """Writes a RecGPT text file where every user walks the catalogue in steps of +1 (mod num_items).

  The next item is a deterministic function of the last one, so a model that learns anything ranks the
  answer first, while a random ranking gets HR@10 about 10 / num_items.
  """
  rng = np.random.default_rng(seed)
  lines = []
  for user in range(1, num_users + 1):
    start, length = rng.integers(num_items), rng.integers(5, 14)
    items = (start + np.arange(length)) % num_items + 1
    lines.append(" ".join(map(str, [user, *items])))
  path.write_text("\n".join(lines) + "\n")
  return path


def write_cyclic_log(base: pathlib.Path, user_prefix: str, num_users: int = 40) -> pathlib.Path:
  """The cyclic dataset as an interaction log ``base/log.csv`` with raw ids unlike the dense ones: users
  ``<user_prefix><n>``, items the numbers 1000 + <item> (numeric raw ids, as in many logs)."""
  cyclic = write_cyclic_dataset(base / "cyclic.txt", num_users=num_users)
  rows = []
  for line in cyclic.read_text().splitlines():
    user, *items = line.split()
    rows += [f"{user_prefix}{user},{1000 + int(i)},{t}" for t, i in enumerate(items)]
  log = base / "log.csv"
  log.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
  return log


def tiny_config(dataset: pathlib.Path, **overrides):
  """A config small enough to train for a few epochs in seconds."""
  c = base_config()
  c.name = "tiny"
  c.dataset = str(dataset)
  c.max_len = 12
  c.model.hidden = 16
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.ffn = 32
  c.model.vocab_multiple = 8  # 30 items + padding row -> 32 rows: splits over up to 8 model shards
  c.mesh.data = 1  # one device unless a test asks for a mesh
  c.model.attn_dropout = 0.0
  c.model.hidden_dropout = 0.1
  c.train.num_epochs = 6
  c.train.row_len = 16
  c.train.rows_per_batch = 8
  c.train.checkpoint_every_steps = 3
  c.train.log_every_steps = 1
  c.optimizer.learning_rate = 1e-2
  c.eval.users_per_batch = 64
  c.eval.rows_per_batch = 48
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


class CliWorker:
  """Runs command lines (``python -m recgpt_jax.main ARGS``) in one long-lived worker process (tests/cli_worker.py):
  the same parsing, exit codes and stdout/stderr as a fresh process, without seconds of start-up per command.

  ``worker(*args)`` returns a ``subprocess.CompletedProcess`` (``returncode``, ``stdout``, ``stderr``).
  """

  def __init__(self, root: pathlib.Path, env: dict[str, str] | None = None):
    import subprocess
    import sys
    import tempfile

    self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close(); the worker's own stderr)
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "tests.cli_worker"],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self._log,
      text=True,
      cwd=root,
      env=env,
    )

  def __call__(self, *args):
    import json
    import subprocess

    args = [str(a) for a in args]
    self._proc.stdin.write(json.dumps(args) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      self._log.seek(0)
      raise RuntimeError(f"the CLI worker died on {args}: {self._log.read()[-2000:]}")
    reply = json.loads(line)
    return subprocess.CompletedProcess(args, reply["rc"], reply["stdout"], reply["stderr"])

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)
    self._log.close()
