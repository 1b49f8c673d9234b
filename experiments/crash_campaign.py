"""Crash campaign: kills training runs at random moments, resumes them, and checks the result bit for bit.

For each stage (pre-training, then prompt-tuning from the uninterrupted pre-trained model) one uninterrupted
reference run is made; then the same command is started again and again in a fresh workdir, each start killed
(SIGKILL, or SIGTERM, which saves and exits) after a random delay drawn over the reference run's wall time, so
kills land before the first checkpoint, inside saves, between epochs and during the final evaluation, until a
start finishes. The finished workdir's final train state (parameters, optimizer state, step, RNG), its best
parameters and its test metrics must equal the reference's exactly.

  python -m experiments.crash_campaign [--kills=12] [--seed=0] [--sigterm_share=0.25] [--min_delay=0]
      [--out=experiments/results] [--name=crash_campaign]

Writes ``<out>/<name>.json`` and ``.md``. Not part of the test suite (it takes a few minutes).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from experiments.configs import default
from recgpt_jax import provenance
from recgpt_jax.train import loop

_KILLS = flags.DEFINE_integer("kills", 12, "Kills in all (split over the two stages).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments and signals.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where crash_campaign.json / .md go.")
_WORK = flags.DEFINE_string("work", "", "Scratch folder (default: a temporary one, removed at the end).")
_SIGTERM_SHARE = flags.DEFINE_float("sigterm_share", 0.25, "Fraction of the kills sent as SIGTERM.")
_MIN_DELAY = flags.DEFINE_float(
  "min_delay", 0.0, "Kill delays are drawn from [min_delay, 1] x the reference run's wall time (0: from the start)."
)
_NAME = flags.DEFINE_string("name", "crash_campaign", "Output file name (without .json / .md).")

STAGES = ("pretrain", "prompt_tune")
CONFIG = "experiments/configs/default.py"
# Small enough for seconds per run, large enough for several epochs, mid-epoch checkpoints and prompts.
OVERRIDES = {
  "max_len": 20,
  "model.hidden": 16,
  "model.num_layers": 1,
  "model.ffn": 32,
  "model.vocab_multiple": 8,
  "train.num_epochs": 3,
  "train.row_len": 24,
  "train.rows_per_batch": 16,
  "train.checkpoint_every_steps": 7,
  "eval.users_per_batch": 256,
  "eval.rows_per_batch": 64,
}


def write_dataset(path: pathlib.Path, users: int = 1500, items: int = 200, seed: int = 0) -> pathlib.Path:
  """Users who walk the catalogue in steps of +1 or +2 (learnable, so the best model changes over epochs)."""
  rng = np.random.default_rng(seed)
  lines = []
  for user in range(1, users + 1):
    start, length, stride = rng.integers(items), rng.integers(5, 25), rng.integers(1, 3)
    seq = (start + stride * np.arange(length)) % items + 1
    lines.append(" ".join(map(str, [user, *seq])))
  path.write_text("\n".join(lines) + "\n")
  return path


def command(stage: str, data: pathlib.Path, workdir: pathlib.Path, init_from: pathlib.Path | None) -> list[str]:
  cmd = [sys.executable, "-m", "recgpt_jax.main", f"--mode={stage}", f"--config={CONFIG}", f"--workdir={workdir}"]
  cmd += [f"--config.dataset={data}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  if init_from is not None:
    cmd += [f"--config.init_from={init_from}", "--config.train.num_epochs=2"]
  return cmd


def start(cmd: list[str], log: pathlib.Path) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)


def config_of(data: pathlib.Path, init_from: pathlib.Path | None):
  c = default.get_config()
  c.dataset = str(data)
  for key, value in OVERRIDES.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  if init_from is not None:
    c.init_from = str(init_from)
    c.train.num_epochs = 2
  return c


def final_state(config, workdir: pathlib.Path, stage: str) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
  """A finished workdir's latest train state (leaves), best parameters (leaves) and progress record."""
  run = loop.Run(config, workdir, stage)
  state, meta = run.ckpt.restore(run.state)
  best, _ = run.ckpt.restore_best(run.state.params)
  run.ckpt.close()
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
  return leaves, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(best))], meta


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
  return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def last_progress(log: pathlib.Path) -> str:
  """The last progress line of a log (what the run was doing when it was killed)."""
  text = log.read_text(errors="replace").replace("\r", "\n")
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  return lines[-1][:120] if lines else "(no output yet)"


def run_killed(cmd, log, ref_time, kills_left, rng, stage, records) -> int:
  """Starts ``cmd`` again and again, killing starts while ``kills_left``; returns the kills made."""
  made, starts = 0, 0
  while True:
    starts += 1
    proc = start(cmd, log)
    if made < kills_left:
      delay = rng.uniform(_MIN_DELAY.value * ref_time, ref_time)
      sig = signal.SIGTERM if rng.random() < _SIGTERM_SHARE.value else signal.SIGKILL
      try:
        rc = proc.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        moment = last_progress(log)
        proc.send_signal(sig)
        rc = proc.wait(timeout=600)
        made += 1
        # SIGTERM: 143 once training has started (a checkpoint was saved), -15 before the handler is installed.
        expected = {143, -15} if sig == signal.SIGTERM else {-9}
        records.append(
          {
            "stage": stage,
            "workdir": cmd[5].split("=", 1)[1],
            "start": starts,
            "signal": sig.name,
            "after_s": round(delay, 1),
            "rc": rc,
            "rc_expected": rc in expected,
            "moment": moment,
          }
        )
        print(f"  kill {len(records)}: {sig.name} after {delay:.1f} s (rc {rc}) at: {moment}", flush=True)
        continue
    else:
      rc = proc.wait(timeout=20 * ref_time + 300)
    if rc != 0:
      raise SystemExit(f"{stage}: a resumed start failed (rc {rc}); see {log}")
    return made


def campaign(work: pathlib.Path, kills: int, rng: random.Random) -> dict:
  """Per stage: a reference run, then rounds of killed-and-resumed runs (fresh workdirs) until the stage's share
  of the kills is spent; odd rounds checkpoint every 7 steps, even rounds once per epoch (the save then falls on
  the epoch's last step)."""
  data = write_dataset(work / "walks.txt")
  records, stages, rounds = [], {}, []
  for si, stage in enumerate(STAGES):
    init_from = work / "pretrain_reference" if stage != "pretrain" else None
    ref_wd = work / f"{stage}_reference"
    t0 = time.time()
    proc = start(command(stage, data, ref_wd, init_from), work / f"{stage}_reference.log")
    if proc.wait() != 0:
      raise SystemExit(f"reference {stage} run failed; see {work / f'{stage}_reference.log'}")
    ref_time = time.time() - t0
    cfg = config_of(data, init_from)
    ref_state, ref_best, ref_meta = final_state(cfg, ref_wd, stage)
    ref_results = json.loads((ref_wd / "results.json").read_text())
    per_epoch = loop.Run(cfg, ref_wd, stage).train_input.steps_per_epoch(0)
    stages[stage] = {"reference_wall_s": round(ref_time, 1), "steps_per_epoch": per_epoch}
    print(f"{stage}: reference run {ref_time:.0f} s, {per_epoch} steps per epoch", flush=True)
    budget = kills // len(STAGES) + (1 if si < kills % len(STAGES) else 0)
    made, r = 0, 0
    while made < budget:
      r += 1
      every = OVERRIDES["train.checkpoint_every_steps"] if r % 2 else per_epoch
      wd, log = work / f"{stage}_round{r}", work / f"{stage}_round{r}.log"
      cmd = command(stage, data, wd, init_from) + [f"--config.train.checkpoint_every_steps={every}"]
      got = run_killed(cmd, log, ref_time, budget - made, rng, stage, records)
      made += got
      state, best, meta = final_state(cfg, wd, stage)
      results = json.loads((wd / "results.json").read_text())
      equal = {
        "train_state": same(state, ref_state),
        "best_params": same(best, ref_best),
        "progress_record": meta == ref_meta,
        "test_metrics": results["test"] == ref_results["test"],
        "best_step": results["best_step"] == ref_results["best_step"],
      }
      rounds.append({"stage": stage, "round": r, "checkpoint_every_steps": every, "kills": got, "equal": equal})
      print(f"{stage} round {r} (checkpoint every {every} steps): {got} kills; equal: {equal}", flush=True)
  return {"stages": stages, "rounds": rounds, "kills": records}


def write_report(out: pathlib.Path, record: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{_NAME.value}.json").write_text(json.dumps(record, indent=2) + "\n")
  checks = ("train_state", "best_params", "progress_record", "test_metrics", "best_step")
  lines = [
    "# Crash campaign",
    "",
    f"Command: `{record['command']}`  ",
    f"Date: {record['date']}; machine: {record['machine']}; commit {record['git_commit']}.",
    "",
    "Each stage: one uninterrupted reference run, then rounds of the same command in a fresh workdir, killed at random",
    "moments (SIGKILL, or SIGTERM which saves and exits) and restarted until a start finishes. Odd rounds checkpoint",
    "every 7 steps, even rounds once per epoch (the periodic save falls on the epoch's last step). Each finished",
    "workdir is compared with the reference bit for bit: the train state (parameters, optimizer state, step, RNG),",
    "the best parameters, the progress record (epoch, iterator, best, history, early-stop count), the test metrics.",
    "",
    "| stage | round | checkpoint every | kills | " + " | ".join(c.replace("_", " ") for c in checks) + " |",
    "|---|---|---|---|" + "---|" * len(checks),
  ]
  for r in record["rounds"]:
    lines.append(
      f"| {r['stage']} | {r['round']} | {r['checkpoint_every_steps']} | {r['kills']} | "
      + " | ".join("equal" if r["equal"][c] else "**DIFFERENT**" for c in checks)
      + " |"
    )
  lines += [
    "",
    "| # | stage | start | signal | after s | exit code | last output before the kill |",
    "|---|---|---|---|---|---|---|",
  ]
  for i, k in enumerate(record["kills"], 1):
    moment = k["moment"].replace("|", "/")
    rc = f"{k['rc']}" if k["rc_expected"] else f"**{k['rc']}** (unexpected)"
    lines.append(f"| {i} | {k['stage']} | {k['start']} | {k['signal']} | {k['after_s']} | {rc} | {moment} |")
  (out / f"{_NAME.value}.md").write_text("\n".join(lines) + "\n")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rng = random.Random(_SEED.value)
  work = pathlib.Path(_WORK.value) if _WORK.value else pathlib.Path(tempfile.mkdtemp(prefix="crash_campaign_"))
  if work.exists() and any(work.iterdir()):
    raise SystemExit(f"--work={work} is not empty")
  work.mkdir(parents=True, exist_ok=True)
  try:
    record = campaign(work, _KILLS.value, rng)
  finally:
    if not _WORK.value:
      shutil.rmtree(work, ignore_errors=True)
  record = {
    "command": " ".join(["python", "-m", "experiments.crash_campaign", *sys.argv[1:]]),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": loop.machine_description(),
    "git_commit": provenance.git_commit(),
    **record,
  }
  write_report(pathlib.Path(_OUT.value), record)
  ok = all(all(r["equal"].values()) for r in record["rounds"]) and all(k["rc_expected"] for k in record["kills"])
  print(f"{'all equal' if ok else 'DIFFERENCES FOUND'}; wrote {_OUT.value}/{_NAME.value}.md")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
