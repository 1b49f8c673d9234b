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
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recgpt_jax.parallel import mesh as mesh_lib
from recgpt_jax.parallel import topk, vocab
from recgpt_jax.train import losses, prompts, rows

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("items", "positions", "segments", "seq_ids", "users")


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
  """Which loss to train with; ``num_negatives`` is used by ``sampled_softmax``."""

  kind: str = "ce"
  num_negatives: int = 256
  head: str = "tied"  # which head scores items in the loss: 'tied' or 'untied'

  def __post_init__(self):
    if self.kind not in losses.LOSSES:
      raise ValueError(f"train.loss must be one of {losses.LOSSES}, got {self.kind!r}")


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
  """

  mode: str = "last"
  width: int = 1
  head: str = "tied"
  hard_negative_weight: float = 0.0
  source: str = "top"
  temperature: float = 1.0
  gen_dropout: bool = False
  aligned: bool = False


def _negatives(key: jax.Array, batch: Batch, loss_cfg: LossConfig, num_items: int) -> jax.Array | None:
  """Negatives of the sampled losses (they depend on no parameter, so they are drawn outside the gradient)."""
  if loss_cfg.kind == "bce":
    return losses.sample_negatives(key, batch["items"], batch["targets"], batch["seq_ids"], num_items)
  if loss_cfg.kind == "sampled_softmax":
    return jax.random.randint(key, (loss_cfg.num_negatives,), 1, num_items + 1, dtype=jnp.int32)
  return None


def _loss_from_hidden(model, hidden, batch: Batch, loss_cfg: LossConfig, mesh) -> jax.Array:
  targets = batch["targets"]
  table, bias = model.head_weights(loss_cfg.head)
  if loss_cfg.kind == "ce":
    if mesh is None:
      return losses.full_softmax_ce(model.logits(hidden, loss_cfg.head), targets)
    return vocab.sharded_softmax_ce(hidden, table, targets, mesh=mesh, num_valid=model.cfg.num_items + 1, bias_v=bias)
  if loss_cfg.kind == "bce":
    return losses.bce_loss(hidden, table, targets, batch["negatives"])
  return losses.sampled_softmax(hidden, table, targets, batch["negatives"])


def prompted_batch(gen_model, batch: Batch, prompt_cfg: PromptConfig, mesh=None) -> Batch:
  """Generates the prompts with ``gen_model`` (no dropout) and returns the prompted view as model inputs.

  Each column's candidate items are the top of its scores: over the whole table at once, or, with a
  ``mesh`` whose ``model`` axis splits the vocabulary, from the two-stage top-k over the sharded table
  (``recgpt_jax.parallel.topk``; no full score array then). The rare column whose candidates are all used
  is scored again on its own from the hidden states (``prompts.pick_from_candidates``).
  """
  hidden = gen_model(*(batch[k] for k in MODEL_INPUTS))  # the real view: true prefixes

  def column_scores(hidden_rd):
    return gen_model.logits(hidden_rd, prompt_cfg.head)

  if mesh is not None and mesh.shape["model"] > 1:
    rows, length, dim = hidden.shape
    table, bias = gen_model.head_weights(prompt_cfg.head)
    num_items = gen_model.cfg.num_items
    _, candidates = topk.sharded_top_k(
      hidden.reshape(rows * length, dim),
      table,
      min(prompts.NUM_CANDIDATES, num_items),
      mesh=mesh,
      bias_v=bias,
      num_valid=num_items + 1,
    )
    candidates = candidates.reshape(rows, length, -1)
  else:
    candidates = prompts.top_candidates(column_scores(hidden))
  picks = prompts.pick_from_candidates(candidates, batch, prompt_cfg.mode, prompt_cfg.width, hidden, column_scores)
  return {
    "items": prompts.fill_prompts(picks, batch),
    "positions": batch["p_positions"],
    "segments": batch["p_segments"],
    "seq_ids": batch["p_seq_ids"],
    "users": batch["users"],
    "targets": batch["p_targets"],
    "gen_col": batch["gen_col"],
    "gen_rank": batch["gen_rank"],
  }


def hard_negative_loss(model, hidden, prompted: Batch) -> jax.Array:
  """Mean ``softplus(s_shown - s_clicked)`` over prompt slots.

  A slot at column ``c`` with rank ``j`` holds an item the model showed after the real item at column
  ``c - 1 - j``, whose target is the item the user really clicked next.
  """
  rows = jnp.arange(hidden.shape[0])[:, None]
  slot = prompted["gen_col"] >= 0
  at = jnp.clip(jnp.arange(hidden.shape[1])[None, :] - 1 - prompted["gen_rank"], 0, hidden.shape[1] - 1)
  h = hidden[rows, at]  # [r, l, d] the hidden state that "showed" the slot's item
  clicked = prompted["targets"][rows, at]
  shown = prompted["items"]
  valid = slot & (clicked > 0) & (shown != clicked)
  table = model.item_table()
  margin = jnp.sum(h * (table[shown] - table[clicked]), axis=-1)
  weights = valid.astype(hidden.dtype)
  return jnp.sum(jax.nn.softplus(margin) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  loss_cfg: LossConfig,
  prompt_cfg: PromptConfig | None = None,
  mesh: jax.sharding.Mesh | None = None,
  *,
  adam: rows.AdamSpec | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns the pure (un-jitted) train step ``(state, batch) -> (state, metrics)``.

  Without ``prompt_cfg`` this is the pre-training step. With it, the step first generates the prompts
  from the *current* parameters (no gradient flows through generation) and trains on the prompted view.
  With ``mesh`` (axes ``data`` and ``model``), the full-softmax loss runs per vocabulary shard
  (``recgpt_jax.parallel.vocab``); without it, over the whole table on one device.

  With ``adam`` (the hyper-parameters of ``tx``, from ``optim.adam_spec``), tables the step only gathers
  (the user table; the item table under a sampled loss with the tied head) are differentiated and updated by
  the rows the batch uses (``recgpt_jax.train.rows``): the same optimizer step without a table-sized
  gradient. Without it, every parameter gets a dense gradient and ``tx`` alone updates them.
  """

  def train_step(state: TrainState, batch: Batch):
    with mesh_lib.kernel_mesh(mesh, nnx.merge(graphdef, state.params).cfg.attention_impl):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    drop_key, neg_key = jax.random.split(key)
    metrics = {}
    if prompt_cfg is not None:
      batch = prompted_batch(nnx.merge(graphdef, jax.lax.stop_gradient(state.params)), batch, prompt_cfg, mesh)
    cfg = nnx.merge(graphdef, state.params).cfg
    negatives = _negatives(neg_key, batch, loss_cfg, cfg.num_items)
    if negatives is not None:
      batch = {**batch, "negatives": negatives}
    tables = rows.row_tables(cfg.user_module, loss_cfg.kind, loss_cfg.head) if adam is not None else ()
    params, batch, ids = rows.take_rows(state.params, batch, tables)

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      hidden = model(*(batch[k] for k in MODEL_INPUTS), dropout_key=drop_key)
      loss = _loss_from_hidden(model, hidden, batch, loss_cfg, mesh)
      aux = {}
      if prompt_cfg is not None and prompt_cfg.hard_negative_weight > 0:
        aux["hard_negative_loss"] = hard_negative_loss(model, hidden, batch)
        loss = loss + prompt_cfg.hard_negative_weight * aux["hard_negative_loss"]
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
