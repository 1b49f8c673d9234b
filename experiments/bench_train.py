"""Benchmark: useful target tokens per second of a training step at the reference configuration.

Reference configuration (RecGPT's own runs): hidden 256, 1 layer, 2 heads, FFN 512, flow attention,
max length 50, about 256 users per batch, Adam.

* ``--stage=pretrain``: BCE with one random negative, dropout 0.5 / 0.1. The reference PyTorch code does
  about 200 non-padding target tokens/s on this 2-core machine.
* ``--stage=prompt_tune``: prompts generated on device from the current parameters (mode ``last``,
  ``w = 1``), full-softmax cross-entropy over all items, dropout 0.1. The reference does about 110
  tokens/s here.

Variants differ only in the batch layout: ``padded`` is the reference's layout (one user per row, 256
rows of 50; pre-training only), the others pack several users per row. Variants run interleaved in
rounds so that machine noise hits all of them alike; compilation and the first steps are excluded.

  python -m experiments.bench_train --stage=pretrain [--steps_per_round=5 --rounds=6]

Writes experiments/results/bench_<stage>.json and bench_<stage>.md.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags

from experiments import reference
from recgpt_jax import allocator
from recgpt_jax.config import base_config
from recgpt_jax.data import io, split, tfds_builder
from recgpt_jax.train import loop
from recgpt_jax.train import step as step_lib

# The authors' PyTorch code on this machine (recgpt-reference.md), target tokens per second.
REFERENCE_TOKENS_PER_S = {"pretrain": 200.0, "prompt_tune": 110.0}
USERS_PER_BATCH = 256

_STEPS = flags.DEFINE_integer("steps_per_round", 5, "Timed steps per variant per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Interleaved rounds.")
_DATASET = flags.DEFINE_string("dataset", "Beauty", "Bundled dataset.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where to write bench_<stage>.{json,md}.")
_STAGE = flags.DEFINE_enum("stage", "pretrain", ["pretrain", "prompt_tune"], "Which training step.")
_ALLOCATOR = flags.DEFINE_enum(
  "allocator", "auto", allocator.CHOICES, "Memory allocator (recgpt_jax.allocator): auto = tcmalloc if present."
)

# (name, row_len, rows_per_batch, packed): rows chosen so that a batch holds about 256 Beauty users.
VARIANTS = (
  ("padded 256x50 (reference layout)", 50, 256, False),
  ("packed rows of 50", 50, 30, True),
  ("packed rows of 64", 64, 24, True),
  ("packed rows of 128", 128, 12, True),
)


def padded_batches(data, max_len: int, num_batches: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """The reference layout: 256 random users per batch, one per row, padded to ``max_len``."""
  train = split.make_train_set(data.users, data.sequences, max_len)
  order = np.random.default_rng(seed).permutation(len(train.users))
  batches = []
  for b in range(num_batches):
    batch = {k: np.zeros((USERS_PER_BATCH, max_len), np.int32) for k in (*step_lib.MODEL_INPUTS, "targets")}
    for r, u in enumerate(order[b * USERS_PER_BATCH : (b + 1) * USERS_PER_BATCH]):
      n = len(train.inputs[u])
      batch["items"][r, :n] = train.inputs[u]
      batch["targets"][r, :n] = train.targets[u]
      batch["positions"][r, :n] = np.arange(n)
      batch["seq_ids"][r, :n] = 1
      batch["users"][r, :n] = train.users[u]
    batches.append(batch)
  return batches


def main(argv):
  del argv
  allocator.use(_ALLOCATOR.value)  # re-executes this command on tcmalloc when asked and available
  stage = _STAGE.value
  prompt = stage == "prompt_tune"
  cfg = base_config()
  cfg.optimizer.learning_rate = 5e-4 if prompt else 1e-3
  data = io.load_dataset(_DATASET.value)
  source = tfds_builder.data_source(data.source)[0]
  model_cfg = reference.model_config(data, stage)
  target_key = "p_targets" if prompt else "targets"
  num_batches = 6
  runs = []
  for name, row_len, rows, packed in VARIANTS:
    if prompt and not packed:
      continue
    if packed:
      batches = reference.train_batches(source, stage, num_batches, row_len=row_len, rows_per_batch=rows)
    else:
      batches = padded_batches(data, 50, num_batches)
    step, state, _ = reference.train_step(model_cfg, stage, cfg.optimizer)  # row-sparse tables, as the loop
    batches = [jax.device_put(b) for b in batches]
    t0 = time.perf_counter()
    state, _ = step(state, batches[0])
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    for b in batches[1:3]:  # warm-up
      state, _ = step(state, b)
    jax.block_until_ready(state)
    users = [int(sum(len(np.unique(r[r > 0])) for r in np.asarray(b["seq_ids"]))) for b in batches]
    tokens = [int(np.sum(np.asarray(b[target_key]) > 0)) for b in batches]
    positions = batches[0][target_key].size
    runs.append(
      dict(
        name=name,
        row_len=row_len,
        rows=rows if packed else USERS_PER_BATCH,
        step=step,
        state=state,
        batches=batches,
        users=users,
        tokens=tokens,
        positions=positions,
        compile_s=compile_s,
        times=[],
        step_tokens=[],
      )
    )
    print(f"{name}: compiled in {compile_s:.1f}s", flush=True)

  for r in range(_ROUNDS.value):
    for run in runs:
      for i in range(_STEPS.value):
        b = (r * _STEPS.value + i) % num_batches
        t0 = time.perf_counter()
        run["state"], out = run["step"](run["state"], run["batches"][b])
        jax.block_until_ready(out)
        run["times"].append(time.perf_counter() - t0)
        run["step_tokens"].append(run["tokens"][b])
    print(f"round {r + 1}/{_ROUNDS.value} done", flush=True)

  results = []
  for run in runs:
    rates = [t / s for t, s in zip(run["step_tokens"], run["times"], strict=False)]
    tok_s = sum(run["step_tokens"]) / sum(run["times"])
    results.append(
      {
        "variant": run["name"],
        "row_len": run["row_len"],
        "rows_per_batch": run["rows"],
        "users_per_batch_mean": round(statistics.mean(run["users"]), 1),
        "real_fraction": round(sum(run["tokens"]) / (run["positions"] * len(run["tokens"])), 4),
        "step_s_median": statistics.median(run["times"]),
        "step_s_min": min(run["times"]),
        "step_s_max": max(run["times"]),
        "tokens_per_s": tok_s,
        "tokens_per_s_median_step": statistics.median(rates),
        "users_per_s": statistics.mean(run["users"]) / statistics.median(run["times"]),
        "speedup_vs_reference": tok_s / REFERENCE_TOKENS_PER_S[stage],
        "compile_s": run["compile_s"],
        "timed_steps": len(run["times"]),
      }
    )
  record = {
    "benchmark": f"{stage}_step",
    "command": "python " + " ".join(sys.argv),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": loop.machine_description(),
    "git_commit": loop.git_commit(),
    "jax_version": jax.__version__,
    "allocator": allocator.loaded(),
    "config": {
      "dataset": data.source,
      "hidden": 256,
      "layers": 1,
      "heads": 2,
      "ffn": 512,
      "attention": "flow",
      "max_len": 50,
      "loss": "ce (full softmax)" if prompt else "bce (1 negative)",
      "dropout": [model_cfg.attn_dropout, model_cfg.hidden_dropout],
      "prompts": "last, w=1, generated on device every step" if prompt else None,
      "users_per_batch": "~256",
    },
    "reference_tokens_per_s": REFERENCE_TOKENS_PER_S[stage],
    "results": results,
  }
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"bench_{stage}.json").write_text(json.dumps(record, indent=2) + "\n")
  lines = [
    f"# {'Prompt-tuning' if prompt else 'Pre-training'} step, reference configuration ({data.source})",
    "",
    f"`{record['command']}` on {record['date']}, {record['machine']}, {record['allocator']} malloc,"
    f" jax {jax.__version__},"
    f" commit {record['git_commit']}.",
    "",
    "| layout | rows x len | users/batch | real positions | step (median, min-max) | target tokens/s"
    f" | vs reference ({REFERENCE_TOKENS_PER_S[stage]:.0f} tok/s) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['variant']} | {r['rows_per_batch']}x{r['row_len']} | {r['users_per_batch_mean']}"
      f" | {r['real_fraction']:.1%} "
      f"| {r['step_s_median'] * 1e3:.0f} ms ({r['step_s_min'] * 1e3:.0f}-{r['step_s_max'] * 1e3:.0f}) "
      f"| {r['tokens_per_s']:,.0f} | {r['speedup_vs_reference']:.0f}x |"
    )
  (out / f"bench_{stage}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
