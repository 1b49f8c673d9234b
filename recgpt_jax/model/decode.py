"""Incremental decoding: encode packed histories once, then append one token per user per step.

``prefill`` encodes the packed rows of an evaluation batch (``packing.pack_eval_batches``) and returns,
per user slot, the hidden state at the user's last history position plus a per-layer decode state.
``decode_step`` appends one token per user (``[U]``-shaped inputs) and processes that single position
against the state, so ``k`` extra positions cost ``k`` one-token passes instead of ``k`` re-encodings.

Decode state per layer and user:

* softmax: a KV cache ``[U, heads, row_len + max_steps, head_dim]``: the user's packed row (other users'
  tokens and padding masked out by ``key_mask``) followed by room for ``max_steps`` appended tokens;
* flow: the prefix sums of ``attention.flow_attention`` at the user's last token -- ``cs(K)``, ``cs(Q)``,
  ``cs(K out)``, ``cs(Q in)`` ``[U, heads, head_dim]``, ``cs(exp(src))`` ``[U, heads]`` -- and the matrix
  ``sum_j K_j (comp_j V_j)^T`` ``[U, heads, head_dim, head_dim]``. In the parallel form every per-token
  quantity of token ``j`` (``in``, ``out``, ``src``, ``comp``) reads only prefix sums up to ``j`` and
  ``n_j``, so it is fixed once ``j`` is seen and later tokens only add to the sums: the state has a
  constant size, whatever the number of steps.

The math is the model's (``transformer.RecGPT``) with dropout off, computed with its own submodules and
parameters. The last layer of the prefill only evaluates the attention readout, residuals and FFN at the
users' last positions (other positions feed nothing downstream), which roughly halves a 1-layer prefill.
Positions are clipped to ``max_len - 1`` exactly as the model does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp

from recgpt_jax.model import attention
from recgpt_jax.model.transformer import Block, RecGPT

LayerState = dict[str, jax.Array]


@flax.struct.dataclass
class DecodeState:
  """What ``decode_step`` needs besides the parameters: a pytree of arrays with fixed shapes.

  Attributes:
    layers: one dict per block (see the module docstring for the keys and shapes).
    key_mask: softmax only (else None), ``[U, cache]`` bool: which cache slots hold the user's keys.
    cursor: int32 scalar, the next free cache slot (``row_len`` + appended tokens so far).
    length: ``[U]`` int32, the user's tokens so far (``n`` of the flow formulas).
    position: ``[U]`` int32, position of the user's last token (the next one usually takes ``+ 1``).
    user: ``[U]`` int32, the user id of each slot.
  """

  layers: tuple[LayerState, ...]
  key_mask: jax.Array | None
  cursor: jax.Array
  length: jax.Array
  position: jax.Array
  user: jax.Array


def _embed(model: RecGPT, items: jax.Array, positions: jax.Array, segments: jax.Array, users: jax.Array) -> jax.Array:
  """The model's input embedding (item + position + segment + user, then LayerNorm), any leading shape."""
  x = model.item_embed(items) + model.pos_embed(jnp.clip(positions, 0, model.cfg.max_len - 1))
  x = x + model.seg_embed(segments)
  if model.user_embed is not None:
    x = x + model.user_embed(users)
  return model.embed_norm(x)


def _block_forward(
  block: Block,
  x: jax.Array,
  attend: Callable[[jax.Array], tuple[jax.Array, LayerState]],
  select: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, LayerState]:
  """One block without dropout.

  Args:
    block: the model's block.
    x: block input, ``[..., hidden]``.
    attend: attention input -> (projected attention output at the selected positions, layer state).
    select: picks the positions to continue with from ``x`` (identity, or the users' last positions).

  Returns:
    The block output at the selected positions and the layer state.
  """
  ffn = lambda h: block.ffn_out(jax.nn.gelu(block.ffn_in(h), approximate=False))
  if block.pre_norm:
    a, layer = attend(block.norm1(x))
    x = select(x) + a
    return x + ffn(block.norm2(x)), layer
  a, layer = attend(x)
  h = block.norm1(select(x) + a)
  return block.norm2(h + ffn(h)), layer


def _split_heads(attn: attention.MultiHeadAttention, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``[..., hidden]`` -> q, k, v ``[..., heads, head_dim]`` through the block's own projection."""
  *lead, hidden = x.shape
  qkv = attn.qkv(x).reshape(*lead, 3, attn.num_heads, hidden // attn.num_heads)
  return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def _merge_heads(attn: attention.MultiHeadAttention, y: jax.Array) -> jax.Array:
  """``[..., heads, head_dim]`` -> output projection ``[..., hidden]``."""
  return attn.out(y.reshape(*y.shape[:-2], -1))


def _softmax_readout(q_uhd: jax.Array, k_uhcd: jax.Array, v_uhcd: jax.Array, key_mask_uc: jax.Array) -> jax.Array:
  """One query per user against its cache, as ``attention.softmax_attention`` does it. Returns ``[U, h, d]``."""
  scale = q_uhd.shape[-1] ** -0.5
  logits_uhc = jnp.einsum("uhd,uhcd->uhc", q_uhd * scale, k_uhcd)
  mask_u1c = key_mask_uc[:, None, :]
  logits_uhc = jnp.where(mask_u1c, logits_uhc, jnp.finfo(logits_uhc.dtype).min)
  weights_uhc = jax.nn.softmax(logits_uhc, axis=-1) * mask_u1c
  return jnp.einsum("uhc,uhcd->uhd", weights_uhc, v_uhcd)


def _flow_readout(qs_uhd: jax.Array, inflow_uh: jax.Array, alloc_uh: jax.Array, n_u1: jax.Array, kv_uhde: jax.Array):
  """``y = alloc (Q in / n)^T sum_j K_j (comp_j V_j)^T`` for one query per user. Returns ``[U, h, d]``."""
  q_scaled = qs_uhd * (inflow_uh / n_u1)[..., None]
  return alloc_uh[..., None] * jnp.einsum("uhd,uhde->uhe", q_scaled, kv_uhde)


def _flow_rows(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, with_output: bool):
  """Parallel masked flow attention over packed rows, also returning the per-token quantities.

  Mirrors ``attention.flow_attention`` (same formulas, same order of operations).

  Args:
    q: ``[r, h, len, d]`` queries (k, v alike).
    k: keys.
    v: values.
    mask: ``[r, 1, len, len]`` causal packed mask.
    with_output: also compute the attention output at every position.

  Returns:
    ``(y, stats)``: ``y`` ``[r, h, len, d]`` (None unless ``with_output``) and a dict of per-token arrays.
  """
  eps = attention.FLOW_EPS
  m_bhij = mask.astype(q.dtype)
  n_bhi = jnp.sum(m_bhij, axis=-1)
  valid_bhi = n_bhi > 0
  n_safe = jnp.where(valid_bhi, n_bhi, 1.0)

  def cumsum(x_bhjd):  # masked prefix sum over positions
    return jnp.einsum("bhij,bhjd->bhid", m_bhij, x_bhjd)

  qs = jax.nn.sigmoid(q)
  ks = jax.nn.sigmoid(k)
  cs_k, cs_q = cumsum(ks), cumsum(qs)
  inflow = n_bhi / jnp.sum((qs + eps) * (cs_k + eps), axis=-1)
  outflow = n_bhi / jnp.sum((ks + eps) * (cs_q + eps), axis=-1)
  cs_kout = cumsum(ks * outflow[..., None])
  cs_qin = cumsum(qs * inflow[..., None])
  sink = jnp.sum((qs + eps) * (cs_kout + eps), axis=-1) / n_safe
  src = jnp.clip(jnp.sum((ks + eps) * (cs_qin + eps), axis=-1) / n_safe, -1.0, 1.0)
  alloc = jax.nn.sigmoid(sink)
  exp_src = jnp.where(valid_bhi, jnp.exp(src), 0.0)
  cs_exp = jnp.einsum("bhij,bhj->bhi", m_bhij, exp_src)
  comp = n_bhi * exp_src / jnp.where(valid_bhi, cs_exp, 1.0)
  y = None
  if with_output:
    q_scaled = qs * (inflow / n_safe)[..., None]
    weights_bhij = jnp.einsum("bhid,bhjd->bhij", q_scaled, ks) * m_bhij * comp[:, :, None, :]
    y = alloc[..., None] * jnp.einsum("bhij,bhjd->bhid", weights_bhij, v)
  stats = dict(qs=qs, ks=ks, inflow=inflow, alloc=alloc, cs_k=cs_k, cs_q=cs_q, cs_kout=cs_kout, cs_qin=cs_qin)
  stats.update(cs_exp=cs_exp, comp_v=comp[..., None] * v)
  return y, stats


def _prefill_attention(
  attn: attention.MultiHeadAttention,
  x_rld: jax.Array,
  mask: jax.Array,
  last_row: jax.Array,
  last_col: jax.Array,
  n_u: jax.Array,
  max_steps: int,
  last_layer: bool,
) -> tuple[jax.Array, LayerState]:
  """Attention over packed rows plus the users' decode state.

  Returns:
    The projected attention output -- ``[r, len, hidden]`` for an inner layer, ``[U, hidden]`` at the
    users' last positions for the last layer -- and the layer state.
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in _split_heads(attn, x_rld))  # [r, h, len, d]
  user_mask_ul = mask[last_row, 0, last_col]  # the last query's keys: exactly the user's tokens
  at_last = lambda t: t[last_row, :, last_col]  # [r, h, len, ...] -> [U, h, ...]
  if attn.kind == "softmax":
    pad = ((0, 0), (0, 0), (0, max_steps), (0, 0))
    layer = {"k": jnp.pad(k[last_row], pad), "v": jnp.pad(v[last_row], pad)}  # [U, h, len + max_steps, d]
    if last_layer:
      return _merge_heads(attn, _softmax_readout(at_last(q), k[last_row], v[last_row], user_mask_ul)), layer
    y = attention.softmax_attention(q, k, v, mask)
  else:
    y, s = _flow_rows(q, k, v, mask, with_output=not last_layer)
    layer = {name: at_last(s[name]) for name in ("cs_k", "cs_q", "cs_kout", "cs_qin", "cs_exp")}
    # The matrix state sums over the user's tokens only: mask the gathered row.
    keys_uhld = s["ks"][last_row] * user_mask_ul[:, None, :, None].astype(q.dtype)
    layer["kv"] = jnp.einsum("uhld,uhle->uhde", keys_uhld, s["comp_v"][last_row])
    if last_layer:
      n_u1 = n_u[:, None].astype(q.dtype)
      y_u = _flow_readout(at_last(s["qs"]), at_last(s["inflow"]), at_last(s["alloc"]), n_u1, layer["kv"])
      return _merge_heads(attn, y_u), layer
  return _merge_heads(attn, jnp.swapaxes(y, 1, 2)), layer


def prefill(
  model: RecGPT,
  items: jax.Array,
  positions: jax.Array,
  segments: jax.Array,
  seq_ids: jax.Array,
  users: jax.Array,
  last_row: jax.Array,
  last_col: jax.Array,
  *,
  max_steps: int = 0,
) -> tuple[jax.Array, DecodeState]:
  """Encodes packed histories; returns each user's last hidden state and its decode state.

  Args:
    model: the model (e.g. ``nnx.merge(graphdef, params)`` inside a jit).
    items: ``[R, L]`` packed rows as in ``RecGPT.__call__`` (positions, segments, seq_ids, users alike).
    positions: ``[R, L]``.
    segments: ``[R, L]``.
    seq_ids: ``[R, L]``.
    users: ``[R, L]``.
    last_row: ``[U]`` row of each user slot's last token.
    last_col: ``[U]`` column of each user slot's last token. Empty slots may point at any real token;
      their outputs are then meaningless.
    max_steps: how many tokens ``decode_step`` may append (static; sizes the softmax cache, unused by
      flow). Appending more overwrites the last cache slot.

  Returns:
    ``hidden_ud`` ``[U, hidden]`` (the model's output at each user's last position) and the state.
  """
  n_u = jnp.sum(seq_ids[last_row] == seq_ids[last_row, last_col][:, None], axis=-1).astype(jnp.int32)  # [U]
  x = _embed(model, items, positions, segments, users)  # [R, L, hidden]
  mask = attention.causal_packed_mask(seq_ids)
  layers = []
  for i, block in enumerate(model.blocks):
    last_layer = i == len(model.blocks) - 1
    attend = functools.partial(
      _prefill_attention,
      block.attn,
      mask=mask,
      last_row=last_row,
      last_col=last_col,
      n_u=n_u,
      max_steps=max_steps,
      last_layer=last_layer,
    )
    select = (lambda t: t[last_row, last_col]) if last_layer else (lambda t: t)
    x, layer = _block_forward(block, x, attend, select)
    layers.append(layer)
  if model.final_norm is not None:
    x = model.final_norm(x)
  key_mask = None
  if model.cfg.attention == "softmax":
    key_mask = jnp.pad(mask[last_row, 0, last_col], ((0, 0), (0, max_steps)))  # [U, L + max_steps]
  state = DecodeState(
    layers=tuple(layers),
    key_mask=key_mask,
    cursor=jnp.asarray(seq_ids.shape[1], jnp.int32),
    length=n_u,
    position=positions[last_row, last_col],
    user=users[last_row, last_col],
  )
  return x, state


def _decode_attention(
  attn: attention.MultiHeadAttention,
  x_ud: jax.Array,
  layer: LayerState,
  key_mask: jax.Array | None,
  cursor: jax.Array,
  length: jax.Array,
) -> tuple[jax.Array, LayerState]:
  """Attention of one new token per user against the layer state; returns (``[U, hidden]``, new state)."""
  q, k, v = _split_heads(attn, x_ud)  # [U, h, d]
  if attn.kind == "softmax":
    k_cache = jax.lax.dynamic_update_slice_in_dim(layer["k"], k[:, :, None], cursor, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(layer["v"], v[:, :, None], cursor, axis=2)
    return _merge_heads(attn, _softmax_readout(q, k_cache, v_cache, key_mask)), {"k": k_cache, "v": v_cache}
  eps = attention.FLOW_EPS
  n = length[:, None].astype(x_ud.dtype)  # [U, 1], the count including the new token
  qs, ks = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
  cs_k, cs_q = layer["cs_k"] + ks, layer["cs_q"] + qs
  inflow = n / jnp.sum((qs + eps) * (cs_k + eps), axis=-1)  # [U, h]
  outflow = n / jnp.sum((ks + eps) * (cs_q + eps), axis=-1)
  cs_kout = layer["cs_kout"] + ks * outflow[..., None]
  cs_qin = layer["cs_qin"] + qs * inflow[..., None]
  sink = jnp.sum((qs + eps) * (cs_kout + eps), axis=-1) / n
  src = jnp.clip(jnp.sum((ks + eps) * (cs_qin + eps), axis=-1) / n, -1.0, 1.0)
  exp_src = jnp.exp(src)
  cs_exp = layer["cs_exp"] + exp_src
  comp = n * exp_src / cs_exp
  kv = layer["kv"] + jnp.einsum("uhd,uhe->uhde", ks, comp[..., None] * v)
  y = _flow_readout(qs, inflow, jax.nn.sigmoid(sink), n, kv)
  new = dict(cs_k=cs_k, cs_q=cs_q, cs_kout=cs_kout, cs_qin=cs_qin, cs_exp=cs_exp, kv=kv)
  return _merge_heads(attn, y), new


def decode_step(
  model: RecGPT,
  state: DecodeState,
  items: jax.Array,
  segments: jax.Array,
  positions: jax.Array,
  users: jax.Array,
) -> tuple[jax.Array, DecodeState]:
  """Appends one token per user and encodes that position only.

  Args:
    model: the model the state was built with.
    state: from ``prefill`` or a previous ``decode_step``.
    items: ``[U]`` item of the new token.
    segments: ``[U]`` its segment (1 for a generated item).
    positions: ``[U]`` its position (usually ``state.position + 1``).
    users: ``[U]`` its user id (usually ``state.user``).

  Returns:
    ``hidden_ud`` ``[U, hidden]``, the model's output at the new position, and the updated state.
  """
  x = _embed(model, items, positions, segments, users)  # [U, hidden]
  length = state.length + 1
  key_mask = state.key_mask
  if key_mask is not None:
    key_mask = jax.lax.dynamic_update_slice_in_dim(key_mask, jnp.ones((key_mask.shape[0], 1), bool), state.cursor, 1)
  layers = []
  for block, layer in zip(model.blocks, state.layers, strict=True):
    attend = functools.partial(
      _decode_attention, block.attn, layer=layer, key_mask=key_mask, cursor=state.cursor, length=length
    )
    x, layer = _block_forward(block, x, attend, lambda t: t)
    layers.append(layer)
  if model.final_norm is not None:
    x = model.final_norm(x)
  new_state = DecodeState(
    layers=tuple(layers),
    key_mask=key_mask,
    cursor=state.cursor + 1,
    length=length,
    position=positions,
    user=users,
  )
  return x, new_state
