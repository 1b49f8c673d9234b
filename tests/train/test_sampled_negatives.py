"""Sampled softmax for large catalogues: the negative samplers, their logQ correction on hand-built cases, and the
corrected loss's expected gradient approaching full CE as negatives grow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.train import losses

NUM_ITEMS = 200
COUNTS = np.r_[0, (1000 / np.arange(1, NUM_ITEMS + 1) ** 1.1).astype(np.int64)]  # power law, long tail of 0s
COUNTS[NUM_ITEMS - 5 :] = 0  # five items never seen in training


def test_popularity_draws_follow_the_smoothed_counts():
  draws = np.asarray(
    losses.draw_negatives(jax.random.key(0), "popularity", 200_000, NUM_ITEMS, jnp.zeros((1, 1), jnp.int32), COUNTS)
  )
  assert draws.min() >= 1 and draws.max() <= NUM_ITEMS  # never the padding id
  freq = np.bincount(draws, minlength=NUM_ITEMS + 1) / draws.size
  w = np.r_[0, COUNTS[1:] + 1]
  q = w / w.sum()
  np.testing.assert_allclose(freq[1:6], q[1:6], rtol=0.03)  # the head, within sampling noise (~1%)
  unseen = COUNTS == 0
  unseen[0] = False
  np.testing.assert_allclose(freq[unseen].sum(), q[unseen].sum(), rtol=0.3)  # unseen items: add-one smoothing


def test_in_batch_and_mixed_negatives_are_the_batch_targets():
  targets = jnp.array([[3, 0, 7], [7, 1, 0]])
  in_batch = losses.draw_negatives(jax.random.key(1), "in_batch", 4, NUM_ITEMS, targets, COUNTS)
  np.testing.assert_array_equal(in_batch, [3, 0, 7, 7, 1, 0])
  mixed = np.asarray(losses.draw_negatives(jax.random.key(1), "mixed", 4, NUM_ITEMS, targets, COUNTS))
  np.testing.assert_array_equal(mixed[:6], [3, 0, 7, 7, 1, 0])
  assert mixed.shape == (10,) and (mixed[6:] >= 1).all() and (mixed[6:] <= NUM_ITEMS).all()


def test_log_counts_by_hand():
  """Expected occurrences among the negatives: N/V uniform, N w / sum w popularity (w = count + 1), T q in-batch (T
  real targets, q = count / total), their sum mixed."""
  counts = jnp.array([0, 6, 3, 1, 0])  # 4 items, total 10
  targets = jnp.array([[1, 2, 0]])  # T = 2
  negs = jnp.array([1, 2, 3, 4])
  got = {k: np.asarray(losses.negative_log_counts(negs, k, 8, 4, targets, counts)) for k in losses.NEGATIVES}
  q = np.array([0.6, 0.3, 0.1, 0.0])
  np.testing.assert_allclose(got["uniform"], np.log([2, 2, 2, 2]), rtol=1e-6)
  np.testing.assert_allclose(got["popularity"], np.log(8 * np.array([7, 4, 2, 1]) / 14), rtol=1e-6)
  np.testing.assert_allclose(got["in_batch"][:3], np.log(2 * q[:3]), rtol=1e-6)
  np.testing.assert_allclose(got["mixed"], np.log(2 * q + 2), rtol=1e-6)
  assert got["in_batch"][3] == 0.0  # no count: never in a batch, no correction


def test_corrected_sampled_softmax_by_hand():
  """One token, target 2, negatives [2, 3, 0, 4]: the hit (2) and the padding id (0) are masked, the others'
  logits are lowered by their log expected counts."""
  rng = np.random.default_rng(0)
  h = rng.normal(size=(1, 1, 4)).astype(np.float32)
  table = rng.normal(size=(5, 4)).astype(np.float32)
  negs = np.array([2, 3, 0, 4])
  log_count = np.array([0.5, -1.0, 0.3, 2.0], np.float32)
  got = float(
    losses.sampled_softmax(*map(jnp.asarray, (h, table, np.array([[2]]), negs)), log_count_n=jnp.asarray(log_count))
  )
  s = lambda i: float(h[0, 0] @ table[i])  # noqa: E731
  want = -(s(2) - np.log(np.exp(s(2)) + np.exp(s(3) + 1.0) + np.exp(s(4) - 2.0)))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _problem():
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(NUM_ITEMS + 1, 8)) * 0.4, jnp.float32)
  q = COUNTS / COUNTS.sum()
  targets = jnp.asarray(rng.choice(NUM_ITEMS + 1, size=(2, 4), p=q), jnp.int32)
  return hidden, table, targets


def _full_ce(hidden, table, targets):
  logits = hidden @ table.T
  return losses.full_softmax_ce(logits, targets)


def _mean_sampled_grad(kind, num, logq, hidden, table, targets, draws=400):
  """The sampled loss's gradient w.r.t. the hidden states, averaged over ``draws`` independent negative sets."""

  def one(key):
    negs = losses.draw_negatives(key, kind, num, NUM_ITEMS, targets, COUNTS)
    log_count = losses.negative_log_counts(negs, kind, num, NUM_ITEMS, targets, COUNTS) if logq else None
    return jax.grad(lambda h: losses.sampled_softmax(h, table, targets, negs, log_count_n=log_count))(hidden)

  keys = jax.random.split(jax.random.key(7), draws)
  return jnp.mean(jax.jit(jax.vmap(one))(keys), axis=0)


@pytest.mark.parametrize("kind", ["uniform", "popularity", "mixed"])
def test_expected_gradient_approaches_full_ce_as_negatives_grow(kind):
  """With the logQ correction the mean gradient's relative distance to full CE's shrinks as N grows (16 -> 128 ->
  1024) and ends within 5%; uncorrected popularity negatives stay far off (popular items count too much in the
  normaliser)."""
  hidden, table, targets = _problem()
  want = jax.grad(lambda h: _full_ce(h, table, targets))(hidden)

  def error(g):
    return float(jnp.linalg.norm(g - want) / jnp.linalg.norm(want))

  errors = [error(_mean_sampled_grad(kind, n, True, hidden, table, targets)) for n in (16, 128, 1024)]
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.05, errors
  if kind == "popularity":
    uncorrected = error(_mean_sampled_grad(kind, 1024, False, hidden, table, targets))
    assert uncorrected > 5 * errors[2], (uncorrected, errors)
