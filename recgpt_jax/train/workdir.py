"""The workdir contract, enforced in one place for every mode that writes a run directory.

A workdir holds one stage of one run::

  .lock               held (``flock``) by the one process that writes the workdir; the OS releases it when
                      that process ends, however it ends
  run.json            the stage that trained here ({"stage": ..., "format": 1})
  config.json         the run's full config
  checkpoints/, best/ Orbax checkpoints (recgpt_jax.train.checkpoint)
  results.json        the training run's record (and test_per_user.npz)
  evaluation.json     the latest ``--mode=evaluate`` record (and evaluation_test_per_user.npz): beside, never over,
                      the training record
  corrupt/            checkpoints that could not be read, moved aside (never deleted)

Rules, checked by :func:`open_for_training` / :func:`open_for_reading` before anything is written:

1. One writer at a time: a second command on a busy workdir stops with a one-line error.
2. A workdir that holds checkpoints is resumed only by the same stage with the same training-relevant config
   (every field except those in :data:`RESUME_FREE`; with a constant learning rate also a longer or shorter
   schedule, :data:`EXTENDABLE`). ``config.json`` and ``run.json`` are written only after that check passes.
3. Restores fall back to the newest intact checkpoint with a one-line warning (recgpt_jax.train.checkpoint).
4. SIGTERM (a preempted TPU VM) saves a checkpoint at the next step and exits (recgpt_jax.train.loop).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from recgpt_jax.errors import ConfigError, UserError

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
FORMAT = 1
CHECKPOINT_DIRS = ("checkpoints", "best")

# Config fields a run may be resumed with other values of: naming and output places, how (not what) the model
# computes, the device mesh (checkpoints restore onto any sharding), evaluation batching, logging and checkpoint
# cadence.
RESUME_FREE = (
  "name",
  "init_from",  # read only by a fresh start
  "results_dir",
  "tfds_data_dir",
  "model.attention_impl",
  "model.flow_chunk",
  "mesh.",
  "eval.users_per_batch",
  "eval.rows_per_batch",
  "train.log_every_steps",
  "train.checkpoint_every_steps",
  "train.keep_checkpoints",
  "train.ce_block",  # blocked or materialised CE: the same loss
)
# Config fields that must match for a workdir to be used for evaluation, recommendations or a warm start.
COMPAT_FIELDS = ("dataset", "max_len", "model")
# Model fields a saved model may be used with different values of: dropout, and how (not what) the model computes.
RUNTIME_MODEL_FIELDS = ("attn_dropout", "hidden_dropout", "user_dropout", "attention_impl", "flow_chunk", "dtype")
# Fields added after runs were saved: a saved config without them had these values.
MODEL_FIELD_DEFAULTS = {"param_dtype": "float32"}
ADDED_FIELD_DEFAULTS = {
  "train.negatives": "uniform",
  "train.logq": False,  # sampled_softmax had no correction before
  "eval.approx_recall": 0.0,
  "prompt.approx_recall": 0.0,
  "eval.max_users": 0,
  "train.cl_weight": 0.0,
  "train.cl_temperature": 1.0,
  "eval.exclude_history": True,
}
# Fields only one loss reads: a run with another loss (before and after) may have any value of them.
LOSS_FIELDS = {"sampled_softmax": ("train.num_negatives", "train.negatives", "train.logq")}
# With a constant learning rate the schedule does not depend on the run's length: it may be extended or cut.
EXTENDABLE = ("train.num_epochs", "train.max_steps", "train.patience")


class WorkdirBusy(UserError):
  """Another process holds the workdir's lock."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _free(field: str, old: dict, new: dict) -> bool:
  if any(field == f or (f.endswith(".") and field.startswith(f)) for f in RESUME_FREE):
    return True
  if any(
    field in fields and loss not in (old.get("train.loss"), new.get("train.loss"))
    for loss, fields in LOSS_FIELDS.items()
  ):
    return True
  return field in EXTENDABLE and new.get("optimizer.schedule") == "constant"


def resume_differences(old: dict, new: dict) -> list[str]:
  """The training-relevant config fields that differ between a saved run (``old``) and this command (``new``),
  as ``'field: old -> new'``."""
  old = {**old, "model": MODEL_FIELD_DEFAULTS | old.get("model", {})}  # fields added after the run was saved
  old_flat, new_flat = ADDED_FIELD_DEFAULTS | _flatten(old), _flatten(new)
  lines = []
  for field in sorted(set(old_flat) | set(new_flat)):
    if _free(field, old_flat, new_flat):
      continue
    a, b = old_flat.get(field, "<unset>"), new_flat.get(field, "<unset>")
    if isinstance(a, list):
      a = tuple(tuple(x) if isinstance(x, list) else x for x in a)
    if isinstance(b, list):
      b = tuple(tuple(x) if isinstance(x, list) else x for x in b)
    if a != b:
      lines.append(f"{field}: {a!r} -> {b!r}")
  return lines


def short(differ: list[str], most: int = 3) -> str:
  """The first few differences, as one short phrase."""
  more = f" and {len(differ) - most} more" if len(differ) > most else ""
  return ", ".join(differ[:most]) + more


def incompatible(old: dict, new: dict) -> tuple[str | None, list[str]]:
  """The first config field whose change makes a saved model unusable, and what changed in it.

  Dropout rates, the attention implementation and the activation dtype may change (between stages, or for
  evaluation); data, architecture and parameter dtype may not.
  """
  for field in COMPAT_FIELDS:
    if field == "model":
      old_model = MODEL_FIELD_DEFAULTS | old.get("model", {})
      differ = [
        f"{k}: {old_model.get(k)!r} != {v!r}"
        for k, v in new["model"].items()
        if k not in RUNTIME_MODEL_FIELDS and old_model.get(k) != v
      ]
    else:
      differ = [f"{old.get(field)!r} != {new.get(field)!r}"] if old.get(field) != new.get(field) else []
    if differ:
      return field, differ
  return None, []


def check_model_compatible(workdir: pathlib.Path, config_json: dict) -> None:
  """The workdir's saved model can be restored with this config (data and architecture match); reads only."""
  old = read_json(workdir / CONFIG_FILE, "the run's config")
  if old is None:
    raise UserError(f"workdir {workdir} holds checkpoints but no {CONFIG_FILE}; cannot check its model")
  field, differ = incompatible(old, config_json)
  if field:
    raise ConfigError(
      f"workdir {workdir} holds a run with a different {field} ({short(differ)}); use the run's own config"
    )


def holds_checkpoints(workdir: pathlib.Path) -> bool:
  """Whether the workdir holds a finished Orbax checkpoint (latest or best)."""
  try:
    for sub in CHECKPOINT_DIRS:
      d = workdir / sub
      if d.is_dir() and any(p.name.isdigit() for p in d.iterdir()):
        return True
  except OSError as e:
    raise UserError(f"cannot read workdir {workdir}: {e.strerror or e}") from None
  return False


def read_json(path: pathlib.Path, what: str) -> dict | None:
  """``path``'s JSON object, None if the file does not exist; a one-line error if it cannot be read."""
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(
      f"{path} ({what}) is unreadable: {type(e).__name__}: {e}; restore it or use a new --workdir"
    ) from None
  if not isinstance(value, dict):
    raise UserError(f"{path} ({what}) is not a JSON object; restore it or use a new --workdir")
  return value


def check_path(workdir: str | os.PathLike) -> None:
  """A workdir that exists must be a directory, and one that does not must be creatable (no file above it)."""
  path = pathlib.Path(workdir)
  for parent in (path, *path.parents):
    if parent.exists():
      if not parent.is_dir():
        what = "is a file" if parent == path else f"is below the file {parent}"
        raise UserError(f"--workdir={workdir} {what}, not a directory")
      return


@contextlib.contextmanager
def _lock(workdir: pathlib.Path, primary: bool) -> Iterator[None]:
  """Holds the workdir's lock (only process 0 of a multi-process run takes it; the others follow it)."""
  if not primary:
    _agree_on_lock(None)
    yield
    return
  path = workdir / LOCK_FILE
  try:
    f = open(path, "a+")  # noqa: SIM115 (closed below)
  except OSError as e:
    _agree_on_lock(False)
    raise UserError(f"cannot lock workdir {workdir}: {e.strerror or e}") from None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "?"
      _agree_on_lock(False)
      raise WorkdirBusy(
        f"workdir {workdir} is in use by another run (pid {holder}); wait for it to end or use another --workdir"
      ) from None
    except OSError as e:
      _agree_on_lock(False)
      raise UserError(f"cannot lock workdir {workdir}: {e.strerror or e}") from None
    _agree_on_lock(True)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)


def _agree_on_lock(locked: bool | None) -> None:
  """Multi-process runs: process 0 tells the others whether it got the lock (``None``: this is not process 0)."""
  import jax

  if jax.process_count() == 1:
    return
  import numpy as np
  from jax.experimental import multihost_utils

  got = multihost_utils.process_allgather(np.int32(-1 if locked is None else int(locked)))
  if int(np.max(got)) != 1:
    raise WorkdirBusy("process 0 could not lock the workdir (see its error)")


def check_stage(workdir: pathlib.Path, stage: str, init_from: str) -> None:
  """One-line errors for a stage that would continue another stage's checkpoints, or start from itself.

  (A stage record without checkpoints is that of a start that failed before its first save: it may be replaced.)
  """
  record = read_json(workdir / RUN_FILE, "the workdir's stage record") if holds_checkpoints(workdir) else None
  saved = None if record is None else record.get("stage")
  if saved is not None and saved != stage:
    hint = f" (start it from this run with --config.init_from={workdir})" if saved == "pretrain" else ""
    raise ConfigError(f"workdir {workdir} holds a {saved} run; --mode={stage} needs its own --workdir{hint}")
  if init_from and pathlib.Path(init_from).absolute().resolve() == workdir.absolute().resolve():
    raise ConfigError(f"--config.init_from={init_from} is the workdir itself: give --mode={stage} its own --workdir")


def check_resume(workdir: pathlib.Path, config_json: dict) -> None:
  """A workdir with checkpoints is resumed only with its own training-relevant config."""
  if not holds_checkpoints(workdir):
    if (workdir / "results.json").exists():
      raise UserError(
        f"workdir {workdir} holds a finished run's results.json but no checkpoint to resume or check it against;"
        " use a new --workdir"
      )
    return  # nothing to resume: a fresh start (a crash before the first checkpoint leaves only files we rewrite)
  saved = read_json(workdir / CONFIG_FILE, "the run's config")
  if saved is None:
    raise UserError(
      f"workdir {workdir} holds checkpoints but no {CONFIG_FILE}, so this command cannot be checked against the run;"
      " use a new --workdir"
    )
  differ = resume_differences(saved, config_json)
  if differ:
    raise ConfigError(
      f"workdir {workdir} holds a run with a different config ({short(differ)}); "
      "resume it with its own config or use a new --workdir"
    )


def warm_start_config(init_from: str, config_json: dict) -> tuple[dict, bool]:
  """The warm start's saved config, checked against this run's (before this run writes anything).

  Returns:
    ``(saved config, add_head)``: ``add_head`` when this run adds an untied head the pre-trained model lacks (it
    then starts as a copy of the item table).
  """
  src = pathlib.Path(init_from)
  old = read_json(src / CONFIG_FILE, "the warm start's config")
  if old is None:
    raise ConfigError(f"--config.init_from={src} is not a run directory (no {CONFIG_FILE})")
  if not holds_checkpoints(src):
    raise ConfigError(f"--config.init_from={src} holds no checkpoint")
  add_head = bool(config_json["model"].get("untied_head")) and not old.get("model", {}).get("untied_head", False)
  if add_head:
    old = {**old, "model": {**old.get("model", {}), "untied_head": True}}
  field, differ = incompatible(old, config_json)
  if field:
    raise ConfigError(f"--config.init_from={src} was trained with a different {field} ({short(differ)})")
  return old, add_head


def record(workdir: pathlib.Path, config_json_text: str, stage: str, write) -> None:
  """Writes the run's config and stage (``write(path, text)`` writes a file atomically)."""
  write(workdir / CONFIG_FILE, config_json_text)
  write(workdir / RUN_FILE, json.dumps({"stage": stage, "format": FORMAT}) + "\n")


@contextlib.contextmanager
def open_for_training(workdir: pathlib.Path, config_json: dict, stage: str, init_from: str, primary: bool):
  """Creates the workdir if needed, takes its lock and checks stage and config before anything else is written."""
  check_path(workdir)
  check_stage(workdir, stage, init_from)  # before creating anything: a refused command leaves no trace
  check_resume(workdir, config_json)
  workdir.mkdir(parents=True, exist_ok=True)
  with _lock(workdir, primary):
    # Checked again under the lock: another writer may have started this workdir since.
    check_stage(workdir, stage, init_from)
    check_resume(workdir, config_json)
    yield


def check_readable(workdir: pathlib.Path, what: str) -> None:
  """For evaluate/recommend: the workdir must exist and hold a checkpoint (nothing is created)."""
  check_path(workdir)
  if not workdir.exists():
    raise UserError(f"no checkpoint in {workdir}: no such directory; train a model there first ({what})")
  if not workdir.is_dir():
    raise UserError(f"workdir {workdir} is not a directory")
  if not holds_checkpoints(workdir):
    raise UserError(f"no checkpoint in {workdir}; train a model there first ({what})")


@contextlib.contextmanager
def open_for_reading(workdir: pathlib.Path, what: str, primary: bool):
  """For a mode that reads a trained workdir and writes beside its record (evaluate): checks, then locks."""
  check_readable(workdir, what)
  with _lock(workdir, primary):
    yield
