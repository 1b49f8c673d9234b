"""Benchmark: JAX vs PyTorch eager vs PyTorch compiled at the reference configuration on Beauty.

Parts (each on the same numpy batches, every variant starting from the same JAX-initialised weights):

* ``pretrain``: one training step, BCE with one negative, dropout 0.5 / 0.1, packed rows (30 x 50), Adam;
* ``prompt_tune``: one training step with prompts generated from the current parameters (mode ``last``,
  ``w = 1``), full-softmax cross-entropy, dropout 0.1 / 0.1, packed rows (30 x 50), Adam;
* ``eval``: full-ranking evaluation (HR/NDCG@5/10/20, history excluded) of all Beauty test users;
* ``recall``: two-step multi-interest recall (18 + 2) of all Beauty test users. JAX:
  ``recgpt_jax.recall.decoder.make_recall_fn`` (prefill + one incremental decode step). PyTorch has no
  decoder, so this benchmark implements the straightforward version: encode the packed rows, score the
  table at each user's last position, exclude history, top-18; then *re-encode* the packed rows with each
  user's top-1 item inserted after its last item (segment 1; rows widen by the most users any row holds),
  score at the inserted token, exclude history + the 18, top-2. ``torch_compiled`` compiles the model
  forward only (``dynamic=False``); scoring and top-k stay eager (also in ``eval``).

Model: hidden 256, 1 layer, 2 heads, FFN 512, flow attention, post-norm, user module, max length 50.
Variants run interleaved (``for round: for variant``), compilation and warm-up excluded; median, min and
max per variant, ratios ``t_variant / t_jax`` (> 1 = JAX faster). torch uses 2 threads, JAX its default.
Model FLOP/s use the analytic count written into the JSON (``flops_formula``) against the machine's
measured float32 matmul ceiling (4096 x 4096, same run). Peak memory: see ``memory_method`` in the JSON.

  python experiments/bench_torch.py [--rounds=5 --steps=6 --parts=... --variants=... --quick]

Writes experiments/results/bench_torch.json, bench_torch.md and bench_torch.png.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pathlib
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from flax import nnx

from experiments import reference
from experiments.torch_recgpt import convert
from experiments.torch_recgpt import steps as tsteps
from experiments.torch_recgpt.model import TorchRecGPT
from recgpt_jax import allocator
from recgpt_jax.config import base_config
from recgpt_jax.data import io, packing, split, tfds_builder
from recgpt_jax.eval.metrics import make_eval_step
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.recall import decoder
from recgpt_jax.train import loop, optim
from recgpt_jax.train import step as step_lib

PARTS = ("pretrain", "prompt_tune", "eval", "recall")
VARIANTS = ("jax", "torch_eager", "torch_compiled")
ROW_LEN, MAX_LEN, TRAIN_ROWS = reference.ROW_LEN, reference.MAX_LEN, reference.TRAIN_ROWS
EVAL_USERS_PER_BATCH = 256  # the fastest recall layout of bench_recall.py
QUOTAS = (18, 2)
WARMUP_STEPS = 2

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed training steps per variant per round (distinct batches).")
_PARTS = flags.DEFINE_list("parts", list(PARTS), "Parts to run.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where to write bench_torch.{json,md,png}.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: tiny model, few users, 1024^2 matmul.")
_DATASET = flags.DEFINE_string("dataset", "Beauty", "Bundled dataset.")
_ALLOCATOR = flags.DEFINE_enum(
  "allocator", "auto", allocator.CHOICES, "Memory allocator (recgpt_jax.allocator): auto = tcmalloc if present."
)


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers.


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def peak_rss_increase(fn: Callable[[], object]) -> int:
  """Peak RSS above the RSS just before ``fn()`` (after ``malloc_trim``), sampled every ~1 ms by a thread."""
  if _libc is not None:
    _libc.malloc_trim(0)
  base = rss_bytes()
  peak = [base]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], rss_bytes())
      time.sleep(0.001)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  try:
    fn()
  finally:
    done.set()
    thread.join()
  peak[0] = max(peak[0], rss_bytes())
  return peak[0] - base


def stats(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def matmul_ceiling(n: int, repeats: int = 3) -> dict[str, dict[str, float]]:
  """Median GFLOP/s of an ``n x n`` float32 matmul in JAX and in torch (one warm-up each)."""
  flops = 2.0 * n**3
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
  ja, jb = jax.device_put(a), jax.device_put(b)
  mm = jax.jit(jnp.matmul)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  runs = {"jax": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
  out = {}
  for name, run in runs.items():
    run()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    out[name] = {**stats(times), "gflops": flops / statistics.median(times) / 1e9, "n": n}
  return out


# ----------------------------------------------------------------------------------------------------------
# FLOP counts (model FLOPs, multiply-add = 2).


def layer_flops_per_position(h: int, ffn: int, layers: int, attn_len: int) -> float:
  """QKV 2*3*h^2, output projection 2*h^2, attention 2*2*attn_len*h (Q K^T and weights x V over the dense
  row), FFN 2*2*h*ffn, per position, times layers."""
  return layers * (2 * 3 * h * h + 2 * h * h + 2 * 2 * attn_len * h + 2 * 2 * h * ffn)


FLOPS_FORMULA = {
  "layer_per_position": "layers * (2*3*h^2 [QKV] + 2*h^2 [out proj] + 2*2*L*h [QK^T + AV over the dense packed row"
  " of length L, padding and masked pairs included, as computed] + 2*2*h*ffn [FFN]); embeddings, norms,"
  " activations and flow-attention normalisers not counted",
  "positions": "every position of the batch (rows x row_len), padding included (the dense computation)",
  "pretrain": "3 * positions * (layer_per_position + 2*2*h [BCE: target + 1 negative dot products])"
  " (backward = 2x forward)",
  "prompt_tune": "3 * positions * (layer_per_position + 2*h*V [full-softmax scores]) + positions *"
  " (layer_per_position + 2*h*V) [the no-grad generation forward and its scoring], V = num_items",
  "eval": "per batch: positions * layer_per_position + user_slots * 2*h*V",
  "recall": "algorithmic (the JAX decoder's work; the torch re-encoding does more): per batch positions *"
  " layer_per_position + user_slots * (layers * (2*3*h^2 + 2*h^2 + 2*2*L*h + 2*2*h*ffn) [one decode token]"
  " + 2 * 2*h*V [two scorings])",
}


def part_flops(part: str, m: ModelConfig, batches: list[dict[str, np.ndarray]]) -> float:
  """Model FLOPs of one step (training) or one pass over all batches (eval, recall)."""
  h, ffn, layers, v = m.hidden, m.ffn, m.num_layers, m.num_items
  total = 0.0
  for b in batches:
    rows, length = b["items"].shape
    positions = rows * length
    layer = layer_flops_per_position(h, ffn, layers, length)
    if part == "pretrain":
      total += 3 * positions * (layer + 2 * 2 * h)
    elif part == "prompt_tune":
      total += 3 * positions * (layer + 2 * h * v) + positions * (layer + 2 * h * v)
    elif part == "eval":
      total += positions * layer + len(b["answer"]) * 2 * h * v
    else:
      total += positions * layer + len(b["answer"]) * (layer + 2 * 2 * h * v)
  return total / len(batches) if part in ("pretrain", "prompt_tune") else total


# ----------------------------------------------------------------------------------------------------------
# torch two-step recall.


def make_torch_recall(model: TorchRecGPT, wide_len: int, compile: bool) -> Callable[[tsteps.Batch], dict]:
  """Two-step recall (18 + 2) by re-encoding: see the module docstring. ``wide_len`` is the row length of
  the re-encoded rows (``row_len`` + the most users in any row of any batch), fixed so that a compiled
  forward sees two shapes only."""
  forward = torch.compile(model, dynamic=False) if compile else model
  m1, m2 = QUOTAS
  table = model.item_embed.weight

  def select(h_ud: torch.Tensor, exclude_ue: torch.Tensor, m: int):
    scores = h_ud @ table.T
    low = torch.finfo(scores.dtype).min
    scores = scores.scatter(1, exclude_ue, low)
    scores[:, 0] = low
    scores[:, model.cfg.num_items + 1 :] = low
    return torch.topk(scores, m, dim=-1)

  def recall(batch: tsteps.Batch) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
      inputs = [batch[k] for k in tsteps.MODEL_INPUTS]
      hidden = forward(*inputs)
      last_row, last_col = batch["last_row"], batch["last_col"]
      real = batch["answer"] > 0
      first = select(hidden[last_row, last_col], batch["history"], m1)
      # Insert each real user's top-1 item after its last item: tokens after k user ends shift by k.
      rows, length = batch["items"].shape
      ends = torch.zeros(rows, length, dtype=torch.long)
      ends[last_row[real], last_col[real]] = 1
      shift = torch.cumsum(ends, dim=1) - ends
      new_col = torch.arange(length)[None, :] + shift
      row_idx = torch.arange(rows)[:, None].expand(rows, length)
      wide = []
      for x in inputs:
        w = torch.zeros(rows, wide_len, dtype=x.dtype)
        w[row_idx, new_col] = x
        wide.append(w)
      ins_col = last_col + shift[last_row, last_col] + 1
      r, c = last_row[real], ins_col[real]
      items, positions, segments, seq_ids, users = wide
      items[r, c] = first.indices[real, 0]
      positions[r, c] = batch["positions"][last_row, last_col][real] + 1
      segments[r, c] = 1
      seq_ids[r, c] = batch["seq_ids"][last_row, last_col][real]
      users[r, c] = batch["users"][last_row, last_col][real]
      hidden2 = forward(items, positions, segments, seq_ids, users)
      exclude2 = torch.cat([batch["history"], first.indices], dim=1)
      second = select(hidden2[last_row, ins_col.clamp(max=wide_len - 1)], exclude2, m2)
    return {"items": torch.cat([first.indices, second.indices], dim=1)}

  return recall


# ----------------------------------------------------------------------------------------------------------
# Setup of every (part, variant).


class Runner:
  """One (part, variant): ``run_round()`` returns the seconds of each timed unit (steps or one pass)."""

  def __init__(self, part, variant, run_unit, units, warmup, memory):
    self.part, self.variant = part, variant
    self.run_unit, self.units, self.warmup, self.memory = run_unit, units, warmup, memory
    self.times: list[float] = []
    self.error: str | None = None
    self.compile_s: float | None = None
    self.peak_rss_increase: int | None = None
    self.xla_memory: dict | None = None


def main(argv):
  del argv
  allocator.use(_ALLOCATOR.value)  # re-executes this command on tcmalloc when asked and available
  quick = _QUICK.value
  torch.set_num_threads(2)
  load_start = os.getloadavg()
  t_start = time.time()
  parts = [p for p in _PARTS.value if p]
  variants = [v for v in _VARIANTS.value if v]
  for p in parts:
    if p not in PARTS:
      raise app.UsageError(f"unknown part {p!r}")
  for v in variants:
    if v not in VARIANTS:
      raise app.UsageError(f"unknown variant {v!r}")
  num_steps = 2 if quick else _STEPS.value
  rounds = 2 if quick else _ROUNDS.value
  hidden, ffn, heads = (32, 64, 2) if quick else (256, 512, 2)
  rows_per_batch = 4 if quick else TRAIN_ROWS

  print(f"load average {load_start}; jax {jax.__version__}, torch {torch.__version__}", flush=True)
  ceiling = matmul_ceiling(1024 if quick else 4096)
  print(
    f"matmul ceiling: jax {ceiling['jax']['gflops']:.0f} GFLOP/s, torch {ceiling['torch']['gflops']:.0f}", flush=True
  )

  data = io.load_dataset(_DATASET.value)
  source = tfds_builder.data_source(data.source)[0]
  cfg = base_config()

  def model_cfg(part: str) -> ModelConfig:
    return reference.model_config(data, part, hidden=hidden, ffn=ffn, heads=heads)

  # Evaluation batches (shared by eval and recall), as bench_recall.py's best layout.
  eval_set = split.make_eval_set(data.users, data.sequences, "test", MAX_LEN)
  if quick:
    keep = slice(0, 600)
    eval_set = split.EvalSet(
      eval_set.users[keep], eval_set.windows[keep], eval_set.answers[keep], eval_set.histories[keep]
    )
  num_test_users = len(eval_set.users)
  mean_len = float(np.mean([len(w) for w in eval_set.windows]))
  eval_rows = math.ceil(EVAL_USERS_PER_BATCH * mean_len / (ROW_LEN * 0.85))
  eval_batches = packing.pack_eval_batches(
    eval_set, row_len=ROW_LEN, rows_per_batch=eval_rows, users_per_batch=EVAL_USERS_PER_BATCH
  )
  max_users_per_row = max(
    int(max(len(np.unique(r[r > 0])) for r in b["seq_ids"])) for b in eval_batches
  )  # re-encoded row width
  print(f"{num_test_users} test users in {len(eval_batches)} eval batches of {eval_rows}x{ROW_LEN}", flush=True)

  runners: dict[str, list[Runner]] = {}
  part_info: dict[str, dict] = {}
  for part in parts:
    mcfg = model_cfg(part)
    training = part in ("pretrain", "prompt_tune")
    prompt = part == "prompt_tune"
    lr = 5e-4 if prompt else 1e-3
    graphdef, state0 = step_lib.init_state(RecGPT(mcfg, rngs=nnx.Rngs(0)), optim.make_optimizer(cfg.optimizer, 1000), 0)
    params0 = jax.tree.map(lambda x: np.array(x, copy=True), state0.params)
    del state0
    if training:
      np_batches = reference.train_batches(source, part, WARMUP_STEPS + num_steps, rows_per_batch=rows_per_batch)
      target_key = "p_targets" if prompt else "targets"
      tokens = [int(np.sum(b[target_key] > 0)) for b in np_batches[WARMUP_STEPS:]]
      flops = part_flops(part, mcfg, np_batches)
      part_info[part] = {
        "unit": "step",
        "batches": f"{WARMUP_STEPS} warm-up + {num_steps} timed, {rows_per_batch} packed rows x {ROW_LEN}",
        "target_tokens_per_step_mean": statistics.mean(tokens),
        "target_tokens_total": sum(tokens),
        "model_flops_per_step": flops,
        "loss": "ce (full softmax)" if prompt else "bce (1 negative)",
        "dropout": [mcfg.attn_dropout, mcfg.hidden_dropout],
        "learning_rate": lr,
      }
    else:
      np_batches = eval_batches
      flops = part_flops(part, mcfg, np_batches)
      part_info[part] = {
        "unit": "pass over all test users",
        "users": num_test_users,
        "batches": f"{len(eval_batches)} batches of {eval_rows} rows x {ROW_LEN}, {EVAL_USERS_PER_BATCH} user slots",
        "model_flops_per_pass": flops,
      }
      if part == "recall":
        part_info[part]["torch_method"] = (
          f"re-encode: rows widened to {ROW_LEN + max_users_per_row} with each user's top-1 inserted after its"
          " last item (segment 1), full forward again, score at the inserted token; JAX: prefill + incremental"
          " decode step (decoder.make_recall_fn)"
        )
    part_runners = []
    for variant in variants:
      r = build_runner(part, variant, mcfg, graphdef, params0, np_batches, lr, cfg, max_users_per_row, num_steps)
      part_runners.append(r)
    runners[part] = part_runners

  # Warm-up (compilation included), then memory, outside the timed rounds.
  for part, rs in runners.items():
    for r in rs:
      if r.error:
        continue
      t0 = time.perf_counter()
      try:
        r.warmup()
        r.compile_s = time.perf_counter() - t0
        r.peak_rss_increase = peak_rss_increase(r.memory)
      except Exception as e:  # noqa: BLE001 - a failing variant is recorded, the others go on
        r.error = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
      status = r.error or f"warm-up {r.compile_s:.1f}s, peak RSS +{(r.peak_rss_increase or 0) / 2**20:.0f} MiB"
      print(f"[{part}/{r.variant}] {status}", flush=True)

  for rnd in range(rounds):
    for part, rs in runners.items():
      for r in rs:
        if r.error:
          continue
        try:
          r.times.extend(r.run_unit())
        except Exception as e:  # noqa: BLE001
          r.error = f"{type(e).__name__}: {e}"[:2000]
          traceback.print_exc()
      summary = ", ".join(
        f"{r.variant} {statistics.median(r.times) * 1e3:.0f} ms" for r in rs if r.times and not r.error
      )
      print(f"round {rnd + 1}/{rounds} {part}: {summary}", flush=True)

  ceiling_end = matmul_ceiling(1024 if quick else 4096)
  print(f"matmul ceiling at end: jax {ceiling_end['jax']['gflops']:.0f}, torch {ceiling_end['torch']['gflops']:.0f}")
  ceiling = {
    name: {
      **max((ceiling[name], ceiling_end[name]), key=lambda c: c["gflops"]),
      "gflops_start": ceiling[name]["gflops"],
      "gflops_end": ceiling_end[name]["gflops"],
    }
    for name in ceiling
  }
  record = summarise(runners, part_info, ceiling, load_start, variants, quick, t_start)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench_torch.json").write_text(json.dumps(record, indent=2) + "\n")
  md = write_markdown(out / "bench_torch.md", record)
  print(md)
  try:
    write_chart(out / "bench_torch.png", record)
  except ImportError as e:
    print(f"no chart: {e}")


def build_runner(part, variant, mcfg, graphdef, params0, np_batches, lr, cfg, max_users_per_row, num_steps) -> Runner:
  training = part in ("pretrain", "prompt_tune")
  prompt = part == "prompt_tune"
  warm_batches, timed_batches = (
    (np_batches[:WARMUP_STEPS], np_batches[WARMUP_STEPS:]) if training else (np_batches, np_batches)
  )
  if variant == "jax":
    if training:
      step, state, _ = reference.train_step(mcfg, part, cfg.optimizer)  # row-sparse tables, as the loop
      warm = [jax.device_put(b) for b in warm_batches]
      timed_dev = [jax.device_put(b) for b in timed_batches]
      box = {"state": state}
      runner = Runner(part, variant, None, len(timed_dev), None, None)

      def one(b):
        box["state"], out = step(box["state"], b)
        jax.block_until_ready(out)

      def warmup():
        runner.xla_memory = xla_memory(step.lower(box["state"], warm[0]).compile())
        for b in warm:
          one(b)
        jax.block_until_ready(box["state"])

      runner.warmup = warmup
      runner.memory = lambda: one(warm[-1])
      runner.run_unit = lambda: timed_steps(one, timed_dev)
      return runner
    params = jax.device_put(params0)
    dev = [jax.device_put(b) for b in np_batches]
    fn = make_eval_step(graphdef) if part == "eval" else decoder.make_recall_fn(graphdef, QUOTAS)
    runner = Runner(part, variant, None, 1, None, None)

    def full_pass():
      jax.block_until_ready([fn(params, b) for b in dev])

    def warmup():
      runner.xla_memory = xla_memory(fn.lower(params, dev[0]).compile())
      full_pass()

    runner.warmup = warmup
    runner.memory = full_pass
    runner.run_unit = lambda: [timed_call(full_pass)]
    return runner

  compiled = variant == "torch_compiled"
  model = TorchRecGPT(mcfg)
  convert.load_jax_params(model, params0)
  t_batches = [tsteps.to_torch_batch(b) for b in np_batches]
  t_warm, t_timed = (t_batches[:WARMUP_STEPS], t_batches[WARMUP_STEPS:]) if training else (t_batches, t_batches)
  runner = Runner(part, variant, None, len(t_timed) if training else 1, None, None)
  if training:
    opt = tsteps.make_optimizer(model, lr, cfg.optimizer.b1, cfg.optimizer.b2, cfg.optimizer.eps, impl="fused")
    step = tsteps.make_step(
      model,
      opt,
      stage=part,
      loss="ce" if prompt else "bce",
      head="tied",
      prompt_mode="last",
      prompt_width=1,
      compile=compiled,
    )

    def one(b):
      float(step(b)["loss"])

    runner.warmup = lambda: [one(b) for b in t_warm]
    runner.memory = lambda: one(t_warm[-1])
    runner.run_unit = lambda: timed_steps(one, t_timed)
    return runner
  if part == "eval":
    fn = tsteps.make_eval_step(model, head="tied", compile=compiled)
  else:
    fn = make_torch_recall(model, ROW_LEN + max_users_per_row, compiled)

  def full_pass():
    for b in t_batches:
      fn(b)

  runner.warmup = full_pass
  runner.memory = full_pass
  runner.run_unit = lambda: [timed_call(full_pass)]
  return runner


def timed_call(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def timed_steps(one: Callable, batches: list) -> list[float]:
  return [timed_call(lambda b=b: one(b)) for b in batches]


def xla_memory(compiled) -> dict | None:
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if ma is None:
    return None
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
  out = {f: int(getattr(ma, f, 0)) for f in fields}
  out["temp_plus_argument_plus_output_minus_alias"] = (
    out["temp_size_in_bytes"] + out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
  )
  return out


# ----------------------------------------------------------------------------------------------------------
# Summary and outputs.


def summarise(runners, part_info, ceiling, load_start, variants, quick, t_start) -> dict:
  ceiling_gflops = max(c["gflops"] for c in ceiling.values())
  parts = {}
  for part, rs in runners.items():
    info = part_info[part]
    training = info["unit"] == "step"
    flops = info["model_flops_per_step"] if training else info["model_flops_per_pass"]
    res = {}
    for r in rs:
      entry = {
        "error": r.error,
        "times_s": r.times,
        "warmup_s_incl_compile": r.compile_s,
        "peak_rss_increase_bytes": r.peak_rss_increase,
        "xla_memory": r.xla_memory,
      }
      if r.times:
        s = stats(r.times)
        entry.update(s)
        med = s["median_s"]
        if training:
          entry["target_tokens_per_s"] = info["target_tokens_total"] / (sum(r.times) / (len(r.times) / r.units))
          entry["target_tokens_per_s_at_median"] = info["target_tokens_per_step_mean"] / med
          entry["throughput"] = entry["target_tokens_per_s"]
          entry["throughput_unit"] = "target tokens/s"
        else:
          entry["users_per_s"] = info["users"] / med
          entry["throughput"] = entry["users_per_s"]
          entry["throughput_unit"] = "users/s"
        entry["model_gflops_per_s"] = flops / med / 1e9
        entry["fraction_of_ceiling"] = entry["model_gflops_per_s"] / ceiling_gflops
      res[r.variant] = entry
    jax_med = res.get("jax", {}).get("median_s")
    torch_meds = [res[v]["median_s"] for v in ("torch_eager", "torch_compiled") if v in res and "median_s" in res[v]]
    for entry in res.values():
      if jax_med and "median_s" in entry:
        entry["ratio_to_jax"] = entry["median_s"] / jax_med
    parts[part] = {
      **info,
      "results": res,
      "jax_speedup_over_fastest_torch": (min(torch_meds) / jax_med) if jax_med and torch_meds else None,
    }
  return {
    "benchmark": "jax_vs_torch",
    "command": "python " + " ".join(sys.argv),
    "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)),
    "wall_s": time.time() - t_start,
    "machine": loop.machine_description(),
    "git_commit": loop.git_commit(),
    "jax_version": jax.__version__,
    "allocator": allocator.loaded(),
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "load_average_start": load_start,
    "load_average_end": os.getloadavg(),
    "quick": quick,
    "variants": variants,
    "config": {
      "dataset": _DATASET.value,
      "hidden": 32 if quick else 256,
      "layers": 1,
      "heads": 2,
      "ffn": 64 if quick else 512,
      "attention": "flow",
      "norm": "post",
      "user_module": True,
      "max_len": MAX_LEN,
      "row_len": ROW_LEN,
      "init": "JAX init (seed 0) loaded into torch (convert.load_jax_params)",
      "optimizer": "Adam (JAX: optim.make_optimizer(base_config().optimizer); torch: fused Adam, same lr/betas/eps)",
    },
    "matmul_ceiling": ceiling,
    "ceiling_gflops_used": ceiling_gflops,
    "flops_formula": FLOPS_FORMULA,
    "method": {
      "timing": "interleaved rounds (for round: for part: for variant); training: each timed step on its own"
      " batch, per-step seconds (JAX: block_until_ready on the metrics; torch: float(loss)); eval/recall: one"
      " full pass over all test users per round (JAX: all batches dispatched then one wait). Compilation and"
      " warm-up (2 training steps / 1 full pass) excluded. Batches already on device / converted to torch.",
      "ratio_to_jax": "median time of the variant / median time of JAX (> 1 = JAX faster)",
      "throughput": "training: target tokens (> 0) of the timed batches / mean step time; eval/recall: users /"
      " median pass time",
      "ceiling": "max of the JAX and torch median GFLOP/s of the square float32 matmul, each measured at the start"
      " and at the end of the run (the better of the two kept; both recorded)",
    },
    "memory_method": "peak_rss_increase_bytes: process RSS sampled every ~1 ms by a thread during one extra"
    " training step (or one full eval/recall pass) after warm-up, minus the RSS just before it (after"
    " malloc_trim(0)); memory that an allocator keeps cached from earlier steps does not show up, so it is a"
    " lower bound of the step's working memory. xla_memory (JAX only): compiled.memory_analysis() of the"
    " jitted step (one training step / one eval or recall batch): temp + argument + output - alias bytes.",
    "parts": parts,
  }


def fmt_bytes(n) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def write_markdown(path: pathlib.Path, rec: dict) -> str:
  lines = [
    "# JAX vs PyTorch (eager, compiled), reference configuration" + (" (QUICK smoke run)" if rec["quick"] else ""),
    "",
    f"`{rec['command']}` on {rec['date_utc']}, {rec['machine']}, {rec['allocator']} malloc,"
    f" jax {rec['jax_version']}, torch"
    f" {rec['torch_version']} ({rec['torch_threads']} threads), commit {rec['git_commit']}. Load average"
    f" {rec['load_average_start'][0]:.2f} at start, {rec['load_average_end'][0]:.2f} at end (shared machine)."
    f" Matmul ceiling ({rec['matmul_ceiling']['jax']['n']}^2 float32): jax"
    f" {rec['matmul_ceiling']['jax']['gflops']:.0f}, torch {rec['matmul_ceiling']['torch']['gflops']:.0f}"
    f" GFLOP/s; % of ceiling uses {rec['ceiling_gflops_used']:.0f}.",
  ]
  for part, p in rec["parts"].items():
    unit_ms = p["unit"] == "step"
    lines += [
      "",
      f"## {part} ({p['unit']}; {p['batches']})",
      "",
      f"| variant | {'ms/step' if unit_ms else 's/pass'} (median, min-max) | throughput | ratio to JAX | model GFLOP/s"
      " | % of ceiling | peak RSS increase | XLA memory |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for v, e in p["results"].items():
      if "median_s" not in e:
        lines.append(f"| {v} | failed: {e['error']} | | | | | | |")
        continue
      k = 1e3 if unit_ms else 1.0
      f = "{:.0f}" if unit_ms else "{:.2f}"
      t = f"{f.format(e['median_s'] * k)} ({f.format(e['min_s'] * k)}-{f.format(e['max_s'] * k)})"
      xm = e.get("xla_memory")
      lines.append(
        f"| {v} | {t} | {e['throughput']:,.0f} {e['throughput_unit']} | {e.get('ratio_to_jax', float('nan')):.2f}"
        f" | {e['model_gflops_per_s']:.1f} | {e['fraction_of_ceiling']:.1%} | {fmt_bytes(e['peak_rss_increase_bytes'])}"
        f" | {fmt_bytes(xm['temp_plus_argument_plus_output_minus_alias']) if xm else '-'} |"
      )
    if p.get("jax_speedup_over_fastest_torch"):
      lines.append("")
      lines.append(f"JAX speed-up over the fastest torch variant: {p['jax_speedup_over_fastest_torch']:.2f}x.")
    if "torch_method" in p:
      lines.append(f"torch recall: {p['torch_method']}.")
  lines += ["", "FLOPs: " + " ".join(f"{k}: {v}." for k, v in rec["flops_formula"].items())]
  lines += ["", "Memory: " + rec["memory_method"]]
  lines += ["", "Method: " + " ".join(f"{k}: {v.rstrip('.')}." for k, v in rec["method"].items())]
  text = "\n".join(lines) + "\n"
  path.write_text(text)
  return text


def write_chart(path: pathlib.Path, rec: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  parts = list(rec["parts"])
  variants = rec["variants"]
  fig, ax = plt.subplots(figsize=(8, 4.5))
  width = 0.8 / max(len(variants), 1)
  for i, v in enumerate(variants):
    vals = []
    for part in parts:
      e = rec["parts"][part]["results"].get(v, {})
      jax_e = rec["parts"][part]["results"].get("jax", {})
      vals.append(jax_e["median_s"] / e["median_s"] if "median_s" in e and "median_s" in jax_e else 0.0)
    xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(parts))]
    bars = ax.bar(xs, vals, width, label=v)
    ax.bar_label(bars, labels=[f"{x:.2f}" if x else "fail" for x in vals], fontsize=7)
  ax.set_xticks(range(len(parts)))
  ax.set_xticklabels(parts)
  ax.set_ylabel("throughput relative to JAX (JAX = 1)")
  ax.set_title(f"JAX vs PyTorch, {rec['config']['dataset']} (load avg {rec['load_average_start'][0]:.1f})")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
