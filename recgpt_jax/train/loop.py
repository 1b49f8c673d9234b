"""Pre-training and evaluation runs: the outer loop around the jitted step.

Resume order (as in big_vision): the workdir's own latest checkpoint if there is one, else a fresh start.
The loop is exact on resume: the input pipeline's position, the step (from which every dropout and
negative-sampling key is folded) and the best-so-far metric are all part of the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from recgpt_jax import config as config_lib
from recgpt_jax import provenance
from recgpt_jax.data import io, packing, pipeline, split, store, tfds_builder
from recgpt_jax.errors import ConfigError, UserError
from recgpt_jax.eval import metrics as metrics_lib
from recgpt_jax.model import attention
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.parallel import distributed
from recgpt_jax.parallel import mesh as mesh_lib
from recgpt_jax.recall import decoder
from recgpt_jax.train import optim, stages
from recgpt_jax.train import step as step_lib
from recgpt_jax.train import workdir as workdir_lib
from recgpt_jax.train.checkpoint import RunCheckpoints

TRAIN_STAGES = tuple(stages.STAGES)


# Per-user test metrics of the selected model, beside results.json (and <results_dir>/<name>.<this>).
PER_USER_FILE = "test_per_user.npz"


# Evaluation of a finished workdir (--mode=evaluate): written beside the training record, never over it.
EVALUATION_FILE = "evaluation.json"
EVALUATION_PER_USER_FILE = "evaluation_test_per_user.npz"


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""

  exit_code = 3


class Preempted(UserError):
  """SIGTERM arrived (e.g. a preempted TPU VM): a checkpoint was saved and the run stopped."""

  exit_code = 143


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
    data: the loaded dataset, or the opened store (its index; the records stay on disk).
    train_input: packed training batches of the stage's view.
    eval_sets: ``'valid'`` / ``'test'`` -> the users, answers and histories of that split.
    eval_batches: ``'valid'`` / ``'test'`` -> packed evaluation batches (host arrays).
    item_counts: ``[num_items + 1]`` how often each item occurs in the training split (0 = padding).
  """

  data: io.SequenceData | store.Store
  train_input: pipeline.TrainInput
  eval_sets: dict[str, split.EvalSet]
  eval_batches: dict[str, list[dict[str, np.ndarray]]]
  item_counts: np.ndarray


def build_data(config: ml_collections.ConfigDict, stage: stages.Stage) -> RunData:
  """Loads the dataset (building its TFDS copy once) and lays out the stage's training and evaluation input.

  A store (``recgpt_jax.data.store``: a directory built from an interaction log) is not loaded: training reads the
  records of each process's rows as it goes, and evaluation reads its users' records.
  """
  c = config
  if store.is_store(c.dataset):
    if c.k_core or c.data_format != "auto":
      raise ConfigError(f"{c.dataset} is a store: k_core and data_format apply when it is built, not here")
    data = store.open_store(c.dataset)
    source = data.record_source()
  else:
    data = io.load_dataset(c.dataset, format=c.data_format, **({"k_core": c.k_core} if c.k_core else {}))
    if data.source in io.BUNDLED:
      if jax.process_count() > 1:  # process 0 builds the TFDS dataset (once); the others then read it
        from jax.experimental import multihost_utils

        if distributed.is_primary():
          tfds_builder.data_source(c.dataset, c.tfds_data_dir or None)
        multihost_utils.sync_global_devices("recgpt_jax: TFDS dataset built")
      records = tfds_builder.data_source(c.dataset, c.tfds_data_dir or None)[0]
      source = pipeline.ArraySource(*pipeline.read_source(records))
    else:
      source = pipeline.ArraySource.from_data(data)
  usable = np.flatnonzero(source.lengths >= split.MIN_ITEMS)  # record indices
  if not len(usable):
    raise UserError(f"{data.source}: no user has the {split.MIN_ITEMS} items the leave-one-out split needs")
  stage.check(c, data.num_items)
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
  # Evaluation users, in record order: all, or a fixed random sample of eval.max_users (the same in every process
  # and run).
  chosen = usable
  if 0 < c.eval.max_users < len(chosen):
    chosen = np.sort(np.random.default_rng(0).choice(chosen, c.eval.max_users, replace=False))
  items, lengths = source.gather(chosen)
  ends = np.cumsum(lengths)
  sequences = [items[a:b] for a, b in zip((ends - lengths).tolist(), ends.tolist(), strict=True)]
  eval_sets, eval_batches = {}, {}
  for name in split.STAGES:
    eval_sets[name] = split.make_eval_set(source.users[chosen], sequences, name, c.max_len)
    if not c.eval.get("exclude_history", True):  # nothing to exclude: every item is ranked
      empty = [np.zeros(0, np.int32)] * len(eval_sets[name].users)
      eval_sets[name] = dataclasses.replace(eval_sets[name], histories=empty)
    eval_batches[name] = packing.pack_eval_batches(
      eval_sets[name],
      row_len=c.train.row_len,
      rows_per_batch=c.eval.rows_per_batch,
      users_per_batch=c.eval.users_per_batch,
    )
  if isinstance(data, store.Store):
    item_counts = data.item_counts
  else:
    seen = [s[: -(split.MIN_ITEMS - 2)] for s in data.sequences if len(s) >= split.MIN_ITEMS]  # items[:-2]
    item_counts = np.bincount(np.concatenate(seen), minlength=data.num_items + 1).astype(np.int64)
    item_counts[0] = 0
  return RunData(data, train_input, eval_sets, eval_batches, item_counts)


class Run:
  """Everything built from a config: data, model, optimizer, step functions, checkpoints."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    stage: str = "pretrain",
    *,
    writer: bool = False,
  ):
    """Builds the run; checks nothing about the workdir and writes nothing to it (see ``recgpt_jax.train.workdir``).

    ``writer``: the run trains in its workdir (``train_and_evaluate``, under the workdir's lock); else its
    checkpoints are only read.
    """
    config_lib.validate(config)
    m = config.model
    attention.check_impl(
      m.attention, m.attention_impl, attn_dropout=m.attn_dropout, dtype=m.dtype, platform=jax.devices()[0].platform
    )
    self.config = config
    self.stage = stages.get(stage)
    self.workdir = pathlib.Path(workdir)
    self.writer = writer
    self._ckpt = None
    built = build_data(config, self.stage)
    self.data, self.train_input = built.data, built.train_input
    self.eval_sets, self.eval_batches, self.item_counts = built.eval_sets, built.eval_batches, built.item_counts
    self.prompt_cfg = self.stage.prompt_config(config)
    self.loss_targets_key = self.stage.targets_key
    self.mesh = mesh_lib.make_mesh(config.mesh)
    self._check_batch_sizes()
    self._build_state()
    self._build_steps()

  @property
  def ckpt(self) -> RunCheckpoints:
    """The workdir's checkpoints, opened on first use (for a writer: under the workdir's lock)."""
    if self._ckpt is None:
      self._ckpt = RunCheckpoints(self.workdir, keep=self.config.train.keep_checkpoints, writer=self.writer)
    return self._ckpt

  def _check_batch_sizes(self) -> None:
    c, data_size = self.config, self.mesh.shape["data"]
    for name, size in (
      ("train.rows_per_batch", c.train.rows_per_batch),
      ("eval.rows_per_batch", c.eval.rows_per_batch),
      ("eval.users_per_batch", c.eval.users_per_batch),
    ):
      if size % data_size:
        raise ConfigError(f"{name}={size} must be divisible by the mesh's data axis ({data_size} devices)")

  def _needs_counts(self) -> bool:
    """Whether the train step needs the training item counts (popularity prompts or negatives, in-batch logQ)."""
    popularity_prompts = self.prompt_cfg is not None and self.prompt_cfg.source == "popularity"
    return popularity_prompts or self.loss_cfg.needs_counts

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
      item_counts=self.item_counts if self._needs_counts() else None,
    )
    self.train_step = step_lib.jit_train_step(step_fn, self.state_sharding, self.mesh)
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self._eval_on_device: dict[str, list] = {}
    quotas = tuple(c.recall.quotas)
    self.ks = tuple(k for k in metrics_lib.KS if k <= sum(quotas))
    self.metric_names = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in self.ks)
    # Evaluation, recall and recommendations score items with eval.head (default: the head the loss trains).
    self.head = config_lib.eval_head(c)
    approx = c.eval.get("approx_recall", 0.0)
    recall_fn = decoder.make_recall_fn(self.graphdef, quotas, self.head, self.mesh, approx) if len(quotas) > 1 else None
    self.eval_step, self.eval_step_per_user = (
      metrics_lib.make_eval_step(
        self.graphdef,
        self.ks,
        self.head,
        recall_fn,
        self.mesh,
        self.state_sharding.params,
        per_user=per_user,
        approx_recall=approx,
      )
      for per_user in (False, True)
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
      if finished(meta, self.config):
        print(f"{self.workdir}: training finished ({finished(meta, self.config)}); evaluating its best model.")
      else:
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
    # A pre-trained model without the untied head may start a run that has one: the head starts as a copy
    # of the item table (so both heads score alike at step 0).
    _, add_head = workdir_lib.warm_start_config(str(src), json.loads(self.config.to_json()))
    target = {k: v for k, v in target_params.items() if k != "head"} if add_head else target_params
    ckpt = RunCheckpoints(src, keep=self.config.train.keep_checkpoints, writer=False)
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


def finished(meta: dict, c: ml_collections.ConfigDict) -> str:
  """Why a run whose progress record is ``meta`` has nothing left to train under ``c`` ('' if it has)."""
  if meta["epoch"] >= c.train.num_epochs:
    return f"all {c.train.num_epochs} epochs done"
  if c.train.patience and meta.get("bad_evals", 0) >= c.train.patience:
    return f"early stop: no {c.eval.metric} gain in {c.train.patience} validations"
  return ""


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
  parameters of ``config.init_from`` with a fresh optimizer; else a fresh initialisation. The workdir contract
  (``recgpt_jax.train.workdir``: one writer, same stage and config on resume) is checked before anything is
  written; SIGTERM saves a checkpoint at the next step and stops the run (exit code 143).

  Returns:
    The results record (also written to ``<workdir>/results.json``).
  """
  t_start = time.time()
  wd = pathlib.Path(workdir)
  config_json = json.loads(config.to_json())
  stages.get(stage)  # an unknown stage fails before the workdir is looked at
  config_lib.validate(config)
  # Checked before the data is loaded (a refused command costs nothing), and again under the lock.
  workdir_lib.check_stage(wd, stage, config.init_from)
  workdir_lib.check_resume(wd, config_json)
  if config.init_from and not workdir_lib.holds_checkpoints(wd):
    workdir_lib.warm_start_config(config.init_from, config_json)
  run = Run(config, wd, stage, writer=True)
  c = config
  primary = distributed.is_primary()  # one process writes the run's files; all write checkpoints
  with workdir_lib.open_for_training(wd, config_json, stage, c.init_from, primary):
    done_before = finished_run(run)
    if primary and not done_before:  # a finished run keeps the config and record it was trained with
      workdir_lib.record(wd, c.to_json(indent=2), stage, _atomic_write)
      run.data.save_id_maps(wd)  # raw <-> dense ids, when the data came from an interaction log
    with _sigterm_saves() as sigterm:
      state, meta = run.start()
      if _agreed(sigterm):
        raise Preempted(f"received SIGTERM before training started; run the same command to start {wd} again")
      state, meta = _train(run, state, meta, sigterm, primary)
    if _agreed(sigterm):  # arrived after the last check (the training is saved): the evaluation is left to a rerun
      raise Preempted(f"received SIGTERM after training; run the same command to evaluate {wd}")
    # The final evaluation is not interruptible by a save: a SIGTERM now ends the process, and the same command
    # evaluates again.
    return _final_report(run, state, c, wd, time.time() - t_start, evaluation=done_before)


def finished_run(run: Run) -> bool:
  """Whether the workdir holds a finished run that already wrote its results (a rerun only re-evaluates it)."""
  if not (run.workdir / "results.json").exists() or run.ckpt.latest_step() is None:
    return False
  _, meta = run.ckpt.restore(run.state)
  return bool(finished(meta, run.config))


def _train(run: Run, state, meta: dict, sigterm: threading.Event, primary: bool) -> tuple[Any, dict]:
  """Trains the epochs left (none for a finished run); returns the final state and progress record."""
  c, wd = run.config, run.workdir
  print(
    f"{run.data.source}: {len(run.data.users)} users, {run.data.num_items} items, "
    f"{run.train_input.num_tokens} train tokens/epoch, ~{run.steps_per_epoch} steps/epoch, "
    f"packing {run.packing_fraction:.1%} real positions"
    + (f", evaluating {len(run.eval_sets['valid'].users)} sampled users" if c.eval.max_users else ""),
    flush=True,
  )
  stop = bool(finished(meta, c)) or bool(c.train.max_steps and int(jax.device_get(state.step)) >= c.train.max_steps)
  # Opened only now, inside the try that closes it: a start that fails (e.g. a bad warm start) must not leave
  # a TensorBoard writer whose atexit hook prints a traceback after the one-line error (Python 3.12).
  log = MetricsLog(wd) if primary else NullLog()
  if meta["history"] == [meta["best"]] and meta["best"]["epoch"] == 0:  # a fresh warm start: log its epoch 0
    log.write(meta["best"]["step"], {f"valid/{k}": v for k, v in meta["best"].items() if k not in ("epoch", "step")})
  try:
    while meta["epoch"] < c.train.num_epochs and not stop:
      state, meta, stop = _train_epoch(run, state, meta, log, sigterm)
      if _agreed(sigterm):  # arrived at an epoch's last step or during validation: the epoch-end save is done
        run.ckpt.wait()
        step = int(jax.device_get(state.step))
        raise Preempted(f"received SIGTERM: saved step {step} in {wd}; run the same command to resume")
  finally:
    # An interrupted run still completes the checkpoint it was writing (a hard kill leaves the
    # previous one, which is just as exact a resume point).
    run.ckpt.wait()
    log.close()
  return state, meta


@contextlib.contextmanager
def _sigterm_saves():
  """While training, SIGTERM sets an event that the loop answers by saving a checkpoint and stopping."""
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
    yield event
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
  try:
    yield event
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# In a multi-process run the processes agree on a SIGTERM (which may reach only some of them) every this many steps.
SIGTERM_POLL_STEPS = 10


def _agreed(sigterm: threading.Event) -> bool:
  """Whether any process received SIGTERM (every process must call this at the same point of the loop)."""
  if jax.process_count() == 1:
    return sigterm.is_set()
  from jax.experimental import multihost_utils

  return bool(np.max(multihost_utils.process_allgather(np.int32(sigterm.is_set()))))


def _train_epoch(run: Run, state, meta: dict, log, sigterm: threading.Event) -> tuple[Any, dict, bool]:
  """Trains the epoch ``meta['epoch']`` (from its saved iterator position), validates, checkpoints.

  Returns:
    ``(state, meta, stop)``: ``stop`` when ``train.max_steps`` is reached or early stopping triggers.
  """
  c = run.config
  epoch = meta["epoch"]
  step = int(jax.device_get(state.step))
  it = run.train_input.epoch_iterator(epoch)
  # Batches of this epoch done so far (None: resumed from a record that predates the count).
  epoch_step = 0
  if meta["iterator"] is not None:
    it.set_state(meta["iterator"])
    epoch_step = meta.get("epoch_step")
  epoch_steps = run.train_input.steps_per_epoch(epoch)
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
    epoch_step = None if epoch_step is None else epoch_step + 1
    if pending is not None:
      last_loss = report()
    pending = (step, out)
    bar.update(1)
    # The epoch's last step (and a max_steps stop) is saved with its end-of-epoch (validated) record below: one
    # checkpoint per step, and Orbax does not save a step twice.
    last = epoch_step == epoch_steps or bool(c.train.max_steps and step >= c.train.max_steps)
    poll = jax.process_count() == 1 or step % SIGTERM_POLL_STEPS == 0
    if last:
      pass  # a SIGTERM is answered after the epoch's end (train_and_evaluate)
    elif poll and _agreed(sigterm):
      last_loss, pending = report(), None
      run.ckpt.save(state, {**meta, "iterator": it.get_state(), "epoch_step": epoch_step})
      run.ckpt.wait()
      bar.close()
      raise Preempted(f"received SIGTERM: saved step {step} in {run.workdir}; run the same command to resume")
    if step % c.train.checkpoint_every_steps == 0 and not last:
      # Check this step's loss before saving it, so a diverged state is never checkpointed.
      last_loss, pending = report(), None
      run.ckpt.save(state, {**meta, "iterator": it.get_state(), "epoch_step": epoch_step})
    if c.train.max_steps and step >= c.train.max_steps:
      break
  bar.close()
  if pending is not None:
    last_loss = report()
  if c.train.max_steps and step >= c.train.max_steps:
    # The state trained so far is a candidate too (else a warm-started stage would report its starting model).
    meta, _, note = _validate(run, state, meta, log)
    if run.ckpt.latest_step() != step:
      run.ckpt.save(state, {**meta, "iterator": it.get_state(), "epoch_step": epoch_step})
    print(f"stopped at train.max_steps={c.train.max_steps}{note}", flush=True)
    return state, meta, True
  meta = {**meta, "epoch": epoch + 1, "iterator": None, "epoch_step": 0}
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


def _final_report(
  run: Run, state, c, wd: pathlib.Path, wall_time: float | None, command: str | None = None, *, evaluation: bool = False
):
  """Evaluates the best model (or the last one if none was selected) on valid and test; writes results.

  The training run's record is ``results.json``; ``evaluation=True`` (``--mode=evaluate``) writes
  ``evaluation.json`` beside it instead (and ``<results_dir>/<name>.evaluation.json``), never over it.
  """
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
    "recipe": {"stage": _recorded_stage(wd) if evaluation else run.stage.name, "config": json.loads(c.to_json())},
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
  record_file, per_user_file = (
    (EVALUATION_FILE, EVALUATION_PER_USER_FILE) if evaluation else ("results.json", PER_USER_FILE)
  )
  _save_per_user(wd / per_user_file, per_user)
  _atomic_write(wd / record_file, text)
  if c.results_dir:
    kind = ".evaluation" if evaluation else ""
    _save_per_user(pathlib.Path(c.results_dir) / f"{c.name}{kind}.{PER_USER_FILE}", per_user)
    _atomic_write(pathlib.Path(c.results_dir) / f"{c.name}{kind}.json", text)
    print(f"wrote {pathlib.Path(c.results_dir) / f'{c.name}{kind}.json'}")
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


def _recorded_stage(wd: pathlib.Path) -> str | None:
  record = workdir_lib.read_json(wd / workdir_lib.RUN_FILE, "the workdir's stage record")
  return None if record is None else record.get("stage")


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the workdir's best (else latest) model on valid and test without training.

  Writes ``evaluation.json`` beside the training run's ``results.json`` (which stays as it is).
  """
  wd = pathlib.Path(workdir)
  primary = distributed.is_primary()
  # Checked before anything is built: a missing workdir is reported, never created.
  workdir_lib.check_readable(wd, "--mode=evaluate")
  workdir_lib.check_model_compatible(wd, json.loads(config.to_json()))
  run = Run(config, wd, writer=False)
  with workdir_lib.open_for_reading(wd, "--mode=evaluate", primary):
    state = run.state
    if not run.ckpt.has_best():
      state, _ = run.ckpt.restore(state)
    return _final_report(run, state, config, wd, None, evaluation=True)
