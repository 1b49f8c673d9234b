"""Mixed precision: bfloat16 activations against float32, with float32 parameters, statistics and scores.

Tolerances are stated against bfloat16's 8-bit mantissa (relative rounding 2**-9 = 0.2% per operation) and set
at about twice what was measured (2026-12-01, this CPU): the LayerNorm-scaled hidden states of a 2-layer model
agree with float32 to 0.08 at worst and 0.01 on average (measured 0.03-0.04 / 0.004), the loss to 0.1% (measured
0.003%), and the gradients point the same way, cosine > 0.999 (measured 0.99998), norms within 1% (0.06%).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recgpt_jax.errors import ConfigError
from recgpt_jax.model import precision
from recgpt_jax.model.transformer import ModelConfig, RecGPT
from recgpt_jax.train import losses

ROWS, LEN = 4, 24


def _model(dtype, kind="softmax", norm="post", **kw):
  cfg = ModelConfig(
    num_items=200,
    num_users=40,
    max_len=LEN,
    hidden=64,
    num_layers=2,
    num_heads=2,
    ffn=128,
    attention=kind,
    norm=norm,
    dtype=dtype,
    **kw,
  )
  return RecGPT(cfg, rngs=nnx.Rngs(0))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  items = rng.integers(1, 201, size=(ROWS, LEN))
  # Three users per row of lengths 10, 8, 4 and two padding tokens.
  seq_ids = np.repeat([1, 2, 3, 0], [10, 8, 4, 2])[None].repeat(ROWS, 0)
  positions = np.concatenate([np.arange(10), np.arange(8), np.arange(4), [0, 0]])[None].repeat(ROWS, 0)
  items = np.where(seq_ids > 0, items, 0)
  users = np.where(seq_ids > 0, seq_ids + 3 * np.arange(ROWS)[:, None], 0)
  targets = np.where(seq_ids > 0, rng.integers(1, 201, size=(ROWS, LEN)), 0)
  arrays = (items, positions, np.zeros_like(items), seq_ids, users)
  return [jnp.asarray(a, jnp.int32) for a in arrays], jnp.asarray(targets, jnp.int32)


def _loss(model, inputs, targets):
  return losses.full_softmax_ce(model.logits(model(*inputs)), targets)


@pytest.mark.parametrize(("kind", "norm"), [("softmax", "post"), ("flow", "post"), ("softmax", "pre")])
def test_bf16_forward_loss_and_gradients_match_float32(kind, norm):
  f32, bf16 = _model("float32", kind, norm), _model("bfloat16", kind, norm)
  inputs, targets = _batch()
  # Same initial parameters, stored in float32 either way.
  for a, b in zip(jax.tree.leaves(nnx.state(f32, nnx.Param)), jax.tree.leaves(nnx.state(bf16, nnx.Param)), strict=True):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  h32, h16 = f32(*inputs), bf16(*inputs)
  assert h16.dtype == jnp.bfloat16 and h32.dtype == jnp.float32
  assert bf16.logits(h16).dtype == jnp.float32  # scores (and so losses, top-k) are float32
  valid = np.asarray(inputs[3]) > 0
  diff = np.abs(np.asarray(h16, np.float32) - np.asarray(h32))[valid]
  assert diff.max() < 0.08 and diff.mean() < 0.01, (diff.max(), diff.mean())  # LayerNorm output, scale ~1

  (l32, g32), (l16, g16) = (nnx.value_and_grad(_loss)(m, inputs, targets) for m in (f32, bf16))
  assert abs(float(l16) - float(l32)) < 0.001 * float(l32)
  flat32 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.to_pure_dict(g32))])
  flat16 = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(nnx.to_pure_dict(g16))])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.to_pure_dict(g16)))  # gradients of f32 params
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > 0.999, cosine
  assert abs(np.linalg.norm(flat16) / np.linalg.norm(flat32) - 1) < 0.01


def test_float32_is_unchanged_by_the_policy():
  """dtype=float32 computes exactly what it did before mixed precision (float32 everywhere)."""
  m = _model("float32")
  inputs, _ = _batch()
  h = m(*inputs)
  assert h.dtype == jnp.float32
  table = m.item_table()
  np.testing.assert_allclose(m.logits(h), np.asarray(h) @ np.asarray(table).T, rtol=1e-5, atol=1e-6)


def test_layer_norm_statistics_are_float32():
  """A bf16 input whose mean is large against its spread: float32 statistics keep the spread, bf16 ones lose it."""
  m = _model("bfloat16")
  x = (100.0 + jax.random.normal(jax.random.key(0), (8, 64)) * 0.05).astype(jnp.bfloat16)
  y = np.asarray(m.embed_norm(x), np.float32)
  want = np.asarray(x, np.float32)
  want = (want - want.mean(-1, keepdims=True)) / np.sqrt(want.var(-1, keepdims=True) + 1e-12)
  np.testing.assert_allclose(y, want, atol=0.05)


def test_item_scores_accumulate_in_float32():
  h = jax.random.normal(jax.random.key(1), (16, 256)).astype(jnp.bfloat16)
  table = jax.random.normal(jax.random.key(2), (50, 256))
  got = precision.item_scores(h, table)
  assert got.dtype == jnp.float32
  want = np.asarray(h, np.float32) @ np.asarray(table.astype(jnp.bfloat16), np.float32).T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["int32", "bool", "float64x", "complex64", "float8_e4m3fn"])
def test_dtype_names_that_are_not_supported_float_types_are_config_errors(name):
  with pytest.raises(ConfigError, match="model.dtype"):
    precision.to_dtype(name)
  with pytest.raises(ValueError, match="model.dtype"):
    _model(name)
