"""Two local processes joined by ``jax.distributed`` train and evaluate exactly like one process.

Both runs use a 2-device mesh (``data=2``): one process with 2 CPU devices, or 2 processes with 1 device
each, each process assembling only its own rows of every batch. The per-step losses and the final
metrics must agree to 1e-6 (the same partitioned computation; only the transport differs).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from tests.helpers import write_cyclic_dataset
from tests.test_cli import TINY

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARGS = [
  "--config=experiments/configs/default.py",
  *TINY,
  "--config.train.log_every_steps=1",
  "--config.train.checkpoint_every_steps=4",
  "--config.mesh.data=2",
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(extra: list[str], devices: int) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
    [sys.executable, "-m", "recgpt_jax.main", *ARGS, *extra],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def finish(proc: subprocess.Popen) -> str:
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return out


def losses(workdir: pathlib.Path) -> list[float]:
  lines = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train/loss"] for r in lines if "train/loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  """The 1-process reference run: (dataset, workdir)."""
  base = tmp_path_factory.mktemp("single")
  data = write_cyclic_dataset(base / "cyclic.txt")
  finish(launch([f"--config.dataset={data}", f"--workdir={base / 'run'}"], devices=2))
  return data, base / "run"


def test_two_slices_match_one_process(single, tmp_path):
  """A multi-slice mesh (each process a slice: `data` spans 2 slices of 1 device) trains identically."""
  data, ref = single
  port = free_port()
  flags = [f"--config.dataset={data}", f"--workdir={tmp_path / 'run'}", f"--coordinator_address=localhost:{port}"]
  flags += ["--config.mesh.data=1", "--config.mesh.data_slices=2", "--num_processes=2"]
  procs = [launch([*flags, f"--process_id={i}"], devices=1) for i in range(2)]
  for p in procs:
    finish(p)
  assert losses(tmp_path / "run") == pytest.approx(losses(ref), rel=1e-6)


def test_two_processes_match_one(single, tmp_path):
  data, single = single
  multi = tmp_path / "multi"
  port = free_port()
  procs = [
    launch(
      [
        f"--config.dataset={data}",
        f"--workdir={multi}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      devices=1,
    )
    for i in range(2)
  ]
  outs = [finish(p) for p in procs]
  assert "test  HR@5" in outs[0] and "test  HR@5" not in outs[1]  # process 0 reports
  one, two = losses(single), losses(multi)
  assert len(one) == len(two) > 4
  assert two == pytest.approx(one, rel=1e-6)
  r1 = json.loads((single / "results.json").read_text())
  r2 = json.loads((multi / "results.json").read_text())
  assert r2["test"] == pytest.approx(r1["test"], abs=1e-6)
  assert r2["valid"] == pytest.approx(r1["valid"], abs=1e-6)
  assert r2["best_step"] == r1["best_step"]
  assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == sorted(
    p.name for p in (single / "checkpoints").iterdir()
  )
  # Both processes restore the checkpoint they wrote together: evaluating it again gives the same metrics.
  port = free_port()
  flags = [
    f"--config.dataset={data}",
    f"--workdir={multi}",
    "--mode=evaluate",
    f"--coordinator_address=localhost:{port}",
  ]
  procs = [launch([*flags, "--num_processes=2", f"--process_id={i}"], devices=1) for i in range(2)]
  for p in procs:
    finish(p)
  again = json.loads((multi / "evaluation.json").read_text())
  assert again["test"] == pytest.approx(r2["test"], abs=1e-7)
