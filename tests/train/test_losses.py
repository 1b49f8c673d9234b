"""Losses against NumPy computations, and negative sampling."""

import jax
import jax.numpy as jnp
import numpy as np

from recgpt_jax.train import losses


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_full_softmax_ce_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = np.array([[1, 6, 0], [2, 0, 0]])
  got = float(losses.full_softmax_ce(jnp.asarray(logits), jnp.asarray(targets)))
  lp = _log_softmax(logits[..., 1:])  # column 0 is padding, never a candidate
  want = -np.mean([lp[0, 0, 0], lp[0, 1, 5], lp[1, 0, 1]])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bce_matches_numpy():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(1, 3, 4)).astype(np.float32)
  table = rng.normal(size=(6, 4)).astype(np.float32)
  targets, negs = np.array([[2, 3, 0]]), np.array([[5, 1, 4]])
  got = float(losses.bce_loss(*map(jnp.asarray, (h, table, targets, negs))))
  sig = lambda x: 1 / (1 + np.exp(-x))
  per = [-np.log(sig(h[0, t] @ table[targets[0, t]])) - np.log(1 - sig(h[0, t] @ table[negs[0, t]])) for t in (0, 1)]
  np.testing.assert_allclose(got, np.mean(per), rtol=1e-5)


def test_sampled_softmax_masks_accidental_hits():
  rng = np.random.default_rng(2)
  h = rng.normal(size=(1, 2, 4)).astype(np.float32)
  table = rng.normal(size=(6, 4)).astype(np.float32)
  targets, negs = np.array([[2, 5]]), np.array([2, 3, 4])
  got = float(losses.sampled_softmax(*map(jnp.asarray, (h, table, targets, negs))))
  s = lambda t, i: h[0, t] @ table[i]
  l0 = -(s(0, 2) - np.log(np.exp([s(0, 2), s(0, 3), s(0, 4)]).sum()))  # negative 2 == target: masked
  l1 = -(s(1, 5) - np.log(np.exp([s(1, 5), s(1, 2), s(1, 3), s(1, 4)]).sum()))
  np.testing.assert_allclose(got, (l0 + l1) / 2, rtol=1e-5)


def test_negatives_avoid_users_items():
  # A catalogue of 6 items; user 1 owns items 1..4 (inputs and targets), so its negatives must be 5 or 6.
  items = jnp.array([[1, 2, 3, 5, 0]])
  targets = jnp.array([[2, 3, 4, 6, 0]])
  seq_ids = jnp.array([[1, 1, 1, 2, 0]])
  seen = {0: [], 3: []}
  for seed in range(200):
    neg = np.asarray(losses.sample_negatives(jax.random.key(seed), items, targets, seq_ids, 6))
    assert set(neg[0, :3].tolist()) <= {5, 6}
    assert neg[0, 3] in (1, 2, 3, 4)
    seen[0].append(neg[0, 0])
    seen[3].append(neg[0, 3])
  # Uniform over the complement: every allowed item is drawn, in roughly equal shares.
  assert np.bincount(seen[0], minlength=7)[5:].min() > 70
  assert np.bincount(seen[3], minlength=7)[1:5].min() > 30
