"""The jitted train steps: prompt generation inside the step uses current parameters and no gradient."""

import jax
import numpy as np
import pytest
from flax import nnx

from recgpt_jax.config import base_config
from recgpt_jax.data import pipeline, tfds_builder
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.train import optim
from recgpt_jax.train import step as step_lib


def _setup(mode, width):
  rng = np.random.default_rng(0)
  seqs = [rng.choice(np.arange(1, 81), size=rng.integers(5, 15), replace=False) for _ in range(30)]
  source = tfds_builder.InMemorySource(np.arange(1, 31), seqs)
  ti = pipeline.TrainInput(
    source, max_len=12, row_len=24, rows_per_batch=4, seed=0, prompt_mode=mode, prompt_width=width
  )
  batch = next(iter(ti.epoch_iterator(0)))
  cfg = ModelConfig(num_items=80, num_users=30, max_len=24, hidden=16, num_layers=1, num_heads=2, ffn=32)
  opt = base_config().optimizer
  tx = optim.make_optimizer(opt, 10)
  graphdef, state = step_lib.init_state(RecGPT(cfg, rngs=nnx.Rngs(0)), tx, 0)
  return graphdef, tx, state, batch


@pytest.mark.parametrize(("mode", "width"), [("last", 1), ("interleave", 2)])
def test_prompt_step_equals_plain_step_on_pregenerated_prompts(mode, width):
  graphdef, tx, state, batch = _setup(mode, width)
  loss_cfg = step_lib.LossConfig(kind="ce")
  prompt_cfg = step_lib.PromptConfig(mode=mode, width=width)
  # Prompts generated outside the step from the same (current) parameters, then a plain step on them.
  prompted = step_lib.prompted_batch(nnx.merge(graphdef, state.params), batch, prompt_cfg)
  plain = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg))
  inside = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, prompt_cfg))
  state_a, metrics_a = plain(state, prompted)
  state_b, metrics_b = inside(state, batch)
  # Equal updates mean the step generated from the current parameters and no gradient flowed through
  # generation (a gradient through the prompt scores would change the update).
  np.testing.assert_allclose(float(metrics_a["loss"]), float(metrics_b["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_hard_negative_term_changes_the_update():
  graphdef, tx, state, batch = _setup("last", 1)
  loss_cfg = step_lib.LossConfig(kind="ce")
  plain = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, step_lib.PromptConfig()))
  hard = jax.jit(step_lib.make_train_step(graphdef, tx, loss_cfg, step_lib.PromptConfig(hard_negative_weight=1.0)))
  (_, m_plain), (_, m_hard) = plain(state, batch), hard(state, batch)
  assert float(m_hard["hard_negative_loss"]) > 0
  np.testing.assert_allclose(
    float(m_hard["loss"]), float(m_plain["loss"]) + float(m_hard["hard_negative_loss"]), rtol=1e-5
  )
