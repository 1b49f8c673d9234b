"""Orbax checkpoints of a run: the latest train state for resuming, and the best model by valid NDCG.

Layout under the workdir::

  checkpoints/<step>/state   params, optimizer state, step, RNG (arrays)
  checkpoints/<step>/meta    JSON: epoch, input-pipeline state, best metric so far, early-stop counter
  best/<step>/params         parameters of the best model by the selection metric
  best/<step>/meta           JSON: epoch, step, valid metrics

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed during
a save leaves the previous checkpoints intact (the partial ``*.orbax-checkpoint-tmp*`` folder is ignored, and
removed at the next start of a writer).

A checkpoint that cannot be read (a truncated or deleted file) is skipped with a one-line warning and the
next older one is restored; a writer moves the unreadable one to ``corrupt/`` (never deletes it), so that
training can save that step again. Two best models are kept, so a damaged best has an intact predecessor.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from recgpt_jax.errors import UserError
from recgpt_jax.train.step import TrainState

TMP_MARK = ".orbax-checkpoint-tmp"


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
  # Both managers may save the same step at once; in a multi-process run their cross-process barriers
  # need distinct names.
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class RunCheckpoints:
  """The two checkpoint managers of a run directory."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, writer: bool = False):
    """``writer``: this process trains in the workdir (creates its folders, removes the leftovers of a killed
    save, moves unreadable checkpoints aside); else the workdir is only read (a warm start, recommendations)."""
    self.workdir = pathlib.Path(workdir).absolute()
    self.writer = writer
    if writer and jax.process_index() == 0:
      remove_partial_saves(self.workdir)
    self.latest = self._manager("checkpoints", ("state", "meta"), keep, "latest")
    self.best = self._manager("best", ("params", "meta"), 2, "best")

  def _manager(self, sub: str, items: tuple[str, ...], keep: int, barriers: str) -> ocp.CheckpointManager:
    if self.writer:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, multiprocessing_options=_barriers(barriers))
    else:  # never saves (Orbax's read_only option would log a warning per manager)
      options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=False, save_interval_steps=0, multiprocessing_options=_barriers(barriers)
      )
    return ocp.CheckpointManager(self.workdir / sub, item_names=items, options=options)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, state: TrainState, meta: dict[str, Any]) -> None:
    """Saves the train state and the JSON ``meta`` at ``state.step`` (asynchronously)."""
    _save(self.latest, int(jax.device_get(state.step)), "state", state, meta)

  def restore(self, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restores the latest checkpoint onto the structure and shardings of ``target``."""
    return self._restore(self.latest, "state", target)

  def save_best(self, step: int, params: dict, meta: dict[str, Any]) -> None:
    """Saves ``params`` as the best model so far (replacing the previous best)."""
    _save(self.best, step, "params", params, meta)

  def has_best(self) -> bool:
    return self.best.latest_step() is not None

  def restore_best(self, target_params: dict) -> tuple[dict, dict[str, Any]]:
    """Restores the best parameters onto the structure and shardings of ``target_params``."""
    return self._restore(self.best, "params", target_params)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

  def _restore(self, manager: ocp.CheckpointManager, item: str, target: Any) -> tuple[Any, dict[str, Any]]:
    """The newest readable checkpoint of ``manager``.

    Unreadable newer ones are reported, and a writer moves them aside once an older one has restored (when none
    restores, e.g. a model of another shape, nothing is moved).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    steps = sorted(manager.all_steps(), reverse=True)
    where = manager.directory
    bad = []
    for i, step in enumerate(steps):
      args = {item: ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
      try:
        out = manager.restore(step, args=ocp.args.Composite(**args))
        if not isinstance(out["meta"], dict):
          raise ValueError("its meta record is not a JSON object")
      except Exception as e:  # noqa: BLE001 (any failure to read a checkpoint means: try the older one)
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
        older = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
        print(
          f"warning: checkpoint {where}/{step} is unreadable ({type(e).__name__}: {reason}); {older}",
          file=sys.stderr,
          flush=True,
        )
        bad.append(step)
        continue
      for b in bad:
        self._set_aside(manager, b)
      return out[item], out["meta"]
    raise UserError(f"no readable checkpoint in {where} (tried steps {steps}); use a new --workdir or retrain")

  def _set_aside(self, manager: ocp.CheckpointManager, step: int) -> None:
    """Moves an unreadable checkpoint of a writer's workdir to ``corrupt/`` (so that step can be saved again)."""
    if not self.writer:
      return
    src = pathlib.Path(manager.directory) / str(step)
    dest = self.workdir / "corrupt" / f"{src.parent.name}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"recgpt_jax: set aside {src}")
    manager.reload()
    print(f"warning: moved the unreadable checkpoint to {dest}", file=sys.stderr, flush=True)


def _save(manager: ocp.CheckpointManager, step: int, item: str, tree: Any, meta: dict[str, Any]) -> None:
  args = {item: ocp.args.StandardSave(tree), "meta": ocp.args.JsonSave(meta)}
  manager.save(step, args=ocp.args.Composite(**args))


def remove_partial_saves(workdir: pathlib.Path) -> list[pathlib.Path]:
  """Deletes the temporary folders of saves that a killed run left unfinished (Orbax ignores them)."""
  removed = []
  for sub in ("checkpoints", "best"):
    d = workdir / sub
    if d.is_dir():
      for p in d.iterdir():
        if TMP_MARK in p.name:
          shutil.rmtree(p, ignore_errors=True)
          removed.append(p)
  return removed
