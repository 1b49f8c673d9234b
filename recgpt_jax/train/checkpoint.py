"""Orbax checkpoints of a run: the latest train state for resuming, and the best model by valid NDCG.

Layout under the workdir::

  checkpoints/<step>/state   params, optimizer state, step, RNG (arrays)
  checkpoints/<step>/meta    JSON: epoch, input-pipeline state, best metric so far, early-stop counter
  best/<step>/params         parameters of the best model by the selection metric
  best/<step>/meta           JSON: epoch, step, valid metrics

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed during
a save leaves the previous checkpoints intact (the partial ``*.orbax-checkpoint-tmp*`` folder is ignored).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from recgpt_jax.train.step import TrainState


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
  # Both managers may save the same step at once; in a multi-process run their cross-process barriers
  # need distinct names.
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class RunCheckpoints:
  """The two checkpoint managers of a run directory."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2):
    workdir = pathlib.Path(workdir).absolute()
    self.latest = ocp.CheckpointManager(
      workdir / "checkpoints",
      item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, multiprocessing_options=_barriers("latest")),
    )
    self.best = ocp.CheckpointManager(
      workdir / "best",
      item_names=("params", "meta"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, multiprocessing_options=_barriers("best")),
    )

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, state: TrainState, meta: dict[str, Any]) -> None:
    """Saves the train state and the JSON ``meta`` at ``state.step`` (asynchronously)."""
    _save(self.latest, int(jax.device_get(state.step)), "state", state, meta)

  def restore(self, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restores the latest checkpoint onto the structure and shardings of ``target``."""
    return _restore(self.latest, "state", target)

  def save_best(self, step: int, params: dict, meta: dict[str, Any]) -> None:
    """Saves ``params`` as the best model so far (replacing the previous best)."""
    _save(self.best, step, "params", params, meta)

  def has_best(self) -> bool:
    return self.best.latest_step() is not None

  def restore_best(self, target_params: dict) -> tuple[dict, dict[str, Any]]:
    """Restores the best parameters onto the structure and shardings of ``target_params``."""
    return _restore(self.best, "params", target_params)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _save(manager: ocp.CheckpointManager, step: int, item: str, tree: Any, meta: dict[str, Any]) -> None:
  args = {item: ocp.args.StandardSave(tree), "meta": ocp.args.JsonSave(meta)}
  manager.save(step, args=ocp.args.Composite(**args))


def _restore(manager: ocp.CheckpointManager, item: str, target: Any) -> tuple[Any, dict[str, Any]]:
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  args = {item: ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
  out = manager.restore(manager.latest_step(), args=ocp.args.Composite(**args))
  return out[item], out["meta"]
