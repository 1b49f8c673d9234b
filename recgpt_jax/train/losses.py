"""Next-item losses over packed rows, and on-device negative sampling.

All losses take hidden states ``[rows, len, hidden]``, the item table ``[num_items + 1, hidden]`` and
targets ``[rows, len]`` (0 = no loss) and return the mean over real target tokens. Each also takes an
optional ``exclude`` ``[rows, len, E]`` of item ids per position (0 = none, repeats allowed) that are not
candidates of that position: their logits leave its softmax, or, for the sampled losses, a negative equal
to one of them is dropped. A position's target must not be among its excluded items.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from recgpt_jax.model import precision

LOSSES = ("ce", "bce", "sampled_softmax")


def masked_mean(per_token: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def mask_items(logits_rlv: jax.Array, exclude_rle: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """``logits`` with each position's excluded ids set to the lowest float (``exp`` of it is 0, so they leave
  any softmax exactly and get no gradient).

  Args:
    logits_rlv: ``[rows, len, V]`` logits of the ids ``offset .. offset + V - 1`` (a vocabulary shard).
    exclude_rle: ``[rows, len, E]`` global item ids; ids outside the shard (0 included when ``offset > 0``)
      are ignored.
    offset: global id of the first column.
  """
  rows, length, v = logits_rlv.shape
  local = exclude_rle.astype(jnp.int32) - offset
  local = jnp.where((local >= 0) & (local < v), local, v)  # out of the shard: one past the end, dropped
  r = jnp.arange(rows)[:, None, None]
  t = jnp.arange(length)[None, :, None]
  return logits_rlv.at[r, t, local].set(jnp.finfo(logits_rlv.dtype).min, mode="drop")


def _excluded(ids: jax.Array, exclude_rle: jax.Array) -> jax.Array:
  """Whether ids are among their position's excluded items (id 0 never is): ``ids`` ``[rows, len]``, one per
  position, gives ``[rows, len]``; ``ids`` ``[N]``, shared by all positions, gives ``[rows, len, N]``."""
  if ids.ndim == 1:
    hit = jnp.any(ids[None, None, :, None] == exclude_rle[:, :, None, :], axis=-1)
  else:
    hit = jnp.any(ids[..., None] == exclude_rle, axis=-1)
  return hit & (ids > 0)


def full_softmax_ce(logits_rlv: jax.Array, targets: jax.Array, exclude_rle: jax.Array | None = None) -> jax.Array:
  """Cross-entropy over the whole catalogue; column 0 (padding) and each position's excluded items are
  never candidates."""
  logits_rlv = logits_rlv.at[..., 0].set(jnp.finfo(logits_rlv.dtype).min)
  if exclude_rle is not None:
    logits_rlv = mask_items(logits_rlv, exclude_rle)
  lse = jax.nn.logsumexp(logits_rlv, axis=-1)
  target_logit = jnp.take_along_axis(logits_rlv, targets[..., None], axis=-1)[..., 0]
  return masked_mean(lse - target_logit, (targets > 0).astype(logits_rlv.dtype))


# Rows of at least this many positions use the sorted form. Measured on CPU (jit, 1-32 rows): below 32 both
# take well under 0.1 ms, the pairwise one slightly ahead (one fused pass, no sort or serial searches); from
# 32 on the sorted one is ahead, by 7x-60x at 512 and 160x-800x from 2048 (len log len against len^2). Not
# measured on accelerators, where the searches' loop iterations cost more and the crossover may move up.
_SORTED_MIN_LEN = 32


def sample_negatives(
  key: jax.Array, items: jax.Array, targets: jax.Array, seq_ids: jax.Array, num_items: int
) -> jax.Array:
  """One uniform negative per position from the items its user never touched in the row.

  Exact, with no rejection loop: with ``s_1 < ... < s_m`` the user's distinct items (inputs and targets
  in the row, restricted to ``1..num_items``), the ``u``-th item (0-based) of the complement of ``{s_k}`` in
  ``1..num_items`` is ``u + 1 + #{k : s_k - k <= u}``; ``u`` is drawn uniformly from ``[0, num_items - m)``
  (a user owning every item gets ``num_items``).

  Two exact forms, chosen by the (static) row length and returning bit-identical negatives from the same
  random numbers: rows shorter than ``_SORTED_MIN_LEN`` use the sort-free pairwise form
  (``_pairwise_negatives``, ``[rows, 2len, 2len]`` comparisons: quadratic, but the fastest for short rows),
  longer rows the sorted form (``_sorted_negatives``, ``O(len log len)`` time, ``O(len)`` memory). Every
  position, padding included (its "user" is ``seq_id`` 0), gets the same value as sorting its user's items
  would give.

  Returns:
    ``[rows, len]`` int32 negatives (arbitrary at padding positions).
  """
  if items.shape[-1] >= _SORTED_MIN_LEN:
    return _sorted_negatives(key, items, targets, seq_ids, num_items)
  return _pairwise_negatives(key, items, targets, seq_ids, num_items)


def _draw(key: jax.Array, shape: tuple[int, ...], num_items: int, num_owned: jax.Array) -> jax.Array:
  """The 0-based index ``u`` into the complement, uniform in ``[0, num_items - num_owned)``; shared by both forms."""
  return jnp.floor(jax.random.uniform(key, shape) * (num_items - num_owned)).astype(jnp.int32)


def _pairwise_negatives(
  key: jax.Array, items: jax.Array, targets: jax.Array, seq_ids: jax.Array, num_items: int
) -> jax.Array:
  """``sample_negatives`` with no sort, by pairwise comparisons over the row's ``2 * len`` tokens.

  The user's set is the same at all its positions, so each distinct value is represented once by its first
  occurrence among the row's tokens (inputs, then targets), its rank ``k`` is the number of first
  occurrences of the same user at most its value (``[rows, 2len, 2len]``), and ``m`` and the skip count of
  position ``i`` are masked counts over the first occurrences of ``i``'s user (``[rows, len, 2len]``).
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
  u = _draw(key, items.shape, num_items, num_owned)
  skip = jnp.sum(mine & (gap[:, None, :] <= u[..., None]), axis=-1)
  return jnp.clip(u + 1 + skip, 1, num_items).astype(jnp.int32)


def _count_before(
  sorted_rn: jax.Array, lo_rl: jax.Array, hi_rl: jax.Array, below_rl: Callable[[jax.Array], jax.Array]
) -> jax.Array:
  """Vectorised binary search: the first ``p`` in ``[lo, hi)`` with ``not below(sorted[p])`` (``hi`` if none).

  ``below_rl(values_rl)`` must be true on a prefix of each ``sorted_rn[r, lo:hi]`` and false after it. A fixed
  ``bit_length(n)`` halvings of ``[lo, hi)`` (the interval never exceeds ``n``) make it a static loop.
  """
  n = sorted_rn.shape[-1]

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    below = (lo < hi) & below_rl(jnp.take_along_axis(sorted_rn, jnp.minimum(mid, n - 1), axis=-1))
    return jnp.where(below, mid + 1, lo), jnp.where(below | (lo >= hi), hi, mid)

  lo, _ = jax.lax.fori_loop(0, n.bit_length(), halve, (lo_rl, hi_rl))
  return lo


def _sorted_negatives(
  key: jax.Array, items: jax.Array, targets: jax.Array, seq_ids: jax.Array, num_items: int
) -> jax.Array:
  """``sample_negatives`` in ``O(len log len)`` time and ``O(len)`` memory: one sort and binary searches.

  The row's ``2 * len`` (user, item) tokens are sorted lexicographically (two sort keys, so no combined key
  can overflow), tokens outside ``1..num_items`` last in their user's segment. Within a segment the first
  of each run of equal items is the user's next distinct item ``s_k``, with ``k`` the number of such
  firsts so far in the segment (exact integer counts: a cumsum of the firsts, less its value at the
  segment start).
  ``s_k - k`` never decreases with ``k``, and a repeat of ``s_k`` has the same item and count and so the
  same ``s_k - k``: the segment's ``item - count`` is non-decreasing over its valid tokens (invalid ones get
  ``int32.max``). Each position then binary-searches its user's segment ``[lo, hi)`` in the sorted user
  ids, takes ``m = firsts_before[hi] - firsts_before[lo]``, draws ``u``, binary-searches the end ``p`` of the
  segment's ``item - count <= u`` prefix, and skips ``firsts_before[p] - firsts_before[lo]`` items: the same
  integer counts as the pairwise form, hence the same negatives.
  """
  big = jnp.iinfo(jnp.int32).max
  tokens = jnp.concatenate([items, targets], axis=-1).astype(jnp.int32)  # [r, n], n = 2l
  users = jnp.concatenate([seq_ids, seq_ids], axis=-1)
  valid = (tokens > 0) & (tokens <= num_items)
  users_rn, items_rn = jax.lax.sort((users, jnp.where(valid, tokens, big)), dimension=-1, num_keys=2)
  rows, n = items_rn.shape
  iota_rn = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows, n))
  new_user = jnp.concatenate([jnp.ones((rows, 1), bool), users_rn[:, 1:] != users_rn[:, :-1]], axis=-1)
  new_item = jnp.concatenate([jnp.ones((rows, 1), bool), items_rn[:, 1:] != items_rn[:, :-1]], axis=-1)
  first = (items_rn != big) & (new_user | new_item)
  # [r, n + 1]: first occurrences strictly before each position (and in the whole row, last column).
  firsts_before = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), jnp.cumsum(first, axis=-1, dtype=jnp.int32)], -1)
  segment_start = jax.lax.cummax(jnp.where(new_user, iota_rn, 0), axis=1)
  # k at the first occurrence of s_k, and again at its repeats (so they carry s_k - k too).
  count = firsts_before[:, 1:] - jnp.take_along_axis(firsts_before, segment_start, axis=-1)
  gap_rn = jnp.where(items_rn != big, items_rn - count, big)  # non-decreasing within each user's segment

  zeros_rl = jnp.zeros_like(seq_ids, jnp.int32)
  lo = _count_before(users_rn, zeros_rl, zeros_rl + n, lambda user: user < seq_ids)
  hi = _count_before(users_rn, lo, zeros_rl + n, lambda user: user <= seq_ids)
  firsts_at_lo = jnp.take_along_axis(firsts_before, lo, axis=-1)
  num_owned = jnp.take_along_axis(firsts_before, hi, axis=-1) - firsts_at_lo
  u = _draw(key, items.shape, num_items, num_owned)
  end = _count_before(gap_rn, lo, hi, lambda gap: gap <= u)
  skip = jnp.take_along_axis(firsts_before, end, axis=-1) - firsts_at_lo
  return jnp.clip(u + 1 + skip, 1, num_items).astype(jnp.int32)


def bce_loss(
  hidden_rld: jax.Array,
  table_vd: jax.Array,
  targets: jax.Array,
  negatives: jax.Array,
  exclude_rle: jax.Array | None = None,
) -> jax.Array:
  """Reference loss: ``-log sigmoid(s_pos) - log(1 - sigmoid(s_neg))`` with one negative per position (its
  term dropped where the negative is excluded at that position)."""
  pos = jnp.sum(hidden_rld * table_vd[targets], axis=-1)
  neg = jnp.sum(hidden_rld * table_vd[negatives], axis=-1)
  neg_term = -jax.nn.log_sigmoid(-neg)
  if exclude_rle is not None:
    neg_term = jnp.where(_excluded(negatives, exclude_rle), 0.0, neg_term)
  per_token = -jax.nn.log_sigmoid(pos) + neg_term
  return masked_mean(per_token, (targets > 0).astype(hidden_rld.dtype))


NEGATIVES = ("uniform", "popularity", "in_batch", "mixed")


def sampled_softmax(
  hidden_rld: jax.Array,
  table_vd: jax.Array,
  targets: jax.Array,
  negatives_n: jax.Array,
  exclude_rle: jax.Array | None = None,
  log_count_n: jax.Array | None = None,
) -> jax.Array:
  """Softmax over the target and ``N`` negatives shared by the batch.

  A negative that happens to equal the token's target, or one of its excluded items, or the padding id 0 (an
  in-batch negative from a padding token) is masked out of that token's softmax.

  With ``log_count_n`` (``log`` of each negative's expected number of occurrences among the ``N``,
  ``negative_log_counts``), each negative's logit is corrected by it (the logQ correction): ``sum_j exp(s_j -
  log E[count_j])`` over the drawn ``j`` is then an unbiased estimate of the softmax normaliser over all items,
  whatever the sampler, so the loss approaches full CE as ``N`` grows. Without it (the original uniform form)
  the negatives stand for themselves only.
  """
  pos = jnp.sum(hidden_rld.astype(jnp.float32) * table_vd[targets], axis=-1, keepdims=True)  # [r, l, 1]
  neg = precision.item_scores(hidden_rld, table_vd[negatives_n])  # [r, l, n] float32
  if log_count_n is not None:
    neg = neg - log_count_n.astype(jnp.float32)
  masked = (negatives_n[None, None, :] == targets[..., None]) | (negatives_n == 0)
  if exclude_rle is not None:
    masked = masked | _excluded(negatives_n, exclude_rle)
  neg = jnp.where(masked, jnp.finfo(neg.dtype).min, neg)
  logits = jnp.concatenate([pos, neg], axis=-1)
  per_token = jax.nn.logsumexp(logits, axis=-1) - pos[..., 0]
  return masked_mean(per_token, (targets > 0).astype(hidden_rld.dtype))


def popularity_weights(item_counts) -> jax.Array:
  """``[num_items + 1]`` float32 weights of popularity draws: training counts plus one (add-one smoothing: an item
  never seen in training can still be drawn, so the corrected estimate of the normaliser covers every item);
  0 for the padding id."""
  counts = jnp.asarray(item_counts, jnp.float32)
  return (counts + 1.0).at[0].set(0.0)


def draw_negatives(
  key: jax.Array, kind: str, num: int, num_items: int, targets: jax.Array, item_counts: jax.Array | None
) -> jax.Array:
  """The batch's shared negatives ``[N]`` (int32 ids, 0 = none) of ``sampled_softmax``.

  ``'uniform'``: ``num`` ids uniform on ``1..num_items``; ``'popularity'``: ``num`` ids drawn with replacement
  in proportion to ``item_counts + 1`` (``popularity_weights``; inverse CDF: a cumulative sum and ``num`` binary
  searches, no ``[num, items]`` array); ``'in_batch'``: the batch's targets (``rows * len``, padding 0);
  ``'mixed'``: the in-batch ones then ``num`` uniform ones (mixed negative sampling: frequent items from the
  batch, the tail from the uniform draw).
  """
  if kind == "uniform":
    return jax.random.randint(key, (num,), 1, num_items + 1, dtype=jnp.int32)
  if kind == "popularity":
    cdf = jnp.cumsum(popularity_weights(item_counts))
    u = jax.random.uniform(key, (num,), maxval=cdf[-1])
    return jnp.clip(jnp.searchsorted(cdf, u, side="right"), 1, num_items).astype(jnp.int32)
  in_batch = targets.reshape(-1).astype(jnp.int32)
  if kind == "in_batch":
    return in_batch
  if kind == "mixed":
    return jnp.concatenate([in_batch, draw_negatives(key, "uniform", num, num_items, targets, None)])
  raise ValueError(f"train.negatives must be one of {NEGATIVES}, got {kind!r}")


def negative_log_counts(
  negatives_n: jax.Array, kind: str, num: int, num_items: int, targets: jax.Array, item_counts: jax.Array | None
) -> jax.Array:
  """``log E[count]`` of each negative's id among the batch's negatives (``draw_negatives``), for the logQ
  correction: ``num / num_items`` for uniform draws, ``num * w_j / sum w`` for popularity draws
  (``popularity_weights``), ``T * q_j`` in-batch (the batch's ``T`` real targets follow the training frequency
  ``q = item_counts / sum``) and their sum for ``'mixed'``. Padding ids get 0 (they are masked anyway)."""
  uniform = num / num_items
  if kind == "uniform":
    expected = jnp.full(negatives_n.shape, uniform, jnp.float32)
  elif kind == "popularity":
    weights = popularity_weights(item_counts)
    expected = num * weights[negatives_n] / jnp.sum(weights)
  else:
    counts = jnp.asarray(item_counts, jnp.float32)
    expected = jnp.sum(targets > 0).astype(jnp.float32) * counts[negatives_n] / jnp.sum(counts)
    if kind == "mixed":
      expected = expected + uniform
  return jnp.where(expected > 0, jnp.log(jnp.where(expected > 0, expected, 1.0)), 0.0)


def view_contrastive(h1_rld: jax.Array, h2_rld: jax.Array, seq_ids: jax.Array, real: jax.Array, temperature: float):
  """Contrastive loss between two dropout views of the same positions (NT-Xent, as DuoRec's unsupervised term).

  Every real position of either view is an anchor: its positive is the same position in the other view, its
  negatives are both views of every real position of *other* users in the batch (a user's other positions
  share its history, so they are neither). Similarity is the dot product over ``temperature``.

  Args:
    h1_rld, h2_rld: ``[rows, len, hidden]`` hidden states of the two views.
    seq_ids: ``[rows, len]`` user slot within the row (0 = padding); a user is ``(row, seq_id)``.
    real: ``[rows, len]`` bool, the positions that take part (the loss tokens).
    temperature: > 0.

  Returns:
    The mean over anchors of ``logsumexp(positive, negatives) - positive`` (0 for an anchor with no negative).
  """
  rows, length, d = h1_rld.shape
  n = rows * length
  z = jnp.concatenate([h1_rld.reshape(n, d), h2_rld.reshape(n, d)]).astype(jnp.float32)
  owner = (jnp.arange(rows)[:, None] * (length + 1) + seq_ids).reshape(n)
  owner = jnp.concatenate([owner, owner])
  ok = jnp.concatenate([real.reshape(n), real.reshape(n)])
  sim = (z @ z.T) / temperature  # [2n, 2n]
  idx = jnp.arange(2 * n)
  partner = (idx + n) % (2 * n)
  candidate = (ok[None, :] & (owner[:, None] != owner[None, :])) | (idx[None, :] == partner[:, None])
  lse = jax.nn.logsumexp(jnp.where(candidate, sim, -jnp.inf), axis=-1)
  return masked_mean(lse - sim[idx, partner], ok.astype(jnp.float32))
