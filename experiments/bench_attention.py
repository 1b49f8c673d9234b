"""Benchmark: softmax vs quadratic vs chunked Flow-Attention, in a full pre-training step, as the window grows.

For each window length ``L`` (``row_len = max_len = L``) and each variant

* ``softmax``: softmax attention, the masked ``[L, L]`` form (``attention_impl=xla``);
* ``flow-quadratic``: Flow-Attention, the masked ``[L, L]`` form (``xla``);
* ``flow-chunked``: Flow-Attention, the linear-time chunked form (``chunked``, ``--flow_chunk``);

this times a full pre-training step (forward + backward + Adam, row-sparse tables as the training loop;
BCE with one sampled negative per position, as ``experiments/reference.py``'s pre-training) at hidden 256,
1 layer, 2 heads, FFN 512, post-norm, user module, hidden dropout 0.1 and attention dropout 0 (neither the
chunked nor a fused form has attention-weight dropout, so no variant gets it). Tables are Beauty-sized
(12,000 items, 22,000 users).

Synthetic packed rows: ``--rows`` rows of ``L`` positions, each filled with users whose lengths are drawn
uniformly from ``[L/8, L/2]`` (a few long users, 2-8 a row; the last is cut to fit), random items and
distinct random user ids; every position is a real token with a target. The same rows are used by all
variants.

Also, per ``L``:

* the attention kernel alone (no projections): forward + backward of the softmax or flow kernel at
  ``[rows, 2 heads, L, 128]`` on the same ``seq_ids`` (loss ``sum(y * w)``, gradients for q, k, v);
* the BCE negative sampler alone (``losses.sample_negatives``, part of every variant's step): it forms
  ``[rows, 2L, 2L]`` pairwise comparisons, so it is quadratic in ``L`` whatever the attention;
* ``flow-chunked, uniform negatives`` (``--sampler_ablation``): the chunked step with that sampler
  replaced, for this benchmark only, by uniform ids (``jax.random.randint``, no exclusion of the user's
  items) so that the attention's own growth is visible in a full step.

Time: per (variant, L), the median and min over timed steps after ``--warmup`` untimed ones; variants run
interleaved (A, B, C, A, B, C, ...) so that machine noise hits all alike. The number of timed steps is
``--steps``, reduced at long ``L`` so that the slowest variant spends about ``--seconds_per_length``
(never below ``--min_steps``). The machine is shared: the load average is recorded; nothing is adjusted.

Memory: ``compiled`` = temp + argument + output bytes of the compiled step's ``memory_analysis()``
(deterministic, no run needed; outputs alias the donated state, so the live peak is nearer temp +
argument); ``temp`` alone is the part that grows with ``L``. A (variant, L) whose compiled bytes exceed
``--memory_budget_gib`` is recorded as skipped and not run. ``rss`` is the increase of the process's peak
RSS over one warm-up step (a lower bound: tcmalloc reuses memory freed by earlier runs). ``GFLOP`` is XLA's
``cost_analysis()`` of the compiled program: deterministic, so it shows how the work grows with ``L`` where a
loaded machine blurs the times.

  python -m experiments.bench_attention [--lengths=64,...,8192 --rows=1 --flow_chunk=128]

Writes experiments/results/bench_attention.json and bench_attention.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import reference
from recgpt_jax import allocator
from recgpt_jax.config import base_config
from recgpt_jax.model import attention
from recgpt_jax.model.transformer import ModelConfig
from recgpt_jax.train import loop, losses
from recgpt_jax.train import step as step_lib

HIDDEN, LAYERS, HEADS, FFN = 256, 1, 2, 512
HIDDEN_DROPOUT = 0.1
USER_LEN_FRACTION = (1 / 8, 1 / 2)  # a user's length is uniform in [L/8, L/2]
# name -> (model.attention, model.attention_impl)
VARIANTS = {
  "softmax": ("softmax", "xla"),
  "flow-quadratic": ("flow", "xla"),
  "flow-chunked": ("flow", "chunked"),
}
ABLATION = "flow-chunked, uniform negatives"
QUADRATIC, CHUNKED = "flow-quadratic", "flow-chunked"
GROWTH_FROM = 1024  # growth t(L_max) / t(GROWTH_FROM); linear = L_max / GROWTH_FROM
MIB = 2**20

_LENGTHS = flags.DEFINE_list(
  "lengths", ["64", "128", "256", "512", "1024", "2048", "4096", "8192"], "Window lengths L (row_len = max_len)."
)
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Step variants to run.")
_ROWS = flags.DEFINE_integer("rows", 1, "Packed rows of L positions per step.")
_CHUNK = flags.DEFINE_integer("flow_chunk", ModelConfig.flow_chunk, "Chunk of the chunked Flow-Attention.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 12_000, "Items of the catalogue (Beauty: ~12,000).")
_NUM_USERS = flags.DEFINE_integer("num_users", 22_000, "Users of the user table (Beauty: ~22,000).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per variant after compilation.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant (most; see --seconds_per_length).")
_MIN_STEPS = flags.DEFINE_integer("min_steps", 5, "Timed steps per variant (least).")
_SECONDS = flags.DEFINE_float(
  "seconds_per_length", 10.0, "Timed steps at a length are cut so the slowest variant's take about this long."
)
_BUDGET = flags.DEFINE_float("memory_budget_gib", 12.0, "Skip a (variant, L) whose compiled step needs more.")
_KERNEL = flags.DEFINE_bool("kernel", True, "Also time the attention kernels alone and the negative sampler.")
_ABLATION = flags.DEFINE_bool("sampler_ablation", True, f"Also time '{ABLATION}'.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic rows.")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where to write bench_attention.{json,md} ('' = nowhere).")
_ALLOCATOR = flags.DEFINE_enum(
  "allocator", "auto", allocator.CHOICES, "Memory allocator (recgpt_jax.allocator): auto = tcmalloc if present."
)


# ------------------------------------------------------------------------------------------ synthetic rows


def user_lengths(length: int, rng: np.random.Generator) -> list[int]:
  """Lengths of the users packed into one row of ``length``: uniform in ``USER_LEN_FRACTION`` of it, the last
  one cut so that they fill the row exactly."""
  lo = max(1, int(length * USER_LEN_FRACTION[0]))
  hi = max(lo, int(length * USER_LEN_FRACTION[1]))
  out, total = [], 0
  while total < length:
    n = min(int(rng.integers(lo, hi + 1)), length - total)
    out.append(n)
    total += n
  return out


def synthetic_rows(length: int, rows: int, num_items: int, num_users: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A pre-training batch of ``rows`` packed rows of ``length`` (every position a real token).

  Each user of a row (lengths from ``user_lengths``) gets a random sequence of ``n + 1`` items: inputs are its
  first ``n``, targets its last ``n``; positions restart at 0 per user; ``seq_ids`` are 1, 2, ... within the
  row; user ids are distinct within the batch.

  Returns:
    ``int32 [rows, length]`` arrays ``items``, ``positions``, ``segments``, ``seq_ids``, ``users``, ``targets``.
  """
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((rows, length), np.int32) for k in (*step_lib.MODEL_INPUTS, "targets")}
  lengths = [user_lengths(length, rng) for _ in range(rows)]
  user_ids = rng.choice(np.arange(1, num_users + 1), size=sum(len(ls) for ls in lengths), replace=False)
  u = 0
  for r, row in enumerate(lengths):
    start = 0
    for s, n in enumerate(row):
      seq = rng.integers(1, num_items + 1, n + 1)
      span = slice(start, start + n)
      batch["items"][r, span] = seq[:-1]
      batch["targets"][r, span] = seq[1:]
      batch["positions"][r, span] = np.arange(n)
      batch["seq_ids"][r, span] = s + 1
      batch["users"][r, span] = user_ids[u]
      u += 1
      start += n
  return batch


def model_config(variant: str, length: int, chunk: int, num_items: int, num_users: int) -> ModelConfig:
  kind, impl = VARIANTS[CHUNKED if variant == ABLATION else variant]
  return ModelConfig(
    num_items=num_items,
    num_users=num_users,
    max_len=length,
    hidden=HIDDEN,
    num_layers=LAYERS,
    num_heads=HEADS,
    ffn=FFN,
    attention=kind,
    attention_impl=impl,
    flow_chunk=chunk,
    norm="post",
    attn_dropout=0.0,
    hidden_dropout=HIDDEN_DROPOUT,
    user_module=True,
  )


def uniform_negatives(key, items, targets, seq_ids, num_items):
  """The sampler ablation: uniform ids in ``1..num_items`` (the user's own items are not excluded)."""
  del targets, seq_ids
  return jax.random.randint(key, items.shape, 1, num_items + 1, dtype=jnp.int32)


# ------------------------------------------------------------------------------------------- measurement


def memory_of(compiled) -> dict[str, int]:
  """Bytes of a compiled program (``memory_analysis``): temp, argument, output, alias, and compiled = the
  sum of the first three."""
  m = compiled.memory_analysis()
  out = {
    "temp": int(m.temp_size_in_bytes),
    "argument": int(m.argument_size_in_bytes),
    "output": int(m.output_size_in_bytes),
    "alias": int(m.alias_size_in_bytes),
  }
  out["compiled"] = out["temp"] + out["argument"] + out["output"]
  return out


def cost_of(compiled) -> dict[str, float]:
  """XLA's static cost estimate of a compiled program (``cost_analysis``): flops and bytes accessed."""
  ca = compiled.cost_analysis()
  if isinstance(ca, list | tuple):  # older jax: one dict per program
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def rss_increase_mib(fn: Callable[[], None]) -> float | None:
  """Runs ``fn`` and returns how far the process's peak RSS rose above its RSS before, in MiB (None where
  Linux's ``clear_refs`` peak reset is unavailable)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
  except OSError:
    fn()
    return None
  fn()
  return max(0, _status_kib("VmHWM") - before) / 1024


class Runner:
  """One compiled program and its arguments; a call runs it once and waits."""

  def __init__(self, name: str, compiled, args: tuple, donate_first: bool = False):
    self.name = name
    self.compiled = compiled
    self.args = args
    self.donate_first = donate_first
    self.times: list[float] = []
    self.warm: list[float] = []
    self.rss_mib: float | None = None

  def __call__(self) -> float:
    t0 = time.perf_counter()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    if self.donate_first:  # a train step: (state, metrics); the state goes back in
      self.args = (out[0], *self.args[1:])
    return dt


def run_interleaved(runners: list[Runner], warmup: int, steps: int, min_steps: int, seconds: float) -> int:
  """Warms up every runner (the first call under the RSS probe), then times them in interleaved rounds.

  Returns:
    The number of timed rounds: ``steps``, cut so that the slowest runner spends about ``seconds``.
  """
  for r in runners:
    r.rss_mib = rss_increase_mib(lambda r=r: r.warm.append(r()))
    r.warm += [r() for _ in range(warmup - 1)]
  slowest = max(min(r.warm) for r in runners) if runners else 0.0
  n = max(min_steps, min(steps, int(seconds / max(slowest, 1e-9))))
  for _ in range(n):
    for r in runners:
      r.times.append(r())
  return n


def timing(r: Runner) -> dict:
  return {
    "median_s": statistics.median(r.times),
    "min_s": min(r.times),
    "max_s": max(r.times),
    "timed": len(r.times),
    "warmup_s": r.warm,
  }


# ------------------------------------------------------------------------------------------------ summary


def _ok(results: list[dict], part: str) -> dict[tuple[str, int], dict]:
  return {(r["variant"], r["length"]): r for r in results if r["part"] == part and r["status"] == "ok"}


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def ratios(results: list[dict], lengths: list[int], growth_from: int = GROWTH_FROM) -> dict:
  """Ratios of the recorded measurements (skipped points count as not measured).

  Args:
    results: the ``results`` entries (``part`` ``step``, ``kernel`` or ``sampler``; ``variant``; ``length``;
      ``status``; ``median_s``, ``min_s``; ``memory``; ``cost``).
    lengths: the lengths swept.
    growth_from: the base length of the growth ratios.

  Returns:
    ``by_length``: per ``L``, quadratic / chunked step and kernel time (median, and min), flops and memory,
    softmax / chunked step time, and the sampler's time relative to the chunked step; ``growth``: per part and
    variant, ``t(L_max) / t(growth_from)`` (median, min) and the flops ratio, with ``L_max`` the longest length
    measured for it, and the linear value ``L_max / growth_from``; ``step_crossover_length``: the shortest ``L``
    from which the chunked step's median is below the quadratic one's at every longer length measured (None
    if not even at the longest).
  """
  tables = {part: _ok(results, part) for part in ("step", "kernel", "sampler")}

  def val(part: str, variant: str, length: int, *path: str):
    r = tables[part].get((variant, length))
    for key in path:
      r = None if r is None else r.get(key)
    return r

  by_length = []
  for length in lengths:
    row = {"length": length}
    for part in ("step", "kernel"):
      q = lambda *path, part=part, length=length: val(part, QUADRATIC, length, *path)
      c = lambda *path, part=part, length=length: val(part, CHUNKED, length, *path)
      row[f"{part}_time_quadratic_over_chunked"] = _ratio(q("median_s"), c("median_s"))
      row[f"{part}_min_time_quadratic_over_chunked"] = _ratio(q("min_s"), c("min_s"))
      row[f"{part}_flops_quadratic_over_chunked"] = _ratio(q("cost", "flops"), c("cost", "flops"))
      for key in ("compiled", "temp"):
        row[f"{part}_{key}_memory_quadratic_over_chunked"] = _ratio(q("memory", key), c("memory", key))
    chunked_step = val("step", CHUNKED, length, "median_s")
    row["step_time_softmax_over_chunked"] = _ratio(val("step", "softmax", length, "median_s"), chunked_step)
    row["sampler_time_over_chunked_step"] = _ratio(val("sampler", "sampler", length, "median_s"), chunked_step)
    by_length.append(row)

  growth = {}
  for part, table in tables.items():
    for variant in sorted({v for v, _ in table}):
      measured = sorted(length for v, length in table if v == variant)
      if growth_from in measured and measured[-1] > growth_from:
        top = measured[-1]
        hi, lo = table[(variant, top)], table[(variant, growth_from)]
        growth[f"{part}/{variant}"] = {
          "from": growth_from,
          "to": top,
          "time_ratio": hi["median_s"] / lo["median_s"],
          "time_ratio_min": hi["min_s"] / lo["min_s"],
          "flops_ratio": _ratio(hi.get("cost", {}).get("flops"), lo.get("cost", {}).get("flops")),
          "linear": top / growth_from,
        }

  step = tables["step"]
  both = [length for length in lengths if (QUADRATIC, length) in step and (CHUNKED, length) in step]
  crossover = None
  for length in reversed(both):
    if step[(CHUNKED, length)]["median_s"] < step[(QUADRATIC, length)]["median_s"]:
      crossover = length
    else:
      break
  return {"by_length": by_length, "growth": growth, "step_crossover_length": crossover}


def _ms(r: dict | None) -> str:
  if r is None:
    return "-"
  if r["status"] != "ok":
    return "skipped"
  return f"{r['median_s'] * 1e3:,.1f} ({r['min_s'] * 1e3:,.1f})"


def _x(v: float | None, digits: int = 2) -> str:
  return "-" if v is None else f"{v:.{digits}f}x"


def _f(v: float | None) -> str:
  return "-" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
  return "-" if v is None else f"{v:.0%}"


def _gflop(r: dict | None) -> str:
  return "-" if r is None or "cost" not in r else f"{r['cost']['flops'] / 1e9:,.2f}"


def markdown(record: dict) -> str:
  """The results as a readable page: step table, kernel table, ratios, growth and skipped points."""
  cfg = record["config"]
  results = record["results"]
  lengths = cfg["lengths"]
  by = {(r["part"], r["variant"], r["length"]): r for r in results}
  step_variants = [v for v in (*VARIANTS, ABLATION) if any(k[0] == "step" and k[1] == v for k in by)]
  lines = [
    "# Attention variants in a full pre-training step, by window length",
    "",
    f"`{record['command']}` on {record['date']}, {record['machine']}, {record['allocator']} malloc,"
    f" jax {record['jax_version']}, commit {record['git_commit']}; load average"
    f" {record['load_average_start'][0]:.1f} at the start, {record['load_average_end'][0]:.1f} at the end.",
    "",
    f"Hidden {cfg['hidden']}, {cfg['layers']} layer, {cfg['heads']} heads, FFN {cfg['ffn']}, post-norm, user module,"
    f" dropout hidden {cfg['hidden_dropout']} / attention 0; {cfg['loss']}; {cfg['num_items']:,} items,"
    f" {cfg['num_users']:,} users; {cfg['rows']} row(s) of L per step, {cfg['users']}; flow chunk"
    f" {cfg['flow_chunk']}. Times are median (min) in ms over the timed steps after {cfg['warmup']} warm-up,"
    " variants interleaved. Memory: compiled = temp + argument + output bytes of `memory_analysis()`; temp is"
    " the part that grows with L; rss = peak-RSS rise over one warm-up step (a lower bound); GFLOP = XLA's"
    " `cost_analysis()` of the compiled program (deterministic).",
    "",
    "## Full step",
    "",
    "| L | variant | step ms | timed | tokens/s | GFLOP | compiled MiB | temp MiB | rss MiB |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for length in lengths:
    for v in step_variants:
      r = by.get(("step", v, length))
      if r is None:
        continue
      if r["status"] != "ok":
        lines.append(
          f"| {length} | {v} | skipped: {r['reason']} | - | - | {_gflop(r)} | {r['memory']['compiled'] / MIB:,.0f}"
          f" | {r['memory']['temp'] / MIB:,.0f} | - |"
        )
        continue
      rss = "-" if r.get("rss_mib") is None else f"{r['rss_mib']:,.0f}"
      lines.append(
        f"| {length} | {v} | {_ms(r)} | {r['timed']} | {r['tokens_per_s']:,.0f} | {_gflop(r)}"
        f" | {r['memory']['compiled'] / MIB:,.0f} | {r['memory']['temp'] / MIB:,.1f} | {rss} |"
      )
  if any(k[0] == "kernel" for k in by):
    lines += [
      "",
      f"## Attention kernel alone (forward + backward, [{cfg['rows']}, {cfg['heads']}, L,"
      f" {cfg['hidden'] // cfg['heads']}]) and the BCE negative sampler alone",
      "",
      "| L | softmax ms | flow-quadratic ms | flow-chunked ms | sampler ms | GFLOP: softmax / quadratic / chunked"
      " / sampler | temp MiB: softmax / quadratic / chunked / sampler |",
      "|---|---|---|---|---|---|---|",
    ]
    for length in lengths:
      pieces = [by.get(("kernel", v, length)) for v in VARIANTS] + [by.get(("sampler", "sampler", length))]
      temp = " / ".join("-" if r is None else f"{r['memory']['temp'] / MIB:,.1f}" for r in pieces)
      flops = " / ".join(_gflop(r) for r in pieces)
      lines.append(f"| {length} | " + " | ".join(_ms(r) for r in pieces) + f" | {flops} | {temp} |")
  rat = record["ratios"]
  lines += [
    "",
    "## Ratios, flow-quadratic / flow-chunked",
    "",
    "Time ratios of medians (of mins); GFLOP and memory from the compiled programs.",
    "",
    "| L | step time | kernel time | step / kernel GFLOP | step memory (compiled / temp) | kernel temp memory"
    " | softmax / chunked step time | sampler time / chunked step |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for row in rat["by_length"]:
    lines.append(
      f"| {row['length']} | {_x(row['step_time_quadratic_over_chunked'])}"
      f" ({_x(row['step_min_time_quadratic_over_chunked'])})"
      f" | {_x(row['kernel_time_quadratic_over_chunked'])} ({_x(row['kernel_min_time_quadratic_over_chunked'])})"
      f" | {_x(row['step_flops_quadratic_over_chunked'])} / {_x(row['kernel_flops_quadratic_over_chunked'])}"
      f" | {_x(row['step_compiled_memory_quadratic_over_chunked'])}"
      f" / {_x(row['step_temp_memory_quadratic_over_chunked'])}"
      f" | {_x(row['kernel_temp_memory_quadratic_over_chunked'])} | {_x(row['step_time_softmax_over_chunked'])}"
      f" | {_pct(row['sampler_time_over_chunked_step'])} |"
    )
  lines += [
    "",
    "## Growth with L: t(to) / t(from) (linear = to / from)",
    "",
    "| part / variant | from -> to | time, medians | time, mins | GFLOP | linear |",
    "|---|---|---|---|---|---|",
  ]
  for name, g in rat["growth"].items():
    lines.append(
      f"| {name} | {g['from']} -> {g['to']} | {g['time_ratio']:.1f} | {g['time_ratio_min']:.1f}"
      f" | {_f(g['flops_ratio'])} | {g['linear']:.0f} |"
    )
  cross = rat["step_crossover_length"]
  where = f"at every L >= {cross} of this sweep" if cross else "at the longest L of this sweep: no"
  lines += [
    "",
    f"Full step: flow-chunked faster than flow-quadratic {where}"
    f" (auto threshold FLOW_CHUNKED_MIN_LEN = {record['flow_chunked_min_len']}).",
  ]
  acc = record.get("acceptance")
  if acc:
    lines += [
      "",
      "## The issue's acceptance figures",
      "",
      f"* flow-quadratic / flow-chunked time at L = {acc['length']} (target >= 10x), medians (mins): full step"
      f" {_x(acc['step_time_ratio'], 1)} ({_x(acc['step_min_time_ratio'], 1)}), kernel alone"
      f" {_x(acc['kernel_time_ratio'], 1)} ({_x(acc['kernel_min_time_ratio'], 1)}); GFLOP: full step"
      f" {_x(acc['step_flops_ratio'], 1)}, kernel {_x(acc['kernel_flops_ratio'], 1)}.",
      f"* flow-chunked growth t({acc['growth_to']}) / t({acc['growth_from']}) (target <= 10), medians (mins):"
      f" full step {_f(acc['chunked_step_growth'])} ({_f(acc['chunked_step_growth_min'])}); full step with"
      f" uniform negatives {_f(acc['chunked_uniform_negatives_step_growth'])}"
      f" ({_f(acc['chunked_uniform_negatives_step_growth_min'])}); kernel alone {_f(acc['chunked_kernel_growth'])}"
      f" ({_f(acc['chunked_kernel_growth_min'])}).",
    ]
  return "\n".join(lines) + "\n"


def acceptance(rat: dict, length: int = 4096) -> dict:
  """The issue's acceptance figures picked from ``ratios``: quadratic / chunked at ``length`` and the chunked
  growth, from medians, mins and flops (None where not measured)."""
  row = next((r for r in rat["by_length"] if r["length"] == length), {})
  growth = rat["growth"]
  pick = lambda name, key="time_ratio": growth[name][key] if name in growth else None
  ends = growth.get(f"step/{CHUNKED}", {})
  out = {
    "length": length,
    "step_time_ratio": row.get("step_time_quadratic_over_chunked"),
    "step_min_time_ratio": row.get("step_min_time_quadratic_over_chunked"),
    "step_flops_ratio": row.get("step_flops_quadratic_over_chunked"),
    "kernel_time_ratio": row.get("kernel_time_quadratic_over_chunked"),
    "kernel_min_time_ratio": row.get("kernel_min_time_quadratic_over_chunked"),
    "kernel_flops_ratio": row.get("kernel_flops_quadratic_over_chunked"),
    "growth_from": ends.get("from", GROWTH_FROM),
    "growth_to": ends.get("to"),
  }
  for key, name in (
    ("chunked_step_growth", f"step/{CHUNKED}"),
    ("chunked_uniform_negatives_step_growth", f"step/{ABLATION}"),
    ("chunked_kernel_growth", f"kernel/{CHUNKED}"),
  ):
    out[key] = pick(name)
    out[f"{key}_min"] = pick(name, "time_ratio_min")
    out[f"{key}_flops"] = pick(name, "flops_ratio")
  return out


# ------------------------------------------------------------------------------------------------- driver


def kernel_fn(variant: str, chunk: int):
  """Forward + backward of the attention kernel alone: ``(q, k, v, w, seq_ids) -> grads of sum(y * w)``."""
  kind, impl = VARIANTS[variant]

  def loss(q, k, v, w, seq_ids):
    y = attention.KINDS[kind](q, k, v, seq_ids, impl=impl, chunk=chunk, dropout_rate=0.0, dropout_key=None)
    return jnp.sum(y * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure_length(length: int, variants: list[str], optimizer_cfg, budget: int) -> list[dict]:
  """All measurements at one window length (the step variants, then the kernels and the sampler)."""
  rows = _ROWS.value
  host = synthetic_rows(length, rows, _NUM_ITEMS.value, _NUM_USERS.value, _SEED.value + length)
  batch = jax.device_put(host)
  tokens = int(np.sum(host["targets"] > 0))
  users = int(sum(len(np.unique(r[r > 0])) for r in host["seq_ids"]))
  results, runners, meta = [], [], {}
  for v in variants:
    mcfg = model_config(v, length, _CHUNK.value, _NUM_ITEMS.value, _NUM_USERS.value)
    step, state, _ = reference.train_step(mcfg, "pretrain", optimizer_cfg)
    t0 = time.perf_counter()
    if v == ABLATION:
      with mock.patch.object(losses, "sample_negatives", uniform_negatives):
        lowered = step.lower(state, batch)
    else:
      lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    memory = memory_of(compiled)
    base = {"part": "step", "variant": v, "length": length, "memory": memory, "cost": cost_of(compiled)}
    base["compile_s"] = compile_s
    if memory["compiled"] > budget:
      reason = f"compiled {memory['compiled'] / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
      results.append({**base, "status": "skipped", "reason": reason})
      print(f"L={length} {v}: skipped ({reason})", flush=True)
      continue
    runners.append(Runner(v, compiled, (state, batch), donate_first=True))
    meta[v] = base
    print(f"L={length} {v}: compiled in {compile_s:.1f}s, {memory['compiled'] / MIB:,.0f} MiB", flush=True)
  timed = run_interleaved(runners, _WARMUP.value, _STEPS.value, _MIN_STEPS.value, _SECONDS.value)
  for r in runners:
    t = timing(r)
    results.append(
      {**meta[r.name], "status": "ok", **t, "rss_mib": r.rss_mib, "tokens": tokens, "users": users}
      | {"tokens_per_s": tokens / t["median_s"]}
    )
    print(f"L={length} {r.name}: {t['median_s'] * 1e3:,.1f} ms (min {t['min_s'] * 1e3:,.1f}, {timed} steps)")
  del runners

  if not _KERNEL.value:
    return results
  key = jax.random.split(jax.random.key(_SEED.value + length), 4)
  shape = (rows, HEADS, length, HIDDEN // HEADS)
  q, k, v_, w = (jax.random.normal(kk, shape, jnp.float32) for kk in key)
  seq_ids = batch["seq_ids"]
  kernel_runners, kmeta = [], {}
  for v in [v for v in VARIANTS if v in variants]:
    t0 = time.perf_counter()
    compiled = kernel_fn(v, _CHUNK.value).lower(q, k, v_, w, seq_ids).compile()
    base = {
      "part": "kernel",
      "variant": v,
      "length": length,
      "memory": memory_of(compiled),
      "cost": cost_of(compiled),
      "compile_s": time.perf_counter() - t0,
    }
    if base["memory"]["compiled"] > budget:
      results.append({**base, "status": "skipped", "reason": "over the memory budget"})
      continue
    kernel_runners.append(Runner(v, compiled, (q, k, v_, w, seq_ids)))
    kmeta[v] = base
  t0 = time.perf_counter()
  sampler = (
    jax.jit(losses.sample_negatives, static_argnums=4)
    .lower(jax.random.key(0), batch["items"], batch["targets"], batch["seq_ids"], _NUM_ITEMS.value)
    .compile()
  )
  kmeta["sampler"] = {
    "part": "sampler",
    "variant": "sampler",
    "length": length,
    "memory": memory_of(sampler),
    "cost": cost_of(sampler),
    "compile_s": time.perf_counter() - t0,
  }
  kernel_runners.append(
    Runner("sampler", sampler, (jax.random.key(0), batch["items"], batch["targets"], batch["seq_ids"]))
  )
  run_interleaved(kernel_runners, _WARMUP.value, _STEPS.value, _MIN_STEPS.value, _SECONDS.value / 2)
  for r in kernel_runners:
    results.append({**kmeta[r.name], "status": "ok", **timing(r), "rss_mib": r.rss_mib})
  print(
    f"L={length} kernels: " + ", ".join(f"{r.name} {statistics.median(r.times) * 1e3:,.1f} ms" for r in kernel_runners),
    flush=True,
  )
  return results


def main(argv):
  del argv
  allocator.use(_ALLOCATOR.value)  # re-executes this command on tcmalloc when asked and available
  lengths = [int(s) for s in _LENGTHS.value]
  variants = list(_VARIANTS.value)
  for v in variants:
    if v not in VARIANTS:
      raise app.UsageError(f"--variants: unknown {v!r}; expected some of {list(VARIANTS)}")
  if _ABLATION.value and CHUNKED in variants:
    variants.append(ABLATION)
  cfg = base_config()
  load_start = os.getloadavg()
  t_start = time.perf_counter()
  budget = int(_BUDGET.value * 2**30)
  results = []
  for length in lengths:
    results += measure_length(length, variants, cfg.optimizer, budget)
  lo, hi = (int(x * 1000) / 1000 for x in USER_LEN_FRACTION)
  record = {
    "benchmark": "attention_step",
    "command": " ".join(["python -m experiments.bench_attention", *sys.argv[1:]]),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": loop.machine_description(),
    "git_commit": loop.git_commit(),
    "jax_version": jax.__version__,
    "allocator": allocator.loaded(),
    "load_average_start": load_start,
    "load_average_end": os.getloadavg(),
    "wall_s": time.perf_counter() - t_start,
    "flow_chunked_min_len": attention.FLOW_CHUNKED_MIN_LEN,
    "config": {
      "lengths": lengths,
      "variants": {v: VARIANTS[CHUNKED if v == ABLATION else v] for v in variants},
      "hidden": HIDDEN,
      "layers": LAYERS,
      "heads": HEADS,
      "ffn": FFN,
      "norm": "post",
      "user_module": True,
      "hidden_dropout": HIDDEN_DROPOUT,
      "attn_dropout": 0.0,
      "loss": "bce (1 sampled negative), Adam, row-sparse tables",
      "num_items": _NUM_ITEMS.value,
      "num_users": _NUM_USERS.value,
      "rows": _ROWS.value,
      "users": f"users of length uniform in [{lo} L, {hi} L] per row, the last cut to fit",
      "flow_chunk": _CHUNK.value,
      "warmup": _WARMUP.value,
      "steps": [_MIN_STEPS.value, _STEPS.value],
      "seconds_per_length": _SECONDS.value,
      "memory_budget_gib": _BUDGET.value,
      "memory": "compiled = temp + argument + output bytes of the compiled step's memory_analysis()",
    },
    "results": results,
  }
  record["ratios"] = ratios(results, lengths)
  record["acceptance"] = acceptance(record["ratios"])
  page = markdown(record)
  print(page)
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_attention.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "bench_attention.md").write_text(page)


if __name__ == "__main__":
  app.run(main)
