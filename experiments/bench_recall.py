"""Benchmark: multi-interest recall (K = 20, m = 18, n = 2) for all Beauty test users.

Reference configuration: hidden 256, 1 layer, 2 heads, FFN 512, max length 50, random init (timing
only). The reference PyTorch code recalls about 46 users/s on this 2-core machine: two full forward
passes over padded sequences and a host-side sort.

Measured, with compilation and one warm-up pass excluded, in interleaved rounds so machine noise hits all
variants alike (the machine is shared: the load average is recorded, figures are never adjusted):

1. layout sweep: users/s of the 2-step flow recall for a few ``users_per_batch`` (rows sized to fit);
2. at the fastest layout, flow and softmax: a full pass over all test users with the 1-step recall
   (``quotas=(20,)``) and the 2-step recall (``quotas=(18, 2)``). The cost of the second step is
   ``t(2-step) / t(1-step) - 1``: everything the second step adds (decode state built in the prefill, one
   decode step, a second scoring and top-2), relative to the whole 1-step recall;
3. pieces, each jitted alone over the same batches: prefill (hidden only / with decode state), one decode
   step, scoring + exclusion + top-m, scoring alone and top-2 alone, and a full forward pass of the packed
   rows (the re-encoding that the decode step replaces).
   ``step 2 / step 1 = (decode + select n) / (prefill with state + select m)``.

A pass is every batch dispatched, then one wait (batches are on device beforehand; packing excluded).

  python experiments/bench_recall.py [--rounds=5 --sweep_rounds=3]

Writes experiments/results/bench_recall.json and bench_recall.md.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from recgpt_jax.data import io, packing, split
from recgpt_jax.eval.metrics import exclude_items
from recgpt_jax.model import decode
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.recall import decoder
from recgpt_jax.train import loop

REFERENCE_USERS_PER_S = 46.0  # the authors' code, this machine (lead's measurement)
ROW_LEN = 50
MAX_LEN = 50
QUOTAS_2 = (18, 2)
QUOTAS_1 = (20,)

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timed passes per variant (main comparison).")
_SWEEP_ROUNDS = flags.DEFINE_integer("sweep_rounds", 3, "Timed passes per layout in the sweep.")
_PIECE_REPEATS = flags.DEFINE_integer("piece_repeats", 5, "Timed repeats of each piece.")
_PIECE_BATCHES = flags.DEFINE_integer("piece_batches", 6, "Batches the pieces are timed on.")
_USERS_PER_BATCH = flags.DEFINE_list("users_per_batch", ["256", "512", "1024", "2048"], "Layouts to sweep.")
_DATASET = flags.DEFINE_string("dataset", "Beauty", "Bundled dataset.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where to write bench_recall.{json,md}.")


def rows_for(users_per_batch: int, mean_len: float) -> int:
  """Rows that hold ``users_per_batch`` average windows at ~85% fill (first fit leaves gaps)."""
  return math.ceil(users_per_batch * mean_len / (ROW_LEN * 0.85))


def timed(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def stats(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def make_model(num_items: int, num_users: int, attention: str):
  cfg = ModelConfig(
    num_items=num_items,
    num_users=num_users,
    max_len=MAX_LEN,
    hidden=256,
    num_layers=1,
    num_heads=2,
    ffn=512,
    attention=attention,
    norm="post",
    user_module=True,
  )
  graphdef, state = nnx.split(RecGPT(cfg, rngs=nnx.Rngs(0)))
  return graphdef, nnx.to_pure_dict(state)


def full_pass(fn, params, batches) -> Callable[[], list]:
  return lambda: [fn(params, b) for b in batches]


def piece_fns(graphdef) -> dict[str, Callable]:
  """Jitted pieces of the 2-step recall (see the module docstring)."""

  def merged(params):
    return nnx.merge(graphdef, params)

  def prefill_args(b):
    return (b[k] for k in decoder.PREFILL_INPUTS)

  @jax.jit
  def prefill_hidden(params, b):
    return decode.prefill(merged(params), *prefill_args(b), max_steps=0)[0]

  @jax.jit
  def prefill_state(params, b):
    return decode.prefill(merged(params), *prefill_args(b), max_steps=len(QUOTAS_2) - 1)

  @jax.jit
  def decode_one(params, state, items_u):
    ones = jnp.ones_like(items_u)
    return decode.decode_step(merged(params), state, items_u, ones, state.position + 1, state.user)[0]

  def select(m):
    @jax.jit
    def fn(params, h_ud, exclude_ue):
      return jax.lax.optimization_barrier(jax.lax.top_k(exclude_items(merged(params).logits(h_ud), exclude_ue), m))

    return fn

  @jax.jit
  def score(params, h_ud):
    return merged(params).logits(h_ud)

  @jax.jit
  def top_n(scores_uv):
    return jax.lax.top_k(scores_uv, QUOTAS_2[1])

  @jax.jit
  def full_forward(params, b):
    h = merged(params)(*(b[k] for k in ("items", "positions", "segments", "seq_ids", "users")))
    return h[b["last_row"], b["last_col"]]

  return dict(
    prefill_hidden=prefill_hidden,
    prefill_state=prefill_state,
    decode_one=decode_one,
    select_m=select(QUOTAS_2[0]),
    select_n=select(QUOTAS_2[1]),
    score=score,
    top_n=top_n,
    full_forward=full_forward,
  )


def time_pieces(graphdef, params, batches, repeats: int) -> dict[str, dict[str, float]]:
  """Per-batch seconds of each piece over ``batches`` (inputs precomputed, each piece alone)."""
  f = piece_fns(graphdef)
  hidden = [f["prefill_hidden"](params, b) for b in batches]
  states = [f["prefill_state"](params, b)[1] for b in batches]
  firsts = [f["select_m"](params, h, b["history"]) for h, b in zip(hidden, batches, strict=True)]
  generated = [top[1][:, 0] for top in firsts]
  exclude2 = [jnp.concatenate([b["history"], top[1]], axis=1) for b, top in zip(batches, firsts, strict=True)]
  hidden2 = [f["decode_one"](params, s, g) for s, g in zip(states, generated, strict=True)]
  scores2 = [exclude_items(f["score"](params, h), e) for h, e in zip(hidden2, exclude2, strict=True)]
  runs = {
    "prefill_hidden": lambda: [f["prefill_hidden"](params, b) for b in batches],
    "prefill_state": lambda: [f["prefill_state"](params, b) for b in batches],
    "select_m": lambda: [f["select_m"](params, h, b["history"]) for h, b in zip(hidden, batches, strict=True)],
    "decode_one": lambda: [f["decode_one"](params, s, g) for s, g in zip(states, generated, strict=True)],
    "select_n": lambda: [f["select_n"](params, h, e) for h, e in zip(hidden2, exclude2, strict=True)],
    "score": lambda: [f["score"](params, h) for h in hidden2],
    "top_n": lambda: [f["top_n"](s) for s in scores2],
    "full_forward": lambda: [f["full_forward"](params, b) for b in batches],
  }
  for run in runs.values():  # compile + warm-up
    timed(run)
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      times[name].append(timed(run) / len(batches))
  return {name: stats(t) for name, t in times.items()}


def main(argv):
  del argv
  load_start = os.getloadavg()
  data = io.load_dataset(_DATASET.value)
  eval_set = split.make_eval_set(data.users, data.sequences, "test", MAX_LEN)
  num_users = len(eval_set.users)
  mean_len = float(np.mean([len(w) for w in eval_set.windows]))
  print(f"{num_users} test users, mean window {mean_len:.2f}", flush=True)

  layouts = {}
  for u in (int(x) for x in _USERS_PER_BATCH.value):
    rows = rows_for(u, mean_len)
    batches = packing.pack_eval_batches(eval_set, row_len=ROW_LEN, rows_per_batch=rows, users_per_batch=u)
    layouts[u] = {
      "users_per_batch": u,
      "rows_per_batch": rows,
      "batches": len(batches),
      "real_fraction": round(packing.real_fraction(batches), 4),
      "users_per_batch_mean": round(num_users / len(batches), 1),
      "device_batches": [jax.device_put(b) for b in batches],
    }
  models = {kind: make_model(data.num_items, data.num_users, kind) for kind in ("flow", "softmax")}

  def prepare(kind: str, quotas: tuple[int, ...], users_per_batch: int) -> dict:
    graphdef, params = models[kind]
    fn = decoder.make_recall_fn(graphdef, quotas)
    batches = layouts[users_per_batch]["device_batches"]
    compile_s = timed(lambda: fn(params, batches[0]))
    timed(full_pass(fn, params, batches))  # warm-up pass
    return {"run": full_pass(fn, params, batches), "compile_s": compile_s, "times": []}

  # 1. Layout sweep (flow, 2 steps).
  sweep = {u: prepare("flow", QUOTAS_2, u) for u in layouts}
  for r in range(_SWEEP_ROUNDS.value):
    for v in sweep.values():
      v["times"].append(timed(v["run"]))
    print(f"sweep round {r + 1}/{_SWEEP_ROUNDS.value}", flush=True)
  sweep_results = []
  for u, v in sweep.items():
    layout = {k: x for k, x in layouts[u].items() if k != "device_batches"}
    s = stats(v["times"])
    sweep_results.append({**layout, **s, "users_per_s": num_users / s["median_s"], "compile_s": v["compile_s"]})
    print(f"  users_per_batch={u}: {num_users / s['median_s']:.0f} users/s", flush=True)
  best = max(sweep_results, key=lambda r: r["users_per_s"])["users_per_batch"]
  del sweep

  # 2. Main comparison at the best layout, interleaved.
  main_runs = {(kind, q): prepare(kind, q, best) for kind in ("flow", "softmax") for q in (QUOTAS_1, QUOTAS_2)}
  for r in range(_ROUNDS.value):
    for v in main_runs.values():
      v["times"].append(timed(v["run"]))
    print(f"main round {r + 1}/{_ROUNDS.value}", flush=True)
  results = []
  for kind in ("flow", "softmax"):
    one, two = (stats(main_runs[(kind, q)]["times"]) for q in (QUOTAS_1, QUOTAS_2))
    for q, s in ((QUOTAS_1, one), (QUOTAS_2, two)):
      results.append(
        {
          "attention": kind,
          "quotas": list(q),
          **s,
          "users_per_s": num_users / s["median_s"],
          "speedup_vs_reference": num_users / s["median_s"] / REFERENCE_USERS_PER_S,
          "compile_s": main_runs[(kind, q)]["compile_s"],
        }
      )
    results[-1]["second_step_cost_vs_1step"] = two["median_s"] / one["median_s"] - 1.0
  del main_runs

  # 3. Pieces, per batch.
  piece_batches = layouts[best]["device_batches"][: _PIECE_BATCHES.value]
  pieces = {}
  for kind in ("flow", "softmax"):
    graphdef, params = models[kind]
    p = time_pieces(graphdef, params, piece_batches, _PIECE_REPEATS.value)
    med = {name: v["median_s"] for name, v in p.items()}
    step1 = med["prefill_state"] + med["select_m"]
    step2 = med["decode_one"] + med["select_n"]
    pieces[kind] = {
      "per_batch": p,
      "step1_s": step1,
      "step2_s": step2,
      "step2_over_step1": step2 / step1,
      "decode_over_prefill_state": med["decode_one"] / med["prefill_state"],
      "decode_over_full_forward": med["decode_one"] / med["full_forward"],
      # The exact second step cannot skip scoring the whole table and one top-n over it.
      "score_topn_over_step1": (med["score"] + med["top_n"]) / step1,
    }
    print(f"pieces {kind}: step 2 / step 1 = {step2 / step1:.2f}", flush=True)

  record = {
    "benchmark": "recall",
    "command": "python " + " ".join(sys.argv),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": loop.machine_description(),
    "git_commit": loop.git_commit(),
    "jax_version": jax.__version__,
    "load_average_start": load_start,
    "load_average_end": os.getloadavg(),
    "config": {
      "dataset": data.source,
      "stage": "test",
      "users": num_users,
      "mean_window": round(mean_len, 2),
      "hidden": 256,
      "layers": 1,
      "heads": 2,
      "ffn": 512,
      "max_len": MAX_LEN,
      "row_len": ROW_LEN,
      "norm": "post",
      "user_module": True,
      "init": "random (timing only)",
      "K": sum(QUOTAS_2),
    },
    "method": {
      "pass": "all test users: every batch dispatched (already on device), then one wait; median/min/max over"
      " interleaved rounds after compilation and one warm-up pass",
      "second_step_cost_vs_1step": "t(2-step recall, quotas 18+2) / t(1-step recall, quota 20) - 1, medians of"
      " full passes: everything the second step adds (decode state in the prefill, one decode step, a second"
      " scoring + exclusion + top-2) relative to the whole 1-step recall",
      "step2_over_step1": "pieces jitted alone, median seconds per batch: (decode_one + select_n) /"
      " (prefill_state + select_m)",
      "full_forward": "one forward pass of the packed rows (what re-encoding for the second step would cost at least)",
      "score_topn_over_step1": "(score + top_n) / (prefill_state + select_m): the scoring of the whole table"
      " (one matmul) and one top-2 over its scores, the part of an exact second step that no decoding"
      " scheme removes",
    },
    "reference_users_per_s": REFERENCE_USERS_PER_S,
    "best_users_per_batch": best,
    "layout_sweep_flow_2step": sweep_results,
    "results": results,
    "pieces": pieces,
  }
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench_recall.json").write_text(json.dumps(record, indent=2) + "\n")
  write_markdown(out / "bench_recall.md", record)


def write_markdown(path: pathlib.Path, record: dict) -> None:
  ms = lambda s: f"{s * 1e3:.0f}"
  lines = [
    "# Multi-interest recall, all Beauty test users (K = 20)",
    "",
    f"`{record['command']}` on {record['date']}, {record['machine']}, jax {record['jax_version']},"
    f" commit {record['git_commit']}. Load average {record['load_average_start'][0]:.1f} at start,"
    f" {record['load_average_end'][0]:.1f} at end (shared machine). Reference model size, random init,"
    f" {record['config']['users']} users. Reference code: {record['reference_users_per_s']:.0f} users/s.",
    "",
    f"## Full passes (users_per_batch = {record['best_users_per_batch']})",
    "",
    "| attention | quotas | pass s (median, min-max) | users/s | vs reference | 2nd step cost vs 1-step |",
    "|---|---|---|---|---|---|",
  ]
  for r in record["results"]:
    extra = f"{r['second_step_cost_vs_1step']:.2f}x" if "second_step_cost_vs_1step" in r else ""
    lines.append(
      f"| {r['attention']} | {'+'.join(map(str, r['quotas']))} | {r['median_s']:.2f} ({r['min_s']:.2f}-"
      f"{r['max_s']:.2f}) | {r['users_per_s']:,.0f} | {r['speedup_vs_reference']:.0f}x | {extra} |"
    )
  lines += [
    "",
    "## Pieces (ms per batch, median; each jitted alone)",
    "",
    "| attention | prefill (hidden) | prefill (+state) | select top-18 | decode step | select top-2"
    " | full forward | step 2 / step 1 | score only | top-2 only | (score + top-2) / step 1 |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for kind, p in record["pieces"].items():
    m = {name: v["median_s"] for name, v in p["per_batch"].items()}
    lines.append(
      f"| {kind} | {ms(m['prefill_hidden'])} | {ms(m['prefill_state'])} | {ms(m['select_m'])} |"
      f" {ms(m['decode_one'])} | {ms(m['select_n'])} | {ms(m['full_forward'])} | {p['step2_over_step1']:.2f} |"
      f" {ms(m['score'])} | {ms(m['top_n'])} | {p['score_topn_over_step1']:.2f} |"
    )
  lines += [
    "",
    "## Layout sweep (flow, 18+2)",
    "",
    "| users/batch | rows | batches | real positions | pass s (median, min-max) | users/s |",
    "|---|---|---|---|---|---|",
  ]
  for r in record["layout_sweep_flow_2step"]:
    lines.append(
      f"| {r['users_per_batch']} | {r['rows_per_batch']} | {r['batches']} | {r['real_fraction']:.1%} |"
      f" {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['users_per_s']:,.0f} |"
    )
  lines += ["", "Method: " + " ".join(f"{k}: {v}." for k, v in record["method"].items())]
  path.write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
