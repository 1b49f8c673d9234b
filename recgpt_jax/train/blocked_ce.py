"""Full-softmax cross-entropy over a large item table without materialising the logits.

The materialised loss builds ``[tokens, items]`` float32 logits (and their gradient): at 2k tokens and
10^6 items that is 8 GB twice. Here the table is swept in blocks of ``block`` rows with an online
log-sum-exp (running max ``m`` and running sum ``s = sum exp(x - m)``, rescaled when the max grows), so the
forward pass holds one ``[tokens, block]`` block at a time. The backward pass is a custom VJP that
recomputes each block's logits from the saved normaliser: ``d lse / d x = softmax(x)``, so block by block
``p = exp(x - lse) * g``, ``dh += p @ table_blk``, ``dtable_blk = p^T h`` and ``dbias_blk = sum p``; no
per-block residual is kept between the passes (the classic memory-for-compute trade of fused CE kernels).

Blocks are ``lax.dynamic_slice`` windows of the unpadded table; the last one is shifted back to end at
the table's end and masks the columns it shares with the previous block, so no padded copy of the table
is ever made.

``blocked_softmax_ce`` equals ``losses.full_softmax_ce(hidden @ table.T + bias, targets, exclude)``; under
a vocabulary-sharded mesh ``parallel.vocab.sharded_softmax_ce(..., block=B)`` runs the same sweep over each
device's shard and combines the per-shard normalisers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from recgpt_jax.model import precision
from recgpt_jax.train import losses


def _block_logits(h_nd, table_vd, bias_v, exclude_ne, offset, k, *, block: int, num_valid: int):
  """Block ``k``'s logits ``[N, block]`` (float32) and the mask of its columns that are candidates.

  The block's window starts at ``min(k * block, V - block)`` (the last one shifted back); a column is a
  candidate when its global id ``offset + local`` is not 0, is ``< num_valid``, was not covered by an earlier
  block and is not among the token's excluded ids.
  """
  v = table_vd.shape[0]
  start = jnp.minimum(k * block, v - block)
  t_blk = jax.lax.dynamic_slice_in_dim(table_vd, start, block)
  b_blk = jax.lax.dynamic_slice_in_dim(bias_v, start, block)
  logits = precision.item_scores(h_nd, t_blk, b_blk)
  local = start + jnp.arange(block)
  ids = offset + local
  valid = (ids > 0) & (ids < num_valid) & (local >= k * block)
  valid = jnp.broadcast_to(valid, logits.shape)
  if exclude_ne is not None:
    hit = jnp.any(ids[None, :, None] == exclude_ne[:, None, :], axis=-1)
    valid = valid & ~hit
  return logits, valid, start, t_blk


def _num_blocks(v: int, block: int) -> int:
  return -(-v // block)


def _lse_forward(h_nd, table_vd, bias_v, exclude_ne, offset, block, num_valid):
  low = jnp.finfo(jnp.float32).min

  def step(k, carry):
    m, s = carry
    logits, valid, _, _ = _block_logits(h_nd, table_vd, bias_v, exclude_ne, offset, k, block=block, num_valid=num_valid)
    m_new = jnp.maximum(m, jnp.max(jnp.where(valid, logits, low), axis=-1))
    e = jnp.where(valid, jnp.exp(logits - m_new[:, None]), 0.0)
    return m_new, s * jnp.exp(m - m_new) + jnp.sum(e, axis=-1)

  # Block 0 outside the loop: the carry then has the inputs' sharding (under shard_map, varying over the mesh
  # axes of both the tokens and the table), as the loop body's output does.
  n = h_nd.shape[0]
  first = step(0, (jnp.full((n,), low, jnp.float32), jnp.zeros((n,), jnp.float32)))
  m, s = jax.lax.fori_loop(1, _num_blocks(table_vd.shape[0], block), step, first)
  # A token with no candidate at all (no item in this shard) has s = 0: its lse is the lowest float, so it
  # adds nothing to a cross-shard log-sum-exp and gets no gradient.
  return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), low)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def blocked_logsumexp(h_nd, table_vd, bias_v, exclude_ne, offset, block: int, num_valid: int):
  """``logsumexp`` over the candidate columns of ``h @ table.T + bias``, ``[N]`` float32, in blocks.

  Args:
    h_nd: ``[N, d]`` hidden states (any float dtype; the product accumulates in float32).
    table_vd: ``[V, d]`` item rows with global ids ``offset .. offset + V - 1``; ``block <= V``.
    bias_v: ``[V]`` bias (zeros for the tied head).
    exclude_ne: ``[N, E]`` global ids that are not candidates of each token (0 = none), or ``None``.
    offset: global id of the table's first row (an int array: traced under ``shard_map``).
    block: rows per block (static).
    num_valid: ids ``>= num_valid`` (vocabulary padding) and id 0 are never candidates (static).
  """
  return _lse_forward(h_nd, table_vd, bias_v, exclude_ne, offset, block, num_valid)


def _lse_fwd(h_nd, table_vd, bias_v, exclude_ne, offset, block, num_valid):
  lse = _lse_forward(h_nd, table_vd, bias_v, exclude_ne, offset, block, num_valid)
  return lse, (h_nd, table_vd, bias_v, exclude_ne, offset, lse)


def _lse_bwd(block, num_valid, residuals, g_n):
  h_nd, table_vd, bias_v, exclude_ne, offset, lse = residuals
  g_n = g_n.astype(jnp.float32)

  def step(k, carry):
    dh, dt, db = carry
    logits, valid, start, t_blk = _block_logits(
      h_nd, table_vd, bias_v, exclude_ne, offset, k, block=block, num_valid=num_valid
    )
    p = jnp.where(valid, jnp.exp(logits - lse[:, None]), 0.0) * g_n[:, None]  # [N, block] float32
    dh = dh + jnp.einsum("nb,bd->nd", p, t_blk.astype(jnp.float32))
    dt_blk = jnp.einsum("nb,nd->bd", p, h_nd.astype(jnp.float32))
    # Overlapping columns of the shifted last block have p = 0, so adding (not setting) is exact.
    dt = jax.lax.dynamic_update_slice_in_dim(dt, jax.lax.dynamic_slice_in_dim(dt, start, block) + dt_blk, start, 0)
    db = jax.lax.dynamic_update_slice_in_dim(db, jax.lax.dynamic_slice_in_dim(db, start, block) + p.sum(0), start, 0)
    return dh, dt, db

  init = (
    jnp.zeros(h_nd.shape, jnp.float32),
    jnp.zeros(table_vd.shape, jnp.float32),
    jnp.zeros(bias_v.shape, jnp.float32),
  )
  first = step(0, init)  # outside the loop, as in the forward pass
  dh, dt, db = jax.lax.fori_loop(1, _num_blocks(table_vd.shape[0], block), step, first)
  return dh.astype(h_nd.dtype), dt.astype(table_vd.dtype), db.astype(bias_v.dtype), None, None


blocked_logsumexp.defvjp(_lse_fwd, _lse_bwd)


def target_logits(h_nd: jax.Array, table_vd: jax.Array, bias_v: jax.Array, rows_n: jax.Array) -> jax.Array:
  """``[N]`` float32 logits of one table row per token (``rows_n``: local row indices), by a gather: the same
  products as ``precision.item_scores`` (the table in the hidden states' dtype, a float32 sum)."""
  picked = table_vd[rows_n].astype(h_nd.dtype)
  return jnp.einsum("nd,nd->n", h_nd, picked, preferred_element_type=jnp.float32) + bias_v[rows_n].astype(jnp.float32)


def check_block(block: int, table_rows: int) -> int:
  """The block size to use for a table (shard) of ``table_rows`` rows: ``block``, capped at the table."""
  if block < 1:
    raise ValueError(f"the CE block must be >= 1 item rows, got {block}")
  return min(block, table_rows)


def blocked_softmax_ce(
  hidden_rld: jax.Array,
  table_vd: jax.Array,
  targets_rl: jax.Array,
  *,
  block: int,
  num_valid: int,
  bias_v: jax.Array | None = None,
  exclude_rle: jax.Array | None = None,
) -> jax.Array:
  """Mean cross-entropy of the real targets (``> 0``) against items ``1..num_valid - 1``, in item blocks.

  Equal to ``losses.full_softmax_ce(hidden @ table.T + bias, targets, exclude_rle)`` with the columns
  ``>= num_valid`` excluded (tested to 1e-5 in loss and gradients), with ``[tokens, block]`` float32 working
  memory instead of ``[tokens, V]``.
  """
  rows, length, d = hidden_rld.shape
  v = table_vd.shape[0]
  block = check_block(block, v)
  if bias_v is None:
    bias_v = jnp.zeros((v,), jnp.float32)
  h_nd = hidden_rld.reshape(rows * length, d)
  ex = None if exclude_rle is None else exclude_rle.reshape(rows * length, -1).astype(jnp.int32)
  y_n = targets_rl.reshape(-1).astype(jnp.int32)
  lse = blocked_logsumexp(h_nd, table_vd, bias_v, ex, jnp.int32(0), block, num_valid)
  per_token = lse - target_logits(h_nd, table_vd, bias_v, y_n)
  return losses.masked_mean(per_token, (y_n > 0).astype(jnp.float32))
