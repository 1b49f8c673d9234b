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

from recgpt_jax.train import losses

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


def next_item_loss(model, batch: Batch, loss_cfg: LossConfig, key: jax.Array | None) -> jax.Array:
  """Mean next-item loss of ``model`` on a packed batch; ``key`` drives dropout and negatives."""
  drop_key, neg_key = jax.random.split(key) if key is not None else (None, jax.random.key(0))
  hidden = model(*(batch[k] for k in MODEL_INPUTS), dropout_key=drop_key)
  targets = batch["targets"]
  num_items = model.cfg.num_items
  if loss_cfg.kind == "ce":
    return losses.full_softmax_ce(model.logits(hidden, loss_cfg.head), targets)
  table = model.item_table() if loss_cfg.head == "tied" else model.head.kernel[...].T
  if loss_cfg.kind == "bce":
    negatives = losses.sample_negatives(neg_key, batch["items"], targets, batch["seq_ids"], num_items)
    return losses.bce_loss(hidden, table, targets, negatives)
  negatives = jax.random.randint(neg_key, (loss_cfg.num_negatives,), 1, num_items + 1, dtype=jnp.int32)
  return losses.sampled_softmax(hidden, table, targets, negatives)


def make_train_step(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: LossConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """Returns the pure (un-jitted) train step ``(state, batch) -> (state, metrics)``."""

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      return next_item_loss(nnx.merge(graphdef, params), batch, loss_cfg, key)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "tokens": jnp.sum(batch["targets"] > 0),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def jit_train_step(step_fn, state: TrainState, mesh: jax.sharding.Mesh, data_axis: str = "data"):
  """Jits ``step_fn`` once with explicit shardings: state replicated, batch split over ``data_axis``.

  The state argument is donated, so parameters and optimizer state are updated in place.
  """
  replicated = NamedSharding(mesh, P())
  state_sharding = jax.tree.map(lambda _: replicated, state)
  batch_sharding = NamedSharding(mesh, P(data_axis))
  return jax.jit(
    step_fn,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
