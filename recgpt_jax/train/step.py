"""The pure pre-training step and the train state it threads.

The step is a function of ``(state, batch)`` only, jitted once with explicit shardings and the state
donated; Python never runs per token. The model is rebuilt from its graph definition and a plain dict of
parameters inside the trace (``nnx.merge``), so the per-step path has no NNX object overhead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recgpt_jax.parallel import mesh as mesh_lib
from recgpt_jax.parallel import topk, vocab
from recgpt_jax.train import blocked_ce, losses, prompts, rows

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("items", "positions", "segments", "seq_ids", "users")
# Folded into a step's key for the randomness of prompt generation, leaving the dropout and negative keys
# split from that key as they are in a step without prompts.
GEN_KEY_SALT = 0x9E6
# Folded into the dropout key for the second view of the contrastive term (``LossConfig.cl_weight``).
CL_KEY_SALT = 0xC1


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs from the device: a pytree of arrays.

  Attributes:
    step: scalar int32, number of optimizer steps taken.
    params: plain nested dict of model parameters (``nnx.to_pure_dict`` layout).
    opt_state: optax state.
    rng: raw ``uint32[2]`` key data; dropout and negative keys are folded from it with the step.
  """

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which loss to train with; ``num_negatives`` is used by ``sampled_softmax``.

  ``user_l2`` adds ``user_l2 * mean ||u||^2`` over the batch's real tokens of their user vectors ``u`` (the user
  module's rows; a Gaussian prior on each row, weighted by the user's tokens).

  ``cl_weight`` adds ``cl_weight *`` a contrastive term between two dropout views of the batch
  (``losses.view_contrastive`` at ``cl_temperature``): a second forward pass with another dropout key.
  """

  kind: str = "ce"
  num_negatives: int = 256
  head: str = "tied"  # which head scores items in the loss: 'tied' or 'untied'
  user_l2: float = 0.0
  ce_block: int = 0  # ce: item rows per block of the blocked loss (0 = materialised logits)
  negatives: str = "uniform"  # sampled_softmax: losses.NEGATIVES
  logq: bool = True  # sampled_softmax: correct each negative's logit by log of its expected count
  cl_weight: float = 0.0  # weight of the two-view contrastive term (0 = off)
  cl_temperature: float = 1.0

  @property
  def needs_counts(self) -> bool:
    """Whether the loss needs the training item counts (popularity draws, or the in-batch logQ correction)."""
    return self.kind == "sampled_softmax" and (
      self.negatives == "popularity" or (self.logq and self.negatives in ("in_batch", "mixed"))
    )

  def __post_init__(self):
    if self.kind not in losses.LOSSES:
      raise ValueError(f"train.loss must be one of {losses.LOSSES}, got {self.kind!r}")
    if self.user_l2 < 0:
      raise ValueError(f"train.user_l2 must be >= 0, got {self.user_l2}")
    if self.ce_block < 0:
      raise ValueError(f"train.ce_block must be >= 0, got {self.ce_block}")
    if self.negatives not in losses.NEGATIVES:
      raise ValueError(f"train.negatives must be one of {losses.NEGATIVES}, got {self.negatives!r}")
    if self.cl_weight < 0 or self.cl_temperature <= 0:
      raise ValueError(
        f"train.cl_weight must be >= 0 and train.cl_temperature > 0, got {self.cl_weight} and {self.cl_temperature}"
      )

  @classmethod
  def from_config(cls, train) -> LossConfig:
    """The loss of a config's ``train`` section."""
    return cls(
      kind=train.loss,
      num_negatives=train.num_negatives,
      head=train.head,
      user_l2=train.user_l2,
      ce_block=train.get("ce_block", 0),
      negatives=train.get("negatives", "uniform"),
      logq=train.get("logq", True),
      cl_weight=train.get("cl_weight", 0.0),
      cl_temperature=train.get("cl_temperature", 1.0),
    )


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` into its graph definition and a fresh train state."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  return graphdef, TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Prompt-tuning: how generated prompts are laid out, chosen and used in the loss.

  Attributes:
    mode: ``'last'`` or ``'interleave'`` (see ``recgpt_jax.data.prompts``).
    width: prompt width ``w``.
    head: head whose scores choose the generated items: ``'tied'`` or ``'untied'``.
    hard_negative_weight: weight of an extra pairwise loss that ranks the real next item above the
      generated-but-not-clicked item shown before it (0 = off, the paper's loss).
    source: where generated items come from: 'top', 'sample', 'uniform' or 'popularity'.
    temperature: softmax temperature of ``source='sample'``.
    gen_dropout: generate with dropout on (the authors' behaviour).
    aligned: train the position holding a shown prompt on the feedback item, the shown item excluded.
    aligned_top: with ``aligned``, also exclude the generating column's ``aligned_top`` best items (the first
      recall step's list; ``prompts.exclude_first_list``).
  """

  mode: str = "last"
  width: int = 1
  head: str = "tied"
  hard_negative_weight: float = 0.0
  source: str = "top"
  temperature: float = 1.0
  gen_dropout: bool = False
  aligned: bool = False
  aligned_top: int = 0
  approx_recall: float = 0.0


def _negatives(key: jax.Array, batch: Batch, loss_cfg: LossConfig, num_items: int, item_counts) -> Batch:
  """``batch`` with the sampled losses' negatives (they depend on no parameter, so they are drawn outside the
  gradient) and, for ``sampled_softmax`` with ``logq``, their log expected counts (from global ids: before the
  row-sparse renumbering)."""
  if loss_cfg.kind == "bce":
    return {
      **batch,
      "negatives": losses.sample_negatives(key, batch["items"], batch["targets"], batch["seq_ids"], num_items),
    }
  if loss_cfg.kind != "sampled_softmax":
    return batch
  args = (loss_cfg.negatives, loss_cfg.num_negatives, num_items, batch["targets"], item_counts)
  negatives = losses.draw_negatives(key, *args)
  batch = {**batch, "negatives": negatives}
  if loss_cfg.logq:
    batch["negatives_log_count"] = losses.negative_log_counts(negatives, *args)
  return batch


def _loss_from_hidden(model, hidden, batch: Batch, loss_cfg: LossConfig, mesh) -> jax.Array:
  """The training loss of ``batch``'s targets, each position's ``exclude`` items (if any) out of its softmax."""
  targets, exclude = batch["targets"], batch.get("exclude")
  table, bias = model.head_weights(loss_cfg.head)
  if loss_cfg.kind == "ce":
    num_valid = model.cfg.num_items + 1
    if mesh is not None:
      return vocab.sharded_softmax_ce(
        hidden,
        table,
        targets,
        mesh=mesh,
        num_valid=num_valid,
        bias_v=bias,
        exclude_rle=exclude,
        block=loss_cfg.ce_block,
      )
    if loss_cfg.ce_block:
      return blocked_ce.blocked_softmax_ce(
        hidden, table, targets, block=loss_cfg.ce_block, num_valid=num_valid, bias_v=bias, exclude_rle=exclude
      )
    return losses.full_softmax_ce(model.logits(hidden, loss_cfg.head), targets, exclude)
  if loss_cfg.kind == "bce":
    return losses.bce_loss(hidden, table, targets, batch["negatives"], exclude)
  return losses.sampled_softmax(hidden, table, targets, batch["negatives"], exclude, batch.get("negatives_log_count"))


def prompted_batch(
  gen_model,
  batch: Batch,
  prompt_cfg: PromptConfig,
  mesh=None,
  *,
  key: jax.Array | None = None,
  item_counts: jax.Array | None = None,
) -> Batch:
  """Generates the prompts with ``gen_model`` and returns the prompted view as model inputs and targets.

  Candidates per column (``recgpt_jax.train.prompts``, ``prompt_cfg.source``):

  * ``'top'``: the top of the model's scores on the real view, over the whole table at once or, with a
    ``mesh`` whose ``model`` axis splits the vocabulary, from the two-stage top-k over the sharded table
    (``recgpt_jax.parallel.topk``; no full score array then);
  * ``'sample'``: the same with ``temperature * Gumbel`` noise added to the scores (per vocabulary shard on
    a sharded mesh: the noise is split like the scores);
  * ``'uniform'``, ``'popularity'``: drawn from fixed item weights, with no forward pass (same code on any
    mesh); a user whose prefix holds every item of positive weight gets the padding item 0, as ``'top'``
    does when a prefix holds the whole catalogue.

  The rare column whose candidates are all used is ranked again on its own (``prompts.pick_from_candidates``).

  Args:
    gen_model: the model generating the prompts (current parameters; the caller stops the gradient).
    batch: the prompt-tuning batch (``recgpt_jax.data.prompts.finish_prompt_batch``).
    prompt_cfg: the prompt configuration.
    mesh: optional ``('data', 'model')`` mesh; a ``model`` axis of size > 1 splits the vocabulary.
    key: randomness of generation (Gumbel noise, draws, generation dropout); required unless
      ``source='top'`` without ``gen_dropout``, which use no randomness.
    item_counts: ``[num_items + 1]`` training-set count of every item id (index 0 = padding), required by
      ``source='popularity'``.

  Returns:
    The model inputs of the prompted view, its ``targets`` and the slot layout (``gen_col``, ``gen_rank``);
    with ``prompt_cfg.aligned``, the aligned targets, each slot's ``feedback`` (``prompts.feedback``) and the
    per-position ``exclude`` items ``[rows, len, picks]`` of the loss (``prompts.aligned_targets``).
  """
  source = prompt_cfg.source
  if source not in prompts.SOURCES:
    raise ValueError(f"prompt.source must be one of {prompts.SOURCES}, got {source!r}")
  if key is None and (source != "top" or prompt_cfg.gen_dropout):
    raise ValueError(f"prompt.source={source!r} with gen_dropout={prompt_cfg.gen_dropout} needs a random key")
  noise_key, fallback_key, dropout_key = (None,) * 3 if key is None else jax.random.split(key, 3)
  rows, length = batch["items"].shape
  num_items, vocab_size = gen_model.cfg.num_items, gen_model.cfg.vocab_size
  if source in prompts.MODEL_FREE_SOURCES:
    weights = prompts.item_weights(source, num_items, item_counts)
    candidates = prompts.drawn_candidates(noise_key, weights, (rows, length))
    columns = None

    def column_scores(_, t):
      return prompts.log_weights(weights)[None, :] + prompts.column_noise(fallback_key, t, (rows, num_items + 1))

  else:
    drop = dropout_key if prompt_cfg.gen_dropout else None
    columns = gen_model(*(batch[k] for k in MODEL_INPUTS), dropout_key=drop)  # the real view: true prefixes
    noise_scale = prompt_cfg.temperature if source == "sample" else None

    def column_scores(hidden_rd, t):
      scores = gen_model.logits(hidden_rd, prompt_cfg.head)
      if noise_scale is None:
        return scores
      return scores + noise_scale * prompts.column_noise(noise_key, t, scores.shape)

    noise = None if noise_scale is None else noise_scale * prompts.gumbel_noise(noise_key, rows, length, vocab_size)
    if mesh is not None and mesh.shape["model"] > 1:
      table, bias = gen_model.head_weights(prompt_cfg.head)
      _, candidates = topk.sharded_top_k(
        columns.reshape(rows * length, -1),
        table,
        min(prompts.NUM_CANDIDATES, num_items),
        mesh=mesh,
        bias_v=bias,
        num_valid=num_items + 1,
        noise_uv=None if noise is None else noise.reshape(rows * length, vocab_size),
        approx_recall=prompt_cfg.approx_recall,
      )
      candidates = candidates.reshape(rows, length, -1)
    else:
      scores = gen_model.logits(columns, prompt_cfg.head)
      candidates = prompts.top_candidates(scores if noise is None else scores + noise, prompt_cfg.approx_recall)
  picks = prompts.pick_from_candidates(candidates, batch, prompt_cfg.mode, prompt_cfg.width, columns, column_scores)
  out = {
    "items": prompts.fill_prompts(picks, batch),
    "positions": batch["p_positions"],
    "segments": batch["p_segments"],
    "seq_ids": batch["p_seq_ids"],
    "users": batch["users"],
    "targets": batch["p_targets"],
    "gen_col": batch["gen_col"],
    "gen_rank": batch["gen_rank"],
  }
  if prompt_cfg.aligned:
    out["feedback"] = prompts.feedback(batch)
    out["targets"], out["exclude"] = prompts.aligned_targets(picks, batch, out["feedback"])
    if prompt_cfg.aligned_top:
      if source != "top" or prompt_cfg.aligned_top > candidates.shape[-1]:
        raise ValueError(
          f"prompt.aligned_top needs prompt.source='top' and at most {candidates.shape[-1]} items,"
          f" got {source!r} and {prompt_cfg.aligned_top}"
        )
      out["targets"], out["exclude"] = prompts.exclude_first_list(
        out["targets"], out["exclude"], candidates, batch, prompt_cfg.aligned_top
      )
  return out


def hard_negative_loss(model, hidden, prompted: Batch) -> jax.Array:
  """Mean ``softplus(s_shown - s_clicked)`` over prompt slots.

  A slot at column ``c`` with rank ``j`` holds an item the model showed after the token at column
  ``c - 1 - j`` (the position before its prompt group), where the user really clicked the target of that
  token: the slot's feedback (``prompts.feedback``), read from the batch under aligned prompting, whose
  slot targets are no longer the paper's. Slots whose showing position is outside their user's prompted
  window (cut off by ``max_len``: it would be another user's token) are skipped.
  """
  rows = jnp.arange(hidden.shape[0])[:, None]
  slot = prompted["gen_col"] >= 0
  at = jnp.clip(jnp.arange(hidden.shape[1])[None, :] - 1 - prompted["gen_rank"], 0, hidden.shape[1] - 1)
  h = hidden[rows, at]  # [r, l, d] the hidden state that "showed" the slot's item
  clicked = prompted["feedback"] if "feedback" in prompted else prompted["targets"][rows, at]
  shown = prompted["items"]
  in_window = prompted["positions"] - 1 - prompted["gen_rank"] >= 0
  valid = slot & in_window & (clicked > 0) & (shown != clicked)
  table = model.item_table()
  margin = jnp.sum(h * (table[shown] - table[clicked]), axis=-1)
  weights = valid.astype(hidden.dtype)
  return jnp.sum(jax.nn.softplus(margin) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def user_norm_penalty(table: jax.Array, users: jax.Array, real: jax.Array) -> jax.Array:
  """Mean squared norm of the user vectors of the real tokens (``users`` indexes ``table``)."""
  sq = jnp.sum(jnp.square(table[users].astype(jnp.float32)), axis=-1)
  weights = real.astype(jnp.float32)
  return jnp.sum(sq * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  loss_cfg: LossConfig,
  prompt_cfg: PromptConfig | None = None,
  mesh: jax.sharding.Mesh | None = None,
  *,
  adam: rows.AdamSpec | None = None,
  item_counts: np.ndarray | jax.Array | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns the pure (un-jitted) train step ``(state, batch) -> (state, metrics)``.

  Without ``prompt_cfg`` this is the pre-training step. With it, the step first generates the prompts
  from the *current* parameters (no gradient flows through generation; ``prompted_batch``, its randomness
  from the step's key folded with ``GEN_KEY_SALT``, so the dropout and negative keys are those of a step
  without prompts) and trains on the prompted view. ``item_counts`` (``[num_items + 1]`` training-set
  counts, index 0 = padding) is required by ``prompt_cfg.source='popularity'`` and unused otherwise.
  With ``mesh`` (axes ``data`` and ``model``), the full-softmax loss runs per vocabulary shard
  (``recgpt_jax.parallel.vocab``); without it, over the whole table on one device.

  With ``adam`` (the hyper-parameters of ``tx``, from ``optim.adam_spec``), tables the step only gathers
  (the user table; the item table under a sampled loss with the tied head) are differentiated and updated by
  the rows the batch uses (``recgpt_jax.train.rows``): the same optimizer step without a table-sized
  gradient. Without it, every parameter gets a dense gradient and ``tx`` alone updates them.
  """

  if loss_cfg.needs_counts:
    item_counts = _checked_counts(item_counts, f"train.negatives={loss_cfg.negatives!r}")
  elif prompt_cfg is not None and prompt_cfg.source == "popularity":
    item_counts = _checked_counts(item_counts, "prompt.source='popularity'")
  loss_counts = item_counts if loss_cfg.needs_counts else None

  def train_step(state: TrainState, batch: Batch):
    with mesh_lib.kernel_mesh(mesh, nnx.merge(graphdef, state.params).cfg.attention_impl):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    drop_key, neg_key = jax.random.split(key)
    metrics = {}
    if prompt_cfg is not None:
      gen_model = nnx.merge(graphdef, jax.lax.stop_gradient(state.params))
      gen_key = jax.random.fold_in(key, GEN_KEY_SALT)
      batch = prompted_batch(gen_model, batch, prompt_cfg, mesh, key=gen_key, item_counts=item_counts)
    cfg = nnx.merge(graphdef, state.params).cfg
    batch = _negatives(neg_key, batch, loss_cfg, cfg.num_items, loss_counts)
    tables = _row_tables(cfg.user_module, loss_cfg) if adam is not None else ()
    params, batch, ids = rows.take_rows(state.params, batch, tables)

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      hidden = model(*(batch[k] for k in MODEL_INPUTS), dropout_key=drop_key)
      loss = _loss_from_hidden(model, hidden, batch, loss_cfg, mesh)
      aux = {}
      if prompt_cfg is not None and prompt_cfg.hard_negative_weight > 0:
        aux["hard_negative_loss"] = hard_negative_loss(model, hidden, batch)
        loss = loss + prompt_cfg.hard_negative_weight * aux["hard_negative_loss"]
      if loss_cfg.user_l2 > 0 and model.user_embed is not None:
        aux["user_l2"] = user_norm_penalty(params["user_embed"]["embedding"], batch["users"], batch["seq_ids"] > 0)
        loss = loss + loss_cfg.user_l2 * aux["user_l2"]
      if loss_cfg.cl_weight > 0:
        view = model(*(batch[k] for k in MODEL_INPUTS), dropout_key=jax.random.fold_in(drop_key, CL_KEY_SALT))
        real = batch["targets"] > 0
        aux["contrastive_loss"] = losses.view_contrastive(hidden, view, batch["seq_ids"], real, loss_cfg.cl_temperature)
        loss = loss + loss_cfg.cl_weight * aux["contrastive_loss"]
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if tables:
      params, opt_state = rows.apply_updates(tx, adam, grads, state.opt_state, state.params, tables, ids)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics |= aux | {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),  # the tables' rows are unique, so this is the dense norm
      "tokens": jnp.sum(batch["targets"] > 0),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _checked_counts(item_counts, user: str) -> np.ndarray:
  """``item_counts`` (needed by ``user``, a setting) as an int32 host array, checked."""
  if item_counts is None:
    raise ValueError(f"{user} needs item_counts: make_train_step(..., item_counts=counts)")
  counts = np.asarray(item_counts)
  total = int(counts[1:].sum(dtype=np.int64)) if counts.ndim == 1 else 0
  if counts.ndim != 1 or (counts < 0).any() or not 0 < total < 2**31:
    raise ValueError(
      f"item_counts must be a [num_items + 1] vector of counts >= 0 with 0 < sum < 2**31, got shape {counts.shape},"
      f" sum {total}"
    )
  return counts.astype(np.int32)


def _row_tables(user_module: bool, loss_cfg: LossConfig) -> tuple[rows.RowTable, ...]:
  """``rows.row_tables``, the item table also indexed by the prompted batch's ``feedback`` and ``exclude``
  ids (the hard-negative term and the excluded items of the loss compare and gather them as item rows)."""
  tables = rows.row_tables(user_module, loss_cfg.kind, loss_cfg.head)
  return tuple(rows.RowTable(t.path, (*t.keys, "feedback", "exclude")) if t == rows.ITEM_TABLE else t for t in tables)


def state_specs(state: TrainState, tx: optax.GradientTransformation, param_specs: dict) -> TrainState:
  """``PartitionSpec`` of every leaf of ``state``: parameters and their optimizer moments as ``param_specs``,
  everything else (step, RNG, counters) replicated."""
  opt_specs = optax.tree_map_params(
    tx,
    lambda _, spec: spec,
    state.opt_state,
    param_specs,
    transform_non_params=lambda _: P(),
    is_leaf=lambda x: isinstance(x, P),
  )
  return TrainState(step=P(), params=param_specs, opt_state=opt_specs, rng=P())


def jit_train_step(step_fn, state_sharding: TrainState, mesh: jax.sharding.Mesh, data_axis: str = "data"):
  """Jits ``step_fn`` once with explicit shardings: the state as ``state_sharding``, the batch split over
  ``data_axis`` (rows), metrics replicated.

  The state argument is donated, so parameters and optimizer state are updated in place.
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(data_axis))
  return jax.jit(
    step_fn,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
