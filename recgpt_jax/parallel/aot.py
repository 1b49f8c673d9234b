"""Ahead-of-time compilation of the package's programs for accelerators that are not present.

A *target* names a chip and a topology: ``tpu:v5e:2x4`` (8 TPU v5e chips), ``tpu:v5e:16x16`` (256),
``tpu:v5p:2x2x2``, ``tpu:v6e:2x2``, ``gpu:h100:1x1x8`` (8 H100 SXM), ``gpu:h200:1x1x8``. ``target_devices`` turns
it into device objects with ``jax.experimental.topologies`` (libtpu for TPU, the jax CUDA plugin and one of XLA's
GPU target descriptions for GPU); no device needs to be attached, and the process may run on the CPU backend
(``JAX_PLATFORMS=cpu``). TPU v4 is in the chip table, but its topology descriptions list each of a chip's two
TensorCores as a device, and jax builds TPU v4+ meshes from one device per chip (megacore): v4 targets stop with a
one-line error.

``build`` and ``make_program`` build, from a config and the catalogue sizes alone (no data), the jitted functions
``recgpt_jax.train.loop.Run`` builds: the pre-training and prompt-tuning train steps, the evaluation step and the
multi-interest recall, with abstract inputs (``jax.ShapeDtypeStruct``) that carry the state's and the batch's
shardings. ``compile_program`` compiles one (a program too large for a TPU's memory fails to compile with
RESOURCE_EXHAUSTED: that is "does not fit") and ``report`` reads off the compiled program of one device: memory
(``memory_analysis``), FLOPs and bytes accessed (``cost_analysis``), the collectives (``recgpt_jax.parallel.hlo``)
and a roofline *estimate* of the step time from the chip's public peak figures (``CHIPS``). ``largest_fitting``
searches the largest batch whose program fits the chip's memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recgpt_jax import config as config_lib
from recgpt_jax.data import pipeline
from recgpt_jax.errors import ConfigError
from recgpt_jax.eval import metrics as metrics_lib
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.parallel import hlo
from recgpt_jax.parallel import mesh as mesh_lib
from recgpt_jax.recall import decoder
from recgpt_jax.train import optim, stages
from recgpt_jax.train import step as step_lib

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public peak figures of one chip (per chip: a TPU chip, one GPU).

  Attributes:
    name: marketing name.
    peak_flops: dense bfloat16 peak, FLOP/s.
    hbm_bytes_per_s: HBM bandwidth, bytes/s.
    hbm_bytes: HBM capacity, bytes.
    source: where the figures come from.
    gpu_spec: for GPUs, the file name of XLA's GPU target description (``experiments/gpu_specs``).
  """

  name: str
  peak_flops: float
  hbm_bytes_per_s: float
  hbm_bytes: int
  source: str
  gpu_spec: str | None = None


# Vendor spec pages (per chip; dense bfloat16, i.e. without 2:4 sparsity):
# - TPU v4: cloud.google.com/tpu/docs/v4 ("System architecture": 275 TFLOPs bf16, 32 GiB HBM2, 1200 GBps).
# - TPU v5e: cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, 16 GiB HBM2, 819 GBps).
# - TPU v5p: cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, 95 GiB HBM2e, 2765 GBps).
# - TPU v6e (Trillium): cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16, 32 GiB HBM, 1640 GBps).
# - H100 SXM: nvidia.com/en-us/data-center/h100 datasheet (BF16 Tensor Core 1,979 TFLOPS *with sparsity*, so
#   989.5 dense; 80 GB HBM3; 3.35 TB/s).
# - H200 SXM: nvidia.com/en-us/data-center/h200 datasheet (BF16 1,979 TFLOPS with sparsity, 989.5 dense;
#   141 GB HBM3e; 4.8 TB/s).
# GB/TB are decimal (1e9/1e12 bytes); GiB binary. The GPU capacities used for the fit check are the
# device_memory_size of XLA's target descriptions (79.1 GiB for H100, 141.0 GiB for H200).
CHIPS: dict[str, Chip] = {
  "v4": Chip("TPU v4", 275e12, 1200e9, 32 * GiB, "cloud.google.com/tpu/docs/v4"),
  "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GiB, "cloud.google.com/tpu/docs/v5e"),
  "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GiB, "cloud.google.com/tpu/docs/v5p"),
  "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * GiB, "cloud.google.com/tpu/docs/v6e"),
  "h100": Chip(
    "NVIDIA H100 SXM", 989.5e12, 3.35e12, 84942979072, "nvidia.com/en-us/data-center/h100", "h100_sxm.txtpb"
  ),
  "h200": Chip("NVIDIA H200 SXM", 989.5e12, 4.8e12, 151397597184, "nvidia.com/en-us/data-center/h200", "h200.txtpb"),
}
PLATFORMS = {"tpu": ("v4", "v5e", "v5p", "v6e"), "gpu": ("h100", "h200")}
# JAX preallocates this fraction of a GPU's memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION raises it).
GPU_MEMORY_FRACTION = 0.75
_TOPOLOGY = re.compile(r"^\d+(x\d+){1,2}$")

TARGET_HELP = (
  "tpu:<v4|v5e|v5p|v6e>:<AxB[xC]> (e.g. tpu:v5e:2x4) or gpu:<h100|h200>:<slices>x<hosts>x<gpus> (gpu:h100:1x1x8)"
)


@dataclasses.dataclass(frozen=True)
class Target:
  """A chip and a topology to compile for, e.g. ``tpu:v5e:2x4``."""

  platform: str  # 'tpu' or 'gpu'
  chip: str  # key of CHIPS
  topology: str  # 'AxB' / 'AxBxC'
  # Devices per chip: 2 for TPU v4, whose topology lists each TensorCore as a device (no megacore); set by
  # ``with_devices``.
  devices_per_chip: int = 1

  @property
  def name(self) -> str:
    return f"{self.platform}:{self.chip}:{self.topology}"

  @property
  def spec(self) -> Chip:
    """The figures of one *device*: the chip's, or its share when a chip is several devices."""
    chip = CHIPS[self.chip]
    n = self.devices_per_chip
    if n == 1:
      return chip
    return dataclasses.replace(
      chip,
      name=f"{chip.name} (1 of {n} TensorCores)",
      peak_flops=chip.peak_flops / n,
      hbm_bytes_per_s=chip.hbm_bytes_per_s / n,
      hbm_bytes=chip.hbm_bytes // n,
    )

  @property
  def num_chips(self) -> int:
    return math.prod(int(x) for x in self.topology.split("x"))

  @property
  def num_devices(self) -> int:
    return self.num_chips * self.devices_per_chip

  def with_devices(self, devices: Sequence) -> Target:
    """This target with ``devices_per_chip`` read off its devices."""
    if len(devices) % self.num_chips:
      raise ConfigError(f"target {self.name}: {len(devices)} devices do not split over {self.num_chips} chips")
    return dataclasses.replace(self, devices_per_chip=len(devices) // self.num_chips)

  @property
  def memory_limit(self) -> int:
    """Bytes a program may use on one device: the HBM on TPU (the compiler enforces it), JAX's default share
    of it on GPU (nothing enforces it at compile time there)."""
    if self.platform == "gpu":
      return int(self.spec.hbm_bytes * GPU_MEMORY_FRACTION)
    return self.spec.hbm_bytes


def parse_target(text: str) -> Target:
  """Parses ``platform:chip:topology``; raises ``ConfigError`` (one line) on anything else."""
  parts = text.strip().lower().split(":")
  if len(parts) != 3 or parts[0] not in PLATFORMS:
    raise ConfigError(f"unknown target {text!r}; expected {TARGET_HELP}")
  platform, chip, topology = parts
  if chip not in PLATFORMS[platform]:
    raise ConfigError(f"unknown {platform} chip {chip!r} in target {text!r}; known: {', '.join(PLATFORMS[platform])}")
  if not _TOPOLOGY.match(topology) or (platform == "gpu" and topology.count("x") != 2):
    raise ConfigError(f"bad topology {topology!r} in target {text!r}; expected {TARGET_HELP}")
  return Target(platform, chip, topology)


def target_devices(target: Target, gpu_spec_text: str | None = None) -> list:
  """The devices of ``target`` (none needs to be attached); ``target.with_devices(devices)`` then knows how many
  devices a chip is.

  Args:
    target: the target.
    gpu_spec_text: GPU targets: the text of XLA's GPU target description (a ``GpuTargetConfigProto``).

  Raises:
    ConfigError: the topology does not exist for the chip, or the platform's compiler is not installed.
  """
  from jax.experimental import topologies

  try:
    if target.platform == "tpu":
      topo = topologies.get_topology_desc(topology_name=f"{target.chip}:{target.topology}", platform="tpu")
    else:
      if gpu_spec_text is None:
        raise ConfigError(f"target {target.name} needs XLA's GPU target description ({target.spec.gpu_spec})")
      topo = topologies.get_topology_desc(
        topology_name="", platform="cuda", target_config=gpu_spec_text, topology=target.topology
      )
  except NotImplementedError:
    need = "libtpu (pip install 'jax[tpu]')" if target.platform == "tpu" else "the jax CUDA plugin (jax-cuda13-plugin)"
    raise ConfigError(f"cannot compile for {target.name}: {need} is not installed") from None
  except (RuntimeError, ValueError) as e:  # jax.errors.JaxRuntimeError is a RuntimeError
    detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    raise ConfigError(f"cannot compile for {target.name}: {detail}") from None
  return list(topo.devices)


# --- the programs -------------------------------------------------------------------------------------------

PROMPT_KEYS = ("p_items", "p_targets", "p_positions", "p_segments", "p_seq_ids", "gen_col", "gen_rank")
EVAL_ROW_KEYS = ("items", "positions", "segments", "seq_ids", "users")
EVAL_USER_KEYS = ("last_row", "last_col", "answer")
PROGRAMS = ("pretrain_step", "prompt_tune_step", "eval_step", "recall")
# Learning-rate schedules need a length; it changes no shape.
_NOMINAL_STEPS = 10_000


@dataclasses.dataclass
class Program:
  """A jitted function and the abstract arguments (shapes, dtypes, shardings) to lower it with."""

  name: str
  fn: Any
  args: tuple
  rows_per_batch: int  # packed rows of the batch (training or evaluation)
  row_len: int
  users_per_batch: int | None = None  # evaluation / recall: user slots


@dataclasses.dataclass
class Built:
  """What ``build`` derives from the config before any batch size is chosen."""

  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  abstract_state: step_lib.TrainState  # ShapeDtypeStructs carrying the state's shardings
  state_sharding: step_lib.TrainState
  tx: Any


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def build(config: ml_collections.ConfigDict, *, num_items: int, num_users: int, devices: Sequence[jax.Device]) -> Built:
  """Model, optimizer and sharded abstract train state of ``config`` on ``devices``, as ``Run`` builds them.

  Nothing is allocated: the parameters and optimizer state are shapes only (``jax.eval_shape``).
  """
  config_lib.validate(config)
  c = config
  try:
    model_cfg = ModelConfig(num_items=num_items, num_users=num_users, max_len=c.max_len, **c.model)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None
  mesh = mesh_lib.make_mesh(c.mesh, devices)
  tx = optim.make_optimizer(c.optimizer, _NOMINAL_STEPS)
  abstract_model = nnx.eval_shape(lambda: RecGPT(model_cfg, rngs=nnx.Rngs(c.seed)))
  graphdef = nnx.graphdef(abstract_model)
  param_specs = mesh_lib.param_specs(abstract_model, c.mesh.rules)
  state = jax.eval_shape(lambda: step_lib.init_state(RecGPT(model_cfg, rngs=nnx.Rngs(c.seed)), tx, c.seed)[1])
  state_sharding = mesh_lib.shardings(step_lib.state_specs(state, tx, param_specs), mesh)
  return Built(c, model_cfg, mesh, graphdef, _abstract(state, state_sharding), state_sharding, tx)


def _batch(mesh, keys: Sequence[str], shape: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in keys}


def train_batch(mesh, rows: int, row_len: int, prompt: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract training batch (``pipeline.TrainInput``): int32 ``[rows, row_len]``, rows split over ``data``."""
  return _batch(mesh, pipeline.TRAIN_KEYS + (PROMPT_KEYS if prompt else ()), (rows, row_len))


def eval_batch(mesh, rows: int, row_len: int, users: int, history: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract evaluation batch (``packing.pack_eval_batches``), every array split over ``data``."""
  return {
    **_batch(mesh, EVAL_ROW_KEYS, (rows, row_len)),
    **_batch(mesh, EVAL_USER_KEYS, (users,)),
    **_batch(mesh, ("history",), (users, history)),
  }


def train_program(b: Built, stage: str, rows_per_batch: int | None = None) -> Program:
  """The jitted train step of ``stage`` (``'pretrain'`` or ``'prompt_tune'``) as ``Run`` builds it."""
  c = b.config
  rows = c.train.rows_per_batch if rows_per_batch is None else rows_per_batch
  data = b.mesh.shape["data"]
  if rows % data:
    raise ConfigError(f"train.rows_per_batch={rows} must be divisible by the mesh's data axis ({data} devices)")
  prompt_cfg = stages.get(stage).prompt_config(c)
  try:
    loss_cfg = step_lib.LossConfig.from_config(c.train)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  adam = optim.adam_spec(c.optimizer, _NOMINAL_STEPS) if c.train.row_sparse else None
  # Popularity prompts and negatives need the training-split item counts; only their shape matters to the compiler.
  popularity_prompts = prompt_cfg is not None and prompt_cfg.source == "popularity"
  counts = np.ones(b.model_cfg.num_items + 1) if popularity_prompts or loss_cfg.needs_counts else None
  step_fn = step_lib.make_train_step(b.graphdef, b.tx, loss_cfg, prompt_cfg, b.mesh, adam=adam, item_counts=counts)
  fn = step_lib.jit_train_step(step_fn, b.state_sharding, b.mesh)
  batch = train_batch(b.mesh, rows, c.train.row_len, prompt_cfg is not None)
  return Program(f"{stage}_step", fn, (b.abstract_state, batch), rows, c.train.row_len)


def _recall_fn(b: Built):
  quotas = tuple(b.config.recall.quotas)
  approx = b.config.eval.get("approx_recall", 0.0)
  return decoder.make_recall_fn(b.graphdef, quotas, config_lib.eval_head(b.config), b.mesh, approx)


def eval_program(b: Built, history: int) -> Program:
  """The jitted evaluation step (metrics of one batch; the multi-interest recall inside when S > 1)."""
  c = b.config
  quotas = tuple(c.recall.quotas)
  ks = tuple(k for k in metrics_lib.KS if k <= sum(quotas))
  recall_fn = _recall_fn(b) if len(quotas) > 1 else None
  fn = metrics_lib.make_eval_step(
    b.graphdef,
    ks,
    config_lib.eval_head(c),
    recall_fn,
    b.mesh,
    b.state_sharding.params,
    approx_recall=c.eval.get("approx_recall", 0.0),
  )
  batch = eval_batch(b.mesh, c.eval.rows_per_batch, c.train.row_len, c.eval.users_per_batch, history)
  return Program(
    "eval_step", fn, (b.abstract_state.params, batch), c.eval.rows_per_batch, c.train.row_len, c.eval.users_per_batch
  )


def recall_program(b: Built, history: int) -> Program:
  """The multi-interest recall (``recall.quotas``) of one evaluation batch."""
  c = b.config
  batch = eval_batch(b.mesh, c.eval.rows_per_batch, c.train.row_len, c.eval.users_per_batch, history)
  batch = {k: v for k, v in batch.items() if k in decoder.PREFILL_INPUTS or k == "history"}
  return Program(
    "recall", _recall_fn(b), (b.abstract_state.params, batch), c.eval.rows_per_batch, c.train.row_len,
    c.eval.users_per_batch,
  )  # fmt: skip


def make_program(b: Built, name: str, *, history: int, rows_per_batch: int | None = None) -> Program:
  """One of ``PROGRAMS`` by name."""
  if name == "pretrain_step":
    return train_program(b, "pretrain", rows_per_batch)
  if name == "prompt_tune_step":
    return train_program(b, "prompt_tune", rows_per_batch)
  if name == "eval_step":
    return eval_program(b, history)
  if name == "recall":
    return recall_program(b, history)
  raise ConfigError(f"unknown program {name!r}; expected one of {PROGRAMS}")


# --- compiling and reading the compiled program -------------------------------------------------------------


def is_out_of_memory(e: Exception) -> bool:
  """Whether a compile error says the program does not fit the device's memory (TPU: RESOURCE_EXHAUSTED)."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds the memory" in text


def memory(compiled, limit: int) -> dict[str, Any]:
  """Per-device bytes of ``compiled.memory_analysis()`` and whether they fit ``limit``.

  ``total_bytes`` = arguments + outputs - aliased (donated) outputs + temporaries + generated code: what one
  device holds while the program runs.
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
    f"{n}_bytes": int(getattr(m, f"{n}_size_in_bytes", 0))
    for n in ("argument", "output", "alias", "temp", "generated_code")
  }
  out["total_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"] + out["generated_code_bytes"]
  )
  out["limit_bytes"] = int(limit)
  out["fraction_of_limit"] = out["total_bytes"] / limit
  out["fits"] = out["total_bytes"] <= limit
  return out


def cost(compiled) -> dict[str, float] | None:
  """FLOPs and bytes accessed per device from XLA's cost analysis (None where the backend gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  out = {"flops": float(analysis["flops"]), "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}
  return out


def collectives(hlo_text: str, top: int = 6) -> dict[str, Any]:
  """The collectives of a compiled per-device program: count and result bytes per op, and the largest ones."""
  found = hlo.collectives(hlo_text)
  by_op: dict[str, dict[str, int]] = {}
  for c in found:
    entry = by_op.setdefault(c.op, {"count": 0, "result_bytes": 0})
    entry["count"] += 1
    entry["result_bytes"] += c.result_bytes
  largest = sorted(found, key=lambda c: -c.result_bytes)[:top]
  return {
    "by_op": by_op,
    "total_result_bytes": sum(c.result_bytes for c in found),
    "largest": [{"op": c.op, "result": list(c.result_shapes), "result_bytes": c.result_bytes} for c in largest],
    "all": [{"op": c.op, "result": list(c.result_shapes), "result_bytes": c.result_bytes} for c in found],
  }


ROOFLINE_NOTE = (
  "estimate: max(FLOPs / peak dense bf16 FLOP/s, bytes accessed / HBM bandwidth) of one device, from XLA's cost"
  " analysis; ignores collective (ICI/NVLink) time, launch overheads and imperfect overlap, and float32 matmuls"
  " run well below the bf16 peak, so real steps are slower"
)


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, Any]:
  """Roofline *estimate* of one step's time on one device (``ROOFLINE_NOTE``)."""
  compute_s = flops / chip.peak_flops
  memory_s = bytes_accessed / chip.hbm_bytes_per_s
  return {
    "compute_s_estimate": compute_s,
    "memory_s_estimate": memory_s,
    "step_s_estimate": max(compute_s, memory_s),
    "bound": "compute" if compute_s >= memory_s else "memory",
    "arithmetic_intensity_flops_per_byte": flops / bytes_accessed if bytes_accessed else None,
    "note": ROOFLINE_NOTE,
  }


@dataclasses.dataclass
class Compiled:
  """A compile attempt: the compiled program, or the out-of-memory error that says it does not fit."""

  program: Program
  compiled: Any | None
  seconds: float
  error: str | None = None


# Deviceless GPU compiles: XLA sizes the scratch of CUB's radix sort (a large 1-D sort, e.g. the sorted unique ids
# of the row-sparse update) by asking the GPU, which fails with "invalid device ordinal" when there is none; XLA's
# own sort kernel needs no device.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}


def compile_program(program: Program, compiler_options: dict | None = None, *, trace_errors: bool = False) -> Compiled:
  """Lowers and compiles ``program``; a RESOURCE_EXHAUSTED compile error is returned, any other raised.

  With ``trace_errors``, a ``ValueError`` raised while tracing (a size the model refuses, e.g. a dropout mask past
  its 32-bit counter) is returned too, as a batch that cannot run.
  """
  t0 = time.perf_counter()
  try:
    compiled = program.fn.lower(*program.args).compile(compiler_options=compiler_options)
  except ValueError as e:
    if not trace_errors:
      raise
    return Compiled(program, None, time.perf_counter() - t0, f"cannot trace: {str(e).splitlines()[0][:300]}")
  except Exception as e:  # noqa: BLE001 (XLA raises JaxRuntimeError / XlaRuntimeError; only OOM is expected)
    if not is_out_of_memory(e):
      raise
    line = next((ln.strip() for ln in str(e).splitlines() if "RESOURCE_EXHAUSTED" in ln), str(e).splitlines()[0])
    return Compiled(program, None, time.perf_counter() - t0, line[:500])
  return Compiled(program, compiled, time.perf_counter() - t0)


def fits(result: Compiled, limit: int) -> bool:
  if result.compiled is None:
    return False
  m = memory(result.compiled, limit)
  return bool(m.get("fits", True))


def report(
  result: Compiled,
  target: Target,
  *,
  cost_fallback: Callable[[], tuple[dict | None, str]] | None = None,
  keep_hlo_ops: bool = False,
  table_shard_elements: int | None = None,
) -> dict[str, Any]:
  """Everything read off one compiled program, per device; the roofline step time is labelled an estimate.

  Args:
    result: the compile attempt.
    target: its target (chip figures and memory limit).
    cost_fallback: where the backend gives no cost analysis (GPU), returns ``(cost, source)`` from elsewhere.
    keep_hlo_ops: keep the list of every collective (else only the largest).
    table_shard_elements: elements of one device's shard of the item table: all-gathers at least that large
      (which assemble the table, or a score array as large) are listed under ``large_all_gathers``.
  """
  p = result.program
  out: dict[str, Any] = {
    "program": p.name,
    "rows_per_batch": p.rows_per_batch,
    "row_len": p.row_len,
    "tokens_per_step": p.rows_per_batch * p.row_len,
    "users_per_batch": p.users_per_batch,
    "compile_s": round(result.seconds, 2),
  }
  if result.compiled is None:
    out["memory"] = {"fits": False, "error": result.error, "limit_bytes": target.memory_limit}
    return out
  out["memory"] = memory(result.compiled, target.memory_limit)
  c = cost(result.compiled)
  source = "XLA cost analysis of the compiled program for the target"
  if c is None and cost_fallback is not None:
    c, source = cost_fallback()
  if c is not None:
    out["cost"] = {**c, "source": source}
    out["roofline"] = roofline(c["flops"], c["bytes_accessed"], target.spec)
  else:
    out["cost"] = None
  coll = collectives(result.compiled.as_text())
  if table_shard_elements:
    coll["large_all_gathers"] = large_all_gathers(coll["all"], table_shard_elements)
  if not keep_hlo_ops:
    coll.pop("all")
  out["collectives"] = coll
  return out


def largest_fitting(
  try_rows: Callable[[int], Compiled],
  limit: int,
  *,
  step: int,
  max_rows: int,
  start: int | None = None,
  refine: int = 2,
  log: Callable[[str], None] = lambda s: None,
) -> tuple[int, Compiled | None, list[dict]]:
  """The largest batch (in rows, a multiple of ``step``) whose program fits ``limit`` bytes per device.

  Powers of two: from ``start`` (``step`` times a power of two; default ``step``) doubling while the batch fits
  (up to ``max_rows``), or halving until it fits; then ``refine`` bisection steps (in multiples of ``step``)
  between the largest power of two that fits and the smallest that does not.

  Returns:
    ``(rows, the compile at rows or None, trail)``: ``rows`` is 0 if even ``step`` rows do not fit; the trail
    lists every attempt (rows, fits, total bytes, compile seconds).
  """
  trail: list[dict] = []
  results: dict[int, Compiled] = {}

  def attempt(rows: int) -> bool:
    r = results[rows] = try_rows(rows)
    ok = fits(r, limit)
    total = memory(r.compiled, limit).get("total_bytes") if r.compiled is not None else None
    trail.append({"rows": rows, "fits": ok, "total_bytes": total, "compile_s": round(r.seconds, 2)})
    trail[-1]["error"] = r.error
    why = f" ({total / GiB:.2f} GiB)" if total else (f" ({r.error})" if r.error and "cannot trace" in r.error else "")
    log(f"    rows {rows}: {'fits' if ok else 'does not fit'}{why}")
    return ok

  rows = min(start or step, max_rows)
  lo, hi = 0, None  # largest rows known to fit, smallest known not to
  if attempt(rows):
    lo = rows
    while rows * 2 <= max_rows:
      rows *= 2
      if not attempt(rows):
        hi = rows
        break
      lo = rows
  else:
    hi = rows
    while rows > step:
      rows //= 2
      if attempt(rows):
        lo = rows
        break
      hi = rows
  if lo and hi is not None:
    for _ in range(refine):
      mid = (lo + hi) // 2 // step * step
      if mid <= lo or mid >= hi:
        break
      if attempt(mid):
        lo = mid
      else:
        hi = mid
  return lo, results.get(lo), trail


def result_elements(shape: str) -> int:
  """Elements of an HLO array shape such as ``'f32[128,64]'``."""
  return math.prod(int(d) for d in shape[shape.index("[") + 1 : -1].split(",") if d)


def large_all_gathers(collectives_all: Sequence[dict], min_elements: int) -> list[dict]:
  """The all-gathers (from ``collectives(...)['all']``) with a result of at least ``min_elements`` elements.

  With ``min_elements`` = the elements of one device's shard of the item table, any hit gathers more than a
  shard: the table (or a ``[tokens, vocab]`` score array) is being assembled on one device.
  """
  return [
    c
    for c in collectives_all
    if c["op"] == "all-gather" and any(result_elements(s) >= min_elements for s in c["result"])
  ]


def cpu_mesh_devices(n: int) -> list | None:
  """``n`` CPU devices for the cost fallback, or None if the CPU backend has fewer."""
  cpus = jax.devices("cpu")
  return list(cpus[:n]) if len(cpus) >= n else None
