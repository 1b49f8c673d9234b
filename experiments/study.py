"""The RecGPT study: datasets x recipes x seeds, resumable, with one report.

  python -m experiments.study tune [--datasets=Beauty,...]   # the baseline sweep on valid (seed 0)

Every run is one ``python -m recgpt_jax.main`` process with its own workdir under ``--runs`` and its results
JSON under ``--results``; a run whose results JSON exists is skipped, and an interrupted run resumes from its
checkpoint, so the same command continues a study across sessions.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from experiments.configs import study as study_config
from recgpt_jax import errors
from recgpt_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/study.py"

# The baseline sweep: one factor at a time from the base (experiments/configs/study.py), seed 0, selected on
# valid NDCG@10. Patience 5 instead of the study's 10 keeps it affordable on 2 CPU cores.
SWEEP: dict[str, dict] = {
  "base": {},
  "hidden128": {"model.hidden": 128, "model.ffn": 512},
  "layers3": {"model.num_layers": 3},
  "dropout0.3": {"model.attn_dropout": 0.3, "model.hidden_dropout": 0.3},
  "lr2e-3": {"optimizer.learning_rate": 2e-3},
  "len100": {"max_len": 100, "train.row_len": 128, "train.rows_per_batch": 16},
}
SWEEP_SETTINGS = {"train.patience": 5}

_DATASETS = flags.DEFINE_list("datasets", list(study_config.DATASETS), "Datasets of the study.")
_RUNS = flags.DEFINE_string("runs", "runs/study", "Where run workdirs go.")
_RESULTS = flags.DEFINE_string("results", "experiments/results/study", "Where per-run JSON and the report go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands of the runs still to do; run nothing.")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: a stage of ``recgpt_jax.main`` with a config and overrides."""

  name: str  # unique within the study: the results file name
  dataset: str
  stage: str
  overrides: tuple[tuple[str, object], ...]
  group: str  # results sub-folder

  def workdir(self) -> pathlib.Path:
    return pathlib.Path(_RUNS.value) / self.group / self.name

  def result(self) -> pathlib.Path:
    return pathlib.Path(_RESULTS.value) / self.group / f"{self.name}.json"

  def command(self) -> list[str]:
    flags_ = [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides]
    return [
      sys.executable,
      "-m",
      "recgpt_jax.main",
      f"--mode={self.stage}",
      f"--config={CONFIG}:{self.dataset}",
      f"--workdir={self.workdir()}",
      f"--config.name={self.name}",
      f"--config.results_dir={self.result().parent}",
      *flags_,
    ]


def _flag_value(v) -> str:
  if isinstance(v, tuple):
    return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def tune_runs(datasets) -> list[RunSpec]:
  """The sweep, point by point across datasets (every dataset gets its base first)."""
  runs = []
  for point, overrides in SWEEP.items():
    for ds in datasets:
      settings = {**SWEEP_SETTINGS, **overrides, "seed": 0}
      runs.append(RunSpec(f"{ds}__{point}", ds, "pretrain", tuple(settings.items()), "tune"))
  return runs


def execute(runs: list[RunSpec]) -> None:
  """Runs what is not finished, in order; a failed run is reported and the next one starts."""
  todo = [r for r in runs if not r.result().exists()]
  print(f"{len(runs) - len(todo)} of {len(runs)} runs finished; {len(todo)} to do", flush=True)
  failed = []
  for i, r in enumerate(todo):
    cmd = r.command()
    if _DRY_RUN.value:
      print(" ".join(cmd))
      continue
    log = pathlib.Path(_RUNS.value) / "logs" / f"{r.group}__{r.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[{i + 1}/{len(todo)}] {r.name} ({r.stage}) -> {log}", flush=True)
    with open(log, "a") as f:
      f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
      f.flush()
      env = {**os.environ, "RECGPT_COMMAND": " ".join(cmd[1:])}
      rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    status = "done" if rc == 0 and r.result().exists() else f"FAILED (exit {rc}; see {log})"
    if rc != 0:
      failed.append(r.name)
    print(f"    {status} in {time.time() - t0:.0f} s", flush=True)
  if failed:
    raise UserError(f"{len(failed)} runs failed: {', '.join(failed)}")


def main(argv):
  if len(argv) != 2 or argv[1] not in ("tune",):
    raise UserError("usage: python -m experiments.study tune [--datasets=...]")
  unknown = [d for d in _DATASETS.value if d not in study_config.DATASETS]
  if unknown:
    raise UserError(f"unknown dataset(s) {', '.join(unknown)}; expected some of {', '.join(study_config.DATASETS)}")
  execute(tune_runs(_DATASETS.value))


def run():
  def guarded(argv):
    try:
      main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)

  app.run(guarded, flags_parser=errors.parse_flags_or_exit)


if __name__ == "__main__":
  run()
