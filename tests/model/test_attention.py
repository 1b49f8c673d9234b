"""Attention kernels against direct per-position implementations of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.model import attention


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def flow_loop(q, k, v, seq_ids):
  """The reference formulas, one position at a time, in float64 NumPy. q, k, v: [h, len, d]."""
  eps = attention.FLOW_EPS
  h, length, d = q.shape
  out = np.zeros_like(q, dtype=np.float64)
  for head in range(h):
    qs, ks, vv = _sigmoid(q[head].astype(np.float64)), _sigmoid(k[head].astype(np.float64)), v[head]
    for i in range(length):
      if seq_ids[i] == 0:
        continue
      prefix = [j for j in range(i + 1) if seq_ids[j] == seq_ids[i]]
      # Per-position flows of every prefix token j (each with its own prefix).
      n, inflow, outflow, src = {}, {}, {}, {}
      for j in prefix:
        pj = [t for t in prefix if t <= j]
        n[j] = len(pj)
        inflow[j] = n[j] / np.dot(qs[j] + eps, ks[pj].sum(0) + eps)
        outflow[j] = n[j] / np.dot(ks[j] + eps, qs[pj].sum(0) + eps)
      for j in prefix:
        pj = [t for t in prefix if t <= j]
        src[j] = np.clip(np.dot(ks[j] + eps, sum(qs[t] * inflow[t] for t in pj) + eps) / n[j], -1, 1)
      sink = np.dot(qs[i] + eps, sum(ks[t] * outflow[t] for t in prefix) + eps) / n[i]
      alloc = _sigmoid(sink)
      acc = np.zeros(d)
      for j in prefix:
        comp_j = n[j] * np.exp(src[j]) / sum(np.exp(src[t]) for t in prefix if t <= j)
        acc += np.dot(qs[i] * inflow[i] / n[i], ks[j]) * vv[j] * comp_j
      out[head, i] = alloc * acc
  return out


def softmax_loop(q, k, v, seq_ids):
  h, length, d = q.shape
  out = np.zeros_like(q, dtype=np.float64)
  for head in range(h):
    for i in range(length):
      if seq_ids[i] == 0:
        continue
      prefix = [j for j in range(i + 1) if seq_ids[j] == seq_ids[i]]
      logits = np.array([np.dot(q[head, i], k[head, j]) / np.sqrt(d) for j in prefix])
      w = np.exp(logits - logits.max())
      w /= w.sum()
      out[head, i] = sum(wj * v[head, j] for wj, j in zip(w, prefix, strict=False))
  return out


SEQ_IDS = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 3, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize(("kind", "loop"), [("flow", flow_loop), ("softmax", softmax_loop)])
def test_kernel_matches_per_position_loop(kind, loop):
  rng = np.random.default_rng(0)
  b, h, length, d = 2, 2, SEQ_IDS.shape[1], 4
  q, k, v = (rng.normal(size=(b, h, length, d)).astype(np.float32) * 2 for _ in range(3))
  mask = attention.causal_packed_mask(jnp.asarray(SEQ_IDS))
  fn = attention.flow_attention if kind == "flow" else attention.softmax_attention
  got = np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask))
  for row in range(b):
    want = loop(q[row], k[row], v[row], SEQ_IDS[row])
    np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-5)
  # Padding positions output exactly zero.
  assert np.all(got[0, :, SEQ_IDS[0] == 0] == 0)


def test_mask_blocks_users_and_future():
  mask = np.asarray(attention.causal_packed_mask(jnp.asarray(SEQ_IDS[:1])))[0, 0]
  assert mask[2, 0] and mask[2, 2] and not mask[2, 3]  # causal within user 1
  assert not mask[4, 3] and mask[5, 4]  # user 2 cannot see user 1
  assert not mask[7].any() and not mask[:, 7].any()  # padding attends / is attended by nothing
  assert mask[8, 8] and not mask[8, 6]


def test_dropout_identity_without_key_and_scaled_with_key():
  x = jnp.ones((1000,))
  assert jnp.all(attention.dropout(x, 0.5, None) == x)
  y = attention.dropout(x, 0.5, jax.random.key(0))
  assert set(np.unique(np.asarray(y)).tolist()) <= {0.0, 2.0}
  assert 400 < int(jnp.sum(y > 0)) < 600


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_mask_rate_and_independence(rate):
  """Counter-hash dropout masks: kept fraction within 5 standard deviations of 1 - rate, two keys agree as
  independent draws would (p^2 + (1-p)^2), neighbouring entries and rows are uncorrelated, same key = same mask."""
  shape = (400, 500)
  n = shape[0] * shape[1]
  a = np.asarray(attention.keep_mask(jax.random.key(0), rate, shape))
  b = np.asarray(attention.keep_mask(jax.random.key(1), rate, shape))
  keep = 1.0 - rate
  sd = (keep * rate / n) ** 0.5
  assert abs(a.mean() - keep) < 5 * sd
  assert abs((a == b).mean() - (keep**2 + rate**2)) < 5 * (0.25 / n) ** 0.5 + 1e-3
  flat = a.ravel().astype(np.float64)
  for lag in (1, shape[1]):  # next element, next row
    assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.02
  np.testing.assert_array_equal(a, np.asarray(attention.keep_mask(jax.random.key(0), rate, shape)))
  folded = np.asarray(attention.keep_mask(jax.random.fold_in(jax.random.key(0), 1), rate, shape))
  assert abs((a == folded).mean() - (keep**2 + rate**2)) < 5 * (0.25 / n) ** 0.5 + 1e-3
