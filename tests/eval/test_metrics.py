"""Ranking metrics on hand-computed cases."""

import math

import jax.numpy as jnp
import numpy as np

from recgpt_jax.eval import metrics


def test_hand_computed_ranks():
  # 3 users, items 1..25 (column 0 = padding). Scores = item id, so item 25 ranks first.
  scores = jnp.tile(jnp.arange(26, dtype=jnp.float32), (3, 1))
  answer = jnp.array([23, 20, 3])
  # User 0: no exclusion -> answer 23 ranks 3rd (rank 2). User 1: excluding 25, 24 lifts 20 from rank 5 to
  # rank 3. User 2: answer 3 ranks 23rd (rank 22): outside every cut-off.
  exclude = jnp.array([[0, 0], [25, 24], [0, 0]])
  m = {k: np.asarray(v) for k, v in metrics.ranking_metrics(scores, answer, exclude).items()}
  np.testing.assert_array_equal(m["HR@5"], [1, 1, 0])
  np.testing.assert_array_equal(m["HR@20"], [1, 1, 0])
  np.testing.assert_allclose(m["NDCG@5"], [1 / math.log2(4), 1 / math.log2(5), 0], rtol=1e-6)
  np.testing.assert_allclose(m["NDCG@20"], m["NDCG@5"], rtol=1e-6)


def test_rank_boundaries_and_excluded_answer():
  scores = jnp.tile(jnp.arange(31, dtype=jnp.float32), (4, 1))
  # Ranks: item 26 -> rank 4 (last inside @5), 25 -> rank 5 (first outside @5), 11 -> rank 19 (inside @20).
  answer = jnp.array([26, 25, 11, 30])
  exclude = jnp.array([[0], [0], [0], [30]])  # user 3's answer is in its history: a miss
  m = {k: np.asarray(v) for k, v in metrics.ranking_metrics(scores, answer, exclude).items()}
  np.testing.assert_array_equal(m["HR@5"], [1, 0, 0, 0])
  np.testing.assert_array_equal(m["HR@10"], [1, 1, 0, 0])
  np.testing.assert_array_equal(m["HR@20"], [1, 1, 1, 0])
  np.testing.assert_allclose(m["NDCG@20"], [1 / math.log2(6), 1 / math.log2(7), 1 / math.log2(21), 0], rtol=1e-6)


def test_padding_column_never_ranked():
  scores = jnp.array([[100.0, 1.0, 2.0, 3.0, 4.0, 5.0] + [0.0] * 20])
  m = metrics.ranking_metrics(scores, jnp.array([5]), jnp.zeros((1, 1), jnp.int32))
  assert float(m["NDCG@5"][0]) == 1.0
