"""The device mesh and the logical-axis sharding rules, both from the config.

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (the item table's vocabulary,
and the untied head's, are split over it). Model parameters carry *logical* axis names (``vocab``,
``embed``, ``users``, ...; see ``recgpt_jax.model.transformer``) and ``config.mesh.rules`` maps each to a
mesh axis or to ``None`` (replicated), so a deployment changes the layout in its config, not in the model.

For multi-slice TPU, ``data_slices`` / ``model_slices`` say how many slices each axis spans: the mesh is
built with ``mesh_utils.create_hybrid_device_mesh`` so that the devices of one slice (fast interconnect)
are contiguous along each axis and only the outer part crosses the data-centre network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from recgpt_jax.errors import ConfigError

AXES = ("data", "model")
Rules = Sequence[tuple[str, str | None]]


def _fill(data: int, model: int, devices: int) -> tuple[int, int]:
  if data == -1:
    data = devices // model if devices % model == 0 else 0
  if model == -1:
    model = devices // data if devices % data == 0 else 0
  if data < 1 or model < 1 or data * model != devices:
    raise ConfigError(f"mesh data x model must match the {devices} devices, got {data} x {model}")
  return data, model


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ``('data', 'model')`` mesh described by ``config.mesh``.

  Args:
    mesh_cfg: ``config.mesh`` (``data``, ``model``: sizes within a slice, -1 = fill in; ``data_slices``,
      ``model_slices``: slices each axis spans).
    devices: devices to use; default all. With explicit sizes smaller than the device count (and one
      slice), the first ``data * model`` devices are used, e.g. ``mesh.data=1`` for a 1-device run.

  Returns:
    A mesh with Auto axis types (sharding propagated by the compiler, constraints where we set them).
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = (int(mesh_cfg.data_slices), int(mesh_cfg.model_slices))
  num_slices = slices[0] * slices[1]
  data, model = int(mesh_cfg.data), int(mesh_cfg.model)
  if num_slices == 1 and data != -1 and model != -1 and data * model < len(devices):
    devices = devices[: data * model]
  if len(devices) % num_slices:
    raise ConfigError(f"{len(devices)} devices cannot form {num_slices} slices (mesh.*_slices)")
  data, model = _fill(data, model, len(devices) // num_slices)
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  if num_slices == 1:
    return jax.make_mesh((data, model), AXES, axis_types=axis_types, devices=devices)
  from jax.experimental import mesh_utils

  # Multi-slice TPU devices know their slice; elsewhere (GPU clusters, CPU tests; their devices have no
  # slice_index or all share slice 0) each process counts as one slice.
  slice_ids = {getattr(d, "slice_index", 0) for d in devices}
  by_process = len(slice_ids) == 1
  granules = len({d.process_index for d in devices}) if by_process else len(slice_ids)
  if granules != num_slices:
    kind = "processes" if by_process else "slices"
    raise ConfigError(f"mesh.*_slices ask for {num_slices} slices but the devices span {granules} {kind}")
  grid = mesh_utils.create_hybrid_device_mesh((data, model), slices, devices=devices, process_is_granule=by_process)
  return Mesh(grid, AXES, axis_types=axis_types)


def spec_for(names: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
  """The mesh ``PartitionSpec`` of an array whose dimensions have logical ``names`` (None = replicated).

  Each mesh axis is used at most once per array: a later dimension whose rule names an axis already used
  stays replicated.
  """
  if not names:
    return PartitionSpec()
  table = dict(rules)
  used, out = set(), []
  for name in names:
    if name is not None and name not in table:
      raise ConfigError(f"no mesh rule for the logical axis {name!r}; add it to mesh.rules")
    axis = table.get(name) if name is not None else None
    if axis is not None and axis in used:
      axis = None
    if axis is not None:
      used.add(axis)
    out.append(axis)
  return PartitionSpec(*out)


def param_specs(model: nnx.Module, rules: Rules) -> dict[str, Any]:
  """``PartitionSpec`` of every parameter of ``model`` (a pure dict shaped like ``nnx.to_pure_dict``)."""
  logical = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model)))
  return jax.tree.map(lambda p: spec_for(tuple(p), rules), logical, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings(specs: Any, mesh: Mesh) -> Any:
  """``NamedSharding`` for every ``PartitionSpec`` leaf of ``specs``."""
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def kernel_mesh(mesh: Mesh | None, attention_impl: str = "auto") -> contextlib.AbstractContextManager:
  """Context for tracing a step over ``mesh``: the mesh becomes the abstract mesh when the model's attention
  kernel cannot be partitioned by the compiler (Pallas splash attention: a Mosaic custom call), so the kernel
  ``shard_map``s itself over it (``recgpt_jax.model.attention.softmax_splash``). Otherwise a no-op."""
  from recgpt_jax.model import attention

  if mesh is None or attention_impl not in attention.IMPLS_NEEDING_MESH:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
