"""Blocked (online log-sum-exp, recomputing) cross-entropy against the materialised loss: value, gradients,
exclusions, vocabulary padding, mixed precision, the vocabulary-sharded form, the train step, and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.model import precision
from recgpt_jax.parallel import vocab
from recgpt_jax.train import blocked_ce, losses

ROWS, LEN, DIM, VOCAB, VALID = 4, 6, 16, 128, 101  # ids 101..127 are vocabulary padding


@pytest.fixture(scope="module")
def inputs():
  k = jax.random.split(jax.random.key(3), 5)
  hidden = jax.random.normal(k[0], (ROWS, LEN, DIM))
  table = jax.random.normal(k[1], (VOCAB, DIM))
  bias = jax.random.normal(k[2], (VOCAB,))
  targets = jax.random.randint(k[3], (ROWS, LEN), 0, VALID)  # some 0 = no loss
  exclude = jax.random.randint(k[4], (ROWS, LEN, 3), 0, VALID)
  exclude = jnp.where(exclude == targets[..., None], 0, exclude)  # a target is never excluded
  return hidden, table, bias, targets, exclude


def materialised(hidden, table, bias, targets, exclude):
  logits = precision.item_scores(hidden, table, bias)
  logits = jnp.where(jnp.arange(VOCAB) >= VALID, jnp.finfo(logits.dtype).min, logits)
  return losses.full_softmax_ce(logits, targets, exclude)


def _value_and_grads(fn, hidden, table, bias):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(hidden, table, bias)


def _assert_equals_materialised(inputs, exclude, loss):
  """``loss(hidden, table, bias)`` and its gradients equal the materialised CE's within 1e-5; returns its gradients."""
  hidden, table, bias, targets, _ = inputs
  want, want_grads = _value_and_grads(lambda h, t, b: materialised(h, t, b, targets, exclude), hidden, table, bias)
  got, got_grads = _value_and_grads(loss, hidden, table, bias)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  return got_grads


# Blocks of one row, not dividing V (the last one shifted back), dividing it, larger than the table.
@pytest.mark.parametrize(("block", "with_exclude"), [(1, False), (7, True), (32, True), (1000, False)])
def test_blocked_ce_equals_materialised_ce(inputs, block, with_exclude):
  hidden, table, bias, targets, exclude = inputs
  exclude = exclude if with_exclude else None
  got_grads = _assert_equals_materialised(
    inputs,
    exclude,
    lambda h, t, b: blocked_ce.blocked_softmax_ce(
      h, t, targets, block=block, num_valid=VALID, bias_v=b, exclude_rle=exclude
    ),
  )
  # Vocabulary padding and the padding id get no gradient.
  np.testing.assert_array_equal(got_grads[1][VALID:], 0.0)
  np.testing.assert_array_equal(got_grads[2][0], 0.0)


def test_exclusions_change_the_blocked_loss(inputs):
  """The exclusions reach the blocked sweep (a loss that ignored them would differ from the masked reference)."""
  hidden, table, bias, targets, exclude = inputs
  with_ex = blocked_ce.blocked_softmax_ce(
    hidden, table, targets, block=16, num_valid=VALID, bias_v=bias, exclude_rle=exclude
  )
  without = blocked_ce.blocked_softmax_ce(hidden, table, targets, block=16, num_valid=VALID, bias_v=bias)
  assert float(without) - float(with_ex) > 1e-3  # fewer candidates: a smaller normaliser


def test_logsumexp_of_a_hand_computed_case():
  """Two tokens, 5 rows, block 2 (3 blocks, the last shifted back by one): lse over ids 1..3 (id 0 padding, id 4
  >= num_valid), the second token also without id 2."""
  h = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  table = jnp.array([[9.0, 9.0], [1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [7.0, 7.0]])
  bias = jnp.array([0.0, 0.5, 0.0, -1.0, 0.0])
  exclude = jnp.array([[0], [2]])
  got = blocked_ce.blocked_logsumexp(h, table, bias, exclude, jnp.int32(0), 2, 4)
  want0 = np.log(np.exp(1.5) + np.exp(2.0) + np.exp(-1.0))
  want1 = np.log(np.exp(0.5) + np.exp(5.0))
  np.testing.assert_allclose(got, [want0, want1], rtol=1e-6)


def test_blocked_ce_with_bf16_hidden_states(inputs):
  """bf16 activations, float32 table: both forms take the same bf16 products with float32 accumulation, so they
  agree to float32 summation order; the gradients to bf16 rounding (the materialised backward pass multiplies the
  softmax cast to bf16, the blocked one keeps it float32)."""
  hidden, table, bias, targets, exclude = inputs
  hidden = hidden.astype(jnp.bfloat16)
  want, want_grads = _value_and_grads(lambda h, t, b: materialised(h, t, b, targets, exclude), hidden, table, bias)
  got, got_grads = _value_and_grads(
    lambda h, t, b: blocked_ce.blocked_softmax_ce(
      h, t, targets, block=24, num_valid=VALID, bias_v=b, exclude_rle=exclude
    ),
    hidden,
    table,
    bias,
  )
  assert got_grads[0].dtype == jnp.bfloat16
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_grads[0].astype(jnp.float32), want_grads[0].astype(jnp.float32), rtol=1e-2, atol=1e-3)
  np.testing.assert_allclose(got_grads[1], want_grads[1], rtol=1e-2, atol=1e-3)


def _mesh(data, model):
  devices = jax.devices()[: data * model]
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


@pytest.mark.parametrize(("data", "model", "block"), [(2, 4, 12), (1, 8, 5)])
def test_sharded_blocked_ce_equals_materialised_ce(inputs, data, model, block):
  """Each device sweeps its vocabulary shard in blocks; the per-shard normalisers combine to the full one."""
  _, _, _, targets, exclude = inputs
  m = _mesh(data, model)
  _assert_equals_materialised(
    inputs,
    exclude,
    lambda h, t, b: vocab.sharded_softmax_ce(
      h, t, targets, mesh=m, num_valid=VALID, bias_v=b, exclude_rle=exclude, block=block
    ),
  )


def test_blocked_ce_never_holds_the_logits():
  """Compiled memory: the blocked loss and its gradient need well under one ``[tokens, V]`` float32 array of
  scratch, while the materialised one needs several."""
  tokens, dim, v = 256, 32, 1 << 15
  args = (
    jax.ShapeDtypeStruct((1, tokens, dim), jnp.float32),
    jax.ShapeDtypeStruct((v, dim), jnp.float32),
    jax.ShapeDtypeStruct((1, tokens), jnp.int32),
  )

  def temp_bytes(loss):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = tokens * v * 4
  full = temp_bytes(lambda h, t, y: losses.full_softmax_ce(precision.item_scores(h, t), y))
  blocked = temp_bytes(lambda h, t, y: blocked_ce.blocked_softmax_ce(h, t, y, block=1024, num_valid=v))
  assert full >= logits_bytes
  assert blocked < logits_bytes / 4
