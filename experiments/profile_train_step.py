"""Profile of the JAX training steps at the reference configuration of ``bench_torch.py``: where the time goes.

Same steps as ``bench_torch.py``'s ``jax`` variant: Beauty, hidden 256, 1 layer, 2 heads, FFN 512, flow
attention, post-norm, user module, max length 50, 30 packed rows x 50 per batch, Adam from
``base_config().optimizer``, ``make_train_step`` jitted by ``jit_train_step`` on a 1-device mesh (state
donated). ``pretrain``: BCE with one negative, dropout 0.5 (attention) / 0.1 (hidden); ``prompt_tune``:
prompts generated from the current parameters (mode ``last``, width 1), full-softmax CE, dropout 0.1 / 0.1.

Per part: compile, warm up (2 steps), time ``--steps`` steps (median wall ms, ``block_until_ready`` on the
metrics), then trace ``--steps`` more steps on the same batches with ``jax.profiler`` and aggregate the
trace per XLA op and per category (``CATEGORY_RULES``). Then an ablation measured in the same process,
interleaved (for round: for variant: one step): the full step, the step without dropout, forward + loss
only, the step with dense table gradients, and those gradients without the optimizer update
(``optax.set_to_zero()``; compare it with the dense-table variant).

Trace reading: every executed XLA op is a complete event (``ph == 'X'``) whose ``args`` carry ``hlo_op``
(the instruction name in ``compiled.as_text()``), ``hlo_module`` and ``run_id`` (one per execution). Events
without ``hlo_op`` are bookkeeping (ThunkExecutor, PjRt, PjitFunction, Slinky thread pool, Python frames,
``end: ...`` markers) and are skipped. A ``while`` (the threefry loops) encloses its body's op events on
the same thread, so each op gets its *self* time (its duration minus that of the op events nested in it on
its thread); self times are summed over threads and divided by the number of traced executions. The op
total therefore counts both worker threads and can exceed the wall time.

  python -m experiments.profile_train_step [--parts=pretrain,prompt_tune --steps=8 --out=experiments/results]

Writes ``<out>/profile_train_step.json`` and ``<out>/profile_train_step.md``. ``bench_torch.py`` is not
imported: its module-level absl flags (``--steps``, ``--parts``, ``--out``) would clash with these.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import pathlib
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments import reference
from recgpt_jax import allocator
from recgpt_jax.config import base_config
from recgpt_jax.data import io, tfds_builder
from recgpt_jax.train import loop
from recgpt_jax.train import step as step_lib

PARTS = ("pretrain", "prompt_tune")
ROW_LEN, MAX_LEN, TRAIN_ROWS = reference.ROW_LEN, reference.MAX_LEN, reference.TRAIN_ROWS
WARMUP_STEPS = 2
TOP_OPS = 15
NO_OPTIMIZER = "dense-table gradients, no optimizer update"
DENSE_TABLES = "dense table gradients (no row-sparse update)"
ABLATIONS = ("full step", DENSE_TABLES, "without dropout", "forward + loss only", NO_OPTIMIZER)

_PARTS = flags.DEFINE_list("parts", list(PARTS), "Training steps to profile.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps, then traced steps (distinct batches).")
_ABLATION_PARTS = flags.DEFINE_list("ablation_parts", list(PARTS), "Parts that get the ablation table.")
_ABLATION_ROUNDS = flags.DEFINE_integer("ablation_rounds", 12, "Interleaved ablation rounds (one step each).")
_OUT = flags.DEFINE_string("out", "experiments/results", "Where to write profile_train_step.{json,md}.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "", "Keep the raw traces here (default: a temporary directory).")
_DATASET = flags.DEFINE_string("dataset", "Beauty", "Bundled dataset.")
_ALLOCATOR = flags.DEFINE_enum(
  "allocator", "auto", allocator.CHOICES, "Memory allocator (recgpt_jax.allocator): auto = tcmalloc if present."
)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: trace and HLO parsing, categorisation.


def op_self_times(events: Iterable[dict], module: str | None = None) -> tuple[dict[str, float], int]:
  """Self time (microseconds) per XLA op summed over threads, and the number of distinct executions.

  Op events are the complete events (``ph == 'X'``) with ``args['hlo_op']`` (restricted to
  ``args['hlo_module'] == module`` if given). An op event fully inside another op event of the same
  ``(pid, tid)`` (a ``while`` body inside the ``while``) is subtracted from its innermost enclosing event.
  Executions are counted by distinct ``args['run_id']``.
  """
  per_thread = collections.defaultdict(list)
  runs = set()
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") != "X" or "hlo_op" not in args:
      continue
    if module is not None and args.get("hlo_module") != module:
      continue
    runs.add(args.get("run_id"))
    per_thread[(e.get("pid"), e.get("tid"))].append((float(e["ts"]), float(e.get("dur", 0.0)), args["hlo_op"]))
  totals: dict[str, float] = collections.defaultdict(float)
  eps = 1e-6
  for evs in per_thread.values():
    evs.sort(key=lambda x: (x[0], -x[1]))
    stack: list[list] = []  # [end, name, self time]
    for ts, dur, name in evs:
      while stack and stack[-1][0] <= ts + eps:
        _, n, self_t = stack.pop()
        totals[n] += self_t
      if stack and ts + dur <= stack[-1][0] + eps:
        stack[-1][2] -= dur
      stack.append([ts + dur, name, dur])
    for _, n, self_t in stack:
      totals[n] += self_t
  return dict(totals), len(runs)


_SHAPE_LEAF = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class InstrInfo:
  """One HLO instruction: its output shape text, leaves ``((dtype, dims), ...)``, opcode, ``op_name`` metadata,
  and whether it is a ``dot`` or a fusion whose fused computation contains one."""

  name: str
  shape: str
  leaves: tuple[tuple[str, tuple[int, ...]], ...]
  opcode: str
  op_name: str
  has_dot: bool


def parse_shape(shape: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """``'(f32[2,3]{1,0}, u32[])'`` -> ``(('f32', (2, 3)), ('u32', ()))``."""
  return tuple((t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE_LEAF.findall(shape))


def _split_shape(rest: str) -> tuple[str, str]:
  """Splits ``'<shape> <opcode>(...)...'``; a tuple shape is a balanced ``( ... )``."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def parse_hlo(text: str) -> dict[str, InstrInfo]:
  """Instruction name -> ``InstrInfo`` for every instruction of ``compiled.as_text()`` (all computations)."""
  raw = []  # (name, shape, opcode, op_name, called computations)
  opcodes = collections.defaultdict(set)  # computation -> opcodes of its instructions
  computation = None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      computation = m.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    shape, tail = _split_shape(m.group(2))
    opcode = tail.split("(", 1)[0].strip()
    op_name = _OP_NAME.search(tail)
    raw.append((m.group(1), shape, opcode, op_name.group(1) if op_name else "", _CALLS.findall(tail)))
    if computation is not None:
      opcodes[computation].add(opcode)
  return {
    name: InstrInfo(
      name, shape, parse_shape(shape), opcode, op_name, opcode == "dot" or any("dot" in opcodes[c] for c in calls)
    )
    for name, shape, opcode, op_name, calls in raw
  }


@dataclasses.dataclass(frozen=True)
class ShapeContext:
  """What the categories are recognised by. ``user_rows``: the user table's row count and that of the
  row-sparse sub-table the step gathers (``1 + ids`` that index it); ``sub_item_rows``: the same for the item
  table's sub-table (empty when the item table is used densely); ``item_table``: the item
  table's dims; ``other_params``: the other parameters' shapes; ``sampler``: the negative sampler's
  intermediate shapes (empty when the loss samples no negatives)."""

  user_rows: frozenset[int]
  sub_item_rows: frozenset[int]
  item_table: tuple[int, ...]
  other_params: frozenset[tuple[int, ...]]
  sampler: frozenset[tuple[int, ...]]


RNG_MARKERS = ("bernoulli", "threefry", "random_bits", "_uniform")

# First matching rule wins; ``categorise`` implements them in this order.
CATEGORY_RULES = (
  ("matmul", "a `dot`, or a fusion (ynn/xnn/...) whose fused computation contains a `dot`"),
  ("prompt top-k", "op_name contains `top_k` (prompt_tune picks the prompt items from the top-k of the scores)"),
  (
    "RNG",
    f"op_name contains one of {', '.join(RNG_MARKERS)}, or every output is u32: threefry bits (the sampler's"
    " uniform draw, key splits). The dropout masks are a counter hash fused into their consumers"
    " (`attention.keep_mask`), so they count where they are fused (mostly elementwise/layout)",
  ),
  (
    "user-table grad + optimizer",
    "an output's first dim is the user table's row count or that of its row-sparse sub-table (1 + users)",
  ),
  (
    "item-table grad + optimizer",
    "an output has the item table's dims (either order), or its first dim is the row count of the item"
    " table's row-sparse sub-table (1 + items + targets + negatives, sampled losses only)",
  ),
  (
    "negative sampler",
    "only for a loss with sampled negatives: op_name contains `sort`, or an output has one of the sampler's"
    " shapes [rows, 2len, 2len], [rows, len, 2len], [rows, 2len]",
  ),
  ("softmax/CE over catalogue", "an output has a dim of the item table's row count (not a matmul, not the table)"),
  ("other params optimizer", "an output has the shape of another parameter"),
  ("elementwise/layout", "everything else"),
)
CATEGORIES = tuple(c for c, _ in CATEGORY_RULES)


def categorise(info: InstrInfo | None, ctx: ShapeContext) -> str:
  """The category of one instruction (``CATEGORY_RULES``, first match); unknown instructions are elementwise."""
  if info is None:
    return "elementwise/layout"
  dims = [d for _, d in info.leaves]
  if info.has_dot:
    return "matmul"
  if "top_k" in info.op_name:
    return "prompt top-k"
  if any(m in info.op_name for m in RNG_MARKERS) or (info.leaves and all(t == "u32" for t, _ in info.leaves)):
    return "RNG"
  if any(d and d[0] in ctx.user_rows for d in dims):
    return "user-table grad + optimizer"
  if any(sorted(d) == sorted(ctx.item_table) or (d and d[0] in ctx.sub_item_rows) for d in dims):
    return "item-table grad + optimizer"
  if ctx.sampler and ("sort" in info.op_name or info.opcode == "sort" or any(d in ctx.sampler for d in dims)):
    return "negative sampler"
  if any(ctx.item_table[0] in d for d in dims):
    return "softmax/CE over catalogue"
  if any(d in ctx.other_params for d in dims):
    return "other params optimizer"
  return "elementwise/layout"


def summarise_ops(
  self_times_us: dict[str, float], runs: int, info: dict[str, InstrInfo], ctx: ShapeContext, top: int = TOP_OPS
) -> dict:
  """Per-step milliseconds per category (all categories, in ``CATEGORIES`` order) and the ``top`` ops."""
  per_cat = dict.fromkeys(CATEGORIES, 0.0)
  ops = []
  for name, us in self_times_us.items():
    cat = categorise(info.get(name), ctx)
    ms = us / 1e3 / runs
    per_cat[cat] += ms
    i = info.get(name)
    ops.append(
      {
        "op": name,
        "ms_per_step": ms,
        "category": cat,
        "shape": i.shape if i else "?",
        "op_name": i.op_name if i else "",
      }
    )
  total = sum(per_cat.values())
  ops.sort(key=lambda o: -o["ms_per_step"])
  return {
    "op_total_ms_per_step": total,
    "categories": [
      {"category": c, "ms_per_step": ms, "percent_of_op_total": 100.0 * ms / total if total else 0.0}
      for c, ms in per_cat.items()
    ],
    "top_ops": ops[:top],
    "num_ops": len(ops),
    "ops_not_in_hlo": sorted(n for n in self_times_us if n not in info),  # should be empty
  }


# ----------------------------------------------------------------------------------------------------------
# Building and running the steps.


def make_forward_step(graphdef, loss_cfg, prompt_cfg) -> Callable:
  """``make_train_step``'s step up to the loss (prompts, negatives, forward with dropout, loss), without the
  gradient; the state comes back unchanged but for ``step``. The tables are read whole (no row-sparse
  sub-tables: those only matter for the gradient)."""

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    drop_key, neg_key = jax.random.split(key)
    if prompt_cfg is not None:
      batch = step_lib.prompted_batch(nnx.merge(graphdef, jax.lax.stop_gradient(state.params)), batch, prompt_cfg)
    model = nnx.merge(graphdef, state.params)
    negatives = step_lib._negatives(neg_key, batch, loss_cfg, model.cfg.num_items)
    if negatives is not None:
      batch = {**batch, "negatives": negatives}
    hidden = model(*(batch[k] for k in step_lib.MODEL_INPUTS), dropout_key=drop_key)
    loss = step_lib._loss_from_hidden(model, hidden, batch, loss_cfg, None)
    return state.replace(step=state.step + 1), {"loss": loss}

  return train_step


def build_step(data, part: str, variant: str = "full step"):
  """(jitted step, initial state, model config) for one ablation variant of ``part``."""
  cfg = base_config()
  mcfg = reference.model_config(data, part, dropout=variant != "without dropout")
  one_device = jax.devices()[:1]
  if variant == "forward + loss only":
    step, state, graphdef = reference.train_step(mcfg, part, cfg.optimizer, devices=one_device)
    step, state = reference.jit_step(make_forward_step(graphdef, *reference.loss_and_prompt(part)), state, one_device)
    return step, state, mcfg
  tx = optax.set_to_zero() if variant == NO_OPTIMIZER else None
  row_sparse = variant not in (DENSE_TABLES, NO_OPTIMIZER)
  step, state, _ = reference.train_step(mcfg, part, cfg.optimizer, tx=tx, row_sparse=row_sparse, devices=one_device)
  return step, state, mcfg


def shape_context(params: dict, part: str, batch: dict[str, np.ndarray]) -> ShapeContext:
  user = tuple(params["user_embed"]["embedding"].shape)
  item = tuple(params["item_embed"]["embedding"].shape)
  others = frozenset(tuple(x.shape) for x in jax.tree.leaves(params)) - {user, item}
  rows, length = batch["items"].shape
  tokens = rows * length
  sampled = part == "pretrain"  # bce: one negative per position
  return ShapeContext(
    user_rows=frozenset({user[0], 1 + tokens}),
    sub_item_rows=frozenset({1 + 3 * tokens} if sampled else ()),
    item_table=item,
    other_params=others,
    sampler=frozenset({(rows, 2 * length, 2 * length), (rows, length, 2 * length), (rows, 2 * length)})
    if sampled
    else frozenset(),
  )


class Box:
  """A jitted step and the state it threads (donated every call)."""

  def __init__(self, step, state):
    self.step, self.state = step, state

  def __call__(self, batch) -> float:
    t0 = time.perf_counter()
    self.state, out = self.step(self.state, batch)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def profile_part(data, source, part: str, steps: int, trace_root: pathlib.Path) -> dict:
  step, state, mcfg = build_step(data, part)
  np_batches = reference.train_batches(source, part, WARMUP_STEPS + steps)
  dev = [jax.device_put(b) for b in np_batches]
  t0 = time.perf_counter()
  compiled = step.lower(state, dev[0]).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  module = re.match(r"HloModule (\S+?),", hlo).group(1)
  ctx = shape_context(state.params, part, np_batches[0])
  box = Box(step, state)
  for b in dev[:WARMUP_STEPS]:
    box(b)
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  timed = [box(b) for b in dev[WARMUP_STEPS:]]
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / len(timed)
  trace_dir = trace_root / part
  jax.profiler.start_trace(str(trace_dir))
  traced = [box(b) for b in dev[WARMUP_STEPS:]]
  jax.profiler.stop_trace()
  (trace_file,) = glob.glob(str(trace_dir / "plugins/profile/*/*.trace.json.gz"))
  with gzip.open(trace_file) as f:
    events = json.load(f)["traceEvents"]
  self_times, runs = op_self_times(events, module)
  if runs != steps:
    print(f"[{part}] warning: {runs} executions of {module} in the trace, {steps} steps traced", flush=True)
  summary = summarise_ops(self_times, runs, parse_hlo(hlo), ctx)
  wall = statistics.median(timed) * 1e3
  wall_traced = statistics.median(traced) * 1e3
  print(
    f"[{part}] median {wall:.1f} ms/step (traced {wall_traced:.1f}),"
    f" op total {summary['op_total_ms_per_step']:.1f} ms/step",
    flush=True,
  )
  return {
    "module": module,
    "compile_s": compile_s,
    "batches": f"{WARMUP_STEPS} warm-up + {steps} timed, then the same {steps} traced;"
    f" {TRAIN_ROWS} packed rows x {ROW_LEN}",
    "dropout": {"attn": mcfg.attn_dropout, "hidden": mcfg.hidden_dropout},
    "loss": "ce (full softmax), prompts last w=1" if part == "prompt_tune" else "bce, one negative",
    "recognised_by": {
      "user_rows": sorted(ctx.user_rows),
      "sub_item_rows": sorted(ctx.sub_item_rows),
      "item_table": list(ctx.item_table),
      "sampler_shapes": sorted(list(d) for d in ctx.sampler),
    },
    "wall_ms_median": wall,
    "wall_ms_all": [t * 1e3 for t in timed],
    "traced_wall_ms_median": wall_traced,
    "minor_page_faults_per_step": faults,  # fresh pages the allocator hands the step (see recgpt_jax.allocator)
    "traced_executions": runs,
    "op_total_over_wall": summary["op_total_ms_per_step"] / wall,
    **summary,
  }


def ablate(data, source, part: str, rounds: int) -> dict:
  boxes = {}
  for variant in ABLATIONS:
    step, state, _ = build_step(data, part, variant)
    boxes[variant] = Box(step, state)
  dev = [jax.device_put(b) for b in reference.train_batches(source, part, WARMUP_STEPS + rounds)]
  for box in boxes.values():
    for b in dev[:WARMUP_STEPS]:
      box(b)
  times = {v: [] for v in ABLATIONS}
  for b in dev[WARMUP_STEPS:]:
    for v, box in boxes.items():
      times[v].append(box(b))
  full = statistics.median(times["full step"])
  rows = [
    {
      "variant": v,
      "ms_median": statistics.median(t) * 1e3,
      "ms_min": min(t) * 1e3,
      "ms_max": max(t) * 1e3,
      "ratio_to_full": statistics.median(t) / full,
      "n": len(t),
    }
    for v, t in times.items()
  ]
  print(f"[{part}] ablation: " + ", ".join(f"{r['variant']} {r['ms_median']:.1f} ms" for r in rows), flush=True)
  return {"rounds": rounds, "variants": rows}


# ----------------------------------------------------------------------------------------------------------
# Outputs.


def write_markdown(path: pathlib.Path, rec: dict) -> str:
  lines = [
    "# Where the time goes: JAX training steps at the reference configuration",
    "",
    f"`{rec['command']}` on {rec['date_utc']}, {rec['machine']}, {rec['allocator']} malloc,"
    f" jax {rec['jax_version']}, commit"
    f" {rec['git_commit']}. Load average {rec['load_average_start'][0]:.2f} at start,"
    f" {rec['load_average_end'][0]:.2f} at end (shared machine).",
    "",
    rec["config"],
  ]
  for part, p in rec["parts"].items():
    lines += [
      "",
      f"## {part}",
      "",
      f"Loss {p['loss']}; dropout attention {p['dropout']['attn']} / hidden {p['dropout']['hidden']}; {p['batches']}."
      f" Median wall time {p['wall_ms_median']:.1f} ms/step ({p['traced_wall_ms_median']:.1f} while tracing);"
      f" {p['minor_page_faults_per_step']:,.0f} minor page faults per step ({rec['allocator']} malloc)."
      f" Op total (self times summed over threads) {p['op_total_ms_per_step']:.1f} ms/step ="
      f" {p['op_total_over_wall']:.2f}x the untraced wall time (ops overlap on the threads). {p['num_ops']} distinct"
      f" ops, {p['traced_executions']} traced executions, {len(p['ops_not_in_hlo'])} traced ops not found in the HLO.",
      "",
      "| category | ms/step (sum over threads) | % of op total |",
      "|---|---|---|",
    ]
    for c in p["categories"]:
      lines.append(f"| {c['category']} | {c['ms_per_step']:.2f} | {c['percent_of_op_total']:.1f}% |")
    lines.append(f"| **op total** | **{p['op_total_ms_per_step']:.2f}** | 100% |")
    lines += [
      "",
      f"Top {len(p['top_ops'])} ops:",
      "",
      "| op | ms/step | category | shape | op_name |",
      "|---|---|---|---|---|",
    ]
    for o in p["top_ops"]:
      shape = o["shape"].replace("|", "\\|")
      lines.append(f"| {o['op']} | {o['ms_per_step']:.2f} | {o['category']} | `{shape}` | `{o['op_name']}` |")
    if "ablation" in p:
      a = p["ablation"]
      lines += [
        "",
        f"Ablation ({a['rounds']} interleaved rounds, one step per variant per round, distinct batches):",
        "",
        "| variant | ms/step median (min-max) | ratio to full step |",
        "|---|---|---|",
      ]
      for r in a["variants"]:
        lines.append(
          f"| {r['variant']} | {r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['ratio_to_full']:.2f} |"
        )
  lines += ["", "Categories (first matching rule wins):", ""]
  lines += [f"- **{c}**: {rule}." for c, rule in CATEGORY_RULES]
  lines += ["", "Method: " + rec["method"]]
  text = "\n".join(lines) + "\n"
  path.write_text(text)
  return text


def main(argv):
  del argv
  allocator.use(_ALLOCATOR.value)  # re-executes this command on tcmalloc when asked and available
  load_start = os.getloadavg()
  t_start = time.time()
  parts = [p for p in _PARTS.value if p]
  for p in parts + [p for p in _ABLATION_PARTS.value if p]:
    if p not in PARTS:
      raise app.UsageError(f"unknown part {p!r}")
  print(f"load average {load_start}; jax {jax.__version__}", flush=True)
  data = io.load_dataset(_DATASET.value)
  source = tfds_builder.data_source(data.source)[0]
  trace_root = pathlib.Path(_TRACE_DIR.value or tempfile.mkdtemp(prefix="profile_train_step_"))
  results = {}
  try:
    for part in parts:
      results[part] = profile_part(data, source, part, _STEPS.value, trace_root)
    for part in parts:
      if part in _ABLATION_PARTS.value:
        results[part]["ablation"] = ablate(data, source, part, _ABLATION_ROUNDS.value)
  finally:
    if not _TRACE_DIR.value:
      shutil.rmtree(trace_root, ignore_errors=True)
  record = {
    "benchmark": "profile_train_step",
    "command": "python -m experiments.profile_train_step " + " ".join(sys.argv[1:]),
    "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)),
    "wall_s": time.time() - t_start,
    "machine": loop.machine_description(),
    "git_commit": loop.git_commit(),
    "jax_version": jax.__version__,
    "allocator": allocator.loaded(),
    "load_average_start": load_start,
    "load_average_end": os.getloadavg(),
    "config": f"{_DATASET.value}; hidden 256, 1 layer, 2 heads, FFN 512, flow attention, post-norm, user module,"
    f" max length {MAX_LEN}; {TRAIN_ROWS} packed rows x {ROW_LEN} per batch; Adam (base_config().optimizer);"
    " make_train_step + jit_train_step on a 1-device mesh, state donated (as bench_torch.py's jax variant).",
    "category_rules": [{"category": c, "rule": r} for c, r in CATEGORY_RULES],
    "method": "wall: median of per-step seconds (block_until_ready on the metrics) after 2 warm-up steps, compile"
    " excluded. Trace: jax.profiler over the same number of steps; op events = complete events with"
    " args.hlo_op of the step's module; self time = duration minus op events nested on the same thread (while"
    " bodies); summed over threads, divided by the traced executions (distinct run_id). Op shapes and op_name"
    " from compiled.as_text(). Ablation: for round: for variant: one step, each variant with its own state"
    " and batches; 'forward + loss only' is make_train_step's step up to the loss (make_forward_step);"
    " 'dense-table gradients, no optimizer update' is make_train_step with optax.set_to_zero() as the"
    " optimizer (no Adam state or arithmetic) and dense table gradients (the row-sparse update needs Adam), so"
    " compare it with the dense-table variant, not with the full step, for the optimizer's cost.",
    "parts": results,
  }
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  (out / "profile_train_step.json").write_text(json.dumps(record, indent=2) + "\n")
  print(write_markdown(out / "profile_train_step.md", record))


if __name__ == "__main__":
  app.run(main)
