"""Ahead-of-time compiles of the package's real programs for TPU and GPU targets, with no accelerator present.

For each ``--target`` (``tpu:v5e:2x4``, ``tpu:v5e:16x16``, ``tpu:v5p:2x2x2``, ``tpu:v6e:2x2``, ``gpu:h100:1x1x8``,
``gpu:h200:1x1x8``) the config's programs are built as the training loop builds them (no data: the catalogue sizes
come from flags, the config file's ``NUM_ITEMS`` / ``NUM_USERS`` or Beauty's) and compiled for the target's
devices (``recgpt_jax.parallel.aot``): the pre-training and prompt-tuning train steps, the evaluation step and the
multi-interest recall. Per device it records memory (arguments, outputs, temporaries, generated code, total
against the chip's memory), FLOPs and bytes accessed per step, the collectives with their bytes, and a roofline
*estimate* of the step time (max of FLOPs / peak and bytes / HBM bandwidth; public chip figures in ``aot.CHIPS``).
Then, for the train steps, it searches the largest ``train.rows_per_batch`` that fits in memory: powers of two of
the data-axis size (starting at the power of two below a linear prediction from the first two compiles) until one
does not fit, then ``--refine`` bisection steps.

TPU: libtpu (``jax[tpu]``) compiles; a program that does not fit fails to compile with RESOURCE_EXHAUSTED. GPU:
the jax CUDA plugin (``jax-cuda13-plugin``, in a separate virtual environment: installed next to libtpu in the
project's venv it makes every jax start look for a GPU) compiles against XLA's H100 / H200 target descriptions
(``experiments/gpu_specs``); nothing checks memory at compile time there, so the total is compared with JAX's
default share of the GPU (``--gpu_memory_fraction``), and the GPU compiler reports no cost analysis, so FLOPs and
bytes come from the same program compiled for as many CPU devices (the same SPMD partitioning, XLA's CPU fusion).

  python -m experiments.aot_compile --config=experiments/configs/aot_reference.py --target=tpu:v5e:2x4
  python -m experiments.aot_compile --config=experiments/configs/aot_large.py --target=tpu:v5e:16x16
  /work/gpu-aot-venv/bin/python -m experiments.aot_compile --config=experiments/configs/aot_large.py \
      --target=gpu:h100:1x1x8

Writes ``experiments/results/aot_<config name>_<target>.json`` and rebuilds ``aot_compile.md`` from every
``aot_*.json`` there.
"""

from __future__ import annotations

import os

# No accelerator is attached: run on the CPU backend (which also keeps the CUDA plugin from checking for CUDA
# libraries); other processes may hold libtpu's lockfile, which only guards real TPU chips.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")

import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from recgpt_jax import errors, provenance  # noqa: E402
from recgpt_jax.errors import UserError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Beauty, the default catalogue (recgpt_jax/data/bundled/README.md): 12,101 items, 22,363 users; its test-set
# histories are at most 204 items: 208 history columns, the set-wide width the recorded results were compiled with
# (packing.history_width now gives each evaluation batch its own width, 8 * 2**j: 64 to 256 on Beauty).
BEAUTY_ITEMS, BEAUTY_USERS, BEAUTY_HISTORY = 12_101, 22_363, 208
# Packed-row positions per training user on Beauty (first-fit packing of its 22,363 training windows, measured:
# 8.57 users per 50-position row, 33.9 per 200-position row): turns rows into an estimate of users per step.
BEAUTY_POSITIONS_PER_USER = 5.87

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with get_config().", lock_config=False)
_TARGET = flags.DEFINE_list("target", None, "Targets, e.g. tpu:v5e:2x4,gpu:h100:1x1x8.")
_PROGRAMS = flags.DEFINE_list(
  "programs", ["pretrain_step", "prompt_tune_step", "eval_step", "recall"], "Programs to compile."
)
_SEARCH = flags.DEFINE_list(
  "search", ["pretrain_step", "prompt_tune_step"], "Train steps whose largest fitting batch is searched ('' = none)."
)
_NUM_ITEMS = flags.DEFINE_integer("num_items", -1, "Items; -1 = the config file's NUM_ITEMS, else Beauty's.")
_NUM_USERS = flags.DEFINE_integer("num_users", -1, "Users; -1 = the config file's NUM_USERS, else Beauty's.")
_HISTORY = flags.DEFINE_integer("history", BEAUTY_HISTORY, "History columns of evaluation batches (Beauty: 208).")
_REFINE = flags.DEFINE_integer("refine", 1, "Bisection steps after the power-of-two search.")
_MAX_ROWS = flags.DEFINE_integer("max_rows_per_device", 1 << 16, "Largest rows per device the search tries.")
_GPU_SPECS = flags.DEFINE_string("gpu_specs", str(ROOT / "experiments" / "gpu_specs"), "XLA GPU target descriptions.")
_GPU_FRACTION = flags.DEFINE_float(
  "gpu_memory_fraction", 0.75, "Share of a GPU's memory a program may use (JAX preallocates 75% by default)."
)
_KEEP_HLO = flags.DEFINE_bool("keep_collectives", False, "Record every collective, not only the largest.")
_OUT = flags.DEFINE_string("out", str(ROOT / "experiments" / "results"), "Results folder ('' = do not write).")
flags.mark_flags_as_required(["config", "target"])


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
  import jax

  versions = {"jax": jax.__version__}
  for dist in ("jaxlib", "libtpu", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax"):
    with contextlib.suppress(metadata.PackageNotFoundError):
      versions[dist] = metadata.version(dist)
  return {"cpu": provenance.cpu_name(), "cores": os.cpu_count(), "versions": versions}


def catalogue() -> tuple[int, int]:
  """``(num_items, num_users)``: the flags, else the config file's ``NUM_ITEMS`` / ``NUM_USERS``, else Beauty's."""
  module = {}
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  if path and pathlib.Path(path).is_file():
    spec = importlib.util.spec_from_file_location("_aot_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    module = vars(mod)
  items = _NUM_ITEMS.value if _NUM_ITEMS.value > 0 else int(module.get("NUM_ITEMS", BEAUTY_ITEMS))
  users = _NUM_USERS.value if _NUM_USERS.value > 0 else int(module.get("NUM_USERS", BEAUTY_USERS))
  return items, users


def fit_batches_to_mesh(c, data: int) -> list[str]:
  """Rounds the config's batch sizes up to multiples of the mesh's data axis (in place); says what changed."""
  changed = []
  for group, name in (("train", "rows_per_batch"), ("eval", "rows_per_batch"), ("eval", "users_per_batch")):
    value = c[group][name]
    if value % data:
      c[group][name] = -(-value // data) * data
      changed.append(f"{group}.{name} {value} -> {c[group][name]} (a multiple of the data axis, {data})")
  return changed


def gpu_spec_text(target) -> str:
  path = pathlib.Path(_GPU_SPECS.value) / target.spec.gpu_spec
  try:
    return path.read_text()
  except OSError as e:
    raise UserError(f"cannot read the GPU target description {path}: {e.strerror}") from None


def slug(target_name: str) -> str:
  return target_name.replace(":", "_")


_CPU_COSTS: dict[tuple, dict | None] = {}


class CostFromCpu:
  """FLOPs and bytes of a GPU program from the same program compiled for as many CPU devices."""

  def __init__(self, config, sizes, num_devices: int):
    from recgpt_jax.parallel import aot

    self.sizes, self.num_devices = sizes, num_devices
    self.note = ""
    if config.model.attention_impl in ("cudnn", "splash"):  # GPU/TPU-only kernels: the CPU twin uses the XLA form
      config = config.copy_and_resolve_references()
      self.note = f"; attention_impl {config.model.attention_impl} counted as its XLA form"
      config.model.attention_impl = "xla"
    self.config = config
    devices = aot.cpu_mesh_devices(num_devices)
    self.built = None if devices is None else aot.build(config, **sizes, devices=devices)

  def __call__(self, name: str, rows: int | None):
    from recgpt_jax.parallel import aot

    if self.built is None:
      return None, f"none: fewer than {self.num_devices} CPU devices for the CPU compile"
    key = (self.config.to_json(), tuple(sorted(self.sizes.items())), self.num_devices, name, rows, _HISTORY.value)
    if key not in _CPU_COSTS:  # shared by the GPU targets of one run (the same program for H100 and H200)
      program = aot.make_program(self.built, name, history=_HISTORY.value, rows_per_batch=rows)
      _CPU_COSTS[key] = aot.cost(program.fn.lower(*program.args).compile())
    return _CPU_COSTS[key], (
      f"XLA cost analysis of the same program compiled for {self.num_devices} CPU devices (same mesh and SPMD"
      " partitioning; the GPU compiler reports no cost analysis): FLOPs as on the GPU, bytes accessed under"
      " XLA's CPU fusion" + self.note
    )


def run_target(config, target_name: str) -> dict:
  import jax

  from recgpt_jax.parallel import aot

  target = aot.parse_target(target_name)
  if target.platform == "gpu":
    aot.GPU_MEMORY_FRACTION = _GPU_FRACTION.value
  spec_text = gpu_spec_text(target) if target.platform == "gpu" else None
  devices = aot.target_devices(target, spec_text)
  target = target.with_devices(devices)
  if target.devices_per_chip > 1:
    raise UserError(
      f"target {target.name}: its topology lists each of the {target.num_chips} chips' {target.devices_per_chip}"
      " TensorCores as a device (no megacore), and jax builds TPU v4+ meshes from one device per chip"
    )
  num_items, num_users = catalogue()
  sizes = {"num_items": num_items, "num_users": num_users}
  c = config.copy_and_resolve_references()
  built = aot.build(c, **sizes, devices=devices)
  mesh_shape = dict(built.mesh.shape)
  adjusted = fit_batches_to_mesh(c, mesh_shape["data"])
  log(
    f"{target.name}: {len(devices)} x {devices[0].device_kind}, mesh {mesh_shape}; {c.name}: {num_items:,} items,"
    f" {num_users:,} users, model.dtype {c.model.get('dtype', 'float32 (no model.dtype field)')}"
  )
  for line in adjusted:
    log(f"  {line}")
  options = aot.GPU_COMPILER_OPTIONS if target.platform == "gpu" else None
  table = built.abstract_state.params["item_embed"]["embedding"]
  shard_elements = math.prod(table.sharding.shard_shape(table.shape))
  cpu_cost = CostFromCpu(c, sizes, len(devices)) if target.platform == "gpu" else None
  record = {
    "benchmark": "aot_compile",
    "command": "python -m experiments.aot_compile " + " ".join(sys.argv[1:]),
    "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    "machine": machine(),
    "git_commit": provenance.git_commit(),
    "config_name": c.name,
    "config": json.loads(c.to_json()),
    "target": {
      "name": target.name,
      "chip": target.spec.name,
      "chips": target.num_chips,
      "devices": len(devices),
      "device_kind": devices[0].device_kind,
      "mesh": mesh_shape,
      "peak_bf16_flops": target.spec.peak_flops,
      "hbm_bytes_per_s": target.spec.hbm_bytes_per_s,
      "hbm_bytes": target.spec.hbm_bytes,
      "memory_limit_bytes": target.memory_limit,
      "spec_source": target.spec.source,
    },
    "sizes": {
      **sizes,
      "vocab_size": built.model_cfg.vocab_size,
      "history": _HISTORY.value,
      "model_dtype": getattr(built.model_cfg, "dtype", "float32"),
      "param_dtype": getattr(built.model_cfg, "param_dtype", "float32"),
    },
    "method": {
      "memory": "compiled.memory_analysis() of the per-device program; total = arguments + outputs - aliased"
      " (donated) + temporaries + generated code; limit = HBM (TPU; the compiler refuses more) or"
      f" {aot.GPU_MEMORY_FRACTION:.0%} of device memory (GPU, JAX's default preallocation; not enforced at compile)",
      "cost": "FLOPs and bytes accessed per device per call from XLA's cost analysis (see each program's source)",
      "collectives": "recgpt_jax.parallel.hlo over compiled.as_text(): result bytes per device; a collective in a"
      " loop body counts once",
      "roofline": aot.ROOFLINE_NOTE,
      "search": "largest train.rows_per_batch (multiple of the data axis) that fits: powers of two up from the"
      " power of two below a linear prediction from the first two compiles, then bisection",
      "users_estimate": f"rows x row_len / {BEAUTY_POSITIONS_PER_USER} (Beauty's packed positions per user)",
    },
    "compiler_options": options,
    "batch_adjustments": adjusted,
    "programs": [],
    "largest_batch": {},
  }
  for name in _PROGRAMS.value:
    program = aot.make_program(built, name, history=_HISTORY.value)
    log(f"  {name}: compiling ({program.rows_per_batch} rows x {program.row_len})")
    result = aot.compile_program(program, options)
    fallback = (lambda name=name: cpu_cost(name, None)) if cpu_cost else None
    rep = aot.report(
      result, target, cost_fallback=fallback, keep_hlo_ops=_KEEP_HLO.value, table_shard_elements=shard_elements
    )
    if result.compiled is not None:  # fused attention kernels in the compiled program (cuDNN fmha, Mosaic/splash)
      text = result.compiled.as_text()
      rep["kernel_calls"] = {"cudnn_fmha": text.count("__cudnn$fmha"), "tpu_custom_call": text.count("tpu_custom_call")}
    record["programs"].append(rep)
    log("  " + summary_line(rep) + (f", kernels {rep['kernel_calls']}" if "kernel_calls" in rep else ""))
  data = mesh_shape["data"]
  for name in [s for s in _SEARCH.value if s]:
    if name not in ("pretrain_step", "prompt_tune_step"):
      raise UserError(f"--search: {name!r} is not a train step (pretrain_step, prompt_tune_step)")
    log(f"  {name}: largest batch that fits {target.memory_limit / aot.GiB:.1f} GiB per device")
    best, best_result, trail = search(built, name, target, step=data, options=options)
    entry = {"rows_per_batch": best, "rows_per_device": best // data, "trail": trail}
    if best_result is not None:
      fallback = (lambda name=name, best=best: cpu_cost(name, best)) if cpu_cost else None
      rep = aot.report(best_result, target, cost_fallback=fallback, table_shard_elements=shard_elements)
      rep["users_estimate"] = round(best * c.train.row_len / BEAUTY_POSITIONS_PER_USER)
      entry["at_largest"] = rep
      log(f"  {name}: largest {best} rows ({best // data} per device): " + summary_line(rep))
    else:
      log(f"  {name}: not even {data} rows fit")
    record["largest_batch"][name] = entry
  del jax
  return record


def search(built, name: str, target, *, step: int, options: dict | None):
  """``aot.largest_fitting`` over rows of the train step ``name``, starting near a linear prediction."""
  from recgpt_jax.parallel import aot

  cache = {}

  def try_rows(rows: int):
    if rows not in cache:
      program = aot.make_program(built, name, history=_HISTORY.value, rows_per_batch=rows)
      cache[rows] = aot.compile_program(program, options, trace_errors=True)
    return cache[rows]

  limit = target.memory_limit
  max_rows = _MAX_ROWS.value * step
  # Two probes (the config's batch and 4x it) give the memory per row; the doubling starts at the power of two
  # below 90% of the predicted limit (XLA's compile of a program that does not fit is the slow one).
  first_rows = max(step, built.config.train.rows_per_batch // step * step)
  start = first_rows
  first, second = try_rows(first_rows), try_rows(4 * first_rows)
  if aot.fits(first, limit) and aot.fits(second, limit):
    m1 = aot.memory(first.compiled, limit)["total_bytes"]
    m2 = aot.memory(second.compiled, limit)["total_bytes"]
    per_row = max(m2 - m1, 1) / (3 * first_rows)
    predicted = first_rows + (0.9 * limit - m1) / per_row
    start = step
    while start * 2 <= min(predicted, max_rows):
      start *= 2
    log(f"    memory {m1 / aot.GiB:.3f} GiB + {per_row / 2**20:.3f} MiB per row: ~{predicted:,.0f} rows fit")
  elif not aot.fits(first, limit):
    start = step
  best, result, trail = aot.largest_fitting(
    try_rows, limit, step=step, start=start, max_rows=max_rows, refine=_REFINE.value, log=log
  )
  return best, result, trail


def summary_line(rep: dict) -> str:
  from recgpt_jax.parallel import aot

  m = rep["memory"]
  if m.get("total_bytes") is None:
    return f"{rep['program']}: does not fit ({m.get('error')})"
  line = (
    f"{rep['program']}: {m['total_bytes'] / aot.GiB:.2f} GiB of {m['limit_bytes'] / aot.GiB:.1f}"
    f" ({'fits' if m['fits'] else 'DOES NOT FIT'}; temp {m['temp_bytes'] / aot.GiB:.2f}, args"
    f" {m['argument_bytes'] / aot.GiB:.2f})"
  )
  if rep.get("cost"):
    r = rep["roofline"]
    line += (
      f", {rep['cost']['flops'] / 1e9:.1f} GFLOP, {rep['cost']['bytes_accessed'] / 1e9:.2f} GB accessed,"
      f" step {r['step_s_estimate'] * 1e3:.2f} ms (estimate, {r['bound']}-bound)"
    )
  coll = rep["collectives"]
  line += f", collectives {coll['total_result_bytes'] / 2**20:.1f} MiB, compile {rep['compile_s']:.0f} s"
  return line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _CONFIG.value
    config.name  # noqa: B018 (a config that failed to load raises on first access)
  except Exception as e:  # noqa: BLE001 (any failure to load the user's config file is a user error)
    detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    print(f"error: cannot load --config: {detail[-1] if detail else type(e).__name__}", file=sys.stderr)
    sys.exit(2)
  try:
    from recgpt_jax.parallel import aot

    targets = [aot.parse_target(t) for t in _TARGET.value]
    for name in _PROGRAMS.value:
      if name not in aot.PROGRAMS:
        raise UserError(f"--programs: unknown program {name!r}; expected some of {', '.join(aot.PROGRAMS)}")
    gpu_devices = max((t.num_devices for t in targets if t.platform == "gpu"), default=0)
    if gpu_devices:
      import jax

      jax.config.update("jax_num_cpu_devices", gpu_devices)  # for the CPU compile that gives GPU FLOPs
    for target in targets:
      record = run_target(config, target.name)
      if _OUT.value:
        out = pathlib.Path(_OUT.value)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"aot_{record['config_name'].removeprefix('aot_')}_{slug(target.name)}.json"
        path.write_text(json.dumps(merge(path, record), indent=2) + "\n")
        write_markdown(out)
        log(f"wrote {path} and {out / 'aot_compile.md'}")
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def merge(path: pathlib.Path, record: dict) -> dict:
  """``record`` plus the programs and searches of the results already at ``path`` that this run did not redo
  (same config, sizes and target only; otherwise ``record`` replaces them)."""
  try:
    old = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return record
  same = (
    all(old.get(k) == record[k] for k in ("config", "sizes"))
    and old.get("target", {}).get("name") == (record["target"]["name"])
  )
  if not same:
    return record
  programs = {p["program"]: p for p in old.get("programs", [])} | {p["program"]: p for p in record["programs"]}
  order = {name: i for i, name in enumerate(("pretrain_step", "prompt_tune_step", "eval_step", "recall"))}
  return {
    **record,
    "commands": old.get("commands", [old.get("command")]) + [record["command"]],
    "programs": sorted(programs.values(), key=lambda p: order.get(p["program"], 99)),
    "largest_batch": old.get("largest_batch", {}) | record["largest_batch"],
  }


# --- markdown -------------------------------------------------------------------------------------------------


def _gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:,.2f}"


def write_markdown(out: pathlib.Path) -> None:
  """Rebuilds ``aot_compile.md`` from every ``aot_*.json`` in ``out``."""
  from recgpt_jax.parallel import aot

  records = []
  for path in sorted(out.glob("aot_*.json")):
    try:
      rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      continue
    if rec.get("benchmark") == "aot_compile":
      records.append(rec)
  lines = [
    "# Ahead-of-time compiles for TPU and GPU targets (no accelerator attached)",
    "",
    "Written by `experiments/aot_compile.py` (one JSON per config and target next to this file; commands, dates,"
    " commits and versions there). Every figure is **per device**, read off the program XLA compiled for the"
    " target's devices with the config's mesh. The step times are **roofline estimates**, not measurements ("
    + aot.ROOFLINE_NOTE
    + "). GPU FLOPs/bytes come from the same program compiled for as many CPU devices (the GPU compiler reports"
    " none). GPU memory is compared with 75% of the device's memory (JAX's default preallocation); TPU programs"
    " that do not fit HBM fail to compile.",
    "",
    "## Chips (public vendor figures, per chip)",
    "",
    "| chip | peak dense bf16 TFLOP/s | HBM GB/s | HBM GiB | source |",
    "|---|---:|---:|---:|---|",
  ]
  for chip in aot.CHIPS.values():
    lines.append(
      f"| {chip.name} | {chip.peak_flops / 1e12:,.1f} | {chip.hbm_bytes_per_s / 1e9:,.0f}"
      f" | {chip.hbm_bytes / 2**30:,.1f} | {chip.source} |"
    )
  lines += [
    "",
    "## Programs at the config's batch",
    "",
    "| config | target | mesh d x m | program | rows x len | memory GiB total / limit | args | temp | fits"
    " | GFLOP | GB accessed | collectives MiB (largest) | step ms (estimate) | compile s |",
    "|---|---|---|---|---|---|---:|---:|---|---:|---:|---|---:|---:|",
  ]
  for rec in records:
    t = rec["target"]
    mesh = f"{t['mesh']['data']} x {t['mesh']['model']}"
    for p in rec["programs"]:
      lines.append(_program_row(rec, mesh, p))
  lines += [
    "",
    "## Largest training batch that fits",
    "",
    "rows = `train.rows_per_batch` (packed rows of `row_len` positions); users = an estimate at Beauty's packing"
    " (5.87 positions per user). Step time and positions/s (padding included): roofline estimates at that batch.",
    "",
    "| config | target | program | rows (per device) | positions / step | users / step (est.) | memory GiB"
    " | step ms (estimate) | positions/s (estimate) | search attempts |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for rec in records:
    for name, entry in rec.get("largest_batch", {}).items():
      rep = entry.get("at_largest")
      if rep is None:
        lines.append(f"| {rec['config_name']} | {rec['target']['name']} | {name} | 0 (none fits) | | | | | | |")
        continue
      step = rep.get("roofline", {}).get("step_s_estimate")
      tokens = rep["tokens_per_step"]
      lines.append(
        f"| {rec['config_name']} | {rec['target']['name']} | {name} | {entry['rows_per_batch']:,}"
        f" ({entry['rows_per_device']:,}) | {tokens:,} | {rep.get('users_estimate', 0):,}"
        f" | {_gib(rep['memory'].get('total_bytes'))} | {'-' if step is None else f'{step * 1e3:,.2f}'}"
        f" | {'-' if step is None else f'{tokens / step:,.0f}'} | {len(entry['trail'])} |"
      )
  lines += ["", "## Notes", ""]
  for rec in records:
    s = rec["sizes"]
    lines.append(
      f"- {rec['config_name']} on {rec['target']['name']}: {s['num_items']:,} items (table {s['vocab_size']:,}"
      f" rows), {s['num_users']:,} users, model.dtype {s['model_dtype']}, param_dtype {s['param_dtype']};"
      f" {rec['date_utc']}, commit {rec['git_commit'][:12]}, jax {rec['machine']['versions'].get('jax')}."
    )
  lines += ["", "## Largest collectives per device (result shapes)", ""]
  for rec in records:
    for p in rec["programs"]:
      coll = p.get("collectives")
      if not coll:
        continue
      big = "; ".join(
        f"{c['op']} {'+'.join(c['result'][:3])}{' ...' if len(c['result']) > 3 else ''}"
        f" ({c['result_bytes'] / 2**20:,.1f} MiB)"
        for c in coll["largest"][:3]
      )
      gathers = coll.get("large_all_gathers")
      flag = (
        ""
        if gathers is None
        else (
          " No all-gather as large as a table shard."
          if not gathers
          else f" **{len(gathers)} all-gathers as large as a table shard.**"
        )
      )
      lines.append(f"- {rec['config_name']}, {rec['target']['name']}, {p['program']}: {big or 'none'}.{flag}")
  (out / "aot_compile.md").write_text("\n".join(lines) + "\n")


def _program_row(rec: dict, mesh: str, p: dict) -> str:
  m = p["memory"]
  head = (
    f"| {rec['config_name']} | {rec['target']['name']} | {mesh} | {p['program']}"
    f" | {p['rows_per_batch']} x {p['row_len']}"
  )
  if m.get("total_bytes") is None:
    return head + f" | does not fit | | | no | | | | | {p['compile_s']:.0f} |"
  cost = p.get("cost") or {}
  coll = p["collectives"]
  largest = coll["largest"][0] if coll["largest"] else None
  big = f" ({largest['op']} {'+'.join(largest['result'][:2])})" if largest else ""
  step = p.get("roofline", {}).get("step_s_estimate")
  return (
    head + f" | {_gib(m['total_bytes'])} / {_gib(m['limit_bytes'])} | {_gib(m['argument_bytes'])}"
    f" | {_gib(m['temp_bytes'])} | {'yes' if m['fits'] else '**no**'}"
    f" | {cost.get('flops', 0) / 1e9:,.1f} | {cost.get('bytes_accessed', 0) / 1e9:,.2f}"
    f" | {coll['total_result_bytes'] / 2**20:,.1f}{big} | {'-' if step is None else f'{step * 1e3:,.3f}'}"
    f" | {p['compile_s']:.0f} |"
  )


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags_or_exit)
