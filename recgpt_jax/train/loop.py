"""Pre-training and evaluation runs: the outer loop around the jitted step.

Resume order (as in big_vision): the workdir's own latest checkpoint if there is one, else a fresh start.
The loop is exact on resume: the input pipeline's position, the step (from which every dropout and
negative-sampling key is folded) and the best-so-far metric are all part of the checkpoint.
"""

from __future__ import annotations

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
from recgpt_jax.train import optim
from recgpt_jax.train import step as step_lib
from recgpt_jax.train.checkpoint import RunCheckpoints

TRAIN_STAGES = ("pretrain", "prompt_tune")
# Config fields that must match for a workdir to be resumed or evaluated.
_COMPAT_FIELDS = ("dataset", "max_len", "model")
# Model fields a saved model may be used with different values of: dropout, and how (not what) the model computes.
_RUNTIME_MODEL_FIELDS = ("attn_dropout", "hidden_dropout", "user_dropout", "attention_impl", "flow_chunk", "dtype")
# Fields added after runs were saved: a saved config without them had these values.
_MODEL_FIELD_DEFAULTS = {"param_dtype": "float32"}


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


class Run:
  """Everything built from a config: data, model, optimizer, step functions, checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path, stage: str = "pretrain"):
    config_lib.validate(config)
    m = config.model
    attention.check_impl(
      m.attention, m.attention_impl, attn_dropout=m.attn_dropout, dtype=m.dtype, platform=jax.devices()[0].platform
    )
    if stage not in TRAIN_STAGES:
      raise ConfigError(f"unknown training stage {stage!r}; expected one of {TRAIN_STAGES}")
    self.config = config
    self.stage = stage
    self.workdir = pathlib.Path(workdir)
    self._check_workdir_compatible()

    c = config
    self.data = io.load_dataset(c.dataset, format=c.data_format, **({"k_core": c.k_core} if c.k_core else {}))
    if not np.any(split.usable(self.data.sequences)):
      raise UserError(f"{self.data.source}: no user has the {split.MIN_ITEMS} items the leave-one-out split needs")
    if self.data.source in io.BUNDLED:
      if jax.process_count() > 1:  # process 0 builds the TFDS dataset (once); the others then read it
        from jax.experimental import multihost_utils

        if distributed.is_primary():
          tfds_builder.data_source(c.dataset, c.tfds_data_dir or None)
        multihost_utils.sync_global_devices("recgpt_jax: TFDS dataset built")
      source = tfds_builder.data_source(c.dataset, c.tfds_data_dir or None)[0]
    else:
      source = tfds_builder.InMemorySource(self.data.users, self.data.sequences)
    self.prompt_cfg = None
    if stage == "prompt_tune":
      self.prompt_cfg = step_lib.PromptConfig(**c.prompt)
      if self.data.num_items <= c.max_len * (c.prompt.width + 1):
        raise ConfigError(
          f"prompt-tuning needs more than max_len * (prompt.width + 1) = {c.max_len * (c.prompt.width + 1)} items"
          f" so a prompt never has to repeat its prefix; {self.data.source} has {self.data.num_items}"
        )
    # The targets the loss is computed on: the prompted view's in prompt-tuning.
    self.loss_targets_key = "targets" if self.prompt_cfg is None else "p_targets"
    self.train_input = pipeline.TrainInput(
      source,
      max_len=c.max_len,
      row_len=c.train.row_len,
      rows_per_batch=c.train.rows_per_batch,
      seed=c.seed,
      prompt_mode=None if self.prompt_cfg is None else self.prompt_cfg.mode,
      prompt_width=1 if self.prompt_cfg is None else self.prompt_cfg.width,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    self.eval_batches = {}
    for stage in split.STAGES:
      eval_set = split.make_eval_set(self.data.users, self.data.sequences, stage, c.max_len)
      self.eval_batches[stage] = packing.pack_eval_batches(
        eval_set,
        row_len=c.train.row_len,
        rows_per_batch=c.eval.rows_per_batch,
        users_per_batch=c.eval.users_per_batch,
      )

    try:
      self.model_cfg = ModelConfig(
        num_items=self.data.num_items, num_users=self.data.num_users, max_len=c.max_len, **c.model
      )
      self.loss_cfg = step_lib.LossConfig(kind=c.train.loss, num_negatives=c.train.num_negatives, head=c.train.head)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    self.mesh = mesh_lib.make_mesh(c.mesh)
    data_size = self.mesh.shape["data"]
    for name, size in (
      ("train.rows_per_batch", c.train.rows_per_batch),
      ("eval.rows_per_batch", c.eval.rows_per_batch),
      ("eval.users_per_batch", c.eval.users_per_batch),
    ):
      if size % data_size:
        raise ConfigError(f"{name}={size} must be divisible by the mesh's data axis ({data_size} devices)")
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
    step_fn = step_lib.make_train_step(
      self.graphdef,
      self.tx,
      self.loss_cfg,
      self.prompt_cfg,
      self.mesh,
      adam=optim.adam_spec(c.optimizer, self.total_steps) if c.train.row_sparse else None,
    )
    self.train_step = step_lib.jit_train_step(step_fn, self.state_sharding, self.mesh)
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self._eval_on_device: dict[str, list] = {}
    quotas = tuple(c.recall.quotas)
    self.ks = tuple(k for k in metrics_lib.KS if k <= sum(quotas))
    self.metric_names = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in self.ks)
    # Items are scored by the head the loss trains (evaluation, recall and recommendations alike).
    self.head = c.train.head
    recall_fn = decoder.make_recall_fn(self.graphdef, quotas, self.head, self.mesh) if len(quotas) > 1 else None
    self.eval_step = metrics_lib.make_eval_step(
      self.graphdef, self.ks, self.head, recall_fn, self.mesh, self.state_sharding.params
    )
    self.ckpt = RunCheckpoints(self.workdir, keep=c.train.keep_checkpoints)

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

  def warm_start_params(self, target_params: dict) -> dict:
    """Parameters of the pre-training run ``config.init_from``: its best model, else its latest state."""
    src = self.config.init_from
    if not src:
      raise ConfigError("prompt-tuning starts from a pre-trained model: set --config.init_from=<pretrain workdir>")
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

  def evaluate(self, params, stage: str) -> dict[str, float]:
    if stage not in self._eval_on_device:  # every process holds the (small) eval batches; each places its shards
      self._eval_on_device[stage] = [
        {k: jax.make_array_from_callback(v.shape, self.batch_sharding, lambda idx, v=v: v[idx]) for k, v in b.items()}
        for b in self.eval_batches[stage]
      ]
    return metrics_lib.evaluate(self.eval_step, params, self._eval_on_device[stage])

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
  """Trains one stage, then reports valid/test metrics of its best model.

  Start order: the workdir's own latest checkpoint (exact resume); else, for ``prompt_tune``, the best
  (else latest) parameters of the pre-training workdir ``config.init_from`` with a fresh optimizer;
  else a fresh initialisation (pre-training).

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
  meta = {"epoch": 0, "iterator": None, "best": None, "bad_evals": 0, "history": []}
  state = run.state
  if run.ckpt.latest_step() is not None:
    state, meta = run.ckpt.restore(state)
    logging.info("resumed from step %d (epoch %d)", int(state.step), meta["epoch"])
    print(f"Resuming {wd} from step {int(state.step)}, epoch {meta['epoch'] + 1}.", flush=True)
  elif stage == "prompt_tune":
    state = state.replace(params=run.warm_start_params(state.params))
    state = state.replace(opt_state=run.tx.init(state.params))
  print(
    f"{run.data.source}: {len(run.data.users)} users, {run.data.num_items} items, "
    f"{run.train_input.num_tokens} train tokens/epoch, ~{run.steps_per_epoch} steps/epoch, "
    f"packing {run.packing_fraction:.1%} real positions",
    flush=True,
  )

  step = int(jax.device_get(state.step))
  stop = bool(c.train.max_steps and step >= c.train.max_steps)
  metric = c.eval.metric
  # Opened only now, inside the try that closes it: a start that fails (e.g. a bad warm start) must not leave
  # a TensorBoard writer whose atexit hook prints a traceback after the one-line error (Python 3.12).
  log = MetricsLog(wd) if primary else NullLog()
  try:
    while meta["epoch"] < c.train.num_epochs and not stop:
      epoch = meta["epoch"]
      it = run.train_input.epoch_iterator(epoch)
      if meta["iterator"] is not None:
        it.set_state(meta["iterator"])
      bar = _progress(run.steps_per_epoch, f"epoch {epoch + 1}/{c.train.num_epochs}")
      pending = None  # metrics of the previous step, read one step late so the host never waits
      last_loss = float("nan")
      window_tokens, window_t0 = 0, time.time()
      for batch in it:
        state, out = run.train_step(state, run.global_batch(batch))
        step += 1
        if pending is not None:
          last_loss = _report(pending, log, bar, window_tokens / max(time.time() - window_t0, 1e-9), c)
        pending = (step, out)
        # This process's rows; the others hold about as many.
        window_tokens += int(np.count_nonzero(batch[run.loss_targets_key])) * jax.process_count()
        bar.update(1)
        if step % c.train.checkpoint_every_steps == 0:
          # Check this step's loss before saving it, so a diverged state is never checkpointed.
          last_loss = _report(pending, log, bar, window_tokens / max(time.time() - window_t0, 1e-9), c)
          pending = None
          run.ckpt.save(state, {**meta, "iterator": it.get_state()})
        if c.train.max_steps and step >= c.train.max_steps:
          stop = True
          break
      bar.close()
      if pending is not None:
        last_loss = _report(pending, log, bar, window_tokens / max(time.time() - window_t0, 1e-9), c)
      if stop:
        if run.ckpt.latest_step() != step:
          run.ckpt.save(state, {**meta, "iterator": it.get_state()})
        print(f"stopped at train.max_steps={c.train.max_steps}", flush=True)
        break
      meta = {**meta, "epoch": epoch + 1, "iterator": None}
      epoch_tok_s = window_tokens / max(time.time() - window_t0, 1e-9)
      line = f"epoch {epoch + 1}: loss {last_loss:.4f}, {epoch_tok_s:,.0f} tokens/s"
      if window_tokens == 0:  # resumed from a checkpoint taken after the epoch's last step
        line = f"epoch {epoch + 1}: resumed after its last step"
      if (epoch + 1) % c.train.eval_every_epochs == 0 or epoch + 1 == c.train.num_epochs:
        valid = run.evaluate(state.params, "valid")
        log.write(step, {f"valid/{k}": v for k, v in valid.items()} | {"epoch": epoch + 1})
        line += ", valid " + " ".join(
          f"{k} {valid[k]:.4f}" for k in dict.fromkeys(("HR@10", "NDCG@10", metric)) if k in valid
        )
        meta["history"] = meta["history"] + [{"epoch": epoch + 1, "step": step, **valid}]
        if meta["best"] is None or valid[metric] > meta["best"][metric]:
          meta["best"] = {"epoch": epoch + 1, "step": step, **valid}
          meta["bad_evals"] = 0
          run.ckpt.save_best(step, state.params, meta["best"])
          line += " (best)"
        else:
          meta["bad_evals"] += 1
          if c.train.patience and meta["bad_evals"] >= c.train.patience:
            line += f"; early stop: no {metric} gain in {c.train.patience} validations"
            stop = True
      print(line, flush=True)
      run.ckpt.save(state, meta)
  finally:
    # An interrupted run still completes the checkpoint it was writing (a hard kill leaves the
    # previous one, which is just as exact a resume point).
    run.ckpt.wait()
    log.close()
  train_time = time.time() - t_start
  return _final_report(run, state, c, wd, train_time)


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
  test = run.evaluate(params, "test")
  record = {
    "name": c.name,
    "dataset": run.data.source,
    "recipe": {"stage": run.stage, "config": json.loads(c.to_json())},
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
  _atomic_write(wd / "results.json", text)
  if c.results_dir:
    _atomic_write(pathlib.Path(c.results_dir) / f"{c.name}.json", text)
  print(_format_metrics("valid", valid, run.metric_names))
  print(_format_metrics("test", test, run.metric_names))
  return record


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
