"""Full-softmax cross-entropy over an item table sharded along the vocabulary.

Under ``jax.shard_map`` each device holds ``vocab_size / model`` rows of the table and a ``1 / data`` share
of the tokens. It computes the logits of its tokens against its rows only (``[tokens / data,
vocab / model]``; the full ``[tokens, vocab]`` logits never exist on one device and the table is never
gathered), and combines the softmax normaliser across the ``model`` axis as a log-sum-exp of per-shard
log-sum-exps: ``lse = m + log(psum(sum(exp(x - m))))`` with ``m = pmax(local max)``. The target's logit
lives on exactly one shard and is summed in with a ``psum``. The masked mean over real target tokens
is then summed over ``data``. Gradients flow through the collectives (``psum`` transposes to a
broadcast), so the backward pass is sharded the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from recgpt_jax.model import precision
from recgpt_jax.train import blocked_ce, losses


def _varying(x: jax.Array, axis: str) -> jax.Array:
  """``x`` marked as varying over the manual mesh ``axis`` (``jax.lax.pcast``; ``pvary`` before it existed)."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axis, to="varying")
  return jax.lax.pvary(x, axis)


def sharded_softmax_ce(
  hidden_rld: jax.Array,
  table_vd: jax.Array,
  targets_rl: jax.Array,
  *,
  mesh: Mesh,
  num_valid: int,
  bias_v: jax.Array | None = None,
  exclude_rle: jax.Array | None = None,
  data_axis: str = "data",
  vocab_axis: str = "model",
  block: int = 0,
) -> jax.Array:
  """Mean cross-entropy of the real targets (``> 0``) against all items ``1..num_valid - 1``.

  Equal to ``losses.full_softmax_ce(hidden @ table.T + bias, targets, exclude_rle)`` with the columns
  ``>= num_valid`` (vocabulary padding) excluded, computed without gathering the table or the logits.

  Args:
    hidden_rld: ``[rows, len, hidden]``, rows split over ``data_axis``.
    table_vd: ``[vocab_size, hidden]``, rows split over ``vocab_axis`` (vocab_size divisible by its size).
    targets_rl: ``[rows, len]`` target ids, 0 = no loss.
    mesh: the device mesh.
    num_valid: ids ``>= num_valid`` are padding rows of the table and never candidates (``num_items + 1``).
    bias_v: optional ``[vocab_size]`` bias (untied head), split like the table.
    exclude_rle: optional ``[rows, len, E]`` item ids per position that leave its softmax (0 = none), split
      like the targets; each shard masks the ones it holds (``losses.mask_items``).
    data_axis: mesh axis the rows are split over.
    vocab_axis: mesh axis the vocabulary is split over.
    block: if > 0, each device sweeps its shard in blocks of this many rows (``train.blocked_ce``), so not
      even its ``[tokens / data, vocab / model]`` logits exist; 0 materialises them.

  Returns:
    Scalar loss (replicated).
  """
  vocab = table_vd.shape[0]
  shards = mesh.shape[vocab_axis]
  if vocab % shards:
    raise ValueError(f"the item table's {vocab} rows do not split over the {shards} devices of {vocab_axis!r}")
  if bias_v is None:
    bias_v = jnp.zeros((vocab,), jnp.float32)

  def local(h_rld, t_vd, b_v, y_rl, ex_rle):
    v_loc = t_vd.shape[0]
    offset = jax.lax.axis_index(vocab_axis) * v_loc
    mine = (y_rl >= offset) & (y_rl < offset + v_loc)
    rows_rl = jnp.clip(y_rl - offset, 0, v_loc - 1)
    if block:
      r, length, d = h_rld.shape
      h_nd = h_rld.reshape(r * length, d)
      ex = None if ex_rle is None else ex_rle.reshape(r * length, -1).astype(jnp.int32)
      # The custom VJP returns cotangents varying over both axes: mark the tokens as varying over the vocabulary
      # shards and the table over the data shards, so their transposes sum those cotangents back.
      lse_loc = blocked_ce.blocked_logsumexp(
        _varying(h_nd, vocab_axis),
        _varying(t_vd, data_axis),
        _varying(b_v, data_axis),
        ex,
        offset.astype(jnp.int32),
        blocked_ce.check_block(block, v_loc),
        num_valid,
      ).reshape(r, length)
      m = jax.lax.pmax(jax.lax.stop_gradient(lse_loc), vocab_axis)  # a constant shift
      lse = m + jnp.log(jax.lax.psum(jnp.exp(lse_loc - m), vocab_axis))
      picked = blocked_ce.target_logits(h_nd, t_vd, b_v, rows_rl.reshape(-1)).reshape(r, length)
    else:
      ids = offset + jnp.arange(v_loc)
      logits = precision.item_scores(h_rld, t_vd, b_v)  # float32 whatever the activation dtype
      low = jnp.finfo(logits.dtype).min
      logits = jnp.where((ids == 0) | (ids >= num_valid), low, logits)
      if ex_rle is not None:
        logits = losses.mask_items(logits, ex_rle, offset)
      m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), vocab_axis)  # [r, l], a constant shift
      sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), vocab_axis)
      lse = m + jnp.log(sum_exp)
      picked = jnp.take_along_axis(logits, rows_rl[..., None], axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(mine, picked, 0.0), vocab_axis)
    weights = (y_rl > 0).astype(jnp.float32)
    total = jax.lax.psum(jnp.sum((lse - target_logit) * weights), data_axis)
    count = jax.lax.psum(jnp.sum(weights), data_axis)
    return total / jnp.maximum(count, 1.0)

  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P(data_axis), P(vocab_axis), P(vocab_axis), P(data_axis), None if exclude_rle is None else P(data_axis)),
    out_specs=P(),
  )(hidden_rld, table_vd, bias_v, targets_rl, exclude_rle)
