"""The reference configuration the speed benchmarks share, and its jitted JAX training steps.

Hidden 256, 1 layer, 2 heads, FFN 512, flow attention, post-norm, user module, length 50 (the reference
code's Beauty setup); training batches of 30 packed rows of 50 (about 256 Beauty users). Pre-training:
BCE with one negative, dropout 0.5 (attention) / 0.1 (hidden); prompt-tuning: full-softmax CE, prompts
``last`` with ``w = 1``, dropout 0.1 / 0.1. Used by ``bench_train.py``, ``bench_torch.py`` and
``profile_train_step.py``.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from recgpt_jax.data import pipeline
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.train import optim
from recgpt_jax.train import step as step_lib

MAX_LEN = 50
ROW_LEN = 50
TRAIN_ROWS = 30
TRAINING_PARTS = ("pretrain", "prompt_tune")


def model_config(
  data, part: str, *, dropout: bool = True, hidden: int = 256, ffn: int = 512, heads: int = 2
) -> ModelConfig:
  """The model of ``part`` (``pretrain``, ``prompt_tune``, or an inference part: no dropout)."""
  training = dropout and part in TRAINING_PARTS
  return ModelConfig(
    num_items=data.num_items,
    num_users=data.num_users,
    max_len=MAX_LEN,
    hidden=hidden,
    num_layers=1,
    num_heads=heads,
    ffn=ffn,
    attention="flow",
    norm="post",
    attn_dropout=(0.1 if part == "prompt_tune" else 0.5) if training else 0.0,
    hidden_dropout=0.1 if training else 0.0,
    user_module=True,
  )


def train_batches(
  source, part: str, n: int, *, row_len: int = ROW_LEN, rows_per_batch: int = TRAIN_ROWS
) -> list[dict[str, np.ndarray]]:
  """The first ``n`` packed training batches of epoch 0 (with the prompt layout for ``prompt_tune``)."""
  it = pipeline.TrainInput(
    source,
    max_len=MAX_LEN,
    row_len=row_len,
    rows_per_batch=rows_per_batch,
    seed=0,
    prompt_mode="last" if part == "prompt_tune" else None,
    prompt_width=1,
  ).epoch_iterator(0)
  return [next(it) for _ in range(n)]


def loss_and_prompt(part: str) -> tuple[step_lib.LossConfig, step_lib.PromptConfig | None]:
  if part == "prompt_tune":
    return step_lib.LossConfig(kind="ce"), step_lib.PromptConfig(mode="last", width=1)
  return step_lib.LossConfig(kind="bce"), None


def jit_step(
  step_fn, state: step_lib.TrainState, devices: list | None = None
) -> tuple[jax.stages.Wrapped, step_lib.TrainState]:
  """``step_fn`` jitted as the training loop does (state replicated and donated, batch rows over ``data``)."""
  devices = devices or jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  replicated = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), state)
  # Committed to its sharding now: an uncommitted fresh state would make the second call (fed the first call's
  # committed output) compile the step a second time.
  return step_lib.jit_train_step(step_fn, replicated, mesh), jax.device_put(state, replicated)


def train_step(
  mcfg: ModelConfig,
  part: str,
  optimizer_cfg: ml_collections.ConfigDict,
  *,
  tx: optax.GradientTransformation | None = None,
  row_sparse: bool = True,
  devices: list | None = None,
) -> tuple[jax.stages.Wrapped, step_lib.TrainState, nnx.GraphDef]:
  """The jitted training step of ``part`` with a fresh state (seed 0), row-sparse tables as the loop uses.

  Returns:
    ``(step, state, graphdef)``.
  """
  tx = tx or optim.make_optimizer(optimizer_cfg, 1000)
  graphdef, state = step_lib.init_state(RecGPT(mcfg, rngs=nnx.Rngs(0)), tx, 0)
  loss_cfg, prompt_cfg = loss_and_prompt(part)
  adam = optim.adam_spec(optimizer_cfg, 1000) if row_sparse else None
  step, state = jit_step(step_lib.make_train_step(graphdef, tx, loss_cfg, prompt_cfg, adam=adam), state, devices)
  return step, state, graphdef
