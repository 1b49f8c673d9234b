"""Vocabulary-sharded full-softmax cross-entropy against the single-device loss, value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.model import precision
from recgpt_jax.parallel import vocab
from recgpt_jax.train import losses

ROWS, LEN, DIM, VOCAB, VALID = 8, 5, 16, 128, 101  # 101 real ids (0 = padding) padded to 128 rows


def mesh(data, model):
  devices = jax.devices()[: data * model]
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def reference(hidden, table, bias, targets):
  logits = hidden @ table.T + bias
  logits = jnp.where(jnp.arange(VOCAB) >= VALID, jnp.finfo(logits.dtype).min, logits)
  return losses.full_softmax_ce(logits, targets)


@pytest.fixture(scope="module")
def inputs():
  k = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k[0], (ROWS, LEN, DIM))
  table = jax.random.normal(k[1], (VOCAB, DIM))
  bias = jax.random.normal(k[2], (VOCAB,))
  targets = jax.random.randint(k[3], (ROWS, LEN), 0, VALID)  # some 0 = no loss
  return hidden, table, bias, targets


@pytest.mark.parametrize(("data", "model"), [(1, 1), (8, 1), (1, 8), (2, 4), (4, 2)])
def test_sharded_ce_equals_full_softmax(inputs, data, model):
  m = mesh(data, model)
  want, want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(*inputs)

  def sharded(hidden, table, bias, targets):
    return vocab.sharded_softmax_ce(hidden, table, targets, mesh=m, num_valid=VALID, bias_v=bias)

  got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(*inputs)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  # Padding rows of the table get no gradient; neither does the padding id 0.
  np.testing.assert_array_equal(got_grads[1][VALID:], 0.0)
  np.testing.assert_array_equal(got_grads[1][0], 0.0)


@pytest.mark.parametrize(("data", "model"), [(2, 4), (1, 8)])
def test_sharded_ce_equals_full_softmax_with_bf16_hidden_states(inputs, data, model):
  """Mixed precision: bf16 hidden states, float32 table. Both forms take the same bf16 products with float32
  accumulation (precision.item_scores), so the loss agrees to float32 summation order."""
  m = mesh(data, model)
  hidden, table, bias, targets = inputs
  hidden = hidden.astype(jnp.bfloat16)

  def full(hidden, table, bias):
    logits = precision.item_scores(hidden, table, bias)
    logits = jnp.where(jnp.arange(VOCAB) >= VALID, jnp.finfo(logits.dtype).min, logits)
    return losses.full_softmax_ce(logits, targets)

  def sharded(hidden, table, bias):
    return vocab.sharded_softmax_ce(hidden, table, targets, mesh=m, num_valid=VALID, bias_v=bias)

  want, want_grads = jax.value_and_grad(full, argnums=(0, 1, 2))(hidden, table, bias)
  got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(hidden, table, bias)
  assert got.dtype == jnp.float32 and got_grads[0].dtype == jnp.bfloat16 and got_grads[1].dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Gradients come out of bf16 products (the table's is cast to float32 after), and the shards' partial sums are
  # rounded before they are added, so they agree to a bf16 rounding (2**-8) of each gradient's scale.
  for g, w in zip(got_grads, want_grads, strict=True):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=2**-7, atol=2**-8 * np.abs(w).max())


def test_sharded_ce_never_materialises_full_logits(inputs):
  """The compiled 1x8 program holds [tokens, vocab / 8] logits per device and gathers no table."""
  m = mesh(1, 8)
  fn = jax.jit(lambda h, t, b, y: vocab.sharded_softmax_ce(h, t, y, mesh=m, num_valid=VALID, bias_v=b))
  hlo = fn.lower(*inputs).compile().as_text()
  assert f"f32[{ROWS},{LEN},{VOCAB // 8}]" in hlo
  assert f"f32[{ROWS},{LEN},{VOCAB}]" not in hlo
  assert "all-gather" not in hlo


def test_indivisible_table_is_rejected(inputs):
  hidden, table, bias, targets = inputs
  with pytest.raises(ValueError, match="do not split"):
    vocab.sharded_softmax_ce(hidden, table[:100], targets, mesh=mesh(1, 8), num_valid=VALID)
