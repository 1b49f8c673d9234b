"""Causal Flow-Attention over packed rows in linear time: chunked, with sums carried across chunks.

``attention.flow_attention_parts`` forms ``[b, h, len, len]`` masked matrices, which is cheap at ``len``
around 50-128 but quadratic in time and memory. Every quantity of the Flow-Attention formulas is a
*segmented causal prefix sum* (a sum over the earlier tokens of the same user) followed by per-token
arithmetic, so it can be computed chunk by chunk: the row is cut into ``len / C`` chunks of ``C``
positions; inside a chunk the prefix sums are ``C x C`` masked products, and the part of a sum that
comes from earlier chunks is a per-chunk total carried along the chunks.

Chunk-parallel form. For one prefix sum ``cs(x)``, let ``t_c`` be the chunk-local sum at the last
position of chunk ``c`` (over that token's own user) and ``g_c`` be 1 when that user's tokens began
before chunk ``c``. The full prefix sum at the end of chunk ``c`` is ``P_c = t_c + g_c P_{c-1}``, an
affine recurrence with 0/1 gates over the ``len / C`` chunks (a ``lax.scan`` of tiny steps, or
``lax.associative_scan``); a token then adds ``P_{c-1}`` to its chunk-local sum iff its user's tokens
began before its chunk. All the heavy work (the ``C x C`` products) runs for all chunks at once.
Every sum is a sum of the terms themselves, never a difference of two long prefix sums, so float32
loses nothing to cancellation at long ``len``. The formulas are two-pass and the passes run in order,
each over all chunks at once: ``cs(K)``, ``cs(Q)`` (giving ``in``, ``out``);
``cs(K out)``, ``cs(Q in)`` (giving ``sink``, ``src``); ``cs(exp(src))`` (giving ``comp``); and the
matrix ``sum_j K_j (comp_j V_j)^T`` carried as a ``[d, d]`` state per chunk.

Cost per ``(batch, head)``: ``O(len (C d + d^2))`` time and ``O(len (C + d + d^2 / C))`` memory, also
for the backward pass; nothing of size ``len x len`` is ever formed.

Segments: a sum carries from token ``j`` to token ``i`` iff both are in the same *run* of one non-zero
``seq_id`` (equal ids with only that id in between). Contract: a non-zero ``seq_id`` does not reappear
in a row after a different id (packing writes each user's tokens contiguously); under it runs are users
and the results equal ``flow_attention_parts(q, k, v, causal_packed_mask(seq_ids))``, which masks by id
equality alone.

Precision: whatever the input dtype, everything (sigmoids, normalisers, prefix sums, ``exp`` and
compensation, the carried ``[d, d]`` state and the output sums) is computed in float32; ``y`` is returned
in ``v``'s dtype and the parts (an incremental decoder's float32 state) in float32, as by
``flow_attention_parts``.

No attention dropout: a linear-time form never forms the attention weights that dropout would act on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recgpt_jax.model.attention import FLOW_EPS

_F32 = jnp.float32
CARRIES = ("scan", "associative")


def _segments(seq_ids_bl: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-chunk masks of a padded row of ``seq_ids``.

  Args:
    seq_ids_bl: ``[b, len]`` int, ``len`` a multiple of ``chunk``; 0 = padding.
    chunk: the chunk size ``C``.

  Returns:
    ``(mask_bnij, from_prev_bnc, n_bnc, valid_bnc)`` with ``N = len / C`` chunks: ``mask_bnij[b, n, i, j]``
    (float32) is 1 iff local key ``j`` of chunk ``n`` is in query ``i``'s run and ``j <= i``;
    ``from_prev_bnc`` (float32) is 1 iff the token's run began in an earlier chunk (it takes the carried
    sums); ``n_bnc`` (float32) is the number of the run's tokens up to and including this one (0 at
    padding); ``valid_bnc`` (bool) is ``seq_id != 0``.
  """
  b, length = seq_ids_bl.shape
  num_chunks = length // chunk
  valid_bl = seq_ids_bl != 0
  change_bl = jnp.concatenate([jnp.ones((b, 1), bool), seq_ids_bl[:, 1:] != seq_ids_bl[:, :-1]], axis=1)
  # Run index (exact integers): equal run = same contiguous stretch of one id.
  run_bl = jnp.cumsum(change_bl.astype(jnp.int32), axis=1)
  pos_l = jnp.arange(length, dtype=jnp.int32)
  start_bl = jax.lax.cummax(jnp.where(change_bl, pos_l, 0), axis=1)
  n_bl = jnp.where(valid_bl, pos_l - start_bl + 1, 0).astype(_F32)

  run_bnc = run_bl.reshape(b, num_chunks, chunk)
  valid_bnc = valid_bl.reshape(b, num_chunks, chunk)
  causal_ij = jnp.tril(jnp.ones((chunk, chunk), bool))
  # A valid key in the query's run makes the query valid too (same run, same id).
  mask_bnij = (run_bnc[:, :, :, None] == run_bnc[:, :, None, :]) & valid_bnc[:, :, None, :] & causal_ij
  # Run of the token just before each chunk (-1 before the first chunk: matches nothing).
  prev_run_bn = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), run_bnc[:, :-1, -1]], axis=1)
  from_prev_bnc = valid_bnc & (run_bnc == prev_run_bn[:, :, None])
  return mask_bnij.astype(_F32), from_prev_bnc.astype(_F32), n_bl.reshape(b, num_chunks, chunk), valid_bnc


def _carried(tail_bhn: jax.Array, gate_bn: jax.Array, how: str) -> jax.Array:
  """Exclusive segmented scan over chunks: the sum each chunk takes over from the chunks before it.

  Args:
    tail_bhn: ``[b, h, N, ...]``, ``t_c``: chunk ``c``'s local sum over the run of its last token.
    gate_bn: ``[b, N]`` float 0/1, ``g_c``: whether chunk ``c``'s last token's run began before chunk ``c``.
    how: ``"scan"`` (sequential over the ``N`` chunks) or ``"associative"`` (log depth); see
      ``flow_attention_chunked``.

  Returns:
    ``[b, h, N, ...]``: ``P_{c-1}`` for chunk ``c`` (zero for the first), where ``P_c = t_c + g_c P_{c-1}``
    is the full sum over the run of chunk ``c``'s last token up to that token.
  """
  gate = gate_bn.reshape(gate_bn.shape[0], 1, gate_bn.shape[1], *([1] * (tail_bhn.ndim - 3)))
  if how == "scan":

    def step(p_prev, gate_tail):
      g, t = gate_tail
      return t + g * p_prev, p_prev

    init = jnp.zeros_like(tail_bhn[:, :, 0])
    _, exclusive = jax.lax.scan(step, init, (jnp.moveaxis(gate, 2, 0), jnp.moveaxis(tail_bhn, 2, 0)))
    return jnp.moveaxis(exclusive, 0, 2)

  def combine(earlier, later):  # composes x -> t + g x, the earlier map first
    g_a, t_a = earlier
    g_b, t_b = later
    return g_a * g_b, t_b + g_b * t_a

  _, inclusive = jax.lax.associative_scan(combine, (gate, tail_bhn), axis=2)
  return jnp.concatenate([jnp.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], axis=2)


def _prefix_sum(x_bhncd: jax.Array, mask_bnij: jax.Array, from_prev_bnc: jax.Array, how: str) -> jax.Array:
  """Segmented causal prefix sum ``cs(x)`` over the row of ``x_bhncd`` ``[b, h, N, C, d]``."""
  local_bhncd = jnp.einsum("bnij,bhnjd->bhnid", mask_bnij, x_bhncd)
  carry_bhnd = _carried(local_bhncd[:, :, :, -1], from_prev_bnc[:, :, -1], how)
  return local_bhncd + from_prev_bnc[:, None, :, :, None] * carry_bhnd[:, :, :, None, :]


def flow_attention_chunked(
  q: jax.Array, k: jax.Array, v: jax.Array, seq_ids: jax.Array, *, chunk: int = 128, carry: str = "scan"
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal Flow-Attention over packed rows in linear time; same results as ``flow_attention_parts``.

  See the module docstring for the method, the segment contract and the precision. No dropout.

  Args:
    q: ``[b, h, len, d]`` queries, any float dtype (``q``, ``k``, ``v`` alike).
    k: ``[b, h, len, d]`` keys.
    v: ``[b, h, len, d]`` values.
    seq_ids: ``[b, len]`` int, which user a token belongs to within its row; 0 = padding.
    chunk: positions per chunk ``C``; ``len`` need not be a multiple (the row is padded internally).
    carry: how the per-chunk totals are carried along the ``N = len / C`` chunks: ``"scan"``, a
      ``lax.scan`` of ``N`` tiny steps (the smallest program: fastest to compile, as fast as the other
      on CPU), or ``"associative"``, ``lax.associative_scan`` (``log N`` depth: fewer sequential steps
      where each step has a fixed launch cost, i.e. TPU / GPU with many chunks). Both are linear in ``len``.

  Returns:
    ``(y, parts)`` as ``attention.flow_attention_parts(q, k, v, causal_packed_mask(seq_ids))``: ``y``
    ``[b, h, len, d]`` in ``v``'s dtype (zero at padding) and the float32 per-token prefix sums ``ks``,
    ``cs_k``, ``cs_q``, ``cs_kout``, ``cs_qin`` (``[b, h, len, d]``), ``cs_exp`` (``[b, h, len]``) and
    ``comp_v`` (``[b, h, len, d]``).
  """
  eps = FLOW_EPS
  if carry not in CARRIES:
    raise ValueError(f"unknown carry {carry!r}; expected one of {CARRIES}")
  out_dtype = v.dtype
  b, h, length, d = q.shape
  chunk = max(1, min(chunk, length))
  padded = -(-length // chunk) * chunk
  num_chunks = padded // chunk

  def to_chunks(x_bhld):  # float32, padded with zero tokens, [b, h, N, C, d]
    x_bhld = x_bhld.astype(_F32)
    if padded != length:
      x_bhld = jnp.pad(x_bhld, ((0, 0), (0, 0), (0, padded - length), (0, 0)))
    return x_bhld.reshape(b, h, num_chunks, chunk, d)

  seq_ids = jnp.pad(seq_ids, ((0, 0), (0, padded - length))) if padded != length else seq_ids
  mask_bnij, from_prev_bnc, n_bnc, valid_bnc = _segments(seq_ids, chunk)
  n_b1nc, valid_b1nc, from_prev_b1nc = n_bnc[:, None], valid_bnc[:, None], from_prev_bnc[:, None]
  n_safe = jnp.where(valid_b1nc, n_b1nc, 1.0)
  cs = lambda x: _prefix_sum(x, mask_bnij, from_prev_bnc, carry)

  qs, ks, vv = jax.nn.sigmoid(to_chunks(q)), jax.nn.sigmoid(to_chunks(k)), to_chunks(v)
  # Pass 1: cs(K), cs(Q) in one product -> inflow / outflow of every token.
  cs_k, cs_q = jnp.split(cs(jnp.concatenate([ks, qs], axis=-1)), 2, axis=-1)
  inflow = n_b1nc / jnp.sum((qs + eps) * (cs_k + eps), axis=-1)
  outflow = n_b1nc / jnp.sum((ks + eps) * (cs_q + eps), axis=-1)
  # Pass 2: cs(K out), cs(Q in) -> sink, src.
  cs_kout, cs_qin = jnp.split(cs(jnp.concatenate([ks * outflow[..., None], qs * inflow[..., None]], axis=-1)), 2, -1)
  sink = jnp.sum((qs + eps) * (cs_kout + eps), axis=-1) / n_safe
  src = jnp.clip(jnp.sum((ks + eps) * (cs_qin + eps), axis=-1) / n_safe, -1.0, 1.0)
  alloc = jax.nn.sigmoid(sink)
  # Pass 3: cs(exp(src)) -> competition.
  exp_src = jnp.where(valid_b1nc, jnp.exp(src), 0.0)
  cs_exp = cs(exp_src[..., None])[..., 0]
  comp = n_b1nc * exp_src / jnp.where(valid_b1nc, cs_exp, 1.0)
  comp_v = comp[..., None] * vv
  # Pass 4: y_i = alloc_i <Q_i in_i / n_i, sum_{j <= i} K_j (comp_j V_j)^T>: within the chunk by C x C
  # weights, from earlier chunks through the carried [d, d] state of the run.
  q_scaled = qs * (inflow / n_safe)[..., None]
  weights_bhnij = jnp.einsum("bhnid,bhnjd->bhnij", q_scaled, ks) * mask_bnij[:, None]
  y_local = jnp.einsum("bhnij,bhnjd->bhnid", weights_bhnij, comp_v)
  # Chunk-local state at each chunk's last token (its row of the mask), then carried along the chunks.
  kv_tail_bhnde = jnp.einsum("bnj,bhnjd,bhnje->bhnde", mask_bnij[:, :, -1], ks, comp_v)
  kv_prev_bhnde = _carried(kv_tail_bhnde, from_prev_bnc[:, :, -1], carry)
  y_carried = jnp.einsum("bhnid,bhnde->bhnie", q_scaled, kv_prev_bhnde) * from_prev_b1nc[..., None]
  y = alloc[..., None] * (y_local + y_carried)

  def to_rows(x_bhnc):  # [b, h, N, C, ...] -> [b, h, len, ...]
    return x_bhnc.reshape(b, h, padded, *x_bhnc.shape[4:])[:, :, :length]

  parts = dict(ks=ks, cs_k=cs_k, cs_q=cs_q, cs_kout=cs_kout, cs_qin=cs_qin, cs_exp=cs_exp, comp_v=comp_v)
  return to_rows(y).astype(out_dtype), {name: to_rows(x) for name, x in parts.items()}
