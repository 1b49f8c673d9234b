"""Train-step memory and speed at a large catalogue: materialised CE vs blocked CE vs sampled softmax.

For each loss form, in its own process (so peak RSS is that form's alone): the pre-training step of the given
model at ``--items`` items is compiled ahead of time on one CPU device (XLA's ``memory_analysis``: argument,
output and temporary bytes: an estimate of the step's device memory), then run for ``--steps`` steps on random
packed rows (seconds per step after the first, which compiles, and the process's peak RSS).

  python -m experiments.bench_large_vocab --items=1000000 --rows=16 --row_len=64 --steps=5

Writes experiments/results/bench_large_vocab.{json,md} with the command, date and machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

from recgpt_jax import errors, provenance

FORMS = {
  "materialised_ce": {"train.loss": "ce", "train.ce_block": 0},
  "blocked_ce": {"train.loss": "ce"},  # train.ce_block from --block
  "sampled_softmax_mixed": {"train.loss": "sampled_softmax", "train.negatives": "mixed"},
}

_ITEMS = flags.DEFINE_integer("items", 1_000_000, "Catalogue size.")
_ROWS = flags.DEFINE_integer("rows", 16, "Packed rows per batch.")
_ROW_LEN = flags.DEFINE_integer("row_len", 64, "Row length (tokens per row).")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Model width.")
_BLOCK = flags.DEFINE_integer("block", 16384, "Item rows per block of the blocked CE.")
_NEGATIVES = flags.DEFINE_integer("num_negatives", 1024, "Uniform negatives of the sampled softmax (plus in-batch).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
_FORMS = flags.DEFINE_list("forms", list(FORMS), "Loss forms to measure.")
_ONE = flags.DEFINE_string("one", "", "Internal: measure this form in this process and print its JSON.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where the results go.")


def _config(form: str):
  from recgpt_jax.config import base_config

  c = base_config()
  c.max_len = _ROW_LEN.value
  c.train.row_len = _ROW_LEN.value
  c.train.rows_per_batch = _ROWS.value
  c.model.hidden = _HIDDEN.value
  c.model.ffn = 4 * _HIDDEN.value
  c.train.num_negatives = _NEGATIVES.value
  c.train.ce_block = _BLOCK.value
  for key, value in FORMS[form].items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def measure(form: str) -> dict:
  """Compile and run one form's train step in this process."""
  import jax
  import numpy as np
  from flax import nnx

  from recgpt_jax.model.transformer import RecGPT
  from recgpt_jax.parallel import aot
  from recgpt_jax.train import step as step_lib

  c = _config(form)
  items, users = _ITEMS.value, 100_000
  built = aot.build(c, num_items=items, num_users=users, devices=jax.devices()[:1])
  program = aot.train_program(built, "pretrain")
  begin = time.perf_counter()
  compiled = aot.compile_program(program)
  compile_s = time.perf_counter() - begin
  mem = aot.memory(compiled.compiled, limit=1 << 62)

  rng = np.random.default_rng(0)
  rows, length = _ROWS.value, _ROW_LEN.value
  user_len = 16
  seq = np.repeat(np.arange(rows * length // user_len) + 1, user_len).reshape(rows, length)
  pos = np.tile(np.arange(user_len), rows * length // user_len).reshape(rows, length)
  batch = {
    "items": rng.integers(1, items + 1, (rows, length)),
    "targets": rng.integers(1, items + 1, (rows, length)),
    "positions": pos,
    "segments": np.zeros((rows, length)),
    "seq_ids": seq,
    "users": rng.integers(1, users + 1, (rows, length)),
  }
  batch = {
    k: jax.device_put(np.asarray(v, np.int32), program.args[1][k].sharding)
    for k, v in batch.items()
    if k in program.args[1]
  }
  _, state = step_lib.init_state(RecGPT(built.model_cfg, rngs=nnx.Rngs(0)), built.tx, 0)
  state = jax.device_put(state, built.state_sharding)
  fn = compiled.compiled
  state, metrics = fn(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    begin = time.perf_counter()
    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - begin)
  return {
    "form": form,
    "compile_s": compile_s,
    "memory_analysis_estimate": mem,
    "step_s_median": float(np.median(times)),
    "step_s": times,
    "loss": float(metrics["loss"]),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def _markdown(record: dict) -> str:
  lines = [
    "# Train step at a large catalogue: materialised CE vs blocked CE vs sampled softmax",
    "",
    f"Command: `{record['command']}`  ",
    f"Date: {record['date']}; machine: {record['cpu']} ({os.cpu_count()} cores), one CPU device; commit"
    f" {record['git_commit']}.",
    "",
    f"{record['items']:,} items, {record['tokens']:,} tokens per step ({record['rows']} rows x {record['row_len']}),"
    f" hidden {record['hidden']}; blocked CE block {record['block']:,} rows; sampled softmax: "
    f"{record['num_negatives']:,} uniform + in-batch negatives, logQ-corrected.",
    "",
    "Step memory is XLA's `memory_analysis` of the AOT-compiled step (arguments + outputs - aliased + temporaries:"
    " an estimate of device memory); peak RSS is the whole process's (model, Adam state, the compiled program"
    " and its buffers).",
    "",
    "| form | step memory (estimate) | of which temporaries | materialised / this | peak RSS | s / step | loss |",
    "|---|---|---|---|---|---|---|",
  ]
  base = next((r for r in record["results"] if r["form"] == "materialised_ce"), None)
  for r in record["results"]:
    if "error" in r:
      lines.append(f"| {r['form']} | failed: {r['error']} | | | | | |")
      continue
    m = r["memory_analysis_estimate"]
    ratio = ""
    if base is not None and "error" not in base:
      ratio = f"{base['memory_analysis_estimate']['total_bytes'] / m['total_bytes']:.1f}x"
    lines.append(
      f"| {r['form']} | {m['total_bytes'] / 2**30:.2f} GiB | {m['temp_bytes'] / 2**30:.2f} GiB | {ratio} |"
      f" {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['step_s_median']:.3f} | {r['loss']:.3f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  unknown = [f for f in _FORMS.value if f not in FORMS]
  if unknown:
    print(f"error: unknown --forms {unknown}; expected some of {list(FORMS)}", file=sys.stderr)
    sys.exit(2)
  if _ONE.value:
    print(json.dumps(measure(_ONE.value)))
    return
  results = []
  for form in _FORMS.value:
    print(f"[{form}] compiling and running ...", file=sys.stderr, flush=True)
    args = [a for a in sys.argv[1:] if not a.startswith("--one")]
    proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_large_vocab", *args, f"--one={form}"],
      capture_output=True,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    if proc.returncode != 0:
      tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      results.append({"form": form, "error": f"exit {proc.returncode}: {tail[:200]}"})
    else:
      results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"[{form}] {json.dumps(results[-1])[:300]}", file=sys.stderr, flush=True)
  record = {
    **provenance.record_header("experiments.bench_large_vocab"),
    "items": _ITEMS.value,
    "rows": _ROWS.value,
    "row_len": _ROW_LEN.value,
    "tokens": _ROWS.value * _ROW_LEN.value,
    "hidden": _HIDDEN.value,
    "block": _BLOCK.value,
    "num_negatives": _NEGATIVES.value,
    "results": results,
  }
  provenance.write_record(_OUT.value, "bench_large_vocab", record, _markdown(record))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags_or_exit)
