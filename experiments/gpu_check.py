"""GPU check: the reference configuration's speed on one accelerator, JAX variants and the PyTorch port side by side.

Meant for a short loan of one GPU (one command, <= 8 minutes including installs and compiles); on a machine
without a GPU it dry-runs the same sections at small sizes (``--size=auto``) and writes the same JSON and
tables. Sections (each group's variants are warmed up first, then timed in interleaved rounds, medians):

1. ``train``: pre-training (BCE, one negative) and prompt-tuning (prompts ``last``, ``w = 1``, full-softmax CE)
   steps of the reference configuration (``experiments/reference.py``: hidden 256, 1 layer, 2 heads, FFN 512,
   flow attention, rows of 50), target tokens/s: float32 vs bfloat16 (``model.dtype``; parameters float32),
   and softmax attention ``xla`` vs ``cudnn`` (both bfloat16 and ``attn_dropout = 0``, which cuDNN needs);
2. ``flow_len``: Flow-Attention ``xla`` (quadratic) vs ``chunked`` (``model.flow_chunk`` 128) in the
   pre-training step with packed rows of L = 200 and 2000 (same positions per batch; ``attn_dropout = 0``);
3. ``recall``: two-step multi-interest recall (18 + 2, ``recall.decoder.make_recall_fn``) of every test user,
   users/s, float32 vs bfloat16, per ``users_per_batch`` layout;
4. ``torch``: the PyTorch port (``experiments/torch_recgpt``) on CUDA with the same batches and the same JAX
   initialisation: eager, ``torch.compile`` and bfloat16 autocast, interleaved with the JAX float32 and
   bfloat16 steps of section 1; ratios to JAX float32 and the JAX speed-up over the fastest torch variant.

Data: the bundled Beauty dataset (``data.io.load_dataset``, no TFDS) as an in-memory record source, batched by
``data.pipeline.TrainInput`` (Grain; if Grain cannot be imported, the same packing plan is assembled without
it and the JSON says so) and ``data.packing.pack_eval_batches``.

Robustness: a variant that fails (e.g. cuDNN attention unavailable) is recorded with its error and the rest go
on; the run has a time budget (``--budget_s``, counted from ``$GPU_CHECK_T0`` when the wrapper sets it):
each section gets a share of what is left, rounds stop early and later warm-ups are skipped (noted) when the
share is spent, and a watchdog writes the results so far and exits at budget + 20 s. Results are rewritten
after every warm-up and round, so a run killed from outside keeps what it measured. If the process itself dies
(e.g. torch and JAX loading clashing CUDA libraries), the wrapper reruns what it did not finish (``rerun_plan``):
a torch section alone, with JAX on the CPU, compared with the first process's JAX times. torch is imported
only by the torch section. ``GPU_CHECK_SIMULATE_CRASH=SECTION[:hang]`` kills (hangs) the process at the start
of SECTION, to test the reruns and the watchdog.

  bash experiments/gpu_check.sh fetch             # here, once: the wheels of the dependencies (pip download)
  bash experiments/gpu_check.sh [flags]           # on the GPU machine: installs them, runs this module
  python -m experiments.gpu_check [--platform=cpu --size=quick --budget_s=... --sections=train,flow_len,...]

Writes <out>/<name>.json and <out>/<name>.md (name: gpu_check, or gpu_check_cpu_dryrun at quick size).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

T0 = float(os.environ.get("GPU_CHECK_T0") or time.time())  # the budget's clock (the wrapper's start)

try:  # Grain batches the training data; without it, see train_batches.
  import grain  # noqa: F401

  GRAIN_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure (missing wheel, protobuf mismatch) takes the fallback
  GRAIN_ERROR = f"{type(e).__name__}: {e}"
  sys.modules["grain"] = types.ModuleType("grain")  # data.pipeline needs Grain only to iterate an epoch

from experiments import reference  # noqa: E402 - after the Grain fallback
from recgpt_jax import errors, provenance  # noqa: E402
from recgpt_jax.config import base_config  # noqa: E402
from recgpt_jax.data import io, packing, pipeline, split  # noqa: E402
from recgpt_jax.model import attention  # noqa: E402
from recgpt_jax.model.transformer import ModelConfig, RecGPT  # noqa: E402
from recgpt_jax.recall import decoder  # noqa: E402
from recgpt_jax.train import step as step_lib  # noqa: E402

SECTIONS = ("train", "flow_len", "recall", "torch")
# Share of the remaining budget a section may use (normalised over the sections still to run).
SECTION_WEIGHT = {"train": 3.0, "flow_len": 2.0, "recall": 1.5, "torch": 3.5}
TORCH_VARIANTS = ("torch_eager", "torch_eager_bf16", "torch_compiled", "torch_compiled_bf16")
QUOTAS = (18, 2)
WARMUP_UNITS = 2  # first call (compile) + one more, excluded from timing
WATCHDOG_GRACE_S = 20.0
SECTION_MIN_S = 30.0  # a section's time, however small its share, while later sections can keep as much
MAX_LEN, ROW_LEN, TRAIN_ROWS = reference.MAX_LEN, reference.ROW_LEN, reference.TRAIN_ROWS

# Sizes: full on a GPU, quick (a functional dry run) elsewhere.
SIZES = {
  "full": dict(
    hidden=256, ffn=512, rows=TRAIN_ROWS, rounds=5, steps=10, batches=12, flow_positions=32_000, test_users=0
  ),
  "quick": dict(hidden=32, ffn=64, rows=4, rounds=2, steps=2, batches=4, flow_positions=2_000, test_users=600),
}

_OUT = flags.DEFINE_string("out", "experiments/results", "Directory of <name>.json and <name>.md.")
_NAME = flags.DEFINE_string("name", "", "Output file stem (default gpu_check, or gpu_check_cpu_dryrun at quick size).")
_PLATFORM = flags.DEFINE_enum("platform", "auto", ["auto", "cpu", "gpu"], "JAX platform (auto: JAX's default).")
_SIZE = flags.DEFINE_enum("size", "auto", ["auto", "full", "quick"], "auto: full on a GPU, quick otherwise.")
_BUDGET = flags.DEFINE_float("budget_s", 450.0, "Seconds for the whole run, counted from $GPU_CHECK_T0 or start.")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, of {SECTIONS}.")
_ROUNDS = flags.DEFINE_integer("rounds", 0, "Interleaved timed rounds (0: 5 full, 2 quick).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps per variant per round (0: 10 full, 2 quick).")
_FLOW_LENS = flags.DEFINE_list("flow_lens", ["200", "2000"], "Row lengths of the flow_len section.")
_FLOW_DTYPE = flags.DEFINE_enum("flow_dtype", "float32", ["float32", "bfloat16"], "model.dtype of flow_len.")
_RECALL_LAYOUTS = flags.DEFINE_list(
  "recall_users_per_batch", [], "User slots per recall batch (default: 256,2048 full, 256 quick)."
)
_TORCH_VARIANTS = flags.DEFINE_list("torch_variants", list(TORCH_VARIANTS), f"Of {TORCH_VARIANTS}.")
_TORCH_DEVICE = flags.DEFINE_enum("torch_device", "auto", ["auto", "cuda", "cpu"], "auto: cuda if torch sees one.")
_TORCH_JAX = flags.DEFINE_bool(
  "torch_jax", True, "Time the JAX float32 / bfloat16 steps in the torch section's rounds (side by side)."
)
_JAX_REFERENCE = flags.DEFINE_string(
  "jax_reference", "", "A gpu_check JSON whose train section gives the JAX times when the torch section has none."
)
_RERUN_PLAN = flags.DEFINE_string(
  "rerun_plan", "", "Print the flags that rerun what a crashed run (this JSON) did not finish, and exit."
)
_DATASET = flags.DEFINE_string("dataset", "Beauty", "Bundled dataset.")
_GIT_COMMIT = flags.DEFINE_string("git_commit", "", "Commit to record (default: $GIT_COMMIT, else git, else unknown).")


def now() -> float:
  return time.time() - T0


def log(msg: str) -> None:
  print(f"[{now():6.1f}s] {msg}", flush=True)


def short_error(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}".replace("\n", " ")[:600]


# ----------------------------------------------------------------------------------------------------------
# Environment.


def pkg_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def cuda_plugins() -> list[str]:
  """Installed JAX CUDA plugin / PJRT distributions (``jax-cuda13-plugin==...``)."""
  found = set()
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower().replace("_", "-")
    if name.startswith("jax-cuda") or name.startswith("jaxlib-cuda"):
      found.add(f"{name}=={dist.version}")
  return sorted(found)


def nvidia_smi() -> str | None:
  query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
  try:
    out = subprocess.run(
      ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
    )
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def torch_device() -> str:
  import torch

  if _TORCH_DEVICE.value == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  return _TORCH_DEVICE.value


def torch_info() -> dict:
  try:
    import torch
  except Exception as e:  # noqa: BLE001
    return {"available": False, "error": short_error(e)}
  info = {
    "available": True,
    "version": torch.__version__,
    "cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "threads": torch.get_num_threads(),
    "triton": pkg_version("triton"),
  }
  if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["cudnn"] = torch.backends.cudnn.version()
  return info


def environment() -> dict:
  devices = jax.devices()
  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": pkg_version("jaxlib"),
    "cuda_plugins": cuda_plugins(),
    "platform": devices[0].platform,
    "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
    "device_kind": devices[0].device_kind,
    "nvidia_smi": nvidia_smi(),
    "torch": {"version": pkg_version("torch"), "imported": False},  # imported by the torch section only
    "packages": {p: pkg_version(p) for p in ("flax", "optax", "orbax-checkpoint", "numpy", "grain", "ml_collections")},
    "grain_import_error": GRAIN_ERROR,
    "env": {
      k: os.environ[k] for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS") if k in os.environ
    },
  }


def machine_description(env: dict) -> str:
  return f"{provenance.cpu_name()}, {os.cpu_count()} cores, {env['device_kind']} x{len(env['devices'])}"


def git_commit() -> str:
  if _GIT_COMMIT.value or os.environ.get("GIT_COMMIT"):
    return _GIT_COMMIT.value or os.environ["GIT_COMMIT"]
  return provenance.git_commit(unknown="unknown (no git checkout; pass --git_commit)")


# ----------------------------------------------------------------------------------------------------------
# Data.


def train_batches(source, part: str, n: int, *, row_len: int, rows: int) -> tuple[list[dict], str]:
  """Up to ``n`` packed training batches of epoch 0, as ``reference.train_batches`` (fewer if the epoch is
  shorter). Without Grain, the epoch's packing plan is assembled by the pipeline's own assembler: the same
  batches without the Grain iterator. Returns ``(batches, how)``."""
  ti = pipeline.TrainInput(
    source,
    max_len=MAX_LEN,
    row_len=row_len,
    rows_per_batch=rows,
    seed=0,
    prompt_mode="last" if part == "prompt_tune" else None,
    prompt_width=1,
  )
  n = min(n, ti.steps_per_epoch(0))
  if GRAIN_ERROR is None:
    it = ti.epoch_iterator(0)
    return [next(it) for _ in range(n)], "data.pipeline.TrainInput (Grain)"
  assemble = ti.assembler(0)
  return [assemble(b) for b in range(n)], "data.pipeline.TrainInput plan + assembler without Grain (not importable)"


def target_tokens(batches: list[dict], part: str) -> list[int]:
  key = "p_targets" if part == "prompt_tune" else "targets"
  return [int(np.sum(b[key] > 0)) for b in batches]


def recall_batches(data, users_per_batch: int, test_users: int) -> tuple[list[dict], int, str]:
  eval_set = split.make_eval_set(data.users, data.sequences, "test", MAX_LEN)
  if test_users:
    keep = slice(0, test_users)
    eval_set = split.EvalSet(
      eval_set.users[keep], eval_set.windows[keep], eval_set.answers[keep], eval_set.histories[keep]
    )
  mean_len = float(np.mean([len(w) for w in eval_set.windows]))
  rows = math.ceil(users_per_batch * mean_len / (ROW_LEN * 0.85))  # as bench_torch / bench_recall
  batches = packing.pack_eval_batches(eval_set, row_len=ROW_LEN, rows_per_batch=rows, users_per_batch=users_per_batch)
  return batches, len(eval_set.users), f"{len(batches)} batches of {rows} rows x {ROW_LEN}, {users_per_batch} slots"


# ----------------------------------------------------------------------------------------------------------
# Variants: each has warmup() and block(k) -> (seconds, work) for k units (steps, or passes over all users).


class JaxTrain:
  def __init__(self, mcfg: ModelConfig, part: str, batches: list[dict], tokens: list[int], opt_cfg):
    platform_ = jax.devices()[0].platform
    attention.check_impl(
      mcfg.attention, mcfg.attention_impl, attn_dropout=mcfg.attn_dropout, dtype=mcfg.dtype, platform=platform_
    )
    self.step, state, _ = reference.train_step(mcfg, part, opt_cfg)  # row-sparse tables, as the loop
    # Committed to the step's state sharding up front: the fresh state is uncommitted, and the step would
    # otherwise compile a second time on its second call (when it gets its own replicated output back).
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    self.state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self.batches = [jax.device_put(b) for b in batches]
    self.tokens = tokens
    self.pos = 0

  def block(self, k: int) -> tuple[float, int]:
    t0, work, out = time.perf_counter(), 0, None
    for _ in range(k):
      i = self.pos % len(self.batches)
      self.pos += 1
      self.state, out = self.step(self.state, self.batches[i])
      work += self.tokens[i]
    jax.block_until_ready(out)
    return time.perf_counter() - t0, work


class JaxRecall:
  def __init__(self, mcfg: ModelConfig, batches: list[dict], users: int):
    graphdef, state = step_lib.init_state(RecGPT(mcfg, rngs=nnx.Rngs(0)), optax.adam(1e-3), 0)
    self.params = jax.device_put(state.params)
    self.fn = decoder.make_recall_fn(graphdef, QUOTAS)
    self.batches = [jax.device_put(b) for b in batches]
    self.users = users

  def block(self, k: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    for _ in range(k):
      jax.block_until_ready([self.fn(self.params, b) for b in self.batches])
    return time.perf_counter() - t0, self.users * k


class TorchTrain:
  """The torch port's training step (``steps.make_step``) on the same batches, JAX-initialised weights."""

  def __init__(self, mcfg, part, params0, batches, tokens, opt_cfg, lr, *, compiled: bool, bf16: bool):
    import torch

    from experiments.torch_recgpt import convert
    from experiments.torch_recgpt import steps as tsteps
    from experiments.torch_recgpt.model import TorchRecGPT

    self.torch = torch
    self.device = torch.device(torch_device())
    torch.manual_seed(0)
    model = TorchRecGPT(mcfg)
    convert.load_jax_params(model, params0)
    model.to(self.device)
    opt = tsteps.make_optimizer(model, lr, opt_cfg.b1, opt_cfg.b2, opt_cfg.eps, impl="fused")
    self.step = tsteps.make_step(
      model,
      opt,
      stage=part,
      loss="ce" if part == "prompt_tune" else "bce",
      head="tied",
      prompt_mode="last",
      prompt_width=1,
      compile=compiled,
    )
    self.batches = [{k: v.to(self.device) for k, v in tsteps.to_torch_batch(b).items()} for b in batches]
    self.tokens = tokens
    self.bf16 = bf16
    self.pos = 0

  def block(self, k: int) -> tuple[float, int]:
    torch = self.torch
    t0, work, out = time.perf_counter(), 0, None
    for _ in range(k):
      i = self.pos % len(self.batches)
      self.pos += 1
      if self.bf16:  # the whole step (prompt generation, forward, loss, backward) under autocast
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
          out = self.step(self.batches[i])
      else:
        out = self.step(self.batches[i])
      work += self.tokens[i]
    if self.device.type == "cuda":
      torch.cuda.synchronize()
    float(out["loss"])
    return time.perf_counter() - t0, work


@dataclasses.dataclass
class Runner:
  """One variant of a group: built and warmed up lazily (``make``), or sharing a warmed ``impl``."""

  name: str
  settings: dict
  make: Callable[[], object] | None = None
  impl: object = None
  error: str | None = None
  skipped: str | None = None
  first_call_s: float | None = None
  samples: list = dataclasses.field(default_factory=list)  # (seconds, units, work) per timed block
  priority: int = 0  # warm-up order within a section (lower first)
  min_time_s: float = 10.0  # seconds that must be left of the section's budget to start the warm-up
  compiles_long: bool = False  # torch.compile: needs about as long as the longest such warm-up so far

  def warm_up(self) -> None:
    t0 = time.perf_counter()
    self.impl = self.make()
    self.impl.block(1)  # compile (JAX jit / torch.compile) + one unit
    self.first_call_s = time.perf_counter() - t0
    if WARMUP_UNITS > 1:
      self.impl.block(WARMUP_UNITS - 1)


@dataclasses.dataclass
class Group:
  name: str
  description: str
  unit: str  # 'step' or 'pass'
  work_unit: str  # 'target tokens' or 'users'
  units_per_round: int
  baseline: str
  runners: list[Runner]
  info: dict = dataclasses.field(default_factory=dict)
  ratios: list = dataclasses.field(default_factory=list)  # (label, numerator variant, denominator variant)


# ----------------------------------------------------------------------------------------------------------
# Running a section: warm-up every variant (in priority order), then interleaved rounds.


class SkipSection(Exception):
  """A section that cannot run here (e.g. torch not installed): recorded as skipped, not failed."""


class Budget:
  def __init__(self, total_s: float):
    self.total_s = total_s

  def left(self) -> float:
    return self.total_s - now()

  def section_deadline(self, section: str, remaining_sections: list[str]) -> float:
    """Its weighted share of the time left, but at least SECTION_MIN_S while each later section keeps that much."""
    left = max(0.0, self.left())
    share = left * SECTION_WEIGHT[section] / sum(SECTION_WEIGHT[s] for s in remaining_sections)
    floor = min(SECTION_MIN_S, left - SECTION_MIN_S * (len(remaining_sections) - 1))
    return now() + max(share, floor)


def run_section(
  name: str, groups: list[Group], rounds: int, deadline: float, budget: Budget, progress: Callable[[dict], None]
) -> dict:
  """Warms up and times ``groups``; returns the section's record (status, note, groups). ``progress`` gets the
  record so far after every warm-up and round (written to disk, so a run killed mid-section keeps it)."""
  notes = []

  def record(status: str) -> dict:
    skipped = (
      ["some variants were skipped (time budget); see their notes"]
      if any(r.skipped for g in groups for r in g.runners)
      else []
    )
    return {
      "status": status,
      "rounds": rounds_done,
      "note": "; ".join(notes + skipped) or None,
      "groups": {g.name: summarise_group(g) for g in groups},
    }

  rounds_done = 0
  longest_compile = 0.0  # the longest torch.compile warm-up so far: the next one needs about as long
  order = sorted(
    (r.priority, gi, ri) for gi, g in enumerate(groups) for ri, r in enumerate(g.runners) if r.impl is None
  )
  for _, gi, ri in order:
    g, r = groups[gi], groups[gi].runners[ri]
    if r.error:
      continue
    need = max(r.min_time_s, 1.3 * longest_compile if r.compiles_long else 0.0)
    if now() > deadline - need or budget.left() < need + 10.0:
      r.skipped = f"not warmed up: less than the {need:.0f} s it needs was left of the section's time budget"
      log(f"{name}/{g.name}/{r.name}: skipped ({r.skipped})")
      continue
    try:
      r.warm_up()
      log(f"{name}/{g.name}/{r.name}: first call {r.first_call_s:.1f}s (incl. compile)")
      if r.compiles_long:
        longest_compile = max(longest_compile, r.first_call_s)
    except Exception as e:  # noqa: BLE001 - a failing variant is recorded, the others go on
      r.error = short_error(e)
      r.impl = None
      log(f"{name}/{g.name}/{r.name}: FAILED {r.error}")
      if not isinstance(e, errors.ConfigError):  # a configuration this device cannot run needs no traceback
        traceback.print_exc()
    progress(record("running"))
  if not any(r.impl is not None for g in groups for r in g.runners):
    rounds = 0  # nothing warmed up
  for rnd in range(rounds):
    t_round = time.time()
    for g in groups:
      for r in g.runners:
        if r.impl is None or r.error:
          continue
        try:
          s, work = r.impl.block(g.units_per_round)
          r.samples.append((s, g.units_per_round, work))
        except Exception as e:  # noqa: BLE001
          r.error = short_error(e)
          log(f"{name}/{g.name}/{r.name}: FAILED in round {rnd + 1}: {r.error}")
    rounds_done += 1
    t_round = time.time() - t_round
    for g in groups:
      meds = [
        f"{r.name} {statistics.median(s / u for s, u, _ in r.samples) * 1e3:.2f} ms"
        for r in g.runners
        if r.samples and not r.error
      ]
      if meds:
        log(f"{name} round {rnd + 1}/{rounds} {g.name} (ms/{g.unit}, medians so far): " + ", ".join(meds))
    progress(record("running"))
    if rnd + 1 < rounds and (now() + 1.5 * t_round > deadline or budget.left() < 1.5 * t_round + 10.0):
      notes.append(f"stopped after {rounds_done} of {rounds} rounds: the section's share of the time budget was spent")
      log(f"{name}: {notes[-1]}")
      break
  return record("ok")


def summarise_group(g: Group) -> dict:
  variants = {}
  for r in g.runners:
    e = {"settings": r.settings, "error": r.error, "skipped": r.skipped, "first_call_s_incl_compile": r.first_call_s}
    if r.samples and not r.error:
      per_unit = [s / u for s, u, _ in r.samples]
      e.update(
        {
          "per_unit_s": per_unit,
          "median_s": statistics.median(per_unit),
          "min_s": min(per_unit),
          "max_s": max(per_unit),
          "n_blocks": len(per_unit),
          "units_per_block": g.units_per_round,
          "throughput": sum(w for _, _, w in r.samples) / sum(s for s, _, _ in r.samples),
          "throughput_unit": f"{g.work_unit}/s",
        }
      )
    variants[r.name] = e
  base = variants.get(g.baseline, {}).get("median_s")
  for e in variants.values():
    if base and "median_s" in e:
      e["speedup_vs_baseline"] = base / e["median_s"]
  ratios = {}
  for label, num, den in g.ratios:
    a, b = variants.get(num, {}).get("median_s"), variants.get(den, {}).get("median_s")
    ratios[label] = (b / a) if a and b else None  # speed-up of `num` over `den`
  return {
    "description": g.description,
    "unit": g.unit,
    "baseline": g.baseline,
    **g.info,
    "variants": variants,
    "speedups": ratios,
  }


# ----------------------------------------------------------------------------------------------------------
# The sections.


class Context:
  """What the sections share: sizes, data, optimizer config, the warmed JAX steps of section 1."""

  def __init__(self, size: str, dataset: str):
    self.size = size
    self.s = dict(SIZES[size])
    if _ROUNDS.value:
      self.s["rounds"] = _ROUNDS.value
    if _STEPS.value:
      self.s["steps"] = _STEPS.value
    self.data = io.load_dataset(dataset)
    # The record source of the pipeline (as tfds_builder.InMemorySource, without importing TFDS).
    self.source = [{"user": int(u), "items": s} for u, s in zip(self.data.users, self.data.sequences, strict=True)]
    self.batches_via = None
    self.train_runners: dict[tuple[str, str], Runner] = {}  # (part, variant) -> section 1 runner
    self.train_data: dict[str, tuple[list[dict], list[int]]] = {}

  def mcfg(self, part: str, **changes) -> ModelConfig:
    cfg = reference.model_config(self.data, part, hidden=self.s["hidden"], ffn=self.s["ffn"], heads=2)
    return dataclasses.replace(cfg, **changes)

  def opt(self, part: str):
    cfg = base_config().optimizer
    cfg.learning_rate = 5e-4 if part == "prompt_tune" else 1e-3  # as bench_train / bench_torch
    return cfg

  def part_data(self, part: str) -> tuple[list[dict], list[int]]:
    if part not in self.train_data:
      batches, how = train_batches(self.source, part, self.s["batches"], row_len=ROW_LEN, rows=self.s["rows"])
      self.batches_via = how
      self.train_data[part] = (batches, target_tokens(batches, part))
    return self.train_data[part]


def train_groups(ctx: Context) -> list[Group]:
  groups = []
  for part in reference.TRAINING_PARTS:
    batches, tokens = ctx.part_data(part)
    variants = [  # (name, priority, ModelConfig changes)
      ("flow_xla_f32", 0, dict()),
      ("flow_xla_bf16", 0, dict(dtype="bfloat16")),
      (
        "softmax_xla_bf16_nodrop",
        1,
        dict(attention="softmax", attention_impl="xla", dtype="bfloat16", attn_dropout=0.0),
      ),
      (
        "softmax_cudnn_bf16_nodrop",
        1,
        dict(attention="softmax", attention_impl="cudnn", dtype="bfloat16", attn_dropout=0.0),
      ),
    ]
    runners = []
    for name, prio, changes in variants:
      mcfg = ctx.mcfg(part, **changes)
      settings = {
        k: getattr(mcfg, k) for k in ("attention", "attention_impl", "dtype", "attn_dropout", "hidden_dropout")
      }
      r = Runner(
        name,
        settings,
        make=lambda mcfg=mcfg, part=part, b=batches, t=tokens: JaxTrain(mcfg, part, b, t, ctx.opt(part)),
        priority=prio,
      )
      runners.append(r)
      ctx.train_runners[(part, name)] = r
    groups.append(
      Group(
        part,
        f"{part} step, {len(batches)} batches of {ctx.s['rows']} packed rows x {ROW_LEN}"
        + (", BCE (1 negative)" if part == "pretrain" else ", prompts last w=1, full-softmax CE"),
        "step",
        "target tokens",
        ctx.s["steps"],
        "flow_xla_f32",
        runners,
        info={"target_tokens_per_step_mean": statistics.mean(tokens), "batches": len(batches)},
        ratios=[
          ("bf16 over f32 (flow)", "flow_xla_bf16", "flow_xla_f32"),
          ("cudnn over xla (softmax, bf16, no attn dropout)", "softmax_cudnn_bf16_nodrop", "softmax_xla_bf16_nodrop"),
        ],
      )
    )
  return groups


def flow_len_groups(ctx: Context) -> list[Group]:
  groups = []
  for length in (int(x) for x in _FLOW_LENS.value):
    rows = max(1, ctx.s["flow_positions"] // length)
    batches, how = train_batches(ctx.source, "pretrain", max(3, ctx.s["batches"] // 2), row_len=length, rows=rows)
    ctx.batches_via = ctx.batches_via or how
    tokens = target_tokens(batches, "pretrain")
    runners = []
    for impl in ("xla", "chunked"):
      mcfg = ctx.mcfg("pretrain", attn_dropout=0.0, attention_impl=impl, dtype=_FLOW_DTYPE.value)
      settings = {"attention": "flow", "attention_impl": impl, "flow_chunk": mcfg.flow_chunk, "dtype": mcfg.dtype}
      runners.append(
        Runner(
          f"flow_{impl}",
          settings,
          make=lambda mcfg=mcfg, b=batches, t=tokens: JaxTrain(mcfg, "pretrain", b, t, ctx.opt("pretrain")),
        )
      )
    groups.append(
      Group(
        f"L{length}",
        f"pretrain step (BCE), attn_dropout 0, {_FLOW_DTYPE.value}, {len(batches)} batches of {rows} packed rows x"
        f" {length} (max_len {MAX_LEN})",
        "step",
        "target tokens",
        max(2, ctx.s["steps"] // 2),
        "flow_xla",
        runners,
        info={
          "row_len": length,
          "rows_per_batch": rows,
          "target_tokens_per_step_mean": statistics.mean(tokens),
          "auto_impl": attention.resolve_impl("flow", "auto", length=length, dropout=False),
        },
        ratios=[("chunked over xla", "flow_chunked", "flow_xla")],
      )
    )
  return groups


def recall_groups(ctx: Context) -> list[Group]:
  layouts = [int(x) for x in _RECALL_LAYOUTS.value] or ([256, 2048] if ctx.size == "full" else [256])
  groups = []
  for users_per_batch in layouts:
    batches, users, desc = recall_batches(ctx.data, users_per_batch, ctx.s["test_users"])
    runners = []
    for dtype in ("float32", "bfloat16"):
      mcfg = ctx.mcfg("recall", dtype=dtype)  # an inference part: no dropout
      runners.append(
        Runner(
          f"flow_{'f32' if dtype == 'float32' else 'bf16'}",
          {"attention": "flow", "dtype": dtype, "quotas": list(QUOTAS)},
          make=lambda mcfg=mcfg, b=batches, u=users: JaxRecall(mcfg, b, u),
        )
      )
    groups.append(
      Group(
        f"users{users_per_batch}",
        f"two-step recall {QUOTAS} of {users} test users: {desc}",
        "pass",
        "users",
        1,
        "flow_f32",
        runners,
        info={"test_users": users, "users_per_batch": users_per_batch},
        ratios=[("bf16 over f32", "flow_bf16", "flow_f32")],
      )
    )
  return groups


def torch_groups(ctx: Context) -> list[Group]:
  info = torch_info()
  if not info["available"]:
    raise SkipSection(f"torch is not importable ({info['error']})")
  variants = [v for v in _TORCH_VARIANTS.value if v]
  for v in variants:
    if v not in TORCH_VARIANTS:
      raise app.UsageError(f"unknown torch variant {v!r}")
  groups = []
  for part in reference.TRAINING_PARTS:
    batches, tokens = ctx.part_data(part)
    mcfg = ctx.mcfg(part)  # the reference model (flow, float32 parameters, reference dropout)
    _, state0 = step_lib.init_state(RecGPT(mcfg, rngs=nnx.Rngs(0)), optax.adam(1e-3), 0)
    params0 = jax.tree.map(lambda x: np.array(x, copy=True), state0.params)
    del state0
    runners = []
    for jax_name, dtype in (("flow_xla_f32", "float32"), ("flow_xla_bf16", "bfloat16")):
      if not _TORCH_JAX.value:
        break
      name = "jax_" + jax_name.removeprefix("flow_xla_")
      src = ctx.train_runners.get((part, jax_name))
      if src is None:  # section train did not run in this process: build the JAX step here
        m = ctx.mcfg(part, dtype=dtype)
        settings = {
          k: getattr(m, k) for k in ("attention", "attention_impl", "dtype", "attn_dropout", "hidden_dropout")
        }
        make = lambda m=m, part=part, b=batches, t=tokens: JaxTrain(m, part, b, t, ctx.opt(part))
        runners.append(Runner(name, settings, make=make, priority=-1))
      elif src.impl is not None and not src.error:  # the warmed section 1 step, timed again here
        runners.append(Runner(name, src.settings, impl=src.impl, first_call_s=src.first_call_s))
    for i, v in enumerate(variants):
      compiled, bf16 = "compiled" in v, v.endswith("_bf16")
      runners.append(
        Runner(
          v,
          {"attention": "flow", "compile": compiled, "autocast": "bfloat16" if bf16 else None, "adam": "fused"},
          make=lambda part=part, compiled=compiled, bf16=bf16, p0=params0, b=batches, t=tokens: TorchTrain(
            mcfg=ctx.mcfg(part),
            part=part,
            params0=p0,
            batches=b,
            tokens=t,
            opt_cfg=ctx.opt(part),
            lr=ctx.opt(part).learning_rate,
            compiled=compiled,
            bf16=bf16,
          ),
          priority=i,  # eager variants of both parts before the compiled ones
          min_time_s=60.0 if compiled else 10.0,
          compiles_long=compiled,
        )
      )
    baseline = "jax_f32" if any(r.name == "jax_f32" for r in runners) else runners[0].name
    ratios = [("jax_bf16 over jax_f32", "jax_bf16", "jax_f32")]
    groups.append(
      Group(
        part,
        f"{part} step, the batches of section train ({len(batches)} x {ctx.s['rows']} rows x {ROW_LEN}), flow"
        f" attention, reference dropout {mcfg.attn_dropout} / {mcfg.hidden_dropout}",
        "step",
        "target tokens",
        ctx.s["steps"],
        baseline,
        runners,
        info={"torch_device": torch_device()},
        ratios=ratios,
      )
    )
  return groups


def add_torch_summary(section: dict) -> None:
  """JAX speed-up over the fastest torch variant, per part and JAX dtype (from ``--jax_reference``'s train
  section when this section timed no JAX step)."""
  reference_groups = {}
  if _JAX_REFERENCE.value:
    try:
      ref = json.loads(pathlib.Path(_JAX_REFERENCE.value).read_text())
      reference_groups = ref["sections"].get("train", {}).get("groups", {})
      if not reference_groups:
        raise ValueError(f"{_JAX_REFERENCE.value} has no timed train section")
    except (OSError, KeyError, ValueError) as e:
      section["note"] = "; ".join(filter(None, [section.get("note"), f"no JAX reference: {short_error(e)}"]))
  for part, g in section.get("groups", {}).items():
    v = g["variants"]
    torch_meds = {n: e["median_s"] for n, e in v.items() if n.startswith("torch") and "median_s" in e}
    if not torch_meds:
      continue
    fastest = min(torch_meds, key=torch_meds.get)
    g["fastest_torch"] = fastest
    jax_meds = {n: e["median_s"] for n, e in v.items() if n.startswith("jax") and "median_s" in e}
    source = ""
    if not jax_meds and part in reference_groups:
      ref_v = reference_groups[part]["variants"]
      jax_meds = {
        "jax_" + n.removeprefix("flow_xla_"): ref_v[n]["median_s"]
        for n in ("flow_xla_f32", "flow_xla_bf16")
        if "median_s" in ref_v.get(n, {})
      }
      source = f" [JAX from {pathlib.Path(_JAX_REFERENCE.value).name}, another process, not interleaved]"
    for n, med in jax_meds.items():
      g["speedups"][f"{n} over fastest torch ({fastest}){source}"] = torch_meds[fastest] / med


BUILDERS = {"train": train_groups, "flow_len": flow_len_groups, "recall": recall_groups, "torch": torch_groups}


# ----------------------------------------------------------------------------------------------------------
# Outputs.


class Outputs:
  def __init__(self, out: pathlib.Path, name: str, record: dict):
    self.out, self.name, self.record = out, name, record
    self.lock = threading.Lock()

  def write(self) -> str:
    with self.lock:
      self.record["wall_s"] = now()
      self.out.mkdir(parents=True, exist_ok=True)
      for attempt in range(3):  # the watchdog may write while the main thread adds to the record
        try:
          text = json.dumps(self.record, indent=2, default=str)
          break
        except RuntimeError:
          if attempt == 2:
            raise
          time.sleep(0.05)
      (self.out / f"{self.name}.json").write_text(text + "\n")
      md = markdown(self.record)
      (self.out / f"{self.name}.md").write_text(md)
      return md


def fmt_ms(s: float) -> str:
  ms = s * 1e3
  return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def markdown(rec: dict) -> str:
  env = rec["environment"]
  t = env["torch"]
  if t.get("available"):
    torch_desc = f"torch {t['version']} on {t.get('device', 'cpu')} (CUDA {t['cuda']}, cuDNN {t.get('cudnn')})"
  elif t.get("version"):
    torch_desc = f"torch {t['version']} (not imported: no torch section ran)"
  else:
    torch_desc = f"torch not available ({t.get('error', 'not installed')})"
  lines = [
    "# GPU check: reference configuration, JAX variants and the PyTorch port"
    + (" (QUICK dry run, small sizes: a functional check, not a measurement)" if rec["size"] == "quick" else ""),
    "",
    f"`{rec['command']}` on {rec['date_utc']}, {rec['machine']}; jax {env['jax']} / jaxlib {env['jaxlib']}"
    f" ({', '.join(env['cuda_plugins']) or 'no CUDA plugin'}), {torch_desc}; commit {rec['git_commit']}."
    f" Wall {rec['wall_s']:.0f} s of a {rec['budget_s']:.0f} s budget. Data: {rec['data']['dataset']},"
    f" batches via {rec['data']['batches_via']}. Model: hidden {rec['config']['hidden']}, ffn {rec['config']['ffn']},"
    f" 1 layer, 2 heads, max_len {MAX_LEN}.",
  ]
  if env.get("nvidia_smi"):
    lines.append(f"nvidia-smi: {env['nvidia_smi']}.")
  if rec.get("aborted"):
    lines += ["", f"**Aborted: {rec['aborted']}**"]
  for sec_name, sec in rec["sections"].items():
    lines += ["", f"## {sec_name}: {sec['status']}" + (f" ({sec['note']})" if sec.get("note") else "")]
    for g_name, g in sec.get("groups", {}).items():
      unit = g["unit"]
      lines += [
        "",
        f"### {sec_name} / {g_name}: {g['description']}",
        "",
        f"| variant | settings | ms/{unit} median (min-max) | throughput | speed-up vs {g['baseline']} |"
        " first call incl. compile |",
        "|---|---|---|---|---|---|",
      ]
      for v_name, e in g["variants"].items():
        settings = ", ".join(f"{k}={v}" for k, v in e["settings"].items())
        first = f"{e['first_call_s_incl_compile']:.1f} s" if e.get("first_call_s_incl_compile") else "-"
        if "median_s" not in e:
          why = f"failed: {e['error']}" if e.get("error") else f"skipped: {e.get('skipped') or 'not run'}"
          lines.append(f"| {v_name} | {settings} | {why} | | | {first} |")
          continue
        timing = f"{fmt_ms(e['median_s'])} ({fmt_ms(e['min_s'])}-{fmt_ms(e['max_s'])}), {e['n_blocks']} blocks"
        lines.append(
          f"| {v_name} | {settings} | {timing} | {e['throughput']:,.0f} {e['throughput_unit']}"
          f" | {e.get('speedup_vs_baseline', float('nan')):.2f}x | {first} |"
        )
      sp = [f"{k}: {v:.2f}x" for k, v in g.get("speedups", {}).items() if v]
      if sp:
        lines += ["", "Speed-ups: " + "; ".join(sp) + "."]
  lines += ["", "Method: " + " ".join(f"{k}: {v.rstrip('.')}." for k, v in rec["method"].items())]
  return "\n".join(lines) + "\n"


def start_watchdog(outputs: Outputs, hard_deadline: float) -> None:
  def watch():
    while now() < hard_deadline:
      time.sleep(1.0)
    outputs.record["aborted"] = f"watchdog: still running at {now():.0f} s (budget {outputs.record['budget_s']:.0f} s)"
    print(f"[{now():6.1f}s] WATCHDOG: time budget exceeded; writing partial results and exiting", flush=True)
    try:
      outputs.write()
    finally:
      os._exit(3)

  threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------------------------------------------------


def rerun_plan(path: str) -> str:
  """The flags that rerun what the crashed run recorded in ``path`` did not finish ('' if nothing to rerun).

  A section still 'running' in the JSON is where the process died (e.g. a CUDA library clash): torch is then
  rerun alone in a process whose JAX stays on the CPU (the torch times are compared with this run's JAX times);
  otherwise the sections not yet started are rerun. Nothing when the watchdog stopped the run (no time left)."""
  rec = json.loads(pathlib.Path(path).read_text())
  if rec.get("aborted"):
    return ""
  status = {s: v.get("status") for s, v in rec["sections"].items()}
  crashed = [s for s, st in status.items() if st == "running"]
  pending = [s for s, st in status.items() if st == "pending"]
  common = f"--size={rec['size']} --jax_reference={path}"
  if crashed == ["torch"]:
    return f"--sections=torch --torch_jax=false --platform=cpu --name={rec['name']}_torch {common}"
  if pending:
    return f"--sections={','.join(pending)} --name={rec['name']}_rest {common}"
  return ""


def main(argv):
  del argv
  if _RERUN_PLAN.value:
    print(rerun_plan(_RERUN_PLAN.value))
    return
  if _PLATFORM.value != "auto":
    jax.config.update("jax_platforms", "cuda" if _PLATFORM.value == "gpu" else "cpu")
  sections = [s for s in _SECTIONS.value if s]
  for s in sections:
    if s not in SECTIONS:
      raise app.UsageError(f"unknown section {s!r}; expected some of {SECTIONS}")
  env = environment()
  size = _SIZE.value if _SIZE.value != "auto" else ("full" if env["platform"] == "gpu" else "quick")
  name = _NAME.value or ("gpu_check" if size == "full" else "gpu_check_cpu_dryrun")
  log(f"{env['devices']}; jax {env['jax']}, jaxlib {env['jaxlib']}, plugins {env['cuda_plugins']}; size {size}")
  log(f"torch: {env['torch']}")
  if GRAIN_ERROR:
    log(f"grain not importable ({GRAIN_ERROR}); batches are assembled without it")
  budget = Budget(_BUDGET.value)
  ctx = Context(size, _DATASET.value)
  record = {
    "benchmark": "gpu_check",
    "command": " ".join(["python -m experiments.gpu_check", *sys.argv[1:]]),
    "name": name,
    "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    "wall_s": None,
    "budget_s": budget.total_s,
    "machine": machine_description(env),
    "git_commit": git_commit(),
    "size": size,
    "environment": env,
    "data": {"dataset": ctx.data.source, "batches_via": None, "num_items": ctx.data.num_items},
    "config": {
      "hidden": ctx.s["hidden"],
      "ffn": ctx.s["ffn"],
      "layers": 1,
      "heads": 2,
      "max_len": MAX_LEN,
      "row_len": ROW_LEN,
      "train_rows_per_batch": ctx.s["rows"],
      "norm": "post",
      "user_module": True,
      "dropout": "pretrain 0.5 / 0.1, prompt_tune 0.1 / 0.1 (attention / hidden) unless a variant says attn_dropout",
      "optimizer": "Adam, lr 1e-3 pretrain / 5e-4 prompt_tune; JAX row-sparse tables (as the loop); torch fused Adam",
      "sizes": ctx.s,
    },
    "method": {
      "timing": "per group, every variant is built and run for 2 warm-up units first (the first includes"
      " compilation: 'first call'), then rounds interleave the variants (for round: for group: for variant);"
      " a block is `steps` training steps (each on the next of the group's batches, cycling) or one pass over all"
      " test users (every batch dispatched), timed with one device sync at its end (JAX block_until_ready, torch"
      " cuda.synchronize); per-unit time = block time / units; median, min and max over blocks",
      "throughput": "target tokens (> 0) or users of the timed blocks / their total seconds",
      "speed-up": "median time of the baseline / median time of the variant (> 1 = faster than the baseline);"
      " 'A over B' = median B / median A",
      "torch": "experiments/torch_recgpt steps.make_step (eager; compile=True: torch.compile of forward + loss and"
      " of the generation forward); bf16 = the whole step under torch.autocast(bfloat16), float32 parameters;"
      " weights from the same JAX initialisation (seed 0)",
      "budget": "each section may use a share of the time left (weights train 3, flow_len 2, recall 1.5, torch"
      " 3.5); warm-ups are skipped and rounds cut when the share is spent",
    },
    "sections": {s: {"status": "pending"} for s in sections},
  }
  outputs = Outputs(pathlib.Path(_OUT.value), name, record)
  # Test hook of the wrapper's reruns and of the watchdog: 'SECTION' dies (SIGKILL), 'SECTION:hang' hangs there.
  crash_in, _, crash_how = os.environ.get("GPU_CHECK_SIMULATE_CRASH", "").partition(":")
  start_watchdog(outputs, budget.total_s + WATCHDOG_GRACE_S)
  outputs.write()
  for i, sec in enumerate(sections):
    t_sec = now()
    if budget.left() < 20.0:
      record["sections"][sec] = {"status": "skipped", "note": f"time budget spent ({now():.0f} s)"}
      log(f"section {sec}: skipped (time budget)")
      outputs.write()
      continue
    deadline = budget.section_deadline(sec, sections[i:])
    log(f"section {sec}: start (its share ends at {deadline:.0f} s)")
    record["sections"][sec] = {"status": "running", "note": f"started at {now():.0f} s; a crash leaves this"}
    outputs.write()
    try:
      if sec == crash_in:
        time.sleep(1e6) if crash_how == "hang" else os.kill(os.getpid(), signal.SIGKILL)
      if sec == "torch":
        record["environment"]["torch"] = torch_info()
      groups = BUILDERS[sec](ctx)
      record["data"]["batches_via"] = ctx.batches_via

      def progress(partial, sec=sec):
        record["sections"][sec] = partial
        outputs.write()

      result = run_section(sec, groups, ctx.s["rounds"], deadline, budget, progress)
      if sec == "torch":
        add_torch_summary(result)
    except SkipSection as e:
      result = {"status": "skipped", "note": str(e)}
    except Exception as e:  # noqa: BLE001 - a failing section is recorded, the next ones run
      traceback.print_exc()
      result = {"status": "failed", "note": short_error(e)}
    result["wall_s"] = now() - t_sec
    record["sections"][sec] = result
    log(f"section {sec}: {result['status']} in {result['wall_s']:.0f} s")
    outputs.write()
  md = outputs.write()
  print(md)
  log(f"wrote {outputs.out / (name + '.json')} and {name}.md")


if __name__ == "__main__":
  app.run(main)
