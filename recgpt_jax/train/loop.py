"""Pre-training and evaluation runs: the outer loop around the jitted step.

Resume order (as in big_vision): the workdir's own latest checkpoint if there is one, else a fresh start.
The loop is exact on resume: the input pipeline's position, the step (from which every dropout and
negative-sampling key is folded) and the best-so-far metric are all part of the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from recgpt_jax import config as config_lib
from recgpt_jax import provenance
from recgpt_jax.data import io, packing, pipeline, split, tfds_builder
from recgpt_jax.errors import ConfigError, UserError
from recgpt_jax.eval import metrics as metrics_lib
from recgpt_jax.model import attention
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.parallel import distributed
from recgpt_jax.parallel import mesh as mesh_lib
from recgpt_jax.recall import decoder
from recgpt_jax.train import optim, stages
from recgpt_jax.train import step as step_lib
from recgpt_jax.train.checkpoint import RunCheckpoints

TRAIN_STAGES = tuple(stages.STAGES)
# Config fields that must match for a workdir to be resumed or evaluated.
_COMPAT_FIELDS = ("dataset", "max_len", "model")
# Model fields a saved model may be used with different values of: dropout, and how (not what) the model computes.
_RUNTIME_MODEL_FIELDS = ("attn_dropout", "hidden_dropout", "user_dropout", "attention_impl", "flow_chunk", "dtype")
# Fields added after runs were saved: a saved config without them had these values.
_MODEL_FIELD_DEFAULTS = {"param_dtype": "float32"}


# Per-user test metrics of the selected model, beside results.json (and <results_dir>/<name>.<this>).
PER_USER_FILE = "test_per_user.npz"


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""

  exit_code = 3


def _atomic_write(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def machine_description() -> str:
  return f"{provenance.cpu_name()}, {os.cpu_count()} cores, {jax.devices()[0].platform} x{jax.device_count()}"


git_commit = provenance.git_commit


@dataclasses.dataclass(frozen=True)
class RunData:
  """The data side of a run: the dataset, the stage's training input and the evaluation batches.

  Attributes:
    data: the loaded dataset.
    train_input: packed training batches of the stage's view.
    eval_sets: ``'valid'`` / ``'test'`` -> the users, answers and histories of that split.
    eval_batches: ``'valid'`` / ``'test'`` -> packed evaluation batches (host arrays).
    item_counts: ``[num_items + 1]`` how often each item occurs in the training split (0 = padding).
  """

  data: io.SequenceData
  train_input: pipeline.TrainInput
  eval_sets: dict[str, split.EvalSet]
  eval_batches: dict[str, list[dict[str, np.ndarray]]]
  item_counts: np.ndarray


def build_data(config: ml_collections.ConfigDict, stage: stages.Stage) -> RunData:
  """Loads the dataset (building its TFDS copy once) and lays out the stage's training and evaluation input."""
  c = config
  data = io.load_dataset(c.dataset, format=c.data_format, **({"k_core": c.k_core} if c.k_core else {}))
  usable = split.usable(data.sequences)
  if not np.any(usable):
    raise UserError(f"{data.source}: no user has the {split.MIN_ITEMS} items the leave-one-out split needs")
  stage.check(c, data.num_items)
  if data.source in io.BUNDLED:
    if jax.process_count() > 1:  # process 0 builds the TFDS dataset (once); the others then read it
      from jax.experimental import multihost_utils

      if distributed.is_primary():
        tfds_builder.data_source(c.dataset, c.tfds_data_dir or None)
      multihost_utils.sync_global_devices("recgpt_jax: TFDS dataset built")
    source = tfds_builder.data_source(c.dataset, c.tfds_data_dir or None)[0]
  else:
    source = tfds_builder.InMemorySource(data.users, data.sequences)
  train_input = pipeline.TrainInput(
    source,
    max_len=c.max_len,
    row_len=c.train.row_len,
    rows_per_batch=c.train.rows_per_batch,
    seed=c.seed,
    **stage.input_view(c),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  eval_sets, eval_batches = {}, {}
  for name in split.STAGES:
    eval_sets[name] = split.make_eval_set(data.users, data.sequences, name, c.max_len)
    eval_batches[name] = packing.pack_eval_batches(
      eval_sets[name],
      row_len=c.train.row_len,
      rows_per_batch=c.eval.rows_per_batch,
      users_per_batch=c.eval.users_per_batch,
    )
  seen = [s[: -(split.MIN_ITEMS - 2)] for s, ok in zip(data.sequences, usable, strict=True) if ok]  # items[:-2]
  item_counts = np.bincount(np.concatenate(seen), minlength=data.num_items + 1).astype(np.int64)
  item_counts[0] = 0
  return RunData(data, train_input, eval_sets, eval_batches, item_counts)


class Run:
  """Everything built from a config: data, model, optimizer, step functions, checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, stage: str = "pretrain"):
    config_lib.validate(config)
    m = config.model
    attention.check_impl(
      m.attention, m.attention_impl, attn_dropout=m.attn_dropout, dtype=m.dtype, platform=jax.devices()[0].platform
    )
    self.config = config
    self.stage = stages.get(stage)
    self.workdir = pathlib.Path(workdir)
    self._check_workdir_compatible()
    built = build_data(config, self.stage)
    self.data, self.train_input = built.data, built.train_input
    self.eval_sets, self.eval_batches, self.item_counts = built.eval_sets, built.eval_batches, built.item_counts
    self.prompt_cfg = self.stage.prompt_config(config)
    self.loss_targets_key = self.stage.targets_key
    self.mesh = mesh_lib.make_mesh(config.mesh)
    self._check_batch_sizes()
    self._build_state()
    self._build_steps()
    self.ckpt = RunCheckpoints(self.workdir, keep=config.train.keep_checkpoints)

  def _check_batch_sizes(self) -> None:
    c, data_size = self.config, self.mesh.shape["data"]
    for name, size in (
      ("train.rows_per_batch", c.train.rows_per_batch),
      ("eval.rows_per_batch", c.eval.rows_per_batch),
      ("eval.users_per_batch", c.eval.users_per_batch),
    ):
      if size % data_size:
        raise ConfigError(f"{name}={size} must be divisible by the mesh's data axis ({data_size} devices)")

  def _build_state(self) -> None:
    """The model, the optimizer over the run's schedule, and the sharded initial train state."""
    c = self.config
    try:
      self.model_cfg = ModelConfig(
        num_items=self.data.num_items, num_users=self.data.num_users, max_len=c.max_len, **c.model
      )
      self.loss_cfg = step_lib.LossConfig.from_config(c.train)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    model = RecGPT(self.model_cfg, rngs=nnx.Rngs(c.seed))
    self.param_specs = mesh_lib.param_specs(model, c.mesh.rules)
    self.steps_per_epoch = self.train_input.steps_per_epoch(0)
    # Fraction of the positions the train step computes that hold a real token (the rest is padding).
    self.packing_fraction = self.train_input.num_tokens / (
      self.steps_per_epoch * c.train.rows_per_batch * c.train.row_len
    )
    self.total_steps = self.steps_per_epoch * c.train.num_epochs
    if c.train.max_steps:
      self.total_steps = min(self.total_steps, c.train.max_steps)
    self.tx = optim.make_optimizer(c.optimizer, self.total_steps)
    self.graphdef, state = step_lib.init_state(model, self.tx, c.seed)
    self.state_sharding = mesh_lib.shardings(step_lib.state_specs(state, self.tx, self.param_specs), self.mesh)
    self.state = jax.device_put(state, self.state_sharding)

  def _build_steps(self) -> None:
    """The jitted train step of the stage and the evaluation steps (mean and per-user metrics)."""
    c = self.config
    step_fn = step_lib.make_train_step(
      self.graphdef,
      self.tx,
      self.loss_cfg,
      self.prompt_cfg,
      self.mesh,
      adam=optim.adam_spec(c.optimizer, self.total_steps) if c.train.row_sparse else None,
      item_counts=self.item_counts if self.prompt_cfg is not None and self.prompt_cfg.source == "popularity" else None,
    )
    self.train_step = step_lib.jit_train_step(step_fn, self.state_sharding, self.mesh)
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self._eval_on_device: dict[str, list] = {}
    quotas = tuple(c.recall.quotas)
    self.ks = tuple(k for k in metrics_lib.KS if k <= sum(quotas))
    self.metric_names = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in self.ks)
    # Evaluation, recall and recommendations score items with eval.head (default: the head the loss trains).
    self.head = config_lib.eval_head(c)
    recall_fn = decoder.make_recall_fn(self.graphdef, quotas, self.head, self.mesh) if len(quotas) > 1 else None
    self.eval_step, self.eval_step_per_user = (
      metrics_lib.make_eval_step(
        self.graphdef, self.ks, self.head, recall_fn, self.mesh, self.state_sharding.params, per_user=per_user
      )
      for per_user in (False, True)
    )

  def _check_workdir_compatible(self) -> None:
    saved = self.workdir / "config.json"
    if not saved.exists():
      return
    try:
      old = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError):
      return
    field, differ = _incompatible(old, json.loads(self.config.to_json()))
    if field:
      raise ConfigError(
        f"workdir {self.workdir} holds a run with a different {field} ({', '.join(differ)}); use a new --workdir"
      )

  def start(self) -> tuple[step_lib.TrainState, dict[str, Any]]:
    """The state the stage continues from, and its progress record.

    The workdir's own latest checkpoint (exact resume); else, with ``config.init_from``, that run's model with
    a fresh optimizer, which is then also the first model-selection candidate (epoch 0: a stage that only
    makes the model worse ends with the model it started from); else a fresh initialisation.
    """
    meta = {"epoch": 0, "iterator": None, "best": None, "bad_evals": 0, "history": []}
    state = self.state
    if self.ckpt.latest_step() is not None:
      state, meta = self.ckpt.restore(state)
      logging.info("resumed from step %d (epoch %d)", int(state.step), meta["epoch"])
      print(f"Resuming {self.workdir} from step {int(state.step)}, epoch {meta['epoch'] + 1}.", flush=True)
    elif self.config.init_from:
      params = self.warm_start_params(state.params)
      state = state.replace(params=params, opt_state=self.tx.init(params))
      valid = self.evaluate(state.params, "valid")
      meta["best"] = {"epoch": 0, "step": int(jax.device_get(state.step)), **valid}
      meta["history"] = [dict(meta["best"])]
      self.ckpt.save_best(meta["best"]["step"], state.params, meta["best"])
      print("epoch 0 (the starting model): valid " + _metric_line(valid, self.config.eval.metric), flush=True)
    return state, meta

  def warm_start_params(self, target_params: dict) -> dict:
    """Parameters of the run ``config.init_from``: its best model, else its latest state."""
    src = self.config.init_from
    if not src:
      raise ConfigError(f"--mode={self.stage.name} starts from a trained model: set --config.init_from=<workdir>")
    src = pathlib.Path(src)
    saved = src / "config.json"
    if not saved.exists():
      raise ConfigError(f"--config.init_from={src} is not a run directory (no config.json)")
    old = json.loads(saved.read_text())
    # A pre-trained model without the untied head may start a run that has one: the head starts as a copy
    # of the item table (so both heads score alike at step 0).
    add_head = self.config.model.untied_head and not old.get("model", {}).get("untied_head", False)
    if add_head:
      old["model"]["untied_head"] = True
    field, differ = _incompatible(old, json.loads(self.config.to_json()))
    if field:
      raise ConfigError(f"--config.init_from={src} was trained with a different {field} ({', '.join(differ)})")
    target = {k: v for k, v in target_params.items() if k != "head"} if add_head else target_params
    ckpt = RunCheckpoints(src, keep=self.config.train.keep_checkpoints)
    if ckpt.has_best():
      params, meta = ckpt.restore_best(target)
      print(f"Warm start from {src} (best model, epoch {meta.get('epoch')}).", flush=True)
    elif ckpt.latest_step() is not None:
      state, _ = ckpt.restore(self.state.replace(params=target, opt_state=self.tx.init(target)))
      params = state.params
      print(f"Warm start from {src} (latest checkpoint, step {int(state.step)}).", flush=True)
    else:
      raise ConfigError(f"--config.init_from={src} holds no checkpoint")
    ckpt.close()
    if add_head:
      table = params["item_embed"]["embedding"]
      head = target_params["head"]
      params = {
        **params,
        "head": {"kernel": table.T.astype(head["kernel"].dtype), "bias": jnp.zeros_like(head["bias"])},
      }
      print("The untied head starts as a copy of the item table (the pre-trained model has none).", flush=True)
    return params

  def _eval_device_batches(self, split_name: str) -> list:
    if split_name not in self._eval_on_device:  # every process holds the (small) eval batches; each places its shards
      self._eval_on_device[split_name] = [
        {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda idx, v=v: v[idx]) for k, v in b.items()}
        for b in self.eval_batches[split_name]
      ]
    return self._eval_on_device[split_name]

  def evaluate(self, params, split_name: str) -> dict[str, float]:
    """Mean metrics of ``params`` over the users of ``split_name`` ('valid' or 'test')."""
    return metrics_lib.evaluate(self.eval_step, params, self._eval_device_batches(split_name))

  def evaluate_per_user(self, params, split_name: str) -> dict[str, np.ndarray]:
    """Every user's metrics on ``split_name``: ``users`` (ids, in the split's order) and one array per metric."""
    values = metrics_lib.evaluate_per_user(self.eval_step_per_user, params, self._eval_device_batches(split_name))
    eval_set = self.eval_sets[split_name]
    if not np.array_equal(values.pop("answer"), eval_set.answers):
      raise AssertionError("per-user evaluation is out of step with the evaluation set")
    return {"users": eval_set.users, **values}

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global training batch (rows split over ``data``) from this process's block of rows."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}


def _incompatible(old: dict, new: dict) -> tuple[str | None, list[str]]:
  """The first config field whose change makes a saved model unusable, and what changed in it.

  Dropout rates, the attention implementation and the activation dtype may change (between stages, or for
  evaluation); data, architecture and parameter dtype may not.
  """
  for field in _COMPAT_FIELDS:
    if field == "model":
      old_model = _MODEL_FIELD_DEFAULTS | old.get("model", {})
      differ = [
        f"{k}: {old_model.get(k)!r} != {v!r}"
        for k, v in new["model"].items()
        if k not in _RUNTIME_MODEL_FIELDS and old_model.get(k) != v
      ]
    else:
      differ = [f"{old.get(field)!r} != {new.get(field)!r}"] if old.get(field) != new.get(field) else []
    if differ:
      return field, differ
  return None, []


class NullLog:
  """The metrics log of the processes that do not write files."""

  def write(self, step: int, values: dict[str, Any]) -> None:
    del step, values

  def close(self) -> None:
    pass


class MetricsLog:
  """JSONL metrics log plus TensorBoard event files in the workdir."""

  def __init__(self, workdir: pathlib.Path):
    from tensorboardX import SummaryWriter  # imported lazily: it is slow to import

    self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
    self.tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, values: dict[str, Any]) -> None:
    self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    self.jsonl.flush()
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    self.jsonl.close()
    self.tb.close()


def _progress(total: int, desc: str):
  from tqdm import tqdm

  return tqdm(
    total=total,
    desc=desc,
    unit="step",
    dynamic_ncols=True,
    leave=False,
    mininterval=1.0,
    disable=not distributed.is_primary(),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stage: str = "pretrain") -> dict[str, Any]:
  """Trains one stage (``recgpt_jax.train.stages``), then reports valid/test metrics of its best model.

  Start order (``Run.start``): the workdir's own latest checkpoint (exact resume); else the best (else latest)
  parameters of ``config.init_from`` with a fresh optimizer; else a fresh initialisation.

  Returns:
    The results record (also written to ``<workdir>/results.json``).
  """
  t_start = time.time()
  run = Run(config, workdir, stage)
  c = config
  wd = run.workdir
  wd.mkdir(parents=True, exist_ok=True)
  primary = distributed.is_primary()  # one process writes the run's files; all write checkpoints
  if primary:
    _atomic_write(wd / "config.json", c.to_json(indent=2))
    run.data.save_id_maps(wd)  # raw <-> dense ids, when the data came from an interaction log
  state, meta = run.start()
  print(
    f"{run.data.source}: {len(run.data.users)} users, {run.data.num_items} items, "
    f"{run.train_input.num_tokens} train tokens/epoch, ~{run.steps_per_epoch} steps/epoch, "
    f"packing {run.packing_fraction:.1%} real positions",
    flush=True,
  )
  stop = bool(c.train.max_steps and int(jax.device_get(state.step)) >= c.train.max_steps)
  # Opened only now, inside the try that closes it: a start that fails (e.g. a bad warm start) must not leave
  # a TensorBoard writer whose atexit hook prints a traceback after the one-line error (Python 3.12).
  log = MetricsLog(wd) if primary else NullLog()
  if meta["history"] == [meta["best"]] and meta["best"]["epoch"] == 0:  # a fresh warm start: log its epoch 0
    log.write(meta["best"]["step"], {f"valid/{k}": v for k, v in meta["best"].items() if k not in ("epoch", "step")})
  try:
    while meta["epoch"] < c.train.num_epochs and not stop:
      state, meta, stop = _train_epoch(run, state, meta, log)
  finally:
    # An interrupted run still completes the checkpoint it was writing (a hard kill leaves the
    # previous one, which is just as exact a resume point).
    run.ckpt.wait()
    log.close()
  return _final_report(run, state, c, wd, time.time() - t_start)


def _train_epoch(run: Run, state, meta: dict, log) -> tuple[Any, dict, bool]:
  """Trains the epoch ``meta['epoch']`` (from its saved iterator position), validates, checkpoints.

  Returns:
    ``(state, meta, stop)``: ``stop`` when ``train.max_steps`` is reached or early stopping triggers.
  """
  c = run.config
  epoch = meta["epoch"]
  step = int(jax.device_get(state.step))
  it = run.train_input.epoch_iterator(epoch)
  if meta["iterator"] is not None:
    it.set_state(meta["iterator"])
  bar = _progress(run.steps_per_epoch, f"epoch {epoch + 1}/{c.train.num_epochs}")
  pending = None  # metrics of the previous step, read one step late so the host never waits
  last_loss = float("nan")
  window_tokens, window_t0 = 0, time.time()

  def report():
    nonlocal window_tokens
    window_tokens += int(pending[1]["tokens"])  # the step's own count: global, and after prompting
    return _report(pending, log, bar, window_tokens / max(time.time() - window_t0, 1e-9), c)

  for batch in it:
    state, out = run.train_step(state, run.global_batch(batch))
    step += 1
    if pending is not None:
      last_loss = report()
    pending = (step, out)
    bar.update(1)
    if step % c.train.checkpoint_every_steps == 0:
      # Check this step's loss before saving it, so a diverged state is never checkpointed.
      last_loss, pending = report(), None
      run.ckpt.save(state, {**meta, "iterator": it.get_state()})
    if c.train.max_steps and step >= c.train.max_steps:
      break
  bar.close()
  if pending is not None:
    last_loss = report()
  if c.train.max_steps and step >= c.train.max_steps:
    # The state trained so far is a candidate too (else a warm-started stage would report its starting model).
    meta, _, note = _validate(run, state, meta, log)
    if run.ckpt.latest_step() != step:
      run.ckpt.save(state, {**meta, "iterator": it.get_state()})
    print(f"stopped at train.max_steps={c.train.max_steps}{note}", flush=True)
    return state, meta, True
  meta = {**meta, "epoch": epoch + 1, "iterator": None}
  line = f"epoch {epoch + 1}: loss {last_loss:.4f}, {window_tokens / max(time.time() - window_t0, 1e-9):,.0f} tokens/s"
  if window_tokens == 0:  # resumed from a checkpoint taken after the epoch's last step
    line = f"epoch {epoch + 1}: resumed after its last step"
  stop = False
  if (epoch + 1) % c.train.eval_every_epochs == 0 or epoch + 1 == c.train.num_epochs:
    meta, stop, note = _validate(run, state, meta, log)
    line += note
  print(line, flush=True)
  run.ckpt.save(state, meta)
  return state, meta, stop


def _validate(run: Run, state, meta: dict, log) -> tuple[dict, bool, str]:
  """Validates after an epoch: keeps the best model, counts patience. Returns ``(meta, stop, log line part)``."""
  c, metric = run.config, run.config.eval.metric
  step, epoch = int(jax.device_get(state.step)), meta["epoch"]
  valid = run.evaluate(state.params, "valid")
  log.write(step, {f"valid/{k}": v for k, v in valid.items()} | {"epoch": epoch})
  note = ", valid " + _metric_line(valid, metric)
  meta = {**meta, "history": meta["history"] + [{"epoch": epoch, "step": step, **valid}]}
  if meta["best"] is None or valid[metric] > meta["best"][metric]:
    meta["best"] = {"epoch": epoch, "step": step, **valid}
    meta["bad_evals"] = 0
    run.ckpt.save_best(step, state.params, meta["best"])
    return meta, False, note + " (best)"
  meta["bad_evals"] += 1
  if c.train.patience and meta["bad_evals"] >= c.train.patience:
    return meta, True, note + f"; early stop: no {metric} gain in {c.train.patience} validations"
  return meta, False, note


def _metric_line(values: dict[str, float], metric: str) -> str:
  return " ".join(f"{k} {values[k]:.4f}" for k in dict.fromkeys(("HR@10", "NDCG@10", metric)) if k in values)


def _report(pending, log: MetricsLog, bar, tokens_per_s: float, c) -> float:
  """Reads a step's metrics (a host sync), aborts on divergence, logs; returns the loss."""
  step, out = pending
  loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise TrainingDiverged(
      f"loss {loss} / gradient norm {grad_norm} at step {step};"
      " lower optimizer.learning_rate or set optimizer.clip_norm"
    )
  bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
  if step % c.train.log_every_steps == 0:
    log.write(
      step,
      {"train/loss": loss, "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_per_s},
    )
  return loss


def _final_report(run: Run, state, c, wd: pathlib.Path, wall_time: float | None, command: str | None = None):
  """Evaluates the best model (or the last one if none was selected) on valid and test; writes results."""
  params = state.params
  best_meta = None
  if run.ckpt.has_best():
    params, best_meta = run.ckpt.restore_best(state.params)
  valid = run.evaluate(params, "valid")
  per_user = run.evaluate_per_user(params, "test")  # for paired comparisons of runs (experiments/study.py)
  test = {k: float(np.mean(per_user[k], dtype=np.float64)) for k in run.metric_names}
  test["users"] = len(per_user["users"])
  record = {
    "name": c.name,
    "dataset": run.data.source,
    "recipe": {"stage": run.stage.name, "config": json.loads(c.to_json())},
    "command": command
    or os.environ.get("RECGPT_COMMAND", " ".join(["python", "-m", "recgpt_jax.main", *sys.argv[1:]])),
    "git_commit": git_commit(),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": machine_description(),
    "wall_time_s": None if wall_time is None else round(wall_time, 1),
    "epochs": None if best_meta is None else best_meta.get("epoch"),
    "best_step": None if best_meta is None else best_meta.get("step"),
    "valid": {k: valid[k] for k in run.metric_names},
    "test": {k: test[k] for k in run.metric_names},
    "test_users": test["users"],
  }
  text = json.dumps(record, indent=2) + "\n"
  if not distributed.is_primary():
    return record
  # The per-user file first: a results JSON is the mark of a finished run, so it must never lack one.
  _save_per_user(wd / PER_USER_FILE, per_user)
  _atomic_write(wd / "results.json", text)
  if c.results_dir:
    _save_per_user(pathlib.Path(c.results_dir) / f"{c.name}.{PER_USER_FILE}", per_user)
    _atomic_write(pathlib.Path(c.results_dir) / f"{c.name}.json", text)
  print(_format_metrics("valid", valid, run.metric_names))
  print(_format_metrics("test", test, run.metric_names))
  return record


def _save_per_user(path: pathlib.Path, per_user: dict[str, np.ndarray]) -> None:
  """Writes the per-user test metrics (``users`` plus one float32 array per metric) atomically."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
  np.savez_compressed(tmp, **per_user)
  os.replace(tmp, path)


def _format_metrics(stage: str, m: dict[str, float], names) -> str:
  return f"{stage:5s} " + "  ".join(f"{k} {m[k]:.4f}" for k in names)


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the workdir's best (else latest) model on valid and test without training."""
  run = Run(config, workdir)
  if not run.ckpt.has_best() and run.ckpt.latest_step() is None:
    raise UserError(f"no checkpoint in {run.workdir}; run --mode=pretrain first")
  state = run.state
  if run.ckpt.latest_step() is not None:
    state, _ = run.ckpt.restore(state)
  return _final_report(run, state, config, run.workdir, None)
