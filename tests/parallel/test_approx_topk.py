"""Approximate top-k (``eval.approx_recall``, ``prompt.approx_recall``): the window count against XLA's own, the
emulated TPU reduction on hand-built and random cases, and the option reaching evaluation, recall and prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recgpt_jax.eval import metrics
from recgpt_jax.parallel import topk
from recgpt_jax.train import prompts


@pytest.mark.parametrize(
  ("n", "k", "recall"),
  [
    (12288, 20, 0.95),
    (12288, 20, 0.9),
    (10**6, 20, 0.95),
    (10**6, 100, 0.95),
    (100, 5, 0.9),
    (1000, 1, 0.9),
    (3000, 40, 0.99),
  ],
)
def test_window_count_is_xlas(n, k, recall):
  """``approx_windows`` equals the reduction size XLA reports for ``approx_max_k(..., aggregate_to_topk=False)``."""
  operand = jax.ShapeDtypeStruct((2, n), jnp.float32)
  shape = jax.eval_shape(lambda x: jax.lax.approx_max_k(x, k, recall_target=recall, aggregate_to_topk=False), operand)
  assert topk.approx_windows(n, k, recall) == shape[0].shape[-1]


def test_emulated_reduction_loses_collisions():
  """2048 entries, k = 20, recall 0.9: 256 windows (entry j in window j mod 256). The two best entries share window 5,
  so the smaller (0.9) is lost and the 21st best (0.5) comes in."""
  n, k = 2048, 20
  assert topk.approx_windows(n, k, 0.9) == 256
  scores = np.zeros(n, np.float32)
  best = {5: 1.0, 5 + 256: 0.9}  # same window
  best |= {10 + i: 0.8 - 0.01 * i for i in range(19)}  # windows 10..28
  best[40] = 0.5
  for j, v in best.items():
    scores[j] = v
  values, ids = topk.emulated_approx_max_k(jnp.asarray(scores)[None], k, 0.9)
  want = [5, *range(10, 29), 40]
  np.testing.assert_array_equal(ids[0], want[:k])
  np.testing.assert_allclose(values[0], scores[want[:k]])


def test_emulated_recall_meets_the_target_on_random_scores():
  """Over 512 users and 12288 items, the emulated reduction's recall@20 is at least XLA's estimate exp(-19/M)."""
  scores = jax.random.normal(jax.random.key(0), (512, 12288))
  exact = np.asarray(jax.lax.top_k(scores, 20)[1])
  for target in (0.8, 0.95):
    approx = np.asarray(topk.emulated_approx_max_k(scores, 20, target)[1])
    recall = np.mean([len(set(a) & set(e)) / 20 for a, e in zip(approx, exact, strict=True)])
    windows = topk.approx_windows(12288, 20, target)
    assert np.exp(-19 / windows) <= recall < 1.0, (target, recall)


def _has_approx_top_k(fn, *args) -> bool:
  return "ApproxTopK" in jax.jit(fn).lower(*args).as_text()


def test_the_option_reaches_ranking_prompts_and_the_sharded_top_k():
  """With a recall target the programs hold XLA's ApproxTopK (on CPU it falls back to exact: same results); with 0,
  only exact top-k."""
  scores = jax.random.normal(jax.random.key(1), (8, 3000))
  answer, exclude = jnp.arange(1, 9), jnp.zeros((8, 2), jnp.int32)
  exact = metrics.ranking_metrics(scores, answer, exclude)
  approx = metrics.ranking_metrics(scores, answer, exclude, approx_recall=0.9)
  for name in exact:
    np.testing.assert_array_equal(approx[name], exact[name])
  assert _has_approx_top_k(lambda s: metrics.ranking_metrics(s, answer, exclude, approx_recall=0.9), scores)
  assert not _has_approx_top_k(lambda s: metrics.ranking_metrics(s, answer, exclude), scores)
  assert _has_approx_top_k(lambda s: prompts.top_candidates(s[None], 0.9), scores)
  mesh = jax.make_mesh(
    (1, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:4]
  )
  q, table = jax.random.normal(jax.random.key(2), (8, 16)), jax.random.normal(jax.random.key(3), (4096, 16))

  def sharded(q, table, approx):
    return topk.sharded_top_k(q, table, 20, mesh=mesh, approx_recall=approx)

  assert _has_approx_top_k(lambda q, t: sharded(q, t, 0.9), q, table)
  np.testing.assert_array_equal(jax.jit(lambda q, t: sharded(q, t, 0.9))(q, table)[1], sharded(q, table, 0.0)[1])
