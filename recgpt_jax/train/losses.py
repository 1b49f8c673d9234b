"""Next-item losses over packed rows, and on-device negative sampling.

All losses take hidden states ``[rows, len, hidden]``, the item table ``[num_items + 1, hidden]`` and
targets ``[rows, len]`` (0 = no loss) and return the mean over real target tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recgpt_jax.model import precision

LOSSES = ("ce", "bce", "sampled_softmax")


def _masked_mean(per_token: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def full_softmax_ce(logits_rlv: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy over the whole catalogue; column 0 (padding) is never a candidate."""
  logits_rlv = logits_rlv.at[..., 0].set(jnp.finfo(logits_rlv.dtype).min)
  lse = jax.nn.logsumexp(logits_rlv, axis=-1)
  target_logit = jnp.take_along_axis(logits_rlv, targets[..., None], axis=-1)[..., 0]
  return _masked_mean(lse - target_logit, (targets > 0).astype(logits_rlv.dtype))


def sample_negatives(
  key: jax.Array, items: jax.Array, targets: jax.Array, seq_ids: jax.Array, num_items: int
) -> jax.Array:
  """One uniform negative per position from the items its user never touched in the row.

  Exact, with no rejection loop: with ``s_1 < ... < s_m`` the user's distinct items (inputs and targets
  in the row, restricted to ``1..num_items``), the ``u``-th item (0-based) of the complement of ``{s_k}`` in
  ``1..num_items`` is ``u + 1 + #{k : s_k - k <= u}``; ``u`` is drawn uniformly from ``[0, num_items - m)``
  (a user owning every item gets ``num_items``).

  No sort: the user's set is the same at all its positions, so each distinct value is represented once by
  its first occurrence among the row's ``2 * len`` tokens (inputs, then targets), its rank ``k`` is the
  number of first occurrences of the same user at most its value (pairwise comparisons ``[rows, 2len,
  2len]``), and ``m`` and the skip count of position ``i`` are masked counts over the first occurrences of
  ``i``'s user (``[rows, len, 2len]``). Every position, padding included (its "user" is ``seq_id`` 0),
  gets the same value as sorting its user's items would give.

  Returns:
    ``[rows, len]`` int32 negatives (arbitrary at padding positions).
  """
  tokens = jnp.concatenate([items, targets], axis=-1).astype(jnp.int32)  # [r, 2l]
  users = jnp.concatenate([seq_ids, seq_ids], axis=-1)
  same = users[:, :, None] == users[:, None, :]  # [r, j, k]
  earlier = jnp.tri(tokens.shape[-1], k=-1, dtype=bool)  # k < j
  repeats = jnp.sum(same & (tokens[:, :, None] == tokens[:, None, :]) & earlier, axis=-1, dtype=jnp.int32)
  # [r, 2l]: the first occurrence of each distinct (user, item); a token outside 1..num_items owns nothing.
  first = (tokens > 0) & (tokens <= num_items) & (repeats == 0)
  rank = jnp.sum(same & first[:, None, :] & (tokens[:, None, :] <= tokens[:, :, None]), axis=-1, dtype=jnp.int32)
  gap = jnp.where(first, tokens - rank, jnp.iinfo(jnp.int32).max)  # s_k - k at first occurrences, else never <= u
  mine = seq_ids[:, :, None] == users[:, None, :]  # [r, i, j]
  num_owned = jnp.sum(mine & first[:, None, :], axis=-1)
  u = jnp.floor(jax.random.uniform(key, items.shape) * (num_items - num_owned)).astype(jnp.int32)
  skip = jnp.sum(mine & (gap[:, None, :] <= u[..., None]), axis=-1)
  return jnp.clip(u + 1 + skip, 1, num_items).astype(jnp.int32)


def bce_loss(hidden_rld: jax.Array, table_vd: jax.Array, targets: jax.Array, negatives: jax.Array) -> jax.Array:
  """Reference loss: ``-log sigmoid(s_pos) - log(1 - sigmoid(s_neg))`` with one negative per position."""
  pos = jnp.sum(hidden_rld * table_vd[targets], axis=-1)
  neg = jnp.sum(hidden_rld * table_vd[negatives], axis=-1)
  per_token = -jax.nn.log_sigmoid(pos) - jax.nn.log_sigmoid(-neg)
  return _masked_mean(per_token, (targets > 0).astype(hidden_rld.dtype))


def sampled_softmax(
  hidden_rld: jax.Array, table_vd: jax.Array, targets: jax.Array, negatives_n: jax.Array
) -> jax.Array:
  """Softmax over the target and ``N`` negatives shared by the batch (uniform, so no logQ correction).

  A negative that happens to equal the token's target is masked out of that token's softmax.
  """
  pos = jnp.sum(hidden_rld.astype(jnp.float32) * table_vd[targets], axis=-1, keepdims=True)  # [r, l, 1]
  neg = precision.item_scores(hidden_rld, table_vd[negatives_n])  # [r, l, n] float32
  neg = jnp.where(negatives_n[None, None, :] == targets[..., None], jnp.finfo(neg.dtype).min, neg)
  logits = jnp.concatenate([pos, neg], axis=-1)
  per_token = jax.nn.logsumexp(logits, axis=-1) - pos[..., 0]
  return _masked_mean(per_token, (targets > 0).astype(hidden_rld.dtype))
